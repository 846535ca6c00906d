// Run config validation: every error class names the file, line and key, and suggests a fix.
#include <gtest/gtest.h>

#include <fstream>
#include <sstream>

#include "ranktune/config.h"
#include "ranktune/error.h"

using namespace ranktune;

namespace {

const char* kBase =
    "model:\n"
    "  architecture: {vocab_size: 262, hidden_size: 64, intermediate_size: 128, num_hidden_layers: 2,\n"
    "                 num_attention_heads: 4, num_key_value_heads: 2}\n"
    "  max_seq_length: 64\n"
    "training:\n"
    "  learning_rate: 1.0e-3\n"
    "  max_steps: 10\n";

std::string error_of(const std::string& yaml, const std::vector<std::string>& overrides = {}) {
  try {
    parse_run_config(yaml, "run.yaml", overrides);
  } catch (const UserError& e) {
    return e.what();
  }
  return "";
}

}  // namespace

TEST(Config, ValidConfigResolvesDefaults) {
  RunConfig c = parse_run_config(kBase, "run.yaml");
  EXPECT_EQ(c.model.arch.hidden_size, 64);
  EXPECT_EQ(c.model.arch.head_dim, 16);
  EXPECT_EQ(c.model.arch.n_kv_heads, 2);
  EXPECT_DOUBLE_EQ(c.training.learning_rate, 1e-3);
  EXPECT_EQ(c.training.max_steps, 10);
  EXPECT_EQ(c.lora.r, 16);
  EXPECT_EQ(c.lora.target_modules.size(), 7u);
  EXPECT_EQ(c.training.optim, "adamw");
  EXPECT_EQ(c.model.gradient_checkpointing, Checkpointing::on);
}

TEST(Config, MisspeltKeyNamesFileLineAndSuggests) {
  std::string yaml = std::string(kBase) + "  learning_rat: 0.1\n";
  std::string err = error_of(yaml);
  EXPECT_NE(err.find("run.yaml:8"), std::string::npos) << err;
  EXPECT_NE(err.find("learning_rat"), std::string::npos) << err;
  EXPECT_NE(err.find("did you mean learning_rate"), std::string::npos) << err;
}

TEST(Config, KeyInWrongSectionNamesItsSection) {
  std::string err = error_of(std::string(kBase) + "  save_steps: 5\n");
  EXPECT_NE(err.find("checkpoint.save_steps"), std::string::npos) << err;
}

TEST(Config, UnknownSectionSuggests) {
  std::string err = error_of(std::string(kBase) + "trainig:\n  seed: 1\n");
  EXPECT_NE(err.find("run.yaml:8"), std::string::npos) << err;
  EXPECT_NE(err.find("did you mean training"), std::string::npos) << err;
}

TEST(Config, WrongTypesAreErrors) {
  std::string err = error_of(std::string(kBase) + "  seed: fast\n");
  EXPECT_NE(err.find("training.seed must be an integer"), std::string::npos) << err;
  err = error_of(std::string(kBase) + "  bf16: maybe\n");
  EXPECT_NE(err.find("training.bf16 must be true or false"), std::string::npos) << err;
  err = error_of(std::string(kBase) + "  per_device_train_batch_size: 2.5\n");
  EXPECT_NE(err.find("must be an integer"), std::string::npos) << err;
  err = error_of(std::string(kBase) + "lora:\n  target_modules: {a: 1}\n");
  EXPECT_NE(err.find("list of strings"), std::string::npos) << err;
}

TEST(Config, OutOfRangeValuesAreErrors) {
  std::string err = error_of(std::string(kBase) + "lora:\n  r: 0\n");
  EXPECT_NE(err.find("run.yaml:9"), std::string::npos) << err;
  EXPECT_NE(err.find("lora.r = 0 is out of range"), std::string::npos) << err;
  err = error_of(std::string(kBase) + "  learning_rate: -1\n");
  EXPECT_NE(err.find("set twice"), std::string::npos) << err;
  err = error_of(std::string(kBase) + "lora:\n  lora_dropout: 1.5\n");
  EXPECT_NE(err.find("lora.lora_dropout"), std::string::npos) << err;
  err = error_of(std::string(kBase) + "  optim: sgd\n");
  EXPECT_NE(err.find("is not one of: adamw, adamw_8bit"), std::string::npos) << err;
  err = error_of(std::string(kBase) + "distributed:\n  grad_reduce: copy\n");
  EXPECT_NE(err.find("distributed.grad_reduce"), std::string::npos) << err;
  EXPECT_NE(err.find("is not one of: auto, nccl"), std::string::npos) << err;
  err = error_of(std::string(kBase) + "distributed:\n  zero_reduce: nccl\n");
  EXPECT_NE(err.find("distributed.zero_reduce is now distributed.grad_reduce"), std::string::npos) << err;
}

