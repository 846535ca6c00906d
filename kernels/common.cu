// Elementwise ops (fill, scale, add), strided copies with casts, the deterministic sum of squares
// and dropout.
// All memory-bound: each kernel has a 16-byte vector path (8 bf16 or 4/8 f32 per access) taken when
// pointers, sizes and row strides allow it, and an element-by-element path for the rest.
#include <algorithm>

#include "cuda_check.h"
#include "kernels.h"
#include "vec.cuh"

namespace ranktune::kernels {
namespace {

constexpr int kThreads = 256;
// Grid-stride loops stop growing the grid here: enough blocks to fill any current GPU.
constexpr int64_t kMaxBlocks = 8192;
// Blocks of the first sum-of-squares pass; fixed, so the summation order depends only on n.
constexpr int kSumSquaresBlocks = 1024;

unsigned blocks_for(int64_t items, int threads = kThreads) {
  return static_cast<unsigned>(std::clamp<int64_t>((items + threads - 1) / threads, 1, kMaxBlocks));
}

template <class T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) {
  return x;
}
template <>
__device__ __forceinline__ bf16 from_float<bf16>(float x) {
  return __float2bfloat16_rn(x);
}

// ---- fill and scale: contiguous, in place -------------------------------------------------------
// kVec elements per 16-byte access over the first n / kVec * kVec elements; block 0 does the tail.
template <class T, int kVec>
__global__ void fill_kernel(T* x, int64_t n, float value) {
  const int64_t n_vec = n / kVec;
  float v[kVec];
#pragma unroll
  for (int j = 0; j < kVec; ++j) v[j] = value;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n_vec;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)
    store_floats<kVec>(x + i * kVec, v);
  const int64_t tail = n - n_vec * kVec;
  if (blockIdx.x == 0 && threadIdx.x < tail) x[n_vec * kVec + threadIdx.x] = from_float<T>(value);
}

template <class T, int kVec>
__global__ void scale_kernel(T* x, int64_t n, float s) {
  const int64_t n_vec = n / kVec;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n_vec;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    float v[kVec];
    load_floats<kVec>(x + i * kVec, v);
#pragma unroll
    for (int j = 0; j < kVec; ++j) v[j] *= s;
    store_floats<kVec>(x + i * kVec, v);
  }
  const int64_t tail = n - n_vec * kVec;
  if (blockIdx.x == 0 && threadIdx.x < tail) {
    float v;
    load_floats<1>(x + n_vec * kVec + threadIdx.x, &v);
    v *= s;
    store_floats<1>(x + n_vec * kVec + threadIdx.x, &v);
  }
}

// ---- 2-D strided copy with conversion -----------------------------------------------------------
// Rows in gridDim.y steps (rows may exceed the 65535 limit of a grid's y), columns in chunks of
// kVec.
template <int kVec, class Dst, class Src>
__global__ void copy_kernel(Dst* dst, int64_t ld_dst, const Src* src, int64_t ld_src, int64_t rows,
                            int64_t cols) {
  const int64_t n_chunks = cols / kVec;
  for (int64_t r = blockIdx.y; r < rows; r += gridDim.y) {
    for (int64_t c = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; c < n_chunks;
         c += static_cast<int64_t>(gridDim.x) * blockDim.x) {
      float v[kVec];
      load_floats<kVec>(src + r * ld_src + c * kVec, v);
      store_floats<kVec>(dst + r * ld_dst + c * kVec, v);
    }
  }
}

// A batch of small 2-D copies (Backend::copy_batch): blockIdx.y picks the copy, the x blocks
// stride over its elements. The descriptors travel as a kernel parameter, so the launch needs no
// upload of its own; kCopyBlocksPerLaunch of them keep the parameter under 4 KiB.
constexpr int kCopyBlocksPerLaunch = 64;
struct CopyBlocks {
  CopyBlock block[kCopyBlocksPerLaunch];
};

