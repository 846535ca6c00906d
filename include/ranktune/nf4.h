// NF4 4-bit weights for QLoRA, stored bit for bit as bitsandbytes stores them
// (bnb.functional.quantize_4bit(quant_type="nf4", blocksize=64), and with compress_statistics=True
// its double quantization of the block scales), so that ranktune quantizes a full-precision
// checkpoint to the same bytes as bitsandbytes and loads "-bnb-4bit" checkpoints as they are.
//
// The format, for a weight of numel elements in row-major order, cut into blocks of 64:
//  * absmax[b] = max |w| over block b; each w / absmax[b] (scaled by the fp32 reciprocal, as bnb's
//    kernel does) becomes the index of the nearest of the 16 NF4 values (kNf4Code); an exact tie
//    between two neighbours goes to the lower one.
//  * Two codes per byte: element 2j in the HIGH nibble of byte j, 2j+1 in the low nibble; an odd
//    numel pads the last low nibble with code 7 (the 0.0 entry), as bnb's zero-padded load does.
//  * Double quantization: offset = mean(absmax); the values absmax[b] - offset are quantized again
//    with 8-bit blockwise dynamic quantization (blocks of 256, the signed dynamic map of
//    bnb.functional.create_dynamic_map(signed=True)), giving one u8 code per block and one fp32
//    "nested absmax" per 256 blocks. Without it, absmax stays fp32.
//  * Dequantization: scale[b] = nested_map[code[b]] * nested_absmax[b / 256] + offset (two fp32
//    roundings, no fused multiply-add), then w = kNf4Code[c] * scale[b] in fp32 (bnb then casts to
//    the checkpoint's dtype; the GPU kernel in kernels/nf4.cu writes bf16 of the same fp32 value).
//
// A bnb-4bit checkpoint holds, for each quantized linear weight W ("model.layers.0.mlp.up_proj.weight"):
//   W                                    packed codes, [ceil(numel/2), 1] U8
//   W.absmax                             U8 [n_blocks] (double quantization) or F32 [n_blocks]
//   W.quant_map                          F32 [16], the NF4 table
//   W.nested_absmax, W.nested_quant_map  F32 [ceil(n_blocks/256)], F32 [256] (double quantization)
//   W.quant_state.bitsandbytes__nf4      U8 bytes of a JSON object: quant_type, blocksize, dtype,
//                                        shape and, with double quantization, nested_blocksize,
//                                        nested_dtype, nested_offset
#pragma once
#include <array>
#include <cstdint>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "ranktune/safetensors.h"

namespace ranktune {

inline constexpr int64_t kNf4BlockSize = 64;         // elements per absmax
inline constexpr int64_t kNf4NestedBlockSize = 256;  // absmax values per nested absmax

// The NF4 values (QLoRA, Dettmers et al. 2023), ascending; the 4-bit code is the index. Every value
// is exactly representable as a float.
// clang-format off
inline constexpr std::array<float, 16> kNf4Code = {
    -1.0f, -0.6961928009986877f, -0.5250730514526367f, -0.39491748809814453f,
    -0.28444138169288635f, -0.18477343022823334f, -0.09105003625154495f, 0.0f,
    0.07958029955625534f, 0.16093020141124725f, 0.24611230194568634f, 0.33791524171829224f,
    0.44070982933044434f, 0.5626170039176941f, 0.7229568362236023f, 1.0f};
// clang-format on

// The decision thresholds: the fp32 midpoints of neighbouring codes (the constants of bnb's
// dQuantizeNF4 decision tree, which are these midpoints rounded to float).
inline constexpr std::array<float, 15> kNf4Thresholds = [] {
  std::array<float, 15> t{};
  for (size_t i = 0; i < t.size(); ++i) t[i] = (kNf4Code[i] + kNf4Code[i + 1]) * 0.5f;
  return t;
}();

// The NF4 code of x (x = w / absmax, in [-1, 1]): the number of thresholds strictly below x, which
// is where bnb's decision tree (`if (x > threshold)` at every node) ends. NaN gives 0, as there.
inline uint8_t nf4_quantize_value(float x) {
  int code = 0;
  for (float t : kNf4Thresholds) code += x > t ? 1 : 0;
  return static_cast<uint8_t>(code);
}

// bnb.functional.create_dynamic_map(signed=True), bitwise: the 256-entry map of the nested 8-bit
// quantization, ascending, from -0.99297 to 1.0. (Computed as torch computes it: linspace with a
// fused multiply-add, the decade scale applied in fp32.)
const std::array<float, 256>& nf4_nested_quant_map();

// The nested 8-bit code of x (x = (absmax - offset) / nested_absmax) in a sorted 256-entry map, as
// bnb's CUDA dQuantize gives it: the nearer of the two entries around x by the fp32 midpoint
// (map[k] + map[k+1]) * 0.5f; on the midpoint exactly, the even index of the two (where its binary
// search, pivot 127 in steps 64..1, always ends); beyond either end, that end.
uint8_t nf4_nested_quantize_value(const std::array<float, 256>& map, float x);

// An NF4-quantized tensor in host memory, in bitsandbytes' layout.
struct Nf4Tensor {
  std::vector<int64_t> shape;     // logical row-major shape ([out, in] for a linear weight)
  std::string dtype = "float32";  // what bnb dequantizes to: "float32", "bfloat16" or "float16"
  std::vector<uint8_t> packed;    // [ceil(numel/2)] two codes per byte, first in the high nibble
  bool double_quant = true;       // bnb's compress_statistics
  // double_quant:
  std::vector<uint8_t> absmax_codes;          // [n_blocks] codes into nested_quant_map
  std::vector<float> nested_absmax;           // [ceil(n_blocks / 256)]
  float offset = 0.f;                         // added back after the nested dequantization
  std::array<float, 256> nested_quant_map{};  // as stored (bnb: the signed dynamic map)
  // !double_quant:
  std::vector<float> absmax;  // [n_blocks]

