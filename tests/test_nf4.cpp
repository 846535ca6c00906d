// NF4 quantization (include/ranktune/nf4.h) against: the published NF4 table and bitsandbytes'
// decision constants; a straightforward per-element reference written here (bnb's rules transcribed
// one element at a time: its decision thresholds as the literals of its CUDA tree, its 8-bit search
// as the pivot walk of its CUDA dQuantize); error bounds that follow from the format; the
// bnb-4bit checkpoint loader's validation; and a fixture written by real bitsandbytes
// (tools/make_nf4_fixture.py): byte-identical codes and bitwise-equal dequantization.
#include <gtest/gtest.h>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <limits>
#include <map>
#include <random>
#include <string>
#include <vector>

#include "ranktune/error.h"
#include "ranktune/nf4.h"
#include "ranktune/safetensors.h"
#include "ranktune/tensor.h"
#include "subprocess.h"

namespace {

using ranktune::kNf4BlockSize;
using ranktune::kNf4Code;
using ranktune::kNf4NestedBlockSize;
using ranktune::Nf4Tensor;
using ranktune::StDType;

// clang-format off
// The NF4 values as published (the QLoRA paper; bnb.functional.get_4bit_type("nf4")).
constexpr double kPublishedNf4[16] = {
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0};

// The constants of bnb's dQuantizeNF4 decision tree (its CUDA kernels), ascending.
constexpr double kBnbTreeThresholds[15] = {
    -0.8480964004993439, -0.6106329262256622, -0.4599952697753906, -0.33967943489551544,
    -0.23460740596055984, -0.13791173323988914, -0.045525018125772476, 0.03979014977812767,
    0.1202552504837513, 0.2035212516784668, 0.2920137718319893, 0.3893125355243683,
    0.5016634166240692, 0.6427869200706482, 0.8614784181118011};
// clang-format on

// ---- the reference: one element at a time ------------------------------------------------------

// The first tree constant x does not exceed (bnb's tree branches on `x > constant`).
uint8_t ref_nf4_code(float x) {
  for (int i = 0; i < 15; ++i)
    if (!(x > static_cast<float>(kBnbTreeThresholds[i]))) return static_cast<uint8_t>(i);
  return 15;
}

// bnb's CUDA dQuantize<0>, walked literally: pivot 127, steps 64..1, then the midpoint test.
uint8_t ref_dynamic_code(const std::array<float, 256>& map, float x) {
  int pivot = 127, upper_pivot = 255, lower_pivot = 0;
  float lower = -1.0f, upper = 1.0f, val = map[127];
  for (int step = 64; step > 0; step /= 2) {
    if (x > val) {
      lower_pivot = pivot;
      lower = val;
      pivot += step;
    } else {
      upper_pivot = pivot;
      upper = val;
      pivot -= step;
    }
    val = map[static_cast<size_t>(pivot)];
  }
  if (upper_pivot == 255) upper = map[255];
  if (lower_pivot == 0) lower = map[0];
  if (x > val) return static_cast<uint8_t>(x > (upper + val) * 0.5f ? upper_pivot : pivot);
  return static_cast<uint8_t>(x < (lower + val) * 0.5f ? lower_pivot : pivot);
}

struct RefQuantized {
  std::vector<uint8_t> packed, absmax_codes;
  std::vector<float> absmax, nested_absmax;
  float offset = 0.f;
};

RefQuantized ref_quantize(const std::vector<float>& w, bool double_quant) {
  const size_t n = w.size();
  const size_t blocks = (n + 63) / 64;
  RefQuantized r;
  r.absmax.assign(blocks, 0.0f);
  for (size_t i = 0; i < n; ++i) r.absmax[i / 64] = std::max(r.absmax[i / 64], std::fabs(w[i]));
  r.packed.assign((n + 1) / 2, 0);
  for (size_t i = 0; i < 2 * r.packed.size(); ++i) {
    const float reciprocal = 1.0f / std::max(r.absmax[i / 64], 1e-38f);
    const float x = i < n ? w[i] * reciprocal : 0.0f;  // bnb pads with zeros
    r.packed[i / 2] = static_cast<uint8_t>(r.packed[i / 2] | (ref_nf4_code(x) << (i % 2 ? 0 : 4)));
  }
  if (!double_quant) return r;

  long double sum = 0;
  for (float a : r.absmax) sum += a;
  r.offset = static_cast<float>(sum / static_cast<long double>(blocks));
  const auto& map = ranktune::nf4_nested_quant_map();
  r.nested_absmax.assign((blocks + 255) / 256, 0.0f);
  for (size_t b = 0; b < blocks; ++b)
    r.nested_absmax[b / 256] = std::max(r.nested_absmax[b / 256], std::fabs(r.absmax[b] - r.offset));
  for (size_t b = 0; b < blocks; ++b) {
    const float reciprocal = 1.0f / std::max(r.nested_absmax[b / 256], 1e-38f);
    r.absmax_codes.push_back(ref_dynamic_code(map, (r.absmax[b] - r.offset) * reciprocal));
  }
  r.absmax.clear();
  return r;
}

float ref_scale(const Nf4Tensor& t, size_t block) {
  if (!t.double_quant) return t.absmax[block];
  volatile float product = t.nested_quant_map[t.absmax_codes[block]] * t.nested_absmax[block / 256];
  return product + t.offset;
}

std::vector<float> ref_dequantize(const Nf4Tensor& t) {
  std::vector<float> out(static_cast<size_t>(t.numel()));
  for (size_t i = 0; i < out.size(); ++i) {
    const uint8_t byte = t.packed[i / 2];
    out[i] = kNf4Code[i % 2 ? byte & 0xF : byte >> 4] * ref_scale(t, i / 64);
  }
  return out;
}

// Weight-like values: N(0, 0.02^2) with 1% outliers eight times larger.
std::vector<float> random_weights(size_t n, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal(0.0f, 0.02f);
  std::uniform_real_distribution<float> uniform(0.0f, 1.0f);
  std::vector<float> w(n);
  for (float& x : w) x = normal(rng) * (uniform(rng) < 0.01f ? 8.0f : 1.0f);
  return w;
}

std::vector<uint16_t> to_bf16(const std::vector<float>& w) {
  std::vector<uint16_t> out(w.size());
  for (size_t i = 0; i < w.size(); ++i) out[i] = ranktune::f32_to_bf16(w[i]);
  return out;
}

std::vector<float> widen(const std::vector<uint16_t>& w) {
  std::vector<float> out(w.size());
  for (size_t i = 0; i < w.size(); ++i) out[i] = ranktune::bf16_to_f32(w[i]);
  return out;
}

int64_t product(const std::vector<int64_t>& shape) {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

bool bitwise_equal(const std::vector<float>& a, const std::vector<float>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0;
}

void expect_matches_reference(const Nf4Tensor& t, const RefQuantized& ref) {
  EXPECT_EQ(t.packed, ref.packed);
  if (t.double_quant) {
    EXPECT_EQ(t.offset, ref.offset);
    EXPECT_TRUE(bitwise_equal(t.nested_absmax, ref.nested_absmax));
    EXPECT_EQ(t.absmax_codes, ref.absmax_codes);
  } else {
    EXPECT_TRUE(bitwise_equal(t.absmax, ref.absmax));
  }
  EXPECT_TRUE(bitwise_equal(ranktune::nf4_dequantize(t), ref_dequantize(t)));
}

// ---- the tables --------------------------------------------------------------------------------

TEST(Nf4, CodeTableIsThePublishedOne) {
  for (int i = 0; i < 16; ++i) {
    EXPECT_EQ(kNf4Code[static_cast<size_t>(i)], static_cast<float>(kPublishedNf4[i])) << i;
    // The published digits are float values printed in full: nothing is lost in float.
    EXPECT_EQ(static_cast<double>(kNf4Code[static_cast<size_t>(i)]), kPublishedNf4[i]) << i;
  }
  for (int i = 0; i < 15; ++i) {
    EXPECT_EQ(ranktune::kNf4Thresholds[static_cast<size_t>(i)], static_cast<float>(kBnbTreeThresholds[i])) << i;
    EXPECT_EQ(kBnbTreeThresholds[i], (kPublishedNf4[i] + kPublishedNf4[i + 1]) / 2) << i;
  }
}

TEST(Nf4, NestedMapIsTheSignedDynamicMap) {
  const auto& map = ranktune::nf4_nested_quant_map();
  EXPECT_TRUE(std::is_sorted(map.begin(), map.end()));
  EXPECT_EQ(std::adjacent_find(map.begin(), map.end()), map.end()) << "entries are distinct";
  EXPECT_EQ(map[127], 0.0f);  // 127 negative entries below 0
  EXPECT_EQ(map[255], 1.0f);
  EXPECT_FLOAT_EQ(map[0], -0.99296875f);     // -(0.9859375 + 1) / 2, the top decade's last midpoint
  EXPECT_FLOAT_EQ(map[128], 1e-6f * 0.55f);  // the smallest decade's single midpoint
  // Bitwise equality with bnb's own map is checked against the fixture below.
}

TEST(Nf4, ValueCodesFollowTheThresholdsWithTiesDown) {
  for (int i = 0; i < 15; ++i) {
    const float t = ranktune::kNf4Thresholds[static_cast<size_t>(i)];
    EXPECT_EQ(ranktune::nf4_quantize_value(t), i) << "a tie goes to the lower code";
    EXPECT_EQ(ranktune::nf4_quantize_value(std::nextafter(t, 2.0f)), i + 1);
    EXPECT_EQ(ranktune::nf4_quantize_value(std::nextafter(t, -2.0f)), i);
  }
  for (int i = 0; i < 16; ++i) EXPECT_EQ(ranktune::nf4_quantize_value(kNf4Code[static_cast<size_t>(i)]), i);
  EXPECT_EQ(ranktune::nf4_quantize_value(-1.5f), 0);
  EXPECT_EQ(ranktune::nf4_quantize_value(1.5f), 15);
  EXPECT_EQ(ranktune::nf4_quantize_value(std::numeric_limits<float>::quiet_NaN()), 0);
  std::mt19937 rng(7);
  std::uniform_real_distribution<float> u(-1.1f, 1.1f);
  for (int k = 0; k < 100000; ++k) {
    const float x = u(rng);
    ASSERT_EQ(ranktune::nf4_quantize_value(x), ref_nf4_code(x)) << x;
  }
}

TEST(Nf4, NestedCodesMatchBnbSearchIncludingTies) {
  const auto& map = ranktune::nf4_nested_quant_map();
  std::vector<float> probes = {-2.0f, -1.0f, -0.0f, 0.0f, 1.0f, 2.0f};
  for (size_t k = 0; k < 256; ++k) {
    probes.push_back(map[k]);
    if (k + 1 < 256) {
      const float mid = (map[k] + map[k + 1]) * 0.5f;
      probes.insert(probes.end(), {mid, std::nextafter(mid, 2.0f), std::nextafter(mid, -2.0f)});
      // On the midpoint exactly bnb keeps the even index of the pair.
      EXPECT_EQ(ranktune::nf4_nested_quantize_value(map, mid), static_cast<int>(k % 2 == 0 ? k : k + 1)) << k;
    }
  }
  std::mt19937 rng(11);
  std::uniform_real_distribution<float> u(-1.05f, 1.05f);
  for (int i = 0; i < 100000; ++i) probes.push_back(u(rng) * std::pow(10.0f, -static_cast<float>(i % 7)));
  for (float x : probes) ASSERT_EQ(ranktune::nf4_nested_quantize_value(map, x), ref_dynamic_code(map, x)) << x;
}

// ---- quantize / dequantize ---------------------------------------------------------------------

TEST(Nf4, QuantizeMatchesReference) {
  const std::vector<std::vector<int64_t>> shapes = {{64, 320}, {33, 65}, {3, 64 * 300 + 5}, {1},
                                                    {7},       {64},     {2, 64 * 256},     {128, 192}};
  uint32_t seed = 1;
  for (const auto& shape : shapes) {
    for (bool double_quant : {true, false}) {
      SCOPED_TRACE(::testing::Message() << "numel " << product(shape) << " double_quant " << double_quant);
      const std::vector<float> w = random_weights(static_cast<size_t>(product(shape)), seed++);
      const Nf4Tensor t = ranktune::nf4_quantize(w, shape, double_quant);
      EXPECT_EQ(t.shape, shape);
      EXPECT_EQ(t.dtype, "float32");
      EXPECT_EQ(t.double_quant, double_quant);
      expect_matches_reference(t, ref_quantize(w, double_quant));

      const std::vector<uint16_t> w16 = to_bf16(w);
      const Nf4Tensor t16 = ranktune::nf4_quantize_bf16(w16, shape, double_quant);
      EXPECT_EQ(t16.dtype, "bfloat16");
      expect_matches_reference(t16, ref_quantize(widen(w16), double_quant));
    }
  }
}

TEST(Nf4, PackingOrderPaddingAndZeroBlocks) {
  // Block 0: codes 0..15 twice over (absmax 1 makes the scaled values the codes themselves);
  // block 1: all zeros; block 2: three values (a partial, odd block).
  std::vector<float> w;
  for (int rep = 0; rep < 4; ++rep)
    for (int i = 0; i < 16; ++i) w.push_back(kNf4Code[static_cast<size_t>(i)]);
  w.resize(128, 0.0f);
  w.insert(w.end(), {0.5f, -0.25f, 0.125f});
  const Nf4Tensor t = ranktune::nf4_quantize(w, {static_cast<int64_t>(w.size())}, false);
  ASSERT_EQ(t.packed.size(), 66u);
  EXPECT_EQ(t.packed[0], 0x01);  // element 0 in the high nibble, element 1 in the low one
  EXPECT_EQ(t.packed[7], 0xEF);
  for (size_t j = 32; j < 64; ++j) EXPECT_EQ(t.packed[j], 0x77) << "zeros are code 7";
  EXPECT_EQ(t.absmax[1], 0.0f);
  EXPECT_EQ(t.packed[65] & 0xF, 7) << "the padding nibble is the zero code";
  const std::vector<float> back = ranktune::nf4_dequantize(t);
  for (size_t i = 0; i < 64; ++i) EXPECT_EQ(back[i], w[i]);
  for (size_t i = 64; i < 128; ++i) EXPECT_EQ(back[i], 0.0f);
  EXPECT_EQ(back[128], 0.5f);  // the block's absmax is exact
}

TEST(Nf4, ResultDoesNotDependOnThreadCount) {
  const std::vector<float> w = random_weights(64 * 1000 + 17, 99);
  const int saved = omp_get_max_threads();
  omp_set_num_threads(1);
  const Nf4Tensor one = ranktune::nf4_quantize(w, {static_cast<int64_t>(w.size())});
  omp_set_num_threads(3);
  const Nf4Tensor three = ranktune::nf4_quantize(w, {static_cast<int64_t>(w.size())});
  omp_set_num_threads(saved);
  EXPECT_EQ(one.packed, three.packed);
  EXPECT_EQ(one.absmax_codes, three.absmax_codes);
  EXPECT_EQ(one.offset, three.offset);
  EXPECT_TRUE(bitwise_equal(one.nested_absmax, three.nested_absmax));
}

// Each value is off by at most half the widest NF4 gap (between -1 and -0.6962) times its block's
// absmax, plus the error of the block's scale when that is itself quantized.
TEST(Nf4, RoundTripErrorIsBounded) {
  float half_gap = 0;
  for (size_t i = 0; i + 1 < 16; ++i) half_gap = std::max(half_gap, (kNf4Code[i + 1] - kNf4Code[i]) / 2);
  EXPECT_NEAR(half_gap, 0.15190, 1e-5);  // between -1 and -0.6962
  for (bool double_quant : {false, true}) {
    const std::vector<float> w = random_weights(64 * 2000, 5);
    const Nf4Tensor t = ranktune::nf4_quantize(w, {2000, 64}, double_quant);
    const std::vector<float> back = ranktune::nf4_dequantize(t);
    const std::vector<float> scales = ranktune::nf4_block_scales(t);
    double err2 = 0, ref2 = 0;
    for (size_t i = 0; i < w.size(); ++i) {
      float absmax = 0;
      for (size_t j = i / 64 * 64; j < i / 64 * 64 + 64; ++j) absmax = std::max(absmax, std::fabs(w[j]));
      const float bound = half_gap * absmax * 1.000001f + std::fabs(scales[i / 64] - absmax);
      ASSERT_LE(std::fabs(back[i] - w[i]), bound) << i;
      err2 += double(back[i] - w[i]) * (back[i] - w[i]);
      ref2 += double(w[i]) * w[i];
    }
    std::printf("NF4 round trip: relative RMS error %.4f (double_quant %d)\n", std::sqrt(err2 / ref2), double_quant);
    EXPECT_LT(std::sqrt(err2 / ref2), 0.14) << "double_quant " << double_quant;
  }
}

// The nested 8-bit quantization moves each block's scale by at most half the widest gap of the
// dynamic map times the nested absmax (max |absmax - offset| over its 256 blocks).
TEST(Nf4, DoubleQuantizedAbsmaxIsClose) {
  const auto& map = ranktune::nf4_nested_quant_map();
  float half_gap = 0;
  for (size_t k = 0; k + 1 < 256; ++k) half_gap = std::max(half_gap, (map[k + 1] - map[k]) / 2);
  EXPECT_LT(half_gap, 0.0071f);
  const std::vector<float> w = random_weights(64 * 3000, 8);
  const Nf4Tensor plain = ranktune::nf4_quantize(w, {3000, 64}, false);
  const Nf4Tensor nested = ranktune::nf4_quantize(w, {3000, 64}, true);
  EXPECT_EQ(plain.packed, nested.packed) << "double quantization changes only the scales";
  const std::vector<float> scales = ranktune::nf4_block_scales(nested);
  double max_rel = 0, sum_rel = 0;
  for (size_t b = 0; b < scales.size(); ++b) {
    const float absmax = plain.absmax[b];
    const float bound = half_gap * nested.nested_absmax[b / 256] * 1.001f + 1e-7f * absmax;
    ASSERT_LE(std::fabs(scales[b] - absmax), bound) << b;
    max_rel = std::max(max_rel, double(std::fabs(scales[b] - absmax)) / absmax);
    sum_rel += double(std::fabs(scales[b] - absmax)) / absmax;
  }
  std::printf("double quantization: relative absmax error mean %.5f max %.5f\n", sum_rel / scales.size(), max_rel);
  EXPECT_GT(max_rel, 0.0) << "the scales really went through 8 bits";
}

// ---- the bnb-4bit loader -----------------------------------------------------------------------

struct Entry {
  StDType dtype;
  std::vector<int64_t> shape;
  std::vector<uint8_t> bytes;
};
using Entries = std::map<std::string, Entry>;

template <class T>
std::vector<uint8_t> raw(const T* data, size_t n) {
  std::vector<uint8_t> out(n * sizeof(T));
  std::memcpy(out.data(), data, out.size());
  return out;
}

// What bnb's save_pretrained writes for one weight.
Entries bnb_entries(const std::string& weight, const Nf4Tensor& t) {
  Entries e;
  e[weight] = {StDType::u8, {static_cast<int64_t>(t.packed.size()), 1}, t.packed};
  e[weight + ".quant_map"] = {StDType::f32, {16}, raw(kNf4Code.data(), 16)};
  const std::string json = ranktune::bnb_nf4_quant_state_json(t);
  e[weight + ".quant_state.bitsandbytes__nf4"] = {
      StDType::u8, {static_cast<int64_t>(json.size())}, raw(json.data(), json.size())};
  if (t.double_quant) {
    e[weight + ".absmax"] = {StDType::u8, {t.n_blocks()}, t.absmax_codes};
    e[weight + ".nested_absmax"] = {
        StDType::f32, {t.n_nested_blocks()}, raw(t.nested_absmax.data(), t.nested_absmax.size())};
    e[weight + ".nested_quant_map"] = {StDType::f32, {256}, raw(t.nested_quant_map.data(), 256)};
  } else {
    e[weight + ".absmax"] = {StDType::f32, {t.n_blocks()}, raw(t.absmax.data(), t.absmax.size())};
  }
  return e;
}

void write_entries(const std::string& path, const Entries& entries) {
  ranktune::SafetensorsWriter writer;
  for (const auto& [name, e] : entries) writer.add_borrowed(name, e.dtype, e.shape, e.bytes.data(), e.bytes.size());
  writer.write(path);
}

void set_json(Entries& e, const std::string& weight, const std::string& json) {
  e[weight + ".quant_state.bitsandbytes__nf4"] = {
      StDType::u8, {static_cast<int64_t>(json.size())}, raw(json.data(), json.size())};
}

class Nf4Loader : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = fresh_temp_dir("nf4_loader");
    tensor_ = ranktune::nf4_quantize(random_weights(48 * 300, 3), {48, 300});
    entries_ = bnb_entries(kWeight, tensor_);
  }
  void TearDown() override { std::filesystem::remove_all(dir_); }

