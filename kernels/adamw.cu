// AdamW, fused: one pass reads grad, master and the two moments, and writes master, the moments
// and the bf16 compute copy of the weights (grad scaling, decoupled weight decay and bias
// correction all inside).
//
// The 8-bit variant stores the moments as bitsandbytes' blockwise dynamic quantization: per block
// of kAdam8BitBlock elements, one f32 absmax and one u8 code per element indexing a 256-entry map
// (signed for m, unsigned for v). One thread block per quantization block: dequantize, update in
// fp32, reduce the block's new absmax, requantize by nearest map entry (adam8bit_quantize, the same
// function the CPU backend calls, with the maps in shared memory).
#include <algorithm>
#include <cmath>

#include "cuda_check.h"
#include "kernels.h"
#include "vec.cuh"

namespace ranktune::kernels {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxBlocks = 8192;
// Elements per thread in the 8-bit kernel: kThreads * kPer8Bit == kAdam8BitBlock.
constexpr int kPer8Bit = 8;
static_assert(kThreads * kPer8Bit == kAdam8BitBlock);

struct AdamWScalars {
  float lr, beta1, beta2, eps, grad_scale;
  float decay_factor;                        // 1 - lr * weight_decay
  float bias_correction1, bias_correction2;  // 1 - beta^step
};

// The constants in double, rounded once, as the CPU backend does.
AdamWScalars scalars(const AdamWParams& p) {
  const double step = static_cast<double>(p.step);
  return {p.lr,
          p.beta1,
          p.beta2,
          p.eps,
          p.grad_scale,
          static_cast<float>(1.0 - static_cast<double>(p.lr) * p.weight_decay),
          static_cast<float>(1.0 - std::pow(static_cast<double>(p.beta1), step)),
          static_cast<float>(1.0 - std::pow(static_cast<double>(p.beta2), step))};
}

// torch.optim.AdamW's order: decoupled decay of the parameter, the moments, the bias-corrected
// step.
__device__ __forceinline__ void adamw_update(float& p, float& m, float& v, float grad,
                                             const AdamWScalars& s) {
  const float g = grad * s.grad_scale;
  p *= s.decay_factor;
  m = s.beta1 * m + (1.f - s.beta1) * g;
  v = s.beta2 * v + (1.f - s.beta2) * g * g;
  const float m_hat = m / s.bias_correction1;
  const float v_hat = v / s.bias_correction2;
  p -= s.lr * m_hat / (sqrtf(v_hat) + s.eps);
}

// kVec elements per step over the first n / kVec * kVec elements; block 0 does the tail.
template <int kVec>
__global__ void adamw_kernel(float* master, bf16* compute, const float* grad, float* m, float* v,
                             int64_t n, AdamWScalars s) {
  const int64_t n_vec = n / kVec;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n_vec;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t at = i * kVec;
    float p[kVec], g[kVec], mm[kVec], vv[kVec];
    load_floats<kVec>(master + at, p);
    load_floats<kVec>(grad + at, g);
    load_floats<kVec>(m + at, mm);
    load_floats<kVec>(v + at, vv);
#pragma unroll
    for (int j = 0; j < kVec; ++j) adamw_update(p[j], mm[j], vv[j], g[j], s);
    store_floats<kVec>(master + at, p);
    store_floats<kVec>(m + at, mm);
    store_floats<kVec>(v + at, vv);
    if (compute) store_floats<kVec>(compute + at, p);
  }
  const int64_t tail = n - n_vec * kVec;
  if (blockIdx.x == 0 && threadIdx.x < tail) {
    const int64_t at = n_vec * kVec + threadIdx.x;
    float p = master[at], mm = m[at], vv = v[at];
    adamw_update(p, mm, vv, grad[at], s);
    master[at] = p;
    m[at] = mm;
    v[at] = vv;
    if (compute) compute[at] = __float2bfloat16_rn(p);
  }
}

// 8 codes <-> one 8-byte word, little-endian as in memory.
__device__ __forceinline__ void unpack_codes(uint2 raw, uint8_t* codes) {
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    codes[j] = static_cast<uint8_t>(raw.x >> (8 * j));
    codes[4 + j] = static_cast<uint8_t>(raw.y >> (8 * j));
  }
}

__device__ __forceinline__ uint2 pack_codes(const uint8_t* codes) {
  uint2 raw{0u, 0u};
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    raw.x |= static_cast<uint32_t>(codes[j]) << (8 * j);
    raw.y |= static_cast<uint32_t>(codes[4 + j]) << (8 * j);
  }
  return raw;
}

