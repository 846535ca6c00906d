// Device helpers shared by the kernel files: loads and stores of N consecutive elements as fp32
// registers (one 16-byte access per 8 bf16 or 4 f32 when N allows it), and deterministic warp and
// block reductions (fixed shuffle pattern, fixed order across warps: the same inputs give bitwise
// the same result, which the Backend contract requires).
#pragma once
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace ranktune::kernels {

// Whether a pointer allows 16-byte vector accesses.
inline bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// ---- loads and stores ---------------------------------------------------------------------------
// With N a multiple of the 16-byte width (8 bf16, 4 f32) the pointer must be 16-byte aligned; with
// N a multiple of 4 bf16, 8-byte aligned; other N go element by element.
template <int N>
__device__ __forceinline__ void load_floats(const __nv_bfloat16* p, float* f) {
  if constexpr (N % 8 == 0) {
#pragma unroll
    for (int i = 0; i < N; i += 8) {
      const uint4 raw = *reinterpret_cast<const uint4*>(p + i);
      const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&raw);
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const float2 t = __bfloat1622float2(h[j]);
        f[i + 2 * j] = t.x;
        f[i + 2 * j + 1] = t.y;
      }
    }
  } else if constexpr (N % 4 == 0) {
#pragma unroll
    for (int i = 0; i < N; i += 4) {
      const uint2 raw = *reinterpret_cast<const uint2*>(p + i);
      const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&raw);
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        const float2 t = __bfloat1622float2(h[j]);
        f[i + 2 * j] = t.x;
        f[i + 2 * j + 1] = t.y;
      }
    }
  } else {
#pragma unroll
    for (int i = 0; i < N; ++i) f[i] = __bfloat162float(p[i]);
  }
}

template <int N>
__device__ __forceinline__ void load_floats(const float* p, float* f) {
  if constexpr (N % 4 == 0) {
#pragma unroll
    for (int i = 0; i < N; i += 4) {
      const float4 t = *reinterpret_cast<const float4*>(p + i);
      f[i] = t.x;
      f[i + 1] = t.y;
      f[i + 2] = t.z;
      f[i + 3] = t.w;
    }
  } else {
#pragma unroll
    for (int i = 0; i < N; ++i) f[i] = p[i];
  }
}

template <int N>
__device__ __forceinline__ void store_floats(__nv_bfloat16* p, const float* f) {
  if constexpr (N % 8 == 0) {
#pragma unroll
    for (int i = 0; i < N; i += 8) {
      uint4 raw;
      __nv_bfloat162* h = reinterpret_cast<__nv_bfloat162*>(&raw);
#pragma unroll
      for (int j = 0; j < 4; ++j) h[j] = __floats2bfloat162_rn(f[i + 2 * j], f[i + 2 * j + 1]);
      *reinterpret_cast<uint4*>(p + i) = raw;
    }
  } else if constexpr (N % 4 == 0) {
#pragma unroll
    for (int i = 0; i < N; i += 4) {
      uint2 raw;
      __nv_bfloat162* h = reinterpret_cast<__nv_bfloat162*>(&raw);
#pragma unroll
      for (int j = 0; j < 2; ++j) h[j] = __floats2bfloat162_rn(f[i + 2 * j], f[i + 2 * j + 1]);
      *reinterpret_cast<uint2*>(p + i) = raw;
    }
  } else {
#pragma unroll
    for (int i = 0; i < N; ++i) p[i] = __float2bfloat16_rn(f[i]);
  }
}

template <int N>
__device__ __forceinline__ void store_floats(float* p, const float* f) {
  if constexpr (N % 4 == 0) {
#pragma unroll
    for (int i = 0; i < N; i += 4)
      *reinterpret_cast<float4*>(p + i) = make_float4(f[i], f[i + 1], f[i + 2], f[i + 3]);
  } else {
#pragma unroll
    for (int i = 0; i < N; ++i) p[i] = f[i];
  }
}

// The value a bf16 store followed by a load would give.
__device__ __forceinline__ float round_bf16(float x) {
  return __bfloat162float(__float2bfloat16_rn(x));
}

// ---- reductions ---------------------------------------------------------------------------------
// Butterfly reductions: every lane ends with the same, bitwise identical, value (a + b == b + a).
template <class T>
__device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1)
    v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, offset));
  return v;
}

// Sum over the block (blockDim.x a multiple of 32, at most 1024), returned to every thread.
// `shared` holds 32 elements; the leading barrier lets consecutive calls reuse it.
template <class T>
__device__ __forceinline__ T block_sum(T v, T* shared) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  v = warp_sum(v);
  __syncthreads();
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  v = lane < static_cast<int>(blockDim.x / 32) ? shared[lane] : T(0);
  return warp_sum(v);
}

__device__ __forceinline__ float block_max(float v, float* shared) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  v = warp_max(v);
  __syncthreads();
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  v = lane < static_cast<int>(blockDim.x / 32) ? shared[lane] : -INFINITY;
  return warp_max(v);
}

// Threads for a block that walks `items` work items: a multiple of 32, at most `max_threads`.
inline int threads_for(int64_t items, int max_threads) {
  const int64_t rounded = (items + 31) / 32 * 32;
  return static_cast<int>(rounded < 32 ? 32 : (rounded > max_threads ? max_threads : rounded));
}

// Grid of a pass over rows x column chunks: x over chunks (grid-strided beyond 8192 blocks), y over
// rows (grid-strided beyond 65535, the limit of a grid's y). Kernels loop over both.
inline dim3 grid_2d(int64_t rows, int64_t n_chunks, int threads) {
  int64_t x = (n_chunks + threads - 1) / threads;
  x = x < 1 ? 1 : (x > 8192 ? 8192 : x);
  const int64_t y = rows < 65535 ? rows : 65535;
  return dim3(static_cast<unsigned>(x), static_cast<unsigned>(y));
}

}  // namespace ranktune::kernels
