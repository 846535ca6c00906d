// Pieces of the Backend contract that do not depend on the device: the 8-bit optimizer's
// quantization maps, and the CUDA factory's stand-in when ranktune is built without CUDA.
#include <algorithm>
#include <array>
#include <vector>

#include "ranktune/backend.h"

namespace ranktune {
namespace {

// bitsandbytes' create_dynamic_map(signed, max_exponent_bits=7, total_bits=8): for each decade
// 10^(i-6), i = 0..6, the midpoints of an even split of [0.1, 1] (2^i of them signed, 2^(i+1)
// unsigned), mirrored for the signed map; plus 0 and 1; sorted.
std::array<float, 256> make_dynamic_map(bool is_signed) {
  std::vector<float> data;
  const int max_exponent_bits = 7, non_sign_bits = 7;
  for (int i = 0; i < max_exponent_bits; ++i) {
    const int fraction_items = is_signed ? (1 << (i + non_sign_bits - max_exponent_bits)) + 1
                                         : (1 << (i + non_sign_bits - max_exponent_bits + 1)) + 1;
    std::vector<float> boundaries(static_cast<size_t>(fraction_items));
    for (int j = 0; j < fraction_items; ++j)  // torch.linspace(0.1, 1, fraction_items) in float32
      boundaries[static_cast<size_t>(j)] =
          fraction_items == 1 ? 0.1f
                              : 0.1f + (0.9f / static_cast<float>(fraction_items - 1)) *
                                           static_cast<float>(j);
    double decade = 1.0;
    for (int e = 0; e < max_exponent_bits - 1 - i; ++e) decade /= 10.0;
    for (int j = 0; j + 1 < fraction_items; ++j) {
      const float mean = (boundaries[static_cast<size_t>(j)] + boundaries[static_cast<size_t>(j + 1)]) / 2.0f;
      data.push_back(static_cast<float>(decade * mean));
      if (is_signed) data.push_back(static_cast<float>(-decade * mean));
    }
  }
  data.push_back(0.0f);
  data.push_back(1.0f);
  while (data.size() < 256) data.push_back(0.0f);
  std::sort(data.begin(), data.end());
  std::array<float, 256> out{};
  std::copy(data.begin(), data.begin() + 256, out.begin());
  return out;
}

}  // namespace

const float* adam8bit_signed_map() {
  static const std::array<float, 256> map = make_dynamic_map(true);
  return map.data();
}

const float* adam8bit_unsigned_map() {
  static const std::array<float, 256> map = make_dynamic_map(false);
  return map.data();
}

void adam8bit_init_state(uint8_t* m_q, uint8_t* v_q, int64_t n) {
  const uint8_t m_zero = adam8bit_quantize(adam8bit_signed_map(), 0.0f);
  const uint8_t v_zero = adam8bit_quantize(adam8bit_unsigned_map(), 0.0f);
  RT_ASSERT(adam8bit_signed_map()[m_zero] == 0.0f && adam8bit_unsigned_map()[v_zero] == 0.0f,
            "the 8-bit maps must contain 0.0");
  std::fill(m_q, m_q + n, m_zero);
  std::fill(v_q, v_q + n, v_zero);
}

#ifndef RANKTUNE_HAVE_CUDA
std::unique_ptr<Backend> make_cuda_backend(int) {
  throw UserError("this ranktune was built without CUDA; set model.device_map: cpu or rebuild with "
                  "the CUDA toolkit installed");
}
void enable_peer_access(const std::vector<int>&) {}
#endif

}  // namespace ranktune