  // Loading `entries_` fails with a message containing each of `parts`.
  void expect_error(const std::vector<std::string>& parts) {
    const std::string path = dir_ + "/bad.safetensors";
    write_entries(path, entries_);
    const ranktune::SafetensorsFile file(path);
    try {
      ranktune::load_bnb_nf4(file, kWeight);
      ADD_FAILURE() << "expected a UserError";
    } catch (const ranktune::UserError& e) {
      const std::string msg = e.what();
      for (const std::string& part : parts) EXPECT_NE(msg.find(part), std::string::npos) << msg;
      EXPECT_NE(msg.find(path), std::string::npos) << msg;
    }
  }

  static constexpr const char* kWeight = "model.layers.3.mlp.gate_proj.weight";
  std::string dir_;
  Nf4Tensor tensor_;
  Entries entries_;
};

void expect_same(const Nf4Tensor& a, const Nf4Tensor& b) {
  EXPECT_EQ(a.shape, b.shape);
  EXPECT_EQ(a.dtype, b.dtype);
  EXPECT_EQ(a.double_quant, b.double_quant);
  EXPECT_EQ(a.packed, b.packed);
  EXPECT_EQ(a.absmax_codes, b.absmax_codes);
  EXPECT_TRUE(bitwise_equal(a.nested_absmax, b.nested_absmax));
  EXPECT_TRUE(bitwise_equal(a.absmax, b.absmax));
  EXPECT_EQ(a.offset, b.offset);
  if (a.double_quant) {
    EXPECT_EQ(a.nested_quant_map, b.nested_quant_map);
  }
}

