// The Llama architecture (as HF transformers' LlamaForCausalLM computes it) and the layout of its
// parameters in ranktune's flat buffers.
#pragma once
#include <algorithm>
#include <array>
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

namespace ranktune {

struct RopeScaling {
  std::string type;  // "" (none), "default" (none) or "llama3"
  double factor = 1.0;
  double low_freq_factor = 1.0;
  double high_freq_factor = 4.0;
  int64_t original_max_position_embeddings = 8192;
};

struct LlamaArch {
  int64_t vocab_size = 0;
  int64_t hidden_size = 0;        // C
  int64_t intermediate_size = 0;  // F
  int64_t n_layers = 0;
  int64_t n_heads = 0;     // H
  int64_t n_kv_heads = 0;  // Hkv
  int64_t head_dim = 0;    // D (HF: head_dim, default hidden_size / n_heads)
  double rms_norm_eps = 1e-5;
  double rope_theta = 10000.0;
  int64_t max_position_embeddings = 2048;
  bool tie_word_embeddings = false;
  RopeScaling rope_scaling;

  int64_t q_dim() const { return n_heads * head_dim; }
  int64_t kv_dim() const { return n_kv_heads * head_dim; }
  int64_t qkv_dim() const { return q_dim() + 2 * kv_dim(); }
  // Throws UserError naming `source` and the field when the shape is inconsistent.
  void validate(const std::string& source) const;
  // Number of parameters (embedding counted once when tied).
  int64_t n_params() const;
};

// The seven projections LoRA can target, by their HF/PEFT names.
inline const std::vector<std::string>& lora_module_names() {
  static const std::vector<std::string> names = {"q_proj", "k_proj", "v_proj", "o_proj",
                                                 "gate_proj", "up_proj", "down_proj"};
  return names;
}

// The model runs four fused projections: 0 q,k,v (one GEMM), 1 o, 2 gate,up (one GEMM), 3 down.
// Which one a module (q_proj ... down_proj) belongs to.
constexpr int kFusedProjections = 4;
inline int fused_projection(const std::string& module) {
  if (module == "q_proj" || module == "k_proj" || module == "v_proj") return 0;
  if (module == "o_proj") return 1;
  if (module == "gate_proj" || module == "up_proj") return 2;
  return 3;
}

// How many of the LoRA target modules sit in each fused projection: the rows (in units of r) of
// its stacked A matrix and the columns of its xa buffer.
inline std::array<int64_t, kFusedProjections> lora_modules_per_projection(const std::vector<std::string>& targets) {
  std::array<int64_t, kFusedProjections> n{};
  for (const std::string& m : lora_module_names())
    if (std::find(targets.begin(), targets.end(), m) != targets.end()) ++n[static_cast<size_t>(fused_projection(m))];
  return n;
}

// Fused LoRA (LlamaModel::linear_forward): a fused projection with adapters runs as one GEMM over
// its input and the adapters' products side by side, [x | s x A^T] [W | B]^T. Its input x and its
// backward's dx carry this many columns past their own, and so does each row of its base weight
// (unless NF4): the adapters' r per targeted module, rounded up to 8 (16-byte rows in bf16).
inline std::array<int64_t, kFusedProjections> lora_pad_per_projection(const std::vector<std::string>& targets,
                                                                      int64_t r) {
  std::array<int64_t, kFusedProjections> pad = lora_modules_per_projection(targets);
  for (int64_t& p : pad) p = (p * r + 7) / 8 * 8;
  return pad;
}

// The fused projection a base tensor belongs to (by its HF name), or -1 for norms and the
// embedding and head.
inline int fused_projection_of_tensor(const std::string& name) {
  for (const std::string& m : lora_module_names())
    if (name.find("." + m + ".") != std::string::npos) return fused_projection(m);
  return -1;
}

// A projection's weight shape, {out, in}, by its module name (q_proj ... down_proj).
inline std::pair<int64_t, int64_t> projection_shape(const LlamaArch& a, const std::string& module) {
  int64_t in = a.hidden_size, out = a.hidden_size;
  if (module == "q_proj") out = a.q_dim();
  if (module == "k_proj" || module == "v_proj") out = a.kv_dim();
  if (module == "o_proj") in = a.q_dim();
  if (module == "gate_proj" || module == "up_proj") out = a.intermediate_size;
  if (module == "down_proj") in = a.intermediate_size;
  return {out, in};
}

// Rows of logits per loss chunk: the LM head and cross-entropy run chunk by chunk so the N x vocab
// logits never exist whole. A chunk is one [rows, vocab] buffer in the activation dtype (the
// gradient overwrites the logits in place). LoRA keeps it at 96 MiB for memory; when the head's
// weight is trained every chunk also reads and writes the whole fp32 [vocab, hidden] gradient (1 GB
// at the 1B shape), so full fine-tuning takes 512 MiB (two chunks at 2 x 2048 tokens in bf16).
// `requested` > 0 overrides the choice (tests). Shared by the model and the memory plan.
inline int64_t loss_chunk_rows(const LlamaArch& a, bool train_base, int64_t n_rows, int64_t act_bytes,
                               int64_t requested) {
  const int64_t budget = (train_base ? 512LL : 96LL) << 20;
  const int64_t rows = requested > 0 ? requested : std::max<int64_t>(1, budget / (a.vocab_size * act_bytes));
  return std::min(rows, n_rows);
}

// One tensor of the model with its HF name ("model.layers.3.self_attn.q_proj.weight") and its
// place in the flat buffer. Shapes are HF's: Linear weights are [out_features, in_features].
struct ParamSpec {
  std::string name;
  std::vector<int64_t> shape;
  int64_t offset = 0;  // elements from the start of the flat buffer
  int64_t numel = 0;
  int layer = -1;      // -1 for embedding, final norm and lm_head
  bool is_norm = false;  // no weight decay
};

// The base model's tensors in flat-buffer order: embed_tokens; per layer input_layernorm,
// q_proj, k_proj, v_proj (adjacent, so together they are the fused [qkv_dim, C] weight),
// o_proj, post_attention_layernorm, gate_proj, up_proj (adjacent: the fused [2F, C] weight),
// down_proj; model.norm; lm_head (absent when tied).
std::vector<ParamSpec> llama_param_layout(const LlamaArch& arch);

// HF's rotary frequencies, with llama3 scaling when configured: inv_freq[i] for i < D/2.
std::vector<float> rope_inv_freq(const LlamaArch& arch);

}  // namespace ranktune
