// Op micro-benchmark on the GPU path at the Llama-3.2-1B shape (hidden 2048, 32 heads, 8 kv heads,
// head_dim 64, ffn 8192, vocab 128256, batch 2 x 2048): time per op and achieved TFLOP/s or GB/s.
// Prints one table. Usage: ranktune_bench_ops [iterations]
//
// Then one experiment: can full fine-tuning's AdamW (1.24B fp32 masters and moments, 37 GB moved,
// memory-bound) run beside the next step's forward (compute-bound GEMMs) instead of before it? A
// second backend on the same GPU (a stream of its own) updates the embedding and then layer l + 1
// while the first runs layer l's forward ops, each layer's forward waiting for its own update, as
// the optimizer would have to order them. It prints the two alone, one after the other, and
// overlapped.
#include <cuda_runtime.h>

#include <chrono>
#include <cmath>
#include <cstdio>
#include <functional>
#include <random>
#include <string>
#include <vector>

#include "ranktune/backend.h"

using namespace ranktune;

namespace {

struct Row {
  std::string op;
  double ms, tflops, gbps;
};

double time_ms(Backend& be, int iters, const std::function<void()>& fn) {
  fn();  // warm-up
  be.synchronize();
  const auto t0 = std::chrono::steady_clock::now();
  for (int i = 0; i < iters; ++i) fn();
  be.synchronize();
  return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count() / iters;
}

Tensor random_tensor(Backend& be, std::vector<Buffer>& keep, DType t, std::initializer_list<int64_t> dims, float scale,
                     uint32_t seed) {
  int64_t n = 1;
  for (auto d : dims) n *= d;
  keep.push_back(be.alloc(static_cast<size_t>(n) * dtype_size(t)));
  Tensor x = keep.back().as(t, dims);
  std::mt19937 rng(seed);
  std::normal_distribution<float> nd(0.f, scale);
  if (t == DType::bf16) {
    std::vector<uint16_t> h(static_cast<size_t>(n));
    for (auto& v : h) v = f32_to_bf16(nd(rng));
    be.upload(x, h.data());
  } else {
    std::vector<float> h(static_cast<size_t>(n));
    for (auto& v : h) v = nd(rng);
    be.upload(x, h.data());
  }
  return x;
}

}  // namespace

