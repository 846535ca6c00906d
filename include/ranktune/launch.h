// Launch: MPI initialises every run (under mpirun/srun, or a bare `ranktune` as a singleton);
// each rank finds its local rank from the launcher's variables and picks its device.
#pragma once
#include <map>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "ranktune/config.h"

namespace ranktune {

// MPI_Init/MPI_Finalize owned by main.
class MpiSession {
 public:
  MpiSession(int* argc, char*** argv);
  ~MpiSession();
  MpiSession(const MpiSession&) = delete;
  MpiSession& operator=(const MpiSession&) = delete;
};

struct GpuInfo {
  int index = 0;
  std::string name;
  int64_t total_bytes = 0;
  int64_t free_bytes = 0;
  int cc_major = 0, cc_minor = 0;
};

// What this process sees of the machine and the launcher.
struct LaunchInfo {
  int rank = 0, world_size = 1;
  int local_rank = 0, local_size = 1;
  std::string local_rank_source;  // which variable (or "mpi-shared-memory-split") gave local_rank
  std::string launcher;           // "mpirun (Open MPI)", "srun (Slurm)", "torchrun-style", "singleton"
  std::string hostname;
  std::vector<GpuInfo> gpus;      // visible to this process
  std::string gpu_probe_error;    // why no GPU was found, if none
  std::string mpi_version, nccl_version, cuda_runtime_version, cuda_driver_version;
};

// Reads the local rank the way launchers publish it: OMPI_COMM_WORLD_LOCAL_RANK, SLURM_LOCALID,
// MPI_LOCALRANKID, LOCAL_RANK; returns the variable's name in `source`, or false when none is set.
bool local_rank_from_env(const std::map<std::string, std::string>& env, int* local_rank,
                         std::string* source);
// Names the launcher from its variables.
std::string launcher_from_env(const std::map<std::string, std::string>& env, int world_size);
std::map<std::string, std::string> process_env();

// Collective over MPI_COMM_WORLD: every rank calls it.
LaunchInfo detect_launch();

// Where a rank runs.
struct Placement {
  bool use_gpu = false;
  std::vector<int> devices;       // one GPU for sequential/cuda:N, several for auto
  bool multi_gpu_enabled = false;
  std::string multi_gpu_reason;   // why it is (or is not) enabled
  std::string notice;             // one line for rank 0 to print (e.g. the CPU fallback)
  std::string unused_gpus_hint;   // "N GPUs visible but training uses 1: run mpirun -np N ..."
};

// Decides the device(s) of this rank from model.device_map / enable_multi_gpu and what is visible.
// Throws UserError for impossible requests (cuda:7 with 2 GPUs, more ranks than GPUs).
Placement place_rank(const RunConfig& cfg, const LaunchInfo& li, const std::string& config_path);
// Multi-GPU switch: model.enable_multi_gpu or RANKTUNE_ENABLE_MULTIGPU=1.
bool multi_gpu_requested(const RunConfig& cfg, std::string* reason);

// `ranktune env`: the set-up of every rank as JSON (gathered to rank 0).
nlohmann::json env_report(const LaunchInfo& li, const Placement* placement);

}  // namespace ranktune
