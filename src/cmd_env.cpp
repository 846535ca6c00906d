// `ranktune env` and `ranktune config`.
#include <cstdio>
#include <iostream>

#include "ranktune/cli.h"
#include "ranktune/config.h"
#include "ranktune/error.h"

namespace ranktune {

int cmd_env(const Args& args, const LaunchInfo& li) {
  if (wants_help(args)) {
    std::puts("usage: ranktune env [CONFIG [--set section.key=value]...]\n\n"
              "Prints the detected set-up as JSON: ranks, local ranks and where they came from, hostnames,\n"
              "visible GPUs (name, memory, compute capability), the launcher, MPI/NCCL/CUDA versions and,\n"
              "given a run config, the device chosen per rank and whether multi-GPU training is enabled.\n"
              "Works without a GPU. Run it under mpirun/srun to see every rank.");
    return 0;
  }
  ConfigArgs ca = parse_config_args(args, "env", {}, {});
  RunConfig cfg;
  std::string source = "(defaults)";
  if (ca.config_path.empty()) {
    // Without a config: the default placement, data parallel when several ranks run.
    cfg.model.device_map = "sequential";
    cfg.model.enable_multi_gpu = li.world_size > 1;
  } else {
    cfg = load_run_config(ca.config_path, ca.overrides);
    source = ca.config_path;
  }
  // env is the diagnostic: a placement that training would refuse is reported, not fatal.
  std::string placement_error;
  Placement p;
  try {
    p = place_rank(cfg, li, source);
  } catch (const UserError& e) {
    placement_error = e.what();
  }
  auto report = env_report(li, placement_error.empty() ? &p : nullptr);
  if (!placement_error.empty()) report["placement_error"] = placement_error;
  if (li.rank == 0) std::cout << report.dump(2) << std::endl;
  return 0;
}

int cmd_config(const Args& args, const LaunchInfo& li) {
  if (wants_help(args)) {
    std::puts("usage: ranktune config --reference\n       ranktune config CONFIG [--set section.key=value]...\n\n"
              "--reference prints every key with its default and a one-line doc (jobs/configs/reference.yaml).\n"
              "With a CONFIG, validates it and prints the resolved config (defaults filled in).");
    return 0;
  }
  ConfigArgs ca = parse_config_args(args, "config", {}, {"--reference"});
  const bool reference = !ca.flags.empty();
  if (li.rank != 0) return 0;
  if (reference) {
    std::fputs(reference_config_yaml().c_str(), stdout);
    return 0;
  }
  RT_REQUIRE(!ca.config_path.empty(), "ranktune config: give a CONFIG file or --reference");
  std::fputs(load_run_config(ca.config_path, ca.overrides).to_yaml().c_str(), stdout);
  return 0;
}

}  // namespace ranktune
