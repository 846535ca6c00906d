// The CUDA backend: bf16 activations, fp32 accumulation, cuBLASLt GEMMs and the kernels in
// kernels/. Each op checks its tensors (device, dtype, shape, contiguity where the kernel needs
// it), turns the views into the raw pointers and row strides the launchers take, and launches on
// the one compute stream; nothing here synchronizes except the ops whose contract says so
// (download, sum_squares, synchronize).
#include <cublasLt.h>
#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <climits>
#include <cmath>
#include <cstring>
#include <memory>
#include <numeric>
#include <string>
#include <type_traits>
#include <unordered_map>
#include <vector>
#include <array>

#include "cuda_check.h"
#include "kernels.h"
#include "ranktune/backend.h"

namespace ranktune {
namespace {

using kernels::bf16;

// ---- owned library handles ----------------------------------------------------------------------
template <class Handle, auto destroy>
struct Destroy {
  void operator()(Handle h) const { (void)destroy(h); }
};
// A CUDA/cuBLAS handle (an opaque pointer type) released by `destroy` when it goes out of scope.
template <class Handle, auto destroy>
using Owned = std::unique_ptr<std::remove_pointer_t<Handle>, Destroy<Handle, destroy>>;

using Stream = Owned<cudaStream_t, cudaStreamDestroy>;
using Event = Owned<cudaEvent_t, cudaEventDestroy>;
using LtHandle = Owned<cublasLtHandle_t, cublasLtDestroy>;
using BlasHandle = Owned<cublasHandle_t, cublasDestroy>;
using MatmulDesc = Owned<cublasLtMatmulDesc_t, cublasLtMatmulDescDestroy>;
using MatrixLayout = Owned<cublasLtMatrixLayout_t, cublasLtMatrixLayoutDestroy>;
using MatmulPreference = Owned<cublasLtMatmulPreference_t, cublasLtMatmulPreferenceDestroy>;

// cuBLASLt's recommended workspace on Hopper; also enough for every split-K config on Ampere.
constexpr size_t kGemmWorkspaceBytes = size_t{32} << 20;

// Device memory for an op's temporaries, grown on demand and kept: the ops that need it run every
// step with the same sizes.
class Scratch {
 public:
  void* get(size_t bytes, cudaStream_t stream) {
    if (bytes > buffer_.bytes()) {
      // The stream may still be reading the old buffer.
      cudaCheck(cudaStreamSynchronize(stream));
      buffer_ = Buffer();
      buffer_ = Buffer(Device::cuda, bytes);
    }
    return buffer_.data();
  }

 private:
  Buffer buffer_;
};

// ---- GEMM plans ---------------------------------------------------------------------------------
// cuBLAS is column-major; our matrices are row-major, and a row-major X [r, c] with row stride ld
// is the column-major X^T [c, r] with leading dimension ld. So out = op(a) op(b) is computed as
// out^T = op(b)^T op(a)^T: cuBLAS's A is our b, its B our a, its m x n output our out^T (N x M).
struct GemmKey {
  int64_t m, n, k;        // cuBLAS's: our N, M, K
  int64_t lda, ldb, ldc;  // our b.ld(), a.ld(), out.ld()
  bool trans_a, trans_b;  // cuBLAS's: our trans_b, trans_a
  bool out_f32;
  // Pointer alignments (bytes, powers of two up to 256): cuBLASLt picks kernels by them.
  uint32_t align_a, align_b, align_c;
  bool operator==(const GemmKey&) const = default;
};

struct GemmKeyHash {
  size_t operator()(const GemmKey& k) const {
    size_t h = 0;
    auto mix = [&h](uint64_t v) {
      h ^= std::hash<uint64_t>{}(v) + 0x9e3779b97f4a7c15ull + (h << 6) + (h >> 2);
    };
    for (int64_t v : {k.m, k.n, k.k, k.lda, k.ldb, k.ldc}) mix(static_cast<uint64_t>(v));
    mix((uint64_t{k.trans_a} << 2) | (uint64_t{k.trans_b} << 1) | uint64_t{k.out_f32});
    mix((uint64_t{k.align_a} << 40) | (uint64_t{k.align_b} << 20) | k.align_c);
    return h;
  }
};

// What one GEMM shape needs, built once: the descriptors and the heuristic's algorithm, or none
// (has_algo false), in which case cublasGemmEx runs it.
struct GemmPlan {
  MatmulDesc desc;
  MatrixLayout a, b, c;
  bool has_algo = false;
  cublasLtMatmulAlgo_t algo{};
};

uint32_t pointer_alignment(const void* p) {
  const uintptr_t addr = reinterpret_cast<uintptr_t>(p);
  if (addr == 0) return 256;
  return static_cast<uint32_t>(std::min<uintptr_t>(addr & (~addr + 1), 256));
}

// ---- tensor checks ------------------------------------------------------------------------------
void check(const Tensor& t, DType dtype, const char* what) {
  RT_ASSERT(t.device == Device::cuda, std::string(what) + " is not on the GPU: " + t.describe());
  RT_ASSERT(t.dtype == dtype,
            std::string(what) + " must be " + dtype_name(dtype) + ": " + t.describe());
}

void check_matrix(const Tensor& t, DType dtype, int64_t rows, int64_t cols, const char* what) {
  check(t, dtype, what);
  RT_ASSERT(t.rows() == rows && t.cols() == cols, std::string(what) + " should be [" +
                                                      std::to_string(rows) + "," +
                                                      std::to_string(cols) + "]: " + t.describe());
}

void check_contiguous(const Tensor& t, DType dtype, int64_t numel, const char* what) {
  check(t, dtype, what);
  RT_ASSERT(t.numel() == numel && t.contiguous(), std::string(what) + " should hold " +
                                                      std::to_string(numel) +
                                                      " contiguous elements: " + t.describe());
}

template <class T>
T* data_or_null(const Tensor& t) {
  return t.empty() ? nullptr : t.ptr<T>();
}

class CudaBackend final : public Backend {
 public:
  CudaBackend(int device_index, const std::string& gpu_name)
      : device_index_(device_index), gpu_name_(gpu_name) {
    cudaStream_t stream = nullptr;
    // A blocking stream: it orders after the legacy default stream, on which Buffer zero-fills new
    // allocations.
    cudaCheck(cudaStreamCreate(&stream));
    stream_.reset(stream);
    cudaEvent_t event = nullptr;
    cudaCheck(cudaEventCreateWithFlags(&event, cudaEventDisableTiming));
    cross_event_.reset(event);
    cublasLtHandle_t lt = nullptr;
    cublasCheck(cublasLtCreate(&lt));
    lt_.reset(lt);
    cublasHandle_t blas = nullptr;
    cublasCheck(cublasCreate(&blas));
    blas_.reset(blas);
    cublasCheck(cublasSetStream(blas_.get(), stream_.get()));
    gemm_workspace_ = Buffer(Device::cuda, kGemmWorkspaceBytes);
    maps_ = Buffer(Device::cuda, 2 * 256 * sizeof(float));
    cudaCheck(cudaMemcpy(maps_.data(), adam8bit_signed_map(), 256 * sizeof(float),
                         cudaMemcpyHostToDevice));
    cudaCheck(cudaMemcpy(signed_map() + 256, adam8bit_unsigned_map(), 256 * sizeof(float),
                         cudaMemcpyHostToDevice));
  }

