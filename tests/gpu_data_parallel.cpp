// Data parallel on two GPUs (NCCL): 2 ranks with batch b train what 1 rank with batch 2b trains,
// within bf16 tolerance (GEMMs of other shapes round differently; the gradients are summed in fp32);
// with ZeRO-1 too (gradients reduced to their shard's owner during backward, updated weights
// broadcast from it), and the copy-engine reduces (ZeRO-1's, LoRA's all-reduce) against NCCL's.
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <fstream>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "gpu_skip.h"
#include "ranktune/checkpoint.h"
#include "ranktune/safetensors.h"
#include "subprocess.h"

namespace {

// A 256-wide model of `layers` layers on the quickstart data; `model_extra` adds model keys (indented
// two spaces), lora and training are the sections' flow maps.
void write_run_yaml(const std::string& path, int layers, const std::string& model_extra, const std::string& lora,
                    const std::string& training) {
  std::ofstream(path)
      << "model:\n"
         "  architecture: {vocab_size: 512, hidden_size: 256, intermediate_size: 512, num_hidden_layers: "
      << layers
      << ",\n"
         "                 num_attention_heads: 8, num_key_value_heads: 2, max_position_embeddings: 256,\n"
         "                 tie_word_embeddings: true}\n"
         "  tokenizer: byte\n"
         "  max_seq_length: 64\n"
      << model_extra << "lora: " << lora
      << "\n"
         "data: {train_file: jobs/data/quickstart/train.jsonl, format: prompt_completion, packing: true}\n"
         "training: "
      << training << "\nlogging: {logging_steps: 1}\n";
}

// `mpirun -np 2` as the tests launch it (as root on the device machines, NVLink multicast off).
std::string mpirun_two_ranks() {
  return std::string(RANKTUNE_MPIEXEC) + " --allow-run-as-root -np 2 -x NCCL_NVLS_ENABLE=0 ";
}

// The largest |a - b| / |b| over two runs' logged losses (10 steps each).
double largest_relative_loss_difference(const std::string& run_a, const std::string& run_b) {
  const auto a = logged_losses(run_a), b = logged_losses(run_b);
  EXPECT_EQ(a.size(), 10u);
  EXPECT_EQ(b.size(), 10u);
  if (!b.empty()) EXPECT_LT(b.back(), b.front());
  double worst = a.size() == b.size() && !a.empty() ? 0 : 1;
  for (size_t i = 0; i < std::min(a.size(), b.size()); ++i)
    worst = std::max(worst, std::fabs(a[i] - b[i]) / std::fabs(b[i]));
  return worst;
}

enum class Training { lora, full, full_zero1 };

void check_two_gpus_equal_one(Training training) {
  const bool lora = training == Training::lora, zero = training == Training::full_zero1;
  const char* name = lora ? "lora" : zero ? "full_zero1" : "full";
  SKIP_WITHOUT_GPUS(2);
  const std::string dir = fresh_temp_dir(std::string("gpu_dp_") + name);
  write_run_yaml(dir + "/run.yaml", 4, "",
                 std::string("{enabled: ") + (lora ? "true" : "false") + ", r: 8, lora_alpha: 16}",
                 "{max_steps: 10, learning_rate: 2.0e-3, warmup_steps: 2, gradient_accumulation_steps: 2}");
  const std::string bin = RANKTUNE_BINARY;
  const CommandResult two =
      run_command(mpirun_two_ranks() + bin + " train " + dir + "/run.yaml --set model.enable_multi_gpu=true" +
                      (zero ? " --set distributed.zero_stage=1" : "") +
                      " --set training.per_device_train_batch_size=2 --set training.output_dir=" + dir + "/two",
                  1);
  ASSERT_EQ(two.code, 0) << two.output;
  EXPECT_NE(two.output.find("Multi-GPU training enabled: 2 ranks x 1 GPU, data parallel over NCCL"), std::string::npos)
      << two.output;
  EXPECT_NE(two.output.find("rank 1: "), std::string::npos) << two.output;
  EXPECT_NE(two.output.find("cuda:1"), std::string::npos) << two.output;
  if (zero)
    EXPECT_NE(two.output.find("ZeRO-1: fp32 masters and optimizer states sharded over 2 ranks"), std::string::npos)
        << two.output;
  const CommandResult one =
      run_command(bin + " train " + dir + "/run.yaml --set training.per_device_train_batch_size=4" +
                      " --set training.output_dir=" + dir + "/one",
                  1);
  ASSERT_EQ(one.code, 0) << one.output;
  const double worst = largest_relative_loss_difference(dir + "/two", dir + "/one");
  const auto b = logged_losses(dir + "/one");
  ASSERT_FALSE(b.empty());
  std::printf("[%s] 2 GPUs vs 1: largest relative loss difference over 10 steps %.3e (first %.4f, last %.4f)\n", name,
              worst, b.front(), b.back());
  EXPECT_LT(worst, 1e-2);
  if (!lora) return;
  ranktune::SafetensorsFile x(dir + "/two/adapter/adapter_model.safetensors"),
      y(dir + "/one/adapter/adapter_model.safetensors");
  double worst_w = 0;
  for (const auto& name : x.names()) {
    const auto p = x.read_f32(name), q = y.read_f32(name);
    double num = 0, den = 0;
    for (size_t i = 0; i < p.size(); ++i) num += (p[i] - q[i]) * (p[i] - q[i]), den += q[i] * q[i];
    worst_w = std::max(worst_w, std::sqrt(num / den));
  }
  std::printf("[lora] 2 GPUs vs 1: largest relative L2 difference of an adapter tensor after 10 steps %.3e\n", worst_w);
  EXPECT_LT(worst_w, 3e-2);
}

// `run` twice, over the copy engines (distributed.grad_reduce: auto) into dir/copies and by NCCL into
// dir/nccl: each banner names its path (`copies_line`, `nccl_line`), and the logged losses of the
// two runs agree to the bit and fall.
void train_over_copies_and_nccl(const std::string& dir, const std::string& run, const std::string& copies_line,
                                const std::string& nccl_line) {
  const CommandResult copies = run_command(run + " --set training.output_dir=" + dir + "/copies", 1);
  ASSERT_EQ(copies.code, 0) << copies.output;
  EXPECT_NE(copies.output.find(copies_line), std::string::npos) << copies.output;
  EXPECT_NE(copies.output.find("receive slots for the copy-engine reduce"), std::string::npos) << copies.output;
  const CommandResult nccl =
      run_command(run + " --set distributed.grad_reduce=nccl --set training.output_dir=" + dir + "/nccl", 1);
  ASSERT_EQ(nccl.code, 0) << nccl.output;
  EXPECT_NE(nccl.output.find(nccl_line), std::string::npos) << nccl.output;
  const auto a = logged_losses(dir + "/copies"), b = logged_losses(dir + "/nccl");
  ASSERT_EQ(a.size(), 10u);
  EXPECT_EQ(a, b);
  EXPECT_LT(a.back(), a.front());
}

}  // namespace

