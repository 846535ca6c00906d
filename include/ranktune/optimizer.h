// The optimizer step over the trainable parameter group: AdamW with fp32 states, or blockwise
// 8-bit states (adamw_8bit), one fused backend launch per tensor; and the learning-rate schedule.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "ranktune/backend.h"
#include "ranktune/comm.h"
#include "ranktune/config.h"
#include "ranktune/model.h"

namespace ranktune {

// HF's schedules: linear warmup from 0, then constant, linear decay to 0, or cosine to 0.
double learning_rate_at(int64_t step, int64_t total_steps, int64_t warmup_steps, double peak,
                        const std::string& schedule);

// The optimizer's states in host memory (checkpoints): fp32 m and v, flat in parameter order, or
// for adamw_8bit the u8 codes and per-block absmax (each tensor padded to whole blocks).
struct OptimizerState {
  std::string kind;
  int64_t step = 0;
  std::vector<float> m, v;
  std::vector<uint8_t> m_codes, v_codes;
  std::vector<float> m_absmax, v_absmax;
};

// ZeRO-1 (distributed.zero_stage: 1, full fine-tuning over several ranks): each rank owns one
// shard of the trainable tensors -- consecutive whole tensors, balanced by size -- and keeps the
// fp32 masters and optimizer states of its shard only. A step: during backward the GradReducer
// (built with shard_offsets()) reduces each gradient bucket to the owners of its pieces, so each
// rank receives the sum of its shard; each rank updates its shard in rounds (equal fractions of its
// elements), and each round's updated compute copies of every shard are broadcast from their owners
// as one batch while the next round updates, so the all-gather of the weights overlaps the updates;
// its last rounds overlap the next forward, which waits for them layer by layer. Checkpoints hold
// the whole state, gathered to rank 0, in the same layout as without ZeRO, so a run may resume with
// or without it and on any number of ranks.
// ZeRO-1's shards of tensors of these sizes (in order) over `world` ranks: the index of each
// shard's first tensor, world + 1 of them; each cut is at the tensor boundary nearest to r/world of
// all elements.
std::vector<size_t> zero_shard_cuts(const std::vector<int64_t>& tensor_sizes, int world);

class Optimizer {
 public:
  // zero: the communicator to shard over (ZeRO-1), or null for a whole copy on every rank.
  Optimizer(Backend& backend, ParamGroup& params, const TrainingSection& cfg, Communicator* zero = nullptr);
  // The global gradient norm. The caller has summed the gradients over ranks first and finished
  // that (GradReducer::finish): without ZeRO every rank holds the whole sum (all-reduce) and the
  // norm is local; under ZeRO-1 each rank holds the sum of its own shard only (the GradReducer
  // built with shard_offsets()), so the norm is this shard's sum of squares summed over ranks on
  // the host (collective: every rank calls it).
  double global_grad_norm();
  // One update with the given learning rate; gradients are multiplied by grad_scale first
  // (clipping). Under ZeRO-1 (collective) each rank updates its shard and the updated compute
  // copies go from their owners to every rank in rounds, as the updates go on. step() returns with
  // the last rounds of that all-gather still running: the next forward waits for each layer's
  // round only (wait_for_weights), so the gather's tail overlaps it.
  void step(double lr, float grad_scale);
  // Under ZeRO-1, after step(): the backend's later work waits for the all-gather rounds that hold
  // the weights the forward reads next: layer -1 the embedding (before the first layer), 0..L-1 a
  // layer's, L the final norm and head. At L the host also waits for the whole gather, watched by
  // the communicator's watchdog, so a rank lost mid-gather is reported rather than hanging the
  // loss read. LlamaModel::before_forward_weights calls it. A no-op with no gather in flight.
  void wait_for_weights(int layer);
  // Waits (host) for the all-gather in flight, if any: before anything reads the weights other than
  // the forward (checkpoints do, through gather_for_checkpoint). Collective under ZeRO-1.
  void finish_gather();
  // The element offsets of the shards in the flat gradient buffer, world + 1 of them (shard r is
  // [offsets[r], offsets[r+1])); {0, numel} without ZeRO.
  const std::vector<int64_t>& shard_offsets() const { return offsets_; }
  int64_t steps_taken() const { return step_; }
  int64_t state_bytes() const { return state_bytes_; }
  const std::string& kind() const { return kind_; }
  bool sharded() const { return zero_ != nullptr; }
  // The whole state. Under ZeRO-1 every rank must call gather_for_checkpoint() first (collective);
  // rank 0 then holds the whole state and masters.
  void gather_for_checkpoint();
  OptimizerState state() const;
  // fp32 master values of one trainable tensor when this optimizer keeps them (ZeRO-1 on the GPU,
  // after gather_for_checkpoint), false when the model's own master copy has them.
  bool master_values(const ParamSpec& p, std::vector<float>* out) const;
  // UserError when the state is of another kind or size (another optimizer or model shape).
  void restore(const OptimizerState& state, const std::string& source);
  // Under ZeRO-1 on the GPU: the fp32 master of one tensor (a checkpoint's weight), after
  // restore_weights() has set the model's compute copy. No-op otherwise.
  void restore_master(const std::string& name, const std::vector<float>& values);

 private:
  struct Shard {
    size_t first = 0, last = 0;      // specs [first, last)
    int64_t begin = 0, end = 0;      // elements
    int64_t q_begin = 0, q_end = 0;  // 8-bit codes (each tensor padded to whole blocks)
    int64_t b_begin = 0, b_end = 0;  // 8-bit blocks
  };
  Shard shard_of(size_t first, size_t last) const;
  int64_t round_cut(const Shard& s, int64_t round) const;
  bool merged_runs() const;
  Tensor master_view(const ParamSpec& p) const;
  OptimizerState local_state() const;

  Backend& be_;
  ParamGroup& params_;
  std::vector<Shard> shards_;     // one per rank (one in all without ZeRO)
  std::vector<int64_t> offsets_;  // element offsets of the shards, world + 1
  Shard mine_;
  Buffer master_buf_;  // ZeRO-1 on the GPU: fp32 masters of this shard
  Tensor master_;
  OptimizerState gathered_;  // rank 0, after gather_for_checkpoint()
  std::vector<float> gathered_master_;
  std::string kind_;
  float beta1_, beta2_, eps_, weight_decay_;
  Communicator* zero_ = nullptr;
  std::vector<int> key_round_;    // ZeRO-1, per wait_for_weights layer + 1: the last round holding its weights
  std::vector<int> round_marks_;  // the communicator's mark after each round of the gather in flight
  bool gather_pending_ = false;
  int64_t step_ = 0;
  Buffer m_buf_, v_buf_, m_absmax_buf_, v_absmax_buf_;
  Tensor m_, v_, m_absmax_, v_absmax_;
  int64_t state_bytes_ = 0;
};

}  // namespace ranktune