// kVec elements per access (8: 16 bytes, when every row of every block is 16-byte aligned).
template <int kVec>
__global__ void copy_blocks_kernel(CopyBlocks blocks) {
  const CopyBlock& b = blocks.block[blockIdx.y];
  const int vecs_per_row = b.cols / kVec;
  const int n = b.rows * vecs_per_row;
  for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) {
    const int64_t r = i / vecs_per_row, c = static_cast<int64_t>(i % vecs_per_row) * kVec;
    if constexpr (kVec == 8)
      *reinterpret_cast<uint4*>(b.dst + r * b.ld_dst + c) = *reinterpret_cast<const uint4*>(b.src + r * b.ld_src + c);
    else
      b.dst[r * b.ld_dst + c] = b.src[r * b.ld_src + c];
  }
}

// y += x; y may be x itself.
template <int kVec, class T>
__global__ void add_kernel(T* y, int64_t ld_y, const T* x, int64_t ld_x, int64_t rows,
                           int64_t cols) {
  const int64_t n_chunks = cols / kVec;
  for (int64_t r = blockIdx.y; r < rows; r += gridDim.y) {
    for (int64_t c = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; c < n_chunks;
         c += static_cast<int64_t>(gridDim.x) * blockDim.x) {
      float a[kVec], b[kVec];
      load_floats<kVec>(y + r * ld_y + c * kVec, a);
      load_floats<kVec>(x + r * ld_x + c * kVec, b);
#pragma unroll
      for (int j = 0; j < kVec; ++j) a[j] += b[j];
      store_floats<kVec>(y + r * ld_y + c * kVec, a);
    }
  }
}

// ---- sum of squares -----------------------------------------------------------------------------
// Squares of floats are exact in double; only the additions round, in an order fixed by n.
template <bool kVec4>
__global__ void sum_squares_partial_kernel(double* partial, const float* x, int64_t n) {
  __shared__ double shared[32];
  double acc = 0.0;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t first = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  int64_t done = 0;
  if constexpr (kVec4) {
    const int64_t n4 = n / 4;
    for (int64_t i = first; i < n4; i += stride) {
      const float4 v = reinterpret_cast<const float4*>(x)[i];
      acc += static_cast<double>(v.x) * v.x + static_cast<double>(v.y) * v.y +
             static_cast<double>(v.z) * v.z + static_cast<double>(v.w) * v.w;
    }
    done = n4 * 4;
  }
  for (int64_t i = done + first; i < n; i += stride) acc += static_cast<double>(x[i]) * x[i];
  acc = block_sum(acc, shared);
  if (threadIdx.x == 0) partial[blockIdx.x] = acc;
}

__global__ void sum_squares_final_kernel(double* out, const double* partial, int n_partial) {
  __shared__ double shared[32];
  double acc = 0.0;
  for (int i = threadIdx.x; i < n_partial; i += blockDim.x) acc += partial[i];
  acc = block_sum(acc, shared);
  if (threadIdx.x == 0) *out = acc;
}

// ---- dropout ------------------------------------------------------------------------------------
// The keep decision uses the logical index row * cols + col, not the memory offset, so strided
// views and the CPU backend drop the same elements. in and out may be the same memory.
template <int kVec>
__global__ void dropout_kernel(bf16* out, int64_t ld_out, const bf16* in, int64_t ld_in,
                               int64_t rows, int64_t cols, float p, float scale, uint64_t seed) {
  const int64_t n_chunks = cols / kVec;
  for (int64_t r = blockIdx.y; r < rows; r += gridDim.y) {
    for (int64_t c = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; c < n_chunks;
         c += static_cast<int64_t>(gridDim.x) * blockDim.x) {
      float v[kVec];
      load_floats<kVec>(in + r * ld_in + c * kVec, v);
      const uint64_t index = static_cast<uint64_t>(r * cols + c * kVec);
#pragma unroll
      for (int j = 0; j < kVec; ++j) v[j] = dropout_keep(seed, index + j, p) ? v[j] * scale : 0.f;
      store_floats<kVec>(out + r * ld_out + c * kVec, v);
    }
  }
}

