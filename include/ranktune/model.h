// The Llama model, written once against the Backend interface: embedding, per layer
// RMSNorm -> attention (fused qkv projection, RoPE, causal GQA flash attention) -> o_proj ->
// residual -> RMSNorm -> SwiGLU MLP (fused gate_up, down) -> residual; final RMSNorm; LM head
// fused with cross-entropy in row chunks so the N x vocab logits never exist whole.
//
// Parameters live in flat buffers (one for the base model, one for LoRA adapters) with views per
// tensor. Trainable tensors own exactly one gradient slot each; the GradLedger hands out the
// writes and checks, every micro-batch, that each slot was written exactly as often as declared
// and, every step, that each gradient bucket became ready for reduction exactly once. Activation
// checkpointing keeps each layer's input only and recomputes the layer in backward (keep_attention:
// keeps the attention block's outputs too and recomputes the norms and MLP); recompute never
// touches a gradient slot, so it cannot mark a gradient ready twice.
//
// Generation keeps each layer's rotated keys and values in a KV cache: prefill() runs the prompt
// through the same forward, decode_step() one token per sequence, attending to the cache.
#pragma once
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "ranktune/backend.h"
#include "ranktune/config.h"
#include "ranktune/llama.h"
#include "ranktune/nf4.h"

namespace ranktune {

// ---- gradient ownership ---------------------------------------------------------------------------
class GradLedger {
 public:
  // A slot: one trainable tensor's gradient, written `writes_per_micro` times per micro-batch
  // (1, or 2 for a tied embedding trained through both the lookup and the LM head), belonging to
  // one reduction bucket.
  int add_slot(const std::string& name, int writes_per_micro, int bucket);
  int n_buckets() const { return n_buckets_; }

  void begin_step(int n_micro);
  void begin_micro(int micro);
  // Runs fn(beta) for a write that covers `slots` (several adjacent tensors written by one GEMM):
  // beta is 0 for a slot's first write of the step (overwrite) and 1 after (accumulate). Aborts if
  // a slot would be written more often than declared. In the last micro-batch of a step, a bucket
  // whose slots are all complete is reported to on_bucket_ready, once.
  void write(std::initializer_list<int> slots, const std::function<void(float beta)>& fn);
  void write(const std::vector<int>& slots, const std::function<void(float beta)>& fn);
  void end_micro();  // every slot written exactly writes_per_micro times
  void end_step();   // every bucket reported exactly once

  std::function<void(int bucket)> on_bucket_ready;
  int64_t writes(int slot) const { return slots_[static_cast<size_t>(slot)].total_writes; }
  int64_t reductions(int bucket) const { return bucket_reductions_[static_cast<size_t>(bucket)]; }
  int find(const std::string& name) const;
  size_t n_slots() const { return slots_.size(); }
  bool in_last_micro() const { return in_step_ && micro_ == n_micro_ - 1; }

