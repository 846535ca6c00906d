#include "ranktune/hf_config.h"

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>

#include "ranktune/error.h"
#include "ranktune/safetensors.h"

namespace ranktune {

namespace {

using json = nlohmann::json;

// Typed access to one JSON object of a config file; every error names the file and the key
// (with its parent, e.g. "rope_scaling.factor").
class Fields {
 public:
  Fields(const json& obj, std::string source, std::string prefix = "")
      : obj_(obj), source_(std::move(source)), prefix_(std::move(prefix)) {}

  // Present and not null.
  bool has(const std::string& key) const { return obj_.contains(key) && !obj_.at(key).is_null(); }
  const json& at(const std::string& key) const { return obj_.at(key); }
  std::string key_name(const std::string& key) const { return prefix_ + key; }

  [[noreturn]] void fail(const std::string& key, const std::string& what) const {
    throw UserError(source_ + ": key '" + key_name(key) + "' " + what);
  }

  void require(const std::string& key, const std::string& why) const {
    if (!has(key)) fail(key, "is missing; " + why);
  }

  int64_t get_int(const std::string& key) const {
    const json& v = obj_.at(key);
    if (v.is_number_integer()) return v.get<int64_t>();
    if (v.is_number_float()) {  // some tools write 4096.0
      const double d = v.get<double>();
      if (std::isfinite(d) && d == std::floor(d) && std::fabs(d) < 9.0e15) return static_cast<int64_t>(d);
    }
    fail(key, "must be an integer, got " + v.dump());
  }
  int64_t get_int(const std::string& key, int64_t fallback) const { return has(key) ? get_int(key) : fallback; }
  int64_t required_int(const std::string& key) const {
    require(key, "an HF Llama config.json must give it");
    return get_int(key);
  }

  double get_double(const std::string& key) const {
    const json& v = obj_.at(key);
    if (!v.is_number()) fail(key, "must be a number, got " + v.dump());
    return v.get<double>();
  }
  double get_double(const std::string& key, double fallback) const { return has(key) ? get_double(key) : fallback; }

  bool get_bool(const std::string& key, bool fallback) const {
    if (!has(key)) return fallback;
    const json& v = obj_.at(key);
    if (!v.is_boolean()) fail(key, "must be true or false, got " + v.dump());
    return v.get<bool>();
  }

  std::string get_string(const std::string& key, const std::string& fallback) const {
    if (!has(key)) return fallback;
    const json& v = obj_.at(key);
    if (!v.is_string()) fail(key, "must be a string, got " + v.dump());
    return v.get<std::string>();
  }

  const json& get_object(const std::string& key) const {
    const json& v = obj_.at(key);
    if (!v.is_object()) fail(key, "must be an object or null, got " + v.dump());
    return v;
  }