// ZeRO-1's gradients cross to their owners over the copy engines (distributed.grad_reduce: auto, on
// one host) or in NCCL's reduce kernels (nccl). With two ranks each owner adds the same two fp32
// values either way, so the runs must agree to the bit: losses and final weights. Each layer is a
// group of its own (ddp_bucket_cap_mb 0), so copies run during backward, and with gradient
// accumulation and ten steps the counters that order the copies run on across steps.
TEST(GpuDataParallel, Zero1CopyEngineReduceMatchesNcclBitForBit) {
  SKIP_WITHOUT_GPUS(2);
  const std::string dir = fresh_temp_dir("gpu_dp_zero1_copy_engines");
  write_run_yaml(dir + "/run.yaml", 4, "", "{enabled: false}",
                 "{max_steps: 10, learning_rate: 2.0e-3, warmup_steps: 2, gradient_accumulation_steps: 2}");
  const std::string bin = RANKTUNE_BINARY;
  const std::string run = mpirun_two_ranks() + bin + " train " + dir +
                          "/run.yaml --set model.enable_multi_gpu=true --set distributed.zero_stage=1"
                          " --set distributed.ddp_bucket_cap_mb=0 --set training.per_device_train_batch_size=2";
  train_over_copies_and_nccl(dir, run, "gradients to their owners over the copy engines (CUDA IPC)",
                             "gradients to their owners by NCCL");
  if (::testing::Test::HasFatalFailure()) return;
  // The final checkpoints: fp32 masters and AdamW's moments, gathered from both shards.
  const auto last = [&](const std::string& run) {
    const auto found = ranktune::list_checkpoints(dir + "/" + run + "/checkpoints");
    EXPECT_FALSE(found.empty()) << run;
    return ranktune::read_checkpoint(found.empty() ? std::string() : found.front());
  };
  const ranktune::CheckpointData x = last("copies"), y = last("nccl");
  ASSERT_EQ(x.weights.size(), y.weights.size());
  size_t differing = 0;
  for (size_t i = 0; i < x.weights.size(); ++i)
    if (x.weights[i].name != y.weights[i].name || x.weights[i].values != y.weights[i].values) ++differing;
  std::printf("[zero1] copy engines vs NCCL: %zu of %zu master tensors differ after 10 steps\n", differing,
              x.weights.size());
  EXPECT_EQ(differing, 0u);
  EXPECT_EQ(x.optimizer.m, y.optimizer.m);
  EXPECT_EQ(x.optimizer.v, y.optimizer.v);
}

