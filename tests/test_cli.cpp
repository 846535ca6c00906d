// The ranktune binary as a user runs it: exit codes, messages, determinism of whole runs, and the
// quickstart's accuracy.
#include <gtest/gtest.h>

#include <array>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <sstream>

#include <sys/wait.h>
#include <unistd.h>

#include <nlohmann/json.hpp>

#include "subprocess.h"

namespace fs = std::filesystem;

namespace {

using CliRun = CommandResult;

CliRun run(const std::string& args) { return run_command(std::string(RANKTUNE_BINARY) + " " + args, 2); }

std::string temp_dir(const std::string& name) { return fresh_temp_dir("cli_" + name); }

const char* kTinyConfig =
    "model:\n"
    "  architecture: {vocab_size: 262, hidden_size: 32, intermediate_size: 64, num_hidden_layers: 2,\n"
    "                 num_attention_heads: 4, num_key_value_heads: 2, max_position_embeddings: 64}\n"
    "  tokenizer: byte\n"
    "  max_seq_length: 16\n"
    "data:\n"
    "  train_file: jobs/data/quickstart/train.jsonl\n"
    "  format: prompt_completion\n"
    "  eval_fraction: 0.01\n"
    "training:\n"
    "  per_device_train_batch_size: 4\n"
    "  gradient_accumulation_steps: 2\n"
    "  max_steps: 6\n"
    "  learning_rate: 1.0e-3\n"
    "  eval_steps: 3\n"
    "logging:\n"
    "  logging_steps: 2\n";

std::string write_config(const std::string& dir, const std::string& text) {
  const std::string path = dir + "/run.yaml";
  std::ofstream(path) << text;
  return path;
}

std::vector<nlohmann::json> metrics_without_timing(const std::string& path) {
  std::ifstream in(path);
  std::vector<nlohmann::json> out;
  std::string line;
  while (std::getline(in, line)) {
    auto j = nlohmann::json::parse(line);
    for (const char* k : {"tokens_per_s", "mfu", "mem_gib", "elapsed_s"}) j.erase(k);
    out.push_back(j);
  }
  return out;
}

}  // namespace

TEST(Cli, MisspeltKeyExitsTwoWithFileLineAndSuggestion) {
  const std::string dir = temp_dir("typo");
  std::string text = kTinyConfig;
  text.replace(text.find("training:\n") + 10, 0, "  learning_rat: 0.1\n");  // line 11
  const std::string cfg = write_config(dir, text);
  CliRun r = run("train " + cfg + " --set training.output_dir=" + dir + "/out");
  EXPECT_EQ(r.code, 2) << r.output;
  EXPECT_NE(r.output.find(cfg + ":11"), std::string::npos) << r.output;
  EXPECT_NE(r.output.find("did you mean learning_rate?"), std::string::npos) << r.output;
  EXPECT_FALSE(fs::exists(dir + "/out")) << "nothing is written for a bad config";
}

TEST(Cli, MissingConfigAndUnknownCommandExitTwo) {
  EXPECT_EQ(run("train /nonexistent/run.yaml").code, 2);
  EXPECT_EQ(run("trian").code, 2);
  EXPECT_EQ(run("train --help").code, 0);
}

TEST(Cli, MissingDataFileIsNamed) {
  const std::string dir = temp_dir("nodata");
  const std::string cfg = write_config(dir, kTinyConfig);
  CliRun r = run("train " + cfg + " --set data.train_file=/nonexistent/train.jsonl --set training.output_dir=" + dir + "/out");
  EXPECT_EQ(r.code, 2) << r.output;
  EXPECT_NE(r.output.find("/nonexistent/train.jsonl"), std::string::npos) << r.output;
}

TEST(Cli, SameSeedGivesTheSameMetrics) {
  const std::string dir = temp_dir("determinism");
  const std::string cfg = write_config(dir, kTinyConfig);
  CliRun a = run("train " + cfg + " --set training.output_dir=" + dir + "/a");
  ASSERT_EQ(a.code, 0) << a.output;
  CliRun b = run("train " + cfg + " --set training.output_dir=" + dir + "/b");
  ASSERT_EQ(b.code, 0) << b.output;
  auto ma = metrics_without_timing(dir + "/a/metrics.jsonl"), mb = metrics_without_timing(dir + "/b/metrics.jsonl");
  ASSERT_EQ(ma.size(), 3u);
  EXPECT_EQ(ma, mb);
  EXPECT_TRUE(ma.back().contains("eval_loss"));
  // A different seed changes the run.
  CliRun c = run("train " + cfg + " --set training.seed=7 --set training.output_dir=" + dir + "/c");
  ASSERT_EQ(c.code, 0) << c.output;
  EXPECT_NE(metrics_without_timing(dir + "/c/metrics.jsonl"), ma);
  // The resolved config is written with the run.
  EXPECT_TRUE(fs::exists(dir + "/a/config.yaml"));
  EXPECT_TRUE(fs::exists(dir + "/a/adapter/adapter_model.safetensors"));
}

TEST(Cli, EvalPrintsOneJsonLine) {
  const std::string dir = temp_dir("eval");
  const std::string cfg = write_config(dir, kTinyConfig);
  CliRun r = run("eval " + cfg + " --set training.output_dir=" + dir + "/out --set data.eval_file=jobs/data/quickstart/eval.jsonl"
                 " 2>/dev/null | grep '^{'");
  ASSERT_EQ(r.code, 0) << r.output;
  auto j = nlohmann::json::parse(r.output);
  EXPECT_GT(j["tokens"].get<int64_t>(), 1000);
  // An untrained model is near uniform over the 262 byte-tokenizer ids.
  EXPECT_NEAR(j["loss"].get<double>(), std::log(262.0), 0.5);
}

TEST(Cli, EnvReportsTheSetUp) {
  CliRun r = run("env");
  ASSERT_EQ(r.code, 0) << r.output;
  auto j = nlohmann::json::parse(r.output);
  EXPECT_EQ(j["ranks"].get<int>(), 1);
  EXPECT_EQ(j["per_rank"].size(), 1u);
}

// The README's first command trains this: it must reach a held-out exact-match accuracy far above
// chance (a random guess of a 1-3 digit answer is right well under 1% of the time).
TEST(Cli, QuickstartReachesItsAccuracy) {
  const std::string dir = temp_dir("quickstart");
  CliRun r = run("train jobs/configs/quickstart.yaml --set training.output_dir=" + dir);
  ASSERT_EQ(r.code, 0) << r.output;
  std::ifstream in(dir + "/accuracy.json");
  ASSERT_TRUE(in.good()) << r.output;
  nlohmann::json acc = nlohmann::json::parse(in);
  EXPECT_EQ(acc["total"].get<int>(), 500);
  EXPECT_GE(acc["exact_match"].get<double>(), 0.9) << r.output;
  std::printf("quickstart: %s\n", acc.dump().c_str());
}