  ~CudaBackend() override {
    // Let queued work finish before its buffers and handles go.
    (void)cudaStreamSynchronize(stream_.get());
    if (copy_stream_) (void)cudaStreamSynchronize(copy_stream_.get());
  }

  Device device() const override { return Device::cuda; }
  DType act_dtype() const override { return DType::bf16; }
  std::string name() const override {
    return "cuda:" + std::to_string(device_index_) + " (" + gpu_name_ + ")";
  }
  int device_index() const override { return device_index_; }
  void* native_stream() const override { return stream_.get(); }
  // An event must be recorded on a stream of its own GPU; a stream may wait for another GPU's.
  void wait_for(Backend& other) override {
    if (&other == this) return;
    void* point = other.record_point();
    if (point == nullptr) return;
    use_device();
    cudaCheck(cudaStreamWaitEvent(stream(), static_cast<cudaEvent_t>(point), 0));
  }
  void* record_point() override {
    use_device();
    cudaCheck(cudaEventRecord(cross_event_.get(), stream()));
    return cross_event_.get();
  }

  // ---- memory -------------------------------------------------------------------------------
  Buffer alloc(size_t bytes) override {
    use_device();
    return Buffer(Device::cuda, bytes);
  }

  // Synchronizes too, so the caller may reuse the host memory at once (pinned or not).
  void upload(Tensor dst, const void* host) override {
    use_device();
    RT_ASSERT(dst.device == Device::cuda, "upload to " + dst.describe());
    if (dst.nbytes() == 0) return;
    const size_t row = static_cast<size_t>(dst.cols()) * dtype_size(dst.dtype);
    if (dst.contiguous())
      cudaCheck(cudaMemcpyAsync(dst.data, host, dst.nbytes(), cudaMemcpyHostToDevice, stream()));
    else  // a padded weight's rows (a fused LoRA projection)
      cudaCheck(cudaMemcpy2DAsync(dst.data, static_cast<size_t>(dst.ld()) * dtype_size(dst.dtype), host, row, row,
                                  static_cast<size_t>(dst.rows()), cudaMemcpyHostToDevice, stream()));
    cudaCheck(cudaStreamSynchronize(stream()));
  }

  void download(void* host, Tensor src) override {
    use_device();
    RT_ASSERT(src.device == Device::cuda, "download from " + src.describe());
    if (src.nbytes() == 0) return;
    const size_t row = static_cast<size_t>(src.cols()) * dtype_size(src.dtype);
    if (src.contiguous())
      cudaCheck(cudaMemcpyAsync(host, src.data, src.nbytes(), cudaMemcpyDeviceToHost, stream()));
    else
      cudaCheck(cudaMemcpy2DAsync(host, row, src.data, static_cast<size_t>(src.ld()) * dtype_size(src.dtype), row,
                                  static_cast<size_t>(src.rows()), cudaMemcpyDeviceToHost, stream()));
    cudaCheck(cudaStreamSynchronize(stream()));
  }

  void copy(Tensor dst, Tensor src) override {
    use_device();
    RT_ASSERT(dst.device == Device::cuda && src.device == Device::cuda,
              "copy on the GPU: " + dst.describe() + " <- " + src.describe());
    RT_ASSERT(dst.rows() == src.rows() && dst.cols() == src.cols(),
              "copy between shapes " + dst.describe() + " <- " + src.describe());
    const int64_t rows = dst.rows(), cols = dst.cols();
    if (dst.dtype == DType::bf16 && src.dtype == DType::f32) {
      kernels::copy_f32_to_bf16(dst.ptr<bf16>(), dst.ld(), src.ptr<float>(), src.ld(), rows, cols,
                                stream());
    } else if (dst.dtype == DType::f32 && src.dtype == DType::bf16) {
      kernels::copy_bf16_to_f32(dst.ptr<float>(), dst.ld(), src.ptr<bf16>(), src.ld(), rows, cols,
                                stream());
    } else if (dst.dtype == DType::bf16 && src.dtype == DType::bf16) {
      kernels::copy_bf16(dst.ptr<bf16>(), dst.ld(), src.ptr<bf16>(), src.ld(), rows, cols,
                         stream());
    } else {
      RT_ASSERT(dst.dtype == src.dtype, "copy converts only between f32 and bf16: " +
                                            dst.describe() + " <- " + src.describe());
      if (rows == 0 || cols == 0 || (dst.data == src.data && dst.ld() == src.ld())) return;
      const size_t size = dtype_size(dst.dtype);
      cudaCheck(cudaMemcpy2DAsync(dst.data, static_cast<size_t>(dst.ld()) * size, src.data,
                                  static_cast<size_t>(src.ld()) * size,
                                  static_cast<size_t>(cols) * size, static_cast<size_t>(rows),
                                  cudaMemcpyDefault, stream()));
    }
  }

