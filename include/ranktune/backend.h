// The ops the model is made of, behind one interface with two implementations:
//   CpuBackend  (src/cpu_backend.cpp): fp32 plain loops with OpenMP, the oracle in tests;
//   CudaBackend (src/cuda_backend.cu): bf16 activations, fp32 accumulation, cuBLAS(Lt) GEMMs and our
//                                      kernels in kernels/.
// The model (src/model.cpp) is written once against this interface.
//
// Conventions, shared by both backends:
//  * Matrices are row-major 2-D Tensor views; a view may have row_stride > cols (a column slice).
//  * "act" tensors have the backend's activation dtype (f32 on CPU, bf16 on GPU); gradients of
//    trainable weights, rstd, lse, logits and losses are always f32; token ids/targets/positions i32.
//  * N = B*T rows (token positions), C = hidden size, H = heads, Hkv = kv heads, D = head_dim.
//  * Every op is deterministic: the same inputs give bitwise the same outputs (no order-dependent
//    atomics), which is what makes recompute-based checkpointing bitwise exact.
#pragma once
#include <cstdint>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "ranktune/tensor.h"

namespace ranktune {

struct AttnShape {
  int64_t batch = 0;     // B
  int64_t seq_len = 0;   // T
  int64_t n_heads = 0;   // H
  int64_t n_kv_heads = 0;  // Hkv, divides H (grouped-query attention)
  int64_t head_dim = 0;  // D
  float scale = 0.f;     // softmax scale, 1/sqrt(D)
};

struct AdamWParams {
  float lr = 0.f;
  float beta1 = 0.9f;
  float beta2 = 0.999f;
  float eps = 1e-8f;
  float weight_decay = 0.f;  // decoupled (AdamW): p -= lr * wd * p
  int64_t step = 1;          // 1-based, for bias correction
  float grad_scale = 1.f;    // multiplies the gradient first (clipping)
};

// A frozen linear weight quantized to NF4 (QLoRA), its arrays on the backend's device; the format
// (bitsandbytes') is described in include/ranktune/nf4.h.
struct Nf4Weight {
  Tensor packed;         // u8 [ceil(numel/2)], element 2j in the high nibble of byte j
  Tensor absmax_codes;   // u8 [n_blocks] (double quantization), or empty
  Tensor nested_absmax;  // f32 [ceil(n_blocks/256)]
  Tensor nested_map;     // f32 [256]
  Tensor absmax;         // f32 [n_blocks] when not double-quantized
  float offset = 0.f;
  int64_t numel = 0;
};

// Block size of the 8-bit optimizer states (bitsandbytes' blockwise quantization).
inline constexpr int64_t kAdam8BitBlock = 2048;

class Backend {
 public:
  virtual ~Backend() = default;
  virtual Device device() const = 0;
  virtual DType act_dtype() const = 0;
  virtual std::string name() const = 0;  // "cpu" or "cuda:N (<GPU name>)"
  // The CUDA device and stream (a cudaStream_t) every op of this backend runs on, for the code
  // that orders other work after it (NCCL on a communication stream); -1 and null on the CPU.
  virtual int device_index() const { return -1; }
  virtual void* native_stream() const { return nullptr; }
  // Work queued on this backend from now on waits for the work queued so far on `other` (a
  // backend of another GPU of the same process: device_map auto). No-op on the CPU.
  virtual void wait_for(Backend& other) { (void)other; }
  // A point after the work queued so far on this backend (a cudaEvent_t of its GPU, recorded on its
  // stream), for another backend's wait_for; null on the CPU.
  virtual void* record_point() { return nullptr; }

  // ---- memory -------------------------------------------------------------------------------
  virtual Buffer alloc(size_t bytes) = 0;                  // zero-filled
  // Host data is contiguous; the device tensor may be a 2-D strided view (a padded weight).
  virtual void upload(Tensor dst, const void* host) = 0;   // dst.rows() x dst.cols() values
  virtual void download(void* host, Tensor src) = 0;       // synchronizes
  virtual void copy(Tensor dst, Tensor src) = 0;           // dtype conversion allowed between f32 and
                                                           // bf16; 2-D strided ok; on the GPU src may
                                                           // be on a peer GPU (device_map auto)
  // copy(dst, src) for every pair, same dtype: on the GPU many small bf16 copies in one launch.
  virtual void copy_batch(const std::vector<std::pair<Tensor, Tensor>>& dst_src) {
    for (const auto& [dst, src] : dst_src) copy(dst, src);
  }
  virtual void fill(Tensor dst, float value) = 0;
  virtual void synchronize() = 0;

  // ---- offloaded checkpoints (gradient_checkpointing: offload) ---------------------------------
  // Copies between device memory and pinned host memory (Buffer::pinned_host) on a copy stream of
  // their own, so they overlap the compute stream: each starts once the work queued so far is done
  // (it wrote the source, or finished reading the old destination) and returns a ticket;
  // wait_copy(ticket) makes later work wait for that copy. Contiguous, same dtype. The CPU copies
  // at once.
  virtual int copy_to_host_async(Tensor host_dst, Tensor src) = 0;
  virtual int copy_to_device_async(Tensor dst, Tensor host_src) = 0;
  virtual void wait_copy(int ticket) = 0;