TEST(GpuDataParallel, TwoGpusEqualOneGpuWithTwiceTheBatchLora) { check_two_gpus_equal_one(Training::lora); }
TEST(GpuDataParallel, TwoGpusEqualOneGpuWithTwiceTheBatchFull) { check_two_gpus_equal_one(Training::full); }
TEST(GpuDataParallel, TwoGpusEqualOneGpuWithTwiceTheBatchFullZero1) { check_two_gpus_equal_one(Training::full_zero1); }

// device_map: auto in one process: the layers spread over two GPUs train exactly what one GPU
// trains (the same kernels on the same shapes; activations cross by exact peer copies).
TEST(GpuDeviceMapAuto, TwoGpusInOneProcessEqualOneGpu) {
  SKIP_WITHOUT_GPUS(2);
  const std::string dir = fresh_temp_dir("gpu_device_map_auto");
  write_run_yaml(dir + "/run.yaml", 6, "", "{enabled: true, r: 8, lora_alpha: 16, lora_dropout: 0.05}",
                 "{max_steps: 10, learning_rate: 2.0e-3, warmup_steps: 2, gradient_accumulation_steps: 2}");
  const std::string bin = RANKTUNE_BINARY;
  const CommandResult two = run_command(
      bin + " train " + dir + "/run.yaml --set model.device_map=auto" + " --set training.output_dir=" + dir + "/auto",
      1);
  ASSERT_EQ(two.code, 0) << two.output;
  EXPECT_NE(two.output.find("device_map auto: layers 0-"), std::string::npos) << two.output;
  EXPECT_NE(two.output.find("on cuda:1"), std::string::npos) << two.output;
  const CommandResult one = run_command(
      bin + " train " + dir + "/run.yaml --set model.device_map=cuda:0" + " --set training.output_dir=" + dir + "/one",
      1);
  ASSERT_EQ(one.code, 0) << one.output;
  const double worst = largest_relative_loss_difference(dir + "/auto", dir + "/one");
  std::printf("[device_map auto] 2 GPUs in one process vs 1 GPU: largest relative loss difference %.3e\n", worst);
  EXPECT_LT(worst, 1e-5);
}

