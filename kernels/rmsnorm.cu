// RMSNorm fused with the residual add, and its backward.
//
// Forward: one block per row. Each thread owns kChunks chunks of kVec channels (a fixed set, the
// same in every row) and keeps them in registers, so a row is read once and written once: the sum
// of squares needs the whole row before the first output can be written, and registers avoid the
// second read llm.c's warp-per-row version makes.
//
// Backward: a persistent grid of G blocks (as many as fit on the GPU at once), block b taking rows
// b, b+G, ... Since a thread's channels are the same in every row, it keeps its dweight partial
// sums in registers across all its rows; the G partial rows go to scratch and two more kernels add
// them per channel in a fixed order (rmsnorm_dweight_group_kernel). No atomics, so dweight is bitwise
// reproducible, and the partials cost G*C floats instead of N*C.
#include <algorithm>

#include "cuda_check.h"
#include "kernels.h"
#include "vec.cuh"

namespace ranktune::kernels {
namespace {

// Up to this many threads a row is spread thinly (one chunk per thread); beyond, each thread takes
// several chunks, up to kMaxChunks. The vector path holds 8 floats per chunk and stays at 256
// threads (C <= 16384) to keep its registers; the scalar one may grow to 1024 threads (C <= 8192).
constexpr int kPreferredThreads = 256;
constexpr int kMaxChunks = 8;
constexpr int max_threads(int vec) { return vec == 8 ? 256 : 1024; }

template <int kVec, int kChunks>
__global__ void __launch_bounds__(max_threads(kVec))
    residual_rmsnorm_forward_kernel(bf16* residual_out, bf16* norm_out, int64_t ld_norm, float* rstd,
                                    const bf16* residual_in, const bf16* delta, const bf16* weight, int64_t channels,
                                    float eps) {
  __shared__ float shared[32];
  const int64_t n_chunks = channels / kVec;
  const int64_t offset = blockIdx.x * channels;
  float x[kChunks][kVec];
  float sum_sq = 0.f;
#pragma unroll
  for (int k = 0; k < kChunks; ++k) {
    const int64_t c = threadIdx.x + static_cast<int64_t>(k) * blockDim.x;
    if (c >= n_chunks) continue;
    load_floats<kVec>(residual_in + offset + c * kVec, x[k]);
    if (delta) {
      float d[kVec];
      load_floats<kVec>(delta + offset + c * kVec, d);
      // The normalized x is the bf16 residual stream as stored, so the backward, which reads it
      // back, differentiates the function the forward computed.
#pragma unroll
      for (int j = 0; j < kVec; ++j) x[k][j] = round_bf16(x[k][j] + d[j]);
      store_floats<kVec>(residual_out + offset + c * kVec, x[k]);
    }
#pragma unroll
    for (int j = 0; j < kVec; ++j) sum_sq += x[k][j] * x[k][j];
  }
  sum_sq = block_sum(sum_sq, shared);
  const float r = rsqrtf(sum_sq / static_cast<float>(channels) + eps);
  if (threadIdx.x == 0) rstd[blockIdx.x] = r;
#pragma unroll
  for (int k = 0; k < kChunks; ++k) {
    const int64_t c = threadIdx.x + static_cast<int64_t>(k) * blockDim.x;
    if (c >= n_chunks) continue;
    float w[kVec], y[kVec];
    load_floats<kVec>(weight + c * kVec, w);
#pragma unroll
    for (int j = 0; j < kVec; ++j) y[j] = x[k][j] * r * w[j];
    store_floats<kVec>(norm_out + blockIdx.x * ld_norm + c * kVec, y);
  }
}

// With g = dnorm * weight and r = rstd:  dx = r * g - x * r^3 * sum(g * x) / C,
// dweight += dnorm * x * r.
template <int kVec, int kChunks>
__global__ void __launch_bounds__(max_threads(kVec))
    rmsnorm_backward_kernel(bf16* dresidual, float* dweight_partial, const bf16* dnorm, int64_t ld_dnorm, const bf16* x,
                            const bf16* weight, const float* rstd, int64_t n_rows, int64_t channels) {
  __shared__ float shared[32];
  const int64_t n_chunks = channels / kVec;
  float dw[kChunks][kVec];
#pragma unroll
  for (int k = 0; k < kChunks; ++k)
#pragma unroll
    for (int j = 0; j < kVec; ++j) dw[k][j] = 0.f;
  for (int64_t row = blockIdx.x; row < n_rows; row += gridDim.x) {
    const int64_t offset = row * channels;
    const float r = rstd[row];
    // g and x stay in registers across the block reduction; the weight chunk is re-read per row
    // (an L1 hit) to leave registers for more resident blocks.
    float g[kChunks][kVec], xs[kChunks][kVec];
    float dot = 0.f;
#pragma unroll
    for (int k = 0; k < kChunks; ++k) {
      const int64_t c = threadIdx.x + static_cast<int64_t>(k) * blockDim.x;
      if (c >= n_chunks) continue;
      float w[kVec];
      load_floats<kVec>(dnorm + row * ld_dnorm + c * kVec, g[k]);
      load_floats<kVec>(x + offset + c * kVec, xs[k]);
      load_floats<kVec>(weight + c * kVec, w);
#pragma unroll
      for (int j = 0; j < kVec; ++j) {
        dw[k][j] += g[k][j] * xs[k][j] * r;
        g[k][j] *= w[j];
        dot += g[k][j] * xs[k][j];
      }
    }
    dot = block_sum(dot, shared);
    const float coef = dot * r * r * r / static_cast<float>(channels);
#pragma unroll
    for (int k = 0; k < kChunks; ++k) {
      const int64_t c = threadIdx.x + static_cast<int64_t>(k) * blockDim.x;
      if (c >= n_chunks) continue;
      float d[kVec];
      load_floats<kVec>(dresidual + offset + c * kVec, d);
#pragma unroll
      for (int j = 0; j < kVec; ++j) d[j] += r * g[k][j] - coef * xs[k][j];
      store_floats<kVec>(dresidual + offset + c * kVec, d);
    }
  }
  if (!dweight_partial) return;
#pragma unroll
  for (int k = 0; k < kChunks; ++k) {
    const int64_t c = threadIdx.x + static_cast<int64_t>(k) * blockDim.x;
    if (c < n_chunks) store_floats<kVec>(dweight_partial + blockIdx.x * channels + c * kVec, dw[k]);
  }
}

// dweight[c] = beta * dweight[c] + the sum of partial[b][c] over the blocks b, in two passes so that
// more than channels / 256 blocks share the work: pass 1 sums each of kReduceGroups consecutive
// ranges of partial rows, in order, into the range's first row (grid: channel tiles x groups; no
// other block reads that row); pass 2 adds the groups' sums in order. The order is fixed, so the
// result is bitwise reproducible. (One pass with 8 blocks of 256 threads, each walking ~1000 rows,
// took ~30 us per call on an H200, more than the backward itself.)
constexpr int kReduceGroups = 16;

__host__ __device__ inline int group_begin(int group, int n_partial) {
  return static_cast<int>(static_cast<int64_t>(n_partial) * group / kReduceGroups);
}

__global__ void rmsnorm_dweight_group_kernel(float* partial, int n_partial, int64_t channels) {
  const int64_t c = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  const int begin = group_begin(blockIdx.y, n_partial), end = group_begin(blockIdx.y + 1, n_partial);
  if (c >= channels || begin >= end) return;
  float sum = 0.f;
#pragma unroll 8
  for (int b = begin; b < end; ++b) sum += partial[b * channels + c];
  partial[begin * channels + c] = sum;
}

__global__ void rmsnorm_dweight_reduce_kernel(float* dweight, float beta, const float* partial,
                                              int n_partial, int64_t channels) {
  const int64_t c = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (c >= channels) return;
  float sum = 0.f;
  for (int g = 0; g < kReduceGroups; ++g) {
    const int begin = group_begin(g, n_partial);
    if (begin < group_begin(g + 1, n_partial)) sum += partial[begin * channels + c];
  }
  dweight[c] = beta == 0.f ? sum : beta * dweight[c] + sum;
}

// How a row of `channels` is split: kVec channels per chunk, kChunks chunks per thread.
struct RowSplit {
  int vec;
  int chunks;
  int threads;
};

RowSplit row_split(int64_t channels, bool vec) {
  const int v = vec ? 8 : 1;
  const int64_t n_chunks = channels / v;
  int chunks = 1;
  while (chunks < kMaxChunks && (n_chunks + chunks - 1) / chunks > kPreferredThreads) chunks *= 2;
  const int64_t threads = (n_chunks + chunks - 1) / chunks;
  RT_ASSERT(threads <= max_threads(v), "rmsnorm: " + std::to_string(channels) +
                                           " channels is more than one block holds in registers");
  return {v, chunks, threads_for(threads, max_threads(v))};
}

// Calls f with the kernel instance for the split, as a function pointer to the right template.
template <template <int, int> class Pick, class F>
void dispatch(const RowSplit& split, F&& f) {
  if (split.vec == 8) {
    switch (split.chunks) {
      case 1: return f(Pick<8, 1>::kernel);
      case 2: return f(Pick<8, 2>::kernel);
      case 4: return f(Pick<8, 4>::kernel);
      default: return f(Pick<8, 8>::kernel);
    }
  }
  switch (split.chunks) {
    case 1: return f(Pick<1, 1>::kernel);
    case 2: return f(Pick<1, 2>::kernel);
    case 4: return f(Pick<1, 4>::kernel);
    default: return f(Pick<1, 8>::kernel);
  }
}

template <int kVec, int kChunks>
struct ForwardKernel {
  static constexpr auto kernel = residual_rmsnorm_forward_kernel<kVec, kChunks>;
};
template <int kVec, int kChunks>
struct BackwardKernel {
  static constexpr auto kernel = rmsnorm_backward_kernel<kVec, kChunks>;
};

int sm_count() {
  int device = 0, count = 0;
  cudaCheck(cudaGetDevice(&device));
  cudaCheck(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device));
  return count;
}

// Blocks of the persistent backward grid: as many as are resident at once, at most one per row.
int backward_blocks(const RowSplit& split, int64_t n_rows) {
  int per_sm = 0;
  dispatch<BackwardKernel>(split, [&](auto kernel) {
    cudaCheck(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, split.threads, 0));
  });
  return static_cast<int>(std::min<int64_t>(n_rows, std::max(per_sm, 1) * int64_t{sm_count()}));
}

}  // namespace

