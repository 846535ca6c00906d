// Data parallel on the CPU path: N ranks with batch b train exactly what 1 rank with batch N*b
// trains (same rows, same loss normalisation), up to fp32 summation order.
#include <gtest/gtest.h>
#include <sys/wait.h>
#include <unistd.h>

#include <array>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "ranktune/checkpoint.h"
#include "ranktune/safetensors.h"
#include "subprocess.h"

namespace fs = std::filesystem;

namespace {

int run(const std::string& cmd, std::string* out) {
  const CommandResult r = run_command(cmd, 1);
  out->append(r.output);
  return r.code;
}


void write_config(const std::string& cfg, bool lora) {
  std::ofstream(cfg)
      << "model:\n"
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
  ASSERT_EQ(
      run(std::string(RANKTUNE_MPIEXEC) + " --allow-run-as-root --oversubscribe -np " + std::to_string(ranks) + " " +
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
  const auto many = logged_losses(dir + "/many"), one = logged_losses(dir + "/one");
  ASSERT_EQ(many.size(), 10u);
  ASSERT_EQ(one.size(), 10u);
  for (size_t i = 0; i < many.size(); ++i) EXPECT_NEAR(many[i], one[i], 1e-5 * std::fabs(one[i])) << "step " << i + 1;
  EXPECT_LT(one.back(), one.front());  // it trained
  if (!lora) return;
  ranktune::SafetensorsFile a(dir + "/many/adapter/adapter_model.safetensors"),
      c(dir + "/one/adapter/adapter_model.safetensors");
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
                           " --set training.output_dir=" +
                           dir + "/out",
                       &out);
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  EXPECT_NE(code, 0) << out;
  EXPECT_LT(seconds, 60) << out;
  EXPECT_NE(out.find("rank 1 has not reached it"), std::string::npos) << out;
  EXPECT_NE(out.find("step 3"), std::string::npos) << out;
  EXPECT_NE(out.find("distributed.timeout_s"), std::string::npos) << out;
}

// ZeRO-1: sharding the masters and optimizer states over ranks changes where the update happens,
// not what it computes: the same losses, and checkpoints holding the same whole state (gathered to
// rank 0, in the unsharded layout).
static double rel_l2(const std::vector<float>& a, const std::vector<float>& b) {
  double num = 0, den = 0;
  for (size_t i = 0; i < a.size(); ++i) num += (a[i] - b[i]) * (a[i] - b[i]), den += double(b[i]) * b[i];
  return den > 0 ? std::sqrt(num / den) : std::sqrt(num);
}

static void check_zero_stage_1(int ranks, const std::string& optim) {
  const std::string dir = fresh_temp_dir("dp_zero_" + std::to_string(ranks) + optim);
  write_config(dir + "/run.yaml", false);
  const std::string launch = std::string(RANKTUNE_MPIEXEC) + " --allow-run-as-root --oversubscribe -np " +
                             std::to_string(ranks) + " " + RANKTUNE_BINARY + " train " + dir +
                             "/run.yaml --set model.enable_multi_gpu=true --set training.optim=" + optim;
  std::string out;
  ASSERT_EQ(run(launch + " --set distributed.zero_stage=1 --set training.output_dir=" + dir + "/zero", &out), 0) << out;
  EXPECT_NE(out.find("ZeRO-1: fp32 masters and optimizer states sharded over " + std::to_string(ranks) + " ranks"),
            std::string::npos)
      << out;
  ASSERT_EQ(run(launch + " --set training.output_dir=" + dir + "/plain", &out), 0) << out;
  const auto zero = logged_losses(dir + "/zero"), plain = logged_losses(dir + "/plain");
  ASSERT_EQ(zero.size(), 10u);
  for (size_t i = 0; i < zero.size(); ++i)
    EXPECT_NEAR(zero[i], plain[i], 1e-5 * std::fabs(plain[i])) << "step " << i + 1;
  const auto a = ranktune::read_checkpoint(dir + "/zero/checkpoints/step-00000010.h5");
  const auto b = ranktune::read_checkpoint(dir + "/plain/checkpoints/step-00000010.h5");
  ASSERT_EQ(a.weights.size(), b.weights.size());
  for (size_t i = 0; i < a.weights.size(); ++i)
    EXPECT_LT(rel_l2(a.weights[i].values, b.weights[i].values), 1e-5) << a.weights[i].name;
  EXPECT_EQ(a.optimizer.step, b.optimizer.step);
  if (optim == "adamw_8bit") {
    ASSERT_EQ(a.optimizer.m_codes.size(), b.optimizer.m_codes.size());
    EXPECT_LT(rel_l2(a.optimizer.m_absmax, b.optimizer.m_absmax), 1e-4);
    EXPECT_LT(rel_l2(a.optimizer.v_absmax, b.optimizer.v_absmax), 1e-4);
  } else {
    ASSERT_EQ(a.optimizer.m.size(), b.optimizer.m.size());
    EXPECT_LT(rel_l2(a.optimizer.m, b.optimizer.m), 1e-4);
    EXPECT_LT(rel_l2(a.optimizer.v, b.optimizer.v), 1e-4);
  }
}

TEST(DataParallel, ZeroStage1EqualsUnshardedTwoRanks) { check_zero_stage_1(2, "adamw"); }
TEST(DataParallel, ZeroStage1EqualsUnshardedThreeRanks8Bit) { check_zero_stage_1(3, "adamw_8bit"); }

// A ZeRO-1 run stopped by SIGUSR1 and resumed continues bitwise as if never stopped; its
// checkpoint also resumes on one rank without ZeRO (same global batch).
TEST(DataParallel, ZeroStage1ResumesBitwiseAndOnOneRank) {
  const std::string dir = fresh_temp_dir("dp_zero_resume");
  write_config(dir + "/run.yaml", false);
  const std::string two = std::string(RANKTUNE_MPIEXEC) + " --allow-run-as-root --oversubscribe -np 2 " +
                          RANKTUNE_BINARY + " train " + dir +
                          "/run.yaml --set model.enable_multi_gpu=true --set distributed.zero_stage=1";
  std::string out;
  ASSERT_EQ(run(two + " --set training.output_dir=" + dir + "/whole", &out), 0) << out;
  EXPECT_EQ(run("RANKTUNE_FAULT=sigusr1_at_step=5 " + two + " --set training.output_dir=" + dir + "/stopped", &out), 75)
      << out;
  ASSERT_EQ(run(two + " --set training.output_dir=" + dir + "/stopped --resume latest", &out), 0) << out;
  const auto whole = logged_losses(dir + "/whole"), resumed = logged_losses(dir + "/stopped");
  ASSERT_EQ(resumed.size(), whole.size());
  for (size_t i = 0; i < whole.size(); ++i) EXPECT_EQ(resumed[i], whole[i]) << "step " << i + 1;

  fs::create_directories(dir + "/one/checkpoints");
  fs::copy_file(dir + "/stopped/checkpoints/step-00000005.h5", dir + "/one/checkpoints/step-00000005.h5");
  fs::copy_file(dir + "/stopped/metrics.jsonl", dir + "/one/metrics.jsonl");  // trimmed to step 5 on resume
  ASSERT_EQ(run(std::string(RANKTUNE_BINARY) + " train " + dir +
                    "/run.yaml --set training.per_device_train_batch_size=4 --set training.output_dir=" + dir +
                    "/one --resume latest",
                &out),
            0)
      << out;
  const auto one = logged_losses(dir + "/one");
  ASSERT_EQ(one.size(), whole.size());
  for (size_t i = 5; i < whole.size(); ++i)
    EXPECT_NEAR(one[i], whole[i], 1e-5 * std::fabs(whole[i])) << "step " << i + 1;
}
