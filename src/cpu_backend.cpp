// The CPU backend: the model's ops as plain fp32 loops with OpenMP. It is the oracle the CUDA
// kernels are tested against and it trains the tiny quickstart model, so it is written for
// exactness and clarity first; only the matmul is tiled for the cache, since it is most of the
// time.
//
// Determinism: every output element is produced by exactly one thread (static schedules, no
// atomics) and every reduction runs in a fixed order, so results are bitwise identical across runs
// and across thread counts. Reductions along a row (norms, softmax sums, attention dot products)
// accumulate in double, which makes this a better reference than the GPU's fp32; the matmul
// accumulates in fp32 in k order, as a plain GEMM does.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#include "ranktune/backend.h"
#include "ranktune/nf4.h"

namespace ranktune {
namespace {

void check_tensor(const Tensor& t, DType dtype, const char* what) {
  RT_ASSERT(t.device == Device::cpu, std::string(what) + " is not on the CPU: " + t.describe());
  RT_ASSERT(t.dtype == dtype,
            std::string(what) + " must be " + dtype_name(dtype) + ": " + t.describe());
}

// Row r of a matrix view (all leading dims are rows; 2-D views may be strided).
template <class T>
T* row_ptr(const Tensor& t, int64_t r) {
  return t.ptr<T>() + r * t.ld();
}

// Checks that a and b are f32 matrices of the same rows x cols (strides may differ).
void check_same_matrix(const Tensor& a, const char* a_name, const Tensor& b, const char* b_name) {
  check_tensor(a, DType::f32, a_name);
  check_tensor(b, DType::f32, b_name);
  RT_ASSERT(a.rows() == b.rows() && a.cols() == b.cols(), std::string(a_name) + " " + a.describe() +
                                                              " and " + b_name + " " +
                                                              b.describe() + " differ in shape");
}

// Everything AdamW needs besides the tensors, with the bias corrections worked out in double once.
struct AdamWConstants {
  float lr, beta1, beta2, eps, grad_scale;
  float decay_factor;  // 1 - lr*wd
  float bias_correction1, bias_correction2;
};

AdamWConstants adamw_constants(const AdamWParams& p) {
  RT_ASSERT(p.step >= 1, "AdamW step is 1-based");
  AdamWConstants c{};
  c.lr = p.lr;
  c.beta1 = p.beta1;
  c.beta2 = p.beta2;
  c.eps = p.eps;
  c.grad_scale = p.grad_scale;
  c.decay_factor = static_cast<float>(1.0 - static_cast<double>(p.lr) * p.weight_decay);
  c.bias_correction1 =
      static_cast<float>(1.0 - std::pow(static_cast<double>(p.beta1), static_cast<double>(p.step)));
  c.bias_correction2 =
      static_cast<float>(1.0 - std::pow(static_cast<double>(p.beta2), static_cast<double>(p.step)));
  return c;
}

// One element of PyTorch's AdamW (torch.optim.AdamW, non-amsgrad): decoupled weight decay first,
// then the moments, then the bias-corrected step. m and v are updated in place.
inline void adamw_update(float& param, float& m, float& v, float grad, const AdamWConstants& c) {
  const float g = grad * c.grad_scale;
  param *= c.decay_factor;
  m = c.beta1 * m + (1.0f - c.beta1) * g;
  v = c.beta2 * v + (1.0f - c.beta2) * g * g;
  const float m_hat = m / c.bias_correction1;
  const float v_hat = v / c.bias_correction2;
  param -= c.lr * m_hat / (std::sqrt(v_hat) + c.eps);
}

// compute = cast(master), unless compute is absent or is master itself.
void write_compute_copy(const Tensor& compute, const Tensor& master) {
  if (compute.empty() || compute.data == master.data) return;
  RT_ASSERT(
      compute.device == Device::cpu && compute.numel() == master.numel() && compute.contiguous(),
      "compute copy " + compute.describe() + " does not match master " + master.describe());
  const float* src = master.ptr<float>();
  const int64_t n = master.numel();
  if (compute.dtype == DType::f32) {
    std::memcpy(compute.data, src, static_cast<size_t>(n) * sizeof(float));
  } else {
    RT_ASSERT(compute.dtype == DType::bf16, "compute copy must be f32 or bf16");
    uint16_t* dst = compute.ptr<uint16_t>();
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < n; ++i) dst[i] = f32_to_bf16(src[i]);
  }
}

// Column blocks for reductions over rows (rmsnorm dweight, embedding backward): each thread owns
// whole columns and walks the rows in order, which keeps the sum order fixed without atomics.
constexpr int64_t kColumnBlock = 64;

// Matmul tiles: a block of out rows x out columns is accumulated over k in slices, so one slice of
// op(b) (kMatmulDepth x kMatmulCols floats, 128 KiB) stays in L2 while every row of the tile uses
// it.
constexpr int64_t kMatmulRows = 16;
constexpr int64_t kMatmulCols = 256;
constexpr int64_t kMatmulDepth = 128;

// sum_squares partials: fixed-size chunks, so the summation order does not depend on thread count.
constexpr int64_t kSumSquaresChunk = 8192;

class CpuBackend final : public Backend {
 public:
  Device device() const override { return Device::cpu; }
  DType act_dtype() const override { return DType::f32; }
  std::string name() const override { return "cpu"; }

  // ---- memory -------------------------------------------------------------------------------
  Buffer alloc(size_t bytes) override { return Buffer(Device::cpu, bytes); }

  void upload(Tensor dst, const void* host) override {
    RT_ASSERT(dst.device == Device::cpu, "upload to " + dst.describe());
    const size_t row = static_cast<size_t>(dst.cols()) * dtype_size(dst.dtype);
    if (dst.contiguous()) {
      if (dst.nbytes()) std::memcpy(dst.data, host, dst.nbytes());
      return;
    }
    for (int64_t r = 0; r < dst.rows(); ++r)  // a padded weight's rows (a fused LoRA projection)
      std::memcpy(dst.row_slice(r, 1).data, static_cast<const char*>(host) + static_cast<size_t>(r) * row, row);
  }

  void download(void* host, Tensor src) override {
    RT_ASSERT(src.device == Device::cpu, "download from " + src.describe());
    const size_t row = static_cast<size_t>(src.cols()) * dtype_size(src.dtype);
    if (src.contiguous()) {
      if (src.nbytes()) std::memcpy(host, src.data, src.nbytes());
      return;
    }
    for (int64_t r = 0; r < src.rows(); ++r)
      std::memcpy(static_cast<char*>(host) + static_cast<size_t>(r) * row, src.row_slice(r, 1).data, row);
  }