// Thread t of block b owns elements b * kAdam8BitBlock + t * kPer8Bit + [0, kPer8Bit). kVec: the
// pointers allow 16-byte accesses (8-byte for the codes); the partial last block goes element by
// element either way.
template <bool kVec>
__global__ void __launch_bounds__(kThreads)
    adamw8bit_kernel(float* master, bf16* compute, const float* grad, uint8_t* m_q, uint8_t* v_q,
                     float* m_absmax, float* v_absmax, int64_t n, const float* signed_map,
                     const float* unsigned_map, AdamWScalars s) {
  __shared__ float m_map[256], v_map[256];
  __shared__ float shared[32];
  m_map[threadIdx.x] = signed_map[threadIdx.x];
  v_map[threadIdx.x] = unsigned_map[threadIdx.x];
  // Read before the barriers below; thread 0 overwrites them at the end.
  const float m_scale = m_absmax[blockIdx.x], v_scale = v_absmax[blockIdx.x];
  __syncthreads();

  const int64_t base = blockIdx.x * kAdam8BitBlock + threadIdx.x * kPer8Bit;
  const int valid =
      static_cast<int>(n - base < kPer8Bit ? (n - base > 0 ? n - base : 0) : kPer8Bit);
  const bool whole = kVec && valid == kPer8Bit;

  float p[kPer8Bit], g[kPer8Bit], mm[kPer8Bit], vv[kPer8Bit];
  uint8_t mc[kPer8Bit], vc[kPer8Bit];
  if (whole) {
    load_floats<kPer8Bit>(master + base, p);
    load_floats<kPer8Bit>(grad + base, g);
    unpack_codes(*reinterpret_cast<const uint2*>(m_q + base), mc);
    unpack_codes(*reinterpret_cast<const uint2*>(v_q + base), vc);
  } else {
#pragma unroll
    for (int j = 0; j < kPer8Bit; ++j) {
      p[j] = g[j] = 0.f;
      mc[j] = vc[j] = 0;
      if (j < valid) {
        p[j] = master[base + j];
        g[j] = grad[base + j];
        mc[j] = m_q[base + j];
        vc[j] = v_q[base + j];
      }
    }
  }

  float m_max = 0.f, v_max = 0.f;
#pragma unroll
  for (int j = 0; j < kPer8Bit; ++j) {
    mm[j] = m_map[mc[j]] * m_scale;
    vv[j] = v_map[vc[j]] * v_scale;
    if (j < valid) {
      adamw_update(p[j], mm[j], vv[j], g[j], s);
      m_max = fmaxf(m_max, fabsf(mm[j]));
      v_max = fmaxf(v_max, fabsf(vv[j]));
    }
  }
  m_max = block_max(m_max, shared);
  v_max = block_max(v_max, shared);

#pragma unroll
  for (int j = 0; j < kPer8Bit; ++j) {
    mc[j] = adam8bit_quantize(m_map, m_max > 0.f ? mm[j] / m_max : 0.f);
    vc[j] = adam8bit_quantize(v_map, v_max > 0.f ? vv[j] / v_max : 0.f);
  }
  if (whole) {
    store_floats<kPer8Bit>(master + base, p);
    if (compute) store_floats<kPer8Bit>(compute + base, p);
    *reinterpret_cast<uint2*>(m_q + base) = pack_codes(mc);
    *reinterpret_cast<uint2*>(v_q + base) = pack_codes(vc);
  } else {
#pragma unroll
    for (int j = 0; j < kPer8Bit; ++j) {
      if (j >= valid) continue;
      master[base + j] = p[j];
      if (compute) compute[base + j] = __float2bfloat16_rn(p[j]);
      m_q[base + j] = mc[j];
      v_q[base + j] = vc[j];
    }
  }
  if (threadIdx.x == 0) {
    m_absmax[blockIdx.x] = m_max;
    v_absmax[blockIdx.x] = v_max;
  }
}

bool aligned8(const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 8 == 0; }

}  // namespace

// ---- Kernel launchers ---------------------------------------------------------------------------

void adamw_step(float* master, bf16* compute, const float* grad, float* m, float* v, int64_t n,
                const AdamWParams& p, cudaStream_t s) {
  if (n == 0) return;
  const AdamWScalars sc = scalars(p);
  // 4 f32 per 16-byte access; the 4 bf16 of compute are one 8-byte store.
  const bool vec = aligned16(master) && aligned16(grad) && aligned16(m) && aligned16(v) &&
                   (!compute || aligned8(compute));
  const int64_t items = vec ? n / 4 : n;
  const auto blocks = static_cast<unsigned>(
      std::min<int64_t>(std::max<int64_t>((items + kThreads - 1) / kThreads, 1), kMaxBlocks));
  if (vec)
    adamw_kernel<4><<<blocks, kThreads, 0, s>>>(master, compute, grad, m, v, n, sc);
  else
    adamw_kernel<1><<<blocks, kThreads, 0, s>>>(master, compute, grad, m, v, n, sc);
  cudaCheckLaunch();
}

void adamw8bit_step(float* master, bf16* compute, const float* grad, uint8_t* m_q, uint8_t* v_q,
                    float* m_absmax, float* v_absmax, int64_t n, const float* signed_map,
                    const float* unsigned_map, const AdamWParams& p, cudaStream_t s) {
  if (n == 0) return;
  const AdamWScalars sc = scalars(p);
  const bool vec = aligned16(master) && aligned16(grad) && aligned8(m_q) && aligned8(v_q) &&
                   (!compute || aligned16(compute));
  const auto blocks = static_cast<unsigned>((n + kAdam8BitBlock - 1) / kAdam8BitBlock);
  if (vec)
    adamw8bit_kernel<true><<<blocks, kThreads, 0, s>>>(master, compute, grad, m_q, v_q, m_absmax,
                                                       v_absmax, n, signed_map, unsigned_map, sc);
  else
    adamw8bit_kernel<false><<<blocks, kThreads, 0, s>>>(master, compute, grad, m_q, v_q, m_absmax,
                                                        v_absmax, n, signed_map, unsigned_map, sc);
  cudaCheckLaunch();
}

}  // namespace ranktune::kernels
