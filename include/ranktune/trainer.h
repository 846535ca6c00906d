// The training run: config -> placement -> backend -> model -> data -> the step loop (micro-batches,
// gradient reduction, clipping, optimizer, schedule), eval, logging and the saved adapter.
#pragma once
#include <string>

#include "ranktune/config.h"
#include "ranktune/launch.h"

namespace ranktune {

int run_train(const RunConfig& cfg, const LaunchInfo& li);
// `ranktune eval`: one JSON line {"loss", "tokens", ...} for the configured model (+ adapter) on
// the eval data (data.eval_file, else data.train_file).
int run_eval(const RunConfig& cfg, const LaunchInfo& li);
// `ranktune generate`: the greedy continuation of a prompt.
int run_generate(const RunConfig& cfg, const LaunchInfo& li, const std::string& prompt, int64_t max_new_tokens);

}  // namespace ranktune
