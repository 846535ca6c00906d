// NF4 quantization, dequantization and bnb-4bit checkpoint loading on the host (the format is
// described in include/ranktune/nf4.h). The rounding rules follow bitsandbytes' CUDA kernels
// (kQuantizeBlockwise with dQuantizeNF4 for the 4-bit codes, dQuantize for the nested 8-bit codes),
// since those wrote the checkpoints people train from.
#include "ranktune/nf4.h"

#include <algorithm>
#include <bit>
#include <charconv>
#include <cmath>
#include <cstring>
#include <nlohmann/json.hpp>
#include <optional>
#include <utility>

#include "ranktune/error.h"
#include "ranktune/tensor.h"

namespace ranktune {
namespace {

using json = nlohmann::json;

// ---- the nested 8-bit map --------------------------------------------------------------------

// torch.linspace(0.1, 1, steps) in float32: step = (end - start) / (steps - 1), the first half
// start + step * i and the second half end - step * (steps - 1 - i), each one fused multiply-add
// (torch's CPU kernel is compiled with FMA contraction; a plain multiply-add differs in the last
// bit of some entries).
std::vector<float> torch_linspace_f32(float start, float end, int steps) {
  std::vector<float> out(static_cast<size_t>(steps));
  const float step = (end - start) / static_cast<float>(steps - 1);
  const int halfway = steps / 2;
  for (int i = 0; i < steps; ++i)
    out[static_cast<size_t>(i)] = i < halfway ? std::fma(step, static_cast<float>(i), start)
                                              : std::fma(-step, static_cast<float>(steps - 1 - i), end);
  return out;
}

// create_dynamic_map(signed=True, max_exponent_bits=7, total_bits=8): for each decade 10^(i-6),
// i = 0..6, the 2^i midpoints of linspace(0.1, 1, 2^i + 1), times the decade in fp32 (a Python
// float times a float32 tensor computes in float32), and their negatives; then 0 and 1; sorted.
std::array<float, 256> make_signed_dynamic_map() {
  static constexpr double kDecades[7] = {1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0};
  std::vector<float> data;
  for (int i = 0; i < 7; ++i) {
    const std::vector<float> bounds = torch_linspace_f32(0.1f, 1.0f, (1 << i) + 1);
    const float decade = static_cast<float>(kDecades[i]);
    for (size_t j = 0; j + 1 < bounds.size(); ++j) {
      const float mean = (bounds[j] + bounds[j + 1]) / 2.0f;
      data.push_back(decade * mean);
      data.push_back(-decade * mean);
    }
  }
  data.push_back(0.0f);
  data.push_back(1.0f);
  RT_ASSERT(data.size() == 256, "the signed dynamic map has 256 entries");
  std::sort(data.begin(), data.end());
  std::array<float, 256> map{};
  std::copy(data.begin(), data.end(), map.begin());
  return map;
}

// The reciprocal bnb's kernels scale a block by. bnb's CPU path clamps absmax to 1e-38 first (its
// CUDA kernel would divide by zero for an all-zero block and give every element code 0, which
// dequantizes to -0.0 instead of 0.0: the only place the two differ).
float block_reciprocal(float absmax) { return 1.0f / std::max(absmax, 1e-38f); }

// fp32 a * b + c with two roundings, as bnb computes the nested scale (dequantize_blockwise, then
// absmax += offset: two kernels). The volatile keeps the compiler from fusing them into an FMA.
float mul_then_add(float a, float b, float c) {
  volatile float product = a * b;
  return product + c;
}

// ---- quantization ------------------------------------------------------------------------------

// Quantizes one block (zero-padded to kNf4BlockSize values) into n_bytes bytes; returns its absmax.
float quantize_block(const float (&block)[kNf4BlockSize], uint8_t* packed, int64_t n_bytes) {
  // The absmax as an integer max over the bit patterns without the sign: non-negative floats
  // order like their bits, and an integer max reduction vectorizes where a float one does not.
  uint32_t abs_bits = 0;
  for (int64_t i = 0; i < kNf4BlockSize; ++i)
    abs_bits = std::max(abs_bits, std::bit_cast<uint32_t>(block[i]) & 0x7FFFFFFFu);
  const float absmax = std::bit_cast<float>(abs_bits);

  // Codes as 32-bit counts (nf4_quantize_value's rule), so each threshold is one compare and one
  // masked add per vector; narrowed to nibbles at the end.
  const float scale = block_reciprocal(absmax);
  int32_t codes[kNf4BlockSize];
  for (int64_t i = 0; i < kNf4BlockSize; ++i) {
    const float x = block[i] * scale;
    int32_t code = 0;
    for (float t : kNf4Thresholds) code += x > t ? 1 : 0;
    codes[i] = code;
  }
  for (int64_t j = 0; j < n_bytes; ++j) packed[j] = static_cast<uint8_t>((codes[2 * j] << 4) | codes[2 * j + 1]);
  return absmax;
}

// Blocks in parallel with OpenMP; widen(begin, n, out) writes values [begin, begin + n) as floats.
template <class Widen>
Nf4Tensor quantize(int64_t numel, Widen widen, std::vector<int64_t> shape, const char* dtype, bool double_quant) {
  Nf4Tensor t;
  t.shape = std::move(shape);
  t.dtype = dtype;
  t.double_quant = false;
  RT_ASSERT(t.numel() == numel, "nf4_quantize: the shape's element count must equal values.size()");
  const int64_t n_blocks = t.n_blocks();
  t.packed.assign(static_cast<size_t>((numel + 1) / 2), 0);
  std::vector<float> absmax(static_cast<size_t>(n_blocks));

#pragma omp parallel for schedule(static)
  for (int64_t b = 0; b < n_blocks; ++b) {
    const int64_t begin = b * kNf4BlockSize;
    const int64_t valid = std::min(kNf4BlockSize, numel - begin);
    float block[kNf4BlockSize];
    widen(begin, valid, block);
    for (int64_t i = valid; i < kNf4BlockSize; ++i) block[i] = 0.0f;  // bnb pads with zeros
    absmax[static_cast<size_t>(b)] = quantize_block(block, t.packed.data() + begin / 2, (valid + 1) / 2);
  }

  t.absmax = std::move(absmax);
  if (double_quant) nf4_double_quantize(t);
  return t;
}

// ---- loading -----------------------------------------------------------------------------------

// The two readers the loader accepts, behind one shape: where an entry lives (for messages), its
// info and its bytes.
struct FileSource {
  const SafetensorsFile& file;
  bool contains(const std::string& name) const { return file.contains(name); }
  const SafetensorsFile& file_of(const std::string&) const { return file; }
};
struct CheckpointSource {
  const HfCheckpoint& checkpoint;
  bool contains(const std::string& name) const { return checkpoint.contains(name); }
  const SafetensorsFile& file_of(const std::string& name) const { return checkpoint.file_of(name); }
};

std::string shape_str(const std::vector<int64_t>& shape) {
  std::string s = "[";
  for (size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
  return s + "]";
}

template <class Source>
class Nf4Loader {
 public:
  Nf4Loader(const Source& source, const std::string& weight_name) : source_(source), weight_(weight_name) {}

  Nf4Tensor load() {
    const std::string state_name = weight_ + ".quant_state.bitsandbytes__nf4";
    if (!source_.contains(state_name)) {
      const std::string fp4 = weight_ + ".quant_state.bitsandbytes__fp4";
      if (source_.contains(fp4)) fail(fp4, "is an FP4 quant state; ranktune reads NF4 only (quant_type \"nf4\")");
      fail(state_name, "is missing: '" + weight_ + "' is not a bitsandbytes NF4 weight");
    }
    const json state = parse_state(state_name);

    const std::string quant_type = state_string(state_name, state, "quant_type");
    if (quant_type != "nf4") fail(state_name, "has quant_type \"" + quant_type + "\"; ranktune reads NF4 only");
    Nf4Tensor t;
    t.dtype = state_string(state_name, state, "dtype");
    if (t.dtype != "float32" && t.dtype != "bfloat16" && t.dtype != "float16")
      fail(state_name, "has dtype \"" + t.dtype + "\", expected float32, bfloat16 or float16");
    const int64_t blocksize = state_int(state_name, state, "blocksize");
    if (blocksize != kNf4BlockSize)
      fail(state_name, "has blocksize " + std::to_string(blocksize) + "; ranktune reads blocksize " +
                           std::to_string(kNf4BlockSize) + " only (bnb's default)");
    if (!state.contains("shape") || !state["shape"].is_array() || state["shape"].empty())
      fail(state_name, "has no \"shape\" list");
    for (const json& d : state["shape"]) {
      if (!d.is_number_integer() || d.get<int64_t>() <= 0)
        fail(state_name, "has a \"shape\" that is not a list of positive integers: " + state["shape"].dump());
      t.shape.push_back(d.get<int64_t>());
    }
    const int64_t numel = t.numel();

    // Packed codes: any storage dtype (bnb's quant_storage), [k, 1], ceil(numel/2) bytes.
    const StTensorInfo& packed = info(weight_);
    const uint64_t want_bytes = static_cast<uint64_t>((numel + 1) / 2);
    if (packed.nbytes() != want_bytes || packed.shape.size() != 2 || packed.shape[1] != 1)
      fail(weight_, "has dtype " + std::string(st_dtype_name(packed.dtype)) + " and shape " + packed.shape_str() +
                        " (" + std::to_string(packed.nbytes()) + " bytes); the quant state's shape " +
                        shape_str(t.shape) + " needs " + std::to_string(want_bytes) +
                        " bytes of packed codes as [n, 1]");
    const auto packed_bytes = bytes(weight_);
    t.packed.resize(want_bytes);
    std::memcpy(t.packed.data(), packed_bytes.data(), want_bytes);

    const std::vector<float> quant_map = read_f32_exact(weight_ + ".quant_map", {16});
    for (size_t i = 0; i < 16; ++i)
      if (quant_map[i] != kNf4Code[i])
        fail(weight_ + ".quant_map", "is not the NF4 table (entry " + std::to_string(i) + " is " +
                                         std::to_string(quant_map[i]) + ", NF4 has " + std::to_string(kNf4Code[i]) +
                                         ")");

    const int64_t n_blocks = t.n_blocks();
    t.double_quant = source_.contains(weight_ + ".nested_absmax");
    if (!t.double_quant) {
      t.absmax = read_f32_exact(weight_ + ".absmax", {n_blocks});
      return t;
    }
    const int64_t nested_blocksize = state_int(state_name, state, "nested_blocksize");
    if (nested_blocksize != kNf4NestedBlockSize)
      fail(state_name, "has nested_blocksize " + std::to_string(nested_blocksize) + ", expected " +
                           std::to_string(kNf4NestedBlockSize));
    if (state.contains("nested_dtype") && state["nested_dtype"] != "float32")
      fail(state_name, "has nested_dtype " + state["nested_dtype"].dump() + ", expected float32");
    if (!state.contains("nested_offset") || !state["nested_offset"].is_number())
      fail(state_name, "has no numeric \"nested_offset\"");
    // bnb writes the float32 offset as the Python float of it: exact.
    t.offset = static_cast<float>(state["nested_offset"].get<double>());

    const std::string absmax_name = weight_ + ".absmax";
    const StTensorInfo& absmax = info(absmax_name);
    if (absmax.dtype != StDType::u8 || absmax.shape != std::vector<int64_t>{n_blocks})
      fail(absmax_name, "has dtype " + std::string(st_dtype_name(absmax.dtype)) + " and shape " + absmax.shape_str() +
                            ", expected U8 [" + std::to_string(n_blocks) + "] (one 8-bit code per block of 64 of " +
                            shape_str(t.shape) + ")");
    const auto absmax_bytes = bytes(absmax_name);
    t.absmax_codes.resize(static_cast<size_t>(n_blocks));
    std::memcpy(t.absmax_codes.data(), absmax_bytes.data(), t.absmax_codes.size());
    t.nested_absmax = read_f32_exact(weight_ + ".nested_absmax", {t.n_nested_blocks()});
    const std::vector<float> nested_map = read_f32_exact(weight_ + ".nested_quant_map", {256});
    std::copy(nested_map.begin(), nested_map.end(), t.nested_quant_map.begin());
    return t;
  }

 private:
  [[noreturn]] void fail(const std::string& entry, const std::string& what) const {
    const std::string where = source_.contains(entry)     ? source_.file_of(entry).path()
                              : source_.contains(weight_) ? source_.file_of(weight_).path()
                                                          : std::string("the checkpoint");
    throw UserError("NF4 weight '" + weight_ + "': entry '" + entry + "' in " + where + " " + what);
  }

  const StTensorInfo& info(const std::string& name) const {
    if (!source_.contains(name)) fail(name, "is missing (bnb-4bit checkpoints have it)");
    return source_.file_of(name).info(name);
  }
  std::span<const std::byte> bytes(const std::string& name) const { return source_.file_of(name).bytes(name); }

  // An F32 entry of exactly this shape.
  std::vector<float> read_f32_exact(const std::string& name, const std::vector<int64_t>& shape) const {
    const StTensorInfo& ti = info(name);
    if (ti.dtype != StDType::f32 || ti.shape != shape)
      fail(name, "has dtype " + std::string(st_dtype_name(ti.dtype)) + " and shape " + ti.shape_str() +
                     ", expected F32 " + shape_str(shape));
    return source_.file_of(name).read_f32(name);
  }

  json parse_state(const std::string& name) const {
    const StTensorInfo& ti = info(name);
    if (ti.dtype != StDType::u8)
      fail(name, "has dtype " + std::string(st_dtype_name(ti.dtype)) + ", expected U8 (the bytes of a JSON object)");
    const auto raw = bytes(name);
    const std::string text(reinterpret_cast<const char*>(raw.data()), raw.size());
    json state;
    try {
      state = json::parse(text);
    } catch (const json::exception& e) {
      fail(name, std::string("is not valid JSON (") + e.what() + ")");
    }
    if (!state.is_object()) fail(name, "is not a JSON object: " + text);
    return state;
  }

  std::string state_string(const std::string& name, const json& state, const char* key) const {
    if (!state.contains(key) || !state[key].is_string()) fail(name, std::string("has no string \"") + key + "\"");
    return state[key].get<std::string>();
  }
  int64_t state_int(const std::string& name, const json& state, const char* key) const {
    if (!state.contains(key) || !state[key].is_number_integer())
      fail(name, std::string("has no integer \"") + key + "\"");
    return state[key].get<int64_t>();
  }

  const Source& source_;
  std::string weight_;
};

// Python's repr of a double (json.dumps writes floats so): the shortest round-trip digits, fixed
// notation for decimal exponents -4..15 (with ".0" on integers), otherwise d.ddde[+-]XX.
std::string python_float_repr(double x) {
  if (x == 0.0) return std::signbit(x) ? "-0.0" : "0.0";
  char buf[64];
  const auto res = std::to_chars(buf, buf + sizeof(buf), x, std::chars_format::scientific);
  std::string sci(buf, res.ptr);  // "-d.ddde-XX"
  const size_t e_pos = sci.find('e');
  std::string mantissa = sci.substr(0, e_pos);
  const int exponent = std::stoi(sci.substr(e_pos + 1));
  const bool negative = mantissa[0] == '-';
  if (negative) mantissa.erase(0, 1);
  std::string digits;
  for (char c : mantissa)
    if (c != '.') digits += c;
  std::string out;
  if (exponent >= -4 && exponent < 16) {
    if (exponent < 0) {
      out = "0." + std::string(static_cast<size_t>(-exponent - 1), '0') + digits;
    } else if (static_cast<int>(digits.size()) <= exponent + 1) {
      out = digits + std::string(static_cast<size_t>(exponent + 1) - digits.size(), '0') + ".0";
    } else {
      out =
          digits.substr(0, static_cast<size_t>(exponent + 1)) + "." + digits.substr(static_cast<size_t>(exponent + 1));
    }
  } else {
    out = digits.substr(0, 1);
    if (digits.size() > 1) out += "." + digits.substr(1);
    const std::string exp_digits = std::to_string(std::abs(exponent));
    out += std::string("e") + (exponent < 0 ? "-" : "+") + (exp_digits.size() < 2 ? "0" : "") + exp_digits;
  }
  return negative ? "-" + out : out;
}

}  // namespace

const std::array<float, 256>& nf4_nested_quant_map() {
  static const std::array<float, 256> map = make_signed_dynamic_map();
  return map;
}

// bnb's dQuantize<0> searches from pivot 127 in steps 64, 32, ..., 1, so it always ends on an even
// pivot, with x bracketed by the pivot and a neighbour; it then compares x with their fp32 midpoint
// and keeps the pivot when x is exactly on it. The same result from a plain lower bound:
uint8_t nf4_nested_quantize_value(const std::array<float, 256>& map, float x) {
  // lo = the first index with map[lo] >= x (256 if none) = the count of entries below x: first
  // over the last entries of the 16 runs of 16, then within the run x falls in. Two 16-wide counts
  // vectorize; a binary search's branches would mispredict on every other step.
  int run = 0;
  for (int r = 0; r < 16; ++r) run += map[static_cast<size_t>(16 * r + 15)] < x ? 1 : 0;
  int within = 0;
  if (run < 16)
    for (int k = 0; k < 16; ++k) within += map[static_cast<size_t>(16 * run + k)] < x ? 1 : 0;
  const size_t lo = static_cast<size_t>(16 * run + within);
  if (lo == 0) return 0;
  if (lo == 256) return 255;
  const size_t k = lo - 1;
  const float midpoint = (map[k] + map[k + 1]) * 0.5f;
  if (x > midpoint) return static_cast<uint8_t>(k + 1);
  if (x < midpoint) return static_cast<uint8_t>(k);
  return static_cast<uint8_t>(k % 2 == 0 ? k : k + 1);
}

int64_t Nf4Tensor::numel() const {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

Nf4Tensor nf4_quantize(std::span<const float> values, std::vector<int64_t> shape, bool double_quant) {
  const float* src = values.data();
  return quantize(
      static_cast<int64_t>(values.size()),
      [src](int64_t begin, int64_t n, float* out) {
        std::memcpy(out, src + begin, sizeof(float) * static_cast<size_t>(n));
      },
      std::move(shape), "float32", double_quant);
}

Nf4Tensor nf4_quantize_bf16(std::span<const uint16_t> values, std::vector<int64_t> shape, bool double_quant) {
  const uint16_t* src = values.data();
  return quantize(
      static_cast<int64_t>(values.size()),
      [src](int64_t begin, int64_t n, float* out) {  // bf16 is the top half of an f32
        for (int64_t i = 0; i < n; ++i) out[i] = std::bit_cast<float>(static_cast<uint32_t>(src[begin + i]) << 16);
      },
      std::move(shape), "bfloat16", double_quant);
}

void nf4_double_quantize(Nf4Tensor& t, std::optional<float> offset) {
  RT_ASSERT(!t.double_quant && static_cast<int64_t>(t.absmax.size()) == t.n_blocks(),
            "nf4_double_quantize: needs a tensor with fp32 absmax");
  const std::vector<float> absmax = std::move(t.absmax);
  t.absmax.clear();
  t.double_quant = true;
  const int64_t n_blocks = static_cast<int64_t>(absmax.size());

  // offset = mean(absmax): per-chunk double sums in a fixed chunking, added in order, so the
  // result does not depend on the thread count.
  if (offset) {
    t.offset = *offset;
  } else {
    constexpr int64_t kChunk = 1 << 16;
    const int64_t n_chunks = (n_blocks + kChunk - 1) / kChunk;
    std::vector<double> partial(static_cast<size_t>(n_chunks), 0.0);
#pragma omp parallel for schedule(static)
    for (int64_t c = 0; c < n_chunks; ++c) {
      double sum = 0.0;
      for (int64_t b = c * kChunk; b < std::min(n_blocks, (c + 1) * kChunk); ++b) sum += absmax[static_cast<size_t>(b)];
      partial[static_cast<size_t>(c)] = sum;
    }
    double total = 0.0;
    for (double p : partial) total += p;
    t.offset = n_blocks > 0 ? static_cast<float>(total / static_cast<double>(n_blocks)) : 0.0f;
  }

  // The centred absmax values, quantized blockwise (256) with the signed dynamic map.
  t.nested_quant_map = nf4_nested_quant_map();
  const int64_t n_nested = t.n_nested_blocks();
  t.absmax_codes.assign(static_cast<size_t>(n_blocks), 0);
  t.nested_absmax.assign(static_cast<size_t>(n_nested), 0.0f);
#pragma omp parallel for schedule(static)
  for (int64_t g = 0; g < n_nested; ++g) {
    const int64_t begin = g * kNf4NestedBlockSize;
    const int64_t end = std::min(n_blocks, begin + kNf4NestedBlockSize);
    float centred[kNf4NestedBlockSize];
    float nested_max = 0.0f;
    for (int64_t b = begin; b < end; ++b) {
      centred[b - begin] = absmax[static_cast<size_t>(b)] - t.offset;
      nested_max = std::max(nested_max, std::fabs(centred[b - begin]));
    }
    t.nested_absmax[static_cast<size_t>(g)] = nested_max;
    const float scale = block_reciprocal(nested_max);
    for (int64_t b = begin; b < end; ++b)
      t.absmax_codes[static_cast<size_t>(b)] =
          nf4_nested_quantize_value(t.nested_quant_map, centred[b - begin] * scale);
  }
}

std::vector<float> nf4_block_scales(const Nf4Tensor& t) {
  const int64_t n_blocks = t.n_blocks();
  if (!t.double_quant) {
    RT_ASSERT(static_cast<int64_t>(t.absmax.size()) == n_blocks, "Nf4Tensor: absmax size");
    return t.absmax;
  }
  RT_ASSERT(static_cast<int64_t>(t.absmax_codes.size()) == n_blocks &&
                static_cast<int64_t>(t.nested_absmax.size()) == t.n_nested_blocks(),
            "Nf4Tensor: absmax_codes / nested_absmax sizes");
  std::vector<float> scales(static_cast<size_t>(n_blocks));
  for (int64_t b = 0; b < n_blocks; ++b)
    scales[static_cast<size_t>(b)] =
        mul_then_add(t.nested_quant_map[t.absmax_codes[static_cast<size_t>(b)]],
                     t.nested_absmax[static_cast<size_t>(b / kNf4NestedBlockSize)], t.offset);
  return scales;
}

void nf4_dequantize(const Nf4Tensor& t, std::span<float> out) {
  const int64_t numel = t.numel();
  RT_ASSERT(static_cast<int64_t>(out.size()) == numel, "nf4_dequantize: out must hold numel values");
  RT_ASSERT(static_cast<int64_t>(t.packed.size()) == (numel + 1) / 2, "Nf4Tensor: packed size");
  const std::vector<float> scales = nf4_block_scales(t);
  const int64_t n_blocks = t.n_blocks();
#pragma omp parallel for schedule(static)
  for (int64_t b = 0; b < n_blocks; ++b) {
    const float scale = scales[static_cast<size_t>(b)];
    const int64_t begin = b * kNf4BlockSize;
    const int64_t valid = std::min(kNf4BlockSize, numel - begin);
    const uint8_t* packed = t.packed.data() + begin / 2;
    float* dst = out.data() + begin;
    for (int64_t j = 0; j < valid / 2; ++j) {
      dst[2 * j] = kNf4Code[packed[j] >> 4] * scale;
      dst[2 * j + 1] = kNf4Code[packed[j] & 0xF] * scale;
    }
    if (valid % 2) dst[valid - 1] = kNf4Code[packed[valid / 2] >> 4] * scale;
  }
}

std::vector<float> nf4_dequantize(const Nf4Tensor& t) {
  std::vector<float> out(static_cast<size_t>(t.numel()));
  nf4_dequantize(t, out);
  return out;
}

bool is_bnb_nf4(const SafetensorsFile& file, const std::string& weight_name) {
  return file.contains(weight_name + ".quant_state.bitsandbytes__nf4");
}

bool is_bnb_nf4(const HfCheckpoint& checkpoint, const std::string& weight_name) {
  return checkpoint.contains(weight_name + ".quant_state.bitsandbytes__nf4");
}

Nf4Tensor load_bnb_nf4(const SafetensorsFile& file, const std::string& weight_name) {
  const FileSource source{file};
  return Nf4Loader<FileSource>(source, weight_name).load();
}

Nf4Tensor load_bnb_nf4(const HfCheckpoint& checkpoint, const std::string& weight_name) {
  const CheckpointSource source{checkpoint};
  return Nf4Loader<CheckpointSource>(source, weight_name).load();
}

std::string bnb_nf4_quant_state_json(const Nf4Tensor& t) {
  // QuantState.as_dict's order: quant_type, blocksize, dtype, shape, then the nested items.
  std::string s = "{\"quant_type\": \"nf4\", \"blocksize\": " + std::to_string(kNf4BlockSize) + ", \"dtype\": \"" +
                  t.dtype + "\", \"shape\": " + shape_str(t.shape);
  if (t.double_quant)
    s += ", \"nested_blocksize\": " + std::to_string(kNf4NestedBlockSize) +
         ", \"nested_dtype\": \"float32\", \"nested_offset\": " + python_float_repr(static_cast<double>(t.offset));
  return s + "}";
}

}  // namespace ranktune
