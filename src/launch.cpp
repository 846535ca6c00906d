#include "ranktune/launch.h"

#include <mpi.h>
#include <unistd.h>

#include <cstdlib>
#include <cstring>

#include "ranktune/error.h"

#ifdef RANKTUNE_HAVE_CUDA
#include <cuda_runtime.h>
#include <nccl.h>
#endif

extern char** environ;

namespace ranktune {

MpiSession::MpiSession(int* argc, char*** argv) {
  int initialized = 0;
  MPI_Initialized(&initialized);
  if (!initialized) {
    int provided = 0;
    MPI_Init_thread(argc, argv, MPI_THREAD_FUNNELED, &provided);
  }
}

MpiSession::~MpiSession() {
  int finalized = 0;
  MPI_Finalized(&finalized);
  if (!finalized) MPI_Finalize();
}

std::map<std::string, std::string> process_env() {
  std::map<std::string, std::string> env;
  for (char** e = environ; e && *e; ++e) {
    const char* eq = std::strchr(*e, '=');
    if (eq) env[std::string(*e, static_cast<size_t>(eq - *e))] = std::string(eq + 1);
  }
  return env;
}

bool local_rank_from_env(const std::map<std::string, std::string>& env, int* local_rank,
                         std::string* source) {
  for (const char* name : {"OMPI_COMM_WORLD_LOCAL_RANK", "SLURM_LOCALID", "MPI_LOCALRANKID", "LOCAL_RANK"}) {
    auto it = env.find(name);
    if (it == env.end() || it->second.empty()) continue;
    char* end = nullptr;
    long v = std::strtol(it->second.c_str(), &end, 10);
    if (*end != '\0' || v < 0)
      throw UserError(std::string("environment variable ") + name + " = '" + it->second +
                      "' is not a local rank (a whole number >= 0)");
    *local_rank = static_cast<int>(v);
    *source = name;
    return true;
  }
  return false;
}

std::string launcher_from_env(const std::map<std::string, std::string>& env, int world_size) {
  if (env.count("OMPI_COMM_WORLD_SIZE")) return "mpirun (Open MPI)";
  if (env.count("SLURM_STEP_ID") || (env.count("SLURM_PROCID") && env.count("SLURM_LOCALID"))) return "srun (Slurm)";
  if (env.count("PMI_RANK") || env.count("MPI_LOCALRANKID")) return "mpiexec (Hydra/PMI)";
  if (env.count("LOCAL_RANK")) return "torchrun-style (LOCAL_RANK)";
  return world_size > 1 ? "mpi" : "singleton";
}

namespace {

void probe_gpus(LaunchInfo& li) {
#ifdef RANKTUNE_HAVE_CUDA
  int count = 0;
  cudaError_t err = cudaGetDeviceCount(&count);
  if (err != cudaSuccess) {
    li.gpu_probe_error = std::string("cudaGetDeviceCount: ") + cudaGetErrorString(err);
    (void)cudaGetLastError();
    return;
  }
  if (count == 0) li.gpu_probe_error = "no CUDA devices visible";
  for (int i = 0; i < count; ++i) {
    cudaDeviceProp prop{};
    if (cudaGetDeviceProperties(&prop, i) != cudaSuccess) continue;
    GpuInfo g;
    g.index = i;
    g.name = prop.name;
    g.total_bytes = static_cast<int64_t>(prop.totalGlobalMem);
    g.cc_major = prop.major;
    g.cc_minor = prop.minor;
    li.gpus.push_back(g);
  }
  int rt = 0, drv = 0;
  cudaRuntimeGetVersion(&rt);
  cudaDriverGetVersion(&drv);
  li.cuda_runtime_version = std::to_string(rt / 1000) + "." + std::to_string((rt % 1000) / 10);
  if (drv) li.cuda_driver_version = std::to_string(drv / 1000) + "." + std::to_string((drv % 1000) / 10);
  int nccl = 0;
  if (ncclGetVersion(&nccl) == ncclSuccess) {
    // NCCL_VERSION_CODE is major*10000 + minor*100 + patch for 2.9+.
    li.nccl_version = std::to_string(nccl / 10000) + "." + std::to_string((nccl % 10000) / 100) + "." +
                      std::to_string(nccl % 100);
  }
#else
  li.gpu_probe_error = "ranktune was built without CUDA";
#endif
}

}  // namespace

LaunchInfo detect_launch() {
  LaunchInfo li;
  MPI_Comm_rank(MPI_COMM_WORLD, &li.rank);
  MPI_Comm_size(MPI_COMM_WORLD, &li.world_size);
  const auto env = process_env();
  li.launcher = launcher_from_env(env, li.world_size);

  // The node-local communicator gives the local size (and the local rank when no launcher
  // variable does).
  MPI_Comm node;
  MPI_Comm_split_type(MPI_COMM_WORLD, MPI_COMM_TYPE_SHARED, li.rank, MPI_INFO_NULL, &node);
  int split_rank = 0;
  MPI_Comm_rank(node, &split_rank);
  MPI_Comm_size(node, &li.local_size);
  MPI_Comm_free(&node);
  if (!local_rank_from_env(env, &li.local_rank, &li.local_rank_source)) {
    li.local_rank = split_rank;
    li.local_rank_source = "mpi-shared-memory-split";
  }

  char host[256] = {0};
  gethostname(host, sizeof(host) - 1);
  li.hostname = host;
  char version[MPI_MAX_LIBRARY_VERSION_STRING] = {0};
  int len = 0;
  MPI_Get_library_version(version, &len);
  li.mpi_version = std::string(version, static_cast<size_t>(len));
  if (auto nl = li.mpi_version.find_first_of(",\n"); nl != std::string::npos) li.mpi_version.resize(nl);
  probe_gpus(li);
  return li;
}

bool multi_gpu_requested(const RunConfig& cfg, std::string* reason) {
  const char* env = std::getenv("RANKTUNE_ENABLE_MULTIGPU");
  if (env && std::string(env) == "1") {
    *reason = "RANKTUNE_ENABLE_MULTIGPU=1";
    return true;
  }
  if (cfg.model.enable_multi_gpu) {
    *reason = "model.enable_multi_gpu: true";
    return true;
  }
  *reason = "not requested (set model.enable_multi_gpu: true or RANKTUNE_ENABLE_MULTIGPU=1)";
  return false;
}

Placement place_rank(const RunConfig& cfg, const LaunchInfo& li, const std::string& config_path) {
  Placement p;
  p.multi_gpu_enabled = multi_gpu_requested(cfg, &p.multi_gpu_reason);
  const std::string& dm = cfg.model.device_map;
  const int n_gpus = static_cast<int>(li.gpus.size());
  if (!p.multi_gpu_enabled && li.world_size > 1)
    throw UserError(config_path + ": " + std::to_string(li.world_size) +
                    " ranks were launched but data-parallel (multi-GPU) training is not enabled: set "
                    "model.enable_multi_gpu: true (or RANKTUNE_ENABLE_MULTIGPU=1), or run a single rank");
  if (dm == "cpu") {
    p.notice = "device_map: cpu: training on the CPU path (fp32)";
    return p;
  }
  if (n_gpus == 0) {
    p.notice = "no GPU found (" + li.gpu_probe_error + "): training on the CPU path (fp32)";
    return p;
  }
  p.use_gpu = true;
  if (dm.rfind("cuda:", 0) == 0) {
    const int idx = std::stoi(dm.substr(5));
    if (idx >= n_gpus)
      throw UserError(config_path + ": model.device_map = " + dm + " but this process sees " +
                      std::to_string(n_gpus) + " GPU(s) (cuda:0..cuda:" + std::to_string(n_gpus - 1) + ")");
    p.devices = {idx};
  } else if (dm == "auto") {
    // The node's GPUs split evenly over its ranks, consecutive ones to each (2 ranks x 2 GPUs on 4).
    if (li.local_size > n_gpus)
      throw UserError(config_path + ": model.device_map: auto with " + std::to_string(li.local_size) + " ranks on " +
                      li.hostname + " but only " + std::to_string(n_gpus) +
                      " GPU(s): each rank needs at least one GPU of its own");
    const int per_rank = n_gpus / li.local_size;
    for (int i = 0; i < per_rank; ++i) p.devices.push_back(li.local_rank * per_rank + i);
  } else {  // sequential: local rank -> GPU
    if (li.local_size > n_gpus && !cfg.distributed.allow_shared_gpus)
      throw UserError(config_path + ": " + std::to_string(li.local_size) + " ranks on " + li.hostname +
                      " but only " + std::to_string(n_gpus) + " GPU(s) visible: start at most " +
                      std::to_string(n_gpus) + " ranks per node (mpirun -np " + std::to_string(n_gpus) +
                      "), or set distributed.allow_shared_gpus: true to let ranks share GPUs");
    p.devices = {li.local_rank % n_gpus};
  }
  const int used = dm == "auto" ? (n_gpus / li.local_size) * li.local_size : std::min(li.local_size, n_gpus);
  if (n_gpus > used) {
    p.unused_gpus_hint = "Num GPUs = " + std::to_string(n_gpus) + " visible but training uses " +
                         std::to_string(used) + ": to use them all run `mpirun -np " + std::to_string(n_gpus) +
                         " ranktune train " + config_path + " --set model.enable_multi_gpu=true` (or `srun --ntasks-per-node=" +
                         std::to_string(n_gpus) + " --gpus-per-task=1 ranktune train ...`), or set model.device_map: auto";
  }
  return p;
}

nlohmann::json env_report(const LaunchInfo& li, const Placement* placement) {
  using nlohmann::json;
  json me = {{"rank", li.rank},
             {"local_rank", li.local_rank},
             {"local_rank_source", li.local_rank_source},
             {"hostname", li.hostname}};
  json gpus = json::array();
  for (const auto& g : li.gpus)
    gpus.push_back({{"index", g.index},
                    {"name", g.name},
                    {"memory_gib", static_cast<double>(g.total_bytes) / (1 << 30)},
                    {"compute_capability", std::to_string(g.cc_major) + "." + std::to_string(g.cc_minor)}});
  me["visible_gpus"] = gpus;
  if (!li.gpu_probe_error.empty()) me["gpu_probe_error"] = li.gpu_probe_error;
  if (placement) {
    if (placement->use_gpu) {
      json devs = json::array();
      for (int d : placement->devices) devs.push_back("cuda:" + std::to_string(d));
      me["devices"] = devs;
    } else {
      me["devices"] = json::array({"cpu"});
    }
  }
  // Gather every rank's record on rank 0.
  const std::string mine = me.dump();
  int n = static_cast<int>(mine.size());
  std::vector<int> sizes(static_cast<size_t>(li.world_size));
  MPI_Gather(&n, 1, MPI_INT, sizes.data(), 1, MPI_INT, 0, MPI_COMM_WORLD);
  std::vector<int> displs(static_cast<size_t>(li.world_size), 0);
  int total = 0;
  for (int r = 0; r < li.world_size; ++r) displs[static_cast<size_t>(r)] = total, total += sizes[static_cast<size_t>(r)];
  std::vector<char> all(static_cast<size_t>(std::max(total, 1)));
  MPI_Gatherv(mine.data(), n, MPI_CHAR, all.data(), sizes.data(), displs.data(), MPI_CHAR, 0, MPI_COMM_WORLD);
  json report = {{"ranks", li.world_size},
                 {"launcher", li.launcher},
                 {"mpi", li.mpi_version},
                 {"nccl", li.nccl_version.empty() ? json(nullptr) : json(li.nccl_version)},
                 {"cuda_runtime", li.cuda_runtime_version.empty() ? json(nullptr) : json(li.cuda_runtime_version)},
                 {"cuda_driver", li.cuda_driver_version.empty() ? json(nullptr) : json(li.cuda_driver_version)},
                 {"ranktune", RANKTUNE_VERSION}};
  if (placement) {
    report["multi_gpu_enabled"] = placement->multi_gpu_enabled;
    report["multi_gpu_reason"] = placement->multi_gpu_reason;
    if (!placement->unused_gpus_hint.empty()) report["hint"] = placement->unused_gpus_hint;
  }
  if (li.rank == 0) {
    json per_rank = json::array();
    for (int r = 0; r < li.world_size; ++r)
      per_rank.push_back(json::parse(std::string(all.data() + displs[static_cast<size_t>(r)],
                                                 static_cast<size_t>(sizes[static_cast<size_t>(r)]))));
    report["per_rank"] = per_rank;
  }
  return report;
}

}  // namespace ranktune