  void copy(Tensor dst, Tensor src) override {
    RT_ASSERT(dst.device == Device::cpu && src.device == Device::cpu,
              "copy on the CPU backend: " + dst.describe() + " <- " + src.describe());
    RT_ASSERT(dst.rows() == src.rows() && dst.cols() == src.cols(),
              "copy between shapes " + dst.describe() + " <- " + src.describe());
    const int64_t rows = dst.rows(), cols = dst.cols();
    if (dst.dtype == src.dtype) {
      if (dst.data == src.data && dst.ld() == src.ld()) return;
      const size_t row_bytes = static_cast<size_t>(cols) * dtype_size(dst.dtype);
      const size_t dst_ld = static_cast<size_t>(dst.ld()) * dtype_size(dst.dtype);
      const size_t src_ld = static_cast<size_t>(src.ld()) * dtype_size(src.dtype);
      for (int64_t r = 0; r < rows; ++r)
        std::memmove(static_cast<char*>(dst.data) + static_cast<size_t>(r) * dst_ld,
                     static_cast<const char*>(src.data) + static_cast<size_t>(r) * src_ld,
                     row_bytes);
    } else if (dst.dtype == DType::bf16 && src.dtype == DType::f32) {
#pragma omp parallel for schedule(static)
      for (int64_t r = 0; r < rows; ++r) {
        uint16_t* d = row_ptr<uint16_t>(dst, r);
        const float* s = row_ptr<float>(src, r);
        for (int64_t c = 0; c < cols; ++c) d[c] = f32_to_bf16(s[c]);
      }
    } else if (dst.dtype == DType::f32 && src.dtype == DType::bf16) {
#pragma omp parallel for schedule(static)
      for (int64_t r = 0; r < rows; ++r) {
        float* d = row_ptr<float>(dst, r);
        const uint16_t* s = row_ptr<uint16_t>(src, r);
        for (int64_t c = 0; c < cols; ++c) d[c] = bf16_to_f32(s[c]);
      }
    } else {
      RT_ASSERT(false, "copy converts only between f32 and bf16: " + dst.describe() + " <- " +
                           src.describe());
    }
  }

  void fill(Tensor dst, float value) override {
    RT_ASSERT(dst.device == Device::cpu, "fill of " + dst.describe());
    const int64_t rows = dst.rows(), cols = dst.cols();
    if (dst.dtype == DType::f32) {
      for (int64_t r = 0; r < rows; ++r) std::fill_n(row_ptr<float>(dst, r), cols, value);
    } else {
      RT_ASSERT(dst.dtype == DType::bf16, "fill of " + dst.describe());
      const uint16_t bits = f32_to_bf16(value);
      for (int64_t r = 0; r < rows; ++r) std::fill_n(row_ptr<uint16_t>(dst, r), cols, bits);
    }
  }

  void synchronize() override {}

  // ---- elementwise / reductions ------------------------------------------------------------
  void scale(Tensor x, float s) override {
    check_tensor(x, DType::f32, "scale x");
    const int64_t rows = x.rows(), cols = x.cols();
#pragma omp parallel for schedule(static)
    for (int64_t r = 0; r < rows; ++r) {
      float* row = row_ptr<float>(x, r);
      for (int64_t c = 0; c < cols; ++c) row[c] *= s;
    }
  }

  void add(Tensor y, Tensor x) override {
    check_same_matrix(y, "add y", x, "add x");
    const int64_t rows = y.rows(), cols = y.cols();
#pragma omp parallel for schedule(static)
    for (int64_t r = 0; r < rows; ++r) {
      float* out = row_ptr<float>(y, r);
      const float* in = row_ptr<float>(x, r);
      for (int64_t c = 0; c < cols; ++c) out[c] += in[c];
    }
  }

  double sum_squares(Tensor x) override {
    check_tensor(x, DType::f32, "sum_squares x");
    RT_ASSERT(x.contiguous(), "sum_squares of a strided view: " + x.describe());
    const float* data = x.ptr<float>();
    const int64_t n = x.numel();
    const int64_t n_chunks = (n + kSumSquaresChunk - 1) / kSumSquaresChunk;
    std::vector<double> partial(static_cast<size_t>(n_chunks), 0.0);
#pragma omp parallel for schedule(static)
    for (int64_t chunk = 0; chunk < n_chunks; ++chunk) {
      const int64_t end = std::min(n, (chunk + 1) * kSumSquaresChunk);
      double sum = 0.0;
      for (int64_t i = chunk * kSumSquaresChunk; i < end; ++i)
        sum += static_cast<double>(data[i]) * data[i];
      partial[chunk] = sum;
    }
    double total = 0.0;
    for (double s : partial) total += s;
    return total;
  }

  // Kept values are multiplied by 1/(1-p) (one rounding of the reciprocal, then one multiply), the
  // form a GPU kernel uses too. The RNG index is the logical row*cols + col, not the memory offset,
  // so a strided view drops the same elements as a contiguous copy of it.
  void dropout(Tensor out, Tensor in, float p, uint64_t seed) override {
    check_same_matrix(out, "dropout out", in, "dropout in");
    RT_ASSERT(p >= 0.0f && p < 1.0f, "dropout probability must be in [0, 1)");
    if (p == 0.0f) {
      copy(out, in);
      return;
    }
    const float keep_scale = 1.0f / (1.0f - p);
    const int64_t rows = out.rows(), cols = out.cols();
#pragma omp parallel for schedule(static)
    for (int64_t r = 0; r < rows; ++r) {
      float* o = row_ptr<float>(out, r);
      const float* x = row_ptr<float>(in, r);
      for (int64_t c = 0; c < cols; ++c) {
        const uint64_t index = static_cast<uint64_t>(r * cols + c);
        o[c] = dropout_keep(seed, index, p) ? x[c] * keep_scale : 0.0f;
      }
    }
  }

  // ---- embedding ----------------------------------------------------------------------------
  void embedding_forward(Tensor out, Tensor tokens, Tensor table) override {
    check_tensor(out, DType::f32, "embedding out");
    check_tensor(tokens, DType::i32, "embedding tokens");
    check_tensor(table, DType::f32, "embedding table");
    const int64_t n_tokens = out.rows(), channels = out.cols(), vocab = table.rows();
    RT_ASSERT(tokens.numel() == n_tokens && table.cols() == channels,
              "embedding shapes: out " + out.describe() + ", tokens " + tokens.describe() +
                  ", table " + table.describe());
    const int32_t* ids = tokens.ptr<int32_t>();
    for (int64_t n = 0; n < n_tokens; ++n)
      RT_ASSERT(ids[n] >= 0 && ids[n] < vocab, "token id " + std::to_string(ids[n]) +
                                                   " outside the vocabulary of " +
                                                   std::to_string(vocab));
#pragma omp parallel for schedule(static)
    for (int64_t n = 0; n < n_tokens; ++n)
      std::memcpy(row_ptr<float>(out, n), row_ptr<float>(table, ids[n]),
                  static_cast<size_t>(channels) * sizeof(float));
  }

