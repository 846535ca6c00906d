// Attention of one new query per sequence against its KV cache: the decode step of generation.
//
// Decode is small and memory-bound (B*H query rows, each reading its kv head's n_keys cached rows
// once), so the kernel is split-free: one block per (query head, sequence). Inside a block, the
// head's D dimensions are spread over a team of kTeam threads (8 consecutive dimensions each, one
// 16-byte load per K or V row when aligned), and the block's teams take the keys in turn: key j
// goes to team j % n_teams. Each team keeps an online softmax over its keys (running max, sum of
// exponentials and the weighted sum of V rows) and fetches kKeys keys per iteration before using
// any of them, so that several loads are in flight per thread: with one block per head there are
// few warps per SM, and the loop would otherwise wait on one memory round trip per key.
//
// At the end the teams' partial results are merged through shared memory in team order.
// Determinism: the key-to-team assignment, the team's shuffle tree and the merge order are fixed,
// and there are no atomics, so the same inputs give bitwise the same output.
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <string>

#include "cuda_check.h"
#include "kernels.h"
#include "vec.cuh"

namespace ranktune::kernels {
namespace {

constexpr int kThreads = 256;
constexpr int kPerThread = 8;  // dimensions of the head per thread
constexpr int kKeys = 4;       // keys fetched per team and iteration

// Loads a thread's kPerThread dimensions [d0, d0 + kPerThread) of a row as floats; the dimensions
// at or beyond head_dim read as 0. kVec: head_dim % 8 == 0 and the row is 16-byte aligned.
template <bool kVec>
__device__ __forceinline__ void load_chunk(const bf16* row, int d0, int head_dim, float (&f)[kPerThread]) {
  if constexpr (kVec) {
    if (d0 < head_dim) {
      load_floats<kPerThread>(row + d0, f);
      return;
    }
#pragma unroll
    for (int i = 0; i < kPerThread; ++i) f[i] = 0.f;
  } else {
#pragma unroll
    for (int i = 0; i < kPerThread; ++i) f[i] = d0 + i < head_dim ? __bfloat162float(row[d0 + i]) : 0.f;
  }
}

// Sum over the kTeam lanes of a team (aligned groups of kTeam lanes of one warp); every lane of the
// team gets the same value. All 32 lanes of the warp must call it.
template <int kTeam>
__device__ __forceinline__ float team_sum(float v) {
#pragma unroll
  for (int offset = kTeam / 2; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

template <int kTeam, bool kVec>
__global__ void __launch_bounds__(kThreads)
    attention_decode_kernel(bf16* out, int64_t ld_out, const bf16* q, int64_t ld_q, const bf16* k_cache,
                            const bf16* v_cache, int64_t max_len, int n_keys, int group, int n_kv_heads,
                            int head_dim, float scale) {
  constexpr int kTeams = kThreads / kTeam;
  const int h = blockIdx.x, b = blockIdx.y;
  const int team = threadIdx.x / kTeam;
  const int d0 = (threadIdx.x % kTeam) * kPerThread;
  const int64_t kv_ld = static_cast<int64_t>(n_kv_heads) * head_dim;
  const bf16* k_head = k_cache + b * max_len * kv_ld + static_cast<int64_t>(h / group) * head_dim;
  const bf16* v_head = v_cache + b * max_len * kv_ld + static_cast<int64_t>(h / group) * head_dim;

  float q_chunk[kPerThread], acc[kPerThread];
  load_chunk<kVec>(q + b * ld_q + static_cast<int64_t>(h) * head_dim, d0, head_dim, q_chunk);
#pragma unroll
  for (int i = 0; i < kPerThread; ++i) {
    q_chunk[i] *= scale;
    acc[i] = 0.f;
  }
  float running_max = -INFINITY, running_sum = 0.f;

  // Every thread runs the same number of iterations: a warp holds several teams, and its shuffles
  // need all 32 lanes, including those of a team whose keys ran out.
  for (int base = 0; base < n_keys; base += kTeams * kKeys) {
    float k_rows[kKeys][kPerThread], v_rows[kKeys][kPerThread];
#pragma unroll
    for (int u = 0; u < kKeys; ++u) {
      const int j = base + u * kTeams + team;
      const int64_t row = j < n_keys ? j : 0;  // past the end: any valid row, masked below
      load_chunk<kVec>(k_head + row * kv_ld, d0, head_dim, k_rows[u]);
      load_chunk<kVec>(v_head + row * kv_ld, d0, head_dim, v_rows[u]);
    }
#pragma unroll
    for (int u = 0; u < kKeys; ++u) {
      float dot = 0.f;
#pragma unroll
      for (int i = 0; i < kPerThread; ++i) dot += q_chunk[i] * k_rows[u][i];
      const float score = team_sum<kTeam>(dot);
      if (base + u * kTeams + team >= n_keys) continue;
      const float new_max = fmaxf(running_max, score);
      const float correction = expf(running_max - new_max);  // 0 for the team's first key
      const float p = expf(score - new_max);
      running_sum = running_sum * correction + p;
#pragma unroll
      for (int i = 0; i < kPerThread; ++i) acc[i] = acc[i] * correction + p * v_rows[u][i];
      running_max = new_max;
    }
  }

  // Merge the teams, in team order: with M the largest of the teams' maxima m_g and s_g their sums
  // of exponentials, out = sum_g acc_g e^(m_g - M) / sum_g s_g e^(m_g - M). Thread t's chunk lands
  // at t * kPerThread, i.e. team g's dimension d at g * kTeam * kPerThread + d.
  __shared__ float team_acc[kThreads * kPerThread];
  __shared__ float team_max[kTeams], team_sum_exp[kTeams];
#pragma unroll
  for (int i = 0; i < kPerThread; ++i) team_acc[threadIdx.x * kPerThread + i] = acc[i];
  if (threadIdx.x % kTeam == 0) {
    team_max[team] = running_max;
    team_sum_exp[team] = running_sum;
  }
  __syncthreads();
  for (int d = threadIdx.x; d < head_dim; d += kThreads) {
    float max_all = -INFINITY;
    for (int g = 0; g < kTeams; ++g) max_all = fmaxf(max_all, team_max[g]);
    float denom = 0.f, numer = 0.f;
    for (int g = 0; g < kTeams; ++g) {
      const float w = expf(team_max[g] - max_all);  // 0 for a team without keys (max -inf)
      denom += team_sum_exp[g] * w;
      numer += team_acc[g * kTeam * kPerThread + d] * w;
    }
    out[b * ld_out + static_cast<int64_t>(h) * head_dim + d] = __float2bfloat16_rn(numer / denom);
  }
}

template <int kTeam>
void launch_decode(bool vec, dim3 grid, bf16* out, int64_t ld_out, const bf16* q, int64_t ld_q,
                   const bf16* k_cache, const bf16* v_cache, int64_t max_len, int n_keys, int group,
                   int n_kv_heads, int head_dim, float scale, cudaStream_t s) {
  if (vec)
    attention_decode_kernel<kTeam, true><<<grid, kThreads, 0, s>>>(out, ld_out, q, ld_q, k_cache, v_cache, max_len,
                                                                   n_keys, group, n_kv_heads, head_dim, scale);
  else
    attention_decode_kernel<kTeam, false><<<grid, kThreads, 0, s>>>(out, ld_out, q, ld_q, k_cache, v_cache, max_len,
                                                                    n_keys, group, n_kv_heads, head_dim, scale);
  cudaCheckLaunch();
}

}  // namespace

// ---- Kernel launchers ---------------------------------------------------------------------------

void attention_decode(bf16* out, int64_t ld_out, const bf16* q, int64_t ld_q, const bf16* k_cache,
                      const bf16* v_cache, int64_t batch, int64_t max_len, int64_t n_keys,
                      int64_t n_heads, int64_t n_kv_heads, int64_t head_dim, float scale,
                      cudaStream_t s) {
  const std::string shape = "B=" + std::to_string(batch) + " max_len=" + std::to_string(max_len) +
                            " n_keys=" + std::to_string(n_keys) + " H=" + std::to_string(n_heads) +
                            " Hkv=" + std::to_string(n_kv_heads) + " D=" + std::to_string(head_dim);
  RT_ASSERT(head_dim >= 1 && head_dim <= 32 * kPerThread,
            "attention_decode: head_dim must be in 1..256 (" + shape + ")");
  RT_ASSERT(n_kv_heads >= 1 && n_heads % n_kv_heads == 0 && n_heads <= INT32_MAX,
            "attention_decode: heads (" + shape + ")");
  RT_ASSERT(n_keys >= 1 && n_keys <= max_len && max_len <= INT32_MAX, "attention_decode: keys (" + shape + ")");
  RT_ASSERT(batch >= 0 && batch <= 65535, "attention_decode: batch (" + shape + ")");
  RT_ASSERT(ld_q >= n_heads * head_dim && ld_out >= n_heads * head_dim, "attention_decode: row strides (" + shape + ")");
  if (batch == 0 || n_heads == 0) return;
  // The team: the power of two of threads that covers head_dim with 8 dimensions each.
  const int64_t chunks = (head_dim + kPerThread - 1) / kPerThread;
  int team = 1;
  while (team < chunks) team *= 2;
  const bool vec = head_dim % 8 == 0 && ld_q % 8 == 0 && aligned16(q) && aligned16(k_cache) && aligned16(v_cache);
  const dim3 grid(static_cast<unsigned>(n_heads), static_cast<unsigned>(batch));
  const int group = static_cast<int>(n_heads / n_kv_heads), keys = static_cast<int>(n_keys);
  const int hkv = static_cast<int>(n_kv_heads), d = static_cast<int>(head_dim);
  switch (team) {
    case 1: launch_decode<1>(vec, grid, out, ld_out, q, ld_q, k_cache, v_cache, max_len, keys, group, hkv, d, scale, s); break;
    case 2: launch_decode<2>(vec, grid, out, ld_out, q, ld_q, k_cache, v_cache, max_len, keys, group, hkv, d, scale, s); break;
    case 4: launch_decode<4>(vec, grid, out, ld_out, q, ld_q, k_cache, v_cache, max_len, keys, group, hkv, d, scale, s); break;
    case 8: launch_decode<8>(vec, grid, out, ld_out, q, ld_q, k_cache, v_cache, max_len, keys, group, hkv, d, scale, s); break;
    case 16: launch_decode<16>(vec, grid, out, ld_out, q, ld_q, k_cache, v_cache, max_len, keys, group, hkv, d, scale, s); break;
    default: launch_decode<32>(vec, grid, out, ld_out, q, ld_q, k_cache, v_cache, max_len, keys, group, hkv, d, scale, s); break;
  }
}

}  // namespace ranktune::kernels