TEST_F(Nf4Loader, RoundTripsThroughAFileAndACheckpointDirectory) {
  const Nf4Tensor plain = ranktune::nf4_quantize_bf16(to_bf16(random_weights(33 * 65, 4)), {33, 65}, false);
  Entries both = entries_;
  both.merge(bnb_entries("lm.other.weight", plain));
  write_entries(dir_ + "/model.safetensors", both);
  const ranktune::SafetensorsFile file(dir_ + "/model.safetensors");
  EXPECT_TRUE(ranktune::is_bnb_nf4(file, kWeight));
  EXPECT_FALSE(ranktune::is_bnb_nf4(file, kWeight + std::string(".absmax")));
  expect_same(ranktune::load_bnb_nf4(file, kWeight), tensor_);
  expect_same(ranktune::load_bnb_nf4(file, "lm.other.weight"), plain);

  const ranktune::HfCheckpoint checkpoint(dir_);
  EXPECT_TRUE(ranktune::is_bnb_nf4(checkpoint, kWeight));
  expect_same(ranktune::load_bnb_nf4(checkpoint, kWeight), tensor_);
}

TEST_F(Nf4Loader, AcceptsOtherPackedStorageDtypes) {
  // bnb's quant_storage=torch.bfloat16 stores the same bytes as BF16 [n/2, 1].
  Entry& packed = entries_[kWeight];
  packed.dtype = StDType::bf16;
  packed.shape = {static_cast<int64_t>(packed.bytes.size() / 2), 1};
  write_entries(dir_ + "/bf16.safetensors", entries_);
  expect_same(ranktune::load_bnb_nf4(ranktune::SafetensorsFile(dir_ + "/bf16.safetensors"), kWeight), tensor_);
}

