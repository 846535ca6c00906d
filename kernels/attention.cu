// Flash-style causal grouped-query attention, forward and backward (FlashAttention-2 structure).
//
// Layout: q/k/v/out/dq/dk/dv are row-major [B*T, *] with row n = b*T + t and head h in columns
// [h*D, (h+1)*D); they are column slices of fused matrices, so rows are strided and a head's first
// element need not be 16-byte aligned. lse is [B, H, T] fp32 (natural log).
//
// All matrix products run on the tensor cores through mma.sync m16n8k16 (bf16 in, fp32 accumulate),
// with operands fetched from shared memory by ldmatrix. The fragment layouts are those of the PTX ISA
// ("Matrix fragments for mma.m16n8k16"); with lane = 4*g + tq (g = lane/4, tq = lane%4):
//   A 16x16: a0 (row g, cols 2tq..+1) a1 (row g+8, cols 2tq..) a2 (row g, cols 2tq+8..) a3 (row g+8, ..)
//   B 16x8 : b0 (k rows 2tq..+1, col g)  b1 (k rows 2tq+8..+9, col g)
//   C 16x8 : c0,c1 (row g, cols 2tq..+1)  c2,c3 (row g+8, cols 2tq..+1)
// so the C fragments of two adjacent 8-column tiles of scores are exactly the A fragment of the next
// product (P V, dS K, ...): probabilities never leave registers.
//
// head_dim: the kernels are templated on DP, D rounded up to 32, 64, 128 or 256; columns D..DP-1 of
// every shared-memory tile are zero, so they add nothing to dot products and are never stored.
// D = 64 and 128 are the tuned configurations; the others exist for correctness.
//
// Work order: causal tiles differ in cost by up to T/BM times, so each grid is flat and ordered
// heaviest tile first across all heads and batches (not per head): the light tiles then fill the
// tail of the last wave. This alone was worth 15-35% at B=2, T=2048.
//
// Measured on one H100 SXM (B=2, T=2048, causal; FLOPs counted as 4*B*H*T*T*D/2 forward and 2.5x
// that backward): D=64, H=32, Hkv=8: forward 222 TFLOP/s, backward 171; D=128, H=16, Hkv=4: forward
// 230, backward 132 (its dK/dV grid is only 256 blocks). At T=4096-8192: forward 255-273,
// backward 193-205.
//
// Determinism: no atomics. Every output element is produced by exactly one thread that accumulates
// its terms in a fixed order (key tiles, then query heads and tiles, in loop order), and the
// cross-lane reductions are fixed shuffle trees. The backward pass therefore recomputes the scores
// twice: once in the dK/dV kernel (one block per key tile, looping over queries) and once in the dQ
// kernel (one block per query tile, looping over keys), instead of FlashAttention-2's atomicAdd on dQ.
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <string>

#include "kernels.h"
#include "ranktune/error.h"

namespace ranktune::kernels {
namespace {

#define ATTN_CUDA_CHECK(call)                                                                  \
  do {                                                                                         \
    const cudaError_t err_ = (call);                                                           \
    if (err_ != cudaSuccess)                                                                   \
      ::ranktune::assert_fail(#call, __FILE__, __LINE__, cudaGetErrorString(err_));            \
  } while (0)

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;
constexpr float kInf = __builtin_huge_valf();
constexpr unsigned kFullMask = 0xffffffffu;

// Shared-memory tiles are [rows][DP + kPad] bf16: the 16 bytes of padding put the eight row
// addresses of each ldmatrix 8x8 load in different bank groups, so loads are conflict-free without
// a swizzle.
constexpr int kPad = 8;

// ---- PTX wrappers --------------------------------------------------------------------------------

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// Shared-memory operands are passed as 32-bit shared-window byte addresses: one register per
// address, and the per-fragment offsets are compile-time constants that fold into the instruction.
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

// c += a * b for one 16x8x16 tile.
__device__ __forceinline__ void mma_16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                          uint32_t b1) {
  asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
      "{%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// 16-byte global -> shared copy that bypasses registers; with valid == false it writes zeros (the
// source is not read).
__device__ __forceinline__ void cp_async_16(uint32_t dst, const bf16* src, bool valid) {
  const int src_bytes = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src),
               "r"(src_bytes)
               : "memory");
}
// 4-byte variant (through L1), for per-row statistics and doc ids; zero-fills when !valid.
__device__ __forceinline__ void cp_async_4(void* dst, const void* src, bool valid) {
  const int src_bytes = valid ? 4 : 0;
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(smem_addr(dst)), "l"(src),
               "r"(src_bytes)
               : "memory");
}
__device__ __forceinline__ void cp_async_commit() {
  asm volatile("cp.async.commit_group;\n" ::: "memory");
}
// Waits until at most n of this thread's committed groups are still in flight.
template <int n>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(n) : "memory");
}

// 2^x; ex2.approx maps -inf to +0, which is how masked scores vanish.
__device__ __forceinline__ float exp2_approx(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}

__device__ __forceinline__ uint32_t pack_bf16(float lo, float hi) {
  const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);  // lo in the low half
  return *reinterpret_cast<const uint32_t*>(&v);
}

// ---- tiles and fragments -------------------------------------------------------------------------

// Copies rows [row0, row0 + ROWS) and columns [0, DP) of one head's slice g (row stride ld) into a
// shared tile with pitch DP + kPad. Rows >= n_rows and columns >= d are zero-filled. With vec the
// copy is asynchronous (cp.async, caller commits and waits); without, it is synchronous and needs
// only the caller's __syncthreads.
template <int ROWS, int DP, int THREADS>
__device__ __forceinline__ void load_tile(bf16* tile, const bf16* g, int64_t ld, int row0,
                                          int n_rows, int d, bool vec) {
  constexpr int kPitch = DP + kPad;
  if (vec) {  // d % 8 == 0, ld % 8 == 0 and g 16-byte aligned: whole 8-element chunks
    constexpr int kChunksPerRow = DP / 8;
    constexpr int kChunks = ROWS * kChunksPerRow;
    const uint32_t tile_addr = smem_addr(tile);
#pragma unroll
    for (int i0 = 0; i0 < kChunks; i0 += THREADS) {
      const int i = i0 + static_cast<int>(threadIdx.x);
      if (kChunks % THREADS == 0 || i < kChunks) {
        const int r = i / kChunksPerRow;
        const int c = (i % kChunksPerRow) * 8;
        const bool valid = row0 + r < n_rows && c < d;
        const bf16* src = valid ? g + static_cast<int64_t>(row0 + r) * ld + c : g;
        cp_async_16(tile_addr + (r * kPitch + c) * sizeof(bf16), src, valid);
      }
    }
  } else {
    const bf16 zero = __float2bfloat16(0.f);
#pragma unroll 4
    for (int i = static_cast<int>(threadIdx.x); i < ROWS * DP; i += THREADS) {
      const int r = i / DP;
      const int c = i % DP;
      tile[r * kPitch + c] =
          row0 + r < n_rows && c < d ? g[static_cast<int64_t>(row0 + r) * ld + c] : zero;
    }
  }
}