  void embedding_backward(Tensor dtable, Tensor dout, Tensor tokens, float beta) override {
    check_tensor(dtable, DType::f32, "embedding dtable");
    check_tensor(dout, DType::f32, "embedding dout");
    check_tensor(tokens, DType::i32, "embedding tokens");
    const int64_t n_tokens = dout.rows(), channels = dout.cols(), vocab = dtable.rows();
    RT_ASSERT(tokens.numel() == n_tokens && dtable.cols() == channels,
              "embedding backward shapes: dtable " + dtable.describe() + ", dout " +
                  dout.describe() + ", tokens " + tokens.describe());
    const int32_t* ids = tokens.ptr<int32_t>();
    for (int64_t n = 0; n < n_tokens; ++n)
      RT_ASSERT(ids[n] >= 0 && ids[n] < vocab, "token id " + std::to_string(ids[n]) +
                                                   " outside the vocabulary of " +
                                                   std::to_string(vocab));
    // beta == 0 overwrites without reading, so dtable may start as garbage.
    if (beta == 0.0f) {
      fill(dtable, 0.0f);
    } else if (beta != 1.0f) {
      scale(dtable, beta);
    }
    const int64_t n_blocks = (channels + kColumnBlock - 1) / kColumnBlock;
#pragma omp parallel for schedule(static)
    for (int64_t block = 0; block < n_blocks; ++block) {
      const int64_t c0 = block * kColumnBlock, c1 = std::min(channels, c0 + kColumnBlock);
      for (int64_t n = 0; n < n_tokens; ++n) {
        float* drow = row_ptr<float>(dtable, ids[n]);
        const float* grow = row_ptr<float>(dout, n);
        for (int64_t c = c0; c < c1; ++c) drow[c] += grow[c];
      }
    }
  }

  // ---- RMSNorm fused with the residual add ---------------------------------------------------
  void residual_rmsnorm_forward(Tensor residual_out, Tensor norm_out, Tensor rstd,
                                Tensor residual_in, Tensor delta, Tensor weight,
                                float eps) override {
    const bool has_delta = !delta.empty();
    check_same_matrix(norm_out, "rmsnorm norm_out", residual_in, "rmsnorm residual_in");
    if (has_delta) {
      check_same_matrix(residual_out, "rmsnorm residual_out", residual_in, "rmsnorm residual_in");
      check_same_matrix(delta, "rmsnorm delta", residual_in, "rmsnorm residual_in");
    }
    check_tensor(rstd, DType::f32, "rmsnorm rstd");
    check_tensor(weight, DType::f32, "rmsnorm weight");
    const int64_t n_rows = residual_in.rows(), channels = residual_in.cols();
    RT_ASSERT(rstd.numel() == n_rows && weight.numel() == channels,
              "rmsnorm shapes: rstd " + rstd.describe() + ", weight " + weight.describe());
    const float* w = weight.ptr<float>();
    float* rstd_data = rstd.ptr<float>();
#pragma omp parallel for schedule(static)
    for (int64_t n = 0; n < n_rows; ++n) {
      const float* x = row_ptr<float>(residual_in, n);
      if (has_delta) {
        float* sum = row_ptr<float>(residual_out, n);
        const float* d = row_ptr<float>(delta, n);
        for (int64_t c = 0; c < channels; ++c) sum[c] = x[c] + d[c];
        x = sum;
      }
      double sum_sq = 0.0;
      for (int64_t c = 0; c < channels; ++c) sum_sq += static_cast<double>(x[c]) * x[c];
      const float r = static_cast<float>(
          1.0 / std::sqrt(sum_sq / static_cast<double>(channels) + static_cast<double>(eps)));
      rstd_data[n] = r;
      float* y = row_ptr<float>(norm_out, n);
      for (int64_t c = 0; c < channels; ++c) y[c] = x[c] * r * w[c];
    }
  }

  // With y = x*r*w and r = (mean(x^2)+eps)^(-1/2):
  //   dx_j = r*w_j*g_j - (r^3/C) * x_j * sum_c(g_c*w_c*x_c),   dw_c = sum_n g_nc*x_nc*r_n.
  void rmsnorm_backward(Tensor dresidual, Tensor dweight, float dweight_beta, Tensor dnorm,
                        Tensor x, Tensor weight, Tensor rstd) override {
    check_same_matrix(dresidual, "rmsnorm dresidual", x, "rmsnorm x");
    check_same_matrix(dnorm, "rmsnorm dnorm", x, "rmsnorm x");
    check_tensor(weight, DType::f32, "rmsnorm weight");
    check_tensor(rstd, DType::f32, "rmsnorm rstd");
    const int64_t n_rows = x.rows(), channels = x.cols();
    RT_ASSERT(rstd.numel() == n_rows && weight.numel() == channels,
              "rmsnorm backward shapes: rstd " + rstd.describe() + ", weight " + weight.describe());
    const float* w = weight.ptr<float>();
    const float* rstd_data = rstd.ptr<float>();

    // dweight first: dresidual may alias dnorm (the gradient accumulated in place).
    if (!dweight.empty()) {
      check_tensor(dweight, DType::f32, "rmsnorm dweight");
      RT_ASSERT(dweight.numel() == channels, "rmsnorm dweight " + dweight.describe());
      float* dw = dweight.ptr<float>();
      const int64_t n_blocks = (channels + kColumnBlock - 1) / kColumnBlock;
#pragma omp parallel for schedule(static)
      for (int64_t block = 0; block < n_blocks; ++block) {
        const int64_t c0 = block * kColumnBlock, c1 = std::min(channels, c0 + kColumnBlock);
        double sum[kColumnBlock] = {};
        for (int64_t n = 0; n < n_rows; ++n) {
          const float* g = row_ptr<float>(dnorm, n);
          const float* xr = row_ptr<float>(x, n);
          const double r = rstd_data[n];
          for (int64_t c = c0; c < c1; ++c) sum[c - c0] += static_cast<double>(g[c]) * xr[c] * r;
        }
        // beta == 0 does not read dweight, so it may start as garbage.
        for (int64_t c = c0; c < c1; ++c)
          dw[c] = dweight_beta == 0.0f ? static_cast<float>(sum[c - c0])
                                       : dweight_beta * dw[c] + static_cast<float>(sum[c - c0]);
      }
    }

#pragma omp parallel for schedule(static)
    for (int64_t n = 0; n < n_rows; ++n) {
      const float* g = row_ptr<float>(dnorm, n);
      const float* xr = row_ptr<float>(x, n);
      float* dres = row_ptr<float>(dresidual, n);
      const double r = rstd_data[n];
      double dot = 0.0;
      for (int64_t c = 0; c < channels; ++c) dot += static_cast<double>(g[c]) * w[c] * xr[c];
      const double coeff = r * r * r * dot / static_cast<double>(channels);
      for (int64_t c = 0; c < channels; ++c) {
        const double dx = r * w[c] * g[c] - coeff * xr[c];
        dres[c] += static_cast<float>(dx);
      }
    }
  }

