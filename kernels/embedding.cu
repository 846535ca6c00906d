// Token embedding: a row gather forward, and a deterministic scatter-add backward.
// The backward avoids atomics (whose order would vary run to run) by having the host sort positions
// by token: one block per distinct token then sums that token's rows in order of position, so each
// dtable row is written by exactly one block, in a fixed order.
#include "cuda_check.h"
#include "kernels.h"
#include "vec.cuh"

namespace ranktune::kernels {
namespace {

constexpr int kMaxThreads = 256;

// One block per token position; threads walk the row in chunks of kVec channels.
template <int kVec>
__global__ void embedding_forward_kernel(bf16* out, const int32_t* tokens, const bf16* table,
                                         int64_t channels) {
  const int64_t n = blockIdx.x;
  const bf16* src = table + static_cast<int64_t>(tokens[n]) * channels;
  bf16* dst = out + n * channels;
  for (int64_t c = threadIdx.x; c < channels / kVec; c += blockDim.x) {
    float v[kVec];
    load_floats<kVec>(src + c * kVec, v);
    store_floats<kVec>(dst + c * kVec, v);
  }
}

// One block per run of equal tokens. Each thread owns kVec channels of the dtable row and adds the
// run's dout rows to it one after another, in order of position, exactly as a sequential loop over
// n would; no other block touches this row.
template <int kVec>
__global__ void embedding_backward_kernel(float* dtable, const bf16* dout, const int32_t* tokens,
                                          const int32_t* order, const int32_t* run_starts,
                                          int64_t channels) {
  const int32_t begin = run_starts[blockIdx.x], end = run_starts[blockIdx.x + 1];
  float* row = dtable + static_cast<int64_t>(tokens[order[begin]]) * channels;
  for (int64_t c = threadIdx.x; c < channels / kVec; c += blockDim.x) {
    float acc[kVec];
    load_floats<kVec>(row + c * kVec, acc);
    for (int32_t i = begin; i < end; ++i) {
      float d[kVec];
      load_floats<kVec>(dout + static_cast<int64_t>(order[i]) * channels + c * kVec, d);
#pragma unroll
      for (int j = 0; j < kVec; ++j) acc[j] += d[j];
    }
    store_floats<kVec>(row + c * kVec, acc);
  }
}

}  // namespace

// ---- Kernel launchers ---------------------------------------------------------------------------

void embedding_forward(bf16* out, const int32_t* tokens, const bf16* table, int64_t n_tokens,
                       int64_t channels, cudaStream_t s) {
  if (n_tokens == 0 || channels == 0) return;
  const bool vec = channels % 8 == 0 && aligned16(out) && aligned16(table);
  if (vec) {
    embedding_forward_kernel<8>
        <<<static_cast<unsigned>(n_tokens), threads_for(channels / 8, kMaxThreads), 0, s>>>(
            out, tokens, table, channels);
  } else {
    embedding_forward_kernel<1>
        <<<static_cast<unsigned>(n_tokens), threads_for(channels, kMaxThreads), 0, s>>>(
            out, tokens, table, channels);
  }
  cudaCheckLaunch();
}

void embedding_backward(float* dtable, const bf16* dout, const int32_t* tokens,
                        const int32_t* order, const int32_t* run_starts, int64_t n_runs,
                        int64_t channels, cudaStream_t s) {
  if (n_runs == 0 || channels == 0) return;
  const bool vec = channels % 8 == 0 && aligned16(dtable) && aligned16(dout);
  if (vec) {
    embedding_backward_kernel<8>
        <<<static_cast<unsigned>(n_runs), threads_for(channels / 8, kMaxThreads), 0, s>>>(
            dtable, dout, tokens, order, run_starts, channels);
  } else {
    embedding_backward_kernel<1>
        <<<static_cast<unsigned>(n_runs), threads_for(channels, kMaxThreads), 0, s>>>(
            dtable, dout, tokens, order, run_starts, channels);
  }
  cudaCheckLaunch();
}

}  // namespace ranktune::kernels
