// Where a training step's GPU time goes, op by op: a Backend that forwards every call to another
// backend and brackets each op with a pair of CUDA events on that backend's stream. The model and
// optimizer take a Backend&, so the profiler slots in without changing them. Benchmark tool only
// (compiled into ranktune_bench_step, not the library).
//
// Timing with events, not host clocks: the GPU runs behind the host, so only events recorded on
// the op's own stream see when the op itself started and finished. Recording two events per op
// costs the host a few microseconds per op, so a profiled step runs slower than an unprofiled one;
// benchmark figures come from separate, unprofiled runs.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <unordered_map>
#include <vector>

#include "ranktune/backend.h"

// Every CUDA runtime call of the benchmark tools goes through this: a failure names the file and line.
#define BENCH_CUDA_CHECK(call) ::ranktune::bench::cuda_check((call), #call, __FILE__, __LINE__)

namespace ranktune::bench {

inline void cuda_check(cudaError_t err, const char* call, const char* file, int line) {
  if (err == cudaSuccess) return;
  std::fprintf(stderr, "%s:%d: %s failed: %s\n", file, line, call, cudaGetErrorString(err));
  std::exit(1);
}

struct ProfileRow {
  std::string op;
  double calls = 0;  // per step
  double ms = 0;     // GPU time per step
  double gflop = 0;  // per step, for GEMMs and attention (0 for memory-bound ops)
};

class ProfilingBackend final : public Backend {
 public:
  // vocab and lora_r only name the GEMMs: one with a dimension equal to the vocabulary is the LM
  // head's, one with a dimension equal to the LoRA rank (0 = no LoRA) an adapter's.
  ProfilingBackend(Backend& inner, int64_t vocab, int64_t lora_r);
  ~ProfilingBackend() override;
  ProfilingBackend(const ProfilingBackend&) = delete;
  ProfilingBackend& operator=(const ProfilingBackend&) = delete;

  // While off (the start), ops pass straight through and nothing is recorded.
  void set_recording(bool on) { recording_ = on; }
  // Waits for the step's ops, adds each op's elapsed time to its row; call after every recorded step.
  void end_step();
  int steps() const { return steps_; }
  // Per-step averages over the recorded steps, longest first.
  std::vector<ProfileRow> rows() const;
  // First op's start to last op's end, per step: the ops' sum plus the GPU's idle gaps between them.
  double gpu_span_ms() const { return steps_ ? span_ms_ / steps_ : 0; }
  // Where the GPU idles: per-step time between the end of one op and the start of the next, by the
  // pair's names ("a -> b"), longest first, at most `top` of them.
  std::vector<ProfileRow> gaps(size_t top) const;

  // ---- Backend: every call forwarded ----
  Device device() const override { return inner_.device(); }
  DType act_dtype() const override { return inner_.act_dtype(); }
  std::string name() const override { return inner_.name(); }
  int device_index() const override { return inner_.device_index(); }
  void* native_stream() const override { return inner_.native_stream(); }
  void wait_for(Backend& other) override { inner_.wait_for(other); }
  void* record_point() override { return inner_.record_point(); }
  Buffer alloc(size_t bytes) override { return inner_.alloc(bytes); }
  void synchronize() override { inner_.synchronize(); }

  void upload(Tensor dst, const void* host) override;
  void download(void* host, Tensor src) override;
  void copy(Tensor dst, Tensor src) override;
  void copy_batch(const std::vector<std::pair<Tensor, Tensor>>& dst_src) override;
  void fill(Tensor dst, float value) override;
  void scale(Tensor x, float s) override;
  void add(Tensor y, Tensor x) override;
  double sum_squares(Tensor x) override;
  void dropout(Tensor out, Tensor in, float p, uint64_t seed) override;
  void embedding_forward(Tensor out, Tensor tokens, Tensor table) override;
  void embedding_backward(Tensor dtable, Tensor dout, Tensor tokens, float beta) override;
  void residual_rmsnorm_forward(Tensor residual_out, Tensor norm_out, Tensor rstd, Tensor residual_in,
                                Tensor delta, Tensor weight, float eps) override;
  void rmsnorm_backward(Tensor dresidual, Tensor dweight, float dweight_beta, Tensor dnorm, Tensor x,
                        Tensor weight, Tensor rstd) override;
  void matmul(Tensor out, Tensor a, Tensor b, bool trans_a, bool trans_b, float alpha, float beta) override;
  void rope_forward(Tensor x, Tensor positions, Tensor cos, Tensor sin, int64_t head_dim) override;
  void rope_backward(Tensor dx, Tensor positions, Tensor cos, Tensor sin, int64_t head_dim) override;
  void attention_forward(Tensor out, Tensor lse, Tensor q, Tensor k, Tensor v, Tensor doc_ids,
                         const AttnShape& shape) override;
  void attention_backward(Tensor dq, Tensor dk, Tensor dv, Tensor dout, Tensor out, Tensor lse, Tensor q,
                          Tensor k, Tensor v, Tensor doc_ids, const AttnShape& shape) override;
  void attention_decode(Tensor out, Tensor q, Tensor k_cache, Tensor v_cache, int64_t n_keys,
                        const AttnShape& shape) override;
  void swiglu_forward(Tensor h, Tensor gate, Tensor up) override;
  void swiglu_backward(Tensor dgate, Tensor dup, Tensor dh, Tensor gate, Tensor up, Tensor h) override;
  void cross_entropy(Tensor losses, Tensor dlogits, Tensor logits, Tensor targets, float grad_scale) override;
  void adamw_step(Tensor master, Tensor compute, Tensor grad, Tensor m, Tensor v, const AdamWParams& p) override;
  void nf4_dequantize(Tensor out, const Nf4Weight& w) override;
  // Copies on the inner backend's copy stream overlap compute: not timed as ops.
  int copy_to_host_async(Tensor host_dst, Tensor src) override { return inner_.copy_to_host_async(host_dst, src); }
  int copy_to_device_async(Tensor dst, Tensor host_src) override {
    return inner_.copy_to_device_async(dst, host_src);
  }
  void wait_copy(int ticket) override { inner_.wait_copy(ticket); }
  void adamw8bit_step(Tensor master, Tensor compute, Tensor grad, Tensor m_q, Tensor v_q, Tensor m_absmax,
                      Tensor v_absmax, const AdamWParams& p) override;

 private:
  struct Pending {
    int op;        // index into totals_
    double flop;
    size_t start;  // events_[start] and events_[start + 1]
  };
  struct Total {
    std::string op;
    int64_t calls = 0;
    double ms = 0, flop = 0;
  };
  // Records a start event, runs fn, records an end event: the op's GPU time is between the two.
  template <class Fn>
  void timed(const std::string& op, double flop, Fn&& fn);
  int op_index(const std::string& op);
  cudaEvent_t next_event();
  std::string gemm_name(const Tensor& out, int64_t m, int64_t n, int64_t k, bool trans_a, bool trans_b) const;

  Backend& inner_;
  cudaStream_t stream_;
  int64_t vocab_, lora_r_;
  bool recording_ = false;
  std::vector<cudaEvent_t> events_;  // pool, reused every step
  size_t events_used_ = 0;
  std::vector<Pending> pending_;
  std::vector<Total> totals_;
  std::unordered_map<std::string, int> index_;
  std::unordered_map<std::string, Total> gaps_;  // by "previous op -> next op"
  int steps_ = 0;
  double span_ms_ = 0;
};

}  // namespace ranktune::bench
