// Data parallel on the CPU path: N ranks with batch b train exactly what 1 rank with batch N*b
// trains (same rows, same loss normalisation), up to fp32 summation order.
#include <gtest/gtest.h>

#include <array>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>

#include <sys/wait.h>
#include <unistd.h>

#include <nlohmann/json.hpp>

#include "ranktune/safetensors.h"
#include "subprocess.h"

namespace fs = std::filesystem;

namespace {

int run(const std::string& cmd, std::string* out) {
  const CommandResult r = run_command(cmd, 1);
  out->append(r.output);
  return r.code;
}

std::vector<double> losses(const std::string& dir) {
  std::ifstream in(dir + "/metrics.jsonl");
  std::vector<double> out;
  std::string line;
  while (std::getline(in, line)) out.push_back(nlohmann::json::parse(line)["loss"].get<double>());
  return out;
}

void write_config(const std::string& cfg, bool lora) {
  std::ofstream(cfg) << "model:\n"
                        "  architecture: {vocab_size: 262, hidden_size: 32, intermediate_size: 48, num_hidden_layers: 2,\n"
                        "                 num_attention_heads: 4, num_key_value_heads: 2, max_position_embeddings: 64,\n"
                        "                 tie_word_embeddings: true}\n"
                        "  tokenizer: byte\n"
                        "  max_seq_length: 12\n"
                        "lora: {enabled: "
                     << (lora ? "true" : "false")
                     << ", r: 4, lora_alpha: 8}\n"
                        "data: {train_file: jobs/data/quickstart/train.jsonl, format: prompt_completion}\n"
                        "training: {max_steps: 10, learning_rate: 1.0e-2, warmup_steps: 2, gradient_accumulation_steps: 2}\n"
                        "logging: {logging_steps: 1}\n";
}

void check_equivalence(int ranks, bool lora) {
  const std::string dir = (fs::temp_directory_path() / ("ranktune_dp_" + std::to_string(getpid()) + "_" +
                                                        std::to_string(ranks) + (lora ? "_lora" : "_full")))
                              .string();
  fs::remove_all(dir);
  fs::create_directories(dir);
  const std::string cfg = dir + "/run.yaml";
  write_config(cfg, lora);
  const std::string bin = RANKTUNE_BINARY;
  std::string out;
  const int b = 2;
  ASSERT_EQ(run(std::string(RANKTUNE_MPIEXEC) + " --allow-run-as-root --oversubscribe -np " + std::to_string(ranks) + " " +
                    bin + " train " + cfg + " --set model.enable_multi_gpu=true --set training.per_device_train_batch_size=" +
                    std::to_string(b) + " --set training.output_dir=" + dir + "/many",
                &out),
            0)
      << out;
  EXPECT_NE(out.find("Multi-GPU training enabled: " + std::to_string(ranks) + " ranks"), std::string::npos) << out;
  EXPECT_NE(out.find("  rank " + std::to_string(ranks - 1) + ": "), std::string::npos) << out;  // per-rank devices
  ASSERT_EQ(run(bin + " train " + cfg + " --set training.per_device_train_batch_size=" + std::to_string(b * ranks) +
                    " --set training.output_dir=" + dir + "/one",
                &out),
            0)
      << out;
  const auto many = losses(dir + "/many"), one = losses(dir + "/one");
  ASSERT_EQ(many.size(), 10u);
  ASSERT_EQ(one.size(), 10u);
  for (size_t i = 0; i < many.size(); ++i) EXPECT_NEAR(many[i], one[i], 1e-5 * std::fabs(one[i])) << "step " << i + 1;
  EXPECT_LT(one.back(), one.front());  // it trained
  if (!lora) return;
  ranktune::SafetensorsFile a(dir + "/many/adapter/adapter_model.safetensors"), c(dir + "/one/adapter/adapter_model.safetensors");
  for (const auto& name : a.names()) {
    const auto x = a.read_f32(name), y = c.read_f32(name);
    double num = 0, den = 0;
    for (size_t i = 0; i < x.size(); ++i) num += (x[i] - y[i]) * (x[i] - y[i]), den += y[i] * y[i];
    EXPECT_LT(std::sqrt(num / den), 1e-4) << name;
  }
}

}  // namespace

TEST(DataParallel, TwoRanksEqualOneRankWithTwiceTheBatchLora) { check_equivalence(2, true); }
TEST(DataParallel, ThreeRanksEqualOneRankWithThriceTheBatchLora) { check_equivalence(3, true); }
TEST(DataParallel, TwoRanksEqualOneRankWithTwiceTheBatchFull) { check_equivalence(2, false); }

// The watchdog: a rank that hangs (a test hook makes rank 1 sleep at the start of step 3) does not
// leave the others waiting; they give up after distributed.timeout_s, name it, and the job ends.
TEST(DataParallel, HungRankIsNamedAndTheJobEnds) {
  const std::string dir = fresh_temp_dir("dp_hang");
  write_config(dir + "/run.yaml", true);
  const auto start = std::chrono::steady_clock::now();
  std::string out;
  const int code = run("RANKTUNE_FAULT=hang_rank=1,hang_at_step=3 " + std::string(RANKTUNE_MPIEXEC) +
                           " --allow-run-as-root --oversubscribe -np 3 " + RANKTUNE_BINARY + " train " + dir +
                           "/run.yaml --set model.enable_multi_gpu=true --set distributed.timeout_s=3"
                           " --set training.output_dir=" + dir + "/out",
                       &out);
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  EXPECT_NE(code, 0) << out;
  EXPECT_LT(seconds, 60) << out;
  EXPECT_NE(out.find("rank 1 has not reached it"), std::string::npos) << out;
  EXPECT_NE(out.find("step 3"), std::string::npos) << out;
  EXPECT_NE(out.find("distributed.timeout_s"), std::string::npos) << out;
}