// acc[m][n] = A B^T over the full DP: A has MW 16-row tiles starting at row a_row0 of the shared
// tile sA (or, with A_IN_REGS, fragments preloaded in a_regs), B is the shared tile sB whose first
// NCOLS rows are the columns of the product. ldmatrix without .trans gives B fragments directly
// because B^T is stored row-major.
template <int DP, int MW, int NCOLS, bool A_IN_REGS>
__device__ __forceinline__ void gemm_abt(float (&acc)[MW][NCOLS / 8][4],
                                         const uint32_t (&a_regs)[MW][A_IN_REGS ? DP / 16 : 1][4],
                                         uint32_t sA, int a_row0, uint32_t sB, int lane) {
  constexpr uint32_t kRow = (DP + kPad) * sizeof(bf16);
  const uint32_t a_addr = sA + (a_row0 + (lane & 15)) * kRow + (lane >> 4) * 16;
  // B matrices: (cols 0-7, k 0-7) (cols 0-7, k 8-15) (cols 8-15, k 0-7) (cols 8-15, k 8-15)
  const uint32_t b_addr = sB + ((lane & 7) + ((lane >> 4) << 3)) * kRow + ((lane >> 3) & 1) * 16;
#pragma unroll
  for (int m = 0; m < MW; ++m)
#pragma unroll
    for (int n = 0; n < NCOLS / 8; ++n) acc[m][n][0] = acc[m][n][1] = acc[m][n][2] = acc[m][n][3] = 0.f;
#pragma unroll
  for (int kk = 0; kk < DP / 16; ++kk) {
    uint32_t a[MW][4];
#pragma unroll
    for (int m = 0; m < MW; ++m) {
      if constexpr (A_IN_REGS) {
#pragma unroll
        for (int i = 0; i < 4; ++i) a[m][i] = a_regs[m][kk][i];
      } else {
        ldmatrix_x4(a[m], a_addr + m * 16 * kRow + kk * 32);
      }
    }
#pragma unroll
    for (int np = 0; np < NCOLS / 16; ++np) {
      uint32_t b[4];
      ldmatrix_x4(b, b_addr + np * 16 * kRow + kk * 32);
#pragma unroll
      for (int m = 0; m < MW; ++m) {
        mma_16816(acc[m][2 * np], a[m], b[0], b[1]);
        mma_16816(acc[m][2 * np + 1], a[m], b[2], b[3]);
      }
    }
  }
}

// Loads the A fragments of MW 16-row tiles (rows a_row0.. of sA) for every 16-wide k step.
template <int DP, int MW>
__device__ __forceinline__ void load_a_frags(uint32_t (&a)[MW][DP / 16][4], uint32_t sA,
                                             int a_row0, int lane) {
  constexpr uint32_t kRow = (DP + kPad) * sizeof(bf16);
  const uint32_t a_addr = sA + (a_row0 + (lane & 15)) * kRow + (lane >> 4) * 16;
#pragma unroll
  for (int m = 0; m < MW; ++m)
#pragma unroll
    for (int kk = 0; kk < DP / 16; ++kk) ldmatrix_x4(a[m][kk], a_addr + m * 16 * kRow + kk * 32);
}

// acc[m] += P B[:, n0 : n0 + NOUT] where P (MW 16-row tiles x KDIM) is given as fp32 accumulator
// fragments (rounded to bf16 here) and B is the shared tile sB, KDIM rows stored row-major (the
// .trans ldmatrix turns its rows into the k dimension).
template <int DP, int MW, int KDIM, int NOUT>
__device__ __forceinline__ void gemm_pb(float (&acc)[MW][NOUT / 8][4],
                                        const float (&p)[MW][KDIM / 8][4], uint32_t sB, int n0,
                                        int lane) {
  constexpr uint32_t kRow = (DP + kPad) * sizeof(bf16);
  // B matrices: (k 0-7, n 0-7) (k 8-15, n 0-7) (k 0-7, n 8-15) (k 8-15, n 8-15), transposed
  const uint32_t b_addr =
      sB + ((lane & 7) + ((lane >> 3) & 1) * 8) * kRow + (n0 + (lane >> 4) * 8) * sizeof(bf16);
#pragma unroll
  for (int kk = 0; kk < KDIM / 16; ++kk) {
    uint32_t a[MW][4];
#pragma unroll
    for (int m = 0; m < MW; ++m) {
      a[m][0] = pack_bf16(p[m][2 * kk][0], p[m][2 * kk][1]);
      a[m][1] = pack_bf16(p[m][2 * kk][2], p[m][2 * kk][3]);
      a[m][2] = pack_bf16(p[m][2 * kk + 1][0], p[m][2 * kk + 1][1]);
      a[m][3] = pack_bf16(p[m][2 * kk + 1][2], p[m][2 * kk + 1][3]);
    }
#pragma unroll
    for (int np = 0; np < NOUT / 16; ++np) {
      uint32_t b[4];
      ldmatrix_x4_trans(b, b_addr + kk * 16 * kRow + np * 32);
#pragma unroll
      for (int m = 0; m < MW; ++m) {
        mma_16816(acc[m][2 * np], a[m], b[0], b[1]);
        mma_16816(acc[m][2 * np + 1], a[m], b[2], b[3]);
      }
    }
  }
}

// Stores columns col, col+1 of a row (skipping those >= d); paired when the 4-byte store is aligned.
__device__ __forceinline__ void store_pair(bf16* row, int col, int d, float v0, float v1,
                                           bool paired) {
  if (paired && col + 1 < d) {
    *reinterpret_cast<__nv_bfloat162*>(row + col) = __floats2bfloat162_rn(v0, v1);
  } else {
    if (col < d) row[col] = __float2bfloat16(v0);
    if (col + 1 < d) row[col + 1] = __float2bfloat16(v1);
  }
}

// Document bounds in a row of non-decreasing doc ids: the first index with docs[t]'s id, and one past
// the last.
__device__ __forceinline__ int doc_begin(const int32_t* docs, int t) {
  const int32_t id = docs[t];
  int lo = 0, hi = t;
  while (lo < hi) {
    const int mid = (lo + hi) / 2;
    if (docs[mid] < id) lo = mid + 1; else hi = mid;
  }
  return lo;
}
__device__ __forceinline__ int doc_end(const int32_t* docs, int t, int n) {
  const int32_t id = docs[t];
  int lo = t, hi = n - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (docs[mid] > id) hi = mid - 1; else lo = mid;
  }
  return lo + 1;
}

