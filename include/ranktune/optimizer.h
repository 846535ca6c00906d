// The optimizer step over the trainable parameter group: AdamW with fp32 states, or blockwise
// 8-bit states (adamw_8bit), one fused backend launch per tensor; and the learning-rate schedule.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "ranktune/backend.h"
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

class Optimizer {
 public:
  Optimizer(Backend& backend, ParamGroup& params, const TrainingSection& cfg);
  // One update with the given learning rate; gradients are multiplied by grad_scale first (clipping).
  void step(double lr, float grad_scale);
  int64_t steps_taken() const { return step_; }
  int64_t state_bytes() const { return state_bytes_; }
  const std::string& kind() const { return kind_; }
  OptimizerState state() const;
  // UserError when the state is of another kind or size (another optimizer or model shape).
  void restore(const OptimizerState& state, const std::string& source);

 private:
  Backend& be_;
  ParamGroup& params_;
  std::string kind_;
  float beta1_, beta2_, eps_, weight_decay_;
  int64_t step_ = 0;
  Buffer m_buf_, v_buf_, m_absmax_buf_, v_absmax_buf_;
  Tensor m_, v_, m_absmax_, v_absmax_;
  int64_t state_bytes_ = 0;
};

}  // namespace ranktune