// 2 ranks x 2 GPUs: data parallel over the ranks, device_map auto inside each (a rank's layers spread
// over its two GPUs, rank 1 on cuda:2 and cuda:3). It trains what 2 ranks of one GPU each train: the
// same kernels on the same shapes, and the same gradients summed over NCCL.
TEST(GpuDeviceMapAuto, TwoRanksOfTwoGpusEqualTwoRanksOfOne) {
  SKIP_WITHOUT_GPUS(4);
  const std::string dir = fresh_temp_dir("gpu_device_map_auto_ranks");
  write_run_yaml(dir + "/run.yaml", 6, "  enable_multi_gpu: true\n", "{enabled: true, r: 8, lora_alpha: 16}",
                 "{max_steps: 10, learning_rate: 2.0e-3, warmup_steps: 2, per_device_train_batch_size: 2}");
  const std::string bin = RANKTUNE_BINARY;
  const std::string mpirun = mpirun_two_ranks();
  const CommandResult auto2 = run_command(mpirun + bin + " train " + dir + "/run.yaml --set model.device_map=auto" +
                                              " --set training.output_dir=" + dir + "/auto",
                                          1);
  ASSERT_EQ(auto2.code, 0) << auto2.output;
  EXPECT_NE(auto2.output.find("Multi-GPU training enabled: 2 ranks x 2 GPUs, data parallel over NCCL"),
            std::string::npos)
      << auto2.output;
  EXPECT_NE(auto2.output.find("cuda:2"), std::string::npos) << auto2.output;
  EXPECT_NE(auto2.output.find(" + cuda:3"), std::string::npos) << auto2.output;
  EXPECT_NE(auto2.output.find("device_map auto (rank 0; every rank alike on its own GPUs): layers 0-"),
            std::string::npos)
      << auto2.output;
  const CommandResult plain =
      run_command(mpirun + bin + " train " + dir + "/run.yaml --set training.output_dir=" + dir + "/plain", 1);
  ASSERT_EQ(plain.code, 0) << plain.output;
  const double worst = largest_relative_loss_difference(dir + "/auto", dir + "/plain");
  std::printf("[device_map auto] 2 ranks x 2 GPUs vs 2 ranks x 1 GPU: largest relative loss difference %.3e\n", worst);
  EXPECT_LT(worst, 1e-5);
}

// LoRA's gradients are summed over the copy engines (distributed.grad_reduce: auto, on one host):
// each rank copies each layer's adapter gradients to the other as soon as backward has written
// them, and adds the other's copy to its own. With two ranks both add the same two fp32 values, as
// NCCL's all-reduce does, so the runs must agree to the bit: losses and the saved adapter. Gradient
// accumulation and ten steps run the counters that order the copies on across micro-batches and
// steps.
TEST(GpuDataParallel, LoraCopyEngineAllReduceMatchesNcclBitForBit) {
  SKIP_WITHOUT_GPUS(2);
  const std::string dir = fresh_temp_dir("gpu_dp_lora_copy_engines");
  write_run_yaml(dir + "/run.yaml", 4, "", "{enabled: true, r: 8, lora_alpha: 16}",
                 "{max_steps: 10, learning_rate: 2.0e-3, warmup_steps: 2, gradient_accumulation_steps: 2}");
  const std::string run = mpirun_two_ranks() + RANKTUNE_BINARY + " train " + dir +
                          "/run.yaml --set model.enable_multi_gpu=true --set training.per_device_train_batch_size=2";
  train_over_copies_and_nccl(dir, run, "gradients summed over the ranks over the copy engines (CUDA IPC)",
                             "gradients summed over the ranks by NCCL");
  if (::testing::Test::HasFatalFailure()) return;
  ranktune::SafetensorsFile x(dir + "/copies/adapter/adapter_model.safetensors"),
      y(dir + "/nccl/adapter/adapter_model.safetensors");
  ASSERT_EQ(x.names(), y.names());
  size_t differing = 0;
  for (const auto& name : x.names())
    if (x.read_f32(name) != y.read_f32(name)) ++differing;
  std::printf("[lora] copy engines vs NCCL: %zu of %zu adapter tensors differ after 10 steps\n", differing,
              x.names().size());
  EXPECT_EQ(differing, 0u);
}
