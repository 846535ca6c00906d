// Training checkpoints: one HDF5 file per save (output_dir/checkpoints/step-NNNNNNNN.h5) holding
// everything a run needs to continue bitwise where it stopped, readable with h5ls/h5dump:
//
//   /                      attributes format_version, ranktune_version
//   /meta/config_yaml      the resolved run config      /meta/tokenizer_hash
//   /state/<name>          step, optimizer_steps, total_steps, warmup_steps, epoch, global_batch,
//                          world_size, bad_steps_in_row, tokens_total, loss_since_log,
//                          steps_since_log, skipped_since_log, loader_epoch, loader_row_offset, loader_seed,
//                          loader_n_rows (scalars)
//   /weights/<tensor name> the trainable group's fp32 master weights, by HF/PEFT name
//   /optimizer             attribute kind; m, v (fp32 AdamW states, flat in parameter order) or
//                          m_codes, v_codes (u8) and m_absmax, v_absmax (fp32) for adamw_8bit
//
// Every dataset carries an attribute fnv1a64: the FNV-1a 64 hash of its stored bytes. A file is
// written as "<name>.tmp", fsynced, renamed and the directory fsynced, so a crash at any moment
// leaves earlier checkpoints untouched and never leaves a partial file under a checkpoint's name.
// Reading checks the format version and every checksum; any problem is a UserError naming the file
// and the dataset.
#pragma once
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "ranktune/dataset.h"
#include "ranktune/model.h"
#include "ranktune/optimizer.h"

namespace ranktune {

inline constexpr int64_t kCheckpointFormatVersion = 1;

// Where the step loop is; with the weights and optimizer states, all that the continued run needs
// (the data order and every dropout seed follow from the seed, the step and the loader state).
struct TrainProgress {
  int64_t step = 0;             // steps done, skipped ones included
  int64_t optimizer_steps = 0;  // updates applied (AdamW's bias correction counts these)
  int64_t total_steps = 0, warmup_steps = 0;  // the schedule's inputs
  double epoch = 0;
  int64_t global_batch = 0;  // sequences per step: batch x accumulation x ranks
  int64_t world_size = 1;
  int64_t bad_steps_in_row = 0;
  int64_t tokens_total = 0;
  double loss_since_log = 0;  // the logging window in progress
  int64_t steps_since_log = 0;
  int64_t skipped_since_log = 0;
  DataLoaderState loader;
};

struct CheckpointTensor {
  std::string name;
  std::vector<int64_t> shape;
  std::vector<float> values;
};

// A checkpoint read into host memory, every checksum verified.
struct CheckpointData {
  std::string path;
  std::string ranktune_version, config_yaml, tokenizer_hash;
  TrainProgress progress;
  std::vector<CheckpointTensor> weights;
  OptimizerState optimizer;
};

// Writes model.trainable()'s master weights, the optimizer's states and the rest to `path`
// atomically. UserError (and no file) when a value is not finite or the file system refuses.
void save_checkpoint(const std::string& path, LlamaModel& model, const Optimizer& optimizer,
                     const TrainProgress& progress, const std::string& config_yaml,
                     const std::string& tokenizer_hash);
// Reads and verifies a whole checkpoint; UserError naming the file and dataset on any problem.
CheckpointData read_checkpoint(const std::string& path);
// Sets the trainable weights (master and compute copies) from a checkpoint; UserError when a
// tensor is missing or has another shape.
void restore_weights(LlamaModel& model, const CheckpointData& ckpt);

// "step-00000042.h5"
std::string checkpoint_file_name(int64_t step);
// The complete checkpoints in `dir` (step-*.h5, no .tmp), newest (highest step) first.
std::vector<std::string> list_checkpoints(const std::string& dir);
// Removes the oldest checkpoints beyond `keep` (0 keeps all) and leftover .tmp files. Returns
// the removed paths.
std::vector<std::string> prune_checkpoints(const std::string& dir, int64_t keep);
// --resume: "latest" (or a directory) takes the newest checkpoint in `dir` that reads back whole, reporting each
// one skipped and why through `skipped` (nullopt when there is none at all; UserError when there
// are some and none is valid); otherwise `spec` is a checkpoint file, read as it is.
std::optional<CheckpointData> find_resume_checkpoint(const std::string& spec, const std::string& dir,
                                                     std::vector<std::string>* skipped);

// Test hooks from RANKTUNE_FAULT="name=value[,name=value]...": the value of `name`, or -1. Known
// names: kill_during_save=STEP (SIGKILL halfway through writing that step's checkpoint),
// nan_loss_at_step=STEP (the step's loss becomes NaN), sigusr1_at_step=STEP (the process sends
// itself SIGUSR1 during that step).
int64_t fault_value(const std::string& name);

}  // namespace ranktune