 private:
  struct Slot {
    std::string name;
    int writes_per_micro = 1;
    int bucket = 0;
    int writes_this_micro = 0;
    int64_t total_writes = 0;
  };
  std::vector<Slot> slots_;
  std::vector<int> bucket_pending_;
  std::vector<int> bucket_ready_this_step_;
  std::vector<int64_t> bucket_reductions_;
  int n_buckets_ = 0;
  int n_micro_ = 1, micro_ = 0;
  bool in_step_ = false;
};

// ---- parameters -------------------------------------------------------------------------------------
// A set of tensors in one flat buffer: compute copy (activation dtype), fp32 master (aliases the
// compute copy on the CPU path) and fp32 gradients when trainable.
struct ParamGroup {
  std::vector<ParamSpec> specs;
  int64_t numel = 0;
  Buffer compute_buf, master_buf, grad_buf;
  Tensor compute, master, grad;  // flat 1-D views (no flat compute view when spread over GPUs)
  std::vector<int> slot;         // ledger slot per spec (trainable groups)
  // device_map auto, NF4 or fused LoRA's padded rows: the compute copy in one buffer per GPU, a
  // view per spec (2-D with its row stride when padded).
  std::vector<Buffer> stage_bufs;
  std::vector<Tensor> stage_views;
  size_t compute_bytes() const;  // compute_buf and stage_bufs
  const ParamSpec* find(const std::string& name) const;
  Tensor compute_view(const ParamSpec& p) const;
  Tensor grad_view(const ParamSpec& p) const;
  Tensor master_view(const ParamSpec& p) const;
};

struct ModelOptions {
  LlamaArch arch;
  bool train_base = false;  // full fine-tuning
  bool lora = true;
  int64_t lora_r = 16;
  float lora_scaling = 1.f;
  float lora_dropout = 0.f;
  std::vector<std::string> lora_targets;
  Checkpointing checkpointing = Checkpointing::on;
  int64_t max_batch = 1;  // B
  int64_t max_seq = 1;    // T
  int64_t loss_chunk_rows = 0;  // rows of logits per chunk (0 = choose from vocab)
  // fp32 master copies of the trainable weights on the GPU; off under ZeRO-1, where the optimizer
  // keeps the masters of its shard only.
  bool master_weights = true;
  // QLoRA: the layers' linear weights (q,k,v,o,gate,up,down) frozen in NF4, dequantized into a
  // scratch buffer right before each of their GEMMs.
  bool load_in_4bit = false;
  // device_map auto: how many consecutive layers each backend (GPU) holds; empty = all on one.
  std::vector<int64_t> stage_layers;
  // Ranks of data parallelism. With full fine-tuning of a tied embedding over several ranks the
  // embedding's lookup gradient of a step's last micro-batch is exchanged as rows (see
  // LlamaModel::EmbeddingRows) instead of being summed as part of the dense [vocab, hidden] tensor.
  int data_parallel_ranks = 1;
  int data_parallel_rank = 0;  // this rank's place among them
};
// device_map auto: consecutive layers per GPU, balanced so that each GPU's share of the memory --
// its layers' frozen weights and activations, and on the first GPU the embedding, head, logits
// chunk and the trainable adapters -- is about even. Every GPU gets at least one layer.
std::vector<int64_t> balance_stages(const ModelOptions& options, int n_stages, size_t act_bytes);
ModelOptions model_options_from(const RunConfig& cfg, const LlamaArch& arch, int64_t max_batch);

// One micro-batch as the data loader gives it (host memory, row-major [B, T]).
struct ModelInputs {
  int64_t batch = 0, seq_len = 0;
  const int32_t* tokens = nullptr;
  const int32_t* targets = nullptr;    // next-token targets, -100 = not trained
  const int32_t* positions = nullptr;  // position of each token within its record
  const int32_t* doc_ids = nullptr;    // record index within a packed row, or null
};

class LlamaModel {
 public:
  LlamaModel(Backend& backend, const ModelOptions& options);
  // device_map auto: one backend per GPU, options.stage_layers consecutive layers on each; the
  // embedding, final norm, head and the LoRA adapters (with their gradients) live on the first,
  // and activations cross GPUs with peer copies. LoRA (frozen base) only.
  LlamaModel(const std::vector<Backend*>& stage_backends, const ModelOptions& options);
  ~LlamaModel();
  LlamaModel(const LlamaModel&) = delete;
  LlamaModel& operator=(const LlamaModel&) = delete;

  const LlamaArch& arch() const { return opt_.arch; }
  const ModelOptions& options() const { return opt_; }
  Backend& backend() { return be_; }  // the first GPU's (all of it with one stage)
  int n_stages() const { return static_cast<int>(opt_.stage_layers.size()); }
  int stage_of_layer(int l) const { return layer_stage_[static_cast<size_t>(l)]; }

  ParamGroup& base() { return base_; }
  ParamGroup& lora() { return lora_; }
  bool has_lora() const { return opt_.lora; }
  // The group the optimizer updates: the LoRA adapters, or the base model in full fine-tuning.
  ParamGroup& trainable() { return opt_.train_base ? base_ : lora_; }
  GradLedger& ledger() { return ledger_; }
  // Called by the forward as it reaches weights: layer -1 the embedding, before the first layer;
  // 0..L-1 each layer's; L the final norm and head, after the last layer. Under ZeRO-1 the trainer
  // sets it to Optimizer::wait_for_weights, so a forward waits for the previous step's weight
  // all-gather layer by layer. Unset: nothing.
  std::function<void(int layer)> before_forward_weights;