// Inputs common to all kernels (the launcher fills it from AttnArgs).
struct AttnParams {
  const bf16* q;
  const bf16* k;
  const bf16* v;
  int64_t ld_q, ld_k, ld_v;
  const int32_t* docs;  // [B*T] or null
  int B, T, H, Hkv, D;
  float scale;       // softmax scale
  float scale_log2;  // scale * log2(e): scores are exponentiated with exp2
  bool vec;          // every tile input may be loaded with 16-byte cp.async
};

// ---- forward -------------------------------------------------------------------------------------
//
// Block: WARPS warps, each owning MW 16-row tiles of queries (BM = 16 * MW * WARPS rows); one block
// per (query tile, head, batch), heaviest (last) query tiles first. The block walks its key tiles of
// BN keys from the diagonal down to the start of the first row's document, with K/V double-buffered
// in shared memory (the next tile is in flight while the current one is used). Online softmax
// statistics are kept in log2 units: m = max(score) * scale * log2(e).

template <int DP_, int WARPS_, int MW_, int BN_, bool Q_IN_REGS_, int MIN_BLOCKS_ = 1>
struct FwdConfig {
  static constexpr int DP = DP_, WARPS = WARPS_, MW = MW_, BN = BN_, MIN_BLOCKS = MIN_BLOCKS_;
  static constexpr bool Q_IN_REGS = Q_IN_REGS_;
  static constexpr int THREADS = 32 * WARPS, BM = 16 * MW * WARPS, PITCH = DP + kPad;
  static constexpr size_t kSmemBytes =
      sizeof(bf16) * PITCH * (BM + 4 * BN) + sizeof(int32_t) * 2 * BN;
};

template <class C>
__global__ void __launch_bounds__(C::THREADS, C::MIN_BLOCKS)
    attention_forward_kernel(AttnParams p, bf16* out, int64_t ld_out, bool out_paired, float* lse) {
  constexpr int DP = C::DP, MW = C::MW, BN = C::BN, BM = C::BM, PITCH = C::PITCH;
  extern __shared__ __align__(16) unsigned char smem[];
  bf16* sQ = reinterpret_cast<bf16*>(smem);
  bf16* sK = sQ + BM * PITCH;   // [2][BN][PITCH]
  bf16* sV = sK + 2 * BN * PITCH;  // [2][BN][PITCH]
  int32_t* sDoc = reinterpret_cast<int32_t*>(sV + 2 * BN * PITCH);  // [2][BN] key doc ids

  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int g = lane / 4, tq = lane % 4;
  const int T = p.T, D = p.D;
  // Flat grid, heaviest (last) query tiles of every (head, batch) first, heads fastest.
  const int n_tiles = (p.T + BM - 1) / BM;
  const int hb = static_cast<int>(blockIdx.x % (p.H * p.B));
  const int h = hb % p.H, b = hb / p.H;
  const int q_start = (n_tiles - 1 - static_cast<int>(blockIdx.x / (p.H * p.B))) * BM;
  const int hk = h / (p.H / p.Hkv);
  const int64_t row_base = static_cast<int64_t>(b) * T;
  const bf16* gq = p.q + row_base * p.ld_q + static_cast<int64_t>(h) * D;
  const bf16* gk = p.k + row_base * p.ld_k + static_cast<int64_t>(hk) * D;
  const bf16* gv = p.v + row_base * p.ld_v + static_cast<int64_t>(hk) * D;
  const int32_t* docs = p.docs ? p.docs + row_base : nullptr;

  const int q_last = min(q_start + BM, T) - 1;
  const int kv_begin = docs ? doc_begin(docs, q_start) : 0;
  const int tile_begin = kv_begin / BN, tile_end = q_last / BN + 1;
  const int warp_row0 = warp * 16 * MW;  // within the query tile
  const int32_t last_row_doc = docs ? docs[q_last] : 0;

  int32_t row_doc[MW][2];
#pragma unroll
  for (int m = 0; m < MW; ++m)
#pragma unroll
    for (int r = 0; r < 2; ++r)
      row_doc[m][r] = docs ? docs[min(q_start + warp_row0 + m * 16 + g + 8 * r, T - 1)] : 0;

  auto load_kv = [&](int tile, int stage) {
    load_tile<BN, DP, C::THREADS>(sK + stage * BN * PITCH, gk, p.ld_k, tile * BN, T, D, p.vec);
    load_tile<BN, DP, C::THREADS>(sV + stage * BN * PITCH, gv, p.ld_v, tile * BN, T, D, p.vec);
    if (docs)
      for (int i = threadIdx.x; i < BN; i += C::THREADS)
        cp_async_4(&sDoc[stage * BN + i], &docs[min(tile * BN + i, T - 1)], true);
  };

  load_tile<BM, DP, C::THREADS>(sQ, gq, p.ld_q, q_start, T, D, p.vec);
  load_kv(tile_end - 1, 0);
  cp_async_commit();

  uint32_t q_frag[MW][C::Q_IN_REGS ? DP / 16 : 1][4];
  float o[MW][DP / 8][4];
  float row_max[MW][2], row_sum[MW][2];  // row_sum: this thread's partial (its 2 columns per tile)
#pragma unroll
  for (int m = 0; m < MW; ++m) {
#pragma unroll
    for (int n = 0; n < DP / 8; ++n) o[m][n][0] = o[m][n][1] = o[m][n][2] = o[m][n][3] = 0.f;
    row_max[m][0] = row_max[m][1] = -kInf;
    row_sum[m][0] = row_sum[m][1] = 0.f;
  }

  for (int tile = tile_end - 1, it = 0; tile >= tile_begin; --tile, ++it) {
    const int stage = it & 1;
    if (tile > tile_begin) load_kv(tile - 1, stage ^ 1);
    cp_async_commit();
    cp_async_wait<1>();  // everything but the prefetch just issued has landed
    __syncthreads();
    if constexpr (C::Q_IN_REGS) {
      if (it == 0) load_a_frags<DP, MW>(q_frag, smem_addr(sQ), warp_row0, lane);
    }
    const uint32_t sKs = smem_addr(sK + stage * BN * PITCH);
    const uint32_t sVs = smem_addr(sV + stage * BN * PITCH);
    const int kv0 = tile * BN;

    float s[MW][BN / 8][4];
    gemm_abt<DP, MW, BN, C::Q_IN_REGS>(s, q_frag, smem_addr(sQ), warp_row0, sKs, lane);

    // Masking is needed where some key may follow some query (the diagonal tiles), or where the
    // keys and queries are not all in one document (ids are non-decreasing, so comparing the
    // first key with the last query suffices once the tile is below the diagonal).
    const bool doc_mixed = docs && sDoc[stage * BN] != last_row_doc;
    if (kv0 + BN - 1 > q_start || doc_mixed) {
#pragma unroll
      for (int m = 0; m < MW; ++m)
#pragma unroll
        for (int n = 0; n < BN / 8; ++n)
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int row = q_start + warp_row0 + m * 16 + g + 8 * (e >> 1);
            const int kcol = n * 8 + 2 * tq + (e & 1);
            const int key = kv0 + kcol;
            bool ok = key <= row && key < T;
            if (docs) ok = ok && sDoc[stage * BN + kcol] == row_doc[m][e >> 1];
            if (!ok) s[m][n][e] = -kInf;
          }
    }

    // Online softmax. A row whose keys are all masked so far has max -inf; it uses 0 as the
    // reference so that exp2 gives 0 instead of NaN.
#pragma unroll
    for (int m = 0; m < MW; ++m)
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        float mx = -kInf;
#pragma unroll
        for (int n = 0; n < BN / 8; ++n) mx = fmaxf(mx, fmaxf(s[m][n][2 * r], s[m][n][2 * r + 1]));
        mx = fmaxf(mx, __shfl_xor_sync(kFullMask, mx, 1));
        mx = fmaxf(mx, __shfl_xor_sync(kFullMask, mx, 2));
        const float m_new = fmaxf(row_max[m][r], mx * p.scale_log2);
        const float m_ref = m_new == -kInf ? 0.f : m_new;
        const float correction = exp2_approx(row_max[m][r] - m_ref);
        row_max[m][r] = m_new;
        float sum = row_sum[m][r] * correction;
#pragma unroll
        for (int n = 0; n < DP / 8; ++n) {
          o[m][n][2 * r] *= correction;
          o[m][n][2 * r + 1] *= correction;
        }
#pragma unroll
        for (int n = 0; n < BN / 8; ++n)
#pragma unroll
          for (int e = 2 * r; e < 2 * r + 2; ++e) {
            const float pr = exp2_approx(fmaf(s[m][n][e], p.scale_log2, -m_ref));
            s[m][n][e] = pr;
            sum += pr;
          }
        row_sum[m][r] = sum;
      }

    gemm_pb<DP, MW, BN, DP>(o, s, sVs, 0, lane);
    __syncthreads();  // this stage is refilled by the next iteration's prefetch
  }

  // Epilogue: normalise and store straight from the accumulator fragments.