TEST_F(Nf4Loader, MissingQuantState) {
  entries_.erase(std::string(kWeight) + ".quant_state.bitsandbytes__nf4");
  expect_error({kWeight, "quant_state.bitsandbytes__nf4", "is missing", "not a bitsandbytes NF4"});
}

TEST_F(Nf4Loader, Fp4QuantState) {
  auto node = entries_.extract(std::string(kWeight) + ".quant_state.bitsandbytes__nf4");
  node.key() = std::string(kWeight) + ".quant_state.bitsandbytes__fp4";
  entries_.insert(std::move(node));
  expect_error({"bitsandbytes__fp4", "FP4", "NF4 only"});
}

TEST_F(Nf4Loader, MissingAbsmax) {
  entries_.erase(std::string(kWeight) + ".absmax");
  expect_error({std::string(kWeight) + ".absmax'", "is missing"});
}

TEST_F(Nf4Loader, MissingNestedQuantMap) {
  entries_.erase(std::string(kWeight) + ".nested_quant_map");
  expect_error({std::string(kWeight) + ".nested_quant_map'", "is missing"});
}

TEST_F(Nf4Loader, WrongAbsmaxShape) {
  entries_[std::string(kWeight) + ".absmax"].shape = {225, 1};
  expect_error({".absmax'", "[225, 1]", "expected U8 [225]"});
}

