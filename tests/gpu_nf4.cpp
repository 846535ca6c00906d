// The NF4 dequantization kernel (kernels/nf4.cu) against the host's nf4_dequantize: bitwise equal
// to bf16 of the host's fp32 values, for the vectorized path (numel a multiple of 8, aligned) and
// the element-wise one, with and without double quantization, and on bitsandbytes' own codes from
// the fixture (equal to bnb's bf16 dequantization). The output is poisoned with NaN with guard
// elements on both sides, so every element must be written and nothing around it.
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <cstdint>
#include <cstring>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

#include "../kernels/kernels.h"
#include "gpu_skip.h"
#include "ranktune/nf4.h"
#include "ranktune/safetensors.h"
#include "ranktune/tensor.h"

namespace {

namespace rk = ranktune::kernels;
using ranktune::Nf4Tensor;

constexpr uint16_t kPoison = 0x7FC0;  // bf16 quiet NaN
constexpr int64_t kGuard = 24;        // poisoned elements on each side of the output

#define CUDA_OK(call)                                                                                        \
  do {                                                                                                       \
    const cudaError_t err_ = (call);                                                                         \
    if (err_ != cudaSuccess) throw std::runtime_error(std::string(#call) + ": " + cudaGetErrorString(err_)); \
  } while (0)

// Device memory holding a copy of a host array.
class DeviceArray {
 public:
  DeviceArray(const void* host, size_t bytes) : bytes_(bytes) {
    CUDA_OK(cudaMalloc(&ptr_, bytes ? bytes : 1));
    if (bytes) CUDA_OK(cudaMemcpy(ptr_, host, bytes, cudaMemcpyHostToDevice));
  }
  template <class T>
  explicit DeviceArray(const std::vector<T>& host) : DeviceArray(host.data(), host.size() * sizeof(T)) {}
  ~DeviceArray() { cudaFree(ptr_); }
  DeviceArray(const DeviceArray&) = delete;
  DeviceArray& operator=(const DeviceArray&) = delete;
  template <class T>
  T* as() const {
    return static_cast<T*>(ptr_);
  }
  size_t bytes() const { return bytes_; }

 private:
  void* ptr_ = nullptr;
  size_t bytes_ = 0;
};

// Runs the kernel on `t` into a poisoned buffer whose output starts `shift` elements after a
// 16-byte boundary (shift != 0 forces the element-wise path); returns the whole buffer.
std::vector<uint16_t> gpu_dequantize(const Nf4Tensor& t, int64_t shift) {
  const int64_t numel = t.numel();
  DeviceArray packed(t.packed);
  DeviceArray codes(t.absmax_codes);
  DeviceArray nested(t.nested_absmax);
  DeviceArray map(t.nested_quant_map.data(), sizeof(float) * 256);
  DeviceArray absmax(t.absmax);
  std::vector<uint16_t> host(static_cast<size_t>(numel + 2 * kGuard + shift), kPoison);
  DeviceArray out(host);

  rk::Nf4Weights w;
  w.packed = packed.as<uint8_t>();
  if (t.double_quant) {
    w.absmax_codes = codes.as<uint8_t>();
    w.nested_absmax = nested.as<float>();
    w.nested_map = map.as<float>();
    w.offset = t.offset;
  } else {
    w.absmax = absmax.as<float>();
  }
  w.numel = numel;
  rk::nf4_dequantize(out.as<rk::bf16>() + kGuard + shift, w, nullptr);
  CUDA_OK(cudaDeviceSynchronize());
  CUDA_OK(cudaMemcpy(host.data(), out.as<void>(), out.bytes(), cudaMemcpyDeviceToHost));
  return host;
}

void expect_matches_host(const Nf4Tensor& t, const std::string& what) {
  const std::vector<float> host = ranktune::nf4_dequantize(t);
  for (int64_t shift : {0, 1}) {
    const std::vector<uint16_t> gpu = gpu_dequantize(t, shift);
    size_t mismatches = 0, first = 0, touched = 0;
    for (size_t i = 0; i < host.size(); ++i) {
      if (gpu[static_cast<size_t>(kGuard + shift) + i] != ranktune::f32_to_bf16(host[i])) {
        if (mismatches++ == 0) first = i;
      }
    }
    for (int64_t i = 0; i < kGuard + shift; ++i) touched += gpu[static_cast<size_t>(i)] != kPoison;
    for (size_t i = host.size() + static_cast<size_t>(kGuard + shift); i < gpu.size(); ++i)
      touched += gpu[i] != kPoison;
    EXPECT_EQ(mismatches, 0u) << what << " shift " << shift << ": first at " << first << ", gpu bits "
                              << gpu[static_cast<size_t>(kGuard + shift) + first] << ", host "
                              << ranktune::f32_to_bf16(host[first]);
    EXPECT_EQ(touched, 0u) << what << " shift " << shift << ": wrote outside the output";
  }
}

std::vector<float> random_weights(size_t n, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal(0.0f, 0.02f);
  std::uniform_real_distribution<float> uniform(0.0f, 1.0f);
  std::vector<float> w(n);
  for (float& x : w) x = normal(rng) * (uniform(rng) < 0.01f ? 8.0f : 1.0f);
  return w;
}

TEST(GpuNf4, DequantizeEqualsHostBitwise) {
  SKIP_WITHOUT_GPU();
  const std::vector<std::vector<int64_t>> shapes = {
      {2048, 8192},       // the Llama-3.2-1B MLP shape: 262144 blocks, 1024 nested blocks
      {64, 320},          // vectorized path, two nested blocks
      {3, 64 * 300 + 8},  // numel a multiple of 8 but a partial last block
      {1, 8},             // one vector item
      {33, 65},           // odd numel: element-wise path, padding nibble
      {7}};
  uint32_t seed = 1;
  for (const auto& shape : shapes) {
    int64_t numel = 1;
    for (int64_t d : shape) numel *= d;
    const std::vector<float> w = random_weights(static_cast<size_t>(numel), seed++);
    for (bool double_quant : {true, false}) {
      const Nf4Tensor t = ranktune::nf4_quantize(w, shape, double_quant);
      expect_matches_host(t, "numel " + std::to_string(numel) + (double_quant ? " double" : " plain"));
    }
  }
}

// bitsandbytes' own codes (tools/make_nf4_fixture.py): the GPU's bf16 equals bnb's bf16.
TEST(GpuNf4, DequantizesBitsandbytesCodesAsBitsandbytes) {
  SKIP_WITHOUT_GPU();
  const ranktune::SafetensorsFile file(std::string(RANKTUNE_FIXTURES) + "/nf4/bnb_nf4.safetensors");
  const std::string prefix = "model.layers.1.self_attn.q_proj";
  const Nf4Tensor t = ranktune::load_bnb_nf4(file, prefix + ".weight");
  const std::vector<uint16_t> bnb = file.read_bf16(prefix + ".dequantized");
  const std::vector<uint16_t> gpu = gpu_dequantize(t, 0);
  ASSERT_EQ(gpu.size(), bnb.size() + 2 * kGuard);
  EXPECT_EQ(0, std::memcmp(gpu.data() + kGuard, bnb.data(), bnb.size() * sizeof(uint16_t)));
  expect_matches_host(ranktune::load_bnb_nf4(file, "model.layers.0.mlp.down_proj.weight"), "fp32_nested");
}

}  // namespace
