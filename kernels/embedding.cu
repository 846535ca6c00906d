// Token embedding: a row gather forward, and a deterministic scatter-add backward.
// The backward avoids atomics (whose order would vary run to run) by sorting the positions by token
// on the GPU (a stable radix sort in one block): one block per distinct token then sums that
// token's rows in order of position, so each dtable row is written by exactly one block, in a fixed
// order. Nothing waits for the host: the sort, the run count and the sums stay on the stream.
#include <climits>

#include "cuda_check.h"
#include "kernels.h"
#include "ranktune/error.h"
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

// ---- the sort: (token, position) pairs by token, stable, in one block ----------------------------
// Each thread owns a contiguous chunk of the pairs, so walking the chunks in thread order walks the
// input in order; an LSD radix pass over kDigitBits bits of the token counts each chunk's digits
// (counts[digit][thread], no atomics), scans the counts digit-major (all 0s of every chunk, in
// thread order, then all 1s, ...) and scatters each chunk in order: stable, so after the last pass
// equal tokens keep their positions' order. Token ids outside [0, vocab) sort as `vocab`, a run
// the sums skip (the model checks ids on upload; this keeps a bad id from writing out of bounds).
constexpr int kSortThreads = 512;
constexpr int kDigitBits = 4, kDigits = 1 << kDigitBits;

// Exclusive prefix sum over the block (kSortThreads threads) of one value per thread; *total gets
// the sum. `shared` holds kSortThreads / 32 elements.
__device__ __forceinline__ uint32_t block_exclusive_scan(uint32_t v, uint32_t* shared, uint32_t* total) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  uint32_t inclusive = v;
#pragma unroll
  for (int offset = 1; offset < 32; offset <<= 1) {
    const uint32_t up = __shfl_up_sync(0xffffffffu, inclusive, offset);
    if (lane >= offset) inclusive += up;
  }
  __syncthreads();
  if (lane == 31) shared[warp] = inclusive;
  __syncthreads();
  uint32_t before = 0, all = 0;
  for (int w = 0; w < kSortThreads / 32; ++w) {
    if (w < warp) before += shared[w];
    all += shared[w];
  }
  *total = all;
  return before + inclusive - v;
}

__device__ __forceinline__ uint32_t sort_key(uint64_t pair) { return static_cast<uint32_t>(pair >> 32); }

// order[i]: the i-th position by (token, position); run_starts[0..n_runs]: where each distinct
// token's positions begin in order[], then n; *n_runs the number of runs (the last one the
// out-of-vocabulary run if any id is bad). a and b: n pairs each, ping-pong.
__global__ void __launch_bounds__(kSortThreads)
    embedding_sort_kernel(int32_t* order, int32_t* run_starts, int32_t* n_runs, uint64_t* a, uint64_t* b,
                          const int32_t* tokens, int32_t n, int32_t vocab, int key_bits) {
  __shared__ uint32_t counts[kDigits * kSortThreads];
  __shared__ uint32_t scan_shared[kSortThreads / 32];
  const int t = threadIdx.x;
  const int32_t per = (n + kSortThreads - 1) / kSortThreads;
  const int32_t lo = min(n, t * per), hi = min(n, lo + per);
  for (int32_t i = lo; i < hi; ++i) {
    const int32_t token = tokens[i];
    const uint32_t key = token >= 0 && token < vocab ? static_cast<uint32_t>(token) : static_cast<uint32_t>(vocab);
    a[i] = static_cast<uint64_t>(key) << 32 | static_cast<uint32_t>(i);
  }
  uint64_t *src = a, *dst = b;
  for (int shift = 0; shift < key_bits; shift += kDigitBits) {
    uint32_t mine[kDigits] = {};
    for (int32_t i = lo; i < hi; ++i) ++mine[(sort_key(src[i]) >> shift) & (kDigits - 1)];
    for (int d = 0; d < kDigits; ++d) counts[d * kSortThreads + t] = mine[d];
    __syncthreads();
    // Thread t scans the kDigits consecutive entries [t * kDigits, (t + 1) * kDigits) of the flat,
    // digit-major array; the block scan of the threads' sums offsets them.
    uint32_t local[kDigits], sum = 0;
    for (int j = 0; j < kDigits; ++j) {
      local[j] = sum;
      sum += counts[t * kDigits + j];
    }
    uint32_t total = 0;
    const uint32_t offset = block_exclusive_scan(sum, scan_shared, &total);
    __syncthreads();
    for (int j = 0; j < kDigits; ++j) counts[t * kDigits + j] = offset + local[j];
    __syncthreads();
    for (int d = 0; d < kDigits; ++d) mine[d] = counts[d * kSortThreads + t];
    for (int32_t i = lo; i < hi; ++i) {
      const uint64_t pair = src[i];
      dst[mine[(sort_key(pair) >> shift) & (kDigits - 1)]++] = pair;
    }
    __syncthreads();  // dst complete (global writes are visible to the block after the barrier)
    uint64_t* swap = src;
    src = dst;
    dst = swap;
  }
  // Runs: a new one wherever the key changes.
  uint32_t starts = 0;
  for (int32_t i = lo; i < hi; ++i) starts += i == 0 || sort_key(src[i]) != sort_key(src[i - 1]);
  uint32_t total = 0;
  uint32_t run = block_exclusive_scan(starts, scan_shared, &total);
  for (int32_t i = lo; i < hi; ++i) {
    order[i] = static_cast<int32_t>(static_cast<uint32_t>(src[i]));
    if (i == 0 || sort_key(src[i]) != sort_key(src[i - 1])) run_starts[run++] = i;
  }
  if (t == 0) {
    *n_runs = static_cast<int32_t>(total);
    run_starts[total] = n;
  }
}