 private:
  const json& obj_;
  std::string source_;
  std::string prefix_;
};

json parse_json_object(const std::string& text, const std::string& source) {
  json j;
  try {
    j = json::parse(text);
  } catch (const json::parse_error& e) {
    throw UserError(source + " is not valid JSON: " + e.what());
  }
  RT_REQUIRE(j.is_object(), source + " must hold a JSON object");
  return j;
}

std::string read_text(const std::string& path, const std::string& what) {
  std::ifstream in(path, std::ios::binary);
  RT_REQUIRE(in.good(), "cannot read " + what + " " + path + " (does it exist?)");
  std::ostringstream s;
  s << in.rdbuf();
  return s.str();
}

// A directory means the file of that name inside it.
std::string resolve(const std::string& path, const char* file_name) {
  namespace fs = std::filesystem;
  return fs::is_directory(path) ? (fs::path(path) / file_name).string() : path;
}

void read_rope(const Fields& top, const std::string& source, LlamaArch& arch) {
  // transformers v5 loads the v4 key rope_scaling in preference to rope_parameters when both are
  // set; the dict's rope_theta beats a top-level one, which beats the default 10000.
  std::string dict_key;
  for (const char* key : {"rope_scaling", "rope_parameters"}) {
    if (top.has(key) && !top.get_object(key).empty()) {
      dict_key = key;
      break;
    }
  }
  arch.rope_theta = top.get_double("rope_theta", 10000.0);
  arch.rope_scaling = RopeScaling{};
  arch.rope_scaling.type = "default";
  RT_REQUIRE(!top.has("partial_rotary_factor") || top.get_double("partial_rotary_factor") == 1.0,
             source + ": key 'partial_rotary_factor' must be 1.0; ranktune rotates the whole head");
  if (dict_key.empty()) return;

  const Fields rope(top.at(dict_key), source, dict_key + ".");
  arch.rope_theta = rope.get_double("rope_theta", arch.rope_theta);
  const std::string type =
      rope.has("rope_type") ? rope.get_string("rope_type", "") : rope.get_string("type", "default");
  RT_REQUIRE(!rope.has("partial_rotary_factor") || rope.get_double("partial_rotary_factor") == 1.0,
             source + ": key '" + dict_key + ".partial_rotary_factor' must be 1.0; ranktune rotates the whole head");
  if (type == "default") return;
  RT_REQUIRE(type == "llama3", source + ": key '" + dict_key + ".rope_type' is '" + type +
                                   "', which ranktune does not implement (it supports default and llama3 RoPE)");
  arch.rope_scaling.type = "llama3";
  const std::string why = "llama3 RoPE scaling needs it";
  rope.require("factor", why);
  rope.require("low_freq_factor", why);
  rope.require("high_freq_factor", why);
  arch.rope_scaling.factor = rope.get_double("factor");
  arch.rope_scaling.low_freq_factor = rope.get_double("low_freq_factor");
  arch.rope_scaling.high_freq_factor = rope.get_double("high_freq_factor");
  // As transformers: a top-level original_max_position_embeddings wins, then the dict's, then
  // max_position_embeddings.
  arch.rope_scaling.original_max_position_embeddings =
      top.has("original_max_position_embeddings")
          ? top.get_int("original_max_position_embeddings")
          : rope.get_int("original_max_position_embeddings", arch.max_position_embeddings);
  RT_REQUIRE(arch.rope_scaling.original_max_position_embeddings > 0,
             source + ": key '" + dict_key + ".original_max_position_embeddings' must be > 0");
}

std::optional<int64_t> optional_id(const Fields& f, const std::string& key) {
  if (!f.has(key)) return std::nullopt;
  return f.get_int(key);
}

}  // namespace

// ---- config.json --------------------------------------------------------------------------------

HfLlamaConfig parse_hf_config(const std::string& json_text, const std::string& source) {
  const json j = parse_json_object(json_text, source);
  const Fields f(j, source);

  f.require("model_type", "an HF config.json names its architecture (ranktune supports model_type llama)");
  const std::string model_type = f.get_string("model_type", "");
  RT_REQUIRE(model_type == "llama", source + ": unsupported architecture: model_type is '" + model_type +
                                        "'; ranktune supports model_type llama (LlamaForCausalLM)");
  if (f.has("architectures")) {
    const json& archs = f.at("architectures");
    RT_REQUIRE(archs.is_array(), source + ": key 'architectures' must be a list of class names");
    bool causal_lm = archs.empty();
    for (const json& a : archs) causal_lm = causal_lm || (a.is_string() && a.get<std::string>() == "LlamaForCausalLM");
    RT_REQUIRE(causal_lm, source + ": unsupported architecture " + archs.dump() +
                              " in key 'architectures'; ranktune supports LlamaForCausalLM");
  }

  // Options that would change the math.
  const std::string act = f.get_string("hidden_act", "silu");
  RT_REQUIRE(act == "silu", source + ": key 'hidden_act' is '" + act + "'; ranktune implements silu only");
  RT_REQUIRE(!f.get_bool("attention_bias", false),
             source + ": key 'attention_bias' is true; ranktune's attention projections have no bias");
  RT_REQUIRE(!f.get_bool("mlp_bias", false),
             source + ": key 'mlp_bias' is true; ranktune's MLP projections have no bias");
  RT_REQUIRE(f.get_double("attention_dropout", 0.0) == 0.0,
             source +
                 ": key 'attention_dropout' is not 0; ranktune does not implement attention dropout "
                 "(set it to 0.0)");

  HfLlamaConfig cfg;
  LlamaArch& a = cfg.arch;
  a.vocab_size = f.required_int("vocab_size");
  a.hidden_size = f.required_int("hidden_size");
  a.intermediate_size = f.required_int("intermediate_size");
  a.n_layers = f.required_int("num_hidden_layers");
  a.n_heads = f.required_int("num_attention_heads");
  RT_REQUIRE(a.n_heads > 0, source + ": key 'num_attention_heads' must be > 0");
  a.n_kv_heads = f.get_int("num_key_value_heads", a.n_heads);
  if (f.has("head_dim")) {
    a.head_dim = f.get_int("head_dim");
  } else {
    RT_REQUIRE(a.hidden_size % a.n_heads == 0,
               source + ": key 'head_dim' is missing and hidden_size (" + std::to_string(a.hidden_size) +
                   ") is not a multiple of num_attention_heads (" + std::to_string(a.n_heads) + "); give head_dim");
    a.head_dim = a.hidden_size / a.n_heads;
  }
  a.rms_norm_eps = f.get_double("rms_norm_eps", 1e-6);
  a.max_position_embeddings = f.get_int("max_position_embeddings", 2048);
  a.tie_word_embeddings = f.get_bool("tie_word_embeddings", false);
  read_rope(f, source, a);
  a.validate(source);

  cfg.torch_dtype = f.has("dtype") ? f.get_string("dtype", "") : f.get_string("torch_dtype", "");
  cfg.bos_token_id = optional_id(f, "bos_token_id");
  cfg.pad_token_id = optional_id(f, "pad_token_id");
  if (f.has("eos_token_id")) {
    const json& eos = f.at("eos_token_id");
    if (eos.is_array()) {
      for (const json& e : eos) {
        RT_REQUIRE(e.is_number_integer(), source + ": key 'eos_token_id' must be an integer or a list of integers");
        cfg.eos_token_ids.push_back(e.get<int64_t>());
      }
    } else {
      cfg.eos_token_ids.push_back(f.get_int("eos_token_id"));
    }
  }
  return cfg;
}

HfLlamaConfig read_hf_config(const std::string& path) {
  const std::string file = resolve(path, "config.json");
  return parse_hf_config(read_text(file, "HF config"), file);
}

std::string hf_config_json(const HfLlamaConfig& cfg) {
  const LlamaArch& a = cfg.arch;
  json j = json::object();
  j["architectures"] = {"LlamaForCausalLM"};
  j["model_type"] = "llama";
  j["vocab_size"] = a.vocab_size;
  j["hidden_size"] = a.hidden_size;
  j["intermediate_size"] = a.intermediate_size;
  j["num_hidden_layers"] = a.n_layers;
  j["num_attention_heads"] = a.n_heads;
  j["num_key_value_heads"] = a.n_kv_heads;
  j["head_dim"] = a.head_dim;
  j["hidden_act"] = "silu";
  j["rms_norm_eps"] = a.rms_norm_eps;
  j["max_position_embeddings"] = a.max_position_embeddings;
  j["tie_word_embeddings"] = a.tie_word_embeddings;
  j["attention_bias"] = false;
  j["attention_dropout"] = 0.0;
  j["mlp_bias"] = false;
  j["initializer_range"] = 0.02;
  j["use_cache"] = true;
  // RoPE in both layouts: transformers 4 reads rope_theta + rope_scaling, 5 reads rope_parameters.
  j["rope_theta"] = a.rope_theta;
  json params = {{"rope_type", "default"}, {"rope_theta", a.rope_theta}};
  if (a.rope_scaling.type == "llama3") {
    json scaling = {{"rope_type", "llama3"},
                    {"factor", a.rope_scaling.factor},
                    {"low_freq_factor", a.rope_scaling.low_freq_factor},
                    {"high_freq_factor", a.rope_scaling.high_freq_factor},
                    {"original_max_position_embeddings", a.rope_scaling.original_max_position_embeddings}};
    j["rope_scaling"] = scaling;
    params.update(scaling);
  } else {
    j["rope_scaling"] = nullptr;
  }
  j["rope_parameters"] = params;
  if (!cfg.torch_dtype.empty()) {
    j["torch_dtype"] = cfg.torch_dtype;
    j["dtype"] = cfg.torch_dtype;
  }
  j["bos_token_id"] = cfg.bos_token_id ? json(*cfg.bos_token_id) : json(nullptr);
  if (cfg.eos_token_ids.size() == 1) {
    j["eos_token_id"] = cfg.eos_token_ids[0];
  } else if (cfg.eos_token_ids.empty()) {
    j["eos_token_id"] = nullptr;
  } else {
    j["eos_token_id"] = cfg.eos_token_ids;
  }
  j["pad_token_id"] = cfg.pad_token_id ? json(*cfg.pad_token_id) : json(nullptr);
  return j.dump(2) + "\n";
}

void write_hf_config(const std::string& path, const HfLlamaConfig& config) {
  write_file_atomic(path, hf_config_json(config));
}

// ---- adapter_config.json ------------------------------------------------------------------------

double PeftLoraConfig::scaling() const {
  const double rd = static_cast<double>(r);
  return use_rslora ? lora_alpha / std::sqrt(rd) : lora_alpha / rd;
}

bool PeftLoraConfig::targets(const std::string& module) const {
  return std::find(target_modules.begin(), target_modules.end(), module) != target_modules.end();
}

PeftLoraConfig parse_peft_config(const std::string& json_text, const std::string& source) {
  const json j = parse_json_object(json_text, source);
  const Fields f(j, source);

  f.require("peft_type", "a PEFT adapter_config.json names its method (ranktune loads LORA adapters)");
  const std::string peft_type = f.get_string("peft_type", "");
  RT_REQUIRE(peft_type == "LORA", source + ": key 'peft_type' is '" + peft_type +
                                      "'; ranktune supports LoRA adapters (peft_type LORA) only");
  const std::string task = f.get_string("task_type", "CAUSAL_LM");
  RT_REQUIRE(task == "CAUSAL_LM",
             source + ": key 'task_type' is '" + task + "'; ranktune trains CAUSAL_LM adapters only");

  PeftLoraConfig c;
  f.require("r", "the LoRA rank is needed");
  c.r = f.get_int("r");
  RT_REQUIRE(c.r > 0, source + ": key 'r' must be > 0, got " + std::to_string(c.r));
  c.lora_alpha = f.get_double("lora_alpha", 8.0);  // PEFT's LoraConfig default
  c.lora_dropout = f.get_double("lora_dropout", 0.0);
  RT_REQUIRE(c.lora_dropout >= 0.0 && c.lora_dropout < 1.0, source + ": key 'lora_dropout' must be in [0, 1)");
  c.use_rslora = f.get_bool("use_rslora", false);
  c.bias = f.get_string("bias", "none");
  RT_REQUIRE(c.bias == "none" || c.bias == "all" || c.bias == "lora_only",
             source + ": key 'bias' must be none, all or lora_only, got '" + c.bias + "'");
  c.base_model_name_or_path = f.get_string("base_model_name_or_path", "");

  // Settings whose effect ranktune does not implement must be off.
  auto must_be_off = [&](const char* key, const char* what) {
    if (!f.has(key)) return;
    const json& v = f.at(key);
    const bool off = (v.is_boolean() && !v.get<bool>()) || ((v.is_object() || v.is_array()) && v.empty());
    RT_REQUIRE(off, source + ": key '" + key + "' is " + v.dump() + "; ranktune does not implement " + what +
                        " (remove it or set it to null)");
  };
  must_be_off("use_dora", "DoRA");
  must_be_off("rank_pattern", "per-module ranks");
  must_be_off("alpha_pattern", "per-module alphas");
  must_be_off("layers_to_transform", "LoRA on a subset of layers");
  must_be_off("layer_replication", "layer replication");
  must_be_off("modules_to_save", "fully trained extra modules");
  must_be_off("fan_in_fan_out", "fan_in_fan_out weights");
  must_be_off("lora_bias", "a bias on lora_B");
  must_be_off("exclude_modules", "excluded modules");
  must_be_off("target_parameters", "LoRA on bare parameters");
  must_be_off("trainable_token_indices", "trainable token embeddings");
  must_be_off("use_qalora", "QA-LoRA");
  must_be_off("alora_invocation_tokens", "activated LoRA");

  f.require("target_modules", "name the projections LoRA adapts (q_proj, k_proj, ...)");
  const json& targets = f.at("target_modules");
  std::vector<std::string> wanted;
  if (targets.is_string()) {
    const std::string s = targets.get<std::string>();
    RT_REQUIRE(s == "all-linear", source + ": key 'target_modules' is the pattern '" + s +
                                      "'; ranktune accepts a list of module names or \"all-linear\"");
    wanted = lora_module_names();
  } else {
    RT_REQUIRE(targets.is_array(), source + ": key 'target_modules' must be a list of module names");
    for (const json& t : targets) {
      RT_REQUIRE(t.is_string(), source + ": key 'target_modules' must be a list of module names, got " + t.dump());
      std::string name = t.get<std::string>();
      const size_t dot = name.rfind('.');
      const std::string leaf = dot == std::string::npos ? name : name.substr(dot + 1);
      const auto& known = lora_module_names();
      RT_REQUIRE(std::find(known.begin(), known.end(), leaf) != known.end(),
                 source + ": key 'target_modules' names '" + name +
                     "'; ranktune adapts q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj and down_proj only");
      wanted.push_back(leaf);
    }
  }
  for (const std::string& m : lora_module_names())
    if (std::find(wanted.begin(), wanted.end(), m) != wanted.end()) c.target_modules.push_back(m);
  RT_REQUIRE(!c.target_modules.empty(), source + ": key 'target_modules' is empty");
  return c;
}

PeftLoraConfig read_peft_config(const std::string& path) {
  const std::string file = resolve(path, "adapter_config.json");
  return parse_peft_config(read_text(file, "PEFT adapter config"), file);
}

std::string peft_config_json(const PeftLoraConfig& c) {
  json j = json::object();
  j["peft_type"] = "LORA";
  j["task_type"] = "CAUSAL_LM";
  j["base_model_name_or_path"] = c.base_model_name_or_path.empty() ? json(nullptr) : json(c.base_model_name_or_path);
  j["r"] = c.r;
  j["lora_alpha"] = c.lora_alpha;
  j["lora_dropout"] = c.lora_dropout;
  j["target_modules"] = c.target_modules;
  j["use_rslora"] = c.use_rslora;
  j["bias"] = c.bias;
  j["fan_in_fan_out"] = false;
  j["inference_mode"] = true;
  j["init_lora_weights"] = true;
  j["use_dora"] = false;
  j["modules_to_save"] = nullptr;
  j["layers_to_transform"] = nullptr;
  j["layers_pattern"] = nullptr;
  j["rank_pattern"] = json::object();
  j["alpha_pattern"] = json::object();
  j["revision"] = nullptr;
  return j.dump(2) + "\n";
}

void write_peft_config(const std::string& path, const PeftLoraConfig& config) {
  write_file_atomic(path, peft_config_json(config));
}

}  // namespace ranktune
