// The Llama model over the Backend interface. Reading order: forward() -> layer_forward() ->
// linear_forward(); forward_backward() -> head_loss() -> layer_backward() -> linear_backward().
// Generation: prefill() and decode_step() run the same forward(), which differs only in attend().
#include "ranktune/model.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <map>

#include "ranktune/error.h"

namespace ranktune {

// ---- GradLedger -----------------------------------------------------------------------------------

int GradLedger::add_slot(const std::string& name, int writes_per_micro, int bucket) {
  RT_ASSERT(!in_step_, "slots are declared before the first step");
  slots_.push_back({name, writes_per_micro, bucket, 0, 0});
  n_buckets_ = std::max(n_buckets_, bucket + 1);
  bucket_pending_.assign(static_cast<size_t>(n_buckets_), 0);
  bucket_ready_this_step_.assign(static_cast<size_t>(n_buckets_), 0);
  bucket_reductions_.resize(static_cast<size_t>(n_buckets_), 0);
  return static_cast<int>(slots_.size()) - 1;
}

int GradLedger::find(const std::string& name) const {
  for (size_t i = 0; i < slots_.size(); ++i)
    if (slots_[i].name == name) return static_cast<int>(i);
  return -1;
}

void GradLedger::begin_step(int n_micro) {
  RT_ASSERT(!in_step_, "begin_step inside a step");
  RT_ASSERT(n_micro >= 1, "a step has at least one micro-batch");
  in_step_ = true;
  n_micro_ = n_micro;
  micro_ = -1;
  std::fill(bucket_ready_this_step_.begin(), bucket_ready_this_step_.end(), 0);
}

void GradLedger::begin_micro(int micro) {
  RT_ASSERT(in_step_ && micro == micro_ + 1 && micro < n_micro_, "micro-batches run in order inside a step");
  micro_ = micro;
  for (auto& s : slots_) s.writes_this_micro = 0;
  std::fill(bucket_pending_.begin(), bucket_pending_.end(), 0);
  for (const auto& s : slots_) bucket_pending_[static_cast<size_t>(s.bucket)] += s.writes_per_micro;
}

void GradLedger::write(std::initializer_list<int> slots, const std::function<void(float)>& fn) {
  write(std::vector<int>(slots), fn);
}

void GradLedger::write(const std::vector<int>& slots, const std::function<void(float)>& fn) {
  RT_ASSERT(in_step_ && micro_ >= 0, "gradient written outside a micro-batch");
  RT_ASSERT(!slots.empty(), "a write covers at least one slot");
  const Slot& first = slots_[static_cast<size_t>(slots.front())];
  const bool overwrite = micro_ == 0 && first.writes_this_micro == 0;
  for (int id : slots) {
    Slot& s = slots_[static_cast<size_t>(id)];
    RT_ASSERT(s.writes_this_micro < s.writes_per_micro,
              "gradient slot " + s.name + " written more often than declared in one micro-batch");
    RT_ASSERT((micro_ == 0 && s.writes_this_micro == 0) == overwrite,
              "slots of one write must be at the same point: " + s.name);
  }
  fn(overwrite ? 0.f : 1.f);
  for (int id : slots) {
    Slot& s = slots_[static_cast<size_t>(id)];
    ++s.writes_this_micro;
    ++s.total_writes;
    int& pending = bucket_pending_[static_cast<size_t>(s.bucket)];
    --pending;
    if (pending == 0 && micro_ == n_micro_ - 1) {
      int& ready = bucket_ready_this_step_[static_cast<size_t>(s.bucket)];
      RT_ASSERT(ready == 0, "bucket reported ready twice in one step");
      ready = 1;
      ++bucket_reductions_[static_cast<size_t>(s.bucket)];
      if (on_bucket_ready) on_bucket_ready(s.bucket);
    }
  }
}

void GradLedger::end_micro() {
  for (const auto& s : slots_)
    RT_ASSERT(s.writes_this_micro == s.writes_per_micro,
              "gradient slot " + s.name + " written " + std::to_string(s.writes_this_micro) + " times, expected " +
                  std::to_string(s.writes_per_micro));
}

void GradLedger::end_step() {
  RT_ASSERT(in_step_ && micro_ == n_micro_ - 1, "end_step before the last micro-batch");
  for (int b = 0; b < n_buckets_; ++b)
    RT_ASSERT(bucket_ready_this_step_[static_cast<size_t>(b)] == 1,
              "bucket " + std::to_string(b) + " was not reduced exactly once");
  in_step_ = false;
}

// ---- parameters --------------------------------------------------------------------------------------

const ParamSpec* ParamGroup::find(const std::string& name) const {
  for (const auto& s : specs)
    if (s.name == name) return &s;
  return nullptr;
}
Tensor ParamGroup::compute_view(const ParamSpec& p) const {
  if (stage_views.empty()) return compute.flat_slice(p.offset, p.numel);
  const ParamSpec* spec = &p >= specs.data() && &p < specs.data() + specs.size() ? &p : find(p.name);
  return stage_views[static_cast<size_t>(spec - specs.data())];
}
Tensor ParamGroup::grad_view(const ParamSpec& p) const { return grad.flat_slice(p.offset, p.numel); }
size_t ParamGroup::compute_bytes() const {
  size_t n = compute_buf.bytes();
  for (const Buffer& b : stage_bufs) n += b.bytes();
  return n;
}
Tensor ParamGroup::master_view(const ParamSpec& p) const { return master.flat_slice(p.offset, p.numel); }

namespace {

Tensor as_matrix(Tensor flat, int64_t rows, int64_t cols) { return flat.view({rows, cols}); }

std::string shape_string(const std::vector<int64_t>& shape) {
  std::string s = "[";
  for (size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
  return s + "]";
}

bool targets(const ModelOptions& o, const std::string& module) {
  return std::find(o.lora_targets.begin(), o.lora_targets.end(), module) != o.lora_targets.end();
}

std::string module_prefix(int l, const std::string& module) {
  const bool attn = module == "q_proj" || module == "k_proj" || module == "v_proj" || module == "o_proj";
  return "model.layers." + std::to_string(l) + (attn ? ".self_attn." : ".mlp.") + module;
}

uint64_t splitmix(uint64_t& state) {
  uint64_t z = (state += 0x9E3779B97F4A7C15ull);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}
double uniform01(uint64_t& state) { return static_cast<double>(splitmix(state) >> 11) * (1.0 / 9007199254740992.0); }

// Rows of a [B, max_len, cols] KV cache as 2-D views: position `pos` of every sequence (one row per
// sequence, max_len rows apart), and the first n positions of sequence b.
Tensor position_rows(Tensor cache, int64_t pos) {
  const int64_t batch = cache.dim(0), max_len = cache.dim(1), cols = cache.dim(2);
  Tensor rows = cache.view({batch * max_len, cols}).row_slice(pos, 1);
  rows.shape[0] = batch;
  rows.row_stride = max_len * cols;
  return rows;
}
Tensor sequence_rows(Tensor cache, int64_t b, int64_t n) {
  const int64_t max_len = cache.dim(1), cols = cache.dim(2);
  return cache.view({cache.dim(0) * max_len, cols}).row_slice(b * max_len, n);
}

// A contiguous f32 or bf16 tensor appended to a host vector as floats (logits for tests and decoding).
void append_floats(Backend& be, std::vector<float>* out, const Tensor& t) {
  const size_t n = static_cast<size_t>(t.numel()), at = out->size();
  out->resize(at + n);
  if (t.dtype == DType::f32) {
    be.download(out->data() + at, t);
    return;
  }
  RT_ASSERT(t.dtype == DType::bf16, "append_floats: f32 or bf16, got " + t.describe());
  std::vector<uint16_t> raw(n);
  be.download(raw.data(), t);
  for (size_t i = 0; i < n; ++i) (*out)[at + i] = bf16_to_f32(raw[i]);
}

uint64_t mix_seed(uint64_t seed, uint64_t a, uint64_t b) {
  uint64_t s = seed ^ (a * 0x9E3779B97F4A7C15ull) ^ (b * 0xC2B2AE3D27D4EB4Full);
  return splitmix(s);
}

}  // namespace

// One LoRA adapter applied inside a fused projection: output columns [col, col+out) of the
// projection, A [r, in], B [out, r].
struct LlamaModel::LinearPart {
  int64_t col = 0, out = 0;
  Tensor a, b;          // compute copies
  int slot_a = -1, slot_b = -1;
  Tensor grad_a, grad_b;
  int module_index = 0;  // for the dropout seed
  Tensor xa;             // [N, r] saved activation drop(x) A^T (per layer)
};

// The LoRA parts of one fused projection, with their A matrices stacked (adjacent in the LoRA
// buffers, see build_params): a [parts * r, in], and xa [N, parts * r] whose column slices are the
// parts' xa. Without dropout one GEMM computes every part's drop(x) A^T, one its A gradients and one
// its contribution to dx.
struct LlamaModel::LoraGroup {
  std::vector<LinearPart> parts;
  Tensor a, grad_a, xa;  // xa: in the padding columns of the projection's input
  std::vector<int> slots_a;
  int64_t pad = 0;     // the padding columns of the input, dx and (fused) the weight's rows
  bool fused = false;  // the base weight's padding holds B: one GEMM for base and adapters
  Tensor saved;        // with checkpointing: this layer's xa, kept from the forward for its recompute
};

struct LlamaModel::LayerActs {
  Tensor ln1, rstd1, qkv, att, lse, x_mid, ln2, rstd2, gu, h;
  LoraGroup qkv_lora, o_lora, gate_up_lora, down_lora;
};

// A backend (one GPU under device_map auto) with the inputs, activations and scratch its layers use.
struct LlamaModel::Stage {
  Backend* be = nullptr;
  Tensor positions, doc_ids, rope_cos, rope_sin;
  Tensor delta;  // a projection's output before its residual add
  Tensor weight_scratch;  // QLoRA: the dequantized weight of the GEMM at hand
  // backward scratch
  Tensor dres, dln, dqkv, datt, dh, dxa, drop_scratch, lora_tmp;
};

// QLoRA: a linear weight's NF4 form, in host memory (for get_tensor and exports) and on its GPU.
struct LlamaModel::QuantWeight {
  Nf4Tensor host;
  Buffer buf;
  Nf4Weight dev;
};

namespace {
bool is_layer_linear(const ParamSpec& p) { return p.layer >= 0 && !p.is_norm; }
}  // namespace

std::vector<int64_t> balance_stages(const ModelOptions& o, int n_stages, size_t act_bytes) {
  const LlamaArch& a = o.arch;
  const int64_t L = a.n_layers;
  RT_REQUIRE(n_stages >= 1 && n_stages <= L, "device_map: auto over " + std::to_string(n_stages) + " GPUs needs at least as many layers (the model has " + std::to_string(L) + ")");
  const double act = static_cast<double>(act_bytes), N = static_cast<double>(o.max_batch * o.max_seq);
  const double C = static_cast<double>(a.hidden_size), F = static_cast<double>(a.intermediate_size);
  // Fused LoRA pads the targeted projections' weight rows (bf16 weights) and inputs.
  const std::array<int64_t, kFusedProjections> pad =
      o.lora ? lora_pad_per_projection(o.lora_targets, o.lora_r) : std::array<int64_t, kFusedProjections>{};
  const double weight_pad = o.load_in_4bit
                                ? 0.0
                                : static_cast<double>(a.qkv_dim() * pad[0] + a.hidden_size * pad[1] +
                                                      2 * a.intermediate_size * pad[2] + a.hidden_size * pad[3]);
  const double layer_params = static_cast<double>(a.hidden_size) * static_cast<double>(a.qkv_dim() + a.q_dim()) +
                              3.0 * C * F + 2.0 * C + weight_pad;
  // A layer: its weights and its kept input; without checkpointing its whole activation set.
  const double set = N *
                     (3 * C + static_cast<double>(a.qkv_dim() + a.q_dim()) + 3 * F +
                      static_cast<double>(pad[0] + pad[1] + pad[2] + pad[3])) *
                     act;
  // With checkpointing and LoRA each layer also keeps its adapters' xa (o's in its own att under
  // keep_attention).
  double kept_xa = 0;
  if (o.lora && o.checkpointing != Checkpointing::off) {
    const std::array<int64_t, kFusedProjections> modules = lora_modules_per_projection(o.lora_targets);
    for (int g = 0; g < kFusedProjections; ++g)
      if (!(o.checkpointing == Checkpointing::keep_attention && g == 1))
        kept_xa += N * static_cast<double>(modules[static_cast<size_t>(g)] * o.lora_r) * act;
  }
  const double per_layer = layer_params * act + N * C * act + (o.checkpointing == Checkpointing::off ? set : kept_xa);
  // Every stage: a recompute set and the backward scratch; the first also the embedding, head and logits chunk.
  const double per_stage = (o.checkpointing == Checkpointing::off ? 0.0 : set) + N * (4 * C + 3 * F) * act;
  const double V = static_cast<double>(a.vocab_size);
  const double chunk = static_cast<double>(
      loss_chunk_rows(a, o.train_base, o.max_batch * o.max_seq, static_cast<int64_t>(act_bytes), o.loss_chunk_rows));
  const double first_extra = V * C * act * (a.tie_word_embeddings ? 1 : 2) + chunk * V * act;
  // The smallest per-GPU load at which consecutive layers fit the stages (each taking layers while
  // under it, and leaving one for every later stage), found by bisection; then that split.
  const auto split = [&](double cap, std::vector<int64_t>* layers) {
    layers->assign(static_cast<size_t>(n_stages), 0);
    int64_t next = 0;
    for (int s = 0; s < n_stages; ++s) {
      double load = per_stage + (s == 0 ? first_extra : 0.0);
      int64_t& n = (*layers)[static_cast<size_t>(s)];
      while (next < L - (n_stages - 1 - s) && (n == 0 || load + per_layer <= cap)) {
        load += per_layer;
        ++n;
        ++next;
      }
    }
    return next == L;
  };
  double lo = 0, hi = per_layer * static_cast<double>(L) + per_stage + first_extra;
  std::vector<int64_t> layers;
  for (int it = 0; it < 60; ++it) {
    const double mid = (lo + hi) / 2;
    (split(mid, &layers) ? hi : lo) = mid;
  }
  split(hi, &layers);
  return layers;
}

ModelOptions model_options_from(const RunConfig& cfg, const LlamaArch& arch, int64_t max_batch) {
  ModelOptions o;
  o.arch = arch;
  o.lora = cfg.lora.enabled;
  o.train_base = !cfg.lora.enabled;
  o.lora_r = cfg.lora.r;
  o.lora_scaling = static_cast<float>(cfg.lora.scaling());
  o.lora_dropout = static_cast<float>(cfg.lora.lora_dropout);
  o.lora_targets = cfg.lora.target_modules;
  o.checkpointing = cfg.model.gradient_checkpointing;
  o.load_in_4bit = cfg.model.load_in_4bit;
  o.max_batch = max_batch;
  o.max_seq = cfg.model.max_seq_length;
  return o;
}

LlamaModel::LlamaModel(Backend& backend, const ModelOptions& options)
    : LlamaModel(std::vector<Backend*>{&backend}, options) {}

LlamaModel::LlamaModel(const std::vector<Backend*>& stage_backends, const ModelOptions& options)
    : be_(*stage_backends.front()), opt_(options) {
  opt_.arch.validate("model");
  RT_REQUIRE(opt_.max_seq <= opt_.arch.max_position_embeddings,
             "model.max_seq_length (" + std::to_string(opt_.max_seq) + ") exceeds the model's max_position_embeddings (" +
                 std::to_string(opt_.arch.max_position_embeddings) + ")");
  if (opt_.stage_layers.empty()) opt_.stage_layers = {opt_.arch.n_layers};
  RT_ASSERT(opt_.stage_layers.size() == stage_backends.size(), "one backend per stage");
  for (size_t st = 0; st < stage_backends.size(); ++st) {
    RT_ASSERT(opt_.stage_layers[st] >= 1, "every stage holds a layer");
    stages_.push_back(Stage{});
    stages_.back().be = stage_backends[st];
    for (int64_t k = 0; k < opt_.stage_layers[st]; ++k) layer_stage_.push_back(static_cast<int>(st));
  }
  RT_ASSERT(static_cast<int64_t>(layer_stage_.size()) == opt_.arch.n_layers, "the stages hold every layer once");
  build_params();
  allocate_activations();
}

LlamaModel::~LlamaModel() = default;

void LlamaModel::build_params() {
  const LlamaArch& a = opt_.arch;
  const bool gpu = be_.device() == Device::cuda;
  const DType act = be_.act_dtype();

  // Base model. Buckets: one per layer, plus one for the embedding / final norm / head.
  base_.specs = llama_param_layout(a);
  base_.numel = base_.specs.back().offset + base_.specs.back().numel;
  quant_.resize(base_.specs.size());
  // Fused LoRA: the rows of a targeted projection's bf16 weights are padded to hold its B blocks.
  if (opt_.lora) lora_pad_ = lora_pad_per_projection(opt_.lora_targets, opt_.lora_r);
  fused_weights_ = opt_.lora && !opt_.load_in_4bit;
  const auto row_pad = [&](const ParamSpec& p) -> int64_t {
    const int g = fused_projection_of_tensor(p.name);
    return fused_weights_ && is_layer_linear(p) && g >= 0 ? lora_pad_[static_cast<size_t>(g)] : 0;
  };
  const bool padded =
      std::any_of(base_.specs.begin(), base_.specs.end(), [&](const ParamSpec& p) { return row_pad(p) > 0; });
  if (stages_.size() == 1 && !opt_.load_in_4bit && !padded) {
    base_.compute_buf = be_.alloc(static_cast<size_t>(base_.numel) * dtype_size(act));
    base_.compute = base_.compute_buf.as(act, {base_.numel});
  } else {
    RT_REQUIRE(!opt_.train_base || stages_.size() == 1,
               "model.device_map: auto spreads the frozen layers of a LoRA run over the GPUs; for full fine-tuning on "
               "several GPUs run one rank per GPU (mpirun -np N ... --set model.enable_multi_gpu=true) with "
               "distributed.zero_stage: 1");
    // Each layer's tensors on its stage's GPU, the embedding, final norm and head on the first.
    // Under load_in_4bit the layers' linear weights are kept in NF4 only (set_nf4).
    RT_REQUIRE(!opt_.load_in_4bit || !opt_.train_base,
               "model.load_in_4bit freezes the base model in 4 bits: it needs lora.enabled: true (QLoRA)");
    std::vector<int64_t> stage_numel(stages_.size(), 0), at;
    for (const auto& p : base_.specs) {
      int64_t& n = stage_numel[static_cast<size_t>(p.layer >= 0 ? layer_stage_[static_cast<size_t>(p.layer)] : 0)];
      at.push_back(n);
      if (!(opt_.load_in_4bit && is_layer_linear(p))) n += p.numel + (row_pad(p) ? p.shape[0] * row_pad(p) : 0);
    }
    // Zero-filled (alloc), so the padding columns no adapter uses stay 0.
    for (size_t st = 0; st < stages_.size(); ++st)
      base_.stage_bufs.push_back(stages_[st].be->alloc(static_cast<size_t>(stage_numel[st]) * dtype_size(act)));
    for (size_t i = 0; i < base_.specs.size(); ++i) {
      const ParamSpec& p = base_.specs[i];
      const Buffer& buf = base_.stage_bufs[static_cast<size_t>(p.layer >= 0 ? layer_stage_[static_cast<size_t>(p.layer)] : 0)];
      const size_t byte_offset = static_cast<size_t>(at[i]) * dtype_size(act);
      if (opt_.load_in_4bit && is_layer_linear(p)) {
        base_.stage_views.push_back(Tensor());
      } else if (row_pad(p) > 0) {
        Tensor t = buf.as(act, {p.shape[0], p.shape[1] + row_pad(p)}, byte_offset).col_slice(0, p.shape[1]);
        base_.stage_views.push_back(t);
      } else {
        base_.stage_views.push_back(buf.as(act, {p.numel}, byte_offset));
      }
    }
  }
  const int global_bucket = static_cast<int>(a.n_layers);
  if (opt_.train_base) {
    if (gpu && !opt_.master_weights) {
      // ZeRO-1: the optimizer holds the masters of its shard.
    } else if (gpu) {
      base_.master_buf = be_.alloc(static_cast<size_t>(base_.numel) * 4);
      base_.master = base_.master_buf.as(DType::f32, {base_.numel});
    } else {
      base_.master = base_.compute;
    }
    base_.grad_buf = be_.alloc(static_cast<size_t>(base_.numel) * 4);
    base_.grad = base_.grad_buf.as(DType::f32, {base_.numel});
    // A tied embedding is written twice per micro-batch (head, lookup), unless the lookup part
    // is exchanged as rows: then it is a slot of its own, in the bucket after the others.
    const bool exchange_rows = a.tie_word_embeddings && opt_.data_parallel_ranks > 1;
    for (const auto& s : base_.specs) {
      const bool tied_embedding = a.tie_word_embeddings && s.name == "model.embed_tokens.weight";
      base_.slot.push_back(
          ledger_.add_slot(s.name, tied_embedding && !exchange_rows ? 2 : 1, s.layer >= 0 ? s.layer : global_bucket));
    }
    if (exchange_rows) {
      emb_rows_.bucket = global_bucket + 1;
      emb_lookup_slot_ = ledger_.add_slot("model.embed_tokens.weight (lookup rows)", 1, emb_rows_.bucket);
    }
  }

  if (!opt_.lora) return;
  // LoRA adapters, in layer order; within a layer by fused projection (qkv, o, gate_up, down), the
  // targeted modules' A matrices first, then their B matrices (modules in q,k,v,o,gate,up,down
  // order). The A matrices of one projection are then one [modules * r, in] matrix, so its inputs'
  // LoRA products drop(x) A^T for all its modules are one GEMM, and so are their gradients.
  int64_t offset = 0;
  const int64_t r = opt_.lora_r;
  for (int l = 0; l < a.n_layers; ++l) {
    for (int g = 0; g < kFusedProjections; ++g) {
      for (const bool a_matrices : {true, false}) {
        for (const std::string& m : lora_module_names()) {
          if (fused_projection(m) != g || !targets(opt_, m)) continue;
          const auto [out, in] = projection_shape(a, m);
          const std::string p = module_prefix(l, m);
          if (a_matrices) {
            lora_.specs.push_back({p + ".lora_A.weight", {r, in}, offset, r * in, l, false});
            offset += r * in;
          } else {
            lora_.specs.push_back({p + ".lora_B.weight", {out, r}, offset, out * r, l, false});
            offset += out * r;
          }
        }
      }
    }
  }
  lora_.numel = offset;
  RT_REQUIRE(lora_.numel > 0, "lora.target_modules selects no projection");
  lora_.compute_buf = be_.alloc(static_cast<size_t>(lora_.numel) * dtype_size(act));
  lora_.compute = lora_.compute_buf.as(act, {lora_.numel});
  if (gpu) {
    lora_.master_buf = be_.alloc(static_cast<size_t>(lora_.numel) * 4);
    lora_.master = lora_.master_buf.as(DType::f32, {lora_.numel});
  } else {
    lora_.master = lora_.compute;
  }
  if (!opt_.train_base) {
    lora_.grad_buf = be_.alloc(static_cast<size_t>(lora_.numel) * 4);
    lora_.grad = lora_.grad_buf.as(DType::f32, {lora_.numel});
    for (const auto& s : lora_.specs) lora_.slot.push_back(ledger_.add_slot(s.name, 1, s.layer));
  }
}

void LlamaModel::allocate_activations() {
  const LlamaArch& a = opt_.arch;
  const DType act = be_.act_dtype();
  B_ = opt_.max_batch;
  T_ = opt_.max_seq;
  N_ = B_ * T_;
  const int64_t N = N_, C = a.hidden_size, F = a.intermediate_size, V = a.vocab_size, H = a.n_heads;
  // LoRA modules per fused projection: one xa buffer [N, modules * r] each, and backward's dxa as
  // wide as the widest.
  const std::array<int64_t, kFusedProjections> group_modules =
      opt_.lora ? lora_modules_per_projection(opt_.lora_targets) : std::array<int64_t, kFusedProjections>{};
  const int64_t widest_group = std::max<int64_t>(1, *std::max_element(group_modules.begin(), group_modules.end()));
  // Fused LoRA: each projection's input (ln1, att, ln2, h) and dx (dln, datt, dh) is that many
  // columns wider; its adapters' xa, and in backward dy B, live there.
  const std::array<int64_t, kFusedProjections>& pad = lora_pad_;
  loss_chunk_ = loss_chunk_rows(a, opt_.train_base, N, static_cast<int64_t>(dtype_size(act)), opt_.loss_chunk_rows);

  // Sizes are listed once, then carved out of one buffer per group, on the stage's backend.
  struct Want {
    Tensor* t;
    DType dtype;
    std::vector<int64_t> shape;
  };
  auto carve = [&](Backend& be, std::vector<Want> wants) {
    size_t bytes = 0;
    for (auto& w : wants) {
      int64_t n = 1;
      for (auto d : w.shape) n *= d;
      bytes += (static_cast<size_t>(n) * dtype_size(w.dtype) + 255) / 256 * 256;
    }
    act_buffers_.push_back(be.alloc(bytes));
    activation_bytes_ += static_cast<int64_t>(bytes);
    char* base = static_cast<char*>(act_buffers_.back().data());
    size_t off = 0;
    for (auto& w : wants) {
      int64_t n = 1;
      for (auto d : w.shape) n *= d;
      Tensor t(base + off, w.dtype, be.device(), {});
      t.ndim = static_cast<int>(w.shape.size());
      for (size_t i = 0; i < w.shape.size(); ++i) t.shape[i] = w.shape[i];
      *w.t = t;
      off += (static_cast<size_t>(n) * dtype_size(w.dtype) + 255) / 256 * 256;
    }
  };

  // The inputs and the head (first stage).
  carve(be_, {{&tokens_, DType::i32, {N}},
              {&targets_, DType::i32, {N}},
              {&x_final_, act, {N, C}},
              {&ln_final_, act, {N, C}},
              {&rstd_final_, DType::f32, {N}},
              {&losses_, DType::f32, {N}},
              {&logits_, act, {loss_chunk_, V}}});
  if (emb_rows_.bucket >= 0) {
    const int64_t ranks = opt_.data_parallel_ranks;
    carve(be_, {{&emb_rows_.rows, act, {ranks * N, C}}, {&emb_rows_.tokens, DType::i32, {ranks * N}}});
    emb_rows_.rows_per_rank = N;
  }
  // What every stage's layers use: positions, rotary tables, the projection output and the
  // backward scratch.
  const std::vector<float> inv = rope_inv_freq(a);
  std::vector<float> cosv(static_cast<size_t>(T_ * (a.head_dim / 2))), sinv(cosv.size());
  for (int64_t t = 0; t < T_; ++t)
    for (int64_t i = 0; i < a.head_dim / 2; ++i) {
      // Rotary tables, computed on the host as HF does (float32 angle = position * inv_freq).
      const float angle = static_cast<float>(t) * inv[static_cast<size_t>(i)];
      cosv[static_cast<size_t>(t * (a.head_dim / 2) + i)] = static_cast<float>(std::cos(static_cast<double>(angle)));
      sinv[static_cast<size_t>(t * (a.head_dim / 2) + i)] = static_cast<float>(std::sin(static_cast<double>(angle)));
    }
  for (Stage& st : stages_) {
    carve(*st.be, {{&st.positions, DType::i32, {N}},
                   {&st.doc_ids, DType::i32, {N}},
                   {&st.rope_cos, DType::f32, {T_, a.head_dim / 2}},
                   {&st.rope_sin, DType::f32, {T_, a.head_dim / 2}},
                   {&st.delta, act, {N, C}},
                   {&st.dres, act, {N, C}},
                   {&st.dln, act, {N, std::max(C + std::max(pad[0], pad[2]), a.q_dim())}},
                   {&st.dqkv, act, {N, a.qkv_dim()}},
                   {&st.datt, act, {N, a.q_dim() + pad[1]}},
                   {&st.dh, act, {N, F + pad[3]}},
                   {&st.dxa, act, {N, widest_group * std::max<int64_t>(opt_.lora_r, 1)}},
                   {&st.drop_scratch, act, {opt_.lora_dropout > 0 ? N : 1, std::max({C, F, a.q_dim()})}},
                   {&st.lora_tmp, act, {opt_.lora_dropout > 0 ? N : 1, std::max({C, F, a.q_dim()})}}});
    st.dln = st.dln.view({N * std::max(C + std::max(pad[0], pad[2]), a.q_dim())});
    st.datt = st.datt.col_slice(0, a.q_dim());  // dx of o and of gate_up carry the adapters' dy B
    st.dh = st.dh.col_slice(0, F);
    if (opt_.load_in_4bit)
      carve(*st.be, {{&st.weight_scratch, act, {C * std::max({a.qkv_dim(), a.q_dim(), 2 * F, F})}}});
    st.be->upload(st.rope_cos, cosv.data());
    st.be->upload(st.rope_sin, sinv.data());
  }

  // Layer inputs are the checkpoints: kept for every layer, on its stage -- or, offloaded, in pinned
  // host memory, with two device slots taking turns.
  layer_inputs_.resize(static_cast<size_t>(a.n_layers));
  if (opt_.checkpointing == Checkpointing::offload) {
    RT_REQUIRE(stages_.size() == 1, "model.gradient_checkpointing: offload works on one GPU per rank; with "
                                    "device_map: auto use gradient_checkpointing: true");
    Tensor slots[2];
    carve(be_, {{&slots[0], act, {N, C}}, {&slots[1], act, {N, C}}});
    const size_t per_layer = static_cast<size_t>(N * C) * dtype_size(act);
    host_inputs_buf_ = be_.device() == Device::cuda ? Buffer::pinned_host(per_layer * static_cast<size_t>(a.n_layers))
                                                    : Buffer(Device::cpu, per_layer * static_cast<size_t>(a.n_layers));
    for (int l = 0; l < a.n_layers; ++l) {
      layer_inputs_[static_cast<size_t>(l)] = slots[l % 2];
      host_inputs_.push_back(host_inputs_buf_.as(act, {N, C}, per_layer * static_cast<size_t>(l)));
    }
    to_host_ticket_.assign(static_cast<size_t>(a.n_layers), 0);
  }
  for (size_t st = 0; st < stages_.size() && host_inputs_.empty(); ++st) {
    std::vector<Want> wants;
    for (int l = 0; l < a.n_layers; ++l)
      if (layer_stage_[static_cast<size_t>(l)] == static_cast<int>(st))
        wants.push_back({&layer_inputs_[static_cast<size_t>(l)], act, {N, C}});
    carve(*stages_[st].be, wants);
  }
  // Per-layer activations: one set per layer, or with checkpointing a single recompute set per stage;
  // under keep_attention every layer keeps its attention block's tensors besides (below).
  const bool ckpt = opt_.checkpointing != Checkpointing::off;
  const bool keep_attention = opt_.checkpointing == Checkpointing::keep_attention;
  // The attention block's outputs: in the layer's set, or under keep_attention apart, per layer.
  const auto attention_wants = [&](LayerActs& A) {
    return std::vector<Want>{{&A.qkv, act, {N, a.qkv_dim()}},
                             {&A.att, act, {N, a.q_dim() + pad[1]}},
                             {&A.lse, DType::f32, {B_, H, T_}},
                             {&A.x_mid, act, {N, C}}};
  };
  const int n_sets = ckpt ? static_cast<int>(stages_.size()) : static_cast<int>(a.n_layers);
  const auto set_of = [&](int l) { return ckpt ? layer_stage_[static_cast<size_t>(l)] : l; };
  layer_acts_.resize(static_cast<size_t>(a.n_layers));
  std::vector<LayerActs> sets(static_cast<size_t>(n_sets));
  const int64_t r = std::max<int64_t>(opt_.lora_r, 1);
  for (int set = 0; set < n_sets; ++set) {
    LayerActs& A = sets[static_cast<size_t>(set)];
    std::vector<Want> wants = {{&A.ln1, act, {N, C + pad[0]}}, {&A.rstd1, DType::f32, {N}},
                               {&A.ln2, act, {N, C + pad[2]}}, {&A.rstd2, DType::f32, {N}},
                               {&A.gu, act, {N, 2 * F}},       {&A.h, act, {N, F + pad[3]}}};
    if (!keep_attention) {
      const std::vector<Want> attention = attention_wants(A);
      wants.insert(wants.end(), attention.begin(), attention.end());
    }
    carve(ckpt ? *stages_[static_cast<size_t>(set)].be : be(set), wants);
    A.ln1 = A.ln1.col_slice(0, C);
    A.ln2 = A.ln2.col_slice(0, C);
    A.h = A.h.col_slice(0, F);
    if (!keep_attention) A.att = A.att.col_slice(0, a.q_dim());
  }

  // Wire each layer to its activation set (and its kept attention block) and its LoRA parts.
  lora_b_blocks_.assign(stages_.size(), {});
  for (int l = 0; l < a.n_layers; ++l) {
    const int set = set_of(l);
    LayerActs& A = layer_acts_[static_cast<size_t>(l)];
    A = sets[static_cast<size_t>(set)];
    if (keep_attention) {
      carve(be(l), attention_wants(A));
      A.att = A.att.col_slice(0, a.q_dim());
    }
    if (!opt_.lora) continue;
    LoraGroup* const groups[kFusedProjections] = {&A.qkv_lora, &A.o_lora, &A.gate_up_lora, &A.down_lora};
    const Tensor inputs[kFusedProjections] = {A.ln1, A.att, A.ln2, A.h};
    if (ckpt) {
      // The layer's xa, kept from its forward: the recompute copies them back instead of running the
      // adapters' A GEMMs again (N x 112 values a layer for r = 16 on all seven projections). Under
      // keep_attention o's xa stays in the layer's own att padding, so it needs no copy.
      std::vector<Want> saved;
      for (int g = 0; g < kFusedProjections; ++g)
        if (group_modules[static_cast<size_t>(g)] > 0 && !(keep_attention && g == 1))
          saved.push_back({&groups[g]->saved, act, {N, group_modules[static_cast<size_t>(g)] * r}});
      if (!saved.empty()) carve(be(l), saved);
    }
    static const char* const weights[kFusedProjections] = {"self_attn.qkv", "self_attn.o_proj.weight", "mlp.gate_up",
                                                           "mlp.down_proj.weight"};
    for (int g = 0; g < kFusedProjections; ++g) {
      LoraGroup& group = *groups[g];
      const int64_t in_cols = inputs[g].cols(), width = group_modules[static_cast<size_t>(g)] * r;
      const Tensor xa_all = inputs[g].with_cols(in_cols + width).col_slice(in_cols, width);
      const ParamSpec* first_a = nullptr;
      for (int site = 0; site < static_cast<int>(lora_module_names().size()); ++site) {
        const std::string& m = lora_module_names()[static_cast<size_t>(site)];
        if (fused_projection(m) != g || !targets(opt_, m)) continue;
        const std::string p = module_prefix(l, m);
        const ParamSpec* sa = lora_.find(p + ".lora_A.weight");
        if (group.parts.empty()) first_a = sa;
        const ParamSpec* sb = lora_.find(p + ".lora_B.weight");
        LinearPart part;
        part.out = sb->shape[0];
        part.col = 0;
        if (m == "k_proj") part.col = a.q_dim();
        if (m == "v_proj") part.col = a.q_dim() + a.kv_dim();
        if (m == "up_proj") part.col = a.intermediate_size;
        part.a = as_matrix(lora_.compute_view(*sa), sa->shape[0], sa->shape[1]);
        part.b = as_matrix(lora_.compute_view(*sb), sb->shape[0], sb->shape[1]);
        if (!lora_.grad.empty()) {
          part.grad_a = as_matrix(lora_.grad_view(*sa), sa->shape[0], sa->shape[1]);
          part.grad_b = as_matrix(lora_.grad_view(*sb), sb->shape[0], sb->shape[1]);
          part.slot_a = lora_.slot[static_cast<size_t>(sa - lora_.specs.data())];
          part.slot_b = lora_.slot[static_cast<size_t>(sb - lora_.specs.data())];
          group.slots_a.push_back(part.slot_a);
        }
        part.module_index = site;
        part.xa = xa_all.col_slice(static_cast<int64_t>(group.parts.size()) * r, r);
        group.parts.push_back(part);
      }
      if (group.parts.empty()) continue;
      // The parts' A matrices are adjacent (build_params), so together they are one matrix.
      const int64_t in = group.parts.front().a.cols(), rows = static_cast<int64_t>(group.parts.size()) * r;
      group.a = as_matrix(lora_.compute.flat_slice(first_a->offset, rows * in), rows, in);
      if (!lora_.grad.empty()) group.grad_a = as_matrix(lora_.grad.flat_slice(first_a->offset, rows * in), rows, in);
      group.xa = xa_all;
      group.pad = pad[static_cast<size_t>(g)];
      group.fused = fused_weights_;
      if (!group.fused) continue;
      // Each part's B goes into its rows of the weight's padding, at its columns of xa.
      const Tensor w = base_weight(l, weights[g]);
      const Tensor b_columns = w.with_cols(w.cols() + group.pad).col_slice(w.cols(), width);
      for (size_t j = 0; j < group.parts.size(); ++j) {
        const LinearPart& part = group.parts[j];
        lora_b_blocks_[static_cast<size_t>(layer_stage_[static_cast<size_t>(l)])].emplace_back(
            b_columns.row_slice(part.col, part.out).col_slice(static_cast<int64_t>(j) * r, r), part.b);
      }
    }
  }
}

LlamaModel::LayerActs& LlamaModel::acts(int l) { return layer_acts_[static_cast<size_t>(l)]; }
LlamaModel::Stage& LlamaModel::stage(int l) {
  return stages_[static_cast<size_t>(l < 0 ? 0 : layer_stage_[static_cast<size_t>(l)])];
}
Backend& LlamaModel::be(int l) { return *stage(l).be; }

void LlamaModel::write_grad(int l, const std::vector<int>& slots, const std::function<void(float beta)>& fn) {
  ledger_.write(slots, [&](float beta) {
    fn(beta);
    if (l >= 0 && layer_stage_[static_cast<size_t>(l)] != 0) be_.wait_for(be(l));
  });
}

Backend& LlamaModel::owner(const ParamGroup& g, const ParamSpec& p) {
  return &g == &base_ && p.layer >= 0 ? be(static_cast<int>(p.layer)) : be_;
}

Tensor LlamaModel::base_weight(int l, const std::string& suffix) {
  // The fused projections are views over adjacent tensors: q,k,v -> [qkv_dim, C]; gate,up -> [2F, C].
  const LlamaArch& a = opt_.arch;
  const std::string layer = "model.layers." + std::to_string(l) + ".";
  if (opt_.load_in_4bit && l >= 0 && suffix.find("norm") == std::string::npos) {
    if (suffix == "self_attn.qkv")
      return dequantized(l, {base_.find(layer + "self_attn.q_proj.weight"), base_.find(layer + "self_attn.k_proj.weight"),
                             base_.find(layer + "self_attn.v_proj.weight")});
    if (suffix == "mlp.gate_up")
      return dequantized(l, {base_.find(layer + "mlp.gate_proj.weight"), base_.find(layer + "mlp.up_proj.weight")});
    return dequantized(l, {base_.find(layer + suffix)});
  }
  if (suffix == "self_attn.qkv" || suffix == "mlp.gate_up") {
    const bool qkv = suffix == "self_attn.qkv";
    const ParamSpec* first = base_.find("model.layers." + std::to_string(l) + (qkv ? ".self_attn.q_proj.weight" : ".mlp.gate_proj.weight"));
    const int64_t rows = qkv ? a.qkv_dim() : 2 * a.intermediate_size;
    const Tensor at = base_.compute_view(*first);
    Tensor fused(at.data, at.dtype, at.device, {rows, a.hidden_size});
    if (at.ndim == 2) fused.row_stride = at.ld();  // padded rows (fused LoRA)
    return fused;
  }
  const std::string name = l < 0 ? suffix : "model.layers." + std::to_string(l) + "." + suffix;
  const ParamSpec* p = base_.find(name);
  RT_ASSERT(p, "no parameter " + name);
  Tensor t = base_.compute_view(*p);
  return p->shape.size() == 2 && t.ndim != 2 ? as_matrix(t, p->shape[0], p->shape[1]) : t;
}

// QLoRA: the NF4 weights of `parts` (adjacent rows of one fused projection) dequantized, one after
// the other, into the stage's scratch; the GEMM that follows on the same stream reads them.
Tensor LlamaModel::dequantized(int l, const std::vector<const ParamSpec*>& parts) {
  Stage& S = stage(l);
  int64_t rows = 0, offset = 0;
  for (const ParamSpec* p : parts) {
    RT_ASSERT(p && quant_[static_cast<size_t>(p - base_.specs.data())], "no NF4 weight set for a layer linear");
    be(l).nf4_dequantize(S.weight_scratch.flat_slice(offset, p->numel),
                         quant_[static_cast<size_t>(p - base_.specs.data())]->dev);
    offset += p->numel;
    rows += p->shape[0];
  }
  return Tensor(S.weight_scratch.data, S.weight_scratch.dtype, S.weight_scratch.device, {rows, parts.front()->shape[1]});
}

int LlamaModel::base_slot(int l, const std::string& suffix) const {
  const std::string name = l < 0 ? suffix : "model.layers." + std::to_string(l) + "." + suffix;
  const ParamSpec* p = base_.find(name);
  RT_ASSERT(p, "no parameter " + name);
  return base_.slot[static_cast<size_t>(p - base_.specs.data())];
}

// ---- weights ---------------------------------------------------------------------------------------------

void LlamaModel::init_base_random(uint64_t seed) {
  std::vector<float> host(static_cast<size_t>(base_.numel));
  // Normal(0, 0.02) by Box-Muller, in blocks of 2^20 values with a stream each (seeded by the
  // tensor and block), so the blocks fill in parallel and the values do not depend on the threads.
  constexpr int64_t kBlock = int64_t{1} << 20;
  for (size_t t = 0; t < base_.specs.size(); ++t) {
    const ParamSpec& p = base_.specs[t];
    float* w = host.data() + p.offset;
    if (p.is_norm) {
      std::fill(w, w + p.numel, 1.0f);
      continue;
    }
    const int64_t n_blocks = (p.numel + kBlock - 1) / kBlock;
#pragma omp parallel for schedule(static)
    for (int64_t blk = 0; blk < n_blocks; ++blk) {
      uint64_t state = mix_seed(seed, t, static_cast<uint64_t>(blk));
      const int64_t end = std::min(p.numel, (blk + 1) * kBlock);
      for (int64_t i = blk * kBlock; i < end; i += 2) {
        const double u1 = std::max(uniform01(state), 1e-300), u2 = uniform01(state);
        const double rad = std::sqrt(-2.0 * std::log(u1));
        w[i] = static_cast<float>(0.02 * rad * std::cos(2 * M_PI * u2));
        if (i + 1 < end) w[i + 1] = static_cast<float>(0.02 * rad * std::sin(2 * M_PI * u2));
      }
    }
  }
  for (const auto& p : base_.specs)
    set_tensor(p.name, std::vector<float>(host.begin() + p.offset, host.begin() + p.offset + p.numel));
}

void LlamaModel::init_lora(uint64_t seed) {
  uint64_t state = seed ^ 0x5EEDl;
  for (const auto& p : lora_.specs) {
    std::vector<float> w(static_cast<size_t>(p.numel), 0.0f);
    if (p.name.find("lora_A") != std::string::npos) {
      const double bound = 1.0 / std::sqrt(static_cast<double>(p.shape[1]));
      for (auto& x : w) x = static_cast<float>((2 * uniform01(state) - 1) * bound);
    }
    set_tensor(p.name, w);
  }
}

void LlamaModel::set_tensor(const std::string& name, const std::vector<float>& values) {
  ParamGroup* g = base_.find(name) ? &base_ : (lora_.find(name) ? &lora_ : nullptr);
  RT_REQUIRE(g, "unknown tensor " + name);
  const ParamSpec& p = *g->find(name);
  RT_REQUIRE(static_cast<int64_t>(values.size()) == p.numel,
             "tensor " + name + ": expected " + std::to_string(p.numel) + " values, got " + std::to_string(values.size()));
  if (g == &base_ && opt_.load_in_4bit && is_layer_linear(p)) {
    set_nf4(name, nf4_quantize(values, p.shape));
    return;
  }
  Backend& b = owner(*g, p);
  if (!g->master.empty() && g->master.data != g->compute.data) b.upload(g->master_view(p), values.data());
  if (b.act_dtype() == DType::f32) {
    b.upload(g->compute_view(p), values.data());
  } else {
    std::vector<uint16_t> bf(values.size());
    for (size_t i = 0; i < values.size(); ++i) bf[i] = f32_to_bf16(values[i]);
    b.upload(g->compute_view(p), bf.data());
  }
}

bool LlamaModel::quantized(const std::string& name) const {
  const ParamSpec* p = base_.find(name);
  return p && opt_.load_in_4bit && is_layer_linear(*p);
}

void LlamaModel::set_nf4(const std::string& name, const Nf4Tensor& weight) {
  const ParamSpec* p = base_.find(name);
  RT_REQUIRE(p && quantized(name), "set_nf4: " + name + " is not a linear weight of a model loaded in 4 bits");
  RT_REQUIRE(weight.shape == p->shape, name + ": the NF4 weight has shape " + shape_string(weight.shape) +
                                           ", the model expects " + shape_string(p->shape));
  auto q = std::make_unique<QuantWeight>();
  q->host = weight;
  const Nf4Tensor& h = q->host;
  const bool dq = h.double_quant;
  // One buffer: packed codes, absmax codes, nested absmax, nested map (or fp32 absmax), 256-aligned.
  const auto align = [](size_t n) { return (n + 255) / 256 * 256; };
  const size_t packed = align(h.packed.size()), codes = dq ? align(h.absmax_codes.size()) : 0,
               nested = dq ? align(h.nested_absmax.size() * 4) : 0, map = dq ? align(256 * 4) : 0,
               absmax = dq ? 0 : align(h.absmax.size() * 4);
  Backend& b = be(static_cast<int>(p->layer));
  q->buf = b.alloc(packed + codes + nested + map + absmax);
  Nf4Weight& d = q->dev;
  d.numel = h.numel();
  d.packed = q->buf.as(DType::u8, {static_cast<int64_t>(h.packed.size())});
  b.upload(d.packed, h.packed.data());
  if (dq) {
    d.absmax_codes = q->buf.as(DType::u8, {static_cast<int64_t>(h.absmax_codes.size())}, packed);
    d.nested_absmax = q->buf.as(DType::f32, {static_cast<int64_t>(h.nested_absmax.size())}, packed + codes);
    d.nested_map = q->buf.as(DType::f32, {256}, packed + codes + nested);
    d.offset = h.offset;
    b.upload(d.absmax_codes, h.absmax_codes.data());
    b.upload(d.nested_absmax, h.nested_absmax.data());
    b.upload(d.nested_map, h.nested_quant_map.data());
  } else {
    d.absmax = q->buf.as(DType::f32, {static_cast<int64_t>(h.absmax.size())}, packed);
    b.upload(d.absmax, h.absmax.data());
  }
  quant_[static_cast<size_t>(p - base_.specs.data())] = std::move(q);
}

std::vector<float> LlamaModel::get_tensor(const std::string& name) {
  if (quantized(name)) {
    const auto& q = quant_[static_cast<size_t>(base_.find(name) - base_.specs.data())];
    RT_REQUIRE(q != nullptr, "tensor " + name + " was never set");
    return nf4_dequantize(q->host);
  }
  ParamGroup* g = base_.find(name) ? &base_ : (lora_.find(name) ? &lora_ : nullptr);
  RT_REQUIRE(g, "unknown tensor " + name);
  const ParamSpec& p = *g->find(name);
  std::vector<float> out(static_cast<size_t>(p.numel));
  Backend& b = owner(*g, p);
  if (b.act_dtype() == DType::f32) {
    b.download(out.data(), g->compute_view(p));
  } else {
    std::vector<uint16_t> bf(out.size());
    b.download(bf.data(), g->compute_view(p));
    for (size_t i = 0; i < out.size(); ++i) out[i] = bf16_to_f32(bf[i]);
  }
  return out;
}

std::vector<float> LlamaModel::get_grad(const std::string& name) {
  ParamGroup* g = base_.find(name) ? &base_ : (lora_.find(name) ? &lora_ : nullptr);
  RT_REQUIRE(g && !g->grad.empty(), "no gradient for " + name);
  const ParamSpec& p = *g->find(name);
  std::vector<float> out(static_cast<size_t>(p.numel));
  be_.download(out.data(), g->grad_view(p));
  return out;
}

// ---- forward -----------------------------------------------------------------------------------------------

void LlamaModel::upload_inputs(const ModelInputs& in) {
  RT_ASSERT(in.batch >= 1 && in.batch <= opt_.max_batch && in.seq_len >= 1 && in.seq_len <= opt_.max_seq,
            "batch larger than the model was planned for");
  B_ = in.batch;
  T_ = in.seq_len;
  N_ = in.batch * in.seq_len;
  // The datasets check every id when they open (a bad one is an exit-2 message); this keeps any other
  // caller from indexing the embedding out of bounds.
  for (int64_t i = 0; i < N_; ++i)
    RT_ASSERT(in.tokens[i] >= 0 && in.tokens[i] < opt_.arch.vocab_size,
              "token id " + std::to_string(in.tokens[i]) + " at " + std::to_string(i) + " outside the vocabulary of " +
                  std::to_string(opt_.arch.vocab_size));
  be_.upload(tokens_.flat_slice(0, N_), in.tokens);
  be_.upload(targets_.flat_slice(0, N_), in.targets);
  have_doc_ids_ = in.doc_ids != nullptr;
  for (Stage& st : stages_) {
    st.be->upload(st.positions.flat_slice(0, N_), in.positions);
    if (have_doc_ids_) st.be->upload(st.doc_ids.flat_slice(0, N_), in.doc_ids);
  }
}

// y = x W^T (+ the LoRA parts: y[:, col:col+out] += s drop(x) A^T B^T). The parts' products
// xa = s drop(x) A^T go first, into x's padding columns; with y empty only they are computed (what
// backward needs from a recompute).
//
// Fused (LoRA over bf16 weights): forward() has copied each part's B into the weight's padding, at
// the rows of its output columns and the columns of its xa, so one GEMM over both,
// [x | xa] [W | B]^T, adds the adapters' product to the base one: no GEMM of their own over y, and
// no second pass over y. Over NF4 weights the parts' B products write y first and the base GEMM
// adds x W^T in its epilogue (or the other way round when the parts leave columns uncovered).
void LlamaModel::linear_forward(Tensor y, Tensor x, int l, const LoraGroup& lora, Tensor weight, uint64_t dropout_seed,
                                bool xa_in_place) {
  Backend& b = be(l);
  const std::vector<LinearPart>& parts = lora.parts;
  const float s = opt_.lora_scaling;
  const bool dropout = opt_.lora_dropout > 0 && training_;
  if (!parts.empty() && !xa_in_place) {
    if (!dropout) {
      // Every part sees the same x: one GEMM for all their xa.
      b.matmul(lora.xa.row_slice(0, N_), x, lora.a, false, true, s, 0.f);
    } else {
      for (const LinearPart& part : parts) {
        Tensor xin = stage(l).drop_scratch.row_slice(0, N_).col_slice(0, x.cols());
        b.dropout(xin, x, opt_.lora_dropout,
                  mix_seed(dropout_seed, static_cast<uint64_t>(l), static_cast<uint64_t>(part.module_index)));
        b.matmul(part.xa.row_slice(0, N_), xin, part.a, false, true, s, 0.f);
      }
    }
  }
  if (y.empty()) return;
  if (parts.empty()) {
    b.matmul(y, x, weight, false, true, 1.f, 0.f);
    return;
  }
  if (lora.fused) {
    const int64_t k = x.cols() + lora.pad;
    b.matmul(y, x.with_cols(k), weight.with_cols(k), false, true, 1.f, 0.f);
    return;
  }
  int64_t covered = 0;
  for (const LinearPart& part : parts) covered += part.out;
  const bool adapters_first = covered == y.cols();
  if (!adapters_first) b.matmul(y, x, weight, false, true, 1.f, 0.f);
  for (const LinearPart& part : parts)
    b.matmul(y.col_slice(part.col, part.out), part.xa.row_slice(0, N_), part.b, false, true, 1.f,
             adapters_first ? 0.f : 1.f);
  if (adapters_first) b.matmul(y, x, weight, false, true, 1.f, 1.f);
}

void LlamaModel::layer_forward(int l, bool recompute, uint64_t dropout_seed) {
  const LlamaArch& a = opt_.arch;
  LayerActs& A = acts(l);
  Stage& S = stage(l);
  Backend& b = *S.be;
  const int64_t N = N_, C = a.hidden_size, F = a.intermediate_size;
  const float eps = static_cast<float>(a.rms_norm_eps);
  Tensor x_in = layer_inputs_[static_cast<size_t>(l)].row_slice(0, N);
  Tensor ln1 = A.ln1.row_slice(0, N), qkv = A.qkv.row_slice(0, N), att = A.att.row_slice(0, N);
  Tensor x_mid = A.x_mid.row_slice(0, N), ln2 = A.ln2.row_slice(0, N), gu = A.gu.row_slice(0, N),
         h = A.h.row_slice(0, N);
  Tensor delta = S.delta.row_slice(0, N);

  // In the plain forward, ln1 was written by the previous layer's fused residual + norm.
  if (recompute || l == 0)
    b.residual_rmsnorm_forward(Tensor(), ln1, A.rstd1.flat_slice(0, N), x_in, Tensor(),
                                 base_weight(l, "input_layernorm.weight"), eps);
  // The LoRA products xa the forward kept (checkpointing) go back into the inputs' padding.
  const bool xa_in_place = recompute && opt_.lora;
  if (xa_in_place) copy_saved_xa(l, /*to_saved=*/false);
  if (recompute && opt_.checkpointing == Checkpointing::keep_attention) {
    // The attention block's outputs were kept: only ln2, from the kept residual.
    b.residual_rmsnorm_forward(Tensor(), ln2, A.rstd2.flat_slice(0, N), x_mid, Tensor(),
                               base_weight(l, "post_attention_layernorm.weight"), eps);
  } else {
    // Attention block.
    linear_forward(qkv, ln1, l, A.qkv_lora, base_weight(l, "self_attn.qkv"), dropout_seed, xa_in_place);
    Tensor q = qkv.col_slice(0, a.q_dim()), k = qkv.col_slice(a.q_dim(), a.kv_dim()),
           v = qkv.col_slice(a.q_dim() + a.kv_dim(), a.kv_dim());
    Tensor pos = S.positions.flat_slice(0, N);
    // q's and k's heads are adjacent columns of qkv: one rotation over both.
    b.rope_forward(qkv.col_slice(0, a.q_dim() + a.kv_dim()), pos, S.rope_cos, S.rope_sin, a.head_dim);
    attend(l, att, A.lse.flat_slice(0, B_ * a.n_heads * T_), q, k, v);
    linear_forward(delta, att, l, A.o_lora, base_weight(l, "self_attn.o_proj.weight"), dropout_seed, xa_in_place);
    b.residual_rmsnorm_forward(x_mid, ln2, A.rstd2.flat_slice(0, N), x_in, delta,
                               base_weight(l, "post_attention_layernorm.weight"), eps);
  }
  // MLP block.
  linear_forward(gu, ln2, l, A.gate_up_lora, base_weight(l, "mlp.gate_up"), dropout_seed, xa_in_place);
  if (!(recompute && swiglu_in_backward())) b.swiglu_forward(h, gu.col_slice(0, F), gu.col_slice(F, F));
  if (recompute) return;  // backward needs the down projection's xa (back in place), not its output
  linear_forward(delta, h, l, A.down_lora, base_weight(l, "mlp.down_proj.weight"), dropout_seed);
  if (training_ && opt_.lora && opt_.checkpointing != Checkpointing::off) copy_saved_xa(l, /*to_saved=*/true);
  // Residual add fused with the next norm: the next layer's input and its ln1, or the final norm
  // (written into the next stage's or the first stage's memory when they are on another GPU).
  if (l + 1 < a.n_layers) {
    LayerActs& next = acts(l + 1);
    b.residual_rmsnorm_forward(layer_inputs_[static_cast<size_t>(l + 1)].row_slice(0, N), next.ln1.row_slice(0, N),
                                 next.rstd1.flat_slice(0, N), x_mid, delta,
                                 base_weight(l + 1, "input_layernorm.weight"), eps);
  } else {
    b.residual_rmsnorm_forward(x_final_.row_slice(0, N), ln_final_.row_slice(0, N), rstd_final_.flat_slice(0, N),
                                 x_mid, delta, base_weight(-1, "model.norm.weight"), eps);
  }
  (void)C;
}

void LlamaModel::copy_saved_xa(int l, bool to_saved) {
  LayerActs& A = acts(l);
  std::vector<std::pair<Tensor, Tensor>> copies;
  for (const LoraGroup* g : {&A.qkv_lora, &A.o_lora, &A.gate_up_lora, &A.down_lora}) {
    if (g->saved.empty()) continue;
    const Tensor saved = g->saved.row_slice(0, N_), xa = g->xa.row_slice(0, N_);
    copies.emplace_back(to_saved ? saved : xa, to_saved ? xa : saved);
  }
  if (!copies.empty()) be(l).copy_batch(copies);
}

// Causal self-attention over this pass's tokens; a prefill also keeps every sequence's rotated keys
// and values in the cache, and a decode step appends its one token's to the cache and attends to
// all of it.
void LlamaModel::attend(int l, Tensor att, Tensor lse, Tensor q, Tensor k, Tensor v) {
  const LlamaArch& a = opt_.arch;
  Backend& b = be(l);
  const float scale = 1.0f / std::sqrt(static_cast<float>(a.head_dim));
  Tensor k_cache = kv_.k.empty() ? Tensor() : kv_.k[static_cast<size_t>(l)];
  Tensor v_cache = kv_.v.empty() ? Tensor() : kv_.v[static_cast<size_t>(l)];
  if (pass_ == Pass::decode) {
    b.copy(position_rows(k_cache, kv_.len), k);
    b.copy(position_rows(v_cache, kv_.len), v);
    const AttnShape shape{B_, kv_.max_len, a.n_heads, a.n_kv_heads, a.head_dim, scale};
    b.attention_decode(att, q, k_cache, v_cache, kv_.len + 1, shape);
    return;
  }
  const AttnShape shape{B_, T_, a.n_heads, a.n_kv_heads, a.head_dim, scale};
  b.attention_forward(att, lse, q, k, v, have_doc_ids_ ? stage(l).doc_ids.flat_slice(0, N_) : Tensor(), shape);
  if (pass_ != Pass::prefill) return;
  for (int64_t seq = 0; seq < B_; ++seq) {
    b.copy(sequence_rows(k_cache, seq, T_), k.row_slice(seq * T_, T_));
    b.copy(sequence_rows(v_cache, seq, T_), v.row_slice(seq * T_, T_));
  }
}

void LlamaModel::forward(const ModelInputs& in, bool training, uint64_t dropout_seed) {
  training_ = training;  // LoRA dropout only while training (also in its recompute), never in eval
  upload_inputs(in);
  const int last = static_cast<int>(opt_.arch.n_layers) - 1;
  const auto weights = [&](int layer) {
    if (before_forward_weights) before_forward_weights(layer);
  };
  weights(-1);
  be_.embedding_forward(layer_inputs_[0].row_slice(0, N_), tokens_.flat_slice(0, N_),
                        base_weight(-1, "model.embed_tokens.weight"));
  const bool offload = training && !host_inputs_.empty();
  for (int l = 0; l <= last; ++l) {
    // A stage starts when the previous one has written its first layer's input, and its fused LoRA
    // weights take the adapters' current B matrices (the optimizer's, or set_tensor's).
    const int st = layer_stage_[static_cast<size_t>(l)];
    const bool stage_start = l == 0 || st != layer_stage_[static_cast<size_t>(l - 1)];
    if (l > 0 && stage_start) be(l).wait_for(be(l - 1));
    if (stage_start && !lora_b_blocks_[static_cast<size_t>(st)].empty())
      be(l).copy_batch(lora_b_blocks_[static_cast<size_t>(st)]);
    if (offload) {
      // Layer l's input is complete: off to the host while the layer runs. The layer ends by writing
      // layer l+1's input into the slot that held layer l-1's, whose copy must be done by then.
      to_host_ticket_[static_cast<size_t>(l)] =
          be_.copy_to_host_async(host_inputs_[static_cast<size_t>(l)].row_slice(0, N_),
                                 layer_inputs_[static_cast<size_t>(l)].row_slice(0, N_));
      if (l >= 1 && l < last) be_.wait_copy(to_host_ticket_[static_cast<size_t>(l - 1)]);
    }
    weights(l);
    layer_forward(l, /*recompute=*/false, dropout_seed);
  }
  weights(last + 1);
  slot_holds_[last % 2] = last;
  slot_holds_[(last + 1) % 2] = last >= 1 ? last - 1 : -1;
  be_.wait_for(be(last));  // the head reads the last stage's output
}

// The LM head fused with cross-entropy, chunk by chunk: logits = ln_final W^T in the activation
// dtype (bf16 on the GPU, as under HF's autocast; the softmax runs in fp32), loss per row, and in
// training dlogits (written over the logits) -> d ln_final (into the first stage's dln) and the
// head's weight gradient.
void LlamaModel::head_loss(int64_t n_rows, bool backward, float grad_scale, std::vector<float>* logits_out) {
  const LlamaArch& a = opt_.arch;
  const int64_t V = a.vocab_size, C = a.hidden_size;
  const std::string head_name = a.tie_word_embeddings ? "model.embed_tokens.weight" : "lm_head.weight";
  Tensor w = base_weight(-1, head_name);
  Tensor dln = stages_[0].dln.flat_slice(0, n_rows * C).view({n_rows, C});
  auto pass = [&](float beta, Tensor dw) {
    for (int64_t r0 = 0; r0 < n_rows; r0 += loss_chunk_) {
      const int64_t n = std::min(loss_chunk_, n_rows - r0);
      Tensor logits = logits_.row_slice(0, n);
      Tensor x = ln_final_.row_slice(r0, n);
      be_.matmul(logits, x, w, false, true, 1.f, 0.f);
      if (logits_out) append_floats(be_, logits_out, logits);
      be_.cross_entropy(losses_.flat_slice(r0, n), backward ? logits : Tensor(), logits, targets_.flat_slice(r0, n),
                        grad_scale);
      if (!backward) continue;
      const Tensor& dlogits = logits;
      be_.matmul(dln.row_slice(r0, n), dlogits, w, false, false, 1.f, 0.f);
      if (!dw.empty()) be_.matmul(dw, dlogits, x, true, false, 1.f, r0 == 0 ? beta : 1.f);
    }
  };
  if (backward && opt_.train_base) {
    const ParamSpec* p = base_.find(head_name);
    Tensor dw = as_matrix(base_.grad_view(*p), V, C);
    write_grad(-1, {base_slot(-1, head_name)}, [&](float beta) { pass(beta, dw); });
  } else {
    pass(0.f, Tensor());
  }
}

// The sum of the first n_rows token losses of the last head pass. It synchronizes with the device,
// so training calls it after queueing the whole backward.
double LlamaModel::sum_losses(int64_t n_rows) {
  std::vector<float> losses(static_cast<size_t>(n_rows));
  be_.download(losses.data(), losses_.flat_slice(0, n_rows));
  double sum = 0;
  for (float x : losses) sum += x;
  return sum;
}

double LlamaModel::forward_loss(const ModelInputs& in, std::vector<float>* logits) {
  forward(in, false, 0);
  if (logits) logits->clear();
  head_loss(N_, false, 0.f, logits);
  return sum_losses(N_);
}

// ---- generation with a KV cache ------------------------------------------------------------------------

void LlamaModel::prefill(int64_t batch, int64_t max_len, int64_t n_tokens, const int32_t* tokens) {
  const LlamaArch& a = opt_.arch;
  RT_ASSERT(batch >= 1 && batch <= opt_.max_batch, "prefill: batch of " + std::to_string(batch) +
                                                       " sequences, the model was planned for " + std::to_string(opt_.max_batch));
  RT_ASSERT(max_len >= 1 && max_len <= opt_.max_seq && n_tokens >= 0 && n_tokens <= max_len,
            "prefill: " + std::to_string(n_tokens) + " tokens into a cache of " + std::to_string(max_len) +
                " positions, max_seq " + std::to_string(opt_.max_seq));
  // One buffer for every layer's keys and values, kept (and reused) for the next generation.
  const DType act = be_.act_dtype();
  const int64_t per_tensor = batch * max_len * a.kv_dim();
  const size_t tensor_bytes = static_cast<size_t>(per_tensor) * dtype_size(act);
  // Each stage's layers' caches on its GPU.
  kv_.buffers.resize(stages_.size());
  std::vector<size_t> at(stages_.size(), 0);
  for (size_t st = 0; st < stages_.size(); ++st) {
    const size_t bytes = 2 * static_cast<size_t>(opt_.stage_layers[st]) * tensor_bytes;
    if (kv_.buffers[st].bytes() < bytes) {
      kv_.buffers[st] = Buffer();  // free the old cache before allocating the larger one
      kv_.buffers[st] = stages_[st].be->alloc(bytes);
    }
  }
  kv_.k.clear();
  kv_.v.clear();
  for (int64_t l = 0; l < a.n_layers; ++l) {
    const size_t st = static_cast<size_t>(layer_stage_[static_cast<size_t>(l)]);
    kv_.k.push_back(kv_.buffers[st].as(act, {batch, max_len, a.kv_dim()}, at[st]));
    kv_.v.push_back(kv_.buffers[st].as(act, {batch, max_len, a.kv_dim()}, at[st] + tensor_bytes));
    at[st] += 2 * tensor_bytes;
  }
  kv_.batch = batch;
  kv_.max_len = max_len;
  kv_.len = 0;
  if (n_tokens == 0) return;

  const std::vector<int32_t> targets(static_cast<size_t>(batch * n_tokens), -100);
  std::vector<int32_t> positions(targets.size());
  for (size_t i = 0; i < positions.size(); ++i) positions[i] = static_cast<int32_t>(static_cast<int64_t>(i) % n_tokens);
  pass_ = Pass::prefill;
  forward(ModelInputs{batch, n_tokens, tokens, targets.data(), positions.data(), nullptr}, false, 0);
  pass_ = Pass::normal;
  kv_.len = n_tokens;
}

std::vector<float> LlamaModel::decode_step(const std::vector<int32_t>& tokens) {
  const int64_t B = kv_.batch;
  RT_ASSERT(B >= 1 && static_cast<int64_t>(tokens.size()) == B,
            "decode_step: " + std::to_string(tokens.size()) + " tokens for " + std::to_string(B) + " sequences");
  RT_ASSERT(kv_.len < kv_.max_len, "decode_step: the KV cache's " + std::to_string(kv_.max_len) + " positions are full");
  const std::vector<int32_t> targets(static_cast<size_t>(B), -100);
  const std::vector<int32_t> positions(static_cast<size_t>(B), static_cast<int32_t>(kv_.len));
  pass_ = Pass::decode;
  forward(ModelInputs{B, 1, tokens.data(), targets.data(), positions.data(), nullptr}, false, 0);
  pass_ = Pass::normal;
  ++kv_.len;
  return head_logits(B);
}

// The LM head alone: logits = ln_final W^T for the first n_rows rows, chunk by chunk, to the host.
std::vector<float> LlamaModel::head_logits(int64_t n_rows) {
  const LlamaArch& a = opt_.arch;
  const int64_t V = a.vocab_size;
  Tensor w = base_weight(-1, a.tie_word_embeddings ? "model.embed_tokens.weight" : "lm_head.weight");
  std::vector<float> logits;
  logits.reserve(static_cast<size_t>(n_rows * V));
  for (int64_t r0 = 0; r0 < n_rows; r0 += loss_chunk_) {
    const int64_t n = std::min(loss_chunk_, n_rows - r0);
    Tensor chunk = logits_.row_slice(0, n);
    be_.matmul(chunk, ln_final_.row_slice(r0, n), w, false, true, 1.f, 0.f);
    append_floats(be_, &logits, chunk);
  }
  return logits;
}

// ---- backward ---------------------------------------------------------------------------------------------

// Given dy = d loss / d y for y = x W^T (+ LoRA parts): dx = dy W (+ LoRA), written (not
// accumulated) when dx is non-empty; the weight's and adapters' gradients through the ledger. With
// u = dy B per part, side by side in [N, parts * r], and xa = s drop(x) A^T from the forward:
// dB = dy^T xa, dA = s u^T drop(x), dx += s drop'(u A).
// Fused, the dgrad GEMM over the padded weight, dy [W | B], writes dx and, into dx's padding, u.
void LlamaModel::linear_backward(Tensor dx, Tensor dy, Tensor x, int l, const LoraGroup& lora, Tensor weight,
                                 const std::vector<int>& weight_slots, uint64_t dropout_seed,
                                 const std::function<void()>& x_ready) {
  Backend& b = be(l);
  Stage& S = stage(l);
  const std::vector<LinearPart>& parts = lora.parts;
  if (parts.empty()) {
    if (!dx.empty()) b.matmul(dx, dy, weight, false, false, 1.f, 0.f);
    if (x_ready) x_ready();
    if (!opt_.train_base || weight_slots.empty()) return;
    const ParamSpec& first = *std::find_if(base_.specs.begin(), base_.specs.end(), [&](const ParamSpec& p) {
      return base_.slot[static_cast<size_t>(&p - base_.specs.data())] == weight_slots.front();
    });
    Tensor dw = base_.grad.flat_slice(first.offset, weight.numel()).view({weight.rows(), weight.cols()});
    write_grad(l, weight_slots, [&](float beta) { b.matmul(dw, dy, x, true, false, 1.f, beta); });
    return;
  }
  const int64_t r = opt_.lora_r, width = static_cast<int64_t>(parts.size()) * r;
  const float s = opt_.lora_scaling;
  const bool dropout = opt_.lora_dropout > 0;
  RT_ASSERT(!(dropout && x_ready), "linear_backward: with LoRA dropout x is read before dx is complete");
  // Unfused with dropout the parts add their dx terms one by one, onto dy W.
  if (!dx.empty() && !lora.fused && dropout) b.matmul(dx, dy, weight, false, false, 1.f, 0.f);
  Tensor u;
  if (lora.fused && !dx.empty()) {
    const int64_t k = dx.cols() + lora.pad;
    b.matmul(dx.with_cols(k), dy, weight.with_cols(k), false, false, 1.f, 0.f);
    u = dx.with_cols(k).col_slice(dx.cols(), width);
  } else {
    u = S.dxa.flat_slice(0, N_ * width).view({N_, width});
    if (lora.fused) {
      b.matmul(u, dy, weight.with_cols(weight.cols() + lora.pad).col_slice(weight.cols(), width), false, false, 1.f,
               0.f);
    } else {
      for (size_t j = 0; j < parts.size(); ++j)
        b.matmul(u.col_slice(static_cast<int64_t>(j) * r, r), dy.col_slice(parts[j].col, parts[j].out), parts[j].b,
                 false, false, 1.f, 0.f);
    }
  }
  for (size_t j = 0; j < parts.size(); ++j) {
    const LinearPart& part = parts[j];
    Tensor dy_part = dy.col_slice(part.col, part.out);
    Tensor u_part = u.col_slice(static_cast<int64_t>(j) * r, r);
    if (!part.grad_b.empty())
      write_grad(l, {part.slot_b}, [&](float beta) {
        b.matmul(part.grad_b, dy_part, part.xa.row_slice(0, N_), true, false, 1.f, beta);  // dy^T xa
      });
    if (!dropout) continue;
    // With dropout each part saw its own mask of x: its A gradient and dx term one by one.
    const uint64_t seed = mix_seed(dropout_seed, static_cast<uint64_t>(l), static_cast<uint64_t>(part.module_index));
    Tensor xin = S.drop_scratch.row_slice(0, N_).col_slice(0, x.cols());
    b.dropout(xin, x, opt_.lora_dropout, seed);
    if (!part.grad_a.empty())
      write_grad(l, {part.slot_a}, [&](float beta) {
        b.matmul(part.grad_a, u_part, xin, true, false, s, beta);  // s u^T drop(x)
      });
    if (dx.empty()) continue;
    Tensor tmp = S.lora_tmp.row_slice(0, N_).col_slice(0, dx.cols());
    b.matmul(tmp, u_part, part.a, false, false, s, 0.f);
    b.dropout(tmp, tmp, opt_.lora_dropout, seed);
    b.add(dx, tmp);
  }
  if (dropout) return;
  // Without dropout: every part's dx term in one GEMM (s u A), then, once x is ready, their A
  // gradients in one, s u^T x.
  if (!dx.empty()) {
    if (lora.fused) {
      b.matmul(dx, u, lora.a, false, false, s, 1.f);
    } else {
      // Unfused: the adapters write dx first and the base GEMM adds dy W in its epilogue.
      b.matmul(dx, u, lora.a, false, false, s, 0.f);
      b.matmul(dx, dy, weight, false, false, 1.f, 1.f);
    }
  }
  if (x_ready) x_ready();
  if (!lora.grad_a.empty())
    write_grad(l, lora.slots_a, [&](float beta) { b.matmul(lora.grad_a, u, x, true, false, s, beta); });
}

void LlamaModel::layer_backward(int l, uint64_t dropout_seed) {
  const LlamaArch& a = opt_.arch;
  // With checkpointing the layer's activations are recomputed, except for the last layer of a stage:
  // its forward, just before the head, left them in the stage's set, and no later layer of the stage
  // has overwritten them.
  const bool last_of_stage =
      l + 1 == a.n_layers || layer_stage_[static_cast<size_t>(l) + 1] != layer_stage_[static_cast<size_t>(l)];
  const bool recomputed = opt_.checkpointing != Checkpointing::off && !last_of_stage;
  if (recomputed) {
    layer_forward(l, /*recompute=*/true, dropout_seed);
    ++layers_recomputed_;
  }
  LayerActs& A = acts(l);
  Stage& S = stage(l);
  Backend& b = *S.be;
  const int64_t N = N_, C = a.hidden_size, F = a.intermediate_size;
  Tensor x_in = layer_inputs_[static_cast<size_t>(l)].row_slice(0, N);
  Tensor dres = S.dres.row_slice(0, N);
  // d(gate_up) overwrites gate_up itself (SwiGLU's backward reads each element before writing it,
  // and nothing after needs gate_up): one [N, 2F] buffer less.
  Tensor dh = S.dh.row_slice(0, N), dgu = A.gu.row_slice(0, N);
  // The norms' input gradients, each projection's dx: as wide as its padding (fused LoRA's dy B).
  const auto dln_of = [&](const LoraGroup& g) {
    return S.dln.flat_slice(0, N * (C + g.pad)).view({N, C + g.pad}).col_slice(0, C);
  };
  Tensor dln_mlp = dln_of(A.gate_up_lora), dln_attention = dln_of(A.qkv_lora);
  Tensor dqkv = S.dqkv.row_slice(0, N), datt = S.datt.row_slice(0, N);
  const bool full = opt_.train_base;
  auto slots = [&](std::initializer_list<const char*> names) {
    std::vector<int> s;
    if (full)
      for (const char* n : names) s.push_back(base_slot(l, n));
    return s;
  };
  // The inputs of layer 0 need no gradient unless the embedding is trained.
  const bool need_dx = l > 0 || full;

  // MLP: d = h Wd^T; x_out = x_mid + d. A recomputed layer's h comes from the SwiGLU backward,
  // once dh is complete and before the down projection's weight gradients read it.
  const bool h_in_backward = recomputed && swiglu_in_backward();
  Tensor h = A.h.row_slice(0, N), gu = A.gu.row_slice(0, N);
  const auto swiglu_back = [&] {
    b.swiglu_backward(dgu.col_slice(0, F), dgu.col_slice(F, F), dh, gu.col_slice(0, F), gu.col_slice(F, F),
                      h_in_backward ? h : Tensor());
  };
  linear_backward(dh, dres, h, l, A.down_lora, base_weight(l, "mlp.down_proj.weight"), slots({"mlp.down_proj.weight"}),
                  dropout_seed, h_in_backward ? std::function<void()>(swiglu_back) : nullptr);
  if (!h_in_backward) swiglu_back();
  linear_backward(dln_mlp, dgu, A.ln2.row_slice(0, N), l, A.gate_up_lora, base_weight(l, "mlp.gate_up"),
                  slots({"mlp.gate_proj.weight", "mlp.up_proj.weight"}), dropout_seed);
  auto norm_backward = [&](Tensor dln, Tensor x, const char* wname, Tensor rstd) {
    Tensor dw;
    if (full) {
      const ParamSpec* p = base_.find("model.layers." + std::to_string(l) + "." + wname);
      dw = base_.grad_view(*p);
      write_grad(l, {base_slot(l, wname)}, [&](float beta) {
        b.rmsnorm_backward(dres, dw, beta, dln, x, base_weight(l, wname), rstd);
      });
    } else {
      b.rmsnorm_backward(dres, Tensor(), 0.f, dln, x, base_weight(l, wname), rstd);
    }
  };
  norm_backward(dln_mlp, A.x_mid.row_slice(0, N), "post_attention_layernorm.weight", A.rstd2.flat_slice(0, N));

  // Attention: o = att Wo^T; x_mid = x_in + o.
  linear_backward(datt, dres, A.att.row_slice(0, N), l, A.o_lora, base_weight(l, "self_attn.o_proj.weight"),
                  slots({"self_attn.o_proj.weight"}), dropout_seed);
  Tensor qkv = A.qkv.row_slice(0, N);
  Tensor q = qkv.col_slice(0, a.q_dim()), k = qkv.col_slice(a.q_dim(), a.kv_dim()),
         v = qkv.col_slice(a.q_dim() + a.kv_dim(), a.kv_dim());
  Tensor dq = dqkv.col_slice(0, a.q_dim()), dk = dqkv.col_slice(a.q_dim(), a.kv_dim()),
         dv = dqkv.col_slice(a.q_dim() + a.kv_dim(), a.kv_dim());
  const AttnShape shape{B_, T_, a.n_heads, a.n_kv_heads, a.head_dim, 1.0f / std::sqrt(static_cast<float>(a.head_dim))};
  b.attention_backward(dq, dk, dv, datt, A.att.row_slice(0, N), A.lse.flat_slice(0, B_ * a.n_heads * T_), q, k, v,
                         have_doc_ids_ ? S.doc_ids.flat_slice(0, N) : Tensor(), shape);
  Tensor pos = S.positions.flat_slice(0, N);
  b.rope_backward(dqkv.col_slice(0, a.q_dim() + a.kv_dim()), pos, S.rope_cos, S.rope_sin, a.head_dim);
  linear_backward(
      need_dx ? dln_attention : Tensor(), dqkv, A.ln1.row_slice(0, N), l, A.qkv_lora, base_weight(l, "self_attn.qkv"),
      slots({"self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"}), dropout_seed);
  if (need_dx) norm_backward(dln_attention, x_in, "input_layernorm.weight", A.rstd1.flat_slice(0, N));
}

double LlamaModel::forward_backward(const ModelInputs& in, float grad_scale, uint64_t dropout_seed) {
  const LlamaArch& a = opt_.arch;
  forward(in, true, dropout_seed);
  layers_recomputed_ = 0;
  head_loss(N_, true, grad_scale, nullptr);
  // d ln_final is in the first stage's dln; through the final norm into the residual stream's gradient.
  const int64_t N = N_, C = a.hidden_size;
  Tensor dres = stages_[0].dres.row_slice(0, N);
  be_.fill(dres, 0.f);
  Tensor dln = stages_[0].dln.flat_slice(0, N * C).view({N, C});
  Tensor norm_w = base_weight(-1, "model.norm.weight");
  if (opt_.train_base) {
    const ParamSpec* p = base_.find("model.norm.weight");
    write_grad(-1, {base_slot(-1, "model.norm.weight")}, [&](float beta) {
      be_.rmsnorm_backward(dres, base_.grad_view(*p), beta, dln, x_final_.row_slice(0, N), norm_w,
                           rstd_final_.flat_slice(0, N));
    });
  } else {
    be_.rmsnorm_backward(dres, Tensor(), 0.f, dln, x_final_.row_slice(0, N), norm_w, rstd_final_.flat_slice(0, N));
  }
  // Backward through the stages in reverse: each takes the residual gradient from the one after it.
  const int last = static_cast<int>(a.n_layers) - 1;
  int fetch_ticket = -1;
  for (int l = last; l >= 0; --l) {
    const int from = l == last ? -1 : l + 1;  // the final norm's gradient is on the first stage
    if (&stage(l) != &stage(from)) {
      be(l).wait_for(be(from));
      be(l).copy(stage(l).dres.row_slice(0, N), stage(from).dres.row_slice(0, N));
    }
    if (!host_inputs_.empty()) {
      // Offloaded: this layer's input was fetched during the previous layer's backward; fetch the
      // next one into the other slot while this layer runs (the work queued so far has finished
      // with that slot).
      if (slot_holds_[l % 2] != l) {
        fetch_ticket = be_.copy_to_device_async(layer_inputs_[static_cast<size_t>(l)].row_slice(0, N),
                                                host_inputs_[static_cast<size_t>(l)].row_slice(0, N));
        slot_holds_[l % 2] = l;
      }
      if (fetch_ticket >= 0) be_.wait_copy(fetch_ticket);
      fetch_ticket = -1;
      if (l >= 1 && slot_holds_[(l - 1) % 2] != l - 1) {
        fetch_ticket = be_.copy_to_device_async(layer_inputs_[static_cast<size_t>(l - 1)].row_slice(0, N),
                                                host_inputs_[static_cast<size_t>(l - 1)].row_slice(0, N));
        slot_holds_[(l - 1) % 2] = l - 1;
      }
    }
    layer_backward(l, dropout_seed);
  }
  if (opt_.train_base) {
    const ParamSpec* p = base_.find("model.embed_tokens.weight");
    Tensor dtable = as_matrix(base_.grad_view(*p), a.vocab_size, C);
    if (emb_rows_.bucket < 0) {
      write_grad(-1, {base_slot(-1, "model.embed_tokens.weight")},
                 [&](float beta) { be_.embedding_backward(dtable, dres, tokens_.flat_slice(0, N), beta); });
    } else {
      // The head has written the dense part of this micro-batch already, so the lookup adds to it;
      // in the step's last micro-batch the rows go to this rank's slot of the exchange instead.
      write_grad(-1, {emb_lookup_slot_}, [&](float) {
        if (!ledger_.in_last_micro()) {
          be_.embedding_backward(dtable, dres, tokens_.flat_slice(0, N), 1.f);
          return;
        }
        const int64_t planned = emb_rows_.rows_per_rank, at = opt_.data_parallel_rank * planned;
        Tensor my_rows = emb_rows_.rows.row_slice(at, planned), my_tokens = emb_rows_.tokens.flat_slice(at, planned);
        be_.copy(my_rows.row_slice(0, N), dres);
        be_.copy(my_tokens.flat_slice(0, N), tokens_.flat_slice(0, N));
        if (N < planned) {  // zero rows of token 0 add nothing
          be_.fill(my_rows.row_slice(N, planned - N), 0.f);
          const std::vector<int32_t> zeros(static_cast<size_t>(planned - N), 0);
          be_.upload(my_tokens.flat_slice(N, planned - N), zeros.data());
        }
      });
    }
  }
  return sum_losses(N);
}

void LlamaModel::add_exchanged_embedding_rows() {
  RT_ASSERT(emb_rows_.bucket >= 0, "add_exchanged_embedding_rows without an exchange");
  const ParamSpec* p = base_.find("model.embed_tokens.weight");
  Tensor dtable = as_matrix(base_.grad_view(*p), opt_.arch.vocab_size, opt_.arch.hidden_size);
  be_.embedding_backward(dtable, emb_rows_.rows, emb_rows_.tokens, 1.f);
}

}  // namespace ranktune
