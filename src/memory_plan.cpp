// The memory plan: every allocation the model, the optimizer and the backend make, sized here
// before they happen. Each term mirrors the code that allocates it (named in the comments); a CPU
// test builds real models and compares. What the plan cannot mirror, it bounds with constants
// documented below; tools/bench_step.cpp and run_train print the measured figure beside the plan.
#include "ranktune/memory_plan.h"

#include <algorithm>
#include <cstdio>
#include <vector>

#include "ranktune/backend.h"
#include "ranktune/error.h"
#include "ranktune/launch.h"
#include "ranktune/optimizer.h"

#ifdef RANKTUNE_HAVE_CUDA
#include <cuda_runtime.h>
#endif

namespace ranktune {
namespace {

constexpr int64_t kKiB = int64_t{1} << 10, kMiB = int64_t{1} << 20, kGiB = int64_t{1} << 30;

// Sizes set in the CUDA backend and kernels (keep in step with them):
constexpr int64_t kGemmWorkspace = 32 * kMiB;           // cuda_backend.cu kGemmWorkspaceBytes
constexpr int64_t kAdam8BitMaps = 2 * 256 * 4;          // cuda_backend.cu maps_: two 256-entry maps
constexpr int64_t kSumSquaresScratch = (1024 + 1) * 8;  // kernels/common.cu: kSumSquaresBlocks partials + result
// rmsnorm_backward's weight-gradient partials (full fine-tuning only): one row of C floats per
// resident block, min(N, blocks per SM x SMs); 2048 bounds it on every GPU we build for.
constexpr int64_t kRmsnormPartialRows = 2048;

// Not sized by ranktune, so estimated:
// - cuBLAS's handle (the cublasGemmEx fallback) takes its default workspace on first use: 32 MiB
//   on Hopper (4 MiB before), as NVIDIA documents for cublasSetWorkspace.
// - Kernel code (ours and cuBLAS's, loaded lazily as kernels first run) and the runtime's small
//   internal allocations after context creation.
// - cudaMalloc hands out whole 2 MiB pages for large allocations: each allocation of 1 MiB or more
//   is rounded up (smaller ones share pages).
// - NCCL's communicator with more than one rank: per-channel, per-peer buffers (NCCL_BUFFSIZE 4 MiB
//   for the simple protocol plus the LL and LL128 buffers) over its channels. A rough figure for
//   one node; it is the least certain term.
// The CUDA context itself is not counted: budgets and measurements start after it exists.
constexpr int64_t kCublasHandleWorkspace = 32 * kMiB;
constexpr int64_t kKernelCodeAndRuntime = 32 * kMiB;
constexpr int64_t kAllocationPage = 2 * kMiB;
constexpr int64_t kNcclBuffers = 512 * kMiB;

// model.cpp's carve(): each tensor of an activation group starts at a 256-byte boundary.
int64_t carved(int64_t elems, int64_t elem_bytes) { return (elems * elem_bytes + 255) / 256 * 256; }

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// bitsandbytes' NF4 with double quantization (include/ranktune/nf4.h): two codes per byte, one u8
// absmax code per 64 elements, one fp32 nested absmax per 256 blocks.
int64_t nf4_bytes(int64_t numel) {
  const int64_t blocks = ceil_div(numel, 64);
  return ceil_div(numel, 2) + blocks + 4 * ceil_div(blocks, 256);
}

bool is_linear_weight(const ParamSpec& p) { return p.layer >= 0 && !p.is_norm; }

std::string millions(int64_t n) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.2fM", static_cast<double>(n) / 1e6);
  return buf;
}

bool ends_with(const std::string& s, const std::string& suffix) {
  return s.size() >= suffix.size() && s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}

}  // namespace

MemoryPlan plan_fullest_gpu(const ModelOptions& o, const PlanSettings& s, int n_gpus, int* fullest) {
  if (fullest) *fullest = 0;
  if (n_gpus <= 1) return plan_memory(o, s);
  const std::vector<int64_t> layers = balance_stages(o, n_gpus, s.gpu ? 2 : 4);
  MemoryPlan most;
  for (size_t st = 0; st < layers.size(); ++st) {
    PlanSettings one = s;
    one.stage_layers = layers[st];
    one.first_stage = st == 0;
    MemoryPlan p = plan_memory(o, one);
    if (st == 0 || p.total > most.total) {
      most = p;
      if (fullest) *fullest = static_cast<int>(st);
    }
  }
  return most;
}