  // Many small bf16 copies (fused LoRA's B blocks before each forward, a layer's kept xa): one launch
  // per 64.
  void copy_batch(const std::vector<std::pair<Tensor, Tensor>>& dst_src) override {
    use_device();
    std::vector<kernels::CopyBlock> blocks;
    blocks.reserve(dst_src.size());
    for (const auto& [dst, src] : dst_src) {
      check_matrix(src, DType::bf16, dst.rows(), dst.cols(), "copy_batch src");
      check(dst, DType::bf16, "copy_batch dst");
      RT_ASSERT(dst.rows() <= INT_MAX && dst.cols() <= INT_MAX, "copy_batch block " + dst.describe());
      blocks.push_back({dst.ptr<bf16>(), src.ptr<bf16>(), dst.ld(), src.ld(), static_cast<int32_t>(dst.rows()),
                        static_cast<int32_t>(dst.cols())});
    }
    kernels::copy_bf16_blocks(blocks.data(), static_cast<int64_t>(blocks.size()), stream());
  }

  void fill(Tensor dst, float value) override {
    use_device();
    RT_ASSERT(dst.device == Device::cuda && (dst.dtype == DType::f32 || dst.dtype == DType::bf16),
              "fill of " + dst.describe());
    if (dst.contiguous()) {
      fill_rows(dst.data, dst.dtype, dst.numel(), value);
      return;
    }
    if (value == 0.f && !std::signbit(value)) {  // all-zero bytes, for either dtype
      const size_t size = dtype_size(dst.dtype);
      cudaCheck(cudaMemset2DAsync(dst.data, static_cast<size_t>(dst.ld()) * size, 0,
                                  static_cast<size_t>(dst.cols()) * size,
                                  static_cast<size_t>(dst.rows()), stream()));
      return;
    }
    for (int64_t r = 0; r < dst.rows(); ++r)  // a strided fill with a value: rare, done by rows
      fill_rows(dst.row_slice(r, 1).data, dst.dtype, dst.cols(), value);
  }

  void synchronize() override { cudaCheck(cudaStreamSynchronize(stream())); }

  // ---- elementwise / reductions ------------------------------------------------------------
  void scale(Tensor x, float s) override {
    use_device();
    RT_ASSERT(x.device == Device::cuda && (x.dtype == DType::f32 || x.dtype == DType::bf16),
              "scale of " + x.describe());
    if (x.contiguous()) {
      scale_rows(x.data, x.dtype, x.numel(), s);
      return;
    }
    for (int64_t r = 0; r < x.rows(); ++r) scale_rows(x.row_slice(r, 1).data, x.dtype, x.cols(), s);
  }

  void add(Tensor y, Tensor x) override {
    use_device();
    RT_ASSERT(y.device == Device::cuda && (y.dtype == DType::f32 || y.dtype == DType::bf16),
              "add to " + y.describe());
    check_matrix(x, y.dtype, y.rows(), y.cols(), "add x");
    if (y.dtype == DType::f32)
      kernels::add_f32(y.ptr<float>(), y.ld(), x.ptr<float>(), x.ld(), y.rows(), y.cols(),
                       stream());
    else
      kernels::add_bf16(y.ptr<bf16>(), y.ld(), x.ptr<bf16>(), x.ld(), y.rows(), y.cols(), stream());
  }

  double sum_squares(Tensor x) override {
    use_device();
    check(x, DType::f32, "sum_squares x");
    RT_ASSERT(x.contiguous(), "sum_squares of a strided view: " + x.describe());
    const int64_t partials = kernels::sum_squares_scratch_elems();
    auto* scratch = static_cast<double*>(
        sum_squares_scratch_.get(static_cast<size_t>(partials + 1) * sizeof(double), stream()));
    kernels::sum_squares_f32(scratch + partials, x.ptr<float>(), x.numel(), scratch, stream());
    double result = 0.0;
    cudaCheck(cudaMemcpyAsync(&result, scratch + partials, sizeof(double), cudaMemcpyDeviceToHost,
                              stream()));
    cudaCheck(cudaStreamSynchronize(stream()));
    return result;
  }

  void dropout(Tensor out, Tensor in, float p, uint64_t seed) override {
    use_device();
    check(in, DType::bf16, "dropout in");
    check_matrix(out, DType::bf16, in.rows(), in.cols(), "dropout out");
    RT_ASSERT(p >= 0.f && p < 1.f, "dropout probability must be in [0, 1)");
    kernels::dropout_bf16(out.ptr<bf16>(), out.ld(), in.ptr<bf16>(), in.ld(), in.rows(), in.cols(),
                          p, seed, stream());
  }

  // ---- embedding ----------------------------------------------------------------------------
  void embedding_forward(Tensor out, Tensor tokens, Tensor table) override {
    use_device();
    check(table, DType::bf16, "embedding table");
    RT_ASSERT(table.contiguous(), "embedding table " + table.describe());
    const int64_t n_tokens = out.rows(), channels = table.cols();
    check_contiguous(out, DType::bf16, n_tokens * channels, "embedding out");
    RT_ASSERT(out.cols() == channels, "embedding out " + out.describe());
    check_contiguous(tokens, DType::i32, n_tokens, "embedding tokens");
    kernels::embedding_forward(out.ptr<bf16>(), tokens.ptr<int32_t>(), table.ptr<bf16>(), n_tokens,
                               channels, stream());
  }

  // The positions are sorted by token on the GPU: one block per distinct token then sums its rows
  // in order of position, with no atomics and no wait for the host.
  void embedding_backward(Tensor dtable, Tensor dout, Tensor tokens, float beta) override {
    use_device();
    check(dtable, DType::f32, "embedding dtable");
    RT_ASSERT(dtable.contiguous(), "embedding dtable " + dtable.describe());
    const int64_t n_tokens = dout.rows(), channels = dtable.cols(), vocab = dtable.rows();
    check_contiguous(dout, DType::bf16, n_tokens * channels, "embedding dout");
    RT_ASSERT(dout.cols() == channels, "embedding dout " + dout.describe());
    check_contiguous(tokens, DType::i32, n_tokens, "embedding tokens");
    RT_ASSERT(n_tokens < INT32_MAX, "embedding backward over more than 2^31 tokens");

    if (beta == 0.f)
      kernels::fill_f32(dtable.ptr<float>(), dtable.numel(), 0.f, stream());
    else if (beta != 1.f)
      kernels::scale_f32(dtable.ptr<float>(), dtable.numel(), beta, stream());
    if (n_tokens == 0) return;

    void* scratch = embedding_scratch_.get(kernels::embedding_backward_scratch_bytes(n_tokens), stream());
    kernels::embedding_backward(dtable.ptr<float>(), dout.ptr<bf16>(), tokens.ptr<int32_t>(), n_tokens, vocab, channels,
                                scratch, stream());
  }

