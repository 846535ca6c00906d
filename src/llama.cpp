#include "ranktune/llama.h"

#include <cmath>

#include "ranktune/error.h"

namespace ranktune {

void LlamaArch::validate(const std::string& source) const {
  auto need = [&](bool ok, const std::string& field, const std::string& why) {
    RT_REQUIRE(ok, source + ": " + field + " " + why);
  };
  need(vocab_size > 0, "vocab_size", "must be > 0");
  need(hidden_size > 0, "hidden_size", "must be > 0");
  need(intermediate_size > 0, "intermediate_size", "must be > 0");
  need(n_layers > 0, "num_hidden_layers", "must be > 0");
  need(n_heads > 0, "num_attention_heads", "must be > 0");
  need(n_kv_heads > 0 && n_heads % n_kv_heads == 0, "num_key_value_heads",
       "must be > 0 and divide num_attention_heads (" + std::to_string(n_heads) + ")");
  need(head_dim > 0 && head_dim % 2 == 0, "head_dim", "must be a positive even number (RoPE rotates pairs)");
  need(head_dim <= 256, "head_dim", "must be <= 256 (the attention kernels' limit)");
  need(rms_norm_eps > 0, "rms_norm_eps", "must be > 0");
  need(rope_theta > 0, "rope_theta", "must be > 0");
  need(max_position_embeddings > 0, "max_position_embeddings", "must be > 0");
  need(rope_scaling.type.empty() || rope_scaling.type == "default" || rope_scaling.type == "llama3",
       "rope_scaling.rope_type", "'" + rope_scaling.type + "' is not supported (use llama3 or none)");
  if (rope_scaling.type == "llama3") {
    need(rope_scaling.factor >= 1, "rope_scaling.factor", "must be >= 1");
    need(rope_scaling.high_freq_factor > rope_scaling.low_freq_factor, "rope_scaling.high_freq_factor",
         "must be greater than low_freq_factor");
  }
}

int64_t LlamaArch::n_params() const {
  int64_t n = 0;
  for (const ParamSpec& p : llama_param_layout(*this)) n += p.numel;
  return n;
}

std::vector<ParamSpec> llama_param_layout(const LlamaArch& a) {
  std::vector<ParamSpec> specs;
  int64_t offset = 0;
  auto add = [&](std::string name, std::vector<int64_t> shape, int layer, bool is_norm) {
    int64_t numel = 1;
    for (int64_t d : shape) numel *= d;
    specs.push_back({std::move(name), std::move(shape), offset, numel, layer, is_norm});
    offset += numel;
  };
  const int64_t C = a.hidden_size, F = a.intermediate_size;
  add("model.embed_tokens.weight", {a.vocab_size, C}, -1, false);
  for (int l = 0; l < a.n_layers; ++l) {
    const std::string p = "model.layers." + std::to_string(l) + ".";
    add(p + "input_layernorm.weight", {C}, l, true);
    add(p + "self_attn.q_proj.weight", {a.q_dim(), C}, l, false);
    add(p + "self_attn.k_proj.weight", {a.kv_dim(), C}, l, false);
    add(p + "self_attn.v_proj.weight", {a.kv_dim(), C}, l, false);
    add(p + "self_attn.o_proj.weight", {C, a.q_dim()}, l, false);
    add(p + "post_attention_layernorm.weight", {C}, l, true);
    add(p + "mlp.gate_proj.weight", {F, C}, l, false);
    add(p + "mlp.up_proj.weight", {F, C}, l, false);
    add(p + "mlp.down_proj.weight", {C, F}, l, false);
  }
  add("model.norm.weight", {C}, -1, true);
  if (!a.tie_word_embeddings) add("lm_head.weight", {a.vocab_size, C}, -1, false);
  return specs;
}

// HF transformers' rotary frequencies in float32, with _compute_llama3_parameters' scaling.
std::vector<float> rope_inv_freq(const LlamaArch& a) {
  const int64_t half = a.head_dim / 2;
  std::vector<float> inv(static_cast<size_t>(half));
  for (int64_t i = 0; i < half; ++i) {
    const float exponent = static_cast<float>(2 * i) / static_cast<float>(a.head_dim);
    inv[static_cast<size_t>(i)] = 1.0f / std::pow(static_cast<float>(a.rope_theta), exponent);
  }
  if (a.rope_scaling.type != "llama3") return inv;
  const double factor = a.rope_scaling.factor;
  const double low = a.rope_scaling.low_freq_factor, high = a.rope_scaling.high_freq_factor;
  const double old_len = static_cast<double>(a.rope_scaling.original_max_position_embeddings);
  const double low_freq_wavelen = old_len / low, high_freq_wavelen = old_len / high;
  for (float& f : inv) {
    const float wavelen = static_cast<float>(2 * M_PI) / f;
    float scaled = wavelen > low_freq_wavelen ? static_cast<float>(f / factor) : f;
    const bool medium = !(wavelen < high_freq_wavelen) && !(wavelen > low_freq_wavelen);
    if (medium) {
      const float smooth = static_cast<float>((old_len / wavelen - low) / (high - low));
      scaled = (1 - smooth) * scaled / static_cast<float>(factor) + smooth * scaled;
    }
    f = scaled;
  }
  return inv;
}

}  // namespace ranktune