#pragma unroll
  for (int m = 0; m < MW; ++m)
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      float sum = row_sum[m][r];
      sum += __shfl_xor_sync(kFullMask, sum, 1);
      sum += __shfl_xor_sync(kFullMask, sum, 2);
      const int row = q_start + warp_row0 + m * 16 + g + 8 * r;
      if (row >= T) continue;
      const float inv = sum > 0.f ? 1.f / sum : 0.f;
      bf16* orow = out + (row_base + row) * ld_out + static_cast<int64_t>(h) * D;
#pragma unroll
      for (int n = 0; n < DP / 8; ++n)
        store_pair(orow, n * 8 + 2 * tq, D, o[m][n][2 * r] * inv, o[m][n][2 * r + 1] * inv,
                   out_paired);
      if (tq == 0)
        lse[(static_cast<int64_t>(b) * p.H + h) * T + row] =
            sum > 0.f ? (row_max[m][r] + log2f(sum)) * kLn2 : -kInf;
    }
}

// ---- backward ------------------------------------------------------------------------------------
//
// With P = exp(scale * Q K^T - lse) recomputed from the saved lse:
//   dV = P^T dO,  dP = dO V^T,  dS = P * (dP - Delta),  Delta_i = rowsum(dO_i * O_i),
//   dK = scale * dS^T Q,  dQ = scale * dS K.