  // ---- elementwise / reductions ------------------------------------------------------------
  // x *= s (f32 or act)
  virtual void scale(Tensor x, float s) = 0;
  // y += x, elementwise over 2-D views of the same shape and dtype (strided ok).
  virtual void add(Tensor y, Tensor x) = 0;
  // Sum of squares of an f32 tensor, accumulated in double, deterministic. Synchronizes.
  virtual double sum_squares(Tensor x) = 0;
  // Inverted dropout with a counter-based RNG: out[i] = keep(seed, i) ? in[i] / (1-p) : 0, where
  // keep() is dropout_keep() below, so the CPU and the GPU drop the same elements and a recompute
  // (or the backward pass, applying the same op to the gradient) sees the same mask. 2-D views.
  virtual void dropout(Tensor out, Tensor in, float p, uint64_t seed) = 0;

  // ---- embedding ----------------------------------------------------------------------------
  // out[n,:] = table[tokens[n],:]     out [N,C] act, tokens [N] i32, table [V,C] act
  virtual void embedding_forward(Tensor out, Tensor tokens, Tensor table) = 0;
  // dtable = beta*dtable; then dtable[tokens[n],:] += dout[n,:], summed in order of n for each
  // row (deterministic).  dtable [V,C] f32, dout [N,C] act.
  virtual void embedding_backward(Tensor dtable, Tensor dout, Tensor tokens, float beta) = 0;

  // ---- RMSNorm fused with the residual add ---------------------------------------------------
  // If delta is non-empty: residual_out = residual_in + delta (act), x = residual_out.
  // Else x = residual_in and residual_out is ignored.
  // rstd[n] = 1/sqrt(mean(x[n,:]^2) + eps);  norm_out[n,:] = x[n,:] * rstd[n] * weight[:]
  // residual_* [N,C] act, norm_out [N,C] act, rstd [N] f32, weight [C] act.
  virtual void residual_rmsnorm_forward(Tensor residual_out, Tensor norm_out, Tensor rstd,
                                        Tensor residual_in, Tensor delta, Tensor weight,
                                        float eps) = 0;
  // Gradient of norm_out = rmsnorm(x) * weight.  dx is ACCUMULATED into dresidual [N,C] act.
  // If dweight [C] f32 is non-empty: dweight = dweight_beta*dweight + sum_n dnorm*x*rstd.
  virtual void rmsnorm_backward(Tensor dresidual, Tensor dweight, float dweight_beta,
                                Tensor dnorm, Tensor x, Tensor weight, Tensor rstd) = 0;

  // ---- GEMM ----------------------------------------------------------------------------------
  // out = alpha * op(a) @ op(b) + beta * out, op(m) = m^T if trans.  out [M,N]; a, b act; out act
  // or f32. With beta == 0, out is not read (may hold garbage/NaN).
  virtual void matmul(Tensor out, Tensor a, Tensor b, bool trans_a, bool trans_b, float alpha,
                      float beta) = 0;

  // ---- rotary position embedding (HF rotate_half convention: pairs (i, i + D/2)) ----------------
  // x: [N, nh*D] view (strided ok), rotated in place for each of its nh heads by the angle of
  // positions[n]: x1' = x1*cos - x2*sin, x2' = x2*cos + x1*sin.  cos/sin [max_pos, D/2] f32.
  virtual void rope_forward(Tensor x, Tensor positions, Tensor cos, Tensor sin, int64_t head_dim) = 0;
  // The transpose (rotation by -angle), in place on the gradient.
  virtual void rope_backward(Tensor dx, Tensor positions, Tensor cos, Tensor sin,
                             int64_t head_dim) = 0;

  // ---- attention: causal, grouped-query, flash-style on the GPU (no T x T in memory) ----------
  // q [N, H*D], k/v [N, Hkv*D] (strided views of the fused qkv output); rows are (b, t) with
  // t fastest. out [N, H*D] act; lse [B, H, T] f32 (log-sum-exp of the scaled scores, natural log).
  // doc_ids, if non-empty ([N] i32), further restricts attention to keys with the same doc id
  // (packed sequences).
  virtual void attention_forward(Tensor out, Tensor lse, Tensor q, Tensor k, Tensor v,
                                 Tensor doc_ids, const AttnShape& shape) = 0;
  // Writes (does not accumulate) dq [N,H*D], dk, dv [N,Hkv*D] (strided views of dqkv).
  virtual void attention_backward(Tensor dq, Tensor dk, Tensor dv, Tensor dout, Tensor out,
                                  Tensor lse, Tensor q, Tensor k, Tensor v, Tensor doc_ids,
                                  const AttnShape& shape) = 0;
  // Generation with a KV cache: one new query row per sequence attends to that sequence's cached
  // keys/values 0..n_keys-1 (its own key is the last of them, so no further mask). q [B, H*D]
  // (strided ok), out [B, H*D] act; k_cache/v_cache contiguous [B, max_len, Hkv*D] act with
  // max_len = shape.seq_len >= n_keys >= 1; shape.batch = B; GQA as in attention_forward.
  virtual void attention_decode(Tensor out, Tensor q, Tensor k_cache, Tensor v_cache,
                                int64_t n_keys, const AttnShape& shape) = 0;