  // ---- RMSNorm ----------------------------------------------------------------------------------
  void residual_rmsnorm_forward(Tensor residual_out, Tensor norm_out, Tensor rstd,
                                Tensor residual_in, Tensor delta, Tensor weight,
                                float eps) override {
    use_device();
    const int64_t n_rows = residual_in.rows(), channels = residual_in.cols();
    check_contiguous(residual_in, DType::bf16, n_rows * channels, "rmsnorm residual_in");
    check_matrix(norm_out, DType::bf16, n_rows, channels, "rmsnorm norm_out");
    check_contiguous(rstd, DType::f32, n_rows, "rmsnorm rstd");
    check_contiguous(weight, DType::bf16, channels, "rmsnorm weight");
    if (!delta.empty()) {
      check_contiguous(delta, DType::bf16, n_rows * channels, "rmsnorm delta");
      check_contiguous(residual_out, DType::bf16, n_rows * channels, "rmsnorm residual_out");
      RT_ASSERT(delta.cols() == channels && residual_out.cols() == channels,
                "rmsnorm delta " + delta.describe() + ", residual_out " + residual_out.describe());
    }
    kernels::residual_rmsnorm_forward(delta.empty() ? nullptr : residual_out.ptr<bf16>(), norm_out.ptr<bf16>(),
                                      norm_out.ld(), rstd.ptr<float>(), residual_in.ptr<bf16>(),
                                      data_or_null<bf16>(delta), weight.ptr<bf16>(), n_rows, channels, eps, stream());
  }

  // dresidual may alias dnorm: the kernel reads a row's dnorm before it writes the row.
  void rmsnorm_backward(Tensor dresidual, Tensor dweight, float dweight_beta, Tensor dnorm,
                        Tensor x, Tensor weight, Tensor rstd) override {
    use_device();
    const int64_t n_rows = x.rows(), channels = x.cols();
    check_contiguous(x, DType::bf16, n_rows * channels, "rmsnorm x");
    check_contiguous(dresidual, DType::bf16, n_rows * channels, "rmsnorm dresidual");
    check_matrix(dnorm, DType::bf16, n_rows, channels, "rmsnorm dnorm");
    RT_ASSERT(dresidual.cols() == channels, "rmsnorm dresidual " + dresidual.describe());
    check_contiguous(weight, DType::bf16, channels, "rmsnorm weight");
    check_contiguous(rstd, DType::f32, n_rows, "rmsnorm rstd");
    float* partial = nullptr;
    if (!dweight.empty()) {
      check_contiguous(dweight, DType::f32, channels, "rmsnorm dweight");
      const int64_t elems = kernels::rmsnorm_dweight_scratch_elems(n_rows, channels);
      partial = static_cast<float*>(
          rmsnorm_scratch_.get(static_cast<size_t>(elems) * sizeof(float), stream()));
    }
    kernels::rmsnorm_backward(dresidual.ptr<bf16>(), data_or_null<float>(dweight), dweight_beta, partial,
                              dnorm.ptr<bf16>(), dnorm.ld(), x.ptr<bf16>(), weight.ptr<bf16>(), rstd.ptr<float>(),
                              n_rows, channels, stream());
  }

