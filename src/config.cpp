// Run configs: the schema table (every key with type, default, range and doc) and the strict
// loader built on it.
#include "ranktune/config.h"

#include <yaml-cpp/yaml.h>

#include <algorithm>
#include <cmath>
#include <functional>
#include <limits>
#include <map>
#include <sstream>

#include "ranktune/error.h"

namespace ranktune {
namespace {

constexpr double kInf = std::numeric_limits<double>::infinity();

enum class Kind { integer, number, boolean, string, string_list, checkpointing };

const char* kind_name(Kind k) {
  switch (k) {
    case Kind::integer: return "an integer";
    case Kind::number: return "a number";
    case Kind::boolean: return "true or false";
    case Kind::string: return "a string";
    case Kind::string_list: return "a list of strings";
    case Kind::checkpointing: return "true, false, \"offload\" or \"keep_attention\"";
  }
  return "?";
}

// Where a value came from, for messages: "run.yaml:12" or "--set training.seed=1".
struct Origin {
  std::string where;
};

// One key of the schema. `ref` gives the config member the key fills; min/max bound numbers,
// `choices` bound strings (and list items).
struct Field {
  std::string section, key;
  Kind kind;
  std::string default_yaml;
  std::string doc;
  std::function<void*(RunConfig&)> ref;
  double min = -kInf, max = kInf;
  bool min_exclusive = false;
  std::vector<std::string> choices;

