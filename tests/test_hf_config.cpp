// HF config.json and PEFT adapter_config.json parsing, their writers, and the fixtures' configs
// against their tensors.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <set>
#include <string>

#include "ranktune/error.h"
#include "ranktune/hf_config.h"
#include "ranktune/llama.h"
#include "ranktune/safetensors.h"

namespace fs = std::filesystem;
using namespace ranktune;

namespace {

class TempDir {
 public:
  TempDir() {
    std::string pattern = (fs::temp_directory_path() / "ranktune_cfg_XXXXXX").string();
    RT_ASSERT(::mkdtemp(pattern.data()) != nullptr, "mkdtemp");
    path_ = pattern;
  }
  ~TempDir() {
    std::error_code ec;
    fs::remove_all(path_, ec);
  }
  std::string write(const std::string& name, const std::string& text) const {
    const std::string p = (path_ / name).string();
    std::ofstream(p) << text;
    return p;
  }
  std::string str() const { return path_.string(); }

 private:
  fs::path path_;
};

template <class Fn>
std::string user_error(Fn&& fn) {
  try {
    fn();
  } catch (const UserError& e) {
    return e.what();
  }
  ADD_FAILURE() << "expected a UserError";
  return "";
}

#define EXPECT_HAS(haystack, needle) EXPECT_NE((haystack).find(needle), std::string::npos) << (haystack)

// Llama 3.2 1B's config as transformers 4 wrote it.
const char* kLlama32V4 = R"({
  "architectures": ["LlamaForCausalLM"], "attention_bias": false, "attention_dropout": 0.0,
  "bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009], "head_dim": 64, "hidden_act": "silu",
  "hidden_size": 2048, "initializer_range": 0.02, "intermediate_size": 8192,
  "max_position_embeddings": 131072, "mlp_bias": false, "model_type": "llama", "num_attention_heads": 32,
  "num_hidden_layers": 16, "num_key_value_heads": 8, "pretraining_tp": 1, "rms_norm_eps": 1e-05,
  "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                   "original_max_position_embeddings": 8192, "rope_type": "llama3"},
  "rope_theta": 500000.0, "tie_word_embeddings": true, "torch_dtype": "bfloat16",
  "transformers_version": "4.45.0.dev0", "use_cache": true, "vocab_size": 128256})";

// A config as transformers 5 writes it (rope_parameters, dtype).
const char* kV5 = R"({
  "architectures": ["LlamaForCausalLM"], "attention_bias": false, "attention_dropout": 0.0,
  "bos_token_id": 1, "dtype": "float32", "eos_token_id": 2, "head_dim": 18, "hidden_act": "silu",
  "hidden_size": 72, "initializer_range": 0.02, "intermediate_size": 200, "max_position_embeddings": 128,
  "mlp_bias": false, "model_type": "llama", "num_attention_heads": 4, "num_hidden_layers": 2,
  "num_key_value_heads": 2, "pad_token_id": null, "pretraining_tp": 1, "rms_norm_eps": 1e-06,
  "rope_parameters": {"factor": 8.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                      "original_max_position_embeddings": 32, "rope_theta": 10000.0, "rope_type": "llama3"},
  "tie_word_embeddings": false, "transformers_version": "5.24.0", "use_cache": true, "vocab_size": 257})";

const char* kMinimal = R"({"model_type": "llama", "vocab_size": 100, "hidden_size": 64,
  "intermediate_size": 128, "num_hidden_layers": 3, "num_attention_heads": 8})";

// kMinimal with one key replaced or added.
std::string minimal_with(const std::string& extra) {
  std::string s = kMinimal;
  s.insert(s.rfind('}'), ", " + extra);
  return s;
}

}  // namespace

