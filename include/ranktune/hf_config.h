// HF transformers' config.json for LlamaForCausalLM, and PEFT's adapter_config.json for LoRA.
//
// Reading: model_type must be "llama"; the five size keys (vocab_size, hidden_size,
// intermediate_size, num_hidden_layers, num_attention_heads) are required; everything else takes
// transformers' LlamaConfig default when absent or null: num_key_value_heads = num_attention_heads,
// head_dim = hidden_size / num_attention_heads, rms_norm_eps = 1e-6, rope_theta = 10000,
// max_position_embeddings = 2048, tie_word_embeddings = false, no RoPE scaling.
// RoPE is read in both layouts transformers writes: v4's top-level rope_theta + rope_scaling, and
// v5's rope_parameters {rope_type, rope_theta, factor, ...} (rope_parameters wins when both exist).
// Options that change the math ranktune implements (biases, another activation, partial rotary,
// another RoPE type) are refused with a UserError naming the file and the key.
#pragma once
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "ranktune/error.h"
#include "ranktune/llama.h"

namespace ranktune {

struct HfLlamaConfig {
  LlamaArch arch;
  std::string torch_dtype;              // "float32", "bfloat16", "float16"; "" when absent
  std::optional<int64_t> bos_token_id;  // absent or null -> nullopt
  std::vector<int64_t> eos_token_ids;   // eos_token_id may be an int or a list in config.json
  std::optional<int64_t> pad_token_id;
};

// Parses config.json text; `source` (the file name) goes into every error message.
HfLlamaConfig parse_hf_config(const std::string& json_text, const std::string& source);
// Reads and parses a config.json file (or "<dir>/config.json" when given a directory).
HfLlamaConfig read_hf_config(const std::string& path);
inline LlamaArch read_hf_arch(const std::string& path) { return read_hf_config(path).arch; }

// A config.json for the arch that transformers' LlamaForCausalLM.from_pretrained loads into the
// same model (architectures, model_type, every size and RoPE key, torch_dtype/dtype).
std::string hf_config_json(const HfLlamaConfig& config);
void write_hf_config(const std::string& path, const HfLlamaConfig& config);  // atomic

// The LoRA settings of a PEFT adapter_config.json.
struct PeftLoraConfig {
  int64_t r = 8;
  double lora_alpha = 8.0;
  double lora_dropout = 0.0;
  // Normalised to the short module names ("q_proj", ...), in lora_module_names() order.
  std::vector<std::string> target_modules;
  bool use_rslora = false;
  std::string bias = "none";  // "none", "all" or "lora_only"
  std::string base_model_name_or_path;

  // The factor PEFT multiplies B(A x) by: alpha / r, or alpha / sqrt(r) with rsLoRA.
  double scaling() const;
  bool targets(const std::string& module) const;
};

// Parses adapter_config.json text. peft_type must be LORA; target_modules may be a list of module
// names (short or dotted, e.g. "self_attn.q_proj") or "all-linear"; settings ranktune does not
// implement (DoRA, rank_pattern, alpha_pattern, layers_to_transform, modules_to_save,
// fan_in_fan_out, a regex target_modules, lm_head/embedding targets) are a UserError naming the key.
PeftLoraConfig parse_peft_config(const std::string& json_text, const std::string& source);
// Reads adapter_config.json (or "<dir>/adapter_config.json" when given a directory).
PeftLoraConfig read_peft_config(const std::string& path);
// An adapter_config.json that PEFT's PeftModel.from_pretrained loads.
std::string peft_config_json(const PeftLoraConfig& config);
void write_peft_config(const std::string& path, const PeftLoraConfig& config);  // atomic

}  // namespace ranktune
