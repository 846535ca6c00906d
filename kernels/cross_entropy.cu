// Cross-entropy over a chunk of logits (bf16 from the LM head's GEMM, or f32), with the gradient
// written in the same launch, over the logits themselves when the caller passes the same buffer.
// One block per row. Pass 1 reads the row once with an online max/sum (each thread keeps a running
// max m and sum s of exp(x - m), rescaling s when m grows), so the row's log-sum-exp costs one read
// instead of a max pass plus a sum pass; the (m, s) pairs are then merged across the block. Pass 2
// re-reads the row and writes dlogits = grad_scale * (softmax - onehot) as bf16. A vocabulary row
// (128256 f32 = 501 KiB) is far beyond what a block can hold on chip, hence the second read. In
// place is safe because each element is read and then written by the same thread, and the target's
// logit (for the loss) is read by every thread before any thread writes.
#include "cuda_check.h"
#include "kernels.h"
#include "vec.cuh"

namespace ranktune::kernels {
namespace {

constexpr int kMaxThreads = 1024;

struct MaxSum {
  float m;  // running max
  float s;  // sum of exp(x - m)
};

// Merging is symmetric in its arguments, bitwise, so the butterfly gives every lane the same pair.
__device__ __forceinline__ MaxSum merge(MaxSum a, MaxSum b) {
  const float m = fmaxf(a.m, b.m);
  if (m == -INFINITY) return {m, 0.f};  // both empty
  return {m, a.s * __expf(a.m - m) + b.s * __expf(b.m - m)};
}

__device__ MaxSum block_merge(MaxSum v, MaxSum* shared) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1)
    v = merge(
        v, {__shfl_xor_sync(0xffffffffu, v.m, offset), __shfl_xor_sync(0xffffffffu, v.s, offset)});
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  v = lane < static_cast<int>(blockDim.x / 32) ? shared[lane] : MaxSum{-INFINITY, 0.f};
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1)
    v = merge(
        v, {__shfl_xor_sync(0xffffffffu, v.m, offset), __shfl_xor_sync(0xffffffffu, v.s, offset)});
  return v;
}

// Targets outside [0, vocab) (-100 by convention) mark ignored rows: loss 0, gradient 0.
template <int kVec, class T>
__global__ void __launch_bounds__(kMaxThreads)
    cross_entropy_kernel(float* losses, bf16* dlogits, const T* logits, const int32_t* targets, int64_t vocab,
                         float grad_scale) {
  __shared__ MaxSum shared[32];
  const int64_t row = blockIdx.x;
  const int32_t target = targets[row];
  const T* x = logits + row * vocab;
  const int64_t n_chunks = vocab / kVec;
  const bool ignored = target < 0 || target >= vocab;

  if (ignored) {
    if (threadIdx.x == 0) losses[row] = 0.f;
    if (dlogits) {
      float zeros[kVec];
#pragma unroll
      for (int j = 0; j < kVec; ++j) zeros[j] = 0.f;
      for (int64_t c = threadIdx.x; c < n_chunks; c += blockDim.x)
        store_floats<kVec>(dlogits + row * vocab + c * kVec, zeros);
    }
    return;
  }

  float target_logit;
  load_floats<1>(x + target, &target_logit);
  MaxSum acc{-INFINITY, 0.f};
  for (int64_t c = threadIdx.x; c < n_chunks; c += blockDim.x) {
    float v[kVec];
    load_floats<kVec>(x + c * kVec, v);
    float chunk_max = v[0];
#pragma unroll
    for (int j = 1; j < kVec; ++j) chunk_max = fmaxf(chunk_max, v[j]);
    if (chunk_max > acc.m) {
      acc.s *= __expf(acc.m - chunk_max);
      acc.m = chunk_max;
    }
#pragma unroll
    for (int j = 0; j < kVec; ++j) acc.s += __expf(v[j] - acc.m);
  }
  acc = block_merge(acc, shared);
  const float lse = acc.m + logf(acc.s);
  if (threadIdx.x == 0) losses[row] = lse - target_logit;
  if (!dlogits) return;

  for (int64_t c = threadIdx.x; c < n_chunks; c += blockDim.x) {
    float v[kVec];
    load_floats<kVec>(x + c * kVec, v);
#pragma unroll
    for (int j = 0; j < kVec; ++j) {
      const float onehot = c * kVec + j == target ? 1.f : 0.f;
      v[j] = grad_scale * (__expf(v[j] - lse) - onehot);
    }
    store_floats<kVec>(dlogits + row * vocab + c * kVec, v);
  }
}

}  // namespace

// ---- Kernel launchers ---------------------------------------------------------------------------

template <class T>
void cross_entropy(float* losses, bf16* dlogits, const T* logits, const int32_t* targets, int64_t n_rows, int64_t vocab,
                   float grad_scale, cudaStream_t s) {
  if (n_rows == 0) return;
  const bool vec = vocab % 8 == 0 && aligned16(logits) && (!dlogits || aligned16(dlogits));
  if (vec) {
    cross_entropy_kernel<8><<<static_cast<unsigned>(n_rows), threads_for(vocab / 8, kMaxThreads), 0, s>>>(
        losses, dlogits, logits, targets, vocab, grad_scale);
  } else {
    cross_entropy_kernel<1><<<static_cast<unsigned>(n_rows), threads_for(vocab, kMaxThreads), 0, s>>>(
        losses, dlogits, logits, targets, vocab, grad_scale);
  }
  cudaCheckLaunch();
}

template void cross_entropy<float>(float*, bf16*, const float*, const int32_t*, int64_t, int64_t, float, cudaStream_t);
template void cross_entropy<bf16>(float*, bf16*, const bf16*, const int32_t*, int64_t, int64_t, float, cudaStream_t);

}  // namespace ranktune::kernels