TEST(HfConfigParse, TransformersV4Llama32) {
  const HfLlamaConfig c = parse_hf_config(kLlama32V4, "config.json");
  const LlamaArch& a = c.arch;
  EXPECT_EQ(a.vocab_size, 128256);
  EXPECT_EQ(a.hidden_size, 2048);
  EXPECT_EQ(a.intermediate_size, 8192);
  EXPECT_EQ(a.n_layers, 16);
  EXPECT_EQ(a.n_heads, 32);
  EXPECT_EQ(a.n_kv_heads, 8);
  EXPECT_EQ(a.head_dim, 64);
  EXPECT_DOUBLE_EQ(a.rms_norm_eps, 1e-5);
  EXPECT_DOUBLE_EQ(a.rope_theta, 500000.0);
  EXPECT_EQ(a.max_position_embeddings, 131072);
  EXPECT_TRUE(a.tie_word_embeddings);
  EXPECT_EQ(a.rope_scaling.type, "llama3");
  EXPECT_DOUBLE_EQ(a.rope_scaling.factor, 32.0);
  EXPECT_DOUBLE_EQ(a.rope_scaling.low_freq_factor, 1.0);
  EXPECT_DOUBLE_EQ(a.rope_scaling.high_freq_factor, 4.0);
  EXPECT_EQ(a.rope_scaling.original_max_position_embeddings, 8192);
  EXPECT_EQ(c.torch_dtype, "bfloat16");
  EXPECT_EQ(c.bos_token_id, 128000);
  EXPECT_EQ(c.eos_token_ids, (std::vector<int64_t>{128001, 128008, 128009}));
  EXPECT_FALSE(c.pad_token_id.has_value());
}

TEST(HfConfigParse, TransformersV5RopeParameters) {
  const HfLlamaConfig c = parse_hf_config(kV5, "config.json");
  EXPECT_EQ(c.arch.head_dim, 18);
  EXPECT_EQ(c.arch.n_kv_heads, 2);
  EXPECT_FALSE(c.arch.tie_word_embeddings);
  EXPECT_DOUBLE_EQ(c.arch.rope_theta, 10000.0);
  EXPECT_EQ(c.arch.rope_scaling.type, "llama3");
  EXPECT_DOUBLE_EQ(c.arch.rope_scaling.factor, 8.0);
  EXPECT_EQ(c.arch.rope_scaling.original_max_position_embeddings, 32);
  EXPECT_EQ(c.torch_dtype, "float32");
  EXPECT_EQ(c.eos_token_ids, std::vector<int64_t>{2});
}

TEST(HfConfigParse, DefaultsAreTransformers) {
  const LlamaArch a = parse_hf_config(kMinimal, "config.json").arch;
  EXPECT_EQ(a.n_kv_heads, 8);
  EXPECT_EQ(a.head_dim, 8);
  EXPECT_DOUBLE_EQ(a.rms_norm_eps, 1e-6);  // LlamaConfig's default, not LlamaArch's
  EXPECT_DOUBLE_EQ(a.rope_theta, 10000.0);
  EXPECT_EQ(a.max_position_embeddings, 2048);
  EXPECT_FALSE(a.tie_word_embeddings);
  EXPECT_NE(a.rope_scaling.type, "llama3");
  // Nulls mean the default too.
  const LlamaArch b =
      parse_hf_config(minimal_with(R"("num_key_value_heads": null, "head_dim": null, "rope_scaling": null)"), "c").arch;
  EXPECT_EQ(b.n_kv_heads, 8);
  EXPECT_EQ(b.head_dim, 8);
}

TEST(HfConfigParse, RopeVariants) {
  // Legacy "type" key; original_max_position_embeddings falls back to max_position_embeddings.
  LlamaArch a = parse_hf_config(minimal_with(R"("max_position_embeddings": 4096, "rope_theta": 5.0,
      "rope_scaling": {"type": "llama3", "factor": 8, "low_freq_factor": 1, "high_freq_factor": 4})"),
                                "c")
                    .arch;
  EXPECT_EQ(a.rope_scaling.type, "llama3");
  EXPECT_DOUBLE_EQ(a.rope_theta, 5.0);
  EXPECT_EQ(a.rope_scaling.original_max_position_embeddings, 4096);
  // The dict's rope_theta beats the top-level one; rope_scaling beats rope_parameters (transformers 5).
  a = parse_hf_config(
          minimal_with(R"("rope_theta": 5.0, "rope_parameters": {"rope_type": "default", "rope_theta": 7.0})"), "c")
          .arch;
  EXPECT_DOUBLE_EQ(a.rope_theta, 7.0);
  EXPECT_NE(a.rope_scaling.type, "llama3");
  a = parse_hf_config(minimal_with(R"("rope_parameters": {"rope_type": "default", "rope_theta": 7.0},
      "rope_scaling": {"rope_type": "llama3", "factor": 2, "low_freq_factor": 1, "high_freq_factor": 4,
                       "original_max_position_embeddings": 512}, "rope_theta": 3.0)"),
                      "c")
          .arch;
  EXPECT_EQ(a.rope_scaling.type, "llama3");
  EXPECT_DOUBLE_EQ(a.rope_theta, 3.0);
  EXPECT_EQ(a.rope_scaling.original_max_position_embeddings, 512);
}