std::string format_bytes(int64_t bytes) {
  char buf[32];
  if (bytes >= kGiB)
    std::snprintf(buf, sizeof buf, "%.2f GiB", static_cast<double>(bytes) / kGiB);
  else if (bytes >= kMiB)
    std::snprintf(buf, sizeof buf, "%.1f MiB", static_cast<double>(bytes) / kMiB);
  else
    std::snprintf(buf, sizeof buf, "%.1f KiB", static_cast<double>(bytes) / kKiB);
  return buf;
}

MemoryPlan plan_memory(const ModelOptions& o, const PlanSettings& s) {
  const LlamaArch& a = o.arch;
  const int64_t act = s.gpu ? 2 : 4;  // the backend's act_dtype: bf16 on the GPU, fp32 on the CPU
  const char* act_name = s.gpu ? "bf16" : "f32";
  const int64_t world = std::max(1, s.world_size);
  MemoryPlan p;
  std::vector<int64_t> allocations;  // every device allocation, for the allocator's page rounding
  auto alloc = [&](int64_t bytes) {
    allocations.push_back(bytes);
    return bytes;
  };

  // ---- parameters: LlamaModel::build_params --------------------------------------------------
  // Under device_map auto this GPU holds `layers` layers, and the first also the rest.
  const int64_t layers = s.stage_layers < 0 ? a.n_layers : s.stage_layers;
  const bool first = s.first_stage;
  const auto here = [&](const ParamSpec& spec) { return spec.layer >= 0 ? spec.layer < layers : first; };
  const std::vector<ParamSpec> base = llama_param_layout(a);
  int64_t linear_numel = 0, largest_fused = 0, here_numel = 0;
  for (const ParamSpec& spec : base) {
    p.base_params += spec.numel;
    if (!here(spec)) continue;
    here_numel += spec.numel;
    if (is_linear_weight(spec)) linear_numel += spec.numel;
  }
  largest_fused = std::max({a.qkv_dim() * a.hidden_size, a.hidden_size * a.q_dim(),
                            2 * a.intermediate_size * a.hidden_size, a.hidden_size * a.intermediate_size});
  // Fused LoRA (lora_pad_per_projection): each targeted projection's bf16 weight rows, input and dx
  // are this many columns wider (the adapters' B, xa and dy B live there).
  const std::array<int64_t, kFusedProjections> pad =
      o.lora ? lora_pad_per_projection(o.lora_targets, o.lora_r) : std::array<int64_t, kFusedProjections>{};
  // LoRA adapters: A [r, in] and B [out, r] per targeted projection and layer.
  std::vector<int64_t> lora_tensors;
  if (o.lora) {
    for (int64_t l = 0; l < a.n_layers; ++l)
      for (const std::string& m : lora_module_names()) {
        if (std::find(o.lora_targets.begin(), o.lora_targets.end(), m) == o.lora_targets.end()) continue;
        const auto [out, in] = projection_shape(a, m);
        lora_tensors.push_back(o.lora_r * in);
        lora_tensors.push_back(out * o.lora_r);
        p.lora_params += o.lora_r * in + out * o.lora_r;
      }
  }

  if (s.load_in_4bit) {
    // Linear weights of every layer as NF4; embedding, norms and an untied head stay in act.
    int64_t nf4 = 256 * 4;  // the nested quantization map
    for (const ParamSpec& spec : base)
      if (here(spec) && is_linear_weight(spec)) nf4 += nf4_bytes(spec.numel);
    p.weights += alloc((here_numel - linear_numel) * act) + alloc(nf4);
    p.notes.weights = "base: " + millions(linear_numel) + " linear params NF4 (" + format_bytes(nf4) + "), " +
                      millions(here_numel - linear_numel) + " embedding/norm/head params " + act_name;
  } else {
    // Fused LoRA: a targeted projection's weight rows carry its adapters' B blocks (zero elsewhere).
    int64_t padding = 0;
    for (const ParamSpec& spec : base)
      if (here(spec) && is_linear_weight(spec) && spec.layer >= 0)
        padding += spec.shape[0] * pad[static_cast<size_t>(fused_projection_of_tensor(spec.name))];
    p.weights += alloc((here_numel + padding) * act);
    p.notes.weights = "base: " + millions(here_numel) + " params " + act_name;
    if (padding) p.notes.weights += " (rows padded for the adapters' B: " + format_bytes(padding * act) + ")";
  }
  if (o.lora && first) {
    p.weights += alloc(p.lora_params * act);
    p.notes.weights += "; LoRA: " + millions(p.lora_params) + " params " + act_name;
  }

  // The trained group: the base in full fine-tuning, else the adapters.
  const bool full = o.train_base;
  p.trainable_params = full ? p.base_params : (o.lora ? p.lora_params : 0);
  if (!first) p.trainable_params = 0;  // the adapters, their gradients and states are on the first GPU
  std::vector<int64_t> trained_tensors = lora_tensors;
  if (full) {
    trained_tensors.clear();
    for (const ParamSpec& spec : base) trained_tensors.push_back(spec.numel);
  }
  // ZeRO-1 (Optimizer's constructor): each rank keeps the masters and states of one shard of
  // consecutive whole tensors, cut at the tensor boundary nearest to r/world of all elements. The
  // plan is for the rank with the largest shard.
  const bool sharded = s.zero_stage == 1 && full && world > 1;
  const bool eight_bit = s.optim == "adamw_8bit";
  struct Shard {
    int64_t elements = 0, padded = 0, blocks = 0;  // padded, blocks: adamw_8bit's codes and absmax
  };
  std::vector<Shard> shards;
  {
    const std::vector<size_t> cuts = zero_shard_cuts(trained_tensors, sharded ? static_cast<int>(world) : 1);
    for (size_t k = 0; k + 1 < cuts.size(); ++k) {
      Shard sh;
      for (size_t i = cuts[k]; i < cuts[k + 1]; ++i) {
        const int64_t nb = ceil_div(trained_tensors[i], kAdam8BitBlock);
        sh.elements += trained_tensors[i];
        sh.padded += nb * kAdam8BitBlock;
        sh.blocks += nb;
      }
      shards.push_back(sh);
    }
  }
  auto shard_bytes = [&](const Shard& sh) {
    return (s.gpu ? 4 * sh.elements : 0) + (eight_bit ? 2 * sh.padded + 8 * sh.blocks : 8 * sh.elements);
  };
  const Shard mine = *std::max_element(shards.begin(), shards.end(),
                                       [&](const Shard& x, const Shard& y) { return shard_bytes(x) < shard_bytes(y); });
  const std::string per_rank = sharded ? " (ZeRO-1: the largest of " + std::to_string(world) + " shards)" : "";

  // fp32 masters exist on the GPU only (the CPU path's compute copy is the fp32 master): the
  // model's (build_params gives the LoRA group one whenever LoRA is on), or under ZeRO-1 the
  // optimizer's, for its shard.
  if (s.gpu && first) {
    if (full) p.trainable += alloc(mine.elements * 4);
    if (o.lora) p.trainable += alloc(p.lora_params * 4);
    p.notes.trainable = "fp32 masters of " + millions(full ? mine.elements : p.lora_params) + " params" + per_rank;
  } else {
    p.notes.trainable = "none: the CPU path updates its fp32 weights in place";
  }
  if (p.trainable_params > 0) p.gradients = alloc(p.trainable_params * 4);
  p.notes.gradients = "fp32, " + millions(p.trainable_params) + " values";
  if (s.gpu && s.reduce_by_copies && world > 1 && (sharded || o.lora) && first) {
    // Communicator::reduce_by_peer_copies: a receive slot per other rank (of this rank's shard under
    // ZeRO-1, of every adapter's gradient in LoRA's all-reduce), and flags.
    const int64_t slot = sharded ? mine.elements : p.trainable_params;
    p.gradients += alloc(Communicator::peer_copy_bytes(slot, static_cast<int>(world)));
    p.notes.gradients += " + receive slots for the copy-engine reduce (" + std::to_string(world - 1) + " x " +
                         (sharded ? "ZeRO-1's shard" : "the adapters' gradients") +
                         "; distributed.grad_reduce: nccl saves them)";
  }

  // ---- optimizer: Optimizer's constructor ----------------------------------------------------
  if (!first) {
    p.notes.optimizer = "none: on the first GPU";
  } else if (eight_bit) {
    // Each tensor padded to whole blocks; u8 m and v codes, fp32 absmax per block for each.
    p.optimizer = alloc(mine.padded) + alloc(mine.padded) + alloc(mine.blocks * 4) + alloc(mine.blocks * 4);
    p.notes.optimizer = "adamw_8bit: u8 m and v codes + fp32 absmax per " + std::to_string(kAdam8BitBlock) + per_rank;
  } else {
    p.optimizer = alloc(mine.elements * 4) + alloc(mine.elements * 4);
    p.notes.optimizer = "adamw: fp32 m and v" + per_rank;
  }

  // ---- activations: LlamaModel::allocate_activations, group by group -----------------------------
  const int64_t B = o.max_batch, T = o.max_seq, N = B * T, C = a.hidden_size, F = a.intermediate_size, V = a.vocab_size,
                H = a.n_heads, Q = a.q_dim(), QKV = a.qkv_dim();
  const int64_t chunk = loss_chunk_rows(a, o.train_base, N, act, o.loss_chunk_rows);
  const std::array<int64_t, kFusedProjections> group_modules =
      o.lora ? lora_modules_per_projection(o.lora_targets) : std::array<int64_t, kFusedProjections>{};
  const int64_t widest_group = std::max<int64_t>(1, *std::max_element(group_modules.begin(), group_modules.end()));
  p.loss_chunk_rows = chunk;
  const int64_t r = std::max<int64_t>(o.lora_r, 1);
  const int64_t drop_rows = o.lora_dropout > 0 ? N : 1, widest = std::max({C, F, Q});
  p.logits_chunk = first ? carved(chunk * V, act) : 0;
  // The inputs and the head on the first GPU; the rest on every GPU.
  const int64_t head = first ? 2 * carved(N, 4)                             // tokens, targets
                                   + 2 * carved(N * C, act) + carved(N, 4)  // x_final, ln_final, rstd_final
                                   + carved(N, 4)                           // losses
                             : 0;
  const int64_t globals = head + 2 * carved(N, 4)                                       // positions, doc_ids
                          + 2 * carved(T * (a.head_dim / 2), 4)                         // rope cos, sin
                          + carved(N * C, act)                                          // delta
                          + p.logits_chunk                                              // logits, dlogits
                          + carved(N * C, act)                                          // dres
                          + carved(N * std::max(C + std::max(pad[0], pad[2]), Q), act)  // dln
                          + carved(N * QKV, act) + carved(N * (Q + pad[1]), act)        // dqkv, datt
                          + carved(N * (F + pad[3]), act)                               // dh (dgu overwrites gu)
                          + carved(N * widest_group * r, act)                           // dxa (a projection's modules)
                          + 2 * carved(drop_rows * widest, act);                        // drop_scratch, lora_tmp
  alloc(globals);
  // Data-parallel full fine-tuning of a tied embedding: every rank's lookup rows and token ids
  // (LlamaModel::EmbeddingRows).
  const int64_t exchange = first && o.train_base && a.tie_word_embeddings && world > 1
                               ? alloc(carved(world * N * C, act) + carved(world * N, 4))
                               : 0;
  // Layer inputs, the checkpoints: every layer's on the device, or with offload two device slots
  // (the layer being computed and the next one's transfer) and every layer's in pinned host memory.
  const int64_t layer_input = carved(N * C, act);
  const bool offload = o.checkpointing == Checkpointing::offload;
  const int64_t device_inputs = offload ? 2 : layers;
  const int64_t inputs = alloc(device_inputs * layer_input);
  if (offload) p.host_pinned = a.n_layers * N * C * act;
  // Per-layer sets: one per layer, or one recompute set with checkpointing.
  const int64_t n_sets = o.checkpointing == Checkpointing::off ? layers : 1;
  // The attention block's tensors: in every set, or under keep_attention kept for every layer apart.
  const int64_t attention = carved(N * QKV, act) + carved(N * (Q + pad[1]), act)  // qkv, att
                            + carved(B * H * T, 4)                                // lse
                            + carved(N * C, act);                                 // x_mid
  const bool keep_attention = o.checkpointing == Checkpointing::keep_attention;
  const int64_t set = carved(N * (C + pad[0]), act) + carved(N, 4)              // ln1, rstd1
                      + carved(N * (C + pad[2]), act) + carved(N, 4)            // ln2, rstd2
                      + carved(N * 2 * F, act) + carved(N * (F + pad[3]), act)  // gu, h
                      + (keep_attention ? 0 : attention);
  for (int64_t i = 0; i < n_sets; ++i) alloc(set);
  const int64_t kept = keep_attention ? layers : 0;
  for (int64_t i = 0; i < kept; ++i) alloc(attention);
  // With checkpointing and LoRA every layer keeps its xa for the recompute (one group per layer),
  // but o's under keep_attention, which stays in the layer's own att.
  int64_t saved_xa = 0;
  if (o.lora && o.checkpointing != Checkpointing::off) {
    for (int g = 0; g < kFusedProjections; ++g)
      if (group_modules[static_cast<size_t>(g)] > 0 && !(keep_attention && g == 1))
        saved_xa += carved(N * group_modules[static_cast<size_t>(g)] * r, act);
    if (saved_xa)
      for (int64_t i = 0; i < layers; ++i) alloc(saved_xa);
  }
  p.activations = globals - p.logits_chunk + exchange + inputs + n_sets * set + kept * attention + layers * saved_xa;
  p.notes.activations =
      std::string("checkpointing ") + checkpointing_name(o.checkpointing) + ": " + std::to_string(device_inputs) +
      " layer inputs x " + format_bytes(layer_input) + ", " + std::to_string(n_sets) + " layer set" +
      (n_sets > 1 ? "s" : "") + " x " + format_bytes(set) +
      (kept ? ", " + std::to_string(kept) + " kept attention blocks x " + format_bytes(attention) : "") +
      (saved_xa ? ", " + std::to_string(layers) + " layers' LoRA xa x " + format_bytes(saved_xa) : "") +
      ", inputs and backward buffers " + format_bytes(globals - p.logits_chunk) +
      (exchange ? ", embedding rows of " + std::to_string(world) + " ranks " + format_bytes(exchange) : "");
  p.notes.logits_chunk =
      std::to_string(chunk) + " rows x " + std::to_string(V) + " vocab, " + act_name + " logits, dlogits in place";

  // ---- workspaces: the CUDA backend's buffers and scratch ---------------------------------------
  std::string ws_note;
  if (s.gpu) {
    p.workspace += alloc(kGemmWorkspace) + alloc(kAdam8BitMaps) + alloc(kSumSquaresScratch);
    p.workspace += alloc(2 * 4 * B * H * T);  // attention backward: rowsum(dO * O) and lse * log2(e)
    ws_note = "cuBLASLt 32 MiB, attention backward " + format_bytes(2 * 4 * B * H * T);
    if (full) {
      p.workspace += alloc(std::min(N, kRmsnormPartialRows) * C * 4);  // norm weight-gradient partials
      p.workspace += alloc((2 * N + 1) * 4);                           // embedding backward: token order and run starts
      ws_note += ", norm and embedding backward scratch";
    }
  }
  if (s.load_in_4bit) {
    // One dequantized weight at a time, the largest fused projection.
    p.workspace += alloc(largest_fused * act);
    ws_note += std::string(ws_note.empty() ? "" : ", ") + "NF4 dequantization " + format_bytes(largest_fused * act);
  }
  p.notes.workspace = ws_note.empty() ? "none on the CPU path" : ws_note;

  // ---- generation: LlamaModel::prefill's KV cache, at most [B, T] per layer ---------------------
  if (s.generation) {
    p.kv_cache = alloc(2 * layers * B * T * a.kv_dim() * act);
    p.notes.kv_cache = "keys and values of " + std::to_string(a.n_layers) + " layers for the exact-match eval";
  }

  // ---- what is not ours to size ---------------------------------------------------------------
  if (s.gpu) {
    int64_t rounding = 0;
    for (int64_t bytes : allocations)
      if (bytes >= kMiB) rounding += ceil_div(bytes, kAllocationPage) * kAllocationPage - bytes;
    p.runtime_overhead = kCublasHandleWorkspace + kKernelCodeAndRuntime + rounding;
    p.notes.runtime_overhead = "cuBLAS handle workspace, kernel code, page rounding " + format_bytes(rounding);
    if (world > 1) {
      p.runtime_overhead += kNcclBuffers;
      p.notes.runtime_overhead += ", NCCL buffers (about " + format_bytes(kNcclBuffers) + ")";
    }
  }

  p.total = p.weights + p.trainable + p.gradients + p.optimizer + p.activations + p.logits_chunk + p.workspace +
            p.runtime_overhead + p.kv_cache;
  // On the CPU path the "offloaded" inputs are in the same memory.
  if (!s.gpu) p.total += p.host_pinned;
  return p;
}