TEST_F(Nf4Loader, WrongPackedSize) {
  Entry& packed = entries_[kWeight];
  packed.bytes.pop_back();
  packed.shape = {static_cast<int64_t>(packed.bytes.size()), 1};
  expect_error({"[7199, 1]", "[48, 300]", "needs 7200 bytes"});
}

TEST_F(Nf4Loader, QuantTypeNotNf4) {
  std::string json = ranktune::bnb_nf4_quant_state_json(tensor_);
  json.replace(json.find("\"nf4\""), 5, "\"fp4\"");
  set_json(entries_, kWeight, json);
  expect_error({"quant_type \"fp4\"", "NF4 only"});
}

TEST_F(Nf4Loader, BlocksizeNot64) {
  std::string json = ranktune::bnb_nf4_quant_state_json(tensor_);
  json.replace(json.find("\"blocksize\": 64"), 15, "\"blocksize\": 128");
  set_json(entries_, kWeight, json);
  expect_error({"blocksize 128", "blocksize 64 only"});
}

TEST_F(Nf4Loader, NestedBlocksizeNot256) {
  std::string json = ranktune::bnb_nf4_quant_state_json(tensor_);
  json.replace(json.find("\"nested_blocksize\": 256"), 23, "\"nested_blocksize\": 512");
  set_json(entries_, kWeight, json);
  expect_error({"nested_blocksize 512", "expected 256"});
}