TEST(HfConfigErrors, UnsupportedArchitecture) {
  TempDir dir;
  const std::string path = dir.write("config.json", R"({"model_type": "mistral", "vocab_size": 10})");
  const std::string msg = user_error([&] { read_hf_config(path); });
  EXPECT_HAS(msg, path);
  EXPECT_HAS(msg, "unsupported architecture");
  EXPECT_HAS(msg, "model_type llama");
  EXPECT_HAS(user_error([&] { parse_hf_config(R"({"vocab_size": 10})", "x.json"); }), "model_type");
  EXPECT_HAS(user_error([&] {
               parse_hf_config(minimal_with(R"("architectures": ["LlamaForSequenceClassification"])"), "x.json");
             }),
             "LlamaForCausalLM");
}

TEST(HfConfigErrors, MissingAndMistypedKeys) {
  TempDir dir;
  const std::string path = dir.write("config.json", R"({"model_type": "llama", "vocab_size": 100,
      "intermediate_size": 128, "num_hidden_layers": 3, "num_attention_heads": 8})");
  std::string msg = user_error([&] { read_hf_config(path); });
  EXPECT_HAS(msg, path);
  EXPECT_HAS(msg, "'hidden_size'");
  EXPECT_HAS(msg, "missing");

  const std::string path2 = dir.write("c2.json", minimal_with(R"("num_key_value_heads": "eight")"));
  msg = user_error([&] { read_hf_config(path2); });
  EXPECT_HAS(msg, path2);
  EXPECT_HAS(msg, "'num_key_value_heads'");
  EXPECT_HAS(msg, "integer");

  EXPECT_HAS(user_error([&] { parse_hf_config(minimal_with(R"("rms_norm_eps": "1e-5")"), "c"); }), "'rms_norm_eps'");
  EXPECT_HAS(user_error([&] { parse_hf_config(minimal_with(R"("tie_word_embeddings": 1)"), "c"); }),
             "'tie_word_embeddings'");
  EXPECT_HAS(user_error([&] { parse_hf_config(minimal_with(R"("rope_scaling": 3)"), "c"); }), "'rope_scaling'");
  EXPECT_HAS(user_error([&] { parse_hf_config(minimal_with(R"("eos_token_id": ["a"])"), "c"); }), "'eos_token_id'");
  EXPECT_HAS(user_error([&] { read_hf_config(dir.str() + "/none.json"); }), "none.json");
  const std::string bad = dir.write("bad.json", "{\"model_type\": ");
  EXPECT_HAS(user_error([&] { read_hf_config(bad); }), bad);
}

TEST(HfConfigErrors, UnsupportedMath) {
  EXPECT_HAS(user_error([&] { parse_hf_config(minimal_with(R"("attention_bias": true)"), "c"); }), "attention_bias");
  EXPECT_HAS(user_error([&] { parse_hf_config(minimal_with(R"("mlp_bias": true)"), "c"); }), "mlp_bias");
  EXPECT_HAS(user_error([&] { parse_hf_config(minimal_with(R"("hidden_act": "gelu")"), "c"); }), "hidden_act");
  EXPECT_HAS(user_error([&] { parse_hf_config(minimal_with(R"("attention_dropout": 0.1)"), "c"); }),
             "attention_dropout");
  EXPECT_HAS(user_error([&] { parse_hf_config(minimal_with(R"("partial_rotary_factor": 0.5)"), "c"); }),
             "partial_rotary_factor");
  std::string msg = user_error(
      [&] { parse_hf_config(minimal_with(R"("rope_scaling": {"rope_type": "yarn", "factor": 4.0})"), "c"); });
  EXPECT_HAS(msg, "yarn");
  EXPECT_HAS(msg, "rope_scaling.rope_type");
  msg = user_error([&] {
    parse_hf_config(
        minimal_with(R"("rope_parameters": {"rope_type": "llama3", "low_freq_factor": 1, "high_freq_factor": 4})"),
        "c");
  });
  EXPECT_HAS(msg, "'rope_parameters.factor'");
  // Shape checks come from LlamaArch::validate and name the key.
  EXPECT_HAS(user_error([&] { parse_hf_config(minimal_with(R"("num_key_value_heads": 3)"), "c"); }),
             "num_key_value_heads");
  EXPECT_HAS(user_error([&] {
               parse_hf_config(R"({"model_type": "llama", "vocab_size": 100, "hidden_size": 60,
                   "intermediate_size": 128, "num_hidden_layers": 3, "num_attention_heads": 8})",
                               "c");
             }),
             "head_dim");
}

