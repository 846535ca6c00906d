// Launch: local rank from each launcher's variables, and where a rank is placed.
#include <gtest/gtest.h>

#include "ranktune/config.h"
#include "ranktune/error.h"
#include "ranktune/launch.h"

using namespace ranktune;

TEST(Launch, LocalRankFromEachLauncher) {
  const std::vector<std::pair<std::string, std::string>> cases = {
      {"OMPI_COMM_WORLD_LOCAL_RANK", "3"}, {"SLURM_LOCALID", "2"}, {"MPI_LOCALRANKID", "1"}, {"LOCAL_RANK", "5"}};
  for (const auto& [var, value] : cases) {
    int lr = -1;
    std::string source;
    ASSERT_TRUE(local_rank_from_env({{var, value}}, &lr, &source)) << var;
    EXPECT_EQ(lr, std::stoi(value));
    EXPECT_EQ(source, var);
  }
}

TEST(Launch, OpenMpiVariableWinsOverOthers) {
  int lr = -1;
  std::string source;
  ASSERT_TRUE(local_rank_from_env({{"LOCAL_RANK", "7"}, {"OMPI_COMM_WORLD_LOCAL_RANK", "1"}}, &lr, &source));
  EXPECT_EQ(lr, 1);
  EXPECT_EQ(source, "OMPI_COMM_WORLD_LOCAL_RANK");
}

TEST(Launch, NoVariableMeansSplit) {
  int lr = -1;
  std::string source;
  EXPECT_FALSE(local_rank_from_env({{"HOME", "/root"}}, &lr, &source));
}

TEST(Launch, BadLocalRankIsUserError) {
  int lr = -1;
  std::string source;
  EXPECT_THROW(local_rank_from_env({{"SLURM_LOCALID", "x1"}}, &lr, &source), UserError);
}

TEST(Launch, LauncherNames) {
  EXPECT_EQ(launcher_from_env({{"OMPI_COMM_WORLD_SIZE", "2"}}, 2), "mpirun (Open MPI)");
  EXPECT_EQ(launcher_from_env({{"SLURM_STEP_ID", "0"}, {"SLURM_PROCID", "0"}}, 2), "srun (Slurm)");
  EXPECT_EQ(launcher_from_env({{"PMI_RANK", "0"}}, 2), "mpiexec (Hydra/PMI)");
  EXPECT_EQ(launcher_from_env({{"LOCAL_RANK", "0"}}, 1), "torchrun-style (LOCAL_RANK)");
  EXPECT_EQ(launcher_from_env({}, 1), "singleton");
}

namespace {

RunConfig config_with(const std::vector<std::string>& overrides) {
  return parse_run_config(
      "model: {architecture: {vocab_size: 8, hidden_size: 8, intermediate_size: 8, num_hidden_layers: 1,"
      " num_attention_heads: 1}, max_seq_length: 8}\n",
      "run.yaml", overrides);
}

LaunchInfo launch(int world, int local_rank, int local_size, int n_gpus) {
  LaunchInfo li;
  li.world_size = world;
  li.rank = local_rank;
  li.local_rank = local_rank;
  li.local_size = local_size;
  li.hostname = "node1";
  for (int i = 0; i < n_gpus; ++i) li.gpus.push_back(GpuInfo{i, "GPU", 80LL << 30, 80LL << 30, 9, 0});
  if (n_gpus == 0) li.gpu_probe_error = "cudaGetDeviceCount: no driver";
  return li;
}

}  // namespace

TEST(Launch, NoGpuFallsBackToCpuWithNotice) {
  Placement p = place_rank(config_with({}), launch(1, 0, 1, 0), "run.yaml");
  EXPECT_FALSE(p.use_gpu);
  EXPECT_NE(p.notice.find("CPU path"), std::string::npos);
}

TEST(Launch, SequentialMapsLocalRankToGpu) {
  Placement p = place_rank(config_with({"model.enable_multi_gpu=true"}), launch(4, 2, 4, 4), "run.yaml");
  ASSERT_TRUE(p.use_gpu);
  EXPECT_EQ(p.devices, std::vector<int>{2});
  EXPECT_TRUE(p.multi_gpu_enabled);
  EXPECT_TRUE(p.unused_gpus_hint.empty());
}

TEST(Launch, MoreRanksThanGpusIsAnErrorUnlessAllowed) {
  EXPECT_THROW(place_rank(config_with({"model.enable_multi_gpu=true"}), launch(4, 3, 4, 2), "run.yaml"), UserError);
  Placement p = place_rank(config_with({"model.enable_multi_gpu=true", "distributed.allow_shared_gpus=true"}),
                           launch(4, 3, 4, 2), "run.yaml");
  EXPECT_EQ(p.devices, std::vector<int>{1});
}

TEST(Launch, CudaNPinsOneGpuAndChecksRange) {
  Placement p = place_rank(config_with({"model.device_map=cuda:1"}), launch(1, 0, 1, 2), "run.yaml");
  EXPECT_EQ(p.devices, std::vector<int>{1});
  EXPECT_THROW(place_rank(config_with({"model.device_map=cuda:2"}), launch(1, 0, 1, 2), "run.yaml"), UserError);
}

TEST(Launch, UnusedGpusGetTheCommandThatUsesThem) {
  Placement p = place_rank(config_with({}), launch(1, 0, 1, 4), "run.yaml");
  EXPECT_NE(p.unused_gpus_hint.find("Num GPUs = 4"), std::string::npos) << p.unused_gpus_hint;
  EXPECT_NE(p.unused_gpus_hint.find("mpirun -np 4"), std::string::npos) << p.unused_gpus_hint;
}

TEST(Launch, AutoSpreadsOverVisibleGpusWhenEnabled) {
  Placement p = place_rank(config_with({"model.device_map=auto", "model.enable_multi_gpu=true"}), launch(1, 0, 1, 3),
                           "run.yaml");
  EXPECT_EQ(p.devices, (std::vector<int>{0, 1, 2}));
}

// device_map auto with several ranks on a node: its GPUs split evenly, consecutive ones to each
// rank (2 ranks x 2 GPUs on 4 combine data parallel with layer stages); a rank without a GPU of its
// own is an error.
TEST(Launch, AutoSplitsTheNodesGpusBetweenItsRanks) {
  const RunConfig cfg = config_with({"model.device_map=auto", "model.enable_multi_gpu=true"});
  EXPECT_EQ(place_rank(cfg, launch(2, 0, 2, 4), "run.yaml").devices, (std::vector<int>{0, 1}));
  const Placement second = place_rank(cfg, launch(2, 1, 2, 4), "run.yaml");
  EXPECT_EQ(second.devices, (std::vector<int>{2, 3}));
  EXPECT_TRUE(second.unused_gpus_hint.empty());
  EXPECT_EQ(place_rank(cfg, launch(4, 3, 4, 4), "run.yaml").devices, (std::vector<int>{3}));
  EXPECT_THROW(place_rank(cfg, launch(3, 0, 3, 2), "run.yaml"), UserError);
}

TEST(Launch, SeveralRanksNeedMultiGpuEnabled) {
  EXPECT_THROW(place_rank(config_with({}), launch(2, 0, 2, 0), "run.yaml"), UserError);
}

TEST(Launch, DeviceMapCpu) {
  Placement p = place_rank(config_with({"model.device_map=cpu"}), launch(1, 0, 1, 2), "run.yaml");
  EXPECT_FALSE(p.use_gpu);
}