  // ---- GEMM ----------------------------------------------------------------------------------
  // Transposed operands are first copied into contiguous op(a) / op(b), so the inner loop always
  // streams a row of op(b) (i-k-j order, vectorizable); the copy is O(size) against the O(M*N*K)
  // product. Each out element sums over k = 0..K-1 in order, in fp32.
  void matmul(Tensor out, Tensor a, Tensor b, bool trans_a, bool trans_b, float alpha,
              float beta) override {
    check_tensor(out, DType::f32, "matmul out");
    check_tensor(a, DType::f32, "matmul a");
    check_tensor(b, DType::f32, "matmul b");
    const int64_t M = out.rows(), N = out.cols();
    const int64_t K = trans_a ? a.rows() : a.cols();
    const std::string shapes = "matmul shapes: out " + out.describe() + ", a " + a.describe() +
                               (trans_a ? "^T" : "") + ", b " + b.describe() +
                               (trans_b ? "^T" : "");
    RT_ASSERT((trans_a ? a.cols() : a.rows()) == M, shapes);
    RT_ASSERT((trans_b ? b.cols() : b.rows()) == K && (trans_b ? b.rows() : b.cols()) == N, shapes);

    std::vector<float> a_transposed, b_transposed;
    const float* a_op = a.ptr<float>();
    int64_t ld_a = a.ld();
    if (trans_a) {
      a_transposed = transpose(a);
      a_op = a_transposed.data();
      ld_a = K;
    }
    const float* b_op = b.ptr<float>();
    int64_t ld_b = b.ld();
    if (trans_b) {
      b_transposed = transpose(b);
      b_op = b_transposed.data();
      ld_b = N;
    }

    const int64_t row_tiles = (M + kMatmulRows - 1) / kMatmulRows;
    const int64_t col_tiles = (N + kMatmulCols - 1) / kMatmulCols;
#pragma omp parallel for collapse(2) schedule(static)
    for (int64_t row_tile = 0; row_tile < row_tiles; ++row_tile) {
      for (int64_t col_tile = 0; col_tile < col_tiles; ++col_tile) {
        const int64_t i0 = row_tile * kMatmulRows, i1 = std::min(M, i0 + kMatmulRows);
        const int64_t j0 = col_tile * kMatmulCols, width = std::min(N, j0 + kMatmulCols) - j0;
        float acc[kMatmulRows][kMatmulCols];
        for (int64_t i = i0; i < i1; ++i) std::fill_n(acc[i - i0], width, 0.0f);
        for (int64_t k0 = 0; k0 < K; k0 += kMatmulDepth) {
          const int64_t k1 = std::min(K, k0 + kMatmulDepth);
          for (int64_t i = i0; i < i1; ++i) {
            float* acc_row = acc[i - i0];
            const float* a_row = a_op + i * ld_a;
            for (int64_t k = k0; k < k1; ++k) {
              const float a_ik = a_row[k];
              const float* b_row = b_op + k * ld_b + j0;
#pragma omp simd
              for (int64_t j = 0; j < width; ++j) acc_row[j] += a_ik * b_row[j];
            }
          }
        }
        // beta == 0 does not read out, so out may start as garbage.
        for (int64_t i = i0; i < i1; ++i) {
          float* out_row = row_ptr<float>(out, i) + j0;
          const float* acc_row = acc[i - i0];
          if (beta == 0.0f) {
            for (int64_t j = 0; j < width; ++j) out_row[j] = alpha * acc_row[j];
          } else {
            for (int64_t j = 0; j < width; ++j) out_row[j] = alpha * acc_row[j] + beta * out_row[j];
          }
        }
      }
    }
  }

  // ---- rotary position embedding -------------------------------------------------------------
  void rope_forward(Tensor x, Tensor positions, Tensor cos, Tensor sin, int64_t head_dim) override {
    rope(x, positions, cos, sin, head_dim, 1.0f);
  }

  void rope_backward(Tensor dx, Tensor positions, Tensor cos, Tensor sin,
                     int64_t head_dim) override {
    rope(dx, positions, cos, sin, head_dim, -1.0f);
  }

  // ---- attention -------------------------------------------------------------------------------
  // Plain softmax attention per (batch, head, query): the T scores of one query row at a time,
  // never a T x T matrix.
  void attention_forward(Tensor out, Tensor lse, Tensor q, Tensor k, Tensor v, Tensor doc_ids,
                         const AttnShape& shape) override {
    const AttnLayout attn = attention_layout(q, k, v, doc_ids, shape);
    check_tensor(out, DType::f32, "attention out");
    check_tensor(lse, DType::f32, "attention lse");
    RT_ASSERT(out.rows() == attn.B * attn.T && out.cols() == attn.H * attn.D,
              "attention out " + out.describe());
    RT_ASSERT(lse.numel() == attn.B * attn.H * attn.T && lse.contiguous(),
              "attention lse " + lse.describe());
    float* lse_data = lse.ptr<float>();
#pragma omp parallel
    {
      std::vector<double> scores(static_cast<size_t>(attn.T));
      std::vector<double> acc(static_cast<size_t>(attn.D));
#pragma omp for collapse(3) schedule(static)
      for (int64_t b = 0; b < attn.B; ++b) {
        for (int64_t h = 0; h < attn.H; ++h) {
          for (int64_t t = 0; t < attn.T; ++t) {
            const int64_t kv_head = h / attn.group;
            const float* q_row = attn.q_at(b, t, h);
            double max_score = -std::numeric_limits<double>::infinity();
            for (int64_t j = 0; j <= t; ++j) {
              if (!attn.allowed(b, t, j)) continue;
              scores[j] = attn.score(q_row, attn.k_at(b, j, kv_head));
              max_score = std::max(max_score, scores[j]);
            }
            double denom = 0.0;
            std::fill(acc.begin(), acc.end(), 0.0);
            for (int64_t j = 0; j <= t; ++j) {
              if (!attn.allowed(b, t, j)) continue;
              const double weight = std::exp(scores[j] - max_score);
              denom += weight;
              const float* v_row = attn.v_at(b, j, kv_head);
              for (int64_t d = 0; d < attn.D; ++d) acc[d] += weight * v_row[d];
            }
            float* out_row = row_ptr<float>(out, b * attn.T + t) + h * attn.D;
            for (int64_t d = 0; d < attn.D; ++d) out_row[d] = static_cast<float>(acc[d] / denom);
            lse_data[(b * attn.H + h) * attn.T + t] =
                static_cast<float>(max_score + std::log(denom));
          }
        }
      }
    }
  }

