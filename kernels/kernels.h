// Kernel launchers: one section per op family, each implemented in kernels/<family>.cu with the
// forward and backward kernels side by side. Launchers pick grid sizes and take a stream; the
// CUDA backend (src/cuda_backend.cu) is their caller, and the NCCL communicator's copy-engine reduce
// (src/comm_nccl.cu) calls add_f32 on a stream of its own. Pointers are device pointers.
// Semantics are those of the matching Backend op in include/ranktune/backend.h.
#pragma once
#include <cublasLt.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "ranktune/backend.h"

namespace ranktune::kernels {

using bf16 = __nv_bfloat16;

// ---- common.cu: elementwise, casts, reductions ---------------------------------------------------
void fill_f32(float* x, int64_t n, float value, cudaStream_t s);
void fill_bf16(bf16* x, int64_t n, float value, cudaStream_t s);
// 2-D strided copy with conversion; ld* are row strides in elements.
void copy_f32_to_bf16(bf16* dst, int64_t ld_dst, const float* src, int64_t ld_src, int64_t rows,
                      int64_t cols, cudaStream_t s);
void copy_bf16_to_f32(float* dst, int64_t ld_dst, const bf16* src, int64_t ld_src, int64_t rows,
                      int64_t cols, cudaStream_t s);
void copy_bf16(bf16* dst, int64_t ld_dst, const bf16* src, int64_t ld_src, int64_t rows,
               int64_t cols, cudaStream_t s);
// Many small 2-D bf16 copies in one launch per kCopyBlocksPerLaunch (Backend::copy_batch).
struct CopyBlock {
  bf16* dst;
  const bf16* src;
  int64_t ld_dst, ld_src;
  int32_t rows, cols;
};
void copy_bf16_blocks(const CopyBlock* blocks, int64_t n_blocks, cudaStream_t s);
void scale_f32(float* x, int64_t n, float s_, cudaStream_t s);
void scale_bf16(bf16* x, int64_t n, float s_, cudaStream_t s);
// y += x over 2-D strided views (Backend::add).
void add_f32(float* y, int64_t ld_y, const float* x, int64_t ld_x, int64_t rows, int64_t cols,
             cudaStream_t s);
void add_bf16(bf16* y, int64_t ld_y, const bf16* x, int64_t ld_x, int64_t rows, int64_t cols,
              cudaStream_t s);
// Deterministic sum of squares in double: per-block partials then one block reduces them.
// scratch holds at least sum_squares_scratch_elems() doubles; result written to *out (device).
int64_t sum_squares_scratch_elems();
void sum_squares_f32(double* out, const float* x, int64_t n, double* scratch, cudaStream_t s);
void dropout_bf16(bf16* out, int64_t ld_out, const bf16* in, int64_t ld_in, int64_t rows,
                  int64_t cols, float p, uint64_t seed, cudaStream_t s);

// ---- embedding.cu --------------------------------------------------------------------------------
void embedding_forward(bf16* out, const int32_t* tokens, const bf16* table, int64_t n_tokens,
                       int64_t channels, cudaStream_t s);
// Deterministic scatter-add dtable[tokens[n]] += dout[n] (dtable [vocab, channels] f32): the
// positions sorted by token on the GPU (stable), then one block per distinct token sums its rows in
// order of position. Ids outside [0, vocab) add nothing. scratch: embedding_backward_scratch_bytes.
size_t embedding_backward_scratch_bytes(int64_t n_tokens);
void embedding_backward(float* dtable, const bf16* dout, const int32_t* tokens, int64_t n_tokens, int64_t vocab,
                        int64_t channels, void* scratch, cudaStream_t s);

// ---- rmsnorm.cu ----------------------------------------------------------------------------------
// norm_out's rows are ld_norm apart (a fused LoRA projection's padded input); the rest contiguous.
void residual_rmsnorm_forward(bf16* residual_out, bf16* norm_out, int64_t ld_norm, float* rstd, const bf16* residual_in,
                              const bf16* delta, const bf16* weight, int64_t n_rows, int64_t channels, float eps,
                              cudaStream_t s);
// dweight_partial: scratch of rmsnorm_dweight_scratch_elems(n_rows, channels) floats.
int64_t rmsnorm_dweight_scratch_elems(int64_t n_rows, int64_t channels);
// dnorm's rows are ld_dnorm apart; the rest contiguous.
void rmsnorm_backward(bf16* dresidual, float* dweight, float dweight_beta, float* dweight_partial, const bf16* dnorm,
                      int64_t ld_dnorm, const bf16* x, const bf16* weight, const float* rstd, int64_t n_rows,
                      int64_t channels, cudaStream_t s);

// ---- rope.cu -------------------------------------------------------------------------------------
// x rows of ld elements; n_heads heads of head_dim each start at column 0. sign = +1 forward,
// -1 backward.
void rope(bf16* x, int64_t ld, int64_t n_rows, int64_t n_heads, int64_t head_dim,
          const int32_t* positions, const float* cos, const float* sin, float sign, cudaStream_t s);

// ---- swiglu.cu -----------------------------------------------------------------------------------
// ld_h, ld_dh: row strides of h and dh (a fused LoRA projection's padded input and dx). The
// backward also writes h, bitwise as the forward does, when h is not null.
void swiglu_forward(bf16* h, int64_t ld_h, const bf16* gate, const bf16* up, int64_t ld_gu, int64_t n_rows, int64_t ffn,
                    cudaStream_t s);
void swiglu_backward(bf16* dgate, bf16* dup, int64_t ld_dgu, bf16* h, int64_t ld_h, const bf16* dh, int64_t ld_dh,
                     const bf16* gate, const bf16* up, int64_t ld_gu, int64_t n_rows, int64_t ffn, cudaStream_t s);

// ---- cross_entropy.cu ----------------------------------------------------------------------------
// logits f32 or bf16; dlogits may be null (forward only) or the logits themselves (bf16, in place).
template <class T>
void cross_entropy(float* losses, bf16* dlogits, const T* logits, const int32_t* targets, int64_t n_rows, int64_t vocab,
                   float grad_scale, cudaStream_t s);

// ---- attention.cu (flash-style, causal, GQA) -----------------------------------------------------
// q/k/v/out/dq/dk/dv are row-major with the given row strides (elements); head h of row n starts
// at column h*D. doc_ids may be null.
struct AttnArgs {
  const bf16* q; const bf16* k; const bf16* v;
  int64_t ld_q, ld_k, ld_v;
  const int32_t* doc_ids;
  int64_t batch, seq_len, n_heads, n_kv_heads, head_dim;
  float scale;
};
void attention_forward(bf16* out, int64_t ld_out, float* lse, const AttnArgs& a, cudaStream_t s);
// scratch: attention_backward_scratch_bytes(a) bytes of device memory (e.g. D_i = rowsum(dO*O)).
size_t attention_backward_scratch_bytes(const AttnArgs& a);
void attention_backward(bf16* dq, int64_t ld_dq, bf16* dk, int64_t ld_dk, bf16* dv, int64_t ld_dv,
                        const bf16* dout, int64_t ld_dout, const bf16* out, int64_t ld_out,
                        const float* lse, const AttnArgs& a, void* scratch, cudaStream_t s);

// ---- decode.cu (one query per sequence against a KV cache) ---------------------------------------
// q/out [batch, n_heads*head_dim] with row strides ld_q/ld_out; k_cache/v_cache contiguous
// [batch, max_len, n_kv_heads*head_dim]; keys 0..n_keys-1 of each sequence are attended to.
void attention_decode(bf16* out, int64_t ld_out, const bf16* q, int64_t ld_q, const bf16* k_cache,
                      const bf16* v_cache, int64_t batch, int64_t max_len, int64_t n_keys,
                      int64_t n_heads, int64_t n_kv_heads, int64_t head_dim, float scale,
                      cudaStream_t s);

// ---- adamw.cu ------------------------------------------------------------------------------------
void adamw_step(float* master, bf16* compute, const float* grad, float* m, float* v, int64_t n,
                const AdamWParams& p, cudaStream_t s);
// signed_map/unsigned_map: 256-entry device copies of the dynamic maps.
void adamw8bit_step(float* master, bf16* compute, const float* grad, uint8_t* m_q, uint8_t* v_q,
                    float* m_absmax, float* v_absmax, int64_t n, const float* signed_map,
                    const float* unsigned_map, const AdamWParams& p, cudaStream_t s);

}  // namespace ranktune::kernels

// ---- nf4.cu (QLoRA 4-bit weights; the format is in include/ranktune/nf4.h) -------------------------
namespace ranktune::kernels {

// A bitsandbytes NF4 weight in device memory (the arrays of an Nf4Tensor).
struct Nf4Weights {
  const uint8_t* packed = nullptr;        // [ceil(numel/2)], weight 2j in the high nibble of byte j
  const uint8_t* absmax_codes = nullptr;  // [n_blocks] 8-bit codes; null: not double-quantized
  const float* nested_absmax = nullptr;   // [ceil(n_blocks/256)]
  const float* nested_map = nullptr;      // [256]
  float offset = 0.f;
  const float* absmax = nullptr;          // [n_blocks] f32, when absmax_codes is null
  int64_t numel = 0;
};
// out[i] = bf16(code[nibble i] * scale[i/64]), scale[b] = nested_map[absmax_codes[b]] *
// nested_absmax[b/256] + offset (or absmax[b]): bitwise bf16 of the host's nf4_dequantize.
void nf4_dequantize(bf16* out, const Nf4Weights& w, cudaStream_t s);

}  // namespace ranktune::kernels