std::string MemoryPlan::table() const {
  std::string out;
  auto row = [&](const char* name, int64_t bytes, const std::string& note) {
    char buf[64];
    std::snprintf(buf, sizeof buf, "  %-18s %11s  ", name, format_bytes(bytes).c_str());
    out += buf + note + "\n";
  };
  row("weights", weights, notes.weights);
  if (trainable > 0) row("masters", trainable, notes.trainable);
  row("gradients", gradients, notes.gradients);
  row("optimizer", optimizer, notes.optimizer);
  row("activations", activations, notes.activations);
  row("logits chunk", logits_chunk, notes.logits_chunk);
  if (workspace > 0) row("workspace", workspace, notes.workspace);
  if (kv_cache > 0) row("kv cache", kv_cache, notes.kv_cache);
  if (runtime_overhead > 0) row("runtime", runtime_overhead, notes.runtime_overhead);
  row("total", total, "");
  if (host_pinned > 0) row("host (pinned)", host_pinned, "offloaded layer inputs, in host memory");
  return out;
}

PlanSettings plan_settings_from(const RunConfig& cfg, bool gpu, int rank, int world_size) {
  PlanSettings s;
  s.optim = cfg.training.optim;
  s.gpu = gpu;
  s.load_in_4bit = cfg.model.load_in_4bit;
  s.world_size = world_size;
  s.zero_stage = static_cast<int>(cfg.distributed.zero_stage);
  s.reduce_by_copies = gpu && cfg.distributed.grad_reduce == "auto";
  // run_train's exact-match eval: rank 0 generates for a prompt/completion JSONL eval file.
  s.generation = rank == 0 && ends_with(cfg.data.eval_file, ".jsonl") &&
                 (cfg.data.format == "auto" || cfg.data.format == "prompt_completion");
  return s;
}