  // Data-parallel full fine-tuning of a tied embedding (ModelOptions.data_parallel_ranks > 1). The
  // embedding's gradient has two parts: the LM head's, dense and final right after the head, and
  // the lookup's, at most one row per token and final only at the very end of backward. Summing the
  // dense tensor after both would put a 1 GB reduction (at the 1B shape) after the last layer, with
  // nothing left to overlap it. So the lookup part of a step's last micro-batch gets a ledger slot
  // of its own, in a bucket of its own (`bucket`): the dense tensor's bucket is reduced during
  // backward, and this one is "reduced" by exchanging rows: every rank copies its [N, hidden]
  // gradient rows and token ids into its slot of `rows` / `tokens` (zero-padded to the planned N),
  // GradReducer broadcasts each rank's slot to all, and add_exchanged_embedding_rows() adds every
  // rank's rows to the reduced gradient, in rank order (so every rank adds them alike).
  struct EmbeddingRows {
    int bucket = -1;            // -1: not exchanged (one rank, LoRA, or an untied embedding)
    Tensor rows, tokens;        // [ranks * N, hidden] act and [ranks * N] i32, rank-major
    int64_t rows_per_rank = 0;  // N, the planned B * T
  };
  const EmbeddingRows& embedding_rows() const { return emb_rows_; }
  void add_exchanged_embedding_rows();

  // HF's init: N(0, 0.02) for linear and embedding weights, 1 for norms (host RNG: identical on
  // every backend).
  void init_base_random(uint64_t seed);
  // PEFT's init: A ~ kaiming_uniform(a=sqrt(5)) = U(-1/sqrt(in), 1/sqrt(in)), B = 0.
  void init_lora(uint64_t seed);
  // Sets one tensor by its HF/PEFT name (base or LoRA) from fp32 host values; the master copy too.
  // Under load_in_4bit a linear weight is quantized to NF4 here.
  void set_tensor(const std::string& name, const std::vector<float>& values);
  // QLoRA: sets a linear weight from an already quantized NF4 tensor (a bitsandbytes checkpoint).
  void set_nf4(const std::string& name, const Nf4Tensor& weight);
  bool quantized(const std::string& name) const;
  std::vector<float> get_tensor(const std::string& name);  // the compute copy, as fp32
  std::vector<float> get_grad(const std::string& name);
  // After the optimizer: nothing to do on the CPU (master is the compute copy); on the GPU the
  // optimizer kernel writes both.

  // Forward and backward of one micro-batch; gradients accumulate through the ledger, with
  // d(loss)/d(logit) scaled by grad_scale (1 / counted tokens of the whole step). Returns the sum
  // of the token losses of this micro-batch. The caller brackets micro-batches with
  // ledger().begin_step/begin_micro/end_micro/end_step.
  double forward_backward(const ModelInputs& in, float grad_scale, uint64_t dropout_seed);
  // The layers the last forward_backward() recomputed: with checkpointing every layer but the last
  // of each stage, whose activations are still in the stage's set from the forward; 0 without.
  int layers_recomputed() const { return layers_recomputed_; }
  // Loss only (eval): returns the sum of token losses; if logits is non-null it receives all
  // B*T*V logits (for tests with small vocabularies).
  double forward_loss(const ModelInputs& in, std::vector<float>* logits = nullptr);

  int64_t activation_bytes() const { return activation_bytes_; }

  // ---- generation with a KV cache (driven by generate() in src/generate.cpp) -------------------
  // Every sequence of a batch advances one position per decode_step, in lock step, so all share
  // one cache length and one position. LoRA dropout is off while generating.
  //
  // Starts `batch` sequences (<= max_batch) that will hold at most max_len tokens each
  // (<= max_seq): sizes the cache (allocated on first use, grown when a larger one is needed) and
  // runs the first n_tokens tokens of every sequence (host, row-major [batch, n_tokens];
  // n_tokens may be 0) through the normal forward, keeping each layer's rotated keys and values.
  void prefill(int64_t batch, int64_t max_len, int64_t n_tokens, const int32_t* tokens);
  // Runs one more token per sequence (tokens[b] for sequence b) at position kv_len(), appending
  // its keys and values to the cache; returns the next-token logits, row-major [batch, V] fp32.
  std::vector<float> decode_step(const std::vector<int32_t>& tokens);
  int64_t kv_len() const { return kv_.len; }