  // ---- GEMM ----------------------------------------------------------------------------------
  void matmul(Tensor out, Tensor a, Tensor b, bool trans_a, bool trans_b, float alpha,
              float beta) override {
    use_device();
    check(a, DType::bf16, "matmul a");
    check(b, DType::bf16, "matmul b");
    RT_ASSERT(out.device == Device::cuda && (out.dtype == DType::bf16 || out.dtype == DType::f32),
              "matmul out must be bf16 or f32 on the GPU: " + out.describe());
    const int64_t M = out.rows(), N = out.cols();
    const int64_t K = trans_a ? a.rows() : a.cols();
    // Built only when a check fails: matmul runs hundreds of times a step.
    auto shapes = [&] {
      return "matmul shapes: out " + out.describe() + ", a " + a.describe() +
             (trans_a ? "^T" : "") + ", b " + b.describe() + (trans_b ? "^T" : "");
    };
    RT_ASSERT((trans_a ? a.cols() : a.rows()) == M, shapes());
    RT_ASSERT((trans_b ? b.cols() : b.rows()) == K && (trans_b ? b.rows() : b.cols()) == N,
              shapes());
    RT_ASSERT(K > 0, shapes());
    if (M == 0 || N == 0) return;
    for (int64_t v : {M, N, K, a.ld(), b.ld(), out.ld()}) RT_ASSERT(v <= INT_MAX, shapes());

    const GemmKey key{.m = N,
                      .n = M,
                      .k = K,
                      .lda = b.ld(),
                      .ldb = a.ld(),
                      .ldc = out.ld(),
                      .trans_a = trans_b,
                      .trans_b = trans_a,
                      .out_f32 = out.dtype == DType::f32,
                      .align_a = pointer_alignment(b.data),
                      .align_b = pointer_alignment(a.data),
                      .align_c = pointer_alignment(out.data)};
    const GemmPlan& plan = gemm_plan(key);
    if (plan.has_algo) {
      // C and D are both out: with beta == 0 cuBLASLt does not read C.
      cublasCheck(cublasLtMatmul(lt_.get(), plan.desc.get(), &alpha, b.data, plan.a.get(), a.data,
                                 plan.b.get(), &beta, out.data, plan.c.get(), out.data,
                                 plan.c.get(), &plan.algo, gemm_workspace_.data(),
                                 kGemmWorkspaceBytes, stream()));
    } else {
      cublasCheck(cublasGemmEx(
          blas_.get(), trans_b ? CUBLAS_OP_T : CUBLAS_OP_N, trans_a ? CUBLAS_OP_T : CUBLAS_OP_N,
          static_cast<int>(N), static_cast<int>(M), static_cast<int>(K), &alpha, b.data,
          CUDA_R_16BF, static_cast<int>(b.ld()), a.data, CUDA_R_16BF, static_cast<int>(a.ld()),
          &beta, out.data, out.dtype == DType::f32 ? CUDA_R_32F : CUDA_R_16BF,
          static_cast<int>(out.ld()), CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
    }
  }

  // ---- rotary position embedding ----------------------------------------------------------------
  void rope_forward(Tensor x, Tensor positions, Tensor cos, Tensor sin, int64_t head_dim) override {
    use_device();
    rope(x, positions, cos, sin, head_dim, 1.f);
  }

  void rope_backward(Tensor dx, Tensor positions, Tensor cos, Tensor sin,
                     int64_t head_dim) override {
    use_device();
    rope(dx, positions, cos, sin, head_dim, -1.f);
  }

  // ---- attention -------------------------------------------------------------------------------
  void attention_forward(Tensor out, Tensor lse, Tensor q, Tensor k, Tensor v, Tensor doc_ids,
                         const AttnShape& shape) override {
    use_device();
    const kernels::AttnArgs args = attn_args(q, k, v, doc_ids, shape);
    const int64_t n_rows = shape.batch * shape.seq_len;
    check_matrix(out, DType::bf16, n_rows, shape.n_heads * shape.head_dim, "attention out");
    check_contiguous(lse, DType::f32, shape.batch * shape.n_heads * shape.seq_len, "attention lse");
    kernels::attention_forward(out.ptr<bf16>(), out.ld(), lse.ptr<float>(), args, stream());
  }

  void attention_backward(Tensor dq, Tensor dk, Tensor dv, Tensor dout, Tensor out, Tensor lse,
                          Tensor q, Tensor k, Tensor v, Tensor doc_ids,
                          const AttnShape& shape) override {
    use_device();
    const kernels::AttnArgs args = attn_args(q, k, v, doc_ids, shape);
    const int64_t n_rows = shape.batch * shape.seq_len;
    const int64_t q_cols = shape.n_heads * shape.head_dim;
    const int64_t kv_cols = shape.n_kv_heads * shape.head_dim;
    check_matrix(dq, DType::bf16, n_rows, q_cols, "attention dq");
    check_matrix(dk, DType::bf16, n_rows, kv_cols, "attention dk");
    check_matrix(dv, DType::bf16, n_rows, kv_cols, "attention dv");
    check_matrix(dout, DType::bf16, n_rows, q_cols, "attention dout");
    check_matrix(out, DType::bf16, n_rows, q_cols, "attention out");
    check_contiguous(lse, DType::f32, shape.batch * shape.n_heads * shape.seq_len, "attention lse");
    void* scratch =
        attention_scratch_.get(kernels::attention_backward_scratch_bytes(args), stream());
    kernels::attention_backward(dq.ptr<bf16>(), dq.ld(), dk.ptr<bf16>(), dk.ld(), dv.ptr<bf16>(),
                                dv.ld(), dout.ptr<bf16>(), dout.ld(), out.ptr<bf16>(), out.ld(),
                                lse.ptr<float>(), args, scratch, stream());
  }

  void attention_decode(Tensor out, Tensor q, Tensor k_cache, Tensor v_cache, int64_t n_keys,
                        const AttnShape& shape) override {
    use_device();
    const int64_t q_cols = shape.n_heads * shape.head_dim;
    const int64_t cache_numel = shape.batch * shape.seq_len * shape.n_kv_heads * shape.head_dim;
    RT_ASSERT(shape.n_kv_heads > 0 && shape.n_heads % shape.n_kv_heads == 0,
              "attention_decode shape: " + std::to_string(shape.n_heads) + " heads over " +
                  std::to_string(shape.n_kv_heads) + " kv heads");
    check_matrix(q, DType::bf16, shape.batch, q_cols, "attention_decode q");
    check_matrix(out, DType::bf16, shape.batch, q_cols, "attention_decode out");
    check_contiguous(k_cache, DType::bf16, cache_numel, "attention_decode k_cache");
    check_contiguous(v_cache, DType::bf16, cache_numel, "attention_decode v_cache");
    kernels::attention_decode(out.ptr<bf16>(), out.ld(), q.ptr<bf16>(), q.ld(), k_cache.ptr<bf16>(),
                              v_cache.ptr<bf16>(), shape.batch, shape.seq_len, n_keys, shape.n_heads,
                              shape.n_kv_heads, shape.head_dim, shape.scale, stream());
  }

  // ---- SwiGLU ----------------------------------------------------------------------------------
  void swiglu_forward(Tensor h, Tensor gate, Tensor up) override {
    use_device();
    const int64_t n_rows = gate.rows(), ffn = gate.cols();
    check(gate, DType::bf16, "swiglu gate");
    check_matrix(up, DType::bf16, n_rows, ffn, "swiglu up");
    RT_ASSERT(up.ld() == gate.ld(), "swiglu gate " + gate.describe() + " and up " + up.describe() +
                                        " must share a row stride (halves of one gate_up)");
    check_matrix(h, DType::bf16, n_rows, ffn, "swiglu h");
    kernels::swiglu_forward(h.ptr<bf16>(), h.ld(), gate.ptr<bf16>(), up.ptr<bf16>(), gate.ld(), n_rows, ffn, stream());
  }

  void swiglu_backward(Tensor dgate, Tensor dup, Tensor dh, Tensor gate, Tensor up, Tensor h) override {
    use_device();
    const int64_t n_rows = gate.rows(), ffn = gate.cols();
    check(gate, DType::bf16, "swiglu gate");
    check_matrix(up, DType::bf16, n_rows, ffn, "swiglu up");
    check_matrix(dgate, DType::bf16, n_rows, ffn, "swiglu dgate");
    check_matrix(dup, DType::bf16, n_rows, ffn, "swiglu dup");
    RT_ASSERT(up.ld() == gate.ld() && dup.ld() == dgate.ld(),
              "swiglu gate/up and dgate/dup must be halves of one buffer each");
    check_matrix(dh, DType::bf16, n_rows, ffn, "swiglu dh");
    if (!h.empty()) check_matrix(h, DType::bf16, n_rows, ffn, "swiglu h");
    kernels::swiglu_backward(dgate.ptr<bf16>(), dup.ptr<bf16>(), dgate.ld(), h.empty() ? nullptr : h.ptr<bf16>(),
                             h.empty() ? 0 : h.ld(), dh.ptr<bf16>(), dh.ld(), gate.ptr<bf16>(), up.ptr<bf16>(),
                             gate.ld(), n_rows, ffn, stream());
  }

  // ---- cross-entropy ---------------------------------------------------------------------------
  // Targets outside [0, vocab) are treated as ignored (-100 is the convention); unlike the CPU
  // backend the GPU cannot assert on them without a synchronizing copy.
  void cross_entropy(Tensor losses, Tensor dlogits, Tensor logits, Tensor targets,
                     float grad_scale) override {
    use_device();
    const int64_t n_rows = logits.rows(), vocab = logits.cols();
    check_contiguous(logits, logits.dtype == DType::bf16 ? DType::bf16 : DType::f32, n_rows * vocab,
                     "cross_entropy logits");
    check_contiguous(losses, DType::f32, n_rows, "cross_entropy losses");
    check_contiguous(targets, DType::i32, n_rows, "cross_entropy targets");
    if (!dlogits.empty()) {
      check_contiguous(dlogits, DType::bf16, n_rows * vocab, "cross_entropy dlogits");
      RT_ASSERT(dlogits.cols() == vocab, "cross_entropy dlogits " + dlogits.describe());
      RT_ASSERT(dlogits.data == logits.data || logits.dtype == DType::f32,
                "cross_entropy: bf16 dlogits either in place over the logits or apart from f32 logits");
    }
    if (logits.dtype == DType::bf16)
      kernels::cross_entropy(losses.ptr<float>(), data_or_null<bf16>(dlogits), logits.ptr<bf16>(),
                             targets.ptr<int32_t>(), n_rows, vocab, grad_scale, stream());
    else
      kernels::cross_entropy(losses.ptr<float>(), data_or_null<bf16>(dlogits), logits.ptr<float>(),
                             targets.ptr<int32_t>(), n_rows, vocab, grad_scale, stream());
  }

  // ---- optimizers ----------------------------------------------------------------------------
  // ---- offloaded checkpoints ---------------------------------------------------------------------
  int copy_to_host_async(Tensor host_dst, Tensor src) override {
    use_device();
    RT_ASSERT(host_dst.nbytes() == src.nbytes() && host_dst.contiguous() && src.contiguous(), "copy_to_host_async");
    return copy_async(host_dst.data, src.data, src.nbytes());
  }
  int copy_to_device_async(Tensor dst, Tensor host_src) override {
    use_device();
    RT_ASSERT(dst.nbytes() == host_src.nbytes() && dst.contiguous() && host_src.contiguous(), "copy_to_device_async");
    return copy_async(dst.data, host_src.data, dst.nbytes());
  }
  void wait_copy(int ticket) override {
    use_device();
    cudaCheck(cudaStreamWaitEvent(stream(), copy_events_[static_cast<size_t>(ticket)].get(), 0));
  }

  void nf4_dequantize(Tensor out, const Nf4Weight& w) override {
    use_device();
    check_contiguous(out, DType::bf16, w.numel, "nf4_dequantize out");
    kernels::Nf4Weights k;
    k.packed = w.packed.ptr<uint8_t>();
    k.absmax_codes = data_or_null<uint8_t>(w.absmax_codes);
    k.nested_absmax = data_or_null<float>(w.nested_absmax);
    k.nested_map = data_or_null<float>(w.nested_map);
    k.offset = w.offset;
    k.absmax = data_or_null<float>(w.absmax);
    k.numel = w.numel;
    kernels::nf4_dequantize(out.ptr<bf16>(), k, stream());
  }

  void adamw_step(Tensor master, Tensor compute, Tensor grad, Tensor m, Tensor v,
                  const AdamWParams& p) override {
    use_device();
    const int64_t n = master.numel();
    RT_ASSERT(p.step >= 1, "AdamW step is 1-based");
    check_contiguous(master, DType::f32, n, "adamw master");
    check_contiguous(grad, DType::f32, n, "adamw grad");
    check_contiguous(m, DType::f32, n, "adamw m");
    check_contiguous(v, DType::f32, n, "adamw v");
    kernels::adamw_step(master.ptr<float>(), compute_copy(compute, master), grad.ptr<float>(),
                        m.ptr<float>(), v.ptr<float>(), n, p, stream());
  }

  void adamw8bit_step(Tensor master, Tensor compute, Tensor grad, Tensor m_q, Tensor v_q,
                      Tensor m_absmax, Tensor v_absmax, const AdamWParams& p) override {
    use_device();
    const int64_t n = master.numel();
    const int64_t n_blocks = (n + kAdam8BitBlock - 1) / kAdam8BitBlock;
    RT_ASSERT(p.step >= 1, "AdamW step is 1-based");
    check_contiguous(master, DType::f32, n, "adamw8bit master");
    check_contiguous(grad, DType::f32, n, "adamw8bit grad");
    check_contiguous(m_q, DType::u8, n, "adamw8bit m_q");
    check_contiguous(v_q, DType::u8, n, "adamw8bit v_q");
    check_contiguous(m_absmax, DType::f32, n_blocks, "adamw8bit m_absmax");
    check_contiguous(v_absmax, DType::f32, n_blocks, "adamw8bit v_absmax");
    kernels::adamw8bit_step(master.ptr<float>(), compute_copy(compute, master), grad.ptr<float>(),
                            m_q.ptr<uint8_t>(), v_q.ptr<uint8_t>(), m_absmax.ptr<float>(),
                            v_absmax.ptr<float>(), n, signed_map(), signed_map() + 256, p,
                            stream());
  }

 private:
  cudaStream_t stream() const { return stream_.get(); }

  // The copy stream starts after the compute stream's queued work; its copy is ticket k, an event
  // of a ring (a ticket is waited for within a few layers, long before the ring comes round).
  int copy_async(void* dst, const void* src, size_t bytes) {
    if (!copy_stream_) {
      cudaStream_t s = nullptr;
      cudaCheck(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
      copy_stream_.reset(s);
      for (auto& e : copy_events_) {
        cudaEvent_t ev = nullptr;
        cudaCheck(cudaEventCreateWithFlags(&ev, cudaEventDisableTiming));
        e.reset(ev);
      }
    }
    const int ticket = next_ticket_;
    next_ticket_ = (next_ticket_ + 1) % static_cast<int>(copy_events_.size());
    cudaEvent_t ev = copy_events_[static_cast<size_t>(ticket)].get();
    cudaCheck(cudaEventRecord(ev, stream()));
    cudaCheck(cudaStreamWaitEvent(copy_stream_.get(), ev, 0));
    cudaCheck(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDefault, copy_stream_.get()));
    cudaCheck(cudaEventRecord(ev, copy_stream_.get()));
    return ticket;
  }
  // Several backends (device_map auto) share the host thread: each op makes its GPU current.
  void use_device() const {
    int current = -1;
    cudaCheck(cudaGetDevice(&current));
    if (current != device_index_) cudaCheck(cudaSetDevice(device_index_));
  }
  float* signed_map() const { return static_cast<float*>(maps_.data()); }

  void fill_rows(void* data, DType dtype, int64_t n, float value) {
    if (dtype == DType::f32)
      kernels::fill_f32(static_cast<float*>(data), n, value, stream());
    else
      kernels::fill_bf16(static_cast<bf16*>(data), n, value, stream());
  }

  void scale_rows(void* data, DType dtype, int64_t n, float s) {
    if (dtype == DType::f32)
      kernels::scale_f32(static_cast<float*>(data), n, s, stream());
    else
      kernels::scale_bf16(static_cast<bf16*>(data), n, s, stream());
  }

  // The bf16 copy the optimizer writes, or null for none (absent, or master itself).
  static bf16* compute_copy(const Tensor& compute, const Tensor& master) {
    if (compute.empty() || compute.data == master.data) return nullptr;
    check_contiguous(compute, DType::bf16, master.numel(), "optimizer compute copy");
    return compute.ptr<bf16>();
  }

  void rope(Tensor x, Tensor positions, Tensor cos, Tensor sin, int64_t head_dim, float sign) {
    check(x, DType::bf16, "rope x");
    RT_ASSERT(head_dim > 0 && head_dim % 2 == 0 && x.cols() % head_dim == 0,
              "rope: x " + x.describe() + " is not a whole number of heads of even head_dim " +
                  std::to_string(head_dim));
    check_contiguous(positions, DType::i32, x.rows(), "rope positions");
    check(cos, DType::f32, "rope cos");
    check(sin, DType::f32, "rope sin");
    RT_ASSERT(cos.cols() == head_dim / 2 && sin.cols() == head_dim / 2 &&
                  cos.rows() == sin.rows() && cos.contiguous() && sin.contiguous(),
              "rope tables cos " + cos.describe() + ", sin " + sin.describe());
    kernels::rope(x.ptr<bf16>(), x.ld(), x.rows(), x.cols() / head_dim, head_dim,
                  positions.ptr<int32_t>(), cos.ptr<float>(), sin.ptr<float>(), sign, stream());
  }

  static kernels::AttnArgs attn_args(const Tensor& q, const Tensor& k, const Tensor& v,
                                     const Tensor& doc_ids, const AttnShape& s) {
    RT_ASSERT(s.batch > 0 && s.seq_len > 0 && s.head_dim > 0 && s.n_kv_heads > 0 &&
                  s.n_heads % s.n_kv_heads == 0,
              "attention shape: " + std::to_string(s.n_heads) + " heads over " +
                  std::to_string(s.n_kv_heads) + " kv heads");
    const int64_t n_rows = s.batch * s.seq_len;
    check_matrix(q, DType::bf16, n_rows, s.n_heads * s.head_dim, "attention q");
    check_matrix(k, DType::bf16, n_rows, s.n_kv_heads * s.head_dim, "attention k");
    check_matrix(v, DType::bf16, n_rows, s.n_kv_heads * s.head_dim, "attention v");
    if (!doc_ids.empty()) check_contiguous(doc_ids, DType::i32, n_rows, "attention doc_ids");
    return {q.ptr<bf16>(),
            k.ptr<bf16>(),
            v.ptr<bf16>(),
            q.ld(),
            k.ld(),
            v.ld(),
            data_or_null<int32_t>(doc_ids),
            s.batch,
            s.seq_len,
            s.n_heads,
            s.n_kv_heads,
            s.head_dim,
            s.scale};
  }

  // The plan for a GEMM shape, made on first use.
  const GemmPlan& gemm_plan(const GemmKey& key) {
    auto found = gemm_plans_.find(key);
    if (found != gemm_plans_.end()) return found->second;

    GemmPlan plan;
    cublasLtMatmulDesc_t desc = nullptr;
    cublasCheck(cublasLtMatmulDescCreate(&desc, CUBLAS_COMPUTE_32F, CUDA_R_32F));
    plan.desc.reset(desc);
    const cublasOperation_t op_a = key.trans_a ? CUBLAS_OP_T : CUBLAS_OP_N;
    const cublasOperation_t op_b = key.trans_b ? CUBLAS_OP_T : CUBLAS_OP_N;
    cublasCheck(
        cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_TRANSA, &op_a, sizeof(op_a)));
    cublasCheck(
        cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_TRANSB, &op_b, sizeof(op_b)));

    // Layouts as stored (column-major rows x cols): op(A) is m x k, op(B) k x n, C m x n.
    auto layout = [](cudaDataType_t type, int64_t rows, int64_t cols, int64_t ld) {
      cublasLtMatrixLayout_t l = nullptr;
      cublasCheck(cublasLtMatrixLayoutCreate(&l, type, static_cast<uint64_t>(rows),
                                             static_cast<uint64_t>(cols), ld));
      return MatrixLayout(l);
    };
    plan.a = key.trans_a ? layout(CUDA_R_16BF, key.k, key.m, key.lda)
                         : layout(CUDA_R_16BF, key.m, key.k, key.lda);
    plan.b = key.trans_b ? layout(CUDA_R_16BF, key.n, key.k, key.ldb)
                         : layout(CUDA_R_16BF, key.k, key.n, key.ldb);
    plan.c = layout(key.out_f32 ? CUDA_R_32F : CUDA_R_16BF, key.m, key.n, key.ldc);

    cublasLtMatmulPreference_t pref_raw = nullptr;
    cublasCheck(cublasLtMatmulPreferenceCreate(&pref_raw));
    const MatmulPreference pref(pref_raw);
    const uint64_t workspace = kGemmWorkspaceBytes;
    cublasCheck(cublasLtMatmulPreferenceSetAttribute(
        pref_raw, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &workspace, sizeof(workspace)));
    // The default assumes 256-byte aligned pointers; views (row and column slices) often are not.
    const std::pair<cublasLtMatmulPreferenceAttributes_t, uint32_t> alignments[] = {
        {CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, key.align_a},
        {CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, key.align_b},
        {CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, key.align_c},
        {CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, key.align_c}};
    for (const auto& [attr, bytes] : alignments)
      cublasCheck(cublasLtMatmulPreferenceSetAttribute(pref_raw, attr, &bytes, sizeof(bytes)));

    cublasLtMatmulHeuristicResult_t result{};
    int count = 0;
    const cublasStatus_t status =
        cublasLtMatmulAlgoGetHeuristic(lt_.get(), desc, plan.a.get(), plan.b.get(), plan.c.get(),
                                       plan.c.get(), pref_raw, 1, &result, &count);
    // NOT_SUPPORTED means no algorithm fits (odd sizes, small alignments): cublasGemmEx then.
    if (status != CUBLAS_STATUS_NOT_SUPPORTED) cublasCheck(status);
    if (status == CUBLAS_STATUS_SUCCESS && count > 0 && result.state == CUBLAS_STATUS_SUCCESS) {
      plan.has_algo = true;
      plan.algo = result.algo;
    }
    return gemm_plans_.emplace(key, std::move(plan)).first->second;
  }