// Delta[b, h, t] = sum_d dO * O in fp32, one warp per (row, head), a fixed shuffle tree; also
// lse2 = lse * log2(e), the form the dK/dV kernel streams into shared memory.
__global__ void attention_delta_kernel(float* delta, float* lse2, const float* lse,
                                       const bf16* dout, int64_t ld_dout, const bf16* out,
                                       int64_t ld_out, int64_t n_rows, int T, int H, int D) {
  const int64_t item = static_cast<int64_t>(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (item >= n_rows * H) return;
  const int64_t n = item / H;
  const int h = static_cast<int>(item % H);
  const bf16* drow = dout + n * ld_dout + static_cast<int64_t>(h) * D;
  const bf16* orow = out + n * ld_out + static_cast<int64_t>(h) * D;
  float acc = 0.f;
  for (int d = lane; d < D; d += 32) acc += __bfloat162float(drow[d]) * __bfloat162float(orow[d]);
#pragma unroll
  for (int off = 16; off > 0; off /= 2) acc += __shfl_xor_sync(kFullMask, acc, off);
  if (lane == 0) {
    const int64_t b = n / T, t = n % T;
    delta[(b * H + h) * T + t] = acc;
    lse2[(b * H + h) * T + t] = lse[(b * H + h) * T + t] * kLog2e;
  }
}

// dQ: one block per (query tile, head, batch), like the forward; each warp owns 16 * MW query rows
// and walks the key tiles (double-buffered K/V) accumulating dS K in registers.
template <int DP_, int WARPS_, int MW_, int BN_, bool A_IN_REGS_, int MIN_BLOCKS_ = 1>
struct DqConfig {
  static constexpr int DP = DP_, WARPS = WARPS_, MW = MW_, BN = BN_, MIN_BLOCKS = MIN_BLOCKS_;
  static constexpr bool A_IN_REGS = A_IN_REGS_;  // Q and dO fragments held in registers
  static constexpr int THREADS = 32 * WARPS, BM = 16 * MW * WARPS, PITCH = DP + kPad;
  static constexpr size_t kSmemBytes =
      sizeof(bf16) * PITCH * (2 * BM + 4 * BN) + sizeof(int32_t) * 2 * BN;
};

template <class C>
__global__ void __launch_bounds__(C::THREADS, C::MIN_BLOCKS)
    attention_dq_kernel(AttnParams p, const bf16* dout, int64_t ld_dout, const float* lse2,
                        const float* delta, bf16* dq, int64_t ld_dq, bool dq_paired) {
  constexpr int DP = C::DP, MW = C::MW, BN = C::BN, BM = C::BM, PITCH = C::PITCH;
  extern __shared__ __align__(16) unsigned char smem[];
  bf16* sQ = reinterpret_cast<bf16*>(smem);
  bf16* sdO = sQ + BM * PITCH;
  bf16* sK = sdO + BM * PITCH;     // [2][BN][PITCH]
  bf16* sV = sK + 2 * BN * PITCH;  // [2][BN][PITCH]
  int32_t* sDoc = reinterpret_cast<int32_t*>(sV + 2 * BN * PITCH);

  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int g = lane / 4, tq = lane % 4;
  const int T = p.T, D = p.D;
  // Flat grid, heaviest (last) query tiles of every (head, batch) first, heads fastest.
  const int n_tiles = (p.T + BM - 1) / BM;
  const int hb = static_cast<int>(blockIdx.x % (p.H * p.B));
  const int h = hb % p.H, b = hb / p.H;
  const int q_start = (n_tiles - 1 - static_cast<int>(blockIdx.x / (p.H * p.B))) * BM;
  const int hk = h / (p.H / p.Hkv);
  const int64_t row_base = static_cast<int64_t>(b) * T;
  const int64_t stat_base = (static_cast<int64_t>(b) * p.H + h) * T;
  const bf16* gq = p.q + row_base * p.ld_q + static_cast<int64_t>(h) * D;
  const bf16* gdo = dout + row_base * ld_dout + static_cast<int64_t>(h) * D;
  const bf16* gk = p.k + row_base * p.ld_k + static_cast<int64_t>(hk) * D;
  const bf16* gv = p.v + row_base * p.ld_v + static_cast<int64_t>(hk) * D;
  const int32_t* docs = p.docs ? p.docs + row_base : nullptr;

  const int q_last = min(q_start + BM, T) - 1;
  const int kv_begin = docs ? doc_begin(docs, q_start) : 0;
  const int tile_begin = kv_begin / BN, tile_end = q_last / BN + 1;
  const int warp_row0 = warp * 16 * MW;
  const int32_t last_row_doc = docs ? docs[q_last] : 0;

  // Per-row statistics; rows past T get lse = +inf, so their probabilities are exactly 0.
  int32_t row_doc[MW][2];
  float row_lse2[MW][2], row_delta[MW][2];
#pragma unroll
  for (int m = 0; m < MW; ++m)
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int row = q_start + warp_row0 + m * 16 + g + 8 * r;
      row_doc[m][r] = docs ? docs[min(row, T - 1)] : 0;
      row_lse2[m][r] = row < T ? lse2[stat_base + row] : kInf;
      row_delta[m][r] = row < T ? delta[stat_base + row] : 0.f;
    }

  auto load_kv = [&](int tile, int stage) {
    load_tile<BN, DP, C::THREADS>(sK + stage * BN * PITCH, gk, p.ld_k, tile * BN, T, D, p.vec);
    load_tile<BN, DP, C::THREADS>(sV + stage * BN * PITCH, gv, p.ld_v, tile * BN, T, D, p.vec);
    if (docs)
      for (int i = threadIdx.x; i < BN; i += C::THREADS)
        cp_async_4(&sDoc[stage * BN + i], &docs[min(tile * BN + i, T - 1)], true);
  };

  load_tile<BM, DP, C::THREADS>(sQ, gq, p.ld_q, q_start, T, D, p.vec);
  load_tile<BM, DP, C::THREADS>(sdO, gdo, ld_dout, q_start, T, D, p.vec);
  load_kv(tile_end - 1, 0);
  cp_async_commit();

  uint32_t q_frag[MW][C::A_IN_REGS ? DP / 16 : 1][4];
  uint32_t do_frag[MW][C::A_IN_REGS ? DP / 16 : 1][4];
  float acc[MW][DP / 8][4];
#pragma unroll
  for (int m = 0; m < MW; ++m)
#pragma unroll
    for (int n = 0; n < DP / 8; ++n) acc[m][n][0] = acc[m][n][1] = acc[m][n][2] = acc[m][n][3] = 0.f;

  for (int tile = tile_end - 1, it = 0; tile >= tile_begin; --tile, ++it) {
    const int stage = it & 1;
    if (tile > tile_begin) load_kv(tile - 1, stage ^ 1);
    cp_async_commit();
    cp_async_wait<1>();
    __syncthreads();
    if constexpr (C::A_IN_REGS) {
      if (it == 0) {
        load_a_frags<DP, MW>(q_frag, smem_addr(sQ), warp_row0, lane);
        load_a_frags<DP, MW>(do_frag, smem_addr(sdO), warp_row0, lane);
      }
    }
    const uint32_t sKs = smem_addr(sK + stage * BN * PITCH);
    const uint32_t sVs = smem_addr(sV + stage * BN * PITCH);
    const int kv0 = tile * BN;

    float s[MW][BN / 8][4];
    gemm_abt<DP, MW, BN, C::A_IN_REGS>(s, q_frag, smem_addr(sQ), warp_row0, sKs, lane);
    const bool doc_mixed = docs && sDoc[stage * BN] != last_row_doc;
    const bool need_mask = kv0 + BN - 1 > q_start || doc_mixed;
#pragma unroll
    for (int m = 0; m < MW; ++m)
#pragma unroll
      for (int n = 0; n < BN / 8; ++n)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          float sc = s[m][n][e];
          if (need_mask) {
            const int row = q_start + warp_row0 + m * 16 + g + 8 * (e >> 1);
            const int kcol = n * 8 + 2 * tq + (e & 1);
            const int key = kv0 + kcol;
            bool ok = key <= row && key < T;
            if (docs) ok = ok && sDoc[stage * BN + kcol] == row_doc[m][e >> 1];
            if (!ok) sc = -kInf;
          }
          s[m][n][e] = exp2_approx(fmaf(sc, p.scale_log2, -row_lse2[m][e >> 1]));
        }

    float dp[MW][BN / 8][4];
    gemm_abt<DP, MW, BN, C::A_IN_REGS>(dp, do_frag, smem_addr(sdO), warp_row0, sVs, lane);
#pragma unroll
    for (int m = 0; m < MW; ++m)
#pragma unroll
      for (int n = 0; n < BN / 8; ++n)
#pragma unroll
        for (int e = 0; e < 4; ++e) s[m][n][e] *= dp[m][n][e] - row_delta[m][e >> 1];  // dS

    gemm_pb<DP, MW, BN, DP>(acc, s, sKs, 0, lane);
    __syncthreads();
  }

#pragma unroll
  for (int m = 0; m < MW; ++m)
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int row = q_start + warp_row0 + m * 16 + g + 8 * r;
      if (row >= T) continue;
      bf16* drow = dq + (row_base + row) * ld_dq + static_cast<int64_t>(h) * D;
#pragma unroll
      for (int n = 0; n < DP / 8; ++n)
        store_pair(drow, n * 8 + 2 * tq, D, acc[m][n][2 * r] * p.scale,
                   acc[m][n][2 * r + 1] * p.scale, dq_paired);
    }
}

