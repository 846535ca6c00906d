// Op micro-benchmark on the GPU path at the Llama-3.2-1B shape (hidden 2048, 32 heads, 8 kv heads,
// head_dim 64, ffn 8192, vocab 128256, batch 2 x 2048): time per op and achieved TFLOP/s or GB/s.
// Prints one table. Usage: ranktune_bench_ops [iterations]
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
  mem("swiglu bwd", 5.0 * N * F * 2,
      [&] { be->swiglu_backward(dgu.col_slice(0, F), dgu.col_slice(F, F), h, gu.col_slice(0, F), gu.col_slice(F, F)); });
  mem("cross-entropy chunk (2048 x 128256)", double(chunk) * V * (4 + 2),
      [&] { be->cross_entropy(losses, dlogits, logits, targets, 1.0f / 4096); });
  AdamWParams hp;
  hp.lr = 1e-4f;
  mem("adamw (16M params)", double(P) * (4 * 4 + 4 + 2 + 4), [&] { be->adamw_step(master, compute, grad, m, v, hp); });

  cudaDeviceProp prop{};
  cudaGetDeviceProperties(&prop, 0);
  std::printf("\nranktune op benchmark on %s, Llama-3.2-1B shape, batch 2 x 2048, %d iterations each\n", prop.name, iters);
  std::printf("%-48s %10s %10s %10s\n", "op", "ms", "TFLOP/s", "GB/s");
  for (const auto& r : rows)
    std::printf("%-48s %10.3f %10s %10s\n", r.op.c_str(), r.ms, r.tflops > 0 ? std::to_string(int(r.tflops)).c_str() : "-",
                r.gbps > 0 ? std::to_string(int(r.gbps)).c_str() : "-");
  return 0;
}