template <class Dst, class Src>
void launch_copy(Dst* dst, int64_t ld_dst, const Src* src, int64_t ld_src, int64_t rows,
                 int64_t cols, cudaStream_t s) {
  if (rows == 0 || cols == 0) return;
  const bool vec =
      aligned16(dst) && aligned16(src) && cols % 8 == 0 && ld_dst % 8 == 0 && ld_src % 8 == 0;
  if (vec) {
    const int threads = threads_for(cols / 8, kThreads);
    copy_kernel<8>
        <<<grid_2d(rows, cols / 8, threads), threads, 0, s>>>(dst, ld_dst, src, ld_src, rows, cols);
  } else {
    const int threads = threads_for(cols, kThreads);
    copy_kernel<1>
        <<<grid_2d(rows, cols, threads), threads, 0, s>>>(dst, ld_dst, src, ld_src, rows, cols);
  }
  cudaCheckLaunch();
}

template <class T>
void launch_add(T* y, int64_t ld_y, const T* x, int64_t ld_x, int64_t rows, int64_t cols,
                cudaStream_t s) {
  if (rows == 0 || cols == 0) return;
  constexpr int kVec = 16 / sizeof(T);
  const bool vec =
      aligned16(y) && aligned16(x) && cols % kVec == 0 && ld_y % kVec == 0 && ld_x % kVec == 0;
  if (vec) {
    const int threads = threads_for(cols / kVec, kThreads);
    add_kernel<kVec>
        <<<grid_2d(rows, cols / kVec, threads), threads, 0, s>>>(y, ld_y, x, ld_x, rows, cols);
  } else {
    const int threads = threads_for(cols, kThreads);
    add_kernel<1><<<grid_2d(rows, cols, threads), threads, 0, s>>>(y, ld_y, x, ld_x, rows, cols);
  }
  cudaCheckLaunch();
}

template <class T>
void launch_fill(T* x, int64_t n, float value, cudaStream_t s) {
  if (n == 0) return;
  constexpr int kVec = 16 / sizeof(T);
  if (aligned16(x))
    fill_kernel<T, kVec><<<blocks_for(n / kVec), kThreads, 0, s>>>(x, n, value);
  else
    fill_kernel<T, 1><<<blocks_for(n), kThreads, 0, s>>>(x, n, value);
  cudaCheckLaunch();
}

template <class T>
void launch_scale(T* x, int64_t n, float factor, cudaStream_t s) {
  if (n == 0) return;
  constexpr int kVec = 16 / sizeof(T);
  if (aligned16(x))
    scale_kernel<T, kVec><<<blocks_for(n / kVec), kThreads, 0, s>>>(x, n, factor);
  else
    scale_kernel<T, 1><<<blocks_for(n), kThreads, 0, s>>>(x, n, factor);
  cudaCheckLaunch();
}

}  // namespace

// ---- Kernel launchers ---------------------------------------------------------------------------

void fill_f32(float* x, int64_t n, float value, cudaStream_t s) { launch_fill(x, n, value, s); }
void fill_bf16(bf16* x, int64_t n, float value, cudaStream_t s) { launch_fill(x, n, value, s); }

void copy_f32_to_bf16(bf16* dst, int64_t ld_dst, const float* src, int64_t ld_src, int64_t rows,
                      int64_t cols, cudaStream_t s) {
  launch_copy(dst, ld_dst, src, ld_src, rows, cols, s);
}

void copy_bf16_to_f32(float* dst, int64_t ld_dst, const bf16* src, int64_t ld_src, int64_t rows,
                      int64_t cols, cudaStream_t s) {
  launch_copy(dst, ld_dst, src, ld_src, rows, cols, s);
}

void copy_bf16(bf16* dst, int64_t ld_dst, const bf16* src, int64_t ld_src, int64_t rows,
               int64_t cols, cudaStream_t s) {
  launch_copy(dst, ld_dst, src, ld_src, rows, cols, s);
}