  // One query row per sequence over its cached keys 0..n_keys-1: the same math as
  // attention_forward for the last query of a sequence, reading keys from the cache.
  void attention_decode(Tensor out, Tensor q, Tensor k_cache, Tensor v_cache, int64_t n_keys,
                        const AttnShape& shape) override {
    const int64_t B = shape.batch, max_len = shape.seq_len, H = shape.n_heads,
                  Hkv = shape.n_kv_heads, D = shape.head_dim;
    RT_ASSERT(B > 0 && D > 0 && Hkv > 0 && H % Hkv == 0,
              "attention_decode shape: " + std::to_string(H) + " heads over " +
                  std::to_string(Hkv) + " kv heads");
    RT_ASSERT(n_keys >= 1 && n_keys <= max_len,
              "attention_decode: " + std::to_string(n_keys) + " keys in a cache of " +
                  std::to_string(max_len));
    check_tensor(q, DType::f32, "attention_decode q");
    check_tensor(out, DType::f32, "attention_decode out");
    check_tensor(k_cache, DType::f32, "attention_decode k_cache");
    check_tensor(v_cache, DType::f32, "attention_decode v_cache");
    RT_ASSERT(q.rows() == B && q.cols() == H * D, "attention_decode q " + q.describe());
    RT_ASSERT(out.rows() == B && out.cols() == H * D, "attention_decode out " + out.describe());
    const int64_t kv_ld = Hkv * D;
    for (const Tensor* cache : {&k_cache, &v_cache})
      RT_ASSERT(cache->contiguous() && cache->numel() == B * max_len * kv_ld,
                "attention_decode cache " + cache->describe() + " is not [" + std::to_string(B) +
                    ", " + std::to_string(max_len) + ", " + std::to_string(kv_ld) + "]");
    const int64_t group = H / Hkv;
    const double scale = shape.scale;
#pragma omp parallel
    {
      std::vector<double> scores(static_cast<size_t>(n_keys));
      std::vector<double> acc(static_cast<size_t>(D));
#pragma omp for collapse(2) schedule(static)
      for (int64_t b = 0; b < B; ++b) {
        for (int64_t h = 0; h < H; ++h) {
          const float* q_row = row_ptr<float>(q, b) + h * D;
          const int64_t head_offset = b * max_len * kv_ld + (h / group) * D;
          const float* k_head = k_cache.ptr<float>() + head_offset;
          const float* v_head = v_cache.ptr<float>() + head_offset;
          double max_score = -std::numeric_limits<double>::infinity();
          for (int64_t j = 0; j < n_keys; ++j) {
            scores[j] = scale * dot(q_row, k_head + j * kv_ld, D);
            max_score = std::max(max_score, scores[j]);
          }
          double denom = 0.0;
          std::fill(acc.begin(), acc.end(), 0.0);
          for (int64_t j = 0; j < n_keys; ++j) {
            const double weight = std::exp(scores[j] - max_score);
            denom += weight;
            const float* v_row = v_head + j * kv_ld;
            for (int64_t d = 0; d < D; ++d) acc[d] += weight * v_row[d];
          }
          float* out_row = row_ptr<float>(out, b) + h * D;
          for (int64_t d = 0; d < D; ++d) out_row[d] = static_cast<float>(acc[d] / denom);
        }
      }
    }
  }

