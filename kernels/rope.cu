// Rotary position embedding, HF rotate_half convention: in each head, element i pairs with
// i + D/2. One block per row (token): the row's position, and with it its cos/sin rows, is read
// once, and its heads are walked in chunks of kVec pairs (16-byte loads of both halves). Forward
// and backward are the same kernel: the backward rotates by the negative angle (sign = -1).
#include "cuda_check.h"
#include "kernels.h"
#include "vec.cuh"

namespace ranktune::kernels {
namespace {

constexpr int kMaxThreads = 256;

template <int kVec>
__global__ void rope_kernel(bf16* x, int64_t ld, int n_heads, int half, const int32_t* positions,
                            const float* cos, const float* sin, float sign) {
  const int64_t row = blockIdx.x;
  const int64_t pos = positions[row];
  const float* cos_row = cos + pos * half;
  const float* sin_row = sin + pos * half;
  const int chunks_per_head = half / kVec;
  const int n_items = n_heads * chunks_per_head;
  for (int item = threadIdx.x; item < n_items; item += blockDim.x) {
    const int head = item / chunks_per_head;
    const int i = (item - head * chunks_per_head) * kVec;
    bf16* x1_ptr = x + row * ld + static_cast<int64_t>(head) * 2 * half + i;
    bf16* x2_ptr = x1_ptr + half;
    float x1[kVec], x2[kVec], c[kVec], s[kVec];
    load_floats<kVec>(x1_ptr, x1);
    load_floats<kVec>(x2_ptr, x2);
    load_floats<kVec>(cos_row + i, c);
    load_floats<kVec>(sin_row + i, s);
    float y1[kVec], y2[kVec];
#pragma unroll
    for (int j = 0; j < kVec; ++j) {
      const float sj = sign * s[j];
      y1[j] = x1[j] * c[j] - x2[j] * sj;
      y2[j] = x2[j] * c[j] + x1[j] * sj;
    }
    store_floats<kVec>(x1_ptr, y1);
    store_floats<kVec>(x2_ptr, y2);
  }
}

}  // namespace

// ---- Kernel launchers ---------------------------------------------------------------------------

void rope(bf16* x, int64_t ld, int64_t n_rows, int64_t n_heads, int64_t head_dim,
          const int32_t* positions, const float* cos, const float* sin, float sign,
          cudaStream_t s) {
  if (n_rows == 0 || n_heads == 0) return;
  const int half = static_cast<int>(head_dim / 2);
  const bool vec = half % 8 == 0 && ld % 8 == 0 && aligned16(x) && aligned16(cos) && aligned16(sin);
  const int heads = static_cast<int>(n_heads);
  if (vec) {
    rope_kernel<8>
        <<<static_cast<unsigned>(n_rows), threads_for(n_heads * half / 8, kMaxThreads), 0, s>>>(
            x, ld, heads, half, positions, cos, sin, sign);
  } else {
    rope_kernel<1>
        <<<static_cast<unsigned>(n_rows), threads_for(n_heads * half, kMaxThreads), 0, s>>>(
            x, ld, heads, half, positions, cos, sin, sign);
  }
  cudaCheckLaunch();
}

}  // namespace ranktune::kernels
