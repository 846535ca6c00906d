#include "ranktune/optimizer.h"

#include <cmath>

#include "ranktune/error.h"

namespace ranktune {

double learning_rate_at(int64_t step, int64_t total_steps, int64_t warmup_steps, double peak,
                        const std::string& schedule) {
  // `step` counts from 0 for the first update, as HF's LambdaLR does.
  if (step < warmup_steps) return peak * static_cast<double>(step) / static_cast<double>(std::max<int64_t>(1, warmup_steps));
  if (schedule == "constant") return peak;
  const double progress = static_cast<double>(step - warmup_steps) /
                          static_cast<double>(std::max<int64_t>(1, total_steps - warmup_steps));
  if (schedule == "cosine") return peak * std::max(0.0, 0.5 * (1.0 + std::cos(M_PI * progress)));
  return peak * std::max(0.0, 1.0 - progress);  // linear
}

Optimizer::Optimizer(Backend& backend, ParamGroup& params, const TrainingSection& cfg)
    : be_(backend),
      params_(params),
      kind_(cfg.optim),
      beta1_(static_cast<float>(cfg.adam_beta1)),
      beta2_(static_cast<float>(cfg.adam_beta2)),
      eps_(static_cast<float>(cfg.adam_epsilon)),
      weight_decay_(static_cast<float>(cfg.weight_decay)) {
  const int64_t n = params.numel;
  if (kind_ == "adamw_8bit") {
    // Each tensor's states start at a block boundary so blocks never straddle two tensors.
    int64_t padded = 0, blocks = 0;
    for (const auto& p : params.specs) {
      const int64_t nb = (p.numel + kAdam8BitBlock - 1) / kAdam8BitBlock;
      padded += nb * kAdam8BitBlock;
      blocks += nb;
    }
    m_buf_ = be_.alloc(static_cast<size_t>(padded));
    v_buf_ = be_.alloc(static_cast<size_t>(padded));
    m_absmax_buf_ = be_.alloc(static_cast<size_t>(blocks) * 4);
    v_absmax_buf_ = be_.alloc(static_cast<size_t>(blocks) * 4);
    m_ = m_buf_.as(DType::u8, {padded});
    v_ = v_buf_.as(DType::u8, {padded});
    m_absmax_ = m_absmax_buf_.as(DType::f32, {blocks});
    v_absmax_ = v_absmax_buf_.as(DType::f32, {blocks});
    // Fresh states: every code points at the map's 0.0.
    std::vector<uint8_t> mq(static_cast<size_t>(padded)), vq(static_cast<size_t>(padded));
    adam8bit_init_state(mq.data(), vq.data(), padded);
    be_.upload(m_, mq.data());
    be_.upload(v_, vq.data());
    state_bytes_ = 2 * padded + 8 * blocks;
  } else {
    m_buf_ = be_.alloc(static_cast<size_t>(n) * 4);
    v_buf_ = be_.alloc(static_cast<size_t>(n) * 4);
    m_ = m_buf_.as(DType::f32, {n});
    v_ = v_buf_.as(DType::f32, {n});
    state_bytes_ = 8 * n;
  }
}

void Optimizer::step(double lr, float grad_scale) {
  ++step_;
  int64_t q_offset = 0, block_offset = 0;
  for (const auto& p : params_.specs) {
    AdamWParams hp;
    hp.lr = static_cast<float>(lr);
    hp.beta1 = beta1_;
    hp.beta2 = beta2_;
    hp.eps = eps_;
    hp.weight_decay = p.is_norm ? 0.f : weight_decay_;  // no decay on norms
    hp.step = step_;
    hp.grad_scale = grad_scale;
    Tensor master = params_.master_view(p), compute = params_.compute_view(p), grad = params_.grad_view(p);
    if (kind_ == "adamw_8bit") {
      const int64_t nb = (p.numel + kAdam8BitBlock - 1) / kAdam8BitBlock;
      be_.adamw8bit_step(master, compute, grad, m_.flat_slice(q_offset, p.numel), v_.flat_slice(q_offset, p.numel),
                         m_absmax_.flat_slice(block_offset, nb), v_absmax_.flat_slice(block_offset, nb), hp);
      q_offset += nb * kAdam8BitBlock;
      block_offset += nb;
    } else {
      be_.adamw_step(master, compute, grad, m_.flat_slice(p.offset, p.numel), v_.flat_slice(p.offset, p.numel), hp);
    }
  }
}

OptimizerState Optimizer::state() const {
  OptimizerState s;
  s.kind = kind_;
  s.step = step_;
  const auto get = [&](auto& host, const Tensor& t) {
    host.resize(static_cast<size_t>(t.numel()));
    be_.download(host.data(), t);
  };
  if (kind_ == "adamw_8bit") {
    get(s.m_codes, m_);
    get(s.v_codes, v_);
    get(s.m_absmax, m_absmax_);
    get(s.v_absmax, v_absmax_);
  } else {
    get(s.m, m_);
    get(s.v, v_);
  }
  return s;
}

void Optimizer::restore(const OptimizerState& s, const std::string& source) {
  RT_REQUIRE(s.kind == kind_, source + ": the checkpoint's optimizer is " + s.kind + ", this run's training.optim is " +
                                  kind_ + ": resume with the same optimizer");
  const auto put = [&](const auto& host, const Tensor& t, const char* what) {
    RT_REQUIRE(static_cast<int64_t>(host.size()) == t.numel(),
               source + ": optimizer state " + what + " has " + std::to_string(host.size()) + " values, this model needs " +
                   std::to_string(t.numel()) + ": resume with the same model and LoRA settings");
    be_.upload(t, host.data());
  };
  if (kind_ == "adamw_8bit") {
    put(s.m_codes, m_, "m_codes");
    put(s.v_codes, v_, "v_codes");
    put(s.m_absmax, m_absmax_, "m_absmax");
    put(s.v_absmax, v_absmax_, "v_absmax");
  } else {
    put(s.m, m_, "m");
    put(s.v, v_, "v");
  }
  step_ = s.step;
}

}  // namespace ranktune