std::optional<MemoryBudget> memory_budget(const RunConfig& cfg, const Placement& placement) {
  std::optional<MemoryBudget> budget;
  const std::string& cap = cfg.distributed.max_memory_per_gpu;
  if (!cap.empty())
    budget = MemoryBudget{parse_byte_size(cap, cfg.source + ": distributed.max_memory_per_gpu"),
                          "distributed.max_memory_per_gpu = " + cap, -1};
#ifdef RANKTUNE_HAVE_CUDA
  // Each device's context first, so that its memory is not counted as the run's; the device with
  // the least free memory sets the budget. A device that cannot be used is reported by
  // make_cuda_backend. The first device is left current, as the backend sets it.
  int64_t used_before = -1;
  for (auto it = placement.devices.rbegin(); placement.use_gpu && it != placement.devices.rend(); ++it) {
    size_t free_b = 0, total_b = 0;
    if (cudaSetDevice(*it) != cudaSuccess || cudaFree(nullptr) != cudaSuccess ||
        cudaMemGetInfo(&free_b, &total_b) != cudaSuccess) {
      (void)cudaGetLastError();
      continue;
    }
    const auto free_bytes = static_cast<int64_t>(free_b);
    if (!budget || free_bytes < budget->bytes)
      budget = MemoryBudget{free_bytes,
                            format_bytes(free_bytes) + " free on cuda:" + std::to_string(*it) + " of " +
                                format_bytes(static_cast<int64_t>(total_b)),
                            -1};
    used_before = static_cast<int64_t>(total_b - free_b);  // the first device's, in the end
  }
  if (budget) budget->device_used_before = used_before;
#else
  (void)placement;
#endif
  return budget;
}