TEST(HfConfigWrite, RoundTrip) {
  TempDir dir;
  for (const char* text : {kLlama32V4, kV5, kMinimal}) {
    HfLlamaConfig c = parse_hf_config(text, "in");
    if (c.torch_dtype.empty()) c.torch_dtype = "float32";
    const std::string path = dir.str() + "/config.json";
    write_hf_config(path, c);
    EXPECT_FALSE(fs::exists(path + ".tmp"));
    const HfLlamaConfig back = read_hf_config(dir.str());  // a directory means its config.json
    const LlamaArch &a = c.arch, &b = back.arch;
    EXPECT_EQ(b.vocab_size, a.vocab_size);
    EXPECT_EQ(b.hidden_size, a.hidden_size);
    EXPECT_EQ(b.intermediate_size, a.intermediate_size);
    EXPECT_EQ(b.n_layers, a.n_layers);
    EXPECT_EQ(b.n_heads, a.n_heads);
    EXPECT_EQ(b.n_kv_heads, a.n_kv_heads);
    EXPECT_EQ(b.head_dim, a.head_dim);
    EXPECT_EQ(b.rms_norm_eps, a.rms_norm_eps);
    EXPECT_EQ(b.rope_theta, a.rope_theta);
    EXPECT_EQ(b.max_position_embeddings, a.max_position_embeddings);
    EXPECT_EQ(b.tie_word_embeddings, a.tie_word_embeddings);
    EXPECT_EQ(b.rope_scaling.type == "llama3", a.rope_scaling.type == "llama3");
    EXPECT_EQ(b.rope_scaling.factor, a.rope_scaling.factor);
    EXPECT_EQ(b.rope_scaling.low_freq_factor, a.rope_scaling.low_freq_factor);
    EXPECT_EQ(b.rope_scaling.high_freq_factor, a.rope_scaling.high_freq_factor);
    EXPECT_EQ(b.rope_scaling.original_max_position_embeddings, a.rope_scaling.original_max_position_embeddings);
    EXPECT_EQ(back.torch_dtype, c.torch_dtype);
    EXPECT_EQ(back.bos_token_id, c.bos_token_id);
    EXPECT_EQ(back.eos_token_ids, c.eos_token_ids);
  }
  const std::string text = hf_config_json(parse_hf_config(kV5, "in"));
  EXPECT_HAS(text, "\"LlamaForCausalLM\"");
  EXPECT_HAS(text, "\"model_type\": \"llama\"");
}

// ---- PEFT adapter_config.json ---------------------------------------------------------------------

TEST(HfConfigPeft, ParsesLoraConfig) {
  const PeftLoraConfig c = parse_peft_config(R"({"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 8,
      "lora_alpha": 16, "lora_dropout": 0.05, "use_rslora": true, "bias": "none", "use_dora": false,
      "rank_pattern": {}, "alpha_pattern": {}, "modules_to_save": null, "layers_to_transform": null,
      "fan_in_fan_out": false, "base_model_name_or_path": "meta-llama/Llama-3.2-1B",
      "target_modules": ["v_proj", "down_proj", "self_attn.q_proj"]})",
                                             "adapter_config.json");
  EXPECT_EQ(c.r, 8);
  EXPECT_DOUBLE_EQ(c.lora_alpha, 16.0);
  EXPECT_DOUBLE_EQ(c.lora_dropout, 0.05);
  EXPECT_TRUE(c.use_rslora);
  EXPECT_EQ(c.bias, "none");
  EXPECT_EQ(c.base_model_name_or_path, "meta-llama/Llama-3.2-1B");
  EXPECT_EQ(c.target_modules, (std::vector<std::string>{"q_proj", "v_proj", "down_proj"}));
  EXPECT_TRUE(c.targets("v_proj"));
  EXPECT_FALSE(c.targets("k_proj"));
  EXPECT_NEAR(c.scaling(), 16.0 / std::sqrt(8.0), 1e-12);

  const PeftLoraConfig all =
      parse_peft_config(R"({"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": "all-linear"})", "a");
  EXPECT_EQ(all.target_modules, lora_module_names());
  EXPECT_DOUBLE_EQ(all.scaling(), 2.0);
}

