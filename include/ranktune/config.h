// Run configs: one YAML file per run with sections model, lora, data, training, distributed,
// checkpoint, logging. Keys follow the HF / PEFT / TRL names. Every key, its type, default, range
// and one-line doc live in one schema table (src/config.cpp); jobs/configs/reference.yaml is that
// table printed (`ranktune config --reference`), and a test keeps the two in step.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "ranktune/llama.h"

namespace ranktune {

// model.gradient_checkpointing. on: keep each layer's input, recompute the layer in backward;
// offload: the same with the inputs in host memory; keep_attention: keep each layer's attention
// block too (q, k, v after RoPE, the attention output and its log-sum-exp, the residual after
// attention), so backward recomputes only the norms and the MLP.
enum class Checkpointing { off, on, offload, keep_attention };
// "off", "on", "offload" or "keep_attention" (a config file spells the first two false and true).
const char* checkpointing_name(Checkpointing c);

struct ModelSection {
  std::string name_or_path;   // HF model directory; empty = the inline architecture
  LlamaArch arch;             // model.architecture (inline), or from name_or_path/config.json
  bool has_inline_arch = false;
  std::string tokenizer;      // "byte", a tokenizer.json path, or empty = from name_or_path
  int64_t max_seq_length = 0;
  bool load_in_4bit = false;
  Checkpointing gradient_checkpointing = Checkpointing::on;
  bool enable_multi_gpu = false;
  std::string device_map;     // "sequential", "auto", "cuda:N", "cpu"
};

struct LoraSection {
  bool enabled = true;  // false = full fine-tuning
  int64_t r = 0;
  double lora_alpha = 0;
  double lora_dropout = 0;
  std::vector<std::string> target_modules;
  std::string bias;
  bool use_rslora = false;
  std::string adapter_path;  // an existing PEFT adapter or ranktune checkpoint to start from
  // PEFT's scaling: lora_alpha / r, or lora_alpha / sqrt(r) with rsLoRA.
  double scaling() const;
};

struct DataSection {
  std::string train_file;  // .jsonl (prepared into output_dir/data) or a prepared .h5
  std::string eval_file;
  std::string format;
  bool packing = false;
  bool train_on_responses_only = true;
  double eval_fraction = 0;
  std::string chat_template;
};

struct TrainingSection {
  std::string output_dir;
  int64_t per_device_train_batch_size = 0;
  int64_t per_device_eval_batch_size = 0;
  int64_t gradient_accumulation_steps = 0;
  double learning_rate = 0;
  int64_t max_steps = 0;
  double num_train_epochs = 0;
  int64_t warmup_steps = 0;
  double warmup_ratio = 0;
  std::string lr_scheduler_type;
  double weight_decay = 0;
  double max_grad_norm = 0;
  std::string optim;
  double adam_beta1 = 0, adam_beta2 = 0, adam_epsilon = 0;
  bool bf16 = true;
  int64_t seed = 0;
  int64_t eval_steps = 0;
  int64_t max_bad_steps = 0;
};

struct DistributedSection {
  double timeout_s = 0;
  std::string max_memory_per_gpu;  // e.g. "20GiB"; empty = all free memory
  int64_t zero_stage = 0;
  std::string grad_reduce =
      "auto";  // data parallel's gradient reduce on the GPU: auto (copy engines on one host) or nccl
  double ddp_bucket_cap_mb = 64;   // gradient reductions grouped up to this size (fp32 MiB); 0 = per layer
  bool allow_shared_gpus = false;  // more ranks than GPUs on a node
};

struct CheckpointSection {
  int64_t save_steps = 0;
  int64_t save_total_limit = 0;
};

struct LoggingSection {
  int64_t logging_steps = 0;
  std::string progress_bar;  // auto, true, false
};

struct RunConfig {
  std::string source;  // the YAML file it came from
  ModelSection model;
  LoraSection lora;
  DataSection data;
  TrainingSection training;
  DistributedSection distributed;
  CheckpointSection checkpoint;
  LoggingSection logging;

  // The resolved config as YAML (every key, defaults filled in), as written to
  // output_dir/config.yaml when a run starts.
  std::string to_yaml() const;
};

// Loads and validates a run config; `overrides` are "section.key=value" strings from --set.
// Throws UserError ("file:line: ..." with a suggestion for unknown keys) on any problem.
RunConfig load_run_config(const std::string& path, const std::vector<std::string>& overrides = {});
// The same from YAML text (tests); `source` names it in messages.
RunConfig parse_run_config(const std::string& yaml_text, const std::string& source,
                           const std::vector<std::string>& overrides = {});
// Every key with its default and doc, as YAML: the content of jobs/configs/reference.yaml.
std::string reference_config_yaml();

// Closest candidate by edit distance, or "" if none is close.
std::string nearest_name(const std::string& word, const std::vector<std::string>& candidates);
// "20GiB", "512MiB", "1.5GB" -> bytes. Throws UserError naming `what`.
int64_t parse_byte_size(const std::string& text, const std::string& what);

}  // namespace ranktune