  int device_index_;
  std::string gpu_name_;
  // Declared before the buffers so that it is destroyed after them.
  Stream stream_;
  Event cross_event_;  // wait_for(): a point on another backend's stream
  Stream copy_stream_;  // offloaded checkpoints, created on first use
  std::array<Event, 256> copy_events_;
  int next_ticket_ = 0;
  LtHandle lt_;
  BlasHandle blas_;
  Buffer gemm_workspace_;
  std::unordered_map<GemmKey, GemmPlan, GemmKeyHash> gemm_plans_;
  Buffer maps_;  // the signed then the unsigned 8-bit map, 256 floats each
  Scratch sum_squares_scratch_, rmsnorm_scratch_, attention_scratch_, embedding_scratch_;
};

}  // namespace

void enable_peer_access(const std::vector<int>& devices) {
  for (int from : devices)
    for (int to : devices) {
      if (from == to) continue;
      int can = 0;
      cudaCheck(cudaDeviceCanAccessPeer(&can, from, to));
      if (!can)
        throw UserError("device_map: auto needs GPU " + std::to_string(from) + " to access GPU " + std::to_string(to) +
                        "'s memory, which this machine does not allow (no NVLink or PCIe peer-to-peer): use "
                        "device_map: sequential with one rank per GPU instead");
      cudaCheck(cudaSetDevice(from));
      const cudaError_t err = cudaDeviceEnablePeerAccess(to, 0);
      if (err == cudaErrorPeerAccessAlreadyEnabled) (void)cudaGetLastError();
      else cudaCheck(err);
    }
}

std::unique_ptr<Backend> make_cuda_backend(int device_index) {
  int count = 0;
  const cudaError_t err = cudaGetDeviceCount(&count);
  if (err != cudaSuccess) {
    (void)cudaGetLastError();
    throw UserError(std::string("no usable CUDA GPU: cudaGetDeviceCount failed with ") +
                    cudaGetErrorString(err) +
                    ". Check the driver with nvidia-smi and CUDA_VISIBLE_DEVICES, or set "
                    "model.device_map: cpu");
  }
  if (count == 0)
    throw UserError(
        "no CUDA GPU found (cudaGetDeviceCount returned 0). Check CUDA_VISIBLE_DEVICES, "
        "or set model.device_map: cpu");
  if (device_index < 0 || device_index >= count)
    throw UserError("CUDA device " + std::to_string(device_index) +
                    " does not exist: this process "
                    "sees " +
                    std::to_string(count) + " GPU(s), indices 0.." + std::to_string(count - 1) +
                    ". Check CUDA_VISIBLE_DEVICES and the number of ranks per node");
  cudaDeviceProp prop{};
  cudaError_t dev_err = cudaGetDeviceProperties(&prop, device_index);
  if (dev_err == cudaSuccess) dev_err = cudaSetDevice(device_index);
  if (dev_err == cudaSuccess) dev_err = cudaFree(nullptr);  // creates the context now
  if (dev_err != cudaSuccess) {
    (void)cudaGetLastError();
    throw UserError("cannot use CUDA device " + std::to_string(device_index) + ": " +
                    cudaGetErrorString(dev_err) +
                    " (is it in exclusive mode and taken by another process?)");
  }
  if (prop.major < 8)
    throw UserError("GPU " + std::to_string(device_index) + " (" + prop.name +
                    ") has compute capability " + std::to_string(prop.major) + "." +
                    std::to_string(prop.minor) +
                    "; ranktune's bf16 kernels need 8.0 (Ampere) or newer");
  return std::make_unique<CudaBackend>(device_index, prop.name);
}

}  // namespace ranktune