TEST_F(Nf4Loader, QuantStateNotJson) {
  set_json(entries_, kWeight, "{\"quant_type\": \"nf4\", ");
  expect_error({"quant_state.bitsandbytes__nf4'", "is not valid JSON"});
}

TEST_F(Nf4Loader, QuantStateWithoutShape) {
  set_json(entries_, kWeight, "{\"quant_type\": \"nf4\", \"blocksize\": 64, \"dtype\": \"bfloat16\"}");
  expect_error({"no \"shape\""});
}

TEST_F(Nf4Loader, QuantMapNotNf4) {
  Entry& map = entries_[std::string(kWeight) + ".quant_map"];
  const float fp4_first = 0.0f;  // bnb's FP4 table starts with 0
  std::memcpy(map.bytes.data(), &fp4_first, 4);
  expect_error({".quant_map'", "is not the NF4 table", "entry 0"});
}

TEST_F(Nf4Loader, NestedAbsmaxNotF32) {
  Entry& nested = entries_[std::string(kWeight) + ".nested_absmax"];
  nested.dtype = StDType::f16;
  nested.bytes.resize(nested.bytes.size() / 2);
  expect_error({".nested_absmax'", "F16", "expected F32 [1]"});
}

TEST(Nf4, QuantStateJsonIsWhatBnbWrites) {
  Nf4Tensor t;
  t.shape = {2048, 8192};
  t.dtype = "bfloat16";
  t.offset = 0.0123456789f;
  EXPECT_EQ(ranktune::bnb_nf4_quant_state_json(t),
            "{\"quant_type\": \"nf4\", \"blocksize\": 64, \"dtype\": \"bfloat16\", \"shape\": [2048, "
            "8192], \"nested_blocksize\": 256, \"nested_dtype\": \"float32\", \"nested_offset\": "
            "0.012345679104328156}");
  t.offset = 2.5e-5f;  // Python's repr switches to exponent notation below 1e-4
  EXPECT_NE(ranktune::bnb_nf4_quant_state_json(t).find("\"nested_offset\": 2.499999936844688e-05}"), std::string::npos);
  t.offset = 3.0f;
  EXPECT_NE(ranktune::bnb_nf4_quant_state_json(t).find("\"nested_offset\": 3.0}"), std::string::npos);
  t.double_quant = false;
  EXPECT_EQ(ranktune::bnb_nf4_quant_state_json(t),
            "{\"quant_type\": \"nf4\", \"blocksize\": 64, \"dtype\": \"bfloat16\", \"shape\": [2048, "
            "8192]}");
}