TEST(HfConfigPeft, RefusesWhatRanktuneDoesNotImplement) {
  const std::string base = R"("peft_type": "LORA", "r": 4, "lora_alpha": 8)";
  auto err = [&](const std::string& extra) {
    return user_error([&] { parse_peft_config("{" + base + ", " + extra + "}", "adapter_config.json"); });
  };
  EXPECT_HAS(err(R"("target_modules": ["q_proj"], "use_dora": true)"), "use_dora");
  EXPECT_HAS(err(R"("target_modules": ["q_proj"], "rank_pattern": {"q_proj": 8})"), "rank_pattern");
  EXPECT_HAS(err(R"("target_modules": ["q_proj"], "layers_to_transform": [0])"), "layers_to_transform");
  EXPECT_HAS(err(R"("target_modules": ["q_proj"], "modules_to_save": ["lm_head"])"), "modules_to_save");
  EXPECT_HAS(err(R"("target_modules": ["lm_head"])"), "lm_head");
  EXPECT_HAS(err(R"("target_modules": ".*proj")"), "target_modules");
  EXPECT_HAS(err(R"("target_modules": [])"), "target_modules");
  EXPECT_HAS(err(R"("target_modules": ["q_proj"], "r": 0)"), "'r'");
  EXPECT_HAS(err(R"("target_modules": ["q_proj"], "bias": "some")"), "'bias'");
  EXPECT_HAS(user_error([&] { parse_peft_config(R"({"peft_type": "IA3", "target_modules": ["q_proj"]})", "a.json"); }),
             "peft_type");
  TempDir dir;
  const std::string path = dir.write("adapter_config.json", R"({"peft_type": "LORA", "target_modules": ["q_proj"]})");
  const std::string msg = user_error([&] { read_peft_config(dir.str()); });
  EXPECT_HAS(msg, path);
  EXPECT_HAS(msg, "'r'");
}

TEST(HfConfigPeft, WriteRoundTrip) {
  TempDir dir;
  PeftLoraConfig c;
  c.r = 16;
  c.lora_alpha = 32;
  c.lora_dropout = 0.1;
  c.use_rslora = true;
  c.target_modules = {"q_proj", "k_proj", "o_proj"};
  c.base_model_name_or_path = "/models/base";
  write_peft_config(dir.str() + "/adapter_config.json", c);
  const PeftLoraConfig back = read_peft_config(dir.str());
  EXPECT_EQ(back.r, 16);
  EXPECT_DOUBLE_EQ(back.lora_alpha, 32.0);
  EXPECT_DOUBLE_EQ(back.lora_dropout, 0.1);
  EXPECT_TRUE(back.use_rslora);
  EXPECT_EQ(back.target_modules, c.target_modules);
  EXPECT_EQ(back.base_model_name_or_path, "/models/base");
}

// ---- the fixtures: configs agree with their tensors ---------------------------------------------

namespace {
std::vector<fs::path> fixture_cases() {
  std::vector<fs::path> out;
  const fs::path root = fs::path(RANKTUNE_FIXTURES) / "hf";
  if (!fs::is_directory(root)) return out;
  for (const auto& e : fs::directory_iterator(root))
    if (fs::exists(e.path() / "config.json")) out.push_back(e.path());
  std::sort(out.begin(), out.end());
  return out;
}

std::vector<int64_t> linear_shape(const LlamaArch& a, const std::string& module) {
  const int64_t C = a.hidden_size, F = a.intermediate_size;
  if (module == "q_proj") return {a.q_dim(), C};
  if (module == "k_proj" || module == "v_proj") return {a.kv_dim(), C};
  if (module == "o_proj") return {C, a.q_dim()};
  if (module == "gate_proj" || module == "up_proj") return {F, C};
  return {C, F};  // down_proj
}
}  // namespace

