// The training run, top to bottom: run_train() sets up (Session), then each step takes
// gradient_accumulation_steps micro-batches through LlamaModel::forward_backward, reduces the
// gradients over ranks bucket by bucket as the ledger reports them ready, clips by the global norm
// and calls the optimizer.
#include "ranktune/trainer.h"

#include <mpi.h>
#include <unistd.h>

#include <array>
#include <chrono>
#include <csignal>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <limits>
#include <memory>
#include <optional>
#include <sstream>
#include <thread>

#include <nlohmann/json.hpp>

#include "ranktune/backend.h"
#include "ranktune/checkpoint.h"
#include "ranktune/comm.h"
#include "ranktune/dataset.h"
#include "ranktune/error.h"
#include "ranktune/generate.h"
#include "ranktune/hf_config.h"
#include "ranktune/memory_plan.h"
#include "ranktune/model.h"
#include "ranktune/optimizer.h"
#include "ranktune/safetensors.h"
#include "ranktune/tokenizer.h"
#include "ranktune/weights.h"

#ifdef RANKTUNE_HAVE_CUDA
#include <cuda_runtime.h>
#endif

namespace ranktune {
namespace fs = std::filesystem;
using Clock = std::chrono::steady_clock;

namespace {

bool ends_with(const std::string& s, const std::string& suffix) {
  return s.size() >= suffix.size() && s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}

std::string tokenizer_spec(const RunConfig& cfg) {
  if (!cfg.model.tokenizer.empty()) return cfg.model.tokenizer;
  if (!cfg.model.name_or_path.empty() && fs::exists(cfg.model.name_or_path + "/tokenizer.json"))
    return cfg.model.name_or_path + "/tokenizer.json";
  return "byte";
}

// JSONL is tokenized into output_dir/data/<tag>.h5 by rank 0 while the others wait; a .h5 is used
// as it is.
std::string prepared_data(const RunConfig& cfg, const Tokenizer& tok, const LaunchInfo& li, const std::string& path,
                          const std::string& tag) {
  if (ends_with(path, ".h5")) return path;
  RT_REQUIRE(fs::exists(path), cfg.source + ": data." + tag + "_file = " + path + " does not exist");
  const std::string out = cfg.training.output_dir + "/data/" + tag + ".h5";
  if (li.rank == 0) {
    fs::create_directories(cfg.training.output_dir + "/data");
    PrepOptions po{path, out, tok};
    po.format = cfg.data.format;
    po.max_seq_length = cfg.model.max_seq_length;
    po.packing = cfg.data.packing;
    po.train_on_responses_only = cfg.data.train_on_responses_only;
    po.chat_template = cfg.data.chat_template;
    PrepSummary s = prep_dataset(po);
    std::printf("data: %s\n", s.report().c_str());
  }
  MPI_Barrier(MPI_COMM_WORLD);
  return out;
}

// Every rank's string, in rank order, on rank 0 (empty elsewhere).
std::vector<std::string> gather_to_root(const std::string& mine, const LaunchInfo& li) {
  const int len = static_cast<int>(mine.size());
  std::vector<int> lens(static_cast<size_t>(li.world_size)), offsets(static_cast<size_t>(li.world_size));
  MPI_Gather(&len, 1, MPI_INT, lens.data(), 1, MPI_INT, 0, MPI_COMM_WORLD);
  int total = 0;
  for (int r = 0; r < li.world_size; ++r) offsets[static_cast<size_t>(r)] = total, total += lens[static_cast<size_t>(r)];
  std::string all(static_cast<size_t>(total), '\0');
  MPI_Gatherv(mine.data(), len, MPI_CHAR, all.data(), lens.data(), offsets.data(), MPI_CHAR, 0, MPI_COMM_WORLD);
  std::vector<std::string> out;
  if (li.rank != 0) return out;
  for (int r = 0; r < li.world_size; ++r)
    out.push_back(all.substr(static_cast<size_t>(offsets[static_cast<size_t>(r)]), static_cast<size_t>(lens[static_cast<size_t>(r)])));
  return out;
}

std::string human_duration(double s) {
  char buf[32];
  const int t = static_cast<int>(s + 0.5);
  if (t >= 3600) std::snprintf(buf, sizeof buf, "%dh%02dm", t / 3600, (t % 3600) / 60);
  else std::snprintf(buf, sizeof buf, "%dm%02ds", t / 60, t % 60);
  return buf;
}

// Device memory in use on the fullest of this rank's GPUs (0 on the CPU path).
double gpu_mem_gib(const Placement& placement) {
  double most = 0;
#ifdef RANKTUNE_HAVE_CUDA
  if (!placement.use_gpu) return 0.0;
  int current = 0;
  (void)cudaGetDevice(&current);
  for (int d : placement.devices) {
    size_t free_b = 0, total_b = 0;
    if (cudaSetDevice(d) == cudaSuccess && cudaMemGetInfo(&free_b, &total_b) == cudaSuccess)
      most = std::max(most, static_cast<double>(total_b - free_b) / (1 << 30));
  }
  (void)cudaSetDevice(current);
#endif
  (void)placement;
  return most;
}

// Model FLOPs per trained token: 2 per matmul weight in forward, 2 more for input gradients, 2
// more for weight gradients when the base is trained; attention's score and value products on top
// (causal: half of the square). The embedding lookup is free; the LM head is a matmul, tied or not.
double flops_per_token(const LlamaArch& a, bool full, int64_t seq) {
  const double VC = static_cast<double>(a.vocab_size * a.hidden_size);
  const double layers = static_cast<double>(a.n_params()) - VC * (a.tie_word_embeddings ? 1 : 2) -
                        static_cast<double>(a.hidden_size);
  const double per_weight = full ? 6.0 : 4.0;
  const double attn = 6.0 * static_cast<double>(a.n_layers * seq * a.n_heads * a.head_dim);
  return per_weight * (layers + VC) + attn;
}

double peak_flops(const std::string& backend_name) {
  if (backend_name.find("H100") != std::string::npos || backend_name.find("H200") != std::string::npos) return 989e12;
  if (backend_name.find("A100") != std::string::npos) return 312e12;
  return 0;
}

// ZeRO-1 applies to full fine-tuning over several ranks (the config refuses it with LoRA).
bool zero_stage_1(const RunConfig& cfg, const LaunchInfo& li) {
  return cfg.distributed.zero_stage == 1 && li.world_size > 1 && !cfg.lora.enabled;
}

// Everything a command needs: backend on the placed device, tokenizer, model with weights.
struct Session {
  Placement placement;
  std::unique_ptr<Backend> backend;                    // the (first) GPU's, or the CPU's
  std::vector<std::unique_ptr<Backend>> more_backends;  // device_map auto: the other GPUs'
  std::string stages;                                   // device_map auto: which layers where
  std::unique_ptr<Tokenizer> tokenizer;
  LlamaArch arch;
  std::unique_ptr<LlamaModel> model;
};

Session open_session(const RunConfig& cfg, const LaunchInfo& li, int64_t max_batch) {
  Session s;
  s.placement = place_rank(cfg, li, cfg.source);
  s.backend = s.placement.use_gpu ? make_cuda_backend(s.placement.devices.front()) : make_cpu_backend();
  s.tokenizer = load_tokenizer(tokenizer_spec(cfg));
  s.arch = resolve_arch(cfg);
  RT_REQUIRE(s.tokenizer->vocab_size() <= s.arch.vocab_size,
             cfg.source + ": the tokenizer has " + std::to_string(s.tokenizer->vocab_size()) +
                 " ids but the model's vocab_size is " + std::to_string(s.arch.vocab_size));
  ModelOptions options = model_options_from(cfg, s.arch, max_batch);
  options.master_weights = !zero_stage_1(cfg, li);
  options.data_parallel_ranks = li.world_size;
  options.data_parallel_rank = li.rank;
  if (s.placement.devices.size() > 1) {
    // device_map auto: consecutive layers on each of this rank's GPUs.
    enable_peer_access(s.placement.devices);
    std::vector<Backend*> stage_backends{s.backend.get()};
    for (size_t i = 1; i < s.placement.devices.size(); ++i) {
      s.more_backends.push_back(make_cuda_backend(s.placement.devices[i]));
      stage_backends.push_back(s.more_backends.back().get());
    }
    options.stage_layers =
        balance_stages(options, static_cast<int>(stage_backends.size()), dtype_size(s.backend->act_dtype()));
    int64_t first = 0;
    for (size_t i = 0; i < stage_backends.size(); ++i) {
      const int64_t last = first + options.stage_layers[i] - 1;
      s.stages += (i ? ", " : "") + std::string("layers ") + std::to_string(first) + "-" + std::to_string(last) +
                  (i == 0 ? " + embedding, head, adapters" : "") + " on cuda:" + std::to_string(s.placement.devices[i]);
      first = last + 1;
    }
    s.model = std::make_unique<LlamaModel>(stage_backends, options);
  } else {
    s.model = std::make_unique<LlamaModel>(*s.backend, options);
  }
  const uint64_t seed = static_cast<uint64_t>(cfg.training.seed);
  if (cfg.model.name_or_path.empty()) s.model->init_base_random(seed);
  else load_hf_weights(*s.model, cfg.model.name_or_path);
  if (s.model->has_lora()) {
    if (!cfg.lora.adapter_path.empty()) load_peft_adapter(*s.model, cfg.lora.adapter_path);
    else s.model->init_lora(seed);
  }
  return s;
}

// Preemption: SIGUSR1 and SIGTERM (Slurm's warning and kill signals) and SIGINT ask the step loop
// to stop after the current step and save; a second SIGINT exits at once. The handlers live while
// the loop runs and the previous ones come back after.
volatile std::sig_atomic_t g_stop_signal = 0;

extern "C" void on_stop_signal(int sig) {
  if (sig == SIGINT && g_stop_signal == SIGINT) {
    const char msg[] = "\nranktune: second interrupt: exiting without saving\n";
    ssize_t ignored = write(2, msg, sizeof msg - 1);
    (void)ignored;
    _exit(130);
  }
  g_stop_signal = sig;
}

class StopSignals {
 public:
  StopSignals() {
    g_stop_signal = 0;
    struct sigaction sa {};
    sa.sa_handler = on_stop_signal;
    sigemptyset(&sa.sa_mask);
    for (size_t i = 0; i < kSignals.size(); ++i) sigaction(kSignals[i], &sa, &previous_[i]);
  }
  ~StopSignals() {
    for (size_t i = 0; i < kSignals.size(); ++i) sigaction(kSignals[i], &previous_[i], nullptr);
  }
  StopSignals(const StopSignals&) = delete;
  StopSignals& operator=(const StopSignals&) = delete;
  // The signal that asked to stop, agreed over ranks (the largest number any rank got), or 0.
  static int agreed(Communicator& comm) { return comm.max(g_stop_signal, "the stop-signal check"); }