// ---- against real bitsandbytes -----------------------------------------------------------------

struct FixtureCase {
  const char* prefix;
  bool bf16;
  bool double_quant;
};

// The nested 8-bit codes of `ours` against bnb's. bnb's CPU quantize_blockwise (which the fixture's
// nested absmax went through; there is no GPU where it is made) is not exactly nearest: for a value
// within ~1e-5 of the midpoint of two map entries it can pick the farther one (a scan of 200001
// values in [-1, 1] finds 102 such). Its CUDA kernel, which wrote the published bnb-4bit
// checkpoints, picks the nearer one, as ranktune does. So a code may differ only there, by one
// step, with ours the nearer.
void expect_nested_codes_match(const Nf4Tensor& ours, const Nf4Tensor& bnb, const std::vector<float>& absmax) {
  ASSERT_EQ(ours.absmax_codes.size(), bnb.absmax_codes.size());
  const auto& map = ranktune::nf4_nested_quant_map();
  size_t differing = 0;
  for (size_t b = 0; b < absmax.size(); ++b) {
    const int mine = ours.absmax_codes[b], theirs = bnb.absmax_codes[b];
    if (mine == theirs) continue;
    ++differing;
    const float x = (absmax[b] - bnb.offset) * (1.0f / bnb.nested_absmax[b / 256]);
    const size_t lo = static_cast<size_t>(std::min(mine, theirs));
    EXPECT_EQ(std::abs(mine - theirs), 1) << "block " << b;
    EXPECT_LT(std::fabs(x - (map[lo] + map[lo + 1]) * 0.5f), 1e-4f) << "block " << b;
    EXPECT_LT(std::fabs(x - map[static_cast<size_t>(mine)]), std::fabs(x - map[static_cast<size_t>(theirs)]))
        << "block " << b;
  }
  EXPECT_LE(differing, 2u);
  std::printf("nested absmax codes: %zu of %zu differ from bnb's CPU quantizer (near-midpoint)\n", differing,
              absmax.size());
}