TEST(HfConfigFixtures, ArchMatchesTensors) {
  const std::vector<fs::path> cases = fixture_cases();
  if (cases.empty()) GTEST_SKIP() << "no fixtures under " << RANKTUNE_FIXTURES << "/hf";
  for (const fs::path& dir : cases) {
    SCOPED_TRACE(dir.string());
    const LlamaArch arch = read_hf_arch(dir.string());
    const HfCheckpoint ckpt(dir.string());
    const std::vector<ParamSpec> layout = llama_param_layout(arch);
    std::set<std::string> expected_names;
    for (const ParamSpec& p : layout) {
      expected_names.insert(p.name);
      ASSERT_TRUE(ckpt.contains(p.name)) << p.name;
      ckpt.expect_shape(p.name, p.shape);
      EXPECT_EQ(ckpt.info(p.name).dtype, StDType::f32);
    }
    const std::vector<std::string> names = ckpt.names();
    EXPECT_EQ(std::set<std::string>(names.begin(), names.end()), expected_names);

    SafetensorsFile inputs((dir / "inputs.safetensors").string());
    const std::vector<int64_t> bt = inputs.info("input_ids").shape;
    ASSERT_EQ(bt.size(), 2u);
    EXPECT_LE(bt[1], arch.max_position_embeddings);
    for (int32_t id : inputs.read_i32("input_ids")) ASSERT_TRUE(id >= 0 && id < arch.vocab_size);

    SafetensorsFile expected((dir / "expected.safetensors").string());
    EXPECT_EQ(expected.info("logits").shape, (std::vector<int64_t>{bt[0], bt[1], arch.vocab_size}));

    // ranktune's rotary frequencies against the model's own buffer.
    const std::vector<float> hf_inv_freq = expected.read_f32("rope_inv_freq");
    const std::vector<float> inv_freq = rope_inv_freq(arch);
    ASSERT_EQ(inv_freq.size(), hf_inv_freq.size());
    for (size_t i = 0; i < inv_freq.size(); ++i)
      EXPECT_NEAR(inv_freq[i], hf_inv_freq[i], 2e-6 * std::fabs(hf_inv_freq[i])) << "inv_freq " << i;

    const bool lora = fs::exists(dir / "adapter_config.json");
    std::set<std::string> grads;
    for (const std::string& n : expected.names())
      if (n.rfind("grad.", 0) == 0) grads.insert(n.substr(5));
    if (!lora) {  // full fine-tuning: a gradient for every base tensor, of its shape
      EXPECT_EQ(grads, expected_names);
      for (const ParamSpec& p : layout) expected.expect_shape("grad." + p.name, p.shape);
      continue;
    }
    const PeftLoraConfig peft = read_peft_config(dir.string());
    const SafetensorsFile adapter((dir / "adapter_model.safetensors").string());
    std::set<std::string> adapter_names;
    for (int l = 0; l < arch.n_layers; ++l) {
      for (const std::string& m : peft.target_modules) {
        const bool attn = m == "q_proj" || m == "k_proj" || m == "v_proj" || m == "o_proj";
        const std::string prefix =
            "base_model.model.model.layers." + std::to_string(l) + (attn ? ".self_attn." : ".mlp.") + m;
        const std::vector<int64_t> w = linear_shape(arch, m);  // [out, in]
        adapter.expect_shape(prefix + ".lora_A.weight", {peft.r, w[1]});
        adapter.expect_shape(prefix + ".lora_B.weight", {w[0], peft.r});
        expected.expect_shape("grad." + prefix + ".lora_A.weight", {peft.r, w[1]});
        expected.expect_shape("grad." + prefix + ".lora_B.weight", {w[0], peft.r});
        adapter_names.insert(prefix + ".lora_A.weight");
        adapter_names.insert(prefix + ".lora_B.weight");
      }
    }
    const std::vector<std::string>& an = adapter.names();
    EXPECT_EQ(std::set<std::string>(an.begin(), an.end()), adapter_names);
    EXPECT_EQ(grads, adapter_names);
  }
}
