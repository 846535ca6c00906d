// The flash attention kernels (kernels/attention.cu) against a naive double-precision reference:
// causal, grouped-query, optional packed documents, strided views inside fused qkv buffers.
// Inputs are random bf16; outputs are poisoned with NaN first, so every element the kernels must
// write is checked to be written, and every element around the views to be left alone.
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include "gpu_skip.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

#include "../kernels/kernels.h"

namespace {

namespace rk = ranktune::kernels;

// Tolerances for bf16 inputs/outputs with fp32 accumulation: relative L2 error of out, dq, dk, dv
// and the largest absolute error of lse.
constexpr double kRelTol = 2e-2;
constexpr double kLseTol = 1e-2;
constexpr uint16_t kPoison = 0x7FC0;  // bf16 quiet NaN

#define CUDA_OK(call)                                                                       \
  do {                                                                                      \
    const cudaError_t err_ = (call);                                                        \
    if (err_ != cudaSuccess)                                                                \
      throw std::runtime_error(std::string(#call) + ": " + cudaGetErrorString(err_));       \
  } while (0)

uint16_t to_bf16(float x) {  // round to nearest even
  uint32_t u;
  std::memcpy(&u, &x, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return kPoison;
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}
float from_bf16(uint16_t h) {
  const uint32_t u = static_cast<uint32_t>(h) << 16;
  float x;
  std::memcpy(&x, &u, 4);
  return x;
}

class DeviceBuffer {
 public:
  explicit DeviceBuffer(size_t bytes) : bytes_(bytes) { CUDA_OK(cudaMalloc(&ptr_, std::max<size_t>(bytes, 16))); }
  ~DeviceBuffer() { cudaFree(ptr_); }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  template <class T>
  T* as() const { return static_cast<T*>(ptr_); }
  template <class T>
  void upload(const std::vector<T>& host) {
    CUDA_OK(cudaMemcpy(ptr_, host.data(), host.size() * sizeof(T), cudaMemcpyHostToDevice));
  }
  template <class T>
  std::vector<T> download() const {
    std::vector<T> host(bytes_ / sizeof(T));
    CUDA_OK(cudaMemcpy(host.data(), ptr_, host.size() * sizeof(T), cudaMemcpyDeviceToHost));
    return host;
  }

 private:
  void* ptr_ = nullptr;
  size_t bytes_ = 0;
};

// One attention problem. q/k/v live in a fused buffer [B*T, ld_qkv] at columns offset + (0, H*D,
// (H+Hkv)*D), where ld_qkv = (H + 2*Hkv)*D + pad; dq/dk/dv in a buffer of the same layout; out and
// dout in [B*T, H*D + pad] buffers at column offset. An odd offset misaligns every view.
struct Problem {
  int B = 1, T = 1, H = 1, Hkv = 1, D = 1;
  int pad = 0;
  int offset = 0;
  std::vector<int32_t> docs;  // empty or [B*T], non-decreasing within each sequence

  int64_t rows() const { return int64_t{B} * T; }
  int64_t ld_qkv() const { return int64_t{H + 2 * Hkv} * D + pad; }
  int64_t ld_o() const { return int64_t{H} * D + pad; }
  size_t qkv_elems() const { return static_cast<size_t>(rows() * ld_qkv() + offset); }
  size_t o_elems() const { return static_cast<size_t>(rows() * ld_o() + offset); }
  int64_t q_col(int h) const { return offset + int64_t{h} * D; }
  int64_t k_col(int h) const { return offset + int64_t{H + h} * D; }
  int64_t v_col(int h) const { return offset + int64_t{H + Hkv + h} * D; }
  int64_t o_col(int h) const { return offset + int64_t{h} * D; }
  float scale() const { return 1.f / std::sqrt(static_cast<float>(D)); }
  std::string name() const {
    return "B=" + std::to_string(B) + " T=" + std::to_string(T) + " H=" + std::to_string(H) +
           " Hkv=" + std::to_string(Hkv) + " D=" + std::to_string(D) + " pad=" + std::to_string(pad) +
           " offset=" + std::to_string(offset) + (docs.empty() ? "" : " docs");
  }
};

struct Inputs {
  std::vector<uint16_t> qkv;   // fused, bf16 bits (pad columns hold random values too)
  std::vector<uint16_t> dout;  // [rows, ld_o] layout, bf16 bits
};

Inputs random_inputs(const Problem& pb, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal(0.f, 1.f);
  Inputs in;
  in.qkv.resize(pb.qkv_elems());
  for (auto& x : in.qkv) x = to_bf16(normal(rng));
  in.dout.resize(pb.o_elems());
  for (auto& x : in.dout) x = to_bf16(normal(rng));
  return in;
}

// Naive attention in double: out/dq [rows, H*D], dk/dv [rows, Hkv*D], lse [B, H, T].
struct Reference {
  std::vector<double> out, lse, dq, dk, dv;
};

Reference reference(const Problem& pb, const Inputs& in) {
  const int B = pb.B, T = pb.T, H = pb.H, Hkv = pb.Hkv, D = pb.D;
  const int64_t ld = pb.ld_qkv(), ldo = pb.ld_o();
  const double scale = pb.scale();
  auto q = [&](int64_t n, int h, int d) { return double(from_bf16(in.qkv[n * ld + pb.q_col(h) + d])); };
  auto k = [&](int64_t n, int h, int d) { return double(from_bf16(in.qkv[n * ld + pb.k_col(h) + d])); };
  auto v = [&](int64_t n, int h, int d) { return double(from_bf16(in.qkv[n * ld + pb.v_col(h) + d])); };
  auto dout = [&](int64_t n, int h, int d) { return double(from_bf16(in.dout[n * ldo + pb.o_col(h) + d])); };

  Reference ref;
  const size_t rows = static_cast<size_t>(pb.rows());
  ref.out.assign(rows * H * D, 0.0);
  ref.dq.assign(rows * H * D, 0.0);
  ref.dk.assign(rows * Hkv * D, 0.0);
  ref.dv.assign(rows * Hkv * D, 0.0);
  ref.lse.assign(static_cast<size_t>(B) * H * T, 0.0);
  std::vector<double> p(T), dp(T);
  std::vector<char> allowed(T);
  for (int b = 0; b < B; ++b)
    for (int h = 0; h < H; ++h) {
      const int hk = h / (H / Hkv);
      for (int t = 0; t < T; ++t) {
        const int64_t n = int64_t{b} * T + t;
        double mx = -INFINITY;
        for (int u = 0; u <= t; ++u) {
          const int64_t m = int64_t{b} * T + u;
          allowed[u] = pb.docs.empty() || pb.docs[m] == pb.docs[n];
          if (!allowed[u]) continue;
          double s = 0;
          for (int d = 0; d < D; ++d) s += q(n, h, d) * k(m, hk, d);
          p[u] = s * scale;
          mx = std::max(mx, p[u]);
        }
        double sum = 0;
        for (int u = 0; u <= t; ++u)
          if (allowed[u]) sum += std::exp(p[u] - mx);
        const double lse = mx + std::log(sum);
        ref.lse[(size_t(b) * H + h) * T + t] = lse;
        double delta = 0;
        for (int u = 0; u <= t; ++u) {
          if (!allowed[u]) continue;
          const int64_t m = int64_t{b} * T + u;
          p[u] = std::exp(p[u] - lse);
          dp[u] = 0;
          for (int d = 0; d < D; ++d) {
            ref.out[(n * H + h) * D + d] += p[u] * v(m, hk, d);
            dp[u] += dout(n, h, d) * v(m, hk, d);
          }
          delta += p[u] * dp[u];
        }
        for (int u = 0; u <= t; ++u) {
          if (!allowed[u]) continue;
          const int64_t m = int64_t{b} * T + u;
          const double ds = p[u] * (dp[u] - delta);
          for (int d = 0; d < D; ++d) {
            ref.dq[(n * H + h) * D + d] += scale * ds * k(m, hk, d);
            ref.dk[(m * Hkv + hk) * D + d] += scale * ds * q(n, h, d);
            ref.dv[(m * Hkv + hk) * D + d] += p[u] * dout(n, h, d);
          }
        }
      }
    }
  return ref;
}

// What the kernels wrote: the whole out and dqkv buffers (views and the columns around them) and lse.
struct GpuResult {
  std::vector<uint16_t> out, dqkv;
  std::vector<float> lse;
};

GpuResult run_gpu(const Problem& pb, const Inputs& in) {
  DeviceBuffer qkv(pb.qkv_elems() * 2), out(pb.o_elems() * 2), dout(pb.o_elems() * 2);
  DeviceBuffer dqkv(pb.qkv_elems() * 2), lse(size_t(pb.B) * pb.H * pb.T * 4);
  DeviceBuffer docs(pb.docs.size() * 4);
  qkv.upload(in.qkv);
  dout.upload(in.dout);
  if (!pb.docs.empty()) docs.upload(pb.docs);
  out.upload(std::vector<uint16_t>(pb.o_elems(), kPoison));
  dqkv.upload(std::vector<uint16_t>(pb.qkv_elems(), kPoison));
  lse.upload(std::vector<float>(size_t(pb.B) * pb.H * pb.T, NAN));

  const rk::bf16* base = qkv.as<rk::bf16>();
  rk::AttnArgs a{};
  a.q = base + pb.q_col(0);
  a.k = base + pb.k_col(0);
  a.v = base + pb.v_col(0);
  a.ld_q = a.ld_k = a.ld_v = pb.ld_qkv();
  a.doc_ids = pb.docs.empty() ? nullptr : docs.as<int32_t>();
  a.batch = pb.B;
  a.seq_len = pb.T;
  a.n_heads = pb.H;
  a.n_kv_heads = pb.Hkv;
  a.head_dim = pb.D;
  a.scale = pb.scale();

  rk::bf16* o = out.as<rk::bf16>() + pb.o_col(0);
  rk::attention_forward(o, pb.ld_o(), lse.as<float>(), a, nullptr);
  CUDA_OK(cudaGetLastError());

  DeviceBuffer scratch(rk::attention_backward_scratch_bytes(a));
  rk::bf16* dbase = dqkv.as<rk::bf16>();
  rk::attention_backward(dbase + pb.q_col(0), pb.ld_qkv(), dbase + pb.k_col(0), pb.ld_qkv(),
                         dbase + pb.v_col(0), pb.ld_qkv(), dout.as<rk::bf16>() + pb.o_col(0),
                         pb.ld_o(), o, pb.ld_o(), lse.as<float>(), a, scratch.as<void>(), nullptr);
  CUDA_OK(cudaDeviceSynchronize());

  GpuResult r;
  r.out = out.download<uint16_t>();
  r.dqkv = dqkv.download<uint16_t>();
  r.lse = lse.download<float>();
  return r;
}

// Relative L2 error of one [rows, heads*D] output view inside a GPU buffer; fails on any element
// not written (non-finite).
double rel_error(const char* what, const Problem& pb, const std::vector<uint16_t>& buf, int64_t ld,
                 int64_t col0, int heads, const std::vector<double>& ref) {
  double err = 0, norm = 0;
  int64_t bad = 0;
  for (int64_t n = 0; n < pb.rows(); ++n)
    for (int64_t c = 0; c < int64_t{heads} * pb.D; ++c) {
      const double g = from_bf16(buf[n * ld + col0 + c]);
      const double r = ref[n * heads * pb.D + c];
      if (!std::isfinite(g)) {
        if (bad++ < 5) ADD_FAILURE() << what << " row " << n << " col " << c << " not written";
        continue;
      }
      err += (g - r) * (g - r);
      norm += r * r;
    }
  EXPECT_EQ(bad, 0) << what << ": elements not written";
  return std::sqrt(err / std::max(norm, 1e-30));
}

// Every element of buf outside the given column ranges [c0, c1) of each row (and before the
// offset) must still hold the poison.
void expect_untouched(const char* what, const std::vector<uint16_t>& buf, int64_t rows, int64_t ld,
                      int64_t offset, std::vector<std::pair<int64_t, int64_t>> views) {
  int64_t touched = 0;
  for (int64_t i = 0; i < offset; ++i) touched += buf[i] != kPoison;
  for (int64_t n = 0; n < rows; ++n)
    for (int64_t c = 0; c < ld; ++c) {
      bool inside = false;
      for (auto [c0, c1] : views) inside = inside || (offset + c >= c0 && offset + c < c1);
      if (!inside) touched += buf[offset + n * ld + c] != kPoison;
    }
  EXPECT_EQ(touched, 0) << what << ": kernels wrote outside their views";
}

void check_problem(const Problem& pb, uint32_t seed = 1234) {
  SCOPED_TRACE(pb.name());
  const Inputs in = random_inputs(pb, seed);
  const GpuResult gpu = run_gpu(pb, in);
  const Reference ref = reference(pb, in);

  const double e_out = rel_error("out", pb, gpu.out, pb.ld_o(), pb.o_col(0), pb.H, ref.out);
  const double e_dq = rel_error("dq", pb, gpu.dqkv, pb.ld_qkv(), pb.q_col(0), pb.H, ref.dq);
  const double e_dk = rel_error("dk", pb, gpu.dqkv, pb.ld_qkv(), pb.k_col(0), pb.Hkv, ref.dk);
  const double e_dv = rel_error("dv", pb, gpu.dqkv, pb.ld_qkv(), pb.v_col(0), pb.Hkv, ref.dv);
  double e_lse = 0;
  for (size_t i = 0; i < ref.lse.size(); ++i) {
    const double d = std::fabs(double(gpu.lse[i]) - ref.lse[i]);
    e_lse = std::isfinite(d) ? std::max(e_lse, d) : INFINITY;
  }
  std::printf("[ attention ] %-58s out %.2e dq %.2e dk %.2e dv %.2e lse %.2e\n", pb.name().c_str(),
              e_out, e_dq, e_dk, e_dv, e_lse);
  EXPECT_LT(e_out, kRelTol);
  EXPECT_LT(e_dq, kRelTol);
  EXPECT_LT(e_dk, kRelTol);
  EXPECT_LT(e_dv, kRelTol);
  EXPECT_LT(e_lse, kLseTol);

  const int64_t hd = int64_t{pb.H} * pb.D;
  expect_untouched("out", gpu.out, pb.rows(), pb.ld_o(), pb.offset, {{pb.o_col(0), pb.o_col(0) + hd}});
  expect_untouched("dqkv", gpu.dqkv, pb.rows(), pb.ld_qkv(), pb.offset,
                   {{pb.q_col(0), pb.v_col(pb.Hkv)}});  // q, k, v views are contiguous
}

// Documents: sequence b is split at the given positions.
std::vector<int32_t> make_docs(int B, int T, const std::vector<std::vector<int>>& splits) {
  std::vector<int32_t> docs(static_cast<size_t>(B) * T);
  for (int b = 0; b < B; ++b) {
    int32_t id = 7 * b + 3;  // arbitrary, increasing
    size_t next = 0;
    for (int t = 0; t < T; ++t) {
      if (next < splits[b].size() && t == splits[b][next]) { ++id; ++next; }
      docs[size_t(b) * T + t] = id;
    }
  }
  return docs;
}

Problem shape(int B, int T, int H, int Hkv, int D) {
  Problem pb;
  pb.B = B; pb.T = T; pb.H = H; pb.Hkv = Hkv; pb.D = D;
  return pb;
}

TEST(GpuAttention, HeadDim6Gqa4) {
  SKIP_WITHOUT_GPU();
  check_problem(shape(2, 37, 4, 1, 6));
}

TEST(GpuAttention, HeadDim24Gqa2) {
  SKIP_WITHOUT_GPU();
  check_problem(shape(1, 130, 4, 2, 24));
}

TEST(GpuAttention, HeadDim64) {
  SKIP_WITHOUT_GPU();
  check_problem(shape(2, 256, 8, 8, 64));
}

TEST(GpuAttention, HeadDim128Gqa2) {
  SKIP_WITHOUT_GPU();
  check_problem(shape(1, 300, 4, 2, 128));
}

TEST(GpuAttention, OtherHeadDims) {  // padded paths: 1 -> 32, 12 -> 32, 80 -> 128, 200/256 -> 256
  SKIP_WITHOUT_GPU();
  check_problem(shape(1, 45, 2, 1, 1));
  check_problem(shape(2, 70, 3, 1, 12));
  check_problem(shape(1, 90, 2, 1, 80));
  check_problem(shape(1, 75, 2, 2, 200));
  check_problem(shape(1, 150, 2, 1, 256));
}

TEST(GpuAttention, StridedViews) {
  SKIP_WITHOUT_GPU();
  Problem pb = shape(2, 100, 4, 2, 64);
  pb.pad = 5;
  pb.offset = 3;  // misaligned: scalar loads and stores
  check_problem(pb);
  pb = shape(1, 140, 4, 1, 128);
  pb.pad = 24;
  pb.offset = 8;  // 16-byte aligned, wider rows: vector loads
  check_problem(pb);
  pb = shape(2, 50, 2, 1, 24);
  pb.pad = 1;
  pb.offset = 1;
  check_problem(pb);
}

TEST(GpuAttention, PackedDocuments) {
  SKIP_WITHOUT_GPU();
  Problem pb = shape(2, 200, 4, 2, 64);
  pb.docs = make_docs(2, 200, {{50, 137}, {10, 151}});
  check_problem(pb);
  pb = shape(2, 300, 4, 1, 128);
  pb.docs = make_docs(2, 300, {{64, 65}, {1, 299}});  // includes 1-token documents
  check_problem(pb);
  pb = shape(1, 90, 2, 2, 12);
  pb.pad = 3;
  pb.offset = 1;
  pb.docs = make_docs(1, 90, {{30, 61}});
  check_problem(pb);
}

TEST(GpuAttention, Deterministic) {
  SKIP_WITHOUT_GPU();
  for (int D : {64, 128}) {
    Problem pb = shape(2, 515, 8, 2, D);
    pb.docs = make_docs(2, 515, {{100, 400}, {256, 300}});
    const Inputs in = random_inputs(pb, 99);
    const GpuResult first = run_gpu(pb, in);
    const GpuResult second = run_gpu(pb, in);
    EXPECT_TRUE(first.out == second.out) << "forward output differs between runs (D=" << D << ")";
    EXPECT_EQ(0, std::memcmp(first.lse.data(), second.lse.data(), first.lse.size() * 4))
        << "lse differs between runs (D=" << D << ")";
    EXPECT_TRUE(first.dqkv == second.dqkv) << "dq/dk/dv differ between runs (D=" << D << ")";
  }
}

// Throughput at the product's shape; run with --gtest_also_run_disabled_tests.
TEST(GpuAttention, DISABLED_Benchmark) {
  SKIP_WITHOUT_GPU();
  struct Shape { int B, T, H, Hkv, D; };
  std::printf("%-32s %10s %10s %10s %10s\n", "shape", "fwd ms", "fwd TF/s", "bwd ms", "bwd TF/s");
  for (const Shape sh : {Shape{2, 2048, 32, 8, 64}, Shape{2, 2048, 16, 4, 128}}) {
    const Problem pb = shape(sh.B, sh.T, sh.H, sh.Hkv, sh.D);
    const Inputs in = random_inputs(pb, 7);
    DeviceBuffer qkv(pb.qkv_elems() * 2), out(pb.o_elems() * 2), dout(pb.o_elems() * 2);
    DeviceBuffer dqkv(pb.qkv_elems() * 2), lse(size_t(pb.B) * pb.H * pb.T * 4);
    qkv.upload(in.qkv);
    dout.upload(in.dout);
    const rk::bf16* base = qkv.as<rk::bf16>();
    rk::AttnArgs a{base + pb.q_col(0), base + pb.k_col(0), base + pb.v_col(0), pb.ld_qkv(),
                   pb.ld_qkv(), pb.ld_qkv(), nullptr, pb.B, pb.T, pb.H, pb.Hkv, pb.D, pb.scale()};
    DeviceBuffer scratch(rk::attention_backward_scratch_bytes(a));
    rk::bf16* o = out.as<rk::bf16>();
    rk::bf16* d = dqkv.as<rk::bf16>();
    auto fwd = [&] { rk::attention_forward(o, pb.ld_o(), lse.as<float>(), a, nullptr); };
    auto bwd = [&] {
      rk::attention_backward(d + pb.q_col(0), pb.ld_qkv(), d + pb.k_col(0), pb.ld_qkv(),
                             d + pb.v_col(0), pb.ld_qkv(), dout.as<rk::bf16>(), pb.ld_o(), o,
                             pb.ld_o(), lse.as<float>(), a, scratch.as<void>(), nullptr);
    };
    cudaEvent_t start, stop;
    CUDA_OK(cudaEventCreate(&start));
    CUDA_OK(cudaEventCreate(&stop));
    auto time_ms = [&](auto&& fn) {
      constexpr int kWarmup = 3, kReps = 20;
      for (int i = 0; i < kWarmup; ++i) fn();
      CUDA_OK(cudaEventRecord(start));
      for (int i = 0; i < kReps; ++i) fn();
      CUDA_OK(cudaEventRecord(stop));
      CUDA_OK(cudaEventSynchronize(stop));
      float ms = 0;
      CUDA_OK(cudaEventElapsedTime(&ms, start, stop));
      return double(ms) / kReps;
    };
    const double fwd_ms = time_ms(fwd);
    const double bwd_ms = time_ms(bwd);
    CUDA_OK(cudaEventDestroy(start));
    CUDA_OK(cudaEventDestroy(stop));
    // Causal FLOPs: two T x T x D products, half of them masked; the backward counts 2.5x.
    const double fwd_flops = 2.0 * 2.0 * pb.B * pb.H * double(pb.T) * pb.T * pb.D / 2.0;
    char name[64];
    std::snprintf(name, sizeof name, "B=%d T=%d H=%d Hkv=%d D=%d", pb.B, pb.T, pb.H, pb.Hkv, pb.D);
    std::printf("%-32s %10.3f %10.1f %10.3f %10.1f\n", name, fwd_ms, fwd_flops / fwd_ms * 1e-9,
                bwd_ms, 2.5 * fwd_flops / bwd_ms * 1e-9);
  }
}

}  // namespace
