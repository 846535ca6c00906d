#include "profiling_backend.h"

#include <algorithm>
#include <utility>

namespace ranktune::bench {

ProfilingBackend::ProfilingBackend(Backend& inner, int64_t vocab, int64_t lora_r)
    : inner_(inner),
      stream_(static_cast<cudaStream_t>(inner.native_stream())),
      vocab_(vocab),
      lora_r_(lora_r) {
  if (inner.device() != Device::cuda) {
    std::fprintf(stderr, "ProfilingBackend: times CUDA events, so it needs a CUDA backend (got %s)\n",
                 inner.name().c_str());
    std::exit(2);
  }
}

ProfilingBackend::~ProfilingBackend() {
  for (cudaEvent_t e : events_) cudaEventDestroy(e);
}

cudaEvent_t ProfilingBackend::next_event() {
  if (events_used_ == events_.size()) {
    cudaEvent_t e = nullptr;
    BENCH_CUDA_CHECK(cudaEventCreate(&e));
    events_.push_back(e);
  }
  return events_[events_used_++];
}

int ProfilingBackend::op_index(const std::string& op) {
  auto [it, inserted] = index_.try_emplace(op, static_cast<int>(totals_.size()));
  if (inserted) totals_.push_back(Total{op, 0, 0, 0});
  return it->second;
}

template <class Fn>
void ProfilingBackend::timed(const std::string& op, double flop, Fn&& fn) {
  if (!recording_) {
    fn();
    return;
  }
  const size_t start = events_used_;
  BENCH_CUDA_CHECK(cudaEventRecord(next_event(), stream_));
  fn();
  BENCH_CUDA_CHECK(cudaEventRecord(next_event(), stream_));
  pending_.push_back(Pending{op_index(op), flop, start});
}

void ProfilingBackend::end_step() {
  if (events_used_ == 0) return;
  BENCH_CUDA_CHECK(cudaEventSynchronize(events_[events_used_ - 1]));
  for (const Pending& p : pending_) {
    float ms = 0;
    BENCH_CUDA_CHECK(cudaEventElapsedTime(&ms, events_[p.start], events_[p.start + 1]));
    Total& t = totals_[static_cast<size_t>(p.op)];
    t.calls += 1;
    t.ms += ms;
    t.flop += p.flop;
  }
  for (size_t i = 1; i < pending_.size(); ++i) {
    float idle = 0;  // previous op's end event to this op's start event
    BENCH_CUDA_CHECK(cudaEventElapsedTime(&idle, events_[pending_[i - 1].start + 1], events_[pending_[i].start]));
    if (idle <= 0) continue;
    const std::string key =
        totals_[static_cast<size_t>(pending_[i - 1].op)].op + " -> " + totals_[static_cast<size_t>(pending_[i].op)].op;
    Total& g = gaps_.try_emplace(key, Total{key, 0, 0, 0}).first->second;
    g.calls += 1;
    g.ms += idle;
  }
  float span = 0;
  BENCH_CUDA_CHECK(cudaEventElapsedTime(&span, events_.front(), events_[events_used_ - 1]));
  span_ms_ += span;
  ++steps_;
  pending_.clear();
  events_used_ = 0;
}

std::vector<ProfileRow> ProfilingBackend::rows() const {
  std::vector<ProfileRow> out;
  const double n = steps_ ? steps_ : 1;
  for (const Total& t : totals_)
    if (t.calls) out.push_back(ProfileRow{t.op, t.calls / n, t.ms / n, t.flop / n / 1e9});
  std::sort(out.begin(), out.end(), [](const ProfileRow& a, const ProfileRow& b) { return a.ms > b.ms; });
  return out;
}

std::vector<ProfileRow> ProfilingBackend::gaps(size_t top) const {
  std::vector<ProfileRow> out;
  const double n = steps_ ? steps_ : 1;
  for (const auto& [key, g] : gaps_) out.push_back(ProfileRow{key, g.calls / n, g.ms / n, 0});
  std::sort(out.begin(), out.end(), [](const ProfileRow& a, const ProfileRow& b) { return a.ms > b.ms; });
  if (out.size() > top) out.resize(top);
  return out;
}

// A GEMM's name says its role and which weights it belongs to. The model's GEMMs are y = x W^T
// (forward: trans_b), dx = dy W (data gradient: no transposes) and dW = dy^T x (weight gradient:
// trans_a, f32 out into the gradient slot); recompute under checkpointing counts as forward.
std::string ProfilingBackend::gemm_name(const Tensor& out, int64_t m, int64_t n, int64_t k, bool trans_a,
                                        bool trans_b) const {
  const char* role = !trans_a ? (trans_b ? "fwd" : "dgrad") : (trans_b ? "a^T b^T" : "wgrad");
  const char* part = "layers";
  if (vocab_ > 0 && (m == vocab_ || n == vocab_ || k == vocab_)) part = "lm_head";
  else if (lora_r_ > 0 && std::min({m, n, k}) <= 3 * lora_r_ && std::min({m, n, k}) % lora_r_ == 0)
    part = "lora";  // one adapter (r) or a fused projection's stacked A (2r: gate, up; 3r: q, k, v)
  std::string name = std::string("matmul ") + role + " " + part;
  if (out.dtype == DType::f32) name += " (f32 out)";
  return name;
}

// ---- forwarded ops --------------------------------------------------------------------------------

void ProfilingBackend::upload(Tensor dst, const void* host) {
  timed("upload (host to device)", 0, [&] { inner_.upload(dst, host); });
}
void ProfilingBackend::download(void* host, Tensor src) {
  timed("download (device to host)", 0, [&] { inner_.download(host, src); });
}
void ProfilingBackend::copy(Tensor dst, Tensor src) {
  timed(dst.dtype == src.dtype ? "copy" : "copy (dtype cast)", 0, [&] { inner_.copy(dst, src); });
}
void ProfilingBackend::copy_batch(const std::vector<std::pair<Tensor, Tensor>>& dst_src) {
  timed("copy batch (LoRA B into the fused weights)", 0, [&] { inner_.copy_batch(dst_src); });
}
void ProfilingBackend::fill(Tensor dst, float value) {
  timed("fill", 0, [&] { inner_.fill(dst, value); });
}
void ProfilingBackend::scale(Tensor x, float s) {
  timed("scale", 0, [&] { inner_.scale(x, s); });
}
void ProfilingBackend::add(Tensor y, Tensor x) {
  timed("add", 0, [&] { inner_.add(y, x); });
}
double ProfilingBackend::sum_squares(Tensor x) {
  double r = 0;
  timed("sum_squares (grad norm)", 0, [&] { r = inner_.sum_squares(x); });
  return r;
}
void ProfilingBackend::dropout(Tensor out, Tensor in, float p, uint64_t seed) {
  timed("dropout", 0, [&] { inner_.dropout(out, in, p, seed); });
}
void ProfilingBackend::embedding_forward(Tensor out, Tensor tokens, Tensor table) {
  timed("embedding fwd", 0, [&] { inner_.embedding_forward(out, tokens, table); });
}
void ProfilingBackend::embedding_backward(Tensor dtable, Tensor dout, Tensor tokens, float beta) {
  timed("embedding bwd", 0, [&] { inner_.embedding_backward(dtable, dout, tokens, beta); });
}
void ProfilingBackend::residual_rmsnorm_forward(Tensor residual_out, Tensor norm_out, Tensor rstd,
                                                Tensor residual_in, Tensor delta, Tensor weight, float eps) {
  timed(delta.empty() ? "rmsnorm fwd" : "residual+rmsnorm fwd", 0,
        [&] { inner_.residual_rmsnorm_forward(residual_out, norm_out, rstd, residual_in, delta, weight, eps); });
}
void ProfilingBackend::rmsnorm_backward(Tensor dresidual, Tensor dweight, float dweight_beta, Tensor dnorm,
                                        Tensor x, Tensor weight, Tensor rstd) {
  timed("rmsnorm bwd", 0,
        [&] { inner_.rmsnorm_backward(dresidual, dweight, dweight_beta, dnorm, x, weight, rstd); });
}
void ProfilingBackend::matmul(Tensor out, Tensor a, Tensor b, bool trans_a, bool trans_b, float alpha,
                              float beta) {
  if (!recording_) {
    inner_.matmul(out, a, b, trans_a, trans_b, alpha, beta);
    return;
  }
  const int64_t m = out.rows(), n = out.cols(), k = trans_a ? a.rows() : a.cols();
  timed(gemm_name(out, m, n, k, trans_a, trans_b), 2.0 * static_cast<double>(m) * static_cast<double>(n) *
                                                       static_cast<double>(k),
        [&] { inner_.matmul(out, a, b, trans_a, trans_b, alpha, beta); });
}
void ProfilingBackend::rope_forward(Tensor x, Tensor positions, Tensor cos, Tensor sin, int64_t head_dim) {
  timed("rope fwd", 0, [&] { inner_.rope_forward(x, positions, cos, sin, head_dim); });
}
void ProfilingBackend::rope_backward(Tensor dx, Tensor positions, Tensor cos, Tensor sin, int64_t head_dim) {
  timed("rope bwd", 0, [&] { inner_.rope_backward(dx, positions, cos, sin, head_dim); });
}

namespace {
// Causal attention's forward FLOPs (QK^T and PV over the lower triangle), as bench_ops counts them;
// the backward is 2.5x (five GEMMs to the forward's two).
double attention_flop(const AttnShape& s) {
  return 2.0 * static_cast<double>(s.batch) * static_cast<double>(s.n_heads) * static_cast<double>(s.seq_len) *
         static_cast<double>(s.seq_len) * static_cast<double>(s.head_dim);
}
}  // namespace

void ProfilingBackend::attention_forward(Tensor out, Tensor lse, Tensor q, Tensor k, Tensor v, Tensor doc_ids,
                                         const AttnShape& shape) {
  timed("attention fwd", attention_flop(shape),
        [&] { inner_.attention_forward(out, lse, q, k, v, doc_ids, shape); });
}
void ProfilingBackend::attention_backward(Tensor dq, Tensor dk, Tensor dv, Tensor dout, Tensor out, Tensor lse,
                                          Tensor q, Tensor k, Tensor v, Tensor doc_ids, const AttnShape& shape) {
  timed("attention bwd", 2.5 * attention_flop(shape),
        [&] { inner_.attention_backward(dq, dk, dv, dout, out, lse, q, k, v, doc_ids, shape); });
}
void ProfilingBackend::attention_decode(Tensor out, Tensor q, Tensor k_cache, Tensor v_cache, int64_t n_keys,
                                        const AttnShape& shape) {
  timed("attention decode", 0, [&] { inner_.attention_decode(out, q, k_cache, v_cache, n_keys, shape); });
}
void ProfilingBackend::swiglu_forward(Tensor h, Tensor gate, Tensor up) {
  timed("swiglu fwd", 0, [&] { inner_.swiglu_forward(h, gate, up); });
}
void ProfilingBackend::swiglu_backward(Tensor dgate, Tensor dup, Tensor dh, Tensor gate, Tensor up, Tensor h) {
  timed(h.empty() ? "swiglu bwd" : "swiglu bwd (and h)", 0,
        [&] { inner_.swiglu_backward(dgate, dup, dh, gate, up, h); });
}
void ProfilingBackend::cross_entropy(Tensor losses, Tensor dlogits, Tensor logits, Tensor targets,
                                     float grad_scale) {
  timed(dlogits.empty() ? "cross-entropy (loss only)" : "cross-entropy (loss and dlogits)", 0,
        [&] { inner_.cross_entropy(losses, dlogits, logits, targets, grad_scale); });
}
void ProfilingBackend::adamw_step(Tensor master, Tensor compute, Tensor grad, Tensor m, Tensor v,
                                  const AdamWParams& p) {
  timed("adamw", 0, [&] { inner_.adamw_step(master, compute, grad, m, v, p); });
}
void ProfilingBackend::nf4_dequantize(Tensor out, const Nf4Weight& w) {
  timed("nf4 dequantize", 0, [&] { inner_.nf4_dequantize(out, w); });
}

void ProfilingBackend::adamw8bit_step(Tensor master, Tensor compute, Tensor grad, Tensor m_q, Tensor v_q,
                                      Tensor m_absmax, Tensor v_absmax, const AdamWParams& p) {
  timed("adamw 8-bit", 0, [&] { inner_.adamw8bit_step(master, compute, grad, m_q, v_q, m_absmax, v_absmax, p); });
}

}  // namespace ranktune::bench