 private:
  static constexpr std::array<int, 3> kSignals{SIGUSR1, SIGTERM, SIGINT};
  std::array<struct sigaction, 3> previous_{};
};

const char* signal_name(int sig) {
  return sig == SIGUSR1 ? "SIGUSR1" : sig == SIGTERM ? "SIGTERM" : sig == SIGINT ? "SIGINT" : "a signal";
}

// On resume, metrics.jsonl keeps the lines up to the checkpoint's step (a run killed after its last
// checkpoint may have logged steps that the continued run logs again).
void trim_metrics(const std::string& path, int64_t step) {
  std::ifstream in(path);
  std::string kept, line;
  while (std::getline(in, line)) {
    if (line.empty()) continue;
    auto j = nlohmann::json::parse(line, nullptr, false);
    if (!j.is_discarded() && j.contains("step") && j["step"].is_number_integer() && j["step"].get<int64_t>() <= step)
      kept += line + "\n";
  }
  in.close();
  std::ofstream(path, std::ios::trunc) << kept;
}

ModelInputs inputs_of(const Batch& b) {
  return ModelInputs{b.batch_size, b.seq_len, b.input_ids.data(), b.targets.data(), b.positions.data(),
                     b.doc_ids.empty() ? nullptr : b.doc_ids.data()};
}

// Mean loss over every row of `rows`, all ranks together.
std::pair<double, int64_t> evaluate(LlamaModel& model, const TokenDataset& data, const std::vector<int64_t>& rows,
                                    int64_t batch, int64_t seq, const LaunchInfo& li, Communicator& comm) {
  double loss = 0;
  int64_t tokens = 0;
  for (const auto& group : eval_row_groups(rows, batch, li.rank, li.world_size)) {
    if (group.empty()) continue;
    Batch b = make_batch(data, group, batch, seq);
    loss += model.forward_loss(inputs_of(b));
    tokens += b.n_target_tokens;
  }
  const double total_loss = comm.sum(loss, "the eval loss sum");
  const int64_t total_tokens = static_cast<int64_t>(comm.sum(static_cast<double>(tokens), "the eval token count"));
  return {total_tokens ? total_loss / static_cast<double>(total_tokens) : 0.0, total_tokens};
}

// Exact-match accuracy of greedy completions on a prompt/completion JSONL file.
std::pair<int64_t, int64_t> exact_match(LlamaModel& model, const Tokenizer& tok, const std::string& jsonl) {
  std::ifstream in(jsonl);
  std::vector<std::vector<int32_t>> prompts;
  std::vector<std::string> answers;
  std::string line;
  std::vector<int32_t> stop;
  for (const char* s : {"<|end_of_text|>", "<|eot_id|>"})
    if (auto id = tok.token_id(s)) stop.push_back(*id);
  while (std::getline(in, line)) {
    if (line.empty()) continue;
    auto j = nlohmann::json::parse(line, nullptr, false);
    if (j.is_discarded() || !j.contains("prompt") || !j.contains("completion")) return {0, 0};
    std::vector<int32_t> ids;
    if (auto bos = tok.token_id("<|begin_of_text|>")) ids.push_back(*bos);
    auto p = tok.encode(j["prompt"].get<std::string>());
    ids.insert(ids.end(), p.begin(), p.end());
    prompts.push_back(ids);
    answers.push_back(j["completion"].get<std::string>());
  }
  int64_t max_new = 0;
  for (const auto& a : answers) max_new = std::max<int64_t>(max_new, static_cast<int64_t>(tok.encode(a).size()) + 1);
  SamplingOptions greedy;
  greedy.max_new_tokens = max_new;
  greedy.stop_ids = stop;
  auto gen = generate(model, prompts, greedy);
  int64_t correct = 0;
  for (size_t i = 0; i < gen.size(); ++i) correct += tok.decode(gen[i]) == answers[i];
  return {correct, static_cast<int64_t>(answers.size())};
}

}  // namespace

int run_train(const RunConfig& cfg, const LaunchInfo& li, const std::string& resume) {
  const auto t_start = Clock::now();
  const bool root = li.rank == 0;
  const TrainingSection& tc = cfg.training;
  const int64_t B = tc.per_device_train_batch_size, T = cfg.model.max_seq_length;
  RT_REQUIRE(!cfg.data.train_file.empty(), cfg.source + ": data.train_file is not set");
  // From here on a stop signal is kept for the end of the first (or current) step.
  StopSignals stop_signals;

  // Output directory first: an unwritable one is reported before any work.
  std::error_code ec;
  fs::create_directories(tc.output_dir, ec);
  RT_REQUIRE(!ec && access(tc.output_dir.c_str(), W_OK) == 0,
             cfg.source + ": training.output_dir = " + tc.output_dir + " cannot be written: choose another directory");

  const std::string ckpt_dir = tc.output_dir + "/checkpoints";
  fs::create_directories(ckpt_dir, ec);
  RT_REQUIRE(!ec && access(ckpt_dir.c_str(), W_OK) == 0,
             cfg.source + ": " + ckpt_dir + " cannot be written: choose another training.output_dir");

  // The memory plan, checked against the device's budget before anything is allocated.
  const MemoryCheck memory = check_training_memory(cfg, resolve_arch(cfg), B, li, place_rank(cfg, li, cfg.source));
  Session s = open_session(cfg, li, B);
  LlamaModel& model = *s.model;
  if (root) {
    std::ofstream(tc.output_dir + "/config.yaml") << cfg.to_yaml();
  }

  // Data.
  const std::string train_h5 = prepared_data(cfg, *s.tokenizer, li, cfg.data.train_file, "train");
  TokenDataset train_data = TokenDataset::open(train_h5, s.arch.vocab_size);
  RT_REQUIRE(train_data.tokenizer_hash() == s.tokenizer->hash(),
             train_h5 + ": prepared with another tokenizer (" + train_data.tokenizer_kind() + ", hash " +
                 train_data.tokenizer_hash() + ") than the model's (" + s.tokenizer->kind() + ", hash " + s.tokenizer->hash() +
                 "): re-run ranktune prep with the model's tokenizer");
  std::vector<int64_t> train_rows = train_data.all_rows(), eval_rows;
  std::unique_ptr<TokenDataset> eval_data;
  if (!cfg.data.eval_file.empty()) {
    const std::string eval_h5 = prepared_data(cfg, *s.tokenizer, li, cfg.data.eval_file, "eval");
    eval_data = std::make_unique<TokenDataset>(TokenDataset::open(eval_h5, s.arch.vocab_size));
    eval_rows = eval_data->all_rows();
  } else if (cfg.data.eval_fraction > 0) {
    RowSplit split = train_data.split(cfg.data.eval_fraction, static_cast<uint64_t>(tc.seed));
    train_rows = split.train;
    eval_rows = split.eval;
  }
  const TokenDataset& eval_source = eval_data ? *eval_data : train_data;
  DataLoader loader(train_data, train_rows, B, T, static_cast<uint64_t>(tc.seed), li.rank, li.world_size);

  const int64_t accum = tc.gradient_accumulation_steps;
  const int64_t micro_per_epoch = loader.steps_per_epoch();
  const int64_t steps_per_epoch = std::max<int64_t>(1, micro_per_epoch / accum);
  const int64_t total_steps = tc.max_steps > 0 ? tc.max_steps
                                               : static_cast<int64_t>(std::ceil(tc.num_train_epochs * static_cast<double>(steps_per_epoch)));
  const int64_t warmup = tc.warmup_steps > 0 ? tc.warmup_steps
                                             : static_cast<int64_t>(std::ceil(tc.warmup_ratio * static_cast<double>(total_steps)));
  RT_REQUIRE(warmup <= total_steps, cfg.source + ": warmup (" + std::to_string(warmup) +
                                        " steps) is longer than the run (" + std::to_string(total_steps) + " steps)");

  ParamGroup& params = model.trainable();
  std::unique_ptr<Communicator> comm = make_communicator(*s.backend, cfg.distributed.timeout_s);
  const bool zero = zero_stage_1(cfg, li);
  Optimizer opt(*s.backend, params, tc, zero ? comm.get() : nullptr);
  // Gradients are reduced bucket by bucket during backward: summed on every rank, or under ZeRO-1
  // each piece only to the rank whose shard holds it (the optimizer's shard offsets). On one host
  // they cross over the copy engines rather than in NCCL's kernels, which would take SMs from
  // backward (distributed.grad_reduce; see comm.h): ZeRO-1's pieces to their owners, LoRA's
  // adapters to every rank. Full fine-tuning without ZeRO-1 keeps NCCL's all-reduce: a receive slot
  // of its gradients per other rank would cost a model's size in memory.
  const bool by_copies = cfg.distributed.grad_reduce == "auto" && (zero || cfg.lora.enabled) &&
                         comm->reduce_by_peer_copies(params.grad, zero ? opt.shard_offsets() : std::vector<int64_t>{});
  // NCCL's reductions go in groups of buckets of at least ddp_bucket_cap_mb MiB, as torch's DDP
  // reads bucket_cap_mb (the copies go bucket by bucket).
  const auto cap_bytes = static_cast<int64_t>(cfg.distributed.ddp_bucket_cap_mb * 1024 * 1024);
  GradReducer reducer(*comm, params, static_cast<int>(s.arch.n_layers), cap_bytes,
                      zero ? &opt.shard_offsets() : nullptr);
  reducer.exchange_embedding_rows(model);  // full fine-tuning of a tied embedding (see model.h)
  model.ledger().on_bucket_ready = [&](int bucket) { reducer.reduce_bucket(bucket); };
  model.before_forward_weights = [&](int layer) { opt.wait_for_weights(layer); };  // ZeRO-1's all-gather

  // A checkpoint holds the fp32 masters and the optimizer's states; there must be room for two
  // (the new one is complete before the oldest goes).
  const int64_t ckpt_bytes = params.numel * 4 + opt.state_bytes() + (1 << 20);
  const auto space = fs::space(ckpt_dir, ec);
  RT_REQUIRE(ec || space.available >= static_cast<uintmax_t>(2 * ckpt_bytes),
             ckpt_dir + ": " + std::to_string(space.available >> 20) + " MiB free, a checkpoint needs " +
                 std::to_string(ckpt_bytes >> 20) + " MiB and two must fit: free some space or choose another training.output_dir");

  // Resume: weights, optimizer states, data position and the step loop's counters.
  TrainProgress progress;
  const int64_t global_batch = B * accum * li.world_size;
  if (!resume.empty()) {
    std::vector<std::string> skipped;
    std::optional<CheckpointData> ck = find_resume_checkpoint(resume, ckpt_dir, &skipped);
    if (root)
      for (const auto& m : skipped) std::printf("resume: %s\n", m.c_str());
    if (!ck) {
      if (root) std::printf("resume: no checkpoint in %s yet: starting from step 0\n", ckpt_dir.c_str());
    } else {
      RT_REQUIRE(ck->tokenizer_hash == s.tokenizer->hash(),
                 ck->path + ": saved with another tokenizer (hash " + ck->tokenizer_hash + ") than this run's (" +
                     s.tokenizer->hash() + "): resume with the same model.tokenizer");
      RT_REQUIRE(ck->progress.global_batch == global_batch,
                 ck->path + ": saved by a run with " + std::to_string(ck->progress.global_batch) +
                     " sequences per step (per_device_train_batch_size x gradient_accumulation_steps x ranks), this run has " +
                     std::to_string(global_batch) + " (" + std::to_string(B) + " x " + std::to_string(accum) + " x " +
                     std::to_string(li.world_size) + "): choose a batch size and accumulation that give " +
                     std::to_string(ck->progress.global_batch) + " on " + std::to_string(li.world_size) + " ranks");
      if (root && (ck->progress.total_steps != total_steps || ck->progress.warmup_steps != warmup))
        std::printf("resume: note: the checkpoint's schedule has %lld steps (%lld warmup), this run's config %lld (%lld): "
                    "the learning rate follows this run's\n",
                    (long long)ck->progress.total_steps, (long long)ck->progress.warmup_steps, (long long)total_steps,
                    (long long)warmup);
      RT_REQUIRE(ck->progress.step <= total_steps,
                 ck->path + ": taken at step " + std::to_string(ck->progress.step) + ", beyond this run's " +
                     std::to_string(total_steps) + " steps: raise training.max_steps to continue it");
      restore_weights(model, *ck);
      for (const CheckpointTensor& t : ck->weights) opt.restore_master(t.name, t.values);
      opt.restore(ck->optimizer, ck->path);
      loader.restore(ck->progress.loader);
      progress = ck->progress;
      if (root)
        std::printf("resumed from %s at step %lld%s\n", ck->path.c_str(), (long long)progress.step,
                    progress.world_size != li.world_size
                        ? (" (saved on " + std::to_string(progress.world_size) + " ranks, continuing on " +
                           std::to_string(li.world_size) + ")").c_str()
                        : "");
    }
  } else if (root) {
    // A fresh run: checkpoints of an earlier run in the same directory would be taken for this one's.
    const auto old = list_checkpoints(ckpt_dir);
    for (const auto& path : old) fs::remove(path, ec);
    if (!old.empty())
      std::printf("note: removed %zu checkpoints of an earlier run from %s (--resume latest continues a run)\n",
                  old.size(), ckpt_dir.c_str());
  }
  comm->barrier("the start of training");

  // Where every rank runs (each of its GPUs under device_map auto), gathered for the banner.
  std::string my_devices = li.hostname + " " + s.backend->name();
  for (const auto& more : s.more_backends) my_devices += " + " + more->name();
  std::vector<std::string> rank_devices = gather_to_root(my_devices, li);
  const int devices_per_rank = 1 + static_cast<int>(s.more_backends.size());

  const double fpt = flops_per_token(s.arch, !cfg.lora.enabled, T);
  const double peak = peak_flops(s.backend->name());
  if (root) {
    const int64_t n_params = s.arch.n_params();
    std::printf("ranktune %s | %s\n", RANKTUNE_VERSION, s.placement.notice.empty() ? s.backend->name().c_str() : s.placement.notice.c_str());
    if (li.world_size > 1)
      std::printf("Multi-GPU training enabled: %d ranks x %d %s%s, data parallel over %s\n", li.world_size,
                  devices_per_rank, s.placement.use_gpu ? "GPU" : "CPU", devices_per_rank > 1 ? "s" : "",
                  comm->name().c_str());
    if (zero)
      std::printf(
          "ZeRO-1: fp32 masters and optimizer states sharded over %d ranks (whole tensors per shard); "
          "gradients to their owners %s\n",
          li.world_size, by_copies ? "over the copy engines (CUDA IPC)" : ("by " + comm->name()).c_str());
    else if (li.world_size > 1 && s.placement.use_gpu)
      std::printf("gradients summed over the ranks %s\n",
                  by_copies ? "over the copy engines (CUDA IPC)" : ("by " + comm->name()).c_str());
    if (li.world_size > 1)
      for (int r = 0; r < li.world_size; ++r) std::printf("  rank %d: %s\n", r, rank_devices[static_cast<size_t>(r)].c_str());
    if (!s.stages.empty())
      std::printf("device_map auto%s: %s\n", li.world_size > 1 ? " (rank 0; every rank alike on its own GPUs)" : "",
                  s.stages.c_str());
    if (!s.placement.unused_gpus_hint.empty()) std::printf("note: %s\n", s.placement.unused_gpus_hint.c_str());
    std::printf("model: %lld layers, hidden %lld, heads %lld/%lld kv, vocab %lld | parameters %.2fM, trainable %.3fM (%.2f%%)%s\n",
                (long long)s.arch.n_layers, (long long)s.arch.hidden_size, (long long)s.arch.n_heads,
                (long long)s.arch.n_kv_heads, (long long)s.arch.vocab_size, n_params / 1e6, params.numel / 1e6,
                100.0 * static_cast<double>(params.numel) / static_cast<double>(n_params),
                cfg.lora.enabled ? (" | LoRA r=" + std::to_string(cfg.lora.r)).c_str() : " | full fine-tuning");
    std::printf(
        "batch: %lld x %lld tokens x %lld accumulation x %d ranks = %lld sequences per step | %lld steps, %lld warmup "
        "| %s | checkpointing %s\n",
        (long long)B, (long long)T, (long long)accum, li.world_size, (long long)(B * accum * li.world_size),
        (long long)total_steps, (long long)warmup, opt.kind().c_str(),
        checkpointing_name(cfg.model.gradient_checkpointing));
    std::printf("%s", memory.report.c_str());
    std::fflush(stdout);
  }

  std::ofstream metrics;
  const std::string metrics_path = tc.output_dir + "/metrics.jsonl";
  if (root) {
    if (progress.step > 0) trim_metrics(metrics_path, progress.step);
    metrics.open(metrics_path, progress.step > 0 ? std::ios::app : std::ios::trunc);
  }
  const bool tty = root && (cfg.logging.progress_bar == "true" || (cfg.logging.progress_bar == "auto" && isatty(1)));
  const auto t_train = Clock::now();
  auto t_log = t_train;
  int64_t tokens_since_log = 0, tokens_total = progress.tokens_total, bad_in_row = progress.bad_steps_in_row;
  double loss_since_log = progress.loss_since_log;
  int64_t steps_since_log = progress.steps_since_log, skipped_since_log = progress.skipped_since_log;
  int64_t saved_step = progress.step > 0 ? progress.step : -1;
  const int64_t first_step = progress.step;

  // Rank 0 writes (every rank holds the same weights after a step; under ZeRO-1 the optimizer's
  // shards are gathered to rank 0 first).
  const auto save = [&](int64_t steps_done) {
    opt.gather_for_checkpoint();  // ZeRO-1: the shards come to rank 0
    if (root) {
      TrainProgress p;
      p.step = steps_done;
      p.optimizer_steps = opt.steps_taken();
      p.total_steps = total_steps;
      p.warmup_steps = warmup;
      p.epoch = static_cast<double>(steps_done) / static_cast<double>(steps_per_epoch);
      p.global_batch = global_batch;
      p.world_size = li.world_size;
      p.bad_steps_in_row = bad_in_row;
      p.tokens_total = tokens_total;
      p.loss_since_log = loss_since_log;
      p.steps_since_log = steps_since_log;
      p.skipped_since_log = skipped_since_log;
      p.loader = loader.state();
      const std::string path = ckpt_dir + "/" + checkpoint_file_name(steps_done);
      save_checkpoint(path, model, opt, p, cfg.to_yaml(), s.tokenizer->hash());
      const auto removed = prune_checkpoints(ckpt_dir, cfg.checkpoint.save_total_limit);
      std::printf("%ssaved checkpoint %s%s\n", tty ? "\r" : "", path.c_str(),
                  removed.empty() ? "" : (" (removed " + std::to_string(removed.size()) + " older)").c_str());
      std::fflush(stdout);
    }
    saved_step = steps_done;
    comm->barrier("the checkpoint save of step " + std::to_string(steps_done));
  };
  const int64_t fault_nan_step = fault_value("nan_loss_at_step"), fault_signal_step = fault_value("sigusr1_at_step");
  const int64_t fault_hang_step = fault_value("hang_at_step"), fault_hang_rank = fault_value("hang_rank");

  for (int64_t step = first_step; step < total_steps; ++step) {
    if (step + 1 == fault_signal_step) std::raise(SIGUSR1);
    // All micro-batches of the step first: the loss is the mean over every target token of the step.
    std::vector<Batch> micro;
    int64_t local_tokens = 0;
    for (int64_t k = 0; k < accum; ++k) {
      micro.push_back(loader.next());
      local_tokens += micro.back().n_target_tokens;
    }
    if (step + 1 == fault_hang_step && li.rank == fault_hang_rank)
      for (;;) std::this_thread::sleep_for(std::chrono::seconds(1));  // test hook: a hung rank
    const double step_tokens = comm->sum(static_cast<double>(local_tokens), "the token count of step " + std::to_string(step + 1));
    float grad_scale = step_tokens > 0 ? static_cast<float>(1.0 / step_tokens) : 0.f;
    // Test hook: a NaN step (loss and every gradient), as a diverging run produces.
    if (step + 1 == fault_nan_step) grad_scale = std::numeric_limits<float>::quiet_NaN();
    double loss_sum = 0;
    model.ledger().begin_step(static_cast<int>(accum));
    for (int64_t k = 0; k < accum; ++k) {
      model.ledger().begin_micro(static_cast<int>(k));
      const uint64_t dropout_seed = static_cast<uint64_t>(tc.seed) * 1000003ull + static_cast<uint64_t>(step * accum + k) * 7919ull +
                                    static_cast<uint64_t>(li.rank);
      loss_sum += model.forward_backward(inputs_of(micro[static_cast<size_t>(k)]), grad_scale, dropout_seed);
      model.ledger().end_micro();
    }
    model.ledger().end_step();
    reducer.finish(step + 1);
    double loss = step_tokens > 0 ? comm->sum(loss_sum, "the loss of step " + std::to_string(step + 1)) / step_tokens : 0.0;
    if (step + 1 == fault_nan_step) loss = std::numeric_limits<double>::quiet_NaN();
    const double grad_norm = opt.global_grad_norm();
    const double lr = learning_rate_at(step, total_steps, warmup, tc.learning_rate, tc.lr_scheduler_type);
    const bool finite = std::isfinite(loss) && std::isfinite(grad_norm);
    // A skipped step leaves no trace: the next step's first micro-batch overwrites every gradient
    // (the ledger's beta = 0 writes do not read the old values), and weights and states are untouched.
    if (finite) {
      bad_in_row = 0;
      const float clip = tc.max_grad_norm > 0 && grad_norm > tc.max_grad_norm
                             ? static_cast<float>(tc.max_grad_norm / (grad_norm + 1e-6))
                             : 1.f;
      opt.step(lr, clip);
    } else {
      ++bad_in_row;
      if (root) std::printf("step %lld: non-finite loss or gradient norm (loss %g, grad norm %g): step skipped\n",
                            (long long)step + 1, loss, grad_norm);
      RT_REQUIRE(bad_in_row <= tc.max_bad_steps,
                 std::to_string(bad_in_row) + " non-finite steps in a row (training.max_bad_steps = " +
                     std::to_string(tc.max_bad_steps) + "): lower training.learning_rate or check the data");
    }
    if (root && step == first_step) {
      const std::string line = measured_memory_line(memory, "after step " + std::to_string(step + 1));
      if (!line.empty()) std::printf("%s%s\n", tty ? "\r" : "", line.c_str());
    }
    tokens_since_log += static_cast<int64_t>(step_tokens);
    tokens_total += static_cast<int64_t>(step_tokens);
    if (finite) loss_since_log += loss, ++steps_since_log;
    else ++skipped_since_log;

    const bool last = step + 1 == total_steps;
    const bool log_now = (step + 1) % cfg.logging.logging_steps == 0 || last;
    const bool eval_now = !eval_rows.empty() && ((tc.eval_steps > 0 && (step + 1) % tc.eval_steps == 0) || last);
    double eval_loss = NAN;
    if (eval_now) eval_loss = evaluate(model, eval_source, eval_rows, std::min(B, tc.per_device_eval_batch_size), T, li, *comm).first;
    if (tty && !log_now) {
      const double frac = static_cast<double>(step + 1) / static_cast<double>(total_steps);
      const int filled = static_cast<int>(frac * 30);
      std::printf("\r[%s%s] %lld/%lld loss %.4f", std::string(static_cast<size_t>(filled), '#').c_str(),
                  std::string(static_cast<size_t>(30 - filled), '.').c_str(), (long long)step + 1, (long long)total_steps, loss);
      std::fflush(stdout);
    }
    if (log_now && root) {
      const auto now = Clock::now();
      const double dt = std::chrono::duration<double>(now - t_log).count();
      const double elapsed = std::chrono::duration<double>(now - t_train).count();
      // Throughput counts every token processed (the global figure), MFU the model FLOPs.
      const double seqs = static_cast<double>(B * accum * li.world_size * (steps_since_log ? steps_since_log : 1));
      const double tok_s = dt > 0 ? seqs * static_cast<double>(T) / dt : 0.0;
      const double mfu = peak > 0 ? tok_s * fpt / (peak * li.world_size) : 0.0;
      const double mem = gpu_mem_gib(s.placement);
      const double eta = elapsed / static_cast<double>(step + 1) * static_cast<double>(total_steps - step - 1);
      const double mean_loss = steps_since_log ? loss_since_log / static_cast<double>(steps_since_log) : NAN;
      std::printf("%sstep %lld/%lld | loss %.4f | lr %.3g | grad_norm %.3f | %.0f tok/s | mfu %.1f%% | mem %.2f GiB | eta %s%s\n",
                  tty ? "\r" : "", (long long)step + 1, (long long)total_steps, mean_loss, lr, grad_norm, tok_s, 100 * mfu, mem,
                  human_duration(eta).c_str(),
                  std::isnan(eval_loss) ? "" : (" | eval_loss " + std::to_string(eval_loss)).c_str());
      std::fflush(stdout);
      nlohmann::json j = {{"step", step + 1},
                          {"epoch", static_cast<double>(step + 1) / static_cast<double>(steps_per_epoch)},
                          {"loss", mean_loss},
                          {"lr", lr},
                          {"grad_norm", grad_norm},
                          {"tokens", tokens_total},
                          {"tokens_per_s", tok_s},
                          {"mfu", mfu},
                          {"mem_gib", mem},
                          {"elapsed_s", elapsed}};
      if (!std::isnan(eval_loss)) j["eval_loss"] = eval_loss;
      if (skipped_since_log > 0) j["skipped_steps"] = skipped_since_log;
      metrics << j.dump() << "\n";
      metrics.flush();
      t_log = now;
      tokens_since_log = 0;
      loss_since_log = 0;
      steps_since_log = 0;
      skipped_since_log = 0;
    }

    const int stop = StopSignals::agreed(*comm);
    if (last || stop || (cfg.checkpoint.save_steps > 0 && (step + 1) % cfg.checkpoint.save_steps == 0)) save(step + 1);
    if (stop && !last) {
      if (root) {
        std::printf("%s received: stopped after step %lld/%lld and saved its checkpoint; exiting with code %d so the "
                    "job is requeued (continue with the same command and --resume latest)\n",
                    signal_name(stop), (long long)step + 1, (long long)total_steps, kExitRequeue);
        std::fflush(stdout);
      }
      return kExitRequeue;
    }
  }
  if (saved_step != total_steps) save(total_steps);

  if (root && model.has_lora()) {
    save_peft_adapter(model, cfg, tc.output_dir + "/adapter");
    std::printf("saved the LoRA adapter (PEFT format) to %s/adapter\n", tc.output_dir.c_str());
  }
  // Held-out exact-match accuracy by generation, for prompt/completion eval files.
  if (root && !cfg.data.eval_file.empty() && ends_with(cfg.data.eval_file, ".jsonl") && eval_data &&
      eval_data->format() == "prompt_completion") {
    auto [correct, total] = exact_match(model, *s.tokenizer, cfg.data.eval_file);
    if (total > 0) {
      std::printf("exact-match accuracy on %lld held-out prompts: %.1f%% (%lld correct)\n", (long long)total,
                  100.0 * static_cast<double>(correct) / static_cast<double>(total), (long long)correct);
      std::ofstream(tc.output_dir + "/accuracy.json")
          << nlohmann::json{{"exact_match", static_cast<double>(correct) / static_cast<double>(total)},
                            {"correct", correct},
                            {"total", total}}
                 .dump()
          << "\n";
    }
  }
  if (root) {
    const std::string line = measured_memory_line(memory, "at the end");
    if (!line.empty()) std::printf("%s\n", line.c_str());
  }
  if (root)
    std::printf("done in %s\n", human_duration(std::chrono::duration<double>(Clock::now() - t_start).count()).c_str());
  return 0;
}

int run_eval(const RunConfig& cfg, const LaunchInfo& li) {
  const int64_t B = cfg.training.per_device_eval_batch_size, T = cfg.model.max_seq_length;
  Session s = open_session(cfg, li, B);
  const std::string file = cfg.data.eval_file.empty() ? cfg.data.train_file : cfg.data.eval_file;
  RT_REQUIRE(!file.empty(), cfg.source + ": set data.eval_file or data.train_file to evaluate on");
  const std::string h5 = prepared_data(cfg, *s.tokenizer, li, file, "eval");
  TokenDataset data = TokenDataset::open(h5, s.arch.vocab_size);
  std::unique_ptr<Communicator> comm = make_mpi_communicator(cfg.distributed.timeout_s);
  auto [loss, tokens] = evaluate(*s.model, data, data.all_rows(), B, T, li, *comm);
  if (li.rank == 0)
    std::printf("%s\n", nlohmann::json{{"loss", loss}, {"tokens", tokens}, {"file", file}, {"device", s.backend->name()}}
                            .dump()
                            .c_str());
  return 0;
}

int run_export(const RunConfig& run_cfg, const LaunchInfo& li, const std::string& checkpoint, const std::string& format,
               const std::string& output_dir) {
  if (li.rank != 0) return 0;
  RT_REQUIRE(format == "merged" || run_cfg.lora.enabled,
             run_cfg.source + ": --format peft needs a LoRA run (lora.enabled: true); use --format merged for full fine-tuning");
  // On the CPU path the model holds fp32 weights, so the adapter is written with the checkpoint's
  // fp32 masters exactly and the merge rounds to bf16 once.
  RunConfig cfg = run_cfg;
  cfg.model.device_map = "cpu";
  Session s = open_session(cfg, li, 1);
  LlamaModel& model = *s.model;
  const std::string ckpt_dir = cfg.training.output_dir + "/checkpoints";
  std::vector<std::string> skipped;
  std::optional<CheckpointData> ck = find_resume_checkpoint(checkpoint, ckpt_dir, &skipped);
  for (const auto& m : skipped) std::fprintf(stderr, "export: %s\n", m.c_str());
  RT_REQUIRE(ck.has_value(), "no checkpoint in " + ckpt_dir + ": train first, or give --checkpoint PATH");
  RT_REQUIRE(ck->tokenizer_hash == s.tokenizer->hash(),
             ck->path + ": saved with another tokenizer (hash " + ck->tokenizer_hash + ") than this config's (" +
                 s.tokenizer->hash() + "): export with the run's config");
  restore_weights(model, *ck);

  if (format == "peft") {
    save_peft_adapter(model, cfg, output_dir);
    std::printf("exported %s (step %lld) as a PEFT adapter to %s\n", ck->path.c_str(), (long long)ck->progress.step,
                output_dir.c_str());
    return 0;
  }
  // Merged: W + scaling * B A for every LoRA target, in double, then rounded once to bf16.
  fs::create_directories(output_dir);
  const double scaling = model.options().lora_scaling;
  SafetensorsWriter w;
  for (const ParamSpec& p : model.base().specs) {
    std::vector<float> weight = model.get_tensor(p.name);
    const std::string prefix = p.name.substr(0, p.name.size() - std::string(".weight").size());
    if (model.has_lora() && model.lora().find(prefix + ".lora_A.weight")) {
      const ParamSpec& a_spec = *model.lora().find(prefix + ".lora_A.weight");
      const std::vector<float> a = model.get_tensor(prefix + ".lora_A.weight"), b = model.get_tensor(prefix + ".lora_B.weight");
      const int64_t r = a_spec.shape[0], in = a_spec.shape[1], out = p.shape[0];
      RT_ASSERT(p.shape.size() == 2 && p.shape[1] == in, "LoRA shape of " + p.name);
#pragma omp parallel for
      for (int64_t o = 0; o < out; ++o)
        for (int64_t i = 0; i < in; ++i) {
          double delta = 0;
          for (int64_t k = 0; k < r; ++k)
            delta += static_cast<double>(b[static_cast<size_t>(o * r + k)]) * static_cast<double>(a[static_cast<size_t>(k * in + i)]);
          float& x = weight[static_cast<size_t>(o * in + i)];
          x = static_cast<float>(static_cast<double>(x) + scaling * delta);
        }
    }
    std::vector<uint16_t> bf(weight.size());
    for (size_t i = 0; i < weight.size(); ++i) bf[i] = f32_to_bf16(weight[i]);
    w.add_bf16(p.name, p.shape, bf);
  }
  w.set_metadata("format", "pt");
  w.write(output_dir + "/model.safetensors");
  HfLlamaConfig hc;
  const std::string base_config = cfg.model.name_or_path + "/config.json";
  if (!cfg.model.name_or_path.empty() && fs::exists(base_config)) hc = read_hf_config(base_config);
  hc.arch = s.arch;
  hc.torch_dtype = "bfloat16";
  write_hf_config(output_dir + "/config.json", hc);
  // The base model's tokenizer files travel along, so the directory loads as it is.
  for (const char* f : {"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json"}) {
    const std::string from = cfg.model.name_or_path + "/" + f;
    std::error_code ec;
    if (!cfg.model.name_or_path.empty() && fs::exists(from))
      fs::copy_file(from, output_dir + "/" + f, fs::copy_options::overwrite_existing, ec);
  }
  std::printf("exported %s (step %lld) as a merged bf16 HF model to %s\n", ck->path.c_str(), (long long)ck->progress.step,
              output_dir.c_str());
  return 0;
}

int run_generate(const RunConfig& cfg, const LaunchInfo& li, const std::string& prompt, int64_t max_new_tokens,
                 double temperature, double top_p, uint64_t seed) {
  Session s = open_session(cfg, li, 1);
  std::vector<int32_t> ids;
  if (auto bos = s.tokenizer->token_id("<|begin_of_text|>")) ids.push_back(*bos);
  auto p = s.tokenizer->encode(prompt);
  ids.insert(ids.end(), p.begin(), p.end());
  RT_REQUIRE(!ids.empty(), "--prompt is empty and the tokenizer adds no <|begin_of_text|>: give some text");
  RT_REQUIRE(static_cast<int64_t>(ids.size()) < cfg.model.max_seq_length,
             "the prompt has " + std::to_string(ids.size()) + " tokens, which fills model.max_seq_length (" +
                 std::to_string(cfg.model.max_seq_length) + "): shorten it or raise --set model.max_seq_length=N");
  std::vector<int32_t> stop;
  for (const char* t : {"<|end_of_text|>", "<|eot_id|>"})
    if (auto id = s.tokenizer->token_id(t)) stop.push_back(*id);
  auto out = generate(*s.model, {ids}, SamplingOptions{max_new_tokens, temperature, top_p, seed, stop});
  if (li.rank == 0) std::printf("%s%s\n", prompt.c_str(), s.tokenizer->decode(out[0]).c_str());
  return 0;
}

}  // namespace ranktune