  // With P = exp(S - lse), dP = dO V^T, Delta_t = dO_t . O_t:  dS = P * (dP - Delta),
  // dQ = scale * dS K, dK = scale * dS^T Q, dV = P^T dO (summed over the heads sharing a kv head).
  // dq is computed per query row and dk/dv per key row, recomputing P in each pass, so that every
  // output row is owned by one thread and summed in a fixed order.
  void attention_backward(Tensor dq, Tensor dk, Tensor dv, Tensor dout, Tensor out, Tensor lse,
                          Tensor q, Tensor k, Tensor v, Tensor doc_ids,
                          const AttnShape& shape) override {
    const AttnLayout attn = attention_layout(q, k, v, doc_ids, shape);
    check_same_matrix(dq, "attention dq", q, "attention q");
    check_same_matrix(dk, "attention dk", k, "attention k");
    check_same_matrix(dv, "attention dv", v, "attention v");
    check_same_matrix(dout, "attention dout", q, "attention q");
    check_same_matrix(out, "attention out", q, "attention q");
    check_tensor(lse, DType::f32, "attention lse");
    RT_ASSERT(lse.numel() == attn.B * attn.H * attn.T && lse.contiguous(),
              "attention lse " + lse.describe());
    const float* lse_data = lse.ptr<float>();
    const auto lse_at = [&](int64_t b, int64_t h, int64_t t) {
      return static_cast<double>(lse_data[(b * attn.H + h) * attn.T + t]);
    };
    const auto head_row = [&](const Tensor& m, int64_t b, int64_t t, int64_t h) {
      return row_ptr<float>(m, b * attn.T + t) + h * attn.D;
    };

    std::vector<double> delta(static_cast<size_t>(attn.B * attn.H * attn.T));
#pragma omp parallel for collapse(3) schedule(static)
    for (int64_t b = 0; b < attn.B; ++b)
      for (int64_t h = 0; h < attn.H; ++h)
        for (int64_t t = 0; t < attn.T; ++t)
          delta[(b * attn.H + h) * attn.T + t] =
              dot(head_row(dout, b, t, h), head_row(out, b, t, h), attn.D);
    const auto delta_at = [&](int64_t b, int64_t h, int64_t t) {
      return delta[(b * attn.H + h) * attn.T + t];
    };

    // dq: one query row (b, t, h) at a time, keys j <= t.
#pragma omp parallel
    {
      std::vector<double> acc(static_cast<size_t>(attn.D));
#pragma omp for collapse(3) schedule(static)
      for (int64_t b = 0; b < attn.B; ++b) {
        for (int64_t h = 0; h < attn.H; ++h) {
          for (int64_t t = 0; t < attn.T; ++t) {
            const int64_t kv_head = h / attn.group;
            const float* q_row = attn.q_at(b, t, h);
            const float* do_row = head_row(dout, b, t, h);
            std::fill(acc.begin(), acc.end(), 0.0);
            for (int64_t j = 0; j <= t; ++j) {
              if (!attn.allowed(b, t, j)) continue;
              const float* k_row = attn.k_at(b, j, kv_head);
              const double p = std::exp(attn.score(q_row, k_row) - lse_at(b, h, t));
              const double dp = dot(do_row, attn.v_at(b, j, kv_head), attn.D);
              const double ds = p * (dp - delta_at(b, h, t));
              for (int64_t d = 0; d < attn.D; ++d) acc[d] += ds * k_row[d];
            }
            float* dq_row = head_row(dq, b, t, h);
            for (int64_t d = 0; d < attn.D; ++d)
              dq_row[d] = static_cast<float>(attn.scale * acc[d]);
          }
        }
      }
    }

    // dk, dv: one key row (b, j, kv head) at a time, over the group's query heads and rows t >= j.
#pragma omp parallel
    {
      std::vector<double> dk_acc(static_cast<size_t>(attn.D)), dv_acc(static_cast<size_t>(attn.D));
#pragma omp for collapse(3) schedule(static)
      for (int64_t b = 0; b < attn.B; ++b) {
        for (int64_t kv_head = 0; kv_head < attn.Hkv; ++kv_head) {
          for (int64_t j = 0; j < attn.T; ++j) {
            const float* k_row = attn.k_at(b, j, kv_head);
            const float* v_row = attn.v_at(b, j, kv_head);
            std::fill(dk_acc.begin(), dk_acc.end(), 0.0);
            std::fill(dv_acc.begin(), dv_acc.end(), 0.0);
            for (int64_t h = kv_head * attn.group; h < (kv_head + 1) * attn.group; ++h) {
              for (int64_t t = j; t < attn.T; ++t) {
                if (!attn.allowed(b, t, j)) continue;
                const float* q_row = attn.q_at(b, t, h);
                const float* do_row = head_row(dout, b, t, h);
                const double p = std::exp(attn.score(q_row, k_row) - lse_at(b, h, t));
                const double dp = dot(do_row, v_row, attn.D);
                const double ds = p * (dp - delta_at(b, h, t));
                for (int64_t d = 0; d < attn.D; ++d) {
                  dv_acc[d] += p * do_row[d];
                  dk_acc[d] += ds * q_row[d];
                }
              }
            }
            float* dk_row = head_row(dk, b, j, kv_head);
            float* dv_row = head_row(dv, b, j, kv_head);
            for (int64_t d = 0; d < attn.D; ++d) {
              dk_row[d] = static_cast<float>(attn.scale * dk_acc[d]);
              dv_row[d] = static_cast<float>(dv_acc[d]);
            }
          }
        }
      }
    }
  }

  // ---- SwiGLU --------------------------------------------------------------------------------
  void swiglu_forward(Tensor h, Tensor gate, Tensor up) override {
    check_same_matrix(h, "swiglu h", gate, "swiglu gate");
    check_same_matrix(up, "swiglu up", gate, "swiglu gate");
    const int64_t rows = h.rows(), cols = h.cols();
#pragma omp parallel for schedule(static)
    for (int64_t r = 0; r < rows; ++r) {
      float* out = row_ptr<float>(h, r);
      const float* g = row_ptr<float>(gate, r);
      const float* u = row_ptr<float>(up, r);
      for (int64_t c = 0; c < cols; ++c) out[c] = g[c] * sigmoid(g[c]) * u[c];
    }
  }

  // d silu(g)/dg = sig(g) * (1 + g*(1 - sig(g))).
  void swiglu_backward(Tensor dgate, Tensor dup, Tensor dh, Tensor gate, Tensor up, Tensor h) override {
    if (!h.empty()) check_same_matrix(h, "swiglu h", gate, "swiglu gate");
    check_same_matrix(dgate, "swiglu dgate", gate, "swiglu gate");
    check_same_matrix(dup, "swiglu dup", gate, "swiglu gate");
    check_same_matrix(dh, "swiglu dh", gate, "swiglu gate");
    check_same_matrix(up, "swiglu up", gate, "swiglu gate");
    const int64_t rows = gate.rows(), cols = gate.cols();
#pragma omp parallel for schedule(static)
    for (int64_t r = 0; r < rows; ++r) {
      float* dg = row_ptr<float>(dgate, r);
      float* du = row_ptr<float>(dup, r);
      const float* grad = row_ptr<float>(dh, r);
      const float* g = row_ptr<float>(gate, r);
      const float* u = row_ptr<float>(up, r);
      float* out = h.empty() ? nullptr : row_ptr<float>(h, r);
      for (int64_t c = 0; c < cols; ++c) {
        const float gc = g[c], uc = u[c], dhc = grad[c];  // read all before writing: may alias
        const float sig = sigmoid(gc);
        dg[c] = dhc * uc * sig * (1.0f + gc * (1.0f - sig));
        du[c] = dhc * gc * sig;
        if (out) out[c] = gc * sig * uc;  // as swiglu_forward rounds it
      }
    }
  }

  // ---- cross-entropy ---------------------------------------------------------------------------
  void cross_entropy(Tensor losses, Tensor dlogits, Tensor logits, Tensor targets,
                     float grad_scale) override {
    check_tensor(losses, DType::f32, "cross_entropy losses");
    check_tensor(logits, DType::f32, "cross_entropy logits");
    check_tensor(targets, DType::i32, "cross_entropy targets");
    const int64_t n_rows = logits.rows(), vocab = logits.cols();
    RT_ASSERT(losses.numel() == n_rows && targets.numel() == n_rows,
              "cross_entropy shapes: losses " + losses.describe() + ", targets " +
                  targets.describe() + ", logits " + logits.describe());
    const bool want_grad = !dlogits.empty();
    if (want_grad) {
      check_same_matrix(dlogits, "cross_entropy dlogits", logits, "cross_entropy logits");
      // In place (dlogits == logits) is fine: a row's log-sum-exp and target logit are read before
      // its gradient overwrites it, element by element.
    }
    const int32_t* target = targets.ptr<int32_t>();
    for (int64_t n = 0; n < n_rows; ++n)
      RT_ASSERT(target[n] == -100 || (target[n] >= 0 && target[n] < vocab),
                "cross_entropy target " + std::to_string(target[n]) + " outside [0, " +
                    std::to_string(vocab) + ") and not -100");
    float* loss = losses.ptr<float>();
#pragma omp parallel for schedule(static)
    for (int64_t n = 0; n < n_rows; ++n) {
      const float* l = row_ptr<float>(logits, n);
      float* dl = want_grad ? row_ptr<float>(dlogits, n) : nullptr;
      if (target[n] == -100) {
        loss[n] = 0.0f;
        if (want_grad) std::fill_n(dl, vocab, 0.0f);
        continue;
      }
      // Max-subtracted log-sum-exp, so large logits cannot overflow exp().
      const double max_logit = *std::max_element(l, l + vocab);
      double sum = 0.0;
      for (int64_t c = 0; c < vocab; ++c) sum += std::exp(static_cast<double>(l[c]) - max_logit);
      const double lse = max_logit + std::log(sum);
      loss[n] = static_cast<float>(lse - static_cast<double>(l[target[n]]));
      if (!want_grad) continue;
      for (int64_t c = 0; c < vocab; ++c) {
        const double prob = std::exp(static_cast<double>(l[c]) - lse);
        dl[c] = static_cast<float>(grad_scale * (prob - (c == target[n] ? 1.0 : 0.0)));
      }
    }
  }