  std::string full() const { return section + "." + key; }
};

std::vector<std::string> split_list(const std::string& s) {
  std::vector<std::string> out;
  std::stringstream ss(s);
  std::string item;
  while (std::getline(ss, item, ',')) out.push_back(item);
  return out;
}

// The optional trailing members (range, choices) are left to their defaults in most rows.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmissing-field-initializers"
#define RT_FIELD(sec, name, kind, def, doc, ...) \
  Field{#sec, #name, kind, def, doc, [](RunConfig& c) -> void* { return &c.sec.name; }, __VA_ARGS__}

const std::vector<Field>& schema() {
  static const std::vector<Field> fields = [] {
    const std::string all_modules = "[q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj]";
    std::vector<Field> f = {
        // model
        RT_FIELD(model, name_or_path, Kind::string, "\"\"",
                 "HF model directory (config.json + safetensors); empty = use model.architecture", ),
        RT_FIELD(model, tokenizer, Kind::string, "\"\"",
                 "\"byte\", a tokenizer.json path, or empty = the model directory's tokenizer.json (else byte)", ),
        RT_FIELD(model, max_seq_length, Kind::integer, "2048", "tokens per sequence (T)", 1, 1 << 20, ),
        RT_FIELD(model, load_in_4bit, Kind::boolean, "false",
                 "quantize frozen base weights to NF4 at load (QLoRA; needs lora.enabled)", ),
        RT_FIELD(model, gradient_checkpointing, Kind::checkpointing, "true",
                 "keep only each layer's input and recompute it in backward; \"offload\" keeps them in host memory; "
                 "\"keep_attention\" also keeps each layer's attention outputs and recomputes only norms and MLP", ),
        RT_FIELD(model, enable_multi_gpu, Kind::boolean, "false",
                 "use every rank/GPU the launcher gives (also RANKTUNE_ENABLE_MULTIGPU=1)", ),
        RT_FIELD(model, device_map, Kind::string, "sequential",
                 "sequential (one GPU per rank), auto (spread layers over visible GPUs), cuda:N, or cpu", ),
        // lora
        RT_FIELD(lora, enabled, Kind::boolean, "true", "train LoRA adapters (false = full fine-tuning)", ),
        RT_FIELD(lora, r, Kind::integer, "16", "LoRA rank", 1, 4096, ),
        RT_FIELD(lora, lora_alpha, Kind::number, "16", "LoRA scaling numerator (scale = alpha / r)", 0, kInf, true, ),
        RT_FIELD(lora, lora_dropout, Kind::number, "0.0", "dropout on the LoRA input, in [0, 1)", 0, 0.999999, ),
        RT_FIELD(lora, target_modules, Kind::string_list, all_modules,
                 "projections that get adapters: any of q_proj k_proj v_proj o_proj gate_proj up_proj down_proj", ),
        RT_FIELD(lora, bias, Kind::string, "none", "PEFT bias mode (only none: Llama has no biases)", -kInf, kInf,
                 false, {"none"}, ),
        RT_FIELD(lora, use_rslora, Kind::boolean, "false", "rank-stabilised LoRA: scale = alpha / sqrt(r)", ),
        RT_FIELD(lora, adapter_path, Kind::string, "\"\"", "start from this PEFT adapter directory", ),
        // data
        RT_FIELD(data, train_file, Kind::string, "\"\"", "training data: JSONL (prepared on the fly) or a ranktune .h5", ),
        RT_FIELD(data, eval_file, Kind::string, "\"\"", "evaluation data (JSONL or .h5); empty = eval_fraction of train", ),
        RT_FIELD(data, format, Kind::string, "auto", "record format", -kInf, kInf, false,
                 {"auto", "text", "prompt_completion", "alpaca", "messages"}, ),
        RT_FIELD(data, packing, Kind::boolean, "false", "pack short records into full sequences (attention stays inside each record)", ),
        RT_FIELD(data, train_on_responses_only, Kind::boolean, "true", "loss only on completions / assistant replies", ),
        RT_FIELD(data, eval_fraction, Kind::number, "0.0", "share of train rows held out for eval when no eval_file", 0, 0.5, ),
        RT_FIELD(data, chat_template, Kind::string, "llama3", "template for \"messages\" records", -kInf, kInf, false,
                 {"llama3"}, ),
        // training
        RT_FIELD(training, output_dir, Kind::string, "runs/ranktune", "where config.yaml, metrics.jsonl and checkpoints go", ),
        RT_FIELD(training, per_device_train_batch_size, Kind::integer, "2", "sequences per micro-batch per rank", 1, 1 << 16, ),
        RT_FIELD(training, per_device_eval_batch_size, Kind::integer, "8", "sequences per eval batch per rank", 1, 1 << 16, ),
        RT_FIELD(training, gradient_accumulation_steps, Kind::integer, "1", "micro-batches per optimizer step", 1, 1 << 20, ),
        RT_FIELD(training, learning_rate, Kind::number, "2.0e-4", "peak learning rate", 0, 10, true, ),
        RT_FIELD(training, max_steps, Kind::integer, "-1", "optimizer steps; -1 = num_train_epochs decides", -1, 1e12, ),
        RT_FIELD(training, num_train_epochs, Kind::number, "1.0", "epochs when max_steps is -1", 0, 1e6, true, ),
        RT_FIELD(training, warmup_steps, Kind::integer, "0", "linear warmup steps (overrides warmup_ratio)", 0, 1e12, ),
        RT_FIELD(training, warmup_ratio, Kind::number, "0.0", "warmup as a share of the run", 0, 0.999999, ),
        RT_FIELD(training, lr_scheduler_type, Kind::string, "linear", "learning-rate schedule after warmup", -kInf, kInf,
                 false, {"constant", "linear", "cosine"}, ),
        RT_FIELD(training, weight_decay, Kind::number, "0.0", "decoupled weight decay (not on norms)", 0, 10, ),
        RT_FIELD(training, max_grad_norm, Kind::number, "1.0", "clip the global gradient norm; 0 = no clipping", 0, kInf, ),
        RT_FIELD(training, optim, Kind::string, "adamw", "optimizer", -kInf, kInf, false, {"adamw", "adamw_8bit"}, ),
        RT_FIELD(training, adam_beta1, Kind::number, "0.9", "AdamW beta1", 0, 0.999999, ),
        RT_FIELD(training, adam_beta2, Kind::number, "0.999", "AdamW beta2", 0, 0.999999999, ),
        RT_FIELD(training, adam_epsilon, Kind::number, "1.0e-8", "AdamW epsilon", 0, 1, true, ),
        RT_FIELD(training, bf16, Kind::boolean, "true", "bf16 weights and activations on the GPU (the CPU path is fp32)", ),
        RT_FIELD(training, seed, Kind::integer, "42", "seed for init, data order and dropout", 0, 9.2e18, ),
        RT_FIELD(training, eval_steps, Kind::integer, "0", "evaluate every N steps (0 = only at the end)", 0, 1e12, ),
        RT_FIELD(training, max_bad_steps, Kind::integer, "5", "abort after this many non-finite steps in a row", 1, 1e6, ),
        // distributed
        RT_FIELD(distributed, timeout_s, Kind::number, "600", "a collective that takes longer aborts every rank", 1, 1e6, ),
        RT_FIELD(distributed, max_memory_per_gpu, Kind::string, "\"\"", "budget the memory plan must fit per GPU, e.g. 20GiB; empty = its free memory; when set, the CPU path checks it too", ),
        RT_FIELD(distributed, ddp_bucket_cap_mb, Kind::number, "64", "gradients are reduced in backward in groups of layers of at least this many MiB (fp32), as DDP's bucket_cap_mb, when NCCL reduces them (the copy engines of distributed.grad_reduce: auto take each layer as soon as it is ready); 0 = each layer alone", 0, 1e6, ),
        RT_FIELD(distributed, zero_stage, Kind::integer, "0", "1 = shard optimizer states and masters over ranks (full fine-tuning)", 0, 1, ),
        RT_FIELD(distributed, grad_reduce, Kind::string, "auto", "the gradient reduce of data parallel on the GPU: auto = over the copy engines (CUDA IPC) when every rank is one GPU of one host, for ZeRO-1's reduce to the shards' owners and LoRA's all-reduce, else NCCL; nccl = always NCCL", -kInf, kInf, false, {"auto", "nccl"}, ),
        RT_FIELD(distributed, allow_shared_gpus, Kind::boolean, "false", "allow more ranks than GPUs on a node (ranks share GPUs)", ),
        // checkpoint
        RT_FIELD(checkpoint, save_steps, Kind::integer, "0", "save every N steps (0 = only at the end)", 0, 1e12, ),
        RT_FIELD(checkpoint, save_total_limit, Kind::integer, "0", "keep at most N checkpoints (0 = all)", 0, 1e6, ),
        // logging
        RT_FIELD(logging, logging_steps, Kind::integer, "10", "log every N steps", 1, 1e12, ),
        RT_FIELD(logging, progress_bar, Kind::string, "auto", "auto (on a TTY), true or false", -kInf, kInf, false,
                 {"auto", "true", "false"}, ),
    };
    return f;
  }();
  return fields;
}
#undef RT_FIELD
#pragma GCC diagnostic pop

const std::vector<std::string>& section_names() {
  static const std::vector<std::string> s = {"model", "lora", "data", "training", "distributed",
                                             "checkpoint", "logging"};
  return s;
}

// model.architecture: HF config.json names.
const std::vector<std::string>& arch_keys() {
  static const std::vector<std::string> k = {
      "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
      "num_key_value_heads", "head_dim", "rms_norm_eps", "rope_theta", "max_position_embeddings",
      "tie_word_embeddings", "rope_scaling"};
  return k;
}
const std::vector<std::string>& rope_scaling_keys() {
  static const std::vector<std::string> k = {"rope_type", "type", "factor", "low_freq_factor",
                                             "high_freq_factor", "original_max_position_embeddings"};
  return k;
}

std::string at(const std::string& source, const YAML::Node& node) {
  if (node.Mark().is_null()) return source;
  return source + ":" + std::to_string(node.Mark().line + 1);
}

std::string scalar_text(const YAML::Node& n) {
  if (n.IsScalar()) return n.Scalar();
  if (n.IsSequence()) return "a list";
  if (n.IsMap()) return "a mapping";
  return "nothing";
}

[[noreturn]] void bad_type(const Origin& o, const std::string& key, Kind kind, const YAML::Node& n) {
  throw UserError(o.where + ": " + key + " must be " + kind_name(kind) + ", got '" + scalar_text(n) + "'");
}

bool is_yaml_null(const YAML::Node& n) { return !n.IsDefined() || n.IsNull(); }

double as_number(const Origin& o, const std::string& key, Kind kind, const YAML::Node& n) {
  if (!n.IsScalar()) bad_type(o, key, kind, n);
  try {
    size_t used = 0;
    const std::string s = n.Scalar();
    double v = std::stod(s, &used);
    if (used != s.size()) bad_type(o, key, kind, n);
    return v;
  } catch (const std::logic_error&) {
    bad_type(o, key, kind, n);
  }
}

bool as_bool(const Origin& o, const std::string& key, const YAML::Node& n) {
  if (!n.IsScalar()) bad_type(o, key, Kind::boolean, n);
  const std::string s = n.Scalar();
  if (s == "true" || s == "True" || s == "TRUE") return true;
  if (s == "false" || s == "False" || s == "FALSE") return false;
  bad_type(o, key, Kind::boolean, n);
}

void check_range(const Origin& o, const Field& f, double v) {
  const bool low = f.min_exclusive ? v <= f.min : v < f.min;
  if (low || v > f.max || std::isnan(v)) {
    std::ostringstream os;
    os << o.where << ": " << f.full() << " = " << v << " is out of range: must be "
       << (f.min_exclusive ? "> " : ">= ") << f.min;
    if (f.max != kInf) os << " and <= " << f.max;
    throw UserError(os.str());
  }
}

void check_choice(const Origin& o, const Field& f, const std::string& v) {
  if (f.choices.empty() || std::find(f.choices.begin(), f.choices.end(), v) != f.choices.end()) return;
  std::string list;
  for (const auto& c : f.choices) list += (list.empty() ? "" : ", ") + c;
  std::string hint = nearest_name(v, f.choices);
  throw UserError(o.where + ": " + f.full() + " = '" + v + "' is not one of: " + list +
                  (hint.empty() ? "" : " (did you mean " + hint + "?)"));
}

void apply_field(RunConfig& cfg, const Field& f, const YAML::Node& n, const Origin& o) {
  void* p = f.ref(cfg);
  switch (f.kind) {
    case Kind::integer: {
      double v = as_number(o, f.full(), f.kind, n);
      if (v != std::floor(v)) bad_type(o, f.full(), f.kind, n);
      check_range(o, f, v);
      *static_cast<int64_t*>(p) = static_cast<int64_t>(v);
      break;
    }
    case Kind::number: {
      double v = as_number(o, f.full(), f.kind, n);
      check_range(o, f, v);
      *static_cast<double*>(p) = v;
      break;
    }
    case Kind::boolean: *static_cast<bool*>(p) = as_bool(o, f.full(), n); break;
    case Kind::string: {
      if (!n.IsScalar() && !is_yaml_null(n)) bad_type(o, f.full(), f.kind, n);
      std::string v = is_yaml_null(n) ? "" : n.Scalar();
      check_choice(o, f, v);
      *static_cast<std::string*>(p) = v;
      break;
    }
    case Kind::string_list: {
      std::vector<std::string> items;
      if (n.IsSequence()) {
        for (const auto& item : n) {
          if (!item.IsScalar()) bad_type(o, f.full(), f.kind, n);
          items.push_back(item.Scalar());
        }
      } else if (n.IsScalar()) {  // --set lora.target_modules=q_proj,v_proj
        items = split_list(n.Scalar());
      } else {
        bad_type(o, f.full(), f.kind, n);
      }
      *static_cast<std::vector<std::string>*>(p) = items;
      break;
    }
    case Kind::checkpointing: {
      if (n.IsScalar() && n.Scalar() == "offload") {
        *static_cast<Checkpointing*>(p) = Checkpointing::offload;
      } else if (n.IsScalar() && n.Scalar() == "keep_attention") {
        *static_cast<Checkpointing*>(p) = Checkpointing::keep_attention;
      } else {
        if (!n.IsScalar()) bad_type(o, f.full(), f.kind, n);
        const std::string s = n.Scalar();
        if (s != "true" && s != "false" && s != "True" && s != "False") bad_type(o, f.full(), f.kind, n);
        *static_cast<Checkpointing*>(p) = as_bool(o, f.full(), n) ? Checkpointing::on : Checkpointing::off;
      }
      break;
    }
  }
}

YAML::Node field_value(const RunConfig& cfg, const Field& f) {
  void* p = f.ref(const_cast<RunConfig&>(cfg));
  YAML::Node n;
  switch (f.kind) {
    case Kind::integer: n = *static_cast<int64_t*>(p); break;
    case Kind::number: n = *static_cast<double*>(p); break;
    case Kind::boolean: n = *static_cast<bool*>(p); break;
    case Kind::string: n = *static_cast<std::string*>(p); break;
    case Kind::string_list:
      n = YAML::Node(YAML::NodeType::Sequence);
      for (const auto& s : *static_cast<std::vector<std::string>*>(p)) n.push_back(s);
      break;
    case Kind::checkpointing: {
      auto c = *static_cast<Checkpointing*>(p);
      if (c == Checkpointing::offload || c == Checkpointing::keep_attention) n = checkpointing_name(c);
      else n = (c == Checkpointing::on);
      break;
    }
  }
  return n;
}

const Field* find_field(const std::string& section, const std::string& key) {
  for (const auto& f : schema())
    if (f.section == section && f.key == key) return &f;
  return nullptr;
}

[[noreturn]] void unknown_key(const std::string& where, const std::string& section, const std::string& key) {
  // A key an earlier version had gets its new name.
  if (section == "distributed" && key == "zero_reduce")
    throw UserError(where + ": distributed.zero_reduce is now distributed.grad_reduce (the same values; it covers "
                    "LoRA's all-reduce too): rename the key");
  // A key that exists in another section gets that section named; otherwise the closest key of
  // this section.
  for (const auto& f : schema())
    if (f.key == key)
      throw UserError(where + ": unknown key '" + key + "' in section '" + section + "' (did you mean " +
                      f.full() + "? it belongs to section '" + f.section + "')");
  std::vector<std::string> candidates;
  for (const auto& f : schema())
    if (f.section == section) candidates.push_back(f.key);
  if (section == "model") candidates.push_back("architecture");
  std::string hint = nearest_name(key, candidates);
  if (hint.empty()) {  // maybe a misspelt key of another section
    std::vector<std::string> all;
    for (const auto& f : schema()) all.push_back(f.key);
    hint = nearest_name(key, all);
    if (!hint.empty())
      for (const auto& f : schema())
        if (f.key == hint) hint = f.full();
  }
  throw UserError(where + ": unknown key '" + key + "' in section '" + section + "'" +
                  (hint.empty() ? "" : " (did you mean " + hint + "?)") +
                  "; jobs/configs/reference.yaml lists every key");
}

void parse_arch(RunConfig& cfg, const YAML::Node& node, const std::string& source) {
  const Origin o{at(source, node)};
  if (!node.IsMap()) throw UserError(o.where + ": model.architecture must be a mapping of HF config.json keys");
  LlamaArch& a = cfg.model.arch;
  a = LlamaArch{};
  for (const auto& kv : node) {
    const std::string key = kv.first.Scalar();
    const YAML::Node& v = kv.second;
    const Origin ko{at(source, kv.first)};
    const std::string full = "model.architecture." + key;
    auto integer = [&]() -> int64_t {
      double d = as_number(ko, full, Kind::integer, v);
      if (d != std::floor(d)) bad_type(ko, full, Kind::integer, v);
      return static_cast<int64_t>(d);
    };
    if (key == "vocab_size") a.vocab_size = integer();
    else if (key == "hidden_size") a.hidden_size = integer();
    else if (key == "intermediate_size") a.intermediate_size = integer();
    else if (key == "num_hidden_layers") a.n_layers = integer();
    else if (key == "num_attention_heads") a.n_heads = integer();
    else if (key == "num_key_value_heads") a.n_kv_heads = integer();
    else if (key == "head_dim") a.head_dim = integer();
    else if (key == "rms_norm_eps") a.rms_norm_eps = as_number(ko, full, Kind::number, v);
    else if (key == "rope_theta") a.rope_theta = as_number(ko, full, Kind::number, v);
    else if (key == "max_position_embeddings") a.max_position_embeddings = integer();
    else if (key == "tie_word_embeddings") a.tie_word_embeddings = as_bool(ko, full, v);
    else if (key == "rope_scaling") {
      if (is_yaml_null(v)) continue;
      if (!v.IsMap()) throw UserError(ko.where + ": " + full + " must be a mapping or null");
      for (const auto& rs : v) {
        const std::string rk = rs.first.Scalar();
        const Origin ro{at(source, rs.first)};
        const std::string rfull = full + "." + rk;
        if (rk == "rope_type" || rk == "type") a.rope_scaling.type = rs.second.Scalar();
        else if (rk == "factor") a.rope_scaling.factor = as_number(ro, rfull, Kind::number, rs.second);
        else if (rk == "low_freq_factor") a.rope_scaling.low_freq_factor = as_number(ro, rfull, Kind::number, rs.second);
        else if (rk == "high_freq_factor") a.rope_scaling.high_freq_factor = as_number(ro, rfull, Kind::number, rs.second);
        else if (rk == "original_max_position_embeddings")
          a.rope_scaling.original_max_position_embeddings = static_cast<int64_t>(as_number(ro, rfull, Kind::integer, rs.second));
        else {
          std::string hint = nearest_name(rk, rope_scaling_keys());
          throw UserError(ro.where + ": unknown key '" + rk + "' in model.architecture.rope_scaling" +
                          (hint.empty() ? "" : " (did you mean " + hint + "?)"));
        }
      }
    } else {
      std::string hint = nearest_name(key, arch_keys());
      throw UserError(ko.where + ": unknown key '" + key + "' in model.architecture" +
                      (hint.empty() ? "" : " (did you mean " + hint + "?)"));
    }
  }
  if (a.n_kv_heads == 0) a.n_kv_heads = a.n_heads;
  if (a.head_dim == 0 && a.n_heads > 0) a.head_dim = a.hidden_size / a.n_heads;
  a.validate(at(source, node) + ": model.architecture");
}

// Contradictions between keys, named with the line of the key that decides.
void check_consistency(RunConfig& c, const std::map<std::string, std::string>& where) {
  auto loc = [&](const std::string& key) {
    auto it = where.find(key);
    return it == where.end() ? c.source : it->second;
  };
  if (c.model.name_or_path.empty() && !c.model.has_inline_arch)
    throw UserError(c.source + ": the model is not set: give model.name_or_path (an HF model directory) "
                    "or model.architecture (an inline Llama shape)");
  if (!c.model.name_or_path.empty() && c.model.has_inline_arch)
    throw UserError(loc("model.architecture") + ": give model.name_or_path or model.architecture, not both");
  if (c.model.load_in_4bit && !c.lora.enabled)
    throw UserError(loc("model.load_in_4bit") + ": model.load_in_4bit needs LoRA (lora.enabled: true): "
                    "4-bit base weights are frozen, so full fine-tuning cannot train them");
  for (const auto& m : c.lora.target_modules) {
    const auto& names = lora_module_names();
    if (std::find(names.begin(), names.end(), m) == names.end()) {
      std::string hint = nearest_name(m, names);
      throw UserError(loc("lora.target_modules") + ": lora.target_modules has unknown module '" + m + "'" +
                      (hint.empty() ? "" : " (did you mean " + hint + "?)") +
                      "; valid: q_proj k_proj v_proj o_proj gate_proj up_proj down_proj");
    }
  }
  if (c.lora.enabled && c.lora.target_modules.empty())
    throw UserError(loc("lora.target_modules") + ": lora.target_modules is empty: name at least one projection, "
                    "or set lora.enabled: false for full fine-tuning");
  const std::string& dm = c.model.device_map;
  bool dm_ok = dm == "sequential" || dm == "auto" || dm == "cpu";
  if (dm.rfind("cuda:", 0) == 0 && dm.size() > 5 && dm.find_first_not_of("0123456789", 5) == std::string::npos)
    dm_ok = true;
  if (!dm_ok)
    throw UserError(loc("model.device_map") + ": model.device_map = '" + dm +
                    "' is not one of: sequential, auto, cuda:N, cpu");
  if (c.training.max_steps > 0 && c.training.warmup_steps > c.training.max_steps)
    throw UserError(loc("training.warmup_steps") + ": training.warmup_steps (" +
                    std::to_string(c.training.warmup_steps) + ") is longer than the run (max_steps " +
                    std::to_string(c.training.max_steps) + ")");
  if (c.training.max_steps == 0)
    throw UserError(loc("training.max_steps") + ": training.max_steps must be > 0, or -1 to train num_train_epochs");
  if (!c.distributed.max_memory_per_gpu.empty())
    parse_byte_size(c.distributed.max_memory_per_gpu, loc("distributed.max_memory_per_gpu") + ": distributed.max_memory_per_gpu");
  if (c.distributed.zero_stage == 1 && c.lora.enabled)
    throw UserError(loc("distributed.zero_stage") + ": distributed.zero_stage 1 shards full fine-tuning states; "
                    "with LoRA the states are small: use zero_stage 0");
  if (c.model.has_inline_arch && c.model.max_seq_length > c.model.arch.max_position_embeddings)
    throw UserError(loc("model.max_seq_length") + ": model.max_seq_length (" + std::to_string(c.model.max_seq_length) +
                    ") exceeds model.architecture.max_position_embeddings (" +
                    std::to_string(c.model.arch.max_position_embeddings) + ")");
}

RunConfig parse_root(const YAML::Node& root, const std::string& source, const std::vector<std::string>& overrides) {
  RunConfig cfg;
  cfg.source = source;
  // Defaults first, from the schema.
  for (const auto& f : schema()) apply_field(cfg, f, YAML::Load(f.default_yaml), Origin{"default of " + f.full()});

  std::map<std::string, std::string> where;  // "section.key" -> "file:line"
  if (!is_yaml_null(root)) {
    if (!root.IsMap())
      throw UserError(source + ": a run config is a mapping of sections (model, lora, data, training, "
                      "distributed, checkpoint, logging)");
    for (const auto& sec : root) {
      const std::string section = sec.first.Scalar();
      const std::string sec_at = at(source, sec.first);
      const auto& names = section_names();
      if (std::find(names.begin(), names.end(), section) == names.end()) {
        // A key placed at the top level instead of inside its section?
        for (const auto& f : schema())
          if (f.key == section)
            throw UserError(sec_at + ": '" + section + "' is not a section; did you mean " + f.full() +
                            "? (put it under '" + f.section + ":')");
        std::string hint = nearest_name(section, names);
        throw UserError(sec_at + ": unknown section '" + section + "'" +
                        (hint.empty() ? "" : " (did you mean " + hint + "?)") +
                        "; sections are model, lora, data, training, distributed, checkpoint, logging");
      }
      if (is_yaml_null(sec.second)) continue;
      if (!sec.second.IsMap()) throw UserError(sec_at + ": section '" + section + "' must be a mapping of keys");
      for (const auto& kv : sec.second) {
        const std::string key = kv.first.Scalar();
        const std::string key_at = at(source, kv.first);
        if (section == "model" && key == "architecture") {
          parse_arch(cfg, kv.second, source);
          cfg.model.has_inline_arch = true;
          where["model.architecture"] = key_at;
          continue;
        }
        const Field* f = find_field(section, key);
        if (!f) unknown_key(key_at, section, key);
        if (where.count(f->full())) throw UserError(key_at + ": " + f->full() + " is set twice");
        apply_field(cfg, *f, kv.second, Origin{key_at});
        where[f->full()] = key_at;
      }
    }
  }
  for (const std::string& ov : overrides) {
    const std::string origin = "--set " + ov;
    const auto eq = ov.find('=');
    const auto dot = ov.find('.');
    if (eq == std::string::npos || dot == std::string::npos || dot > eq)
      throw UserError(origin + ": expected section.key=value, e.g. --set training.learning_rate=1e-4");
    const std::string section = ov.substr(0, dot), key = ov.substr(dot + 1, eq - dot - 1);
    const std::string value = ov.substr(eq + 1);
    const auto& names = section_names();
    if (std::find(names.begin(), names.end(), section) == names.end()) {
      std::string hint = nearest_name(section, names);
      throw UserError(origin + ": unknown section '" + section + "'" + (hint.empty() ? "" : " (did you mean " + hint + "?)"));
    }
    const Field* f = find_field(section, key);
    if (!f) unknown_key(origin, section, key);
    YAML::Node node;
    try {
      node = YAML::Load(value);
    } catch (const YAML::Exception& e) {
      throw UserError(origin + ": the value is not valid YAML: " + e.msg);
    }
    apply_field(cfg, *f, node, Origin{origin});
    where[f->full()] = origin;
  }
  check_consistency(cfg, where);
  return cfg;
}

size_t edit_distance(const std::string& a, const std::string& b) {
  std::vector<size_t> prev(b.size() + 1), cur(b.size() + 1);
  for (size_t j = 0; j <= b.size(); ++j) prev[j] = j;
  for (size_t i = 1; i <= a.size(); ++i) {
    cur[0] = i;
    for (size_t j = 1; j <= b.size(); ++j)
      cur[j] = std::min({prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (a[i - 1] == b[j - 1] ? 0 : 1)});
    std::swap(prev, cur);
  }
  return prev[b.size()];
}

}  // namespace

const char* checkpointing_name(Checkpointing c) {
  switch (c) {
    case Checkpointing::off: return "off";
    case Checkpointing::on: return "on";
    case Checkpointing::offload: return "offload";
    case Checkpointing::keep_attention: return "keep_attention";
  }
  return "?";
}

double LoraSection::scaling() const {
  return use_rslora ? lora_alpha / std::sqrt(static_cast<double>(r)) : lora_alpha / static_cast<double>(r);
}

std::string nearest_name(const std::string& word, const std::vector<std::string>& candidates) {
  std::string best;
  size_t best_d = std::numeric_limits<size_t>::max();
  for (const auto& c : candidates) {
    size_t d = edit_distance(word, c);
    // A candidate that contains the word (or the reverse) is close too: "lr" ~ "learning_rate" is not,
    // but "batch_size" ~ "per_device_train_batch_size" is.
    if (c.find(word) != std::string::npos && word.size() >= 4) d = std::min(d, c.size() / 4);
    if (d < best_d) best_d = d, best = c;
  }
  const size_t limit = std::max<size_t>(2, word.size() / 3);
  return best_d <= limit ? best : "";
}

int64_t parse_byte_size(const std::string& text, const std::string& what) {
  size_t used = 0;
  double v = 0;
  try {
    v = std::stod(text, &used);
  } catch (const std::logic_error&) {
    used = 0;
  }
  std::string unit = text.substr(used);
  unit.erase(0, unit.find_first_not_of(' '));
  const std::map<std::string, double> units = {{"", 1},       {"B", 1},          {"KB", 1e3},
                                               {"MB", 1e6},   {"GB", 1e9},       {"TB", 1e12},
                                               {"KiB", 1024}, {"MiB", 1 << 20},  {"GiB", double(1 << 30)},
                                               {"TiB", 1024.0 * (1 << 30)}};
  auto it = units.find(unit);
  if (used == 0 || it == units.end() || v <= 0)
    throw UserError(what + " = '" + text + "' is not a size: write e.g. 20GiB or 512MiB");
  return static_cast<int64_t>(v * it->second);
}

RunConfig parse_run_config(const std::string& yaml_text, const std::string& source,
                           const std::vector<std::string>& overrides) {
  YAML::Node root;
  try {
    root = YAML::Load(yaml_text);
  } catch (const YAML::ParserException& e) {
    throw UserError(source + ":" + std::to_string(e.mark.line + 1) + ": YAML syntax error: " + e.msg);
  }
  return parse_root(root, source, overrides);
}

RunConfig load_run_config(const std::string& path, const std::vector<std::string>& overrides) {
  YAML::Node root;
  try {
    root = YAML::LoadFile(path);
  } catch (const YAML::BadFile&) {
    throw UserError(path + ": cannot read the run config (missing file or no permission)");
  } catch (const YAML::ParserException& e) {
    throw UserError(path + ":" + std::to_string(e.mark.line + 1) + ": YAML syntax error: " + e.msg);
  }
  return parse_root(root, path, overrides);
}

std::string RunConfig::to_yaml() const {
  YAML::Emitter out;
  out << YAML::BeginMap;
  for (const auto& section : section_names()) {
    out << YAML::Key << section << YAML::Value << YAML::BeginMap;
    for (const auto& f : schema()) {
      if (f.section != section) continue;
      out << YAML::Key << f.key << YAML::Value << field_value(*this, f);
      if (section == "model" && f.key == "name_or_path" && model.has_inline_arch) {
        const LlamaArch& a = model.arch;
        out << YAML::Key << "architecture" << YAML::Value << YAML::BeginMap;
        out << YAML::Key << "vocab_size" << YAML::Value << a.vocab_size;
        out << YAML::Key << "hidden_size" << YAML::Value << a.hidden_size;
        out << YAML::Key << "intermediate_size" << YAML::Value << a.intermediate_size;
        out << YAML::Key << "num_hidden_layers" << YAML::Value << a.n_layers;
        out << YAML::Key << "num_attention_heads" << YAML::Value << a.n_heads;
        out << YAML::Key << "num_key_value_heads" << YAML::Value << a.n_kv_heads;
        out << YAML::Key << "head_dim" << YAML::Value << a.head_dim;
        out << YAML::Key << "rms_norm_eps" << YAML::Value << a.rms_norm_eps;
        out << YAML::Key << "rope_theta" << YAML::Value << a.rope_theta;
        out << YAML::Key << "max_position_embeddings" << YAML::Value << a.max_position_embeddings;
        out << YAML::Key << "tie_word_embeddings" << YAML::Value << a.tie_word_embeddings;
        if (a.rope_scaling.type == "llama3") {
          out << YAML::Key << "rope_scaling" << YAML::Value << YAML::BeginMap;
          out << YAML::Key << "rope_type" << YAML::Value << a.rope_scaling.type;
          out << YAML::Key << "factor" << YAML::Value << a.rope_scaling.factor;
          out << YAML::Key << "low_freq_factor" << YAML::Value << a.rope_scaling.low_freq_factor;
          out << YAML::Key << "high_freq_factor" << YAML::Value << a.rope_scaling.high_freq_factor;
          out << YAML::Key << "original_max_position_embeddings" << YAML::Value
              << a.rope_scaling.original_max_position_embeddings;
          out << YAML::EndMap;
        }
        out << YAML::EndMap;
      }
    }
    out << YAML::EndMap;
  }
  out << YAML::EndMap;
  return std::string(out.c_str()) + "\n";
}

std::string reference_config_yaml() {
  std::ostringstream os;
  os << "# ranktune run config: every key with its default. Generated by `ranktune config --reference`;\n"
        "# a test checks that this file matches the code. Sections: model, lora, data, training,\n"
        "# distributed, checkpoint, logging. Key names follow HF transformers / PEFT / TRL.\n";
  for (const auto& section : section_names()) {
    os << "\n" << section << ":\n";
    for (const auto& f : schema()) {
      if (f.section != section) continue;
      os << "  # " << f.doc << "\n";
      os << "  " << f.key << ": " << f.default_yaml << "\n";
      if (section == "model" && f.key == "name_or_path") {
        os << "  # inline Llama shape (HF config.json names), instead of name_or_path; no default:\n"
              "  # architecture: {vocab_size: 262, hidden_size: 256, intermediate_size: 704, num_hidden_layers: 4,\n"
              "  #                num_attention_heads: 8, num_key_value_heads: 4, head_dim: 32, rms_norm_eps: 1.0e-5,\n"
              "  #                rope_theta: 10000, max_position_embeddings: 2048, tie_word_embeddings: true,\n"
              "  #                rope_scaling: null}\n";
      }
    }
  }
  return os.str();
}

}  // namespace ranktune