// dK/dV: one block per (key tile, kv head, batch), key tile 0 (the most work) first. Warp w owns
// 16 * MW keys (key group w % KGROUPS) and accumulates dK, dV for the DP / DSPLIT columns of slice
// w / KGROUPS. MW = 2 lets every Q/dO fragment read from shared memory feed two MMAs, halving the
// shared-memory traffic per MMA; DSPLIT > 1 only for DP = 256, where a full row of dK and dV would
// not fit in registers (the warps of a key group then recompute the same scores). The block loops
// over the query heads of its group and, for each, over query tiles of BM rows from the diagonal
// to the end of the last key's document, with Q/dO/lse2/Delta/doc ids double-buffered by cp.async.
template <int DP_, int WARPS_, int MW_, int DSPLIT_, int BM_, int MIN_BLOCKS_ = 1>
struct DkvConfig {
  static constexpr int DP = DP_, WARPS = WARPS_, MW = MW_, DSPLIT = DSPLIT_, BM = BM_;
  static constexpr int MIN_BLOCKS = MIN_BLOCKS_;
  static constexpr int THREADS = 32 * WARPS, KGROUPS = WARPS / DSPLIT, BN = 16 * MW * KGROUPS;
  static constexpr int DSLICE = DP / DSPLIT, PITCH = DP + kPad;
  static constexpr size_t kSmemBytes =
      sizeof(bf16) * PITCH * (2 * BN + 4 * BM) + sizeof(float) * 2 * BM * 3;
};

template <class C>
__global__ void __launch_bounds__(C::THREADS, C::MIN_BLOCKS)
    attention_dkdv_kernel(AttnParams p, const bf16* dout, int64_t ld_dout, const float* lse2,
                          const float* delta, bf16* dk, int64_t ld_dk, bf16* dv, int64_t ld_dv,
                          bool dkdv_paired) {
  constexpr int DP = C::DP, MW = C::MW, BN = C::BN, BM = C::BM, PITCH = C::PITCH;
  constexpr int DSLICE = C::DSLICE;
  static_assert(DSLICE % 16 == 0 && BM % 16 == 0, "tile shapes must be multiples of 16");
  extern __shared__ __align__(16) unsigned char smem[];
  bf16* sK = reinterpret_cast<bf16*>(smem);
  bf16* sV = sK + BN * PITCH;
  bf16* sQ = sV + BN * PITCH;       // [2][BM][PITCH]
  bf16* sdO = sQ + 2 * BM * PITCH;  // [2][BM][PITCH]
  float* sLse2 = reinterpret_cast<float*>(sdO + 2 * BM * PITCH);  // [2][BM], lse * log2(e)
  float* sDelta = sLse2 + 2 * BM;                                 // [2][BM]
  int32_t* sDoc = reinterpret_cast<int32_t*>(sDelta + 2 * BM);    // [2][BM] query doc ids

  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int g = lane / 4, tq = lane % 4;
  const int key_group = warp % C::KGROUPS, dslice = warp / C::KGROUPS;
  const int T = p.T, D = p.D;
  // Flat grid, heaviest (first) key tiles of every (kv head, batch) first.
  const int hb = static_cast<int>(blockIdx.x % (p.Hkv * p.B));
  const int hk = hb % p.Hkv, b = hb / p.Hkv;
  const int k_start = static_cast<int>(blockIdx.x / (p.Hkv * p.B)) * BN;
  const int group = p.H / p.Hkv;
  const int64_t row_base = static_cast<int64_t>(b) * T;
  const bf16* gk = p.k + row_base * p.ld_k + static_cast<int64_t>(hk) * D;
  const bf16* gv = p.v + row_base * p.ld_v + static_cast<int64_t>(hk) * D;
  const int32_t* docs = p.docs ? p.docs + row_base : nullptr;

  const int k_last = min(k_start + BN, T) - 1;
  const int q_end = docs ? doc_end(docs, k_last, T) : T;
  const int qtile_begin = k_start / BM, n_qtiles = (q_end + BM - 1) / BM - qtile_begin;
  const int n_iters = group * n_qtiles;
  const int warp_key0 = key_group * 16 * MW;  // within the key tile
  const int32_t first_key_doc = docs ? docs[k_start] : 0;

  int32_t key_doc[MW][2];
#pragma unroll
  for (int m = 0; m < MW; ++m)
#pragma unroll
    for (int r = 0; r < 2; ++r)
      key_doc[m][r] = docs ? docs[min(k_start + warp_key0 + m * 16 + g + 8 * r, T - 1)] : 0;

  // Rows past T are zero-filled (dO and Delta 0, and they are masked), so they contribute nothing.
  auto load_q = [&](int it, int stage) {
    const int h = hk * group + it / n_qtiles;
    const int q0 = (qtile_begin + it % n_qtiles) * BM;
    const int64_t stat_base = (static_cast<int64_t>(b) * p.H + h) * T;
    load_tile<BM, DP, C::THREADS>(sQ + stage * BM * PITCH,
                                  p.q + row_base * p.ld_q + static_cast<int64_t>(h) * D, p.ld_q, q0,
                                  T, D, p.vec);
    load_tile<BM, DP, C::THREADS>(sdO + stage * BM * PITCH,
                                  dout + row_base * ld_dout + static_cast<int64_t>(h) * D, ld_dout,
                                  q0, T, D, p.vec);
    for (int i = threadIdx.x; i < BM; i += C::THREADS) {
      const int q = min(q0 + i, T - 1);
      cp_async_4(&sLse2[stage * BM + i], &lse2[stat_base + q], q0 + i < T);
      cp_async_4(&sDelta[stage * BM + i], &delta[stat_base + q], q0 + i < T);
      if (docs) cp_async_4(&sDoc[stage * BM + i], &docs[q], true);
    }
  };

  load_tile<BN, DP, C::THREADS>(sK, gk, p.ld_k, k_start, T, D, p.vec);
  load_tile<BN, DP, C::THREADS>(sV, gv, p.ld_v, k_start, T, D, p.vec);
  load_q(0, 0);
  cp_async_commit();

  float dk_acc[MW][DSLICE / 8][4], dv_acc[MW][DSLICE / 8][4];
#pragma unroll
  for (int m = 0; m < MW; ++m)
#pragma unroll
    for (int n = 0; n < DSLICE / 8; ++n)
#pragma unroll
      for (int e = 0; e < 4; ++e) dk_acc[m][n][e] = dv_acc[m][n][e] = 0.f;
  const uint32_t no_regs[MW][1][4] = {};
  const uint32_t sK_addr = smem_addr(sK), sV_addr = smem_addr(sV);

  for (int it = 0; it < n_iters; ++it) {
    const int stage = it & 1;
    if (it + 1 < n_iters) load_q(it + 1, stage ^ 1);
    cp_async_commit();
    cp_async_wait<1>();
    __syncthreads();
    const uint32_t sQs = smem_addr(sQ + stage * BM * PITCH);
    const uint32_t sdOs = smem_addr(sdO + stage * BM * PITCH);
    const float* lse2_s = sLse2 + stage * BM;
    const float* delta_s = sDelta + stage * BM;
    const int32_t* doc_s = sDoc + stage * BM;
    const int q0 = (qtile_begin + it % n_qtiles) * BM;

    // S^T (keys x queries), then P^T in place. Masking is needed where some key may follow some
    // query, where the tile runs past T, or where keys and queries are not all in one document.
    float s[MW][BM / 8][4];
    gemm_abt<DP, MW, BM, false>(s, no_regs, sK_addr, warp_key0, sQs, lane);
    const bool need_mask = q0 < k_start + BN - 1 || q0 + BM > T ||
                           (docs && first_key_doc != doc_s[BM - 1]);
#pragma unroll
    for (int n = 0; n < BM / 8; ++n) {
      const float2 l2 = *reinterpret_cast<const float2*>(&lse2_s[n * 8 + 2 * tq]);
#pragma unroll
      for (int m = 0; m < MW; ++m)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int qcol = n * 8 + 2 * tq + (e & 1);
          float sc = s[m][n][e];
          if (need_mask) {
            const int key = k_start + warp_key0 + m * 16 + g + 8 * (e >> 1);
            const int q = q0 + qcol;
            bool ok = key <= q && q < T;
            if (docs) ok = ok && doc_s[qcol] == key_doc[m][e >> 1];
            if (!ok) sc = -kInf;
          }
          s[m][n][e] = exp2_approx(fmaf(sc, p.scale_log2, -((e & 1) ? l2.y : l2.x)));
        }
    }

    gemm_pb<DP, MW, BM, DSLICE>(dv_acc, s, sdOs, dslice * DSLICE, lane);  // dV += P^T dO

    float dpt[MW][BM / 8][4];
    gemm_abt<DP, MW, BM, false>(dpt, no_regs, sV_addr, warp_key0, sdOs, lane);  // dP^T = V dO^T
#pragma unroll
    for (int n = 0; n < BM / 8; ++n) {
      const float2 dl = *reinterpret_cast<const float2*>(&delta_s[n * 8 + 2 * tq]);
#pragma unroll
      for (int m = 0; m < MW; ++m)
#pragma unroll
        for (int e = 0; e < 4; ++e) s[m][n][e] *= dpt[m][n][e] - ((e & 1) ? dl.y : dl.x);  // dS^T
    }

    gemm_pb<DP, MW, BM, DSLICE>(dk_acc, s, sQs, dslice * DSLICE, lane);  // dK += dS^T Q
    __syncthreads();
  }