int main(int argc, char** argv) {
  const int iters = argc > 1 ? std::atoi(argv[1]) : 20;
  auto be = make_cuda_backend(0);
  const int64_t B = 2, T = 2048, N = B * T, C = 2048, H = 32, Hkv = 8, D = 64, F = 8192, V = 128256;
  const int64_t QKV = (H + 2 * Hkv) * D;
  std::vector<Buffer> keep;
  const DType bf = DType::bf16;
  Tensor x = random_tensor(*be, keep, bf, {N, C}, 1.f, 1), x2 = random_tensor(*be, keep, bf, {N, C}, 1.f, 2);
  Tensor w_norm = random_tensor(*be, keep, bf, {C}, 1.f, 3);
  Tensor w_qkv = random_tensor(*be, keep, bf, {QKV, C}, 0.02f, 4), w_gu = random_tensor(*be, keep, bf, {2 * F, C}, 0.02f, 5);
  Tensor w_down = random_tensor(*be, keep, bf, {C, F}, 0.02f, 6), w_head = random_tensor(*be, keep, bf, {V, C}, 0.02f, 7);
  Tensor qkv = random_tensor(*be, keep, bf, {N, QKV}, 1.f, 8), dqkv = random_tensor(*be, keep, bf, {N, QKV}, 1.f, 9);
  Tensor gu = random_tensor(*be, keep, bf, {N, 2 * F}, 1.f, 10), dgu = random_tensor(*be, keep, bf, {N, 2 * F}, 1.f, 11);
  Tensor h = random_tensor(*be, keep, bf, {N, F}, 1.f, 12);
  Tensor att = random_tensor(*be, keep, bf, {N, H * D}, 1.f, 13), datt = random_tensor(*be, keep, bf, {N, H * D}, 1.f, 14);
  Tensor out = random_tensor(*be, keep, bf, {N, C}, 1.f, 15), rstd = random_tensor(*be, keep, DType::f32, {N}, 1.f, 16);
  Tensor lse = random_tensor(*be, keep, DType::f32, {B, H, T}, 1.f, 17);
  Tensor dw_qkv = random_tensor(*be, keep, DType::f32, {QKV, C}, 1.f, 18);
  const int64_t chunk = 2048;
  Tensor logits = random_tensor(*be, keep, DType::f32, {chunk, V}, 1.f, 19), dlogits = random_tensor(*be, keep, bf, {chunk, V}, 1.f, 20);
  Tensor losses = random_tensor(*be, keep, DType::f32, {chunk}, 1.f, 21);
  std::vector<int32_t> pos(static_cast<size_t>(N)), tgt(static_cast<size_t>(chunk));
  for (int64_t i = 0; i < N; ++i) pos[static_cast<size_t>(i)] = static_cast<int32_t>(i % T);
  for (int64_t i = 0; i < chunk; ++i) tgt[static_cast<size_t>(i)] = static_cast<int32_t>((i * 7919) % V);
  keep.push_back(be->alloc(static_cast<size_t>(N) * 4));
  Tensor positions = keep.back().as(DType::i32, {N});
  be->upload(positions, pos.data());
  keep.push_back(be->alloc(static_cast<size_t>(chunk) * 4));
  Tensor targets = keep.back().as(DType::i32, {chunk});
  be->upload(targets, tgt.data());
  std::vector<float> cs(static_cast<size_t>(T * D / 2));
  for (size_t i = 0; i < cs.size(); ++i) cs[i] = std::cos(0.001f * static_cast<float>(i));
  keep.push_back(be->alloc(cs.size() * 4));
  Tensor cos_t = keep.back().as(DType::f32, {T, D / 2});
  be->upload(cos_t, cs.data());
  Tensor sin_t = cos_t;
  const int64_t P = 16 * 1024 * 1024;  // optimizer tensor
  Tensor master = random_tensor(*be, keep, DType::f32, {P}, 1.f, 22), grad = random_tensor(*be, keep, DType::f32, {P}, 1.f, 23);
  Tensor m = random_tensor(*be, keep, DType::f32, {P}, 0.f, 24), v = random_tensor(*be, keep, DType::f32, {P}, 0.f, 25);
  Tensor compute = random_tensor(*be, keep, bf, {P}, 1.f, 26);

  const AttnShape shape{B, T, H, Hkv, D, 1.0f / 8.0f};
  Tensor q = qkv.col_slice(0, H * D), k = qkv.col_slice(H * D, Hkv * D), vv = qkv.col_slice((H + Hkv) * D, Hkv * D);
  Tensor dq = dqkv.col_slice(0, H * D), dk = dqkv.col_slice(H * D, Hkv * D), dv = dqkv.col_slice((H + Hkv) * D, Hkv * D);
  std::vector<Row> rows;
  auto gemm = [&](const std::string& name, double flops, const std::function<void()>& fn) {
    const double ms = time_ms(*be, iters, fn);
    rows.push_back({name, ms, flops / ms / 1e9, 0});
  };
  auto mem = [&](const std::string& name, double bytes, const std::function<void()>& fn) {
    const double ms = time_ms(*be, iters, fn);
    rows.push_back({name, ms, 0, bytes / ms / 1e6});
  };
  gemm("matmul qkv fwd [4096x2048]x[2048x3072]", 2.0 * N * C * QKV, [&] { be->matmul(qkv, x, w_qkv, false, true, 1, 0); });
  gemm("matmul gate_up fwd [4096x2048]x[2048x16384]", 2.0 * N * C * 2 * F, [&] { be->matmul(gu, x, w_gu, false, true, 1, 0); });
  gemm("matmul down fwd [4096x8192]x[8192x2048]", 2.0 * N * F * C, [&] { be->matmul(out, h, w_down, false, true, 1, 0); });
  gemm("matmul qkv dX", 2.0 * N * C * QKV, [&] { be->matmul(x2, dqkv, w_qkv, false, false, 1, 0); });
  gemm("matmul qkv dW (f32 out, accumulate)", 2.0 * N * C * QKV, [&] { be->matmul(dw_qkv, dqkv, x, true, false, 1, 1); });
  gemm("lm_head chunk fwd [2048x2048]x[2048x128256]", 2.0 * chunk * C * V,
       [&] { be->matmul(logits, x.row_slice(0, chunk), w_head, false, true, 1, 0); });
  const double attn_fwd = 2.0 * 2 * B * H * double(T) * T * D / 2;
  gemm("attention fwd (causal, GQA 32/8, D=64)", attn_fwd,
       [&] { be->attention_forward(att, lse, q, k, vv, Tensor(), shape); });
  gemm("attention bwd", 2.5 * attn_fwd,
       [&] { be->attention_backward(dq, dk, dv, datt, att, lse, q, k, vv, Tensor(), shape); });
  mem("residual+rmsnorm fwd", 4.0 * N * C * 2, [&] { be->residual_rmsnorm_forward(out, x2, rstd, x, out, w_norm, 1e-5f); });
  mem("rmsnorm bwd", 4.0 * N * C * 2, [&] { be->rmsnorm_backward(out, Tensor(), 0, x2, x, w_norm, rstd); });
  mem("rope fwd (q and k)", 2.0 * N * (H + Hkv) * D * 2, [&] {
    be->rope_forward(q, positions, cos_t, sin_t, D);
    be->rope_forward(k, positions, cos_t, sin_t, D);
  });
  mem("swiglu fwd", 3.0 * N * F * 2, [&] { be->swiglu_forward(h, gu.col_slice(0, F), gu.col_slice(F, F)); });
  mem("swiglu bwd", 5.0 * N * F * 2, [&] {
    be->swiglu_backward(dgu.col_slice(0, F), dgu.col_slice(F, F), h, gu.col_slice(0, F), gu.col_slice(F, F), Tensor());
  });
  mem("cross-entropy chunk (2048 x 128256)", double(chunk) * V * (4 + 2),
      [&] { be->cross_entropy(losses, dlogits, logits, targets, 1.0f / 4096); });
  AdamWParams hp;
  hp.lr = 1e-4f;
  // Bytes AdamW moves per parameter: master, m and v read and written (f32), the gradient read, the
  // bf16 compute copy written.
  constexpr double kAdamwBytes = 3 * 4 * 2 + 4 + 2;
  mem("adamw (16M params)", double(P) * kAdamwBytes, [&] { be->adamw_step(master, compute, grad, m, v, hp); });

  keep.clear();  // the op operands above are done with; the experiment needs the room

  // ---- AdamW beside the forward -------------------------------------------------------------------
  // The forward's ops of one layer (no LoRA): ln1, qkv, RoPE, attention, o, the residual and ln2,
  // gate_up, SwiGLU, down.
  Tensor fx = random_tensor(*be, keep, bf, {N, C}, 1.f, 31), fln = random_tensor(*be, keep, bf, {N, C}, 1.f, 32);
  Tensor fqkv = random_tensor(*be, keep, bf, {N, QKV}, 1.f, 33),
         fatt = random_tensor(*be, keep, bf, {N, H * D}, 1.f, 34);
  Tensor fgu = random_tensor(*be, keep, bf, {N, 2 * F}, 1.f, 35), fh = random_tensor(*be, keep, bf, {N, F}, 1.f, 36);
  Tensor fmid = random_tensor(*be, keep, bf, {N, C}, 1.f, 30);
  Tensor fdelta = random_tensor(*be, keep, bf, {N, C}, 1.f, 37),
         frstd = random_tensor(*be, keep, DType::f32, {N}, 1.f, 38);
  Tensor flse = random_tensor(*be, keep, DType::f32, {B, H, T}, 1.f, 39),
         fnorm = random_tensor(*be, keep, bf, {C}, 1.f, 40);
  Tensor fw_qkv = random_tensor(*be, keep, bf, {QKV, C}, 0.02f, 41),
         fw_o = random_tensor(*be, keep, bf, {C, H * D}, 0.02f, 42);
  Tensor fw_gu = random_tensor(*be, keep, bf, {2 * F, C}, 0.02f, 43),
         fw_down = random_tensor(*be, keep, bf, {C, F}, 0.02f, 44);
  keep.push_back(be->alloc(static_cast<size_t>(N) * 4));
  Tensor fpos = keep.back().as(DType::i32, {N});
  be->upload(fpos, pos.data());
  keep.push_back(be->alloc(cs.size() * 4));
  Tensor fcos = keep.back().as(DType::f32, {T, D / 2});
  be->upload(fcos, cs.data());
  const auto layer_forward = [&] {
    be->residual_rmsnorm_forward(Tensor(), fln, frstd, fx, Tensor(), fnorm, 1e-5f);
    be->matmul(fqkv, fln, fw_qkv, false, true, 1, 0);
    be->rope_forward(fqkv.col_slice(0, (H + Hkv) * D), fpos, fcos, fcos, D);
    be->attention_forward(fatt, flse, fqkv.col_slice(0, H * D), fqkv.col_slice(H * D, Hkv * D),
                          fqkv.col_slice((H + Hkv) * D, Hkv * D), Tensor(), shape);
    be->matmul(fdelta, fatt, fw_o, false, true, 1, 0);
    be->residual_rmsnorm_forward(fmid, fln, frstd, fx, fdelta, fnorm, 1e-5f);
    be->matmul(fgu, fln, fw_gu, false, true, 1, 0);
    be->swiglu_forward(fh, fgu.col_slice(0, F), fgu.col_slice(F, F));
    be->matmul(fdelta, fh, fw_down, false, true, 1, 0);
  };
  // The parameters in the model's order: the tied embedding, then 16 layers of 60.8M.
  const int64_t n_layers = 16, layer_params = C * QKV + C * H * D + 3 * C * F + 2 * C, embed_params = V * C;
  std::vector<int64_t> chunk_sizes{embed_params};
  for (int64_t l = 0; l < n_layers; ++l) chunk_sizes.push_back(layer_params);
  int64_t all_params = 0;
  for (int64_t n : chunk_sizes) all_params += n;
  // Four f32 arrays (master, gradient, m, v) and the bf16 weights, one allocation each.
  keep.push_back(be->alloc(static_cast<size_t>(all_params) * 4));
  Tensor o_master = keep.back().as(DType::f32, {all_params});
  be->fill(o_master, 0.02f);
  keep.push_back(be->alloc(static_cast<size_t>(all_params) * 4));
  Tensor o_grad = keep.back().as(DType::f32, {all_params});
  be->fill(o_grad, 1e-3f);
  keep.push_back(be->alloc(static_cast<size_t>(all_params) * 4));
  Tensor o_m = keep.back().as(DType::f32, {all_params});
  keep.push_back(be->alloc(static_cast<size_t>(all_params) * 4));
  Tensor o_v = keep.back().as(DType::f32, {all_params});
  keep.push_back(be->alloc(static_cast<size_t>(all_params) * 2));
  Tensor o_weights = keep.back().as(bf, {all_params});
  auto upd = make_cuda_backend(0);  // the update stream
  const auto update = [&](Backend& on, size_t chunk) {
    int64_t at = 0;
    for (size_t i = 0; i < chunk; ++i) at += chunk_sizes[i];
    const int64_t n = chunk_sizes[chunk];
    on.adamw_step(o_master.flat_slice(at, n), o_weights.flat_slice(at, n), o_grad.flat_slice(at, n),
                  o_m.flat_slice(at, n), o_v.flat_slice(at, n), hp);
  };
  const int overlap_iters = std::max(2, iters / 4);
  const auto both_ms = [&](const std::function<void()>& fn) {
    fn();
    be->synchronize(), upd->synchronize();
    const auto t0 = std::chrono::steady_clock::now();
    for (int i = 0; i < overlap_iters; ++i) fn();
    be->synchronize(), upd->synchronize();
    return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count() / overlap_iters;
  };
  const double forward_ms = both_ms([&] {
    for (int64_t l = 0; l < n_layers; ++l) layer_forward();
  });
  const double adamw_ms = both_ms([&] {
    for (size_t c = 0; c < chunk_sizes.size(); ++c) update(*be, c);
  });
  const double serial_ms = both_ms([&] {
    for (size_t c = 0; c < chunk_sizes.size(); ++c) update(*be, c);
    for (int64_t l = 0; l < n_layers; ++l) layer_forward();
  });
  // Layer l's forward waits for the updates queued before it (the embedding's and its own); layer
  // l + 1's update is queued after that wait, so it runs beside layer l's forward.
  const double overlapped_ms = both_ms([&] {
    upd->wait_for(*be);  // the step's backward (here: the last forward) has written the gradients
    update(*upd, 0);
    update(*upd, 1);
    for (int64_t l = 0; l < n_layers; ++l) {
      be->wait_for(*upd);
      if (static_cast<size_t>(l) + 2 < chunk_sizes.size()) update(*upd, static_cast<size_t>(l) + 2);
      layer_forward();
    }
  });

  cudaDeviceProp prop{};
  cudaGetDeviceProperties(&prop, 0);
  std::printf("\nranktune op benchmark on %s, Llama-3.2-1B shape, batch 2 x 2048, %d iterations each\n", prop.name, iters);
  std::printf("%-48s %10s %10s %10s\n", "op", "ms", "TFLOP/s", "GB/s");
  for (const auto& r : rows)
    std::printf("%-48s %10.3f %10s %10s\n", r.op.c_str(), r.ms, r.tflops > 0 ? std::to_string(int(r.tflops)).c_str() : "-",
                r.gbps > 0 ? std::to_string(int(r.gbps)).c_str() : "-");
  const double adamw_bytes = static_cast<double>(all_params) * kAdamwBytes;
  std::printf(
      "\nAdamW beside the forward (%.2fB params, %.1f GB moved; 16 layer forwards at batch 2 x 2048), %d "
      "iterations each:\n",
      static_cast<double>(all_params) / 1e9, adamw_bytes / 1e9, overlap_iters);
  std::printf("  forward alone %.2f ms, AdamW alone %.2f ms (%.0f GB/s)\n", forward_ms, adamw_ms,
              adamw_bytes / adamw_ms / 1e6);
  std::printf("  one after the other %.2f ms, overlapped %.2f ms: %.2f ms saved (%.0f%% of AdamW)\n", serial_ms,
              overlapped_ms, serial_ms - overlapped_ms, 100 * (serial_ms - overlapped_ms) / adamw_ms);
  return 0;
}
