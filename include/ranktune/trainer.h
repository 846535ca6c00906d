// The training run: config -> placement -> backend -> model -> data -> the step loop (micro-batches,
// gradient reduction, clipping, optimizer, schedule), eval, logging and the saved adapter.
#pragma once
#include <cstdint>
#include <string>

#include "ranktune/config.h"
#include "ranktune/launch.h"

namespace ranktune {

// `resume`: "" (a fresh run), "latest" (the newest valid checkpoint in output_dir/checkpoints, or
// a fresh run when there is none) or a checkpoint file or directory. Returns 0, or kExitRequeue
// after a stop signal (the checkpoint of the last finished step saved).
int run_train(const RunConfig& cfg, const LaunchInfo& li, const std::string& resume = "");
// `ranktune export`: a checkpoint ("latest" or a path) as a PEFT adapter directory (format "peft")
// or an HF model directory with the LoRA updates merged into bf16 weights (format "merged").
int run_export(const RunConfig& cfg, const LaunchInfo& li, const std::string& checkpoint, const std::string& format,
               const std::string& output_dir);
// `ranktune eval`: one JSON line {"loss", "tokens", ...} for the configured model (+ adapter) on
// the eval data (data.eval_file, else data.train_file).
int run_eval(const RunConfig& cfg, const LaunchInfo& li);
// `ranktune generate`: a continuation of the prompt, sampled with temperature and top-p (nucleus)
// from a seeded RNG, or greedy with temperature 0 (src/generate.cpp).
int run_generate(const RunConfig& cfg, const LaunchInfo& li, const std::string& prompt, int64_t max_new_tokens,
                 double temperature, double top_p, uint64_t seed);

}  // namespace ranktune