TEST(Config, ContradictionsAreErrors) {
  std::string err = error_of(std::string(kBase) + "lora:\n  enabled: false\n", {"model.load_in_4bit=true"});
  EXPECT_NE(err.find("load_in_4bit needs LoRA"), std::string::npos) << err;
  err = error_of(std::string(kBase) + "  warmup_steps: 20\n");
  EXPECT_NE(err.find("run.yaml:8"), std::string::npos) << err;
  EXPECT_NE(err.find("longer than the run"), std::string::npos) << err;
  err = error_of("training: {max_steps: 3}\n");
  EXPECT_NE(err.find("the model is not set"), std::string::npos) << err;
  err = error_of(std::string(kBase) + "lora:\n  target_modules: [q_proj, gate_prj]\n");
  EXPECT_NE(err.find("did you mean gate_proj"), std::string::npos) << err;
  err = error_of(std::string(kBase), {"model.device_map=gpu0"});
  EXPECT_NE(err.find("device_map"), std::string::npos) << err;
  err = error_of(std::string(kBase), {"model.max_seq_length=5000"});
  EXPECT_NE(err.find("max_position_embeddings"), std::string::npos) << err;
}

TEST(Config, ArchitectureErrors) {
  std::string err = error_of(
      "model:\n  architecture: {vocab_size: 10, hidden_size: 64, intermediate_size: 8, num_hidden_layers: 1,\n"
      "    num_attention_heads: 4, num_key_value_heads: 3}\n");
  EXPECT_NE(err.find("num_key_value_heads"), std::string::npos) << err;
  err = error_of("model:\n  architecture: {vocab_size: 10, hiden_size: 64}\n");
  EXPECT_NE(err.find("did you mean hidden_size"), std::string::npos) << err;
}

// gradient_checkpointing takes true, false, "offload" and "keep_attention", and writes them back as
// it read them; anything else is named with the values it takes.
TEST(Config, GradientCheckpointingModes) {
  RunConfig c = parse_run_config(kBase, "run.yaml", {"model.gradient_checkpointing=keep_attention"});
  EXPECT_EQ(c.model.gradient_checkpointing, Checkpointing::keep_attention);
  const RunConfig again = parse_run_config(c.to_yaml(), "config.yaml");
  EXPECT_EQ(again.model.gradient_checkpointing, Checkpointing::keep_attention);
  c = parse_run_config(kBase, "run.yaml", {"model.gradient_checkpointing=false"});
  EXPECT_EQ(parse_run_config(c.to_yaml(), "config.yaml").model.gradient_checkpointing, Checkpointing::off);
  const std::string err = error_of(kBase, {"model.gradient_checkpointing=keep_attn"});
  EXPECT_NE(err.find("model.gradient_checkpointing"), std::string::npos) << err;
  EXPECT_NE(err.find("\"keep_attention\""), std::string::npos) << err;
}

TEST(Config, SetOverridesAreValidatedTheSameWay) {
  RunConfig c = parse_run_config(kBase, "run.yaml", {"training.seed=7", "lora.target_modules=q_proj,v_proj",
                                                     "model.gradient_checkpointing=offload"});
  EXPECT_EQ(c.training.seed, 7);
  EXPECT_EQ(c.lora.target_modules, (std::vector<std::string>{"q_proj", "v_proj"}));
  EXPECT_EQ(c.model.gradient_checkpointing, Checkpointing::offload);
  std::string err = error_of(kBase, {"training.learnin_rate=1"});
  EXPECT_NE(err.find("--set training.learnin_rate=1"), std::string::npos) << err;
  EXPECT_NE(err.find("did you mean learning_rate"), std::string::npos) << err;
  err = error_of(kBase, {"training.seed=abc"});
  EXPECT_NE(err.find("must be an integer"), std::string::npos) << err;
  err = error_of(kBase, {"seed=1"});
  EXPECT_NE(err.find("section.key=value"), std::string::npos) << err;
}

TEST(Config, YamlSyntaxErrorNamesLine) {
  std::string err = error_of("model:\n  max_seq_length: [1, 2\n");
  EXPECT_NE(err.find("run.yaml:"), std::string::npos) << err;
  EXPECT_NE(err.find("YAML syntax error"), std::string::npos) << err;
}

TEST(Config, MissingFileIsUserError) {
  EXPECT_THROW(load_run_config("/nonexistent/run.yaml"), UserError);
}

TEST(Config, ResolvedYamlRoundTrips) {
  RunConfig c = parse_run_config(kBase, "run.yaml", {"lora.r=8", "training.seed=3"});
  RunConfig again = parse_run_config(c.to_yaml(), "resolved.yaml");
  EXPECT_EQ(again.to_yaml(), c.to_yaml());
  EXPECT_EQ(again.lora.r, 8);
  EXPECT_EQ(again.training.seed, 3);
  EXPECT_EQ(again.model.arch.n_kv_heads, 2);
}

// jobs/configs/reference.yaml must list exactly what the code knows, with the same defaults.
TEST(Config, ReferenceYamlMatchesCode) {
  std::ifstream in(std::string(RANKTUNE_SOURCE_DIR) + "/jobs/configs/reference.yaml");
  ASSERT_TRUE(in.good()) << "jobs/configs/reference.yaml missing; regenerate with ranktune config --reference";
  std::stringstream ss;
  ss << in.rdbuf();
  EXPECT_EQ(ss.str(), reference_config_yaml())
      << "jobs/configs/reference.yaml is out of date: run `ranktune config --reference > jobs/configs/reference.yaml`";
}

TEST(Config, ByteSizes) {
  EXPECT_EQ(parse_byte_size("20GiB", "x"), 20LL << 30);
  EXPECT_EQ(parse_byte_size("512MiB", "x"), 512LL << 20);
  EXPECT_EQ(parse_byte_size("1.5GB", "x"), 1500000000LL);
  EXPECT_THROW(parse_byte_size("lots", "x"), UserError);
}
