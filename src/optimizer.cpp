#include "ranktune/optimizer.h"

#include <mpi.h>

#include <algorithm>
#include <cmath>

#include "ranktune/error.h"

namespace ranktune {

namespace {
constexpr int64_t kGatherRounds = 8;  // ZeRO-1: rounds of the weight all-gather per step
}  // namespace

double learning_rate_at(int64_t step, int64_t total_steps, int64_t warmup_steps, double peak,
                        const std::string& schedule) {
  // `step` counts from 0 for the first update, as HF's LambdaLR does.
  if (step < warmup_steps)
    return peak * static_cast<double>(step) / static_cast<double>(std::max<int64_t>(1, warmup_steps));
  if (schedule == "constant") return peak;
  const double progress =
      static_cast<double>(step - warmup_steps) / static_cast<double>(std::max<int64_t>(1, total_steps - warmup_steps));
  if (schedule == "cosine") return peak * std::max(0.0, 0.5 * (1.0 + std::cos(M_PI * progress)));
  return peak * std::max(0.0, 1.0 - progress);  // linear
}

Optimizer::Optimizer(Backend& backend, ParamGroup& params, const TrainingSection& cfg, Communicator* zero)
    : be_(backend),
      params_(params),
      kind_(cfg.optim),
      beta1_(static_cast<float>(cfg.adam_beta1)),
      beta2_(static_cast<float>(cfg.adam_beta2)),
      eps_(static_cast<float>(cfg.adam_epsilon)),
      weight_decay_(static_cast<float>(cfg.weight_decay)),
      zero_(zero != nullptr && zero->world_size() > 1 ? zero : nullptr) {
  const std::vector<ParamSpec>& specs = params.specs;
  for (size_t i = 0; i < specs.size(); ++i)
    RT_ASSERT(specs[i].offset == (i ? specs[i - 1].offset + specs[i - 1].numel : 0), "trainable tensors are packed");
  // Shards: consecutive whole tensors (so one large tensor, the embedding, may make them uneven).
  const int world = zero_ ? zero_->world_size() : 1;
  std::vector<int64_t> sizes;
  for (const ParamSpec& p : specs) sizes.push_back(p.numel);
  const std::vector<size_t> cuts = zero_shard_cuts(sizes, world);
  for (int r = 0; r < world; ++r) {
    shards_.push_back(shard_of(cuts[static_cast<size_t>(r)], cuts[static_cast<size_t>(r) + 1]));
    offsets_.push_back(shards_.back().begin);
  }
  offsets_.push_back(params.numel);
  mine_ = shards_[static_cast<size_t>(zero_ ? zero_->rank() : 0)];

  const int64_t n = mine_.end - mine_.begin;
  if (kind_ == "adamw_8bit") {
    // Each tensor's states start at a block boundary so blocks never straddle two tensors.
    const int64_t padded = mine_.q_end - mine_.q_begin, blocks = mine_.b_end - mine_.b_begin;
    m_buf_ = be_.alloc(static_cast<size_t>(std::max<int64_t>(padded, 1)));
    v_buf_ = be_.alloc(static_cast<size_t>(std::max<int64_t>(padded, 1)));
    m_absmax_buf_ = be_.alloc(static_cast<size_t>(std::max<int64_t>(blocks, 1)) * 4);
    v_absmax_buf_ = be_.alloc(static_cast<size_t>(std::max<int64_t>(blocks, 1)) * 4);
    m_ = m_buf_.as(DType::u8, {padded});
    v_ = v_buf_.as(DType::u8, {padded});
    m_absmax_ = m_absmax_buf_.as(DType::f32, {blocks});
    v_absmax_ = v_absmax_buf_.as(DType::f32, {blocks});
    // Fresh states: every code points at the map's 0.0.
    std::vector<uint8_t> mq(static_cast<size_t>(padded)), vq(static_cast<size_t>(padded));
    adam8bit_init_state(mq.data(), vq.data(), padded);
    if (padded > 0) {
      be_.upload(m_, mq.data());
      be_.upload(v_, vq.data());
    }
    state_bytes_ = 2 * shards_.back().q_end + 8 * shards_.back().b_end;
  } else {
    m_buf_ = be_.alloc(static_cast<size_t>(std::max<int64_t>(n, 1)) * 4);
    v_buf_ = be_.alloc(static_cast<size_t>(std::max<int64_t>(n, 1)) * 4);
    m_ = m_buf_.as(DType::f32, {n});
    v_ = v_buf_.as(DType::f32, {n});
    state_bytes_ = 8 * params.numel;
  }
  // A model built without fp32 masters (ZeRO-1 on the GPU) gets them here, for this shard only,
  // from its compute copy.
  if (params.master.empty()) {
    RT_ASSERT(zero_ != nullptr, "a trainable group without master weights needs ZeRO-1");
    master_buf_ = be_.alloc(static_cast<size_t>(std::max<int64_t>(n, 1)) * 4);
    master_ = master_buf_.as(DType::f32, {n});
    if (n > 0) be_.copy(master_, params.compute.flat_slice(mine_.begin, n));
  }
  if (!zero_) return;
  // Which round of the all-gather each forward wait needs (wait_for_weights): the last round, on
  // any shard, that holds one of its tensors. Tensors of no layer are the embedding when they come
  // before the layers' (read first), else the final norm and head (read last).
  int n_layers = 0;
  int64_t layers_begin = params.numel;
  for (const ParamSpec& p : specs)
    if (p.layer >= 0) n_layers = std::max(n_layers, p.layer + 1), layers_begin = std::min(layers_begin, p.offset);
  key_round_.assign(static_cast<size_t>(n_layers) + 2, -1);
  for (const Shard& s : shards_)
    for (int64_t j = 0; j < kGatherRounds; ++j) {
      const int64_t lo = round_cut(s, j), hi = round_cut(s, j + 1);
      for (size_t i = s.first; i < s.last; ++i) {
        const ParamSpec& p = specs[i];
        if (p.offset >= hi || p.offset + p.numel <= lo) continue;
        const int key = p.layer >= 0 ? p.layer : (p.offset < layers_begin ? -1 : n_layers);
        int& round = key_round_[static_cast<size_t>(key + 1)];
        round = std::max(round, static_cast<int>(j));
      }
    }
}

std::vector<size_t> zero_shard_cuts(const std::vector<int64_t>& tensor_sizes, int world) {
  std::vector<int64_t> offsets{0};
  for (int64_t n : tensor_sizes) offsets.push_back(offsets.back() + n);
  const size_t n_tensors = tensor_sizes.size();
  std::vector<size_t> cuts{0};
  for (int r = 1; r < world; ++r) {
    const int64_t target = offsets.back() * r / world;
    size_t i = cuts.back();
    while (i < n_tensors && offsets[i + 1] <= target) ++i;
    if (i < n_tensors && offsets[i + 1] - target < target - offsets[i]) ++i;
    cuts.push_back(i);
  }
  cuts.push_back(n_tensors);
  return cuts;
}

Optimizer::Shard Optimizer::shard_of(size_t first, size_t last) const {
  const std::vector<ParamSpec>& specs = params_.specs;
  Shard s;
  s.first = first;
  s.last = last;
  s.begin = first < specs.size() ? specs[first].offset : params_.numel;
  s.end = last < specs.size() ? specs[last].offset : params_.numel;
  for (size_t i = 0; i < last; ++i) {
    const int64_t nb = (specs[i].numel + kAdam8BitBlock - 1) / kAdam8BitBlock;
    if (i < first) s.q_begin += nb * kAdam8BitBlock, s.b_begin += nb;
    s.q_end += nb * kAdam8BitBlock;
    s.b_end += nb;
  }
  return s;
}

bool Optimizer::merged_runs() const { return kind_ != "adamw_8bit" && params_.stage_views.empty(); }

// Round j of the all-gather covers elements [round_cut(s, j), round_cut(s, j + 1)) of shard s: the
// j-th fraction of its elements, cut anywhere when fp32 AdamW updates merged runs, else at the next
// tensor start (adamw_8bit's blocks start where its tensors start).
int64_t Optimizer::round_cut(const Shard& s, int64_t round) const {
  const int64_t at = s.begin + (s.end - s.begin) * round / kGatherRounds;
  if (merged_runs() || round == kGatherRounds) return at;
  for (size_t i = s.first; i < s.last; ++i)
    if (params_.specs[i].offset >= at) return params_.specs[i].offset;
  return s.end;
}

Tensor Optimizer::master_view(const ParamSpec& p) const {
  return master_.empty() ? params_.master_view(p) : master_.flat_slice(p.offset - mine_.begin, p.numel);
}

double Optimizer::global_grad_norm() {
  if (!zero_) return std::sqrt(be_.sum_squares(params_.grad));
  // The GradReducer has reduced every piece of this shard to this rank during backward.
  const int64_t n = mine_.end - mine_.begin;
  const double local = n > 0 ? be_.sum_squares(params_.grad.flat_slice(mine_.begin, n)) : 0.0;
  return std::sqrt(zero_->sum(local, "the gradient norm"));
}

void Optimizer::step(double lr, float grad_scale) {
  finish_gather();  // the previous step's, when no forward has waited for it
  ++step_;
  AdamWParams hp;
  hp.lr = static_cast<float>(lr);
  hp.beta1 = beta1_;
  hp.beta2 = beta2_;
  hp.eps = eps_;
  hp.step = step_;
  hp.grad_scale = grad_scale;
  const auto decay_of = [&](const ParamSpec& p) { return p.is_norm ? 0.f : weight_decay_; };  // none on norms
  // fp32 AdamW: adjacent tensors with the same weight decay are one launch over their flat range
  // (the masters, weights, gradients and moments are all laid out by offset), so a step is a few
  // launches (one without weight decay) instead of one per tensor -- ~150 for a full model, many of
  // them norms of a few thousand values, where launches, not bandwidth, set the time.
  int64_t run_begin = 0, run_end = 0;
  const auto flush = [&] {
    if (run_end == run_begin) return;
    const int64_t n = run_end - run_begin, at = run_begin - mine_.begin;
    Tensor master = master_.empty() ? params_.master.flat_slice(run_begin, n) : master_.flat_slice(at, n);
    be_.adamw_step(master, params_.compute.flat_slice(run_begin, n), params_.grad.flat_slice(run_begin, n),
                   m_.flat_slice(at, n), v_.flat_slice(at, n), hp);
    run_begin = run_end;
  };
  const bool merge = merged_runs();
  int64_t q_offset = 0, block_offset = 0;  // adamw_8bit: this shard's codes and blocks so far
  // Updates elements [lo, hi) of tensor p: any part of it when runs merge (fp32 AdamW is
  // elementwise), else the whole tensor (adamw_8bit's blocks start where its tensors start).
  const auto update = [&](const ParamSpec& p, int64_t lo, int64_t hi) {
    if (merge) {
      if (run_end != lo || (run_end > run_begin && hp.weight_decay != decay_of(p))) {
        flush();
        run_begin = run_end = lo;
      }
      hp.weight_decay = decay_of(p);
      run_end = hi;
      return;
    }
    RT_ASSERT(lo == p.offset && hi == p.offset + p.numel, "per-tensor updates take whole tensors");
    hp.weight_decay = decay_of(p);
    Tensor master = master_view(p), compute = params_.compute_view(p), grad = params_.grad_view(p);
    if (kind_ == "adamw_8bit") {
      const int64_t nb = (p.numel + kAdam8BitBlock - 1) / kAdam8BitBlock;
      be_.adamw8bit_step(master, compute, grad, m_.flat_slice(q_offset, p.numel), v_.flat_slice(q_offset, p.numel),
                         m_absmax_.flat_slice(block_offset, nb), v_absmax_.flat_slice(block_offset, nb), hp);
      q_offset += nb * kAdam8BitBlock;
      block_offset += nb;
    } else {
      const int64_t at = p.offset - mine_.begin;
      be_.adamw_step(master, compute, grad, m_.flat_slice(at, p.numel), v_.flat_slice(at, p.numel), hp);
    }
  };
  // This shard's part of the elements [lo, hi), in order, then the last run.
  const auto update_range = [&](int64_t lo, int64_t hi) {
    for (size_t i = mine_.first; i < mine_.last; ++i) {
      const ParamSpec& p = params_.specs[i];
      const int64_t a = std::max(lo, p.offset), b = std::min(hi, p.offset + p.numel);
      if (a < b) update(p, a, b);
    }
    flush();
  };
  if (!zero_) {
    update_range(mine_.begin, mine_.end);
    return;
  }
  // The all-gather of the compute copies, pipelined with the updates in kGatherRounds rounds of
  // about equal size on every shard (round_cut), so each rank's broadcast of a round is one
  // contiguous range, sent while the other ranks send theirs. (Rounds of whole tensors by their
  // start put the 262M-element embedding in one round: its broadcast outlasted the rest of the
  // updates, 1.8 ms per step more on 2 H200s.) Round j updates this rank's part, then broadcasts
  // every shard's part from its owner as one batch (one NCCL group); every rank forms the same
  // batches in the same order, and on the GPU a batch waits, on the communication stream, for the
  // updates queued before it, so it runs while the compute stream updates the next round. The
  // last rounds run on into the next forward, which waits layer by layer (wait_for_weights).
  round_marks_.clear();
  for (int64_t j = 0; j < kGatherRounds; ++j) {
    update_range(round_cut(mine_, j), round_cut(mine_, j + 1));
    std::vector<Communicator::Broadcast> batch;
    for (size_t r = 0; r < shards_.size(); ++r) {
      const int64_t lo = round_cut(shards_[r], j), hi = round_cut(shards_[r], j + 1);
      if (lo < hi) batch.push_back({params_.compute.flat_slice(lo, hi - lo), static_cast<int>(r)});
    }
    zero_->start_broadcasts(batch);
    round_marks_.push_back(zero_->mark());
  }
  gather_pending_ = true;
}

void Optimizer::wait_for_weights(int layer) {
  if (!gather_pending_) return;
  RT_ASSERT(layer >= -1 && static_cast<size_t>(layer + 1) < key_round_.size(), "wait_for_weights: a layer, -1 or L");
  const int round = key_round_[static_cast<size_t>(layer + 1)];
  if (round >= 0)
    zero_->compute_waits_for(round_marks_[static_cast<size_t>(round)],
                             "the weight all-gather of step " + std::to_string(step_));
  if (static_cast<size_t>(layer + 2) == key_round_.size()) finish_gather();
}

void Optimizer::finish_gather() {
  if (!gather_pending_) return;
  zero_->finish_started("the weight all-gather of step " + std::to_string(step_));
  gather_pending_ = false;
}

OptimizerState Optimizer::local_state() const {
  OptimizerState s;
  s.kind = kind_;
  s.step = step_;
  const auto get = [&](auto& host, const Tensor& t) {
    host.resize(static_cast<size_t>(t.numel()));
    if (t.numel() > 0) be_.download(host.data(), t);
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

namespace {

// Every rank's part, concatenated in rank order on rank 0 (MPI_COMM_WORLD; the shards' sizes are
// known to every rank). Counts are in elements, so a shard may hold up to 2^31 - 1 of them.
template <class T>
std::vector<T> gather_parts(const std::vector<T>& mine, const std::vector<int64_t>& sizes, int rank,
                            MPI_Datatype type) {
  std::vector<int> counts, displs;
  int64_t total = 0;
  for (int64_t n : sizes) {
    RT_ASSERT(n < (int64_t{1} << 31) && total < (int64_t{1} << 31), "a ZeRO shard of over 2^31 elements");
    counts.push_back(static_cast<int>(n));
    displs.push_back(static_cast<int>(total));
    total += n;
  }
  std::vector<T> all(rank == 0 ? static_cast<size_t>(total) : 0);
  MPI_Gatherv(mine.data(), static_cast<int>(mine.size()), type, all.data(), counts.data(), displs.data(), type, 0,
              MPI_COMM_WORLD);
  return all;
}

}  // namespace

void Optimizer::gather_for_checkpoint() {
  if (!zero_) return;
  finish_gather();
  const OptimizerState local = local_state();
  std::vector<int64_t> elements, codes, blocks;
  for (const Shard& s : shards_) {
    elements.push_back(s.end - s.begin);
    codes.push_back(s.q_end - s.q_begin);
    blocks.push_back(s.b_end - s.b_begin);
  }
  const int rank = zero_->rank();
  gathered_ = OptimizerState{};
  gathered_.kind = kind_;
  gathered_.step = step_;
  if (kind_ == "adamw_8bit") {
    gathered_.m_codes = gather_parts(local.m_codes, codes, rank, MPI_UINT8_T);
    gathered_.v_codes = gather_parts(local.v_codes, codes, rank, MPI_UINT8_T);
    gathered_.m_absmax = gather_parts(local.m_absmax, blocks, rank, MPI_FLOAT);
    gathered_.v_absmax = gather_parts(local.v_absmax, blocks, rank, MPI_FLOAT);
  } else {
    gathered_.m = gather_parts(local.m, elements, rank, MPI_FLOAT);
    gathered_.v = gather_parts(local.v, elements, rank, MPI_FLOAT);
  }
  if (!master_.empty()) {
    std::vector<float> mine(static_cast<size_t>(master_.numel()));
    if (!mine.empty()) be_.download(mine.data(), master_);
    gathered_master_ = gather_parts(mine, elements, rank, MPI_FLOAT);
  }
}

OptimizerState Optimizer::state() const { return zero_ ? gathered_ : local_state(); }

bool Optimizer::master_values(const ParamSpec& p, std::vector<float>* out) const {
  if (master_.empty()) return false;
  RT_ASSERT(gathered_master_.size() == static_cast<size_t>(params_.numel),
            "gather_for_checkpoint() on every rank first");
  out->assign(gathered_master_.begin() + p.offset, gathered_master_.begin() + p.offset + p.numel);
  return true;
}

void Optimizer::restore(const OptimizerState& s, const std::string& source) {
  RT_REQUIRE(s.kind == kind_, source + ": the checkpoint's optimizer is " + s.kind + ", this run's training.optim is " +
                                  kind_ + ": resume with the same optimizer");
  // The checkpoint holds the whole state; this rank takes its shard of it.
  const auto put = [&](const auto& host, const Tensor& t, int64_t whole, int64_t from, const char* what) {
    RT_REQUIRE(static_cast<int64_t>(host.size()) == whole, source + ": optimizer state " + what + " has " +
                                                               std::to_string(host.size()) +
                                                               " values, this model needs " + std::to_string(whole) +
                                                               ": resume with the same model and LoRA settings");
    if (t.numel() > 0) be_.upload(t, host.data() + from);
  };
  const Shard& all = shards_.back();
  if (kind_ == "adamw_8bit") {
    put(s.m_codes, m_, all.q_end, mine_.q_begin, "m_codes");
    put(s.v_codes, v_, all.q_end, mine_.q_begin, "v_codes");
    put(s.m_absmax, m_absmax_, all.b_end, mine_.b_begin, "m_absmax");
    put(s.v_absmax, v_absmax_, all.b_end, mine_.b_begin, "v_absmax");
  } else {
    put(s.m, m_, params_.numel, mine_.begin, "m");
    put(s.v, v_, params_.numel, mine_.begin, "v");
  }
  step_ = s.step;
}

void Optimizer::restore_master(const std::string& name, const std::vector<float>& values) {
  if (master_.empty()) return;
  for (size_t i = mine_.first; i < mine_.last; ++i)
    if (params_.specs[i].name == name) be_.upload(master_view(params_.specs[i]), values.data());
}

}  // namespace ranktune