// ---- Kernel launchers ---------------------------------------------------------------------------

void residual_rmsnorm_forward(bf16* residual_out, bf16* norm_out, int64_t ld_norm, float* rstd, const bf16* residual_in,
                              const bf16* delta, const bf16* weight, int64_t n_rows, int64_t channels, float eps,
                              cudaStream_t s) {
  if (n_rows == 0) return;
  const bool vec = channels % 8 == 0 && ld_norm % 8 == 0 && aligned16(norm_out) && aligned16(residual_in) &&
                   aligned16(weight) && (!delta || (aligned16(delta) && aligned16(residual_out)));
  const RowSplit split = row_split(channels, vec);
  dispatch<ForwardKernel>(split, [&](auto kernel) {
    kernel<<<static_cast<unsigned>(n_rows), split.threads, 0, s>>>(residual_out, norm_out, ld_norm, rstd, residual_in,
                                                                   delta, weight, channels, eps);
  });
  cudaCheckLaunch();
}

int64_t rmsnorm_dweight_scratch_elems(int64_t n_rows, int64_t channels) {
  // Which split the launch takes depends on pointer alignment, unknown here: size for the larger
  // of those that can be taken.
  const bool scalar_fits = channels <= int64_t{kMaxChunks} * max_threads(1);
  int64_t blocks = 0;
  if (channels % 8 == 0) blocks = backward_blocks(row_split(channels, true), n_rows);
  if (channels % 8 != 0 || scalar_fits)
    blocks = std::max<int64_t>(blocks, backward_blocks(row_split(channels, false), n_rows));
  return blocks * channels;
}