 private:
  struct LayerActs;
  struct LinearPart;
  struct LoraGroup;
  struct Stage;
  struct QuantWeight;
  // Each layer's rotated keys and values of the sequences being generated, [batch, max_len,
  // kv_dim] act each, in one buffer; len positions of every sequence are filled.
  struct KvCache {
    std::vector<Buffer> buffers;  // one per stage
    std::vector<Tensor> k, v;
    int64_t batch = 0, max_len = 0, len = 0;
  };
  // What a forward pass is for. prefill: the normal causal attention, whose keys and values are
  // also kept in the cache; decode: one token per sequence attending to the cache.
  enum class Pass { normal, prefill, decode };
  void attend(int l, Tensor att, Tensor lse, Tensor q, Tensor k, Tensor v);
  std::vector<float> head_logits(int64_t n_rows);
  void build_params();
  void allocate_activations();
  void upload_inputs(const ModelInputs& in);
  void forward(const ModelInputs& in, bool training, uint64_t dropout_seed);
  void layer_forward(int l, bool recompute, uint64_t dropout_seed);
  void layer_backward(int l, uint64_t dropout_seed);
  void head_loss(int64_t n_rows, bool backward, float grad_scale, std::vector<float>* logits);
  double sum_losses(int64_t n_rows);
  // xa_in_place: the recompute has copied the layer's saved xa back into x's padding already.
  void linear_forward(Tensor y, Tensor x, int l, const LoraGroup& lora, Tensor weight, uint64_t dropout_seed,
                      bool xa_in_place = false);
  // The recompute's xa: copied between the inputs' padding and the layer's saved copies (checkpointing).
  void copy_saved_xa(int l, bool to_saved);
  // x_ready (if set) runs once dx is complete and before anything reads x: a recomputed layer's
  // SwiGLU backward writes the down projection's input h there (swiglu_in_backward).
  void linear_backward(Tensor dx, Tensor dy, Tensor x, int l, const LoraGroup& lora, Tensor weight,
                       const std::vector<int>& weight_slots, uint64_t dropout_seed,
                       const std::function<void()>& x_ready = nullptr);
  // Whether a recomputed layer leaves h = silu(gate) * up to its backward, whose SwiGLU pass writes
  // it beside dgate_up: one pass over gate_up where two would read it. Not with LoRA dropout, whose
  // masks of h are drawn before the down projection's dx is complete.
  bool swiglu_in_backward() const { return !(opt_.lora && opt_.lora_dropout > 0); }
  LayerActs& acts(int l);
  Stage& stage(int l);  // the stage of layer l
  Backend& be(int l);   // the backend that runs layer l
  // A gradient write of layer l through the ledger; on a later stage the first stage waits for it
  // before anything (a bucket's all-reduce, the optimizer) reads the gradient, which lives there.
  void write_grad(int l, const std::vector<int>& slots, const std::function<void(float beta)>& fn);
  Backend& owner(const ParamGroup& g, const ParamSpec& p);
  Tensor base_weight(int l, const std::string& suffix);
  Tensor dequantized(int l, const std::vector<const ParamSpec*>& parts);
  int base_slot(int l, const std::string& suffix) const;

  Backend& be_;  // the first stage's
  ModelOptions opt_;
  std::vector<Stage> stages_;
  std::vector<int> layer_stage_;
  std::vector<std::unique_ptr<QuantWeight>> quant_;  // per base spec: its NF4 form, or null
  ParamGroup base_, lora_;
  GradLedger ledger_;
  std::vector<LayerActs> layer_acts_;
  std::vector<Buffer> act_buffers_;
  int64_t activation_bytes_ = 0;
  // inputs and the head's activations (first stage)
  Tensor tokens_, targets_;
  std::vector<Tensor> layer_inputs_;  // x_in of every layer, kept always (the checkpoints)
  // gradient_checkpointing: offload -- layer_inputs_ are two device slots taking turns (layer l's
  // in slot l % 2) and every layer's input lives in pinned host memory.
  Buffer host_inputs_buf_;
  std::vector<Tensor> host_inputs_;
  std::vector<int> to_host_ticket_;
  int slot_holds_[2] = {-1, -1};  // the layer whose input each device slot holds
  EmbeddingRows emb_rows_;
  int emb_lookup_slot_ = -1;  // the lookup part's ledger slot when the rows are exchanged
  Tensor x_final_, ln_final_, rstd_final_, losses_, logits_;  // logits_: one loss chunk, dlogits in place
  bool have_doc_ids_ = false;
  KvCache kv_;
  Pass pass_ = Pass::normal;
  bool training_ = false;
  int layers_recomputed_ = 0;
  // Fused LoRA (lora_pad_per_projection, linear_forward): the extra columns of each fused
  // projection's input and dx, and, when fused_weights_ (LoRA over bf16 weights, not NF4), of its
  // base weight's rows, where the adapters' B matrices sit; forward() copies them there from the
  // B compute copies first (lora_b_blocks_: per stage, pairs of padding block and B).
  std::array<int64_t, kFusedProjections> lora_pad_{};
  bool fused_weights_ = false;
  std::vector<std::vector<std::pair<Tensor, Tensor>>> lora_b_blocks_;
  int64_t B_ = 0, T_ = 0, N_ = 0;
  int64_t loss_chunk_ = 0;
};

}  // namespace ranktune