void copy_bf16_blocks(const CopyBlock* blocks, int64_t n_blocks, cudaStream_t s) {
  for (int64_t first = 0; first < n_blocks; first += kCopyBlocksPerLaunch) {
    const int64_t n = std::min<int64_t>(kCopyBlocksPerLaunch, n_blocks - first);
    CopyBlocks batch{};
    int64_t largest = 1;
    bool vec = true;
    for (int64_t i = 0; i < n; ++i) {
      const CopyBlock& b = blocks[first + i];
      RT_ASSERT(static_cast<int64_t>(b.rows) * b.cols < (int64_t{1} << 31),
                "copy_bf16_blocks: a block of 2^31 elements");
      batch.block[i] = b;
      largest = std::max<int64_t>(largest, static_cast<int64_t>(b.rows) * b.cols);
      vec = vec && aligned16(b.dst) && aligned16(b.src) && b.cols % 8 == 0 && b.ld_dst % 8 == 0 && b.ld_src % 8 == 0;
    }
    const int64_t items = vec ? largest / 8 : largest;
    const unsigned x_blocks = static_cast<unsigned>(std::min<int64_t>((items + kThreads - 1) / kThreads, 64));
    if (vec)
      copy_blocks_kernel<8><<<dim3(x_blocks, static_cast<unsigned>(n)), kThreads, 0, s>>>(batch);
    else
      copy_blocks_kernel<1><<<dim3(x_blocks, static_cast<unsigned>(n)), kThreads, 0, s>>>(batch);
    cudaCheckLaunch();
  }
}

void scale_f32(float* x, int64_t n, float s_, cudaStream_t s) { launch_scale(x, n, s_, s); }
void scale_bf16(bf16* x, int64_t n, float s_, cudaStream_t s) { launch_scale(x, n, s_, s); }

void add_f32(float* y, int64_t ld_y, const float* x, int64_t ld_x, int64_t rows, int64_t cols,
             cudaStream_t s) {
  launch_add(y, ld_y, x, ld_x, rows, cols, s);
}

void add_bf16(bf16* y, int64_t ld_y, const bf16* x, int64_t ld_x, int64_t rows, int64_t cols,
              cudaStream_t s) {
  launch_add(y, ld_y, x, ld_x, rows, cols, s);
}

int64_t sum_squares_scratch_elems() { return kSumSquaresBlocks; }

void sum_squares_f32(double* out, const float* x, int64_t n, double* scratch, cudaStream_t s) {
  const bool vec = aligned16(x);
  const int64_t items = vec ? n / 4 : n;
  const int blocks = static_cast<int>(
      std::clamp<int64_t>((items + kThreads - 1) / kThreads, 1, kSumSquaresBlocks));
  if (vec)
    sum_squares_partial_kernel<true><<<blocks, kThreads, 0, s>>>(scratch, x, n);
  else
    sum_squares_partial_kernel<false><<<blocks, kThreads, 0, s>>>(scratch, x, n);
  cudaCheckLaunch();
  sum_squares_final_kernel<<<1, kThreads, 0, s>>>(out, scratch, blocks);
  cudaCheckLaunch();
}

void dropout_bf16(bf16* out, int64_t ld_out, const bf16* in, int64_t ld_in, int64_t rows,
                  int64_t cols, float p, uint64_t seed, cudaStream_t s) {
  if (rows == 0 || cols == 0) return;
  const float scale = p < 1.f ? 1.f / (1.f - p) : 0.f;
  const bool vec =
      aligned16(out) && aligned16(in) && cols % 8 == 0 && ld_out % 8 == 0 && ld_in % 8 == 0;
  if (vec) {
    const int threads = threads_for(cols / 8, kThreads);
    dropout_kernel<8><<<grid_2d(rows, cols / 8, threads), threads, 0, s>>>(
        out, ld_out, in, ld_in, rows, cols, p, scale, seed);
  } else {
    const int threads = threads_for(cols, kThreads);
    dropout_kernel<1><<<grid_2d(rows, cols, threads), threads, 0, s>>>(out, ld_out, in, ld_in, rows,
                                                                       cols, p, scale, seed);
  }
  cudaCheckLaunch();
}

}  // namespace ranktune::kernels