namespace {

// One alternative the advice offers: the settings changed and the plan's total with them.
struct Alternative {
  std::string change;
  int64_t total = -1;  // -1: no estimate (a remark)
};

// The total on the fullest of n_gpus GPUs (one unless device_map auto).
int64_t total_for(const RunConfig& cfg, const LlamaArch& arch, int64_t batch, const LaunchInfo& li, bool gpu,
                  int n_gpus = 1) {
  return plan_fullest_gpu(model_options_from(cfg, arch, batch), plan_settings_from(cfg, gpu, li.rank, li.world_size),
                          n_gpus)
      .total;
}

std::vector<Alternative> alternatives(const RunConfig& cfg, const LlamaArch& arch, int64_t batch, const LaunchInfo& li,
                                      bool gpu, int n_devices, int64_t budget) {
  std::vector<Alternative> out;
  RunConfig all = cfg;  // every applicable change together
  int64_t all_batch = batch;
  int n_changes = 0;

  // A smaller micro-batch with more accumulation: the same sequences per step. The largest divisor
  // of the batch that fits, else 1.
  if (batch > 1) {
    int64_t pick = 1;
    for (int64_t b = batch - 1; b > 1; --b)
      if (batch % b == 0 && total_for(cfg, arch, b, li, gpu, n_devices) <= budget) {
        pick = b;
        break;
      }
    const int64_t accum = cfg.training.gradient_accumulation_steps * (batch / pick);
    out.push_back({"training.per_device_train_batch_size: " + std::to_string(pick) +
                       " with training.gradient_accumulation_steps: " + std::to_string(accum) + " (the same " +
                       std::to_string(batch * cfg.training.gradient_accumulation_steps) + " sequences per step)",
                   total_for(cfg, arch, pick, li, gpu, n_devices)});
    all_batch = 1;
    ++n_changes;
  }
  if (cfg.lora.enabled && !cfg.model.load_in_4bit) {
    RunConfig c = cfg;
    c.model.load_in_4bit = true;
    all.model.load_in_4bit = true;
    out.push_back(
        {"model.load_in_4bit: true (QLoRA: NF4 base weights)", total_for(c, arch, batch, li, gpu, n_devices)});
    ++n_changes;
  }
  if (cfg.model.gradient_checkpointing == Checkpointing::off ||
      cfg.model.gradient_checkpointing == Checkpointing::keep_attention) {
    RunConfig c = cfg;
    c.model.gradient_checkpointing = Checkpointing::on;
    out.push_back({"model.gradient_checkpointing: true (recompute each layer in backward)",
                   total_for(c, arch, batch, li, gpu, n_devices)});
  }
  // Offloading moves layer inputs to host memory: nothing gained on the CPU path.
  if (gpu && cfg.model.gradient_checkpointing != Checkpointing::offload) {
    RunConfig c = cfg;
    c.model.gradient_checkpointing = Checkpointing::offload;
    all.model.gradient_checkpointing = Checkpointing::offload;
    out.push_back({"model.gradient_checkpointing: \"offload\" (layer inputs in host memory)",
                   total_for(c, arch, batch, li, gpu, n_devices)});
    ++n_changes;
  }
  if (cfg.training.optim == "adamw") {
    RunConfig c = cfg;
    c.training.optim = "adamw_8bit";
    const int64_t t = total_for(c, arch, batch, li, gpu, n_devices);
    const int64_t now = total_for(cfg, arch, batch, li, gpu, n_devices);
    if (now - t >= std::max(64 * kMiB, now / 50)) {  // worth saying (full fine-tuning)
      all.training.optim = "adamw_8bit";
      out.push_back({"training.optim: adamw_8bit (8-bit optimizer states)", t});
      ++n_changes;
    }
  }
  const int n_gpus = static_cast<int>(li.gpus.size());
  if (gpu && cfg.lora.enabled && n_gpus > 1 && cfg.model.device_map != "auto") {
    out.push_back({"model.device_map: auto (the layers spread over the " + std::to_string(n_gpus) +
                       " visible GPUs), on the fullest GPU",
                   total_for(cfg, arch, batch, li, gpu, n_gpus)});
  }
  if (cfg.lora.enabled) {
    out.push_back(
        {"more ranks do not lower the memory per GPU with LoRA: each rank holds the whole model "
         "(ZeRO-1, distributed.zero_stage: 1, shards the states of full fine-tuning only)",
         -1});
  } else if (cfg.distributed.zero_stage == 0) {
    const int ranks = std::max({li.world_size, n_gpus, 2});
    RunConfig c = cfg;
    c.distributed.zero_stage = 1;
    all.distributed.zero_stage = 1;
    LaunchInfo more = li;
    more.world_size = ranks;
    out.push_back(
        {"distributed.zero_stage: 1 over " + std::to_string(ranks) + " ranks (optimizer states and masters sharded)",
         plan_memory(model_options_from(c, arch, batch), plan_settings_from(c, gpu, li.rank, ranks)).total});
    ++n_changes;
  }
  if (n_changes > 1) {
    LaunchInfo l = li;
    if (all.distributed.zero_stage == 1) l.world_size = std::max({li.world_size, n_gpus, 2});
    out.push_back(
        {"all of the above together", plan_fullest_gpu(model_options_from(all, arch, all_batch),
                                                       plan_settings_from(all, gpu, l.rank, l.world_size), n_devices)
                                          .total});
  }
  return out;
}

}  // namespace

