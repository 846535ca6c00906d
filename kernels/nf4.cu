// NF4 (QLoRA) weights to bf16: the dequantization a 4-bit linear layer runs before each of its
// GEMMs, once per linear per forward and backward pass. The format is bitsandbytes' (see
// include/ranktune/nf4.h); the result is bitwise bf16 of the host's nf4_dequantize.
//
// It is a pure streaming pass, 0.5 byte in and 2 bytes out per weight, so it is shaped for memory
// bandwidth: each thread turns 4 packed bytes (one 32-bit load) into 8 bf16 (one 16-byte store),
// so a warp's loads and stores are each one contiguous span; every thread carries kChunks such
// items at once (all loads issued before any store) to keep enough bytes in flight. The 16 NF4
// values sit in shared memory: the 16 entries fall in 16 different banks, so a warp's lookups never
// conflict. A block's scale (8 threads share one) is recomputed per thread from its 8-bit code,
// the nested absmax and the offset: three cached loads per 8 weights, cheaper than a separate pass.
#include "cuda_check.h"
#include "kernels.h"
#include "ranktune/nf4.h"
#include "vec.cuh"

namespace ranktune::kernels {
namespace {

constexpr int kThreads = 256;
constexpr int kChunks = 4;       // 8-weight items per thread per loop trip
constexpr int kItemWeights = 8;  // weights per item: 4 packed bytes -> 8 bf16 (16 bytes)

__constant__ float c_nf4_code[16] = {kNf4Code[0],  kNf4Code[1],  kNf4Code[2],  kNf4Code[3], kNf4Code[4],  kNf4Code[5],
                                     kNf4Code[6],  kNf4Code[7],  kNf4Code[8],  kNf4Code[9], kNf4Code[10], kNf4Code[11],
                                     kNf4Code[12], kNf4Code[13], kNf4Code[14], kNf4Code[15]};

// scale[b] as bnb computes it: dequantize_blockwise (one fp32 multiply) then += offset (one fp32
// add); the _rn intrinsics keep the compiler from fusing them into an FMA, which would round once.
__device__ __forceinline__ float block_scale(const Nf4Weights& w, int64_t block) {
  if (w.absmax_codes == nullptr) return __ldg(w.absmax + block);
  const float nested = __ldg(w.nested_map + __ldg(w.absmax_codes + block));
  return __fadd_rn(__fmul_rn(nested, __ldg(w.nested_absmax + block / kNf4NestedBlockSize)), w.offset);
}

// numel % 8 == 0, packed 4-byte and out 16-byte aligned.
__global__ void __launch_bounds__(kThreads) nf4_dequantize_vec_kernel(bf16* __restrict__ out, const Nf4Weights w) {
  __shared__ float code[16];
  if (threadIdx.x < 16) code[threadIdx.x] = c_nf4_code[threadIdx.x];
  __syncthreads();

  const int64_t n_items = w.numel / kItemWeights;
  const uint32_t* packed = reinterpret_cast<const uint32_t*>(w.packed);
  const int64_t trip = static_cast<int64_t>(gridDim.x) * kThreads * kChunks;
  for (int64_t first = static_cast<int64_t>(blockIdx.x) * kThreads * kChunks + threadIdx.x; first < n_items;
       first += trip) {
    uint32_t bytes[kChunks] = {};
    float scale[kChunks] = {};
#pragma unroll
    for (int c = 0; c < kChunks; ++c) {
      const int64_t item = first + static_cast<int64_t>(c) * kThreads;
      if (item < n_items) {
        bytes[c] = __ldg(packed + item);
        scale[c] = block_scale(w, item * kItemWeights / kNf4BlockSize);
      }
    }
#pragma unroll
    for (int c = 0; c < kChunks; ++c) {
      const int64_t item = first + static_cast<int64_t>(c) * kThreads;
      if (item >= n_items) break;
      float values[kItemWeights];
#pragma unroll
      for (int j = 0; j < 4; ++j) {  // little-endian: byte j of the word holds weights 2j, 2j+1
        const uint32_t byte = (bytes[c] >> (8 * j)) & 0xFFu;
        values[2 * j] = __fmul_rn(code[byte >> 4], scale[c]);
        values[2 * j + 1] = __fmul_rn(code[byte & 0xFu], scale[c]);
      }
      store_floats<kItemWeights>(out + item * kItemWeights, values);
    }
  }
}

// Any numel and alignment: one weight per thread.
__global__ void __launch_bounds__(kThreads) nf4_dequantize_scalar_kernel(bf16* __restrict__ out, const Nf4Weights w) {
  __shared__ float code[16];
  if (threadIdx.x < 16) code[threadIdx.x] = c_nf4_code[threadIdx.x];
  __syncthreads();
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; i < w.numel;
       i += static_cast<int64_t>(gridDim.x) * kThreads) {
    const uint8_t byte = __ldg(w.packed + i / 2);
    const int nibble = i % 2 == 0 ? byte >> 4 : byte & 0xF;
    out[i] = __float2bfloat16_rn(__fmul_rn(code[nibble], block_scale(w, i / kNf4BlockSize)));
  }
}

int grid_for(int64_t work_per_block_units, int64_t units) {
  int64_t blocks = (units + work_per_block_units - 1) / work_per_block_units;
  blocks = blocks < 1 ? 1 : (blocks > (1 << 20) ? (1 << 20) : blocks);
  return static_cast<int>(blocks);
}

}  // namespace

// ---- Kernel launchers ---------------------------------------------------------------------------

void nf4_dequantize(bf16* out, const Nf4Weights& w, cudaStream_t s) {
  if (w.numel == 0) return;
  const bool vec = w.numel % kItemWeights == 0 && aligned16(out) && reinterpret_cast<uintptr_t>(w.packed) % 4 == 0;
  if (vec) {
    const int64_t n_items = w.numel / kItemWeights;
    nf4_dequantize_vec_kernel<<<grid_for(kThreads * kChunks, n_items), kThreads, 0, s>>>(out, w);
  } else {
    nf4_dequantize_scalar_kernel<<<grid_for(kThreads, w.numel), kThreads, 0, s>>>(out, w);
  }
  cudaCheckLaunch();
}

}  // namespace ranktune::kernels