  int64_t numel() const;
  int64_t n_blocks() const { return (numel() + kNf4BlockSize - 1) / kNf4BlockSize; }
  int64_t n_nested_blocks() const { return (n_blocks() + kNf4NestedBlockSize - 1) / kNf4NestedBlockSize; }
};

// Quantizes values (row-major, numel = product of shape) as bnb.functional.quantize_4bit(
// quant_type="nf4", blocksize=64, compress_statistics=double_quant) does; dtype records the input
// type ("float32" or "bfloat16"). Parallel over blocks with OpenMP; the result does not depend on
// the number of threads. The offset is the mean of the absmax values computed in double and
// rounded to float; bnb takes torch's fp32 mean, which can be one ulp off it, and then the nested
// absmax and some absmax codes differ too (nf4_double_quantize below with bnb's offset gives
// bnb's bytes).
Nf4Tensor nf4_quantize(std::span<const float> values, std::vector<int64_t> shape, bool double_quant = true);
Nf4Tensor nf4_quantize_bf16(std::span<const uint16_t> values, std::vector<int64_t> shape, bool double_quant = true);

// The double quantization step on its own: turns t's fp32 absmax into 8-bit codes, nested absmax
// and offset. The offset defaults to the mean of the absmax values; passing the offset of a bnb
// quant state reproduces that state's codes bit for bit.
void nf4_double_quantize(Nf4Tensor& t, std::optional<float> offset = std::nullopt);

// The per-block scales dequantization multiplies by: [n_blocks] fp32 (the nested dequantization
// plus offset, or the stored absmax).
std::vector<float> nf4_block_scales(const Nf4Tensor& t);

// Dequantizes to fp32 (out has numel() elements).
void nf4_dequantize(const Nf4Tensor& t, std::span<float> out);
std::vector<float> nf4_dequantize(const Nf4Tensor& t);

// ---- bnb-4bit checkpoints ----------------------------------------------------------------------
// Whether `weight_name` is stored NF4-quantized (its ".quant_state.bitsandbytes__nf4" entry exists).
bool is_bnb_nf4(const SafetensorsFile& file, const std::string& weight_name);
bool is_bnb_nf4(const HfCheckpoint& checkpoint, const std::string& weight_name);

// Reads the NF4 weight `weight_name` (e.g. "model.layers.0.self_attn.q_proj.weight") and its quant
// state entries, validated: UserError naming the file and the entry for a missing entry, a wrong
// dtype or shape, a quant state that is not JSON or says quant_type other than "nf4", a blocksize
// other than 64, a nested blocksize other than 256, or a quant_map that is not the NF4 table. The
// packed entry may use any storage dtype (bnb's quant_storage) as long as its bytes are the codes.
Nf4Tensor load_bnb_nf4(const SafetensorsFile& file, const std::string& weight_name);
Nf4Tensor load_bnb_nf4(const HfCheckpoint& checkpoint, const std::string& weight_name);

// The JSON bnb writes into W.quant_state.bitsandbytes__nf4 for `t` (its key order and number
// format: json.dumps of QuantState.as_dict's non-tensor items).
std::string bnb_nf4_quant_state_json(const Nf4Tensor& t);

}  // namespace ranktune