  // ---- offloaded checkpoints: plain copies ---------------------------------------------------------
  int copy_to_host_async(Tensor host_dst, Tensor src) override {
    RT_ASSERT(host_dst.nbytes() == src.nbytes() && host_dst.contiguous() && src.contiguous(), "copy_to_host_async");
    std::memcpy(host_dst.data, src.data, src.nbytes());
    return 0;
  }
  int copy_to_device_async(Tensor dst, Tensor host_src) override { return copy_to_host_async(dst, host_src); }
  void wait_copy(int) override {}

  // ---- QLoRA ---------------------------------------------------------------------------------
  // The same arithmetic as nf4_dequantize in src/nf4.cpp: block scale = nested_map[code] *
  // nested_absmax + offset (two fp32 roundings), then code value * scale.
  void nf4_dequantize(Tensor out, const Nf4Weight& w) override {
    RT_ASSERT(out.dtype == DType::f32 && out.contiguous() && out.numel() == w.numel, "nf4_dequantize out");
    const int64_t n_blocks = (w.numel + kNf4BlockSize - 1) / kNf4BlockSize;
    const uint8_t* packed = w.packed.ptr<uint8_t>();
    float* y = out.ptr<float>();
#pragma omp parallel for
    for (int64_t b = 0; b < n_blocks; ++b) {
      float scale;
      if (!w.absmax_codes.empty()) {
        volatile float product = w.nested_map.ptr<float>()[w.absmax_codes.ptr<uint8_t>()[b]] *
                                 w.nested_absmax.ptr<float>()[b / kNf4NestedBlockSize];
        scale = product + w.offset;
      } else {
        scale = w.absmax.ptr<float>()[b];
      }
      const int64_t end = std::min(w.numel, (b + 1) * kNf4BlockSize);
      for (int64_t i = b * kNf4BlockSize; i < end; ++i) {
        const uint8_t byte = packed[i / 2];
        y[i] = kNf4Code[static_cast<size_t>(i % 2 == 0 ? byte >> 4 : byte & 15)] * scale;
      }
    }
  }

  // ---- optimizers ----------------------------------------------------------------------------
  void adamw_step(Tensor master, Tensor compute, Tensor grad, Tensor m, Tensor v,
                  const AdamWParams& p) override {
    const int64_t n = master.numel();
    check_optimizer_tensor(master, DType::f32, n, "adamw master");
    check_optimizer_tensor(grad, DType::f32, n, "adamw grad");
    check_optimizer_tensor(m, DType::f32, n, "adamw m");
    check_optimizer_tensor(v, DType::f32, n, "adamw v");
    const AdamWConstants c = adamw_constants(p);
    float* param = master.ptr<float>();
    const float* g = grad.ptr<float>();
    float* m_data = m.ptr<float>();
    float* v_data = v.ptr<float>();
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < n; ++i) adamw_update(param[i], m_data[i], v_data[i], g[i], c);
    write_compute_copy(compute, master);
  }

  // bitsandbytes' blockwise 8-bit Adam: per block, decode m and v (code_map[q] * absmax), do the
  // fp32 AdamW update with them (the parameter step uses the unquantized new moments), then
  // re-encode each moment against its new block absmax = max |value|.
  void adamw8bit_step(Tensor master, Tensor compute, Tensor grad, Tensor m_q, Tensor v_q,
                      Tensor m_absmax, Tensor v_absmax, const AdamWParams& p) override {
    const int64_t n = master.numel();
    const int64_t n_blocks = (n + kAdam8BitBlock - 1) / kAdam8BitBlock;
    check_optimizer_tensor(master, DType::f32, n, "adamw8bit master");
    check_optimizer_tensor(grad, DType::f32, n, "adamw8bit grad");
    check_optimizer_tensor(m_q, DType::u8, n, "adamw8bit m_q");
    check_optimizer_tensor(v_q, DType::u8, n, "adamw8bit v_q");
    check_optimizer_tensor(m_absmax, DType::f32, n_blocks, "adamw8bit m_absmax");
    check_optimizer_tensor(v_absmax, DType::f32, n_blocks, "adamw8bit v_absmax");
    const AdamWConstants c = adamw_constants(p);
    const float* signed_map = adam8bit_signed_map();
    const float* unsigned_map = adam8bit_unsigned_map();
    float* param = master.ptr<float>();
    const float* g = grad.ptr<float>();
    uint8_t* m_code = m_q.ptr<uint8_t>();
    uint8_t* v_code = v_q.ptr<uint8_t>();
    float* m_scale = m_absmax.ptr<float>();
    float* v_scale = v_absmax.ptr<float>();
#pragma omp parallel for schedule(static)
    for (int64_t block = 0; block < n_blocks; ++block) {
      const int64_t begin = block * kAdam8BitBlock, end = std::min(n, begin + kAdam8BitBlock);
      float m_new[kAdam8BitBlock], v_new[kAdam8BitBlock];
      float m_max = 0.0f, v_max = 0.0f;
      for (int64_t i = begin; i < end; ++i) {
        float m_i = signed_map[m_code[i]] * m_scale[block];
        float v_i = unsigned_map[v_code[i]] * v_scale[block];
        adamw_update(param[i], m_i, v_i, g[i], c);
        m_new[i - begin] = m_i;
        v_new[i - begin] = v_i;
        m_max = std::max(m_max, std::fabs(m_i));
        v_max = std::max(v_max, std::fabs(v_i));
      }
      m_scale[block] = m_max;
      v_scale[block] = v_max;
      for (int64_t i = begin; i < end; ++i) {
        m_code[i] = adam8bit_quantize(signed_map, m_max > 0.0f ? m_new[i - begin] / m_max : 0.0f);
        v_code[i] = adam8bit_quantize(unsigned_map, v_max > 0.0f ? v_new[i - begin] / v_max : 0.0f);
      }
    }
    write_compute_copy(compute, master);
  }