#pragma unroll
  for (int m = 0; m < MW; ++m)
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int key = k_start + warp_key0 + m * 16 + g + 8 * r;
      if (key >= T) continue;
      bf16* krow = dk + (row_base + key) * ld_dk + static_cast<int64_t>(hk) * D;
      bf16* vrow = dv + (row_base + key) * ld_dv + static_cast<int64_t>(hk) * D;
#pragma unroll
      for (int n = 0; n < DSLICE / 8; ++n) {
        const int col = dslice * DSLICE + n * 8 + 2 * tq;
        store_pair(krow, col, D, dk_acc[m][n][2 * r] * p.scale, dk_acc[m][n][2 * r + 1] * p.scale,
                   dkdv_paired);
        store_pair(vrow, col, D, dv_acc[m][n][2 * r], dv_acc[m][n][2 * r + 1], dkdv_paired);
      }
    }
}

// ---- configurations ------------------------------------------------------------------------------
// Chosen by measurement on an H100 at B=2, T=2048 (D=64: H=32, Hkv=8; D=128: H=16, Hkv=4); the
// alternatives tried (8-warp blocks, MW=2 in dK/dV, BN=32 forward tiles, register caps for higher
// occupancy) were slower. Every config uses ~255 registers: the compiler hoists all of a product's
// ldmatrix loads ahead of its MMAs, and trading that ILP for occupancy lost.
//   FwdConfig<DP, warps, MW, BN, Q in registers>   DqConfig<DP, warps, MW, BN, Q/dO in registers>
//   DkvConfig<DP, warps, MW, DSPLIT, BM>
template <int DP> struct Configs;
template <> struct Configs<32> {
  using Fwd = FwdConfig<32, 4, 1, 64, true>;
  using Dq = DqConfig<32, 4, 1, 64, true>;
  using Dkv = DkvConfig<32, 4, 1, 1, 64>;
};
template <> struct Configs<64> {
  using Fwd = FwdConfig<64, 4, 2, 64, true>;
  using Dq = DqConfig<64, 4, 2, 32, true>;
  using Dkv = DkvConfig<64, 4, 1, 1, 64>;
};
template <> struct Configs<128> {
  using Fwd = FwdConfig<128, 4, 1, 64, true>;
  using Dq = DqConfig<128, 4, 1, 32, true>;
  using Dkv = DkvConfig<128, 4, 1, 1, 64>;
};
template <> struct Configs<256> {
  using Fwd = FwdConfig<256, 4, 1, 32, false>;
  using Dq = DqConfig<256, 4, 1, 32, false>;
  using Dkv = DkvConfig<256, 8, 1, 2, 32>;
};

bool aligned(const void* ptr, uintptr_t bytes) {
  return reinterpret_cast<uintptr_t>(ptr) % bytes == 0;
}

// Checks the arguments and fills the kernel-side parameters.
AttnParams make_params(const AttnArgs& a) {
  const std::string shape = "B=" + std::to_string(a.batch) + " T=" + std::to_string(a.seq_len) +
                            " H=" + std::to_string(a.n_heads) + " Hkv=" +
                            std::to_string(a.n_kv_heads) + " D=" + std::to_string(a.head_dim);
  RT_ASSERT(a.head_dim >= 1 && a.head_dim <= 256,
            "attention: head_dim must be in 1..256 (" + shape + ")");
  RT_ASSERT(a.n_kv_heads >= 1 && a.n_heads % a.n_kv_heads == 0,
            "attention: n_kv_heads must divide n_heads (" + shape + ")");
  RT_ASSERT(a.batch >= 0 && a.seq_len >= 0 &&
                (a.seq_len / 16 + 1) * a.n_heads * a.batch < (int64_t{1} << 31),
            "attention: shape out of range for a flat grid (" + shape + ")");
  RT_ASSERT(a.scale > 0.f, "attention: the softmax scale must be positive");
  RT_ASSERT(a.ld_q >= a.n_heads * a.head_dim && a.ld_k >= a.n_kv_heads * a.head_dim &&
                a.ld_v >= a.n_kv_heads * a.head_dim,
            "attention: q/k/v row strides are smaller than the heads they hold");
  AttnParams p{};
  p.q = a.q; p.k = a.k; p.v = a.v;
  p.ld_q = a.ld_q; p.ld_k = a.ld_k; p.ld_v = a.ld_v;
  p.docs = a.doc_ids;
  p.B = static_cast<int>(a.batch);
  p.T = static_cast<int>(a.seq_len);
  p.H = static_cast<int>(a.n_heads);
  p.Hkv = static_cast<int>(a.n_kv_heads);
  p.D = static_cast<int>(a.head_dim);
  p.scale = a.scale;
  p.scale_log2 = a.scale * kLog2e;
  p.vec = a.head_dim % 8 == 0 && a.ld_q % 8 == 0 && a.ld_k % 8 == 0 && a.ld_v % 8 == 0 &&
          aligned(a.q, 16) && aligned(a.k, 16) && aligned(a.v, 16);
  return p;
}