void rmsnorm_backward(bf16* dresidual, float* dweight, float dweight_beta, float* dweight_partial, const bf16* dnorm,
                      int64_t ld_dnorm, const bf16* x, const bf16* weight, const float* rstd, int64_t n_rows,
                      int64_t channels, cudaStream_t s) {
  if (n_rows == 0) {
    if (dweight && dweight_beta == 0.f)
      fill_f32(dweight, channels, 0.f, s);
    else if (dweight)
      scale_f32(dweight, channels, dweight_beta, s);
    return;
  }
  const bool vec = channels % 8 == 0 && ld_dnorm % 8 == 0 && aligned16(dresidual) && aligned16(dnorm) && aligned16(x) &&
                   aligned16(weight) && (!dweight || aligned16(dweight_partial));
  const RowSplit split = row_split(channels, vec);
  const int blocks = backward_blocks(split, n_rows);
  dispatch<BackwardKernel>(split, [&](auto kernel) {
    kernel<<<blocks, split.threads, 0, s>>>(dresidual, dweight ? dweight_partial : nullptr, dnorm, ld_dnorm, x, weight,
                                            rstd, n_rows, channels);
  });
  cudaCheckLaunch();
  if (!dweight) return;
  constexpr int kReduceThreads = 256;
  const auto tiles = static_cast<unsigned>((channels + kReduceThreads - 1) / kReduceThreads);
  rmsnorm_dweight_group_kernel<<<dim3(tiles, kReduceGroups), kReduceThreads, 0, s>>>(dweight_partial, blocks, channels);
  cudaCheckLaunch();
  rmsnorm_dweight_reduce_kernel<<<tiles, kReduceThreads, 0, s>>>(dweight, dweight_beta, dweight_partial, blocks,
                                                                 channels);
  cudaCheckLaunch();
}

}  // namespace ranktune::kernels