  // ---- SwiGLU: h = silu(gate) * up -------------------------------------------------------------
  // gate/up [N,F] views (column halves of the fused gate_up output), h [N,F] act.
  virtual void swiglu_forward(Tensor h, Tensor gate, Tensor up) = 0;
  // Writes dgate, dup (views of dgate_up, which may be gate_up itself) from dh. With h not empty,
  // also h = silu(gate) * up, bitwise as swiglu_forward writes it: a recomputed layer's forward
  // leaves h to its backward, which then reads gate_up once instead of twice.
  virtual void swiglu_backward(Tensor dgate, Tensor dup, Tensor dh, Tensor gate, Tensor up, Tensor h) = 0;

  // ---- cross-entropy over a chunk of logits ----------------------------------------------------
  // logits [n,V] act (the GPU also takes f32), targets [n] i32 (-100 = ignored), losses [n] f32 (0 for ignored rows).
  // If dlogits [n,V] act is non-empty: dlogits = grad_scale * (softmax(logits) - onehot(target)),
  // and 0 for ignored rows. dlogits may be logits itself (in place; the model does that).
  virtual void cross_entropy(Tensor losses, Tensor dlogits, Tensor logits, Tensor targets,
                             float grad_scale) = 0;

  // ---- QLoRA ---------------------------------------------------------------------------------
  // out (act dtype, w.numel contiguous elements) = the NF4 weight dequantized; the model does this
  // into a scratch buffer right before the weight's GEMM, so no bf16 copy of the base model exists.
  virtual void nf4_dequantize(Tensor out, const Nf4Weight& w) = 0;

  // ---- optimizers (fused, one launch per tensor) ---------------------------------------------
  // master f32 is updated; compute (act dtype) receives the cast copy unless it aliases master.
  // grad f32, m/v f32 states, all of the same numel.
  virtual void adamw_step(Tensor master, Tensor compute, Tensor grad, Tensor m, Tensor v,
                          const AdamWParams& p) = 0;
  // 8-bit states: m_q/v_q u8 codes into the signed/unsigned dynamic maps, m_absmax/v_absmax f32
  // one per kAdam8BitBlock elements.
  virtual void adamw8bit_step(Tensor master, Tensor compute, Tensor grad, Tensor m_q, Tensor v_q,
                              Tensor m_absmax, Tensor v_absmax, const AdamWParams& p) = 0;
};

#if defined(__CUDACC__)
#define RT_HOST_DEVICE __host__ __device__
#else
#define RT_HOST_DEVICE
#endif

// The counter-based keep decision shared by both backends' dropout.
RT_HOST_DEVICE inline bool dropout_keep(uint64_t seed, uint64_t index, float p) {
  uint64_t z = seed + 0x9E3779B97F4A7C15ull * (index + 1);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  z ^= z >> 31;
  const float u = static_cast<float>(z >> 40) * (1.0f / 16777216.0f);  // [0,1), 24 bits
  return u >= p;
}

// bitsandbytes' dynamic quantization maps (256 entries each, sorted ascending): signed for the
// first moment, unsigned for the second.
const float* adam8bit_signed_map();
const float* adam8bit_unsigned_map();

// A fresh 8-bit state: set the codes (host memory) with this -- every code points at its map's 0.0
// entry, index 127 of the signed map (127 negative entries sort below it) and index 0 of the
// unsigned one -- and zero the absmax arrays (Backend::alloc does). A zero-filled m_q decodes to
// the same zeros, since code * absmax == 0 for any code, but its codes would name -0.99 and mislead
// anyone inspecting a checkpoint.
void adam8bit_init_state(uint8_t* m_q, uint8_t* v_q, int64_t n);

// The code of the map entry nearest to x (x = value / absmax, so in [-1, 1]), found by binary
// search over the sorted map; an exact tie between two neighbours goes to the lower index, and
// values beyond either end clamp to it. Shared so both backends quantize identically.
RT_HOST_DEVICE inline uint8_t adam8bit_quantize(const float* map, float x) {
  int lo = 0, hi = 256;  // first index with map[i] >= x
  while (lo < hi) {
    const int mid = (lo + hi) / 2;
    if (map[mid] < x) lo = mid + 1; else hi = mid;
  }
  if (lo == 0) return 0;
  if (lo == 256) return 255;
  return static_cast<uint8_t>(x - map[lo - 1] <= map[lo] - x ? lo - 1 : lo);
}

std::unique_ptr<Backend> make_cpu_backend();
// Throws UserError when ranktune was built without CUDA or the device cannot be used.
std::unique_ptr<Backend> make_cuda_backend(int device_index);
// device_map auto: lets every listed GPU read and write the others' memory (kernels of one layer
// write the next layer's input on the next GPU). UserError when a pair has no peer access.
void enable_peer_access(const std::vector<int>& devices);

}  // namespace ranktune