// One block per run of equal tokens (the grid has one block per position, at least as many as
// runs; the rest return). Each thread owns kVec channels of the dtable row and adds the run's dout
// rows to it one after another, in order of position, exactly as a sequential loop over n would;
// no other block touches this row.
template <int kVec>
__global__ void embedding_backward_kernel(float* dtable, const bf16* dout, const int32_t* tokens, const int32_t* order,
                                          const int32_t* run_starts, const int32_t* n_runs, int32_t vocab,
                                          int64_t channels) {
  if (static_cast<int32_t>(blockIdx.x) >= *n_runs) return;
  const int32_t begin = run_starts[blockIdx.x], end = run_starts[blockIdx.x + 1];
  const int32_t token = tokens[order[begin]];
  if (token < 0 || token >= vocab) return;  // the out-of-vocabulary run
  float* row = dtable + static_cast<int64_t>(token) * channels;
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

size_t embedding_backward_scratch_bytes(int64_t n_tokens) {
  // Two pair arrays, then order (n), run_starts (n + 1) and the run count.
  return 2 * sizeof(uint64_t) * static_cast<size_t>(n_tokens) +
         sizeof(int32_t) * (2 * static_cast<size_t>(n_tokens) + 2);
}

void embedding_backward(float* dtable, const bf16* dout, const int32_t* tokens, int64_t n_tokens, int64_t vocab,
                        int64_t channels, void* scratch, cudaStream_t s) {
  if (n_tokens == 0 || channels == 0) return;
  RT_ASSERT(n_tokens < INT32_MAX && vocab < INT32_MAX, "embedding backward: more than 2^31 tokens or ids");
  auto* a = static_cast<uint64_t*>(scratch);
  uint64_t* b = a + n_tokens;
  auto* order = reinterpret_cast<int32_t*>(b + n_tokens);
  int32_t* run_starts = order + n_tokens;
  int32_t* n_runs = run_starts + n_tokens + 1;
  int key_bits = 1;  // enough for every key in [0, vocab], vocab itself the out-of-range bucket
  while ((int64_t{1} << key_bits) <= vocab) ++key_bits;
  embedding_sort_kernel<<<1, kSortThreads, 0, s>>>(
      order, run_starts, n_runs, a, b, tokens, static_cast<int32_t>(n_tokens), static_cast<int32_t>(vocab), key_bits);
  cudaCheckLaunch();
  const bool vec = channels % 8 == 0 && aligned16(dtable) && aligned16(dout);
  const auto blocks = static_cast<unsigned>(n_tokens);  // at least as many as runs
  if (vec) {
    embedding_backward_kernel<8><<<blocks, threads_for(channels / 8, kMaxThreads), 0, s>>>(
        dtable, dout, tokens, order, run_starts, n_runs, static_cast<int32_t>(vocab), channels);
  } else {
    embedding_backward_kernel<1><<<blocks, threads_for(channels, kMaxThreads), 0, s>>>(
        dtable, dout, tokens, order, run_starts, n_runs, static_cast<int32_t>(vocab), channels);
  }
  cudaCheckLaunch();
}

}  // namespace ranktune::kernels