// Whether bf16 pairs (row + even column) of an output are 4-byte aligned.
bool pairs_aligned(const void* ptr, int64_t ld, int64_t d) {
  return aligned(ptr, 4) && ld % 2 == 0 && d % 2 == 0;
}

template <class Kernel>
void set_smem(Kernel kernel, size_t bytes) {
  ATTN_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                       static_cast<int>(bytes)));
}

template <int DP>
void forward_dp(bf16* out, int64_t ld_out, float* lse, const AttnParams& p, cudaStream_t s) {
  using C = typename Configs<DP>::Fwd;
  auto kernel = attention_forward_kernel<C>;
  set_smem(kernel, C::kSmemBytes);
  const unsigned grid = ((p.T + C::BM - 1) / C::BM) * p.H * p.B;
  kernel<<<grid, C::THREADS, C::kSmemBytes, s>>>(p, out, ld_out, pairs_aligned(out, ld_out, p.D),
                                                 lse);
  ATTN_CUDA_CHECK(cudaGetLastError());
}

template <int DP>
void backward_dp(bf16* dq, int64_t ld_dq, bf16* dk, int64_t ld_dk, bf16* dv, int64_t ld_dv,
                 const bf16* dout, int64_t ld_dout, const float* lse2, const float* delta,
                 const AttnParams& p, cudaStream_t s) {
  {
    using C = typename Configs<DP>::Dq;
    auto kernel = attention_dq_kernel<C>;
    set_smem(kernel, C::kSmemBytes);
    const unsigned grid = ((p.T + C::BM - 1) / C::BM) * p.H * p.B;
    kernel<<<grid, C::THREADS, C::kSmemBytes, s>>>(p, dout, ld_dout, lse2, delta, dq, ld_dq,
                                                   pairs_aligned(dq, ld_dq, p.D));
    ATTN_CUDA_CHECK(cudaGetLastError());
  }
  {
    using C = typename Configs<DP>::Dkv;
    auto kernel = attention_dkdv_kernel<C>;
    set_smem(kernel, C::kSmemBytes);
    const unsigned grid = ((p.T + C::BN - 1) / C::BN) * p.Hkv * p.B;
    kernel<<<grid, C::THREADS, C::kSmemBytes, s>>>(
        p, dout, ld_dout, lse2, delta, dk, ld_dk, dv, ld_dv,
        pairs_aligned(dk, ld_dk, p.D) && pairs_aligned(dv, ld_dv, p.D));
    ATTN_CUDA_CHECK(cudaGetLastError());
  }
}

int padded_head_dim(int64_t d) { return d <= 32 ? 32 : d <= 64 ? 64 : d <= 128 ? 128 : 256; }

}  // namespace

// ---- Kernel launchers ----------------------------------------------------------------------------

void attention_forward(bf16* out, int64_t ld_out, float* lse, const AttnArgs& a, cudaStream_t s) {
  const AttnParams p = make_params(a);
  RT_ASSERT(ld_out >= a.n_heads * a.head_dim, "attention_forward: out row stride too small");
  if (a.batch == 0 || a.seq_len == 0) return;
  switch (padded_head_dim(a.head_dim)) {
    case 32: forward_dp<32>(out, ld_out, lse, p, s); break;
    case 64: forward_dp<64>(out, ld_out, lse, p, s); break;
    case 128: forward_dp<128>(out, ld_out, lse, p, s); break;
    default: forward_dp<256>(out, ld_out, lse, p, s); break;
  }
}

size_t attention_backward_scratch_bytes(const AttnArgs& a) {
  // Delta = rowsum(dO * O) and lse * log2(e), each [B, H, T] fp32.
  return 2 * sizeof(float) * static_cast<size_t>(a.batch * a.n_heads * a.seq_len);
}

void attention_backward(bf16* dq, int64_t ld_dq, bf16* dk, int64_t ld_dk, bf16* dv, int64_t ld_dv,
                        const bf16* dout, int64_t ld_dout, const bf16* out, int64_t ld_out,
                        const float* lse, const AttnArgs& a, void* scratch, cudaStream_t s) {
  AttnParams p = make_params(a);
  const int64_t hd = a.n_heads * a.head_dim, kvd = a.n_kv_heads * a.head_dim;
  RT_ASSERT(ld_dq >= hd && ld_dout >= hd && ld_out >= hd && ld_dk >= kvd && ld_dv >= kvd,
            "attention_backward: a row stride is smaller than the heads it holds");
  if (a.batch == 0 || a.seq_len == 0) return;
  p.vec = p.vec && ld_dout % 8 == 0 && aligned(dout, 16);
  float* delta = static_cast<float*>(scratch);
  float* lse2 = delta + a.batch * a.n_heads * a.seq_len;
  const int64_t n_rows = a.batch * a.seq_len;
  {
    constexpr int kWarps = 8;
    const int64_t blocks = (n_rows * a.n_heads + kWarps - 1) / kWarps;
    attention_delta_kernel<<<static_cast<unsigned>(blocks), 32 * kWarps, 0, s>>>(
        delta, lse2, lse, dout, ld_dout, out, ld_out, n_rows, p.T, p.H, p.D);
    ATTN_CUDA_CHECK(cudaGetLastError());
  }
  switch (padded_head_dim(a.head_dim)) {
    case 32: backward_dp<32>(dq, ld_dq, dk, ld_dk, dv, ld_dv, dout, ld_dout, lse2, delta, p, s); break;
    case 64: backward_dp<64>(dq, ld_dq, dk, ld_dk, dv, ld_dv, dout, ld_dout, lse2, delta, p, s); break;
    case 128: backward_dp<128>(dq, ld_dq, dk, ld_dk, dv, ld_dv, dout, ld_dout, lse2, delta, p, s); break;
    default: backward_dp<256>(dq, ld_dq, dk, ld_dk, dv, ld_dv, dout, ld_dout, lse2, delta, p, s); break;
  }
}

}  // namespace ranktune::kernels