MemoryCheck check_training_memory(const RunConfig& cfg, const LlamaArch& arch, int64_t batch, const LaunchInfo& li,
                                  const Placement& placement) {
  MemoryCheck check;
  const bool gpu = placement.use_gpu;
  // device_map auto over several GPUs: the plan of the fullest of them, placed as the model places
  // its layers.
  const int n_devices = gpu ? std::max(1, static_cast<int>(placement.devices.size())) : 1;
  int fullest = 0;
  check.plan = plan_fullest_gpu(model_options_from(cfg, arch, batch),
                                plan_settings_from(cfg, gpu, li.rank, li.world_size), n_devices, &fullest);
  check.budget = memory_budget(cfg, placement);
  const MemoryPlan& plan = check.plan;
  const std::string mode = checkpointing_name(cfg.model.gradient_checkpointing);
  const std::string header =
      std::string("memory plan per ") + (gpu ? "GPU (bf16" : "rank (CPU path, fp32") + "; " +
      (cfg.lora.enabled ? "LoRA r=" + std::to_string(cfg.lora.r) + (cfg.model.load_in_4bit ? " on NF4 weights" : "")
                        : std::string("full fine-tuning")) +
      ", checkpointing " + mode + ", batch " + std::to_string(batch) + " x " +
      std::to_string(cfg.model.max_seq_length) + ", " + cfg.training.optim +
      (n_devices > 1 ? "; the fullest of " + std::to_string(n_devices) +
                           " GPUs, cuda:" + std::to_string(placement.devices[static_cast<size_t>(fullest)])
                     : "") +
      "):\n";
  check.report = header + plan.table();
  if (check.budget) {
    char buf[64];
    std::snprintf(buf, sizeof buf, "  %-18s %11s  ", "budget", format_bytes(check.budget->bytes).c_str());
    check.report += buf + check.budget->what + "\n";
  }
  if (!check.budget || plan.total <= check.budget->bytes) return check;

  std::string msg = cfg.source + ": this run needs about " + format_bytes(plan.total) + " per " +
                    (gpu ? "GPU" : "rank") + ", more than its budget of " + format_bytes(check.budget->bytes) + " (" +
                    check.budget->what + "):\n" + check.report + "What would lower it (estimated totals):\n";
  for (const Alternative& alt : alternatives(cfg, arch, batch, li, gpu, n_devices, check.budget->bytes)) {
    msg += "  - " + alt.change;
    if (alt.total >= 0)
      msg += ": " + format_bytes(alt.total) + (alt.total <= check.budget->bytes ? " (fits)" : " (still over)");
    msg += "\n";
  }
  msg += "Change them in the run config or with --set section.key=value.";
  throw UserError(msg);
}

