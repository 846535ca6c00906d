// SwiGLU, h = silu(gate) * up, where gate and up are the column halves of the fused gate_up
// projection (row stride ld_gu). One elementwise pass each way; the backward writes dgate and dup
// straight into the halves of dgate_up. Each thread reads all its inputs before it writes, so the
// backward may run in place (dgate_up aliasing gate_up). The backward can also write h, for a
// recomputed layer whose forward left it out: one pass over gate_up where two would read it.
#include "cuda_check.h"
#include "kernels.h"
#include "vec.cuh"

namespace ranktune::kernels {
namespace {

constexpr int kMaxThreads = 256;

__device__ __forceinline__ float sigmoid(float x) { return 1.f / (1.f + __expf(-x)); }

// Rows in gridDim.y steps (rows may exceed the 65535 limit of a grid's y), columns in chunks of
// kVec.
template <int kVec>
__global__ void swiglu_forward_kernel(bf16* h, int64_t ld_h, const bf16* gate, const bf16* up, int64_t ld_gu,
                                      int64_t n_rows, int64_t ffn) {
  const int64_t n_chunks = ffn / kVec;
  for (int64_t r = blockIdx.y; r < n_rows; r += gridDim.y) {
    for (int64_t c = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; c < n_chunks;
         c += static_cast<int64_t>(gridDim.x) * blockDim.x) {
      float g[kVec], u[kVec], out[kVec];
      load_floats<kVec>(gate + r * ld_gu + c * kVec, g);
      load_floats<kVec>(up + r * ld_gu + c * kVec, u);
#pragma unroll
      for (int j = 0; j < kVec; ++j) out[j] = g[j] * sigmoid(g[j]) * u[j];
      store_floats<kVec>(h + r * ld_h + c * kVec, out);
    }
  }
}

// d silu(g)/dg = sig(g) * (1 + g * (1 - sig(g))).
// h (if not null): silu(g) * u with the forward's roundings, so bitwise what swiglu_forward writes.
template <int kVec>
__global__ void swiglu_backward_kernel(bf16* dgate, bf16* dup, int64_t ld_dgu, bf16* h, int64_t ld_h, const bf16* dh,
                                       int64_t ld_dh, const bf16* gate, const bf16* up, int64_t ld_gu, int64_t n_rows,
                                       int64_t ffn) {
  const int64_t n_chunks = ffn / kVec;
  for (int64_t r = blockIdx.y; r < n_rows; r += gridDim.y) {
    for (int64_t c = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; c < n_chunks;
         c += static_cast<int64_t>(gridDim.x) * blockDim.x) {
      float d[kVec], g[kVec], u[kVec], dg[kVec], du[kVec], out[kVec];
      load_floats<kVec>(dh + r * ld_dh + c * kVec, d);
      load_floats<kVec>(gate + r * ld_gu + c * kVec, g);
      load_floats<kVec>(up + r * ld_gu + c * kVec, u);
#pragma unroll
      for (int j = 0; j < kVec; ++j) {
        const float sig = sigmoid(g[j]);
        const float silu = g[j] * sig;
        du[j] = d[j] * silu;
        dg[j] = d[j] * u[j] * sig * (1.f + g[j] * (1.f - sig));
        out[j] = silu * u[j];
      }
      store_floats<kVec>(dgate + r * ld_dgu + c * kVec, dg);
      store_floats<kVec>(dup + r * ld_dgu + c * kVec, du);
      if (h) store_floats<kVec>(h + r * ld_h + c * kVec, out);
    }
  }
}

}  // namespace

// ---- Kernel launchers ---------------------------------------------------------------------------

void swiglu_forward(bf16* h, int64_t ld_h, const bf16* gate, const bf16* up, int64_t ld_gu, int64_t n_rows, int64_t ffn,
                    cudaStream_t s) {
  if (n_rows == 0 || ffn == 0) return;
  const bool vec = ffn % 8 == 0 && ld_gu % 8 == 0 && ld_h % 8 == 0 && aligned16(h) && aligned16(gate) && aligned16(up);
  if (vec) {
    const int threads = threads_for(ffn / 8, kMaxThreads);
    swiglu_forward_kernel<8>
        <<<grid_2d(n_rows, ffn / 8, threads), threads, 0, s>>>(h, ld_h, gate, up, ld_gu, n_rows, ffn);
  } else {
    const int threads = threads_for(ffn, kMaxThreads);
    swiglu_forward_kernel<1><<<grid_2d(n_rows, ffn, threads), threads, 0, s>>>(h, ld_h, gate, up, ld_gu, n_rows, ffn);
  }
  cudaCheckLaunch();
}

void swiglu_backward(bf16* dgate, bf16* dup, int64_t ld_dgu, bf16* h, int64_t ld_h, const bf16* dh, int64_t ld_dh,
                     const bf16* gate, const bf16* up, int64_t ld_gu, int64_t n_rows, int64_t ffn, cudaStream_t s) {
  if (n_rows == 0 || ffn == 0) return;
  const bool vec = ffn % 8 == 0 && ld_gu % 8 == 0 && ld_dgu % 8 == 0 && ld_dh % 8 == 0 && aligned16(dgate) &&
                   aligned16(dup) && aligned16(dh) && aligned16(gate) && aligned16(up) &&
                   (!h || (ld_h % 8 == 0 && aligned16(h)));
  if (vec) {
    const int threads = threads_for(ffn / 8, kMaxThreads);
    swiglu_backward_kernel<8><<<grid_2d(n_rows, ffn / 8, threads), threads, 0, s>>>(
        dgate, dup, ld_dgu, h, ld_h, dh, ld_dh, gate, up, ld_gu, n_rows, ffn);
  } else {
    const int threads = threads_for(ffn, kMaxThreads);
    swiglu_backward_kernel<1><<<grid_2d(n_rows, ffn, threads), threads, 0, s>>>(dgate, dup, ld_dgu, h, ld_h, dh, ld_dh,
                                                                                gate, up, ld_gu, n_rows, ffn);
  }
  cudaCheckLaunch();
}

}  // namespace ranktune::kernels