// tools/make_nf4_fixture.py (bitsandbytes 0.50.2 on the CPU).
TEST(Nf4, MatchesBitsandbytesFixture) {
  const ranktune::SafetensorsFile file(std::string(RANKTUNE_FIXTURES) + "/nf4/bnb_nf4.safetensors");
  const FixtureCase cases[] = {{"model.layers.0.mlp.down_proj", false, true},
                               {"model.layers.1.self_attn.q_proj", true, true},
                               {"model.layers.1.self_attn.o_proj", false, false}};
  for (const FixtureCase& c : cases) {
    SCOPED_TRACE(c.prefix);
    const std::string weight = std::string(c.prefix) + ".weight";
    ASSERT_TRUE(ranktune::is_bnb_nf4(file, weight));
    const Nf4Tensor bnb = ranktune::load_bnb_nf4(file, weight);
    EXPECT_EQ(bnb.double_quant, c.double_quant);
    EXPECT_EQ(bnb.dtype, c.bf16 ? "bfloat16" : "float32");

    // Our quant state JSON is byte for byte bnb's.
    const auto state = file.bytes(weight + ".quant_state.bitsandbytes__nf4");
    EXPECT_EQ(std::string(reinterpret_cast<const char*>(state.data()), state.size()),
              ranktune::bnb_nf4_quant_state_json(bnb));
    if (c.double_quant) {
      EXPECT_EQ(bnb.nested_quant_map, ranktune::nf4_nested_quant_map())
          << "nf4_nested_quant_map() is bnb's create_dynamic_map(signed=True) bitwise";
    }

    // Our dequantization of bnb's codes is bnb's, bitwise (in bf16 where bnb wrote bf16).
    const std::vector<float> ours = ranktune::nf4_dequantize(bnb);
    if (c.bf16) {
      const std::vector<uint16_t> theirs = file.read_bf16(std::string(c.prefix) + ".dequantized");
      ASSERT_EQ(theirs.size(), ours.size());
      size_t mismatches = 0;
      for (size_t i = 0; i < ours.size(); ++i) mismatches += ranktune::f32_to_bf16(ours[i]) != theirs[i];
      EXPECT_EQ(mismatches, 0u);
    } else {
      EXPECT_TRUE(bitwise_equal(ours, file.read_f32(std::string(c.prefix) + ".dequantized")));
    }

    // Our quantization of the original is bnb's, byte for byte, given bnb's offset: that is
    // torch's fp32 mean of the absmax values, ours the exactly rounded mean, one ulp apart at most.
    const std::string original = std::string(c.prefix) + ".original";
    Nf4Tensor requantized = c.bf16 ? ranktune::nf4_quantize_bf16(file.read_bf16(original), bnb.shape, false)
                                   : ranktune::nf4_quantize(file.read_f32(original), bnb.shape, false);
    if (c.double_quant) {
      Nf4Tensor with_our_offset = requantized;
      ranktune::nf4_double_quantize(with_our_offset);
      EXPECT_LE(std::fabs(with_our_offset.offset - bnb.offset), std::nextafter(bnb.offset, 1.0f) - bnb.offset);
      const std::vector<float> absmax = requantized.absmax;
      ranktune::nf4_double_quantize(requantized, bnb.offset);
      expect_nested_codes_match(requantized, bnb, absmax);
      requantized.absmax_codes = bnb.absmax_codes;  // checked above; now everything else
    }
    expect_same(requantized, bnb);
  }
}

}  // namespace