std::string measured_memory_line(const MemoryCheck& check, const std::string& when) {
#ifdef RANKTUNE_HAVE_CUDA
  if (!check.budget || check.budget->device_used_before < 0) return "";
  size_t free_b = 0, total_b = 0;
  if (cudaMemGetInfo(&free_b, &total_b) != cudaSuccess) {
    (void)cudaGetLastError();
    return "";
  }
  const int64_t measured = static_cast<int64_t>(total_b - free_b) - check.budget->device_used_before;
  char buf[200];
  std::snprintf(buf, sizeof buf, "memory: %s in use on the GPU %s (plan %s, measured/plan %.3f)",
                format_bytes(measured).c_str(), when.c_str(), format_bytes(check.plan.total).c_str(),
                static_cast<double>(measured) / static_cast<double>(std::max<int64_t>(1, check.plan.total)));
  return buf;
#else
  (void)check;
  (void)when;
  return "";
#endif
}

std::string out_of_memory_advice() {
  return "To use less: lower training.per_device_train_batch_size and raise training.gradient_accumulation_steps "
         "by the same factor (the same sequences per step); set model.gradient_checkpointing: true (or \"offload\"); "
         "model.load_in_4bit: true (LoRA); training.optim: adamw_8bit; for full fine-tuning distributed.zero_stage: 1 "
         "over more ranks. The memory plan printed when the run started estimates each term; "
         "distributed.max_memory_per_gpu makes the run stop at that check instead.";
}

}  // namespace ranktune
