// The subcommands of the `ranktune` binary. Each takes its arguments after the subcommand name
// and returns the process exit code; UserError escaping one becomes exit code 2 in main.
#pragma once
#include <string>
#include <vector>

#include "ranktune/launch.h"

namespace ranktune {

using Args = std::vector<std::string>;

int cmd_env(const Args& args, const LaunchInfo& li);
int cmd_config(const Args& args, const LaunchInfo& li);
int cmd_train(const Args& args, const LaunchInfo& li);
int cmd_eval(const Args& args, const LaunchInfo& li);
int cmd_prep(const Args& args, const LaunchInfo& li);
int cmd_generate(const Args& args, const LaunchInfo& li);
int cmd_export(const Args& args, const LaunchInfo& li);

// Shared argument handling: `CONFIG [--set section.key=value]...` plus the named flags.
struct ConfigArgs {
  std::string config_path;
  std::vector<std::string> overrides;
  std::vector<std::string> flags;  // other --flags, in order, with their values
  std::vector<std::string> more_positionals;  // positional arguments after the first
};
ConfigArgs parse_config_args(const Args& args, const std::string& command,
                             const std::vector<std::string>& flags_with_value,
                             const std::vector<std::string>& bare_flags, size_t max_positionals = 1);
bool wants_help(const Args& args);

}  // namespace ranktune
