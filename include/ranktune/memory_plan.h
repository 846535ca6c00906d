// Memory planning: before a run allocates anything, the bytes each part of it will take on its
// device, term by term, from the same sizes model.cpp, optimizer.cpp and the CUDA backend allocate.
// run_train prints the plan and stops with it and concrete advice (each alternative's estimated
// total) when it exceeds the device's budget, instead of failing in cudaMalloc halfway through.
#pragma once
#include <cstdint>
#include <optional>
#include <string>

#include "ranktune/config.h"
#include "ranktune/model.h"

namespace ranktune {

struct LaunchInfo;
struct Placement;

// What the plan needs beyond the model's options.
struct PlanSettings {
  std::string optim = "adamw";  // training.optim
  // The CUDA path: bf16 compute copies and activations, fp32 masters, cuBLASLt workspace and the
  // backend's scratch. false = the CPU path: fp32 everywhere, masters alias the compute copies.
  bool gpu = true;
  bool load_in_4bit = false;  // frozen base linear weights as NF4 (QLoRA)
  int world_size = 1;
  int zero_stage = 0;       // 1: optimizer states and masters of full fine-tuning sharded over ranks
  // Data parallel's gradients cross over the copy engines (distributed.grad_reduce: auto on the
  // GPU), under ZeRO-1 or with LoRA: each rank holds a receive slot per other rank, of its shard
  // (ZeRO-1) or of all the adapters' gradients (LoRA).
  bool reduce_by_copies = false;
  bool generation = false;  // the run generates at its end (a KV cache of [B, T] per layer)
  // device_map auto: plan one GPU of the model, holding stage_layers of its layers (-1: all); the
  // first also holds the embedding, final norm, head, loss chunk and the LoRA adapters with their
  // gradients and optimizer states (LlamaModel's placement).
  int64_t stage_layers = -1;
  bool first_stage = true;
};

// Bytes per term on the device. The terms are exact sums of what is asked of the allocator;
// runtime_overhead holds what is not ours to size (cuBLAS's own workspace, kernel code, the
// allocator's rounding, NCCL's buffers).
struct MemoryPlan {
  int64_t weights = 0;           // compute copies: base (bf16, or NF4 + bf16 rest) and LoRA adapters
  int64_t trainable = 0;         // fp32 masters of the trained tensors (GPU; the CPU updates in place)
  int64_t gradients = 0;         // fp32, one slot per trained tensor
  int64_t optimizer = 0;         // AdamW m and v (fp32, or 8-bit codes + block absmax)
  int64_t activations = 0;       // inputs, layer inputs / per-layer sets, backward buffers
  int64_t logits_chunk = 0;      // the loss chunk: [chunk rows, vocab] logits, dlogits in place
  int64_t workspace = 0;         // cuBLASLt workspace, op scratch, NF4 dequantization buffer
  int64_t runtime_overhead = 0;  // see above
  int64_t kv_cache = 0;          // generation at the end of the run
  int64_t total = 0;
  int64_t host_pinned = 0;  // offloaded layer inputs in host memory (not in a GPU's total)
  int64_t base_params = 0, lora_params = 0, trainable_params = 0;
  int64_t loss_chunk_rows = 0;
  struct Notes {
    std::string weights, trainable, gradients, optimizer, activations, logits_chunk, workspace, runtime_overhead,
        kv_cache;
  } notes;  // one line per term saying what it holds

  // One row per term (name, size, what it holds) and the total; no header.
  std::string table() const;
};

MemoryPlan plan_memory(const ModelOptions& options, const PlanSettings& settings);
// The plan of the fullest of n_gpus GPUs, with the layers placed as device_map auto places them
// (balance_stages); plan_memory itself for one GPU. `fullest` receives that GPU's stage index.
MemoryPlan plan_fullest_gpu(const ModelOptions& options, const PlanSettings& settings, int n_gpus,
                            int* fullest = nullptr);

// The settings of a run on this rank (gpu: the CUDA path).
PlanSettings plan_settings_from(const RunConfig& cfg, bool gpu, int rank, int world_size);

// "3.80 GiB", "512.0 MiB".
std::string format_bytes(int64_t bytes);

// The memory one rank may use: distributed.max_memory_per_gpu when set (the only budget on the CPU
// path), capped on a GPU by its free memory after the CUDA context exists.
struct MemoryBudget {
  int64_t bytes = 0;
  std::string what;                 // "8.0 GiB free on cuda:0 of 79.1 GiB", "distributed.max_memory_per_gpu = 4GiB"
  int64_t device_used_before = -1;  // GPU memory in use before the run's allocations (for the measured peak)
};
std::optional<MemoryBudget> memory_budget(const RunConfig& cfg, const Placement& placement);

// Plans this rank's memory for training with per_device_train_batch_size `batch` and throws
// UserError (exit 2) with the breakdown and advice when it exceeds the budget.
struct MemoryCheck {
  MemoryPlan plan;
  std::optional<MemoryBudget> budget;
  std::string report;  // a header line, the plan's table and the budget, for the run's banner
};
MemoryCheck check_training_memory(const RunConfig& cfg, const LlamaArch& arch, int64_t batch, const LaunchInfo& li,
                                  const Placement& placement);

// "memory: 3.71 GiB in use on the GPU after step 1 (plan 3.80 GiB, measured/plan 0.98)", or "" on the
// CPU path. The measured figure counts from just before the run's first allocation (after context
// creation), as tools/bench_step.cpp does.
std::string measured_memory_line(const MemoryCheck& check, const std::string& when);

// What lowers memory, as a list of the settings to change; for an out-of-memory error that has no
// plan at hand.
std::string out_of_memory_advice();

}  // namespace ranktune