 private:
  static float sigmoid(float x) { return 1.0f / (1.0f + std::exp(-x)); }

  static double dot(const float* a, const float* b, int64_t n) {
    double sum = 0.0;
    for (int64_t i = 0; i < n; ++i) sum += static_cast<double>(a[i]) * b[i];
    return sum;
  }

  static void check_optimizer_tensor(const Tensor& t, DType dtype, int64_t numel,
                                     const char* what) {
    check_tensor(t, dtype, what);
    RT_ASSERT(t.numel() == numel && t.contiguous(), std::string(what) + " " + t.describe() +
                                                        " should hold " + std::to_string(numel) +
                                                        " contiguous elements");
  }

  // A contiguous copy of m^T.
  static std::vector<float> transpose(const Tensor& m) {
    const int64_t rows = m.rows(), cols = m.cols();
    std::vector<float> t(static_cast<size_t>(rows * cols));
#pragma omp parallel for schedule(static)
    for (int64_t c = 0; c < cols; ++c)
      for (int64_t r = 0; r < rows; ++r) t[c * rows + r] = row_ptr<float>(m, r)[c];
    return t;
  }

  // sign = +1 rotates by the position's angle, -1 by its negative (the transpose).
  static void rope(Tensor x, Tensor positions, Tensor cos, Tensor sin, int64_t head_dim,
                   float sign) {
    check_tensor(x, DType::f32, "rope x");
    check_tensor(positions, DType::i32, "rope positions");
    check_tensor(cos, DType::f32, "rope cos");
    check_tensor(sin, DType::f32, "rope sin");
    const int64_t half = head_dim / 2, n_rows = x.rows();
    RT_ASSERT(head_dim > 0 && head_dim % 2 == 0 && x.cols() % head_dim == 0,
              "rope: x " + x.describe() + " is not a whole number of heads of even head_dim " +
                  std::to_string(head_dim));
    RT_ASSERT(positions.numel() == n_rows, "rope positions " + positions.describe());
    RT_ASSERT(cos.cols() == half && sin.cols() == half && cos.rows() == sin.rows() &&
                  cos.contiguous() && sin.contiguous(),
              "rope tables cos " + cos.describe() + ", sin " + sin.describe());
    const int64_t n_heads = x.cols() / head_dim, max_pos = cos.rows();
    const int32_t* pos = positions.ptr<int32_t>();
    for (int64_t n = 0; n < n_rows; ++n)
      RT_ASSERT(pos[n] >= 0 && pos[n] < max_pos, "rope position " + std::to_string(pos[n]) +
                                                     " beyond the table of " +
                                                     std::to_string(max_pos));
#pragma omp parallel for schedule(static)
    for (int64_t n = 0; n < n_rows; ++n) {
      const float* c = cos.ptr<float>() + pos[n] * half;
      const float* s = sin.ptr<float>() + pos[n] * half;
      float* row = row_ptr<float>(x, n);
      for (int64_t h = 0; h < n_heads; ++h) {
        float* head = row + h * head_dim;
        for (int64_t i = 0; i < half; ++i) {
          const float x1 = head[i], x2 = head[i + half], sin_i = sign * s[i];
          head[i] = x1 * c[i] - x2 * sin_i;
          head[i + half] = x2 * c[i] + x1 * sin_i;
        }
      }
    }
  }

  // Where head h of token (b, t) lives in q/k/v, and which keys a query may see.
  struct AttnLayout {
    Tensor q, k, v;
    const int32_t* doc = nullptr;  // null: no packing mask
    int64_t B, T, H, Hkv, D, group;
    double scale;

    const float* q_at(int64_t b, int64_t t, int64_t h) const {
      return row_ptr<float>(q, b * T + t) + h * D;
    }
    const float* k_at(int64_t b, int64_t t, int64_t h) const {
      return row_ptr<float>(k, b * T + t) + h * D;
    }
    const float* v_at(int64_t b, int64_t t, int64_t h) const {
      return row_ptr<float>(v, b * T + t) + h * D;
    }
    // Query t may attend to key j: causal, and within one packed document.
    bool allowed(int64_t b, int64_t t, int64_t j) const {
      return j <= t && (doc == nullptr || doc[b * T + j] == doc[b * T + t]);
    }
    double score(const float* q_row, const float* k_row) const {
      return scale * dot(q_row, k_row, D);
    }
  };

  static AttnLayout attention_layout(const Tensor& q, const Tensor& k, const Tensor& v,
                                     const Tensor& doc_ids, const AttnShape& s) {
    check_tensor(q, DType::f32, "attention q");
    check_tensor(k, DType::f32, "attention k");
    check_tensor(v, DType::f32, "attention v");
    RT_ASSERT(s.batch > 0 && s.seq_len > 0 && s.head_dim > 0 && s.n_kv_heads > 0 &&
                  s.n_heads % s.n_kv_heads == 0,
              "attention shape: " + std::to_string(s.n_heads) + " heads over " +
                  std::to_string(s.n_kv_heads) + " kv heads");
    const int64_t n_rows = s.batch * s.seq_len;
    RT_ASSERT(q.rows() == n_rows && q.cols() == s.n_heads * s.head_dim,
              "attention q " + q.describe());
    RT_ASSERT(k.rows() == n_rows && k.cols() == s.n_kv_heads * s.head_dim,
              "attention k " + k.describe());
    RT_ASSERT(v.rows() == n_rows && v.cols() == s.n_kv_heads * s.head_dim,
              "attention v " + v.describe());
    AttnLayout attn{q,
                    k,
                    v,
                    nullptr,
                    s.batch,
                    s.seq_len,
                    s.n_heads,
                    s.n_kv_heads,
                    s.head_dim,
                    s.n_heads / s.n_kv_heads,
                    static_cast<double>(s.scale)};
    if (!doc_ids.empty()) {
      check_tensor(doc_ids, DType::i32, "attention doc_ids");
      RT_ASSERT(doc_ids.numel() == n_rows, "attention doc_ids " + doc_ids.describe());
      attn.doc = doc_ids.ptr<int32_t>();
    }
    return attn;
  }
};

}  // namespace

std::unique_ptr<Backend> make_cpu_backend() { return std::make_unique<CpuBackend>(); }

}  // namespace ranktune
