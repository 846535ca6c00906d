// The training run, top to bottom: run_train() sets up (Session), then each step takes
// gradient_accumulation_steps micro-batches through LlamaModel::forward_backward, reduces the
// gradients over ranks bucket by bucket as the ledger reports them ready, clips by the global norm
// and calls the optimizer.
#include "ranktune/trainer.h"

#include <mpi.h>
#include <unistd.h>

#include <chrono>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <memory>
#include <sstream>

#include <nlohmann/json.hpp>

#include "ranktune/backend.h"
#include "ranktune/dataset.h"
#include "ranktune/error.h"
#include "ranktune/generate.h"
#include "ranktune/model.h"
#include "ranktune/optimizer.h"
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

// Gradient reduction over ranks. The CPU path sums fp32 gradient buckets with MPI_Allreduce as the
// ledger reports them ready (during backward, in backward order). A bucket is a layer's tensors, or
// the embedding, final norm and head; it is reduced as the runs of adjacent tensors it holds.
class GradReducer {
 public:
  GradReducer(const LaunchInfo& li, Backend& be, ParamGroup& params, int n_layers) : world_(li.world_size) {
    if (world_ == 1) return;
    RT_REQUIRE(be.device() == Device::cpu,
               "data parallel over several ranks runs on the CPU path in this build; multi-GPU data parallel "
               "(NCCL) is not built yet: run one rank per job on the GPU, or set model.device_map: cpu");
    runs_.resize(static_cast<size_t>(n_layers + 1));
    for (const ParamSpec& p : params.specs) {
      auto& runs = runs_[static_cast<size_t>(p.layer >= 0 ? p.layer : n_layers)];
      if (!runs.empty() && runs.back().first + runs.back().second == p.offset) runs.back().second += p.numel;
      else runs.push_back({p.offset, p.numel});
    }
    grad_ = params.grad;
  }
  void reduce_bucket(int bucket) {
    if (world_ == 1) return;
    for (const auto& [offset, n] : runs_[static_cast<size_t>(bucket)])
      MPI_Allreduce(MPI_IN_PLACE, grad_.ptr<float>() + offset, static_cast<int>(n), MPI_FLOAT, MPI_SUM, MPI_COMM_WORLD);
  }

 private:
  int world_;
  Tensor grad_;
  std::vector<std::vector<std::pair<int64_t, int64_t>>> runs_;  // per bucket: (offset, numel) runs
};

double allreduce_sum(double x) {
  double out = 0;
  MPI_Allreduce(&x, &out, 1, MPI_DOUBLE, MPI_SUM, MPI_COMM_WORLD);
  return out;
}

std::string human_duration(double s) {
  char buf[32];
  const int t = static_cast<int>(s + 0.5);
  if (t >= 3600) std::snprintf(buf, sizeof buf, "%dh%02dm", t / 3600, (t % 3600) / 60);
  else std::snprintf(buf, sizeof buf, "%dm%02ds", t / 60, t % 60);
  return buf;
}

double gpu_mem_gib(bool gpu) {
#ifdef RANKTUNE_HAVE_CUDA
  if (gpu) {
    size_t free_b = 0, total_b = 0;
    if (cudaMemGetInfo(&free_b, &total_b) == cudaSuccess) return static_cast<double>(total_b - free_b) / (1 << 30);
  }
#endif
  (void)gpu;
  return 0.0;
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

// Everything a command needs: backend on the placed device, tokenizer, model with weights.
struct Session {
  Placement placement;
  std::unique_ptr<Backend> backend;
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
  s.model = std::make_unique<LlamaModel>(*s.backend, model_options_from(cfg, s.arch, max_batch));
  const uint64_t seed = static_cast<uint64_t>(cfg.training.seed);
  if (cfg.model.name_or_path.empty()) s.model->init_base_random(seed);
  else load_hf_weights(*s.model, cfg.model.name_or_path);
  if (s.model->has_lora()) {
    if (!cfg.lora.adapter_path.empty()) load_peft_adapter(*s.model, cfg.lora.adapter_path);
    else s.model->init_lora(seed);
  }
  return s;
}

ModelInputs inputs_of(const Batch& b) {
  return ModelInputs{b.batch_size, b.seq_len, b.input_ids.data(), b.targets.data(), b.positions.data(),
                     b.doc_ids.empty() ? nullptr : b.doc_ids.data()};
}

// Mean loss over every row of `rows`, all ranks together.
std::pair<double, int64_t> evaluate(LlamaModel& model, const TokenDataset& data, const std::vector<int64_t>& rows,
                                    int64_t batch, int64_t seq, const LaunchInfo& li) {
  double loss = 0;
  int64_t tokens = 0;
  for (const auto& group : eval_row_groups(rows, batch, li.rank, li.world_size)) {
    if (group.empty()) continue;
    Batch b = make_batch(data, group, batch, seq);
    loss += model.forward_loss(inputs_of(b));
    tokens += b.n_target_tokens;
  }
  const double total_loss = allreduce_sum(loss);
  const int64_t total_tokens = static_cast<int64_t>(allreduce_sum(static_cast<double>(tokens)));
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

int run_train(const RunConfig& cfg, const LaunchInfo& li) {
  const auto t_start = Clock::now();
  const bool root = li.rank == 0;
  const TrainingSection& tc = cfg.training;
  const int64_t B = tc.per_device_train_batch_size, T = cfg.model.max_seq_length;
  RT_REQUIRE(!cfg.data.train_file.empty(), cfg.source + ": data.train_file is not set");

  // Output directory first: an unwritable one is reported before any work.
  std::error_code ec;
  fs::create_directories(tc.output_dir, ec);
  RT_REQUIRE(!ec && access(tc.output_dir.c_str(), W_OK) == 0,
             cfg.source + ": training.output_dir = " + tc.output_dir + " cannot be written: choose another directory");

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
  Optimizer opt(*s.backend, params, tc);
  GradReducer reducer(li, *s.backend, params, static_cast<int>(s.arch.n_layers));
  model.ledger().on_bucket_ready = [&](int bucket) { reducer.reduce_bucket(bucket); };

  const double fpt = flops_per_token(s.arch, !cfg.lora.enabled, T);
  const double peak = peak_flops(s.backend->name());
  if (root) {
    const int64_t n_params = s.arch.n_params();
    std::printf("ranktune %s | %s\n", RANKTUNE_VERSION, s.placement.notice.empty() ? s.backend->name().c_str() : s.placement.notice.c_str());
    if (li.world_size > 1)
      std::printf("Multi-GPU training enabled: %d ranks x 1 %s, data parallel over %s\n", li.world_size,
                  s.placement.use_gpu ? "GPU" : "CPU",
                  s.placement.use_gpu ? ("NCCL " + li.nccl_version).c_str() : ("MPI (" + li.mpi_version + ")").c_str());
    if (!s.placement.unused_gpus_hint.empty()) std::printf("note: %s\n", s.placement.unused_gpus_hint.c_str());
    std::printf("model: %lld layers, hidden %lld, heads %lld/%lld kv, vocab %lld | parameters %.2fM, trainable %.3fM (%.2f%%)%s\n",
                (long long)s.arch.n_layers, (long long)s.arch.hidden_size, (long long)s.arch.n_heads,
                (long long)s.arch.n_kv_heads, (long long)s.arch.vocab_size, n_params / 1e6, params.numel / 1e6,
                100.0 * static_cast<double>(params.numel) / static_cast<double>(n_params),
                cfg.lora.enabled ? (" | LoRA r=" + std::to_string(cfg.lora.r)).c_str() : " | full fine-tuning");
    std::printf("batch: %lld x %lld tokens x %lld accumulation x %d ranks = %lld sequences per step | %lld steps, %lld warmup | %s | checkpointing %s\n",
                (long long)B, (long long)T, (long long)accum, li.world_size, (long long)(B * accum * li.world_size),
                (long long)total_steps, (long long)warmup, opt.kind().c_str(),
                cfg.model.gradient_checkpointing == Checkpointing::off ? "off" : "on");
    std::printf("memory plan: weights %.1f MiB, trainable+grads+optimizer %.1f MiB, activations %.1f MiB\n",
                static_cast<double>(model.base().numel * static_cast<int64_t>(dtype_size(s.backend->act_dtype()))) / (1 << 20),
                static_cast<double>(params.numel * 8 + opt.state_bytes()) / (1 << 20),
                static_cast<double>(model.activation_bytes()) / (1 << 20));
    std::fflush(stdout);
  }

  std::ofstream metrics;
  if (root) metrics.open(tc.output_dir + "/metrics.jsonl", std::ios::trunc);
  const bool tty = root && (cfg.logging.progress_bar == "true" || (cfg.logging.progress_bar == "auto" && isatty(1)));
  const auto t_train = Clock::now();
  auto t_log = t_train;
  int64_t tokens_since_log = 0, tokens_total = 0, bad_in_row = 0;
  double loss_since_log = 0;
  int64_t steps_since_log = 0;

  for (int64_t step = 0; step < total_steps; ++step) {
    // All micro-batches of the step first: the loss is the mean over every target token of the step.
    std::vector<Batch> micro;
    int64_t local_tokens = 0;
    for (int64_t k = 0; k < accum; ++k) {
      micro.push_back(loader.next());
      local_tokens += micro.back().n_target_tokens;
    }
    const double step_tokens = allreduce_sum(static_cast<double>(local_tokens));
    const float grad_scale = step_tokens > 0 ? static_cast<float>(1.0 / step_tokens) : 0.f;
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
    const double loss = step_tokens > 0 ? allreduce_sum(loss_sum) / step_tokens : 0.0;
    const double grad_norm = std::sqrt(s.backend->sum_squares(params.grad));
    const double lr = learning_rate_at(step, total_steps, warmup, tc.learning_rate, tc.lr_scheduler_type);
    const bool finite = std::isfinite(loss) && std::isfinite(grad_norm);
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
    tokens_since_log += static_cast<int64_t>(step_tokens);
    tokens_total += static_cast<int64_t>(step_tokens);
    if (finite) loss_since_log += loss, ++steps_since_log;

    const bool last = step + 1 == total_steps;
    const bool log_now = (step + 1) % cfg.logging.logging_steps == 0 || last;
    const bool eval_now = !eval_rows.empty() && ((tc.eval_steps > 0 && (step + 1) % tc.eval_steps == 0) || last);
    double eval_loss = NAN;
    if (eval_now) eval_loss = evaluate(model, eval_source, eval_rows, std::min(B, tc.per_device_eval_batch_size), T, li).first;
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
      const double mem = gpu_mem_gib(s.placement.use_gpu);
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
      metrics << j.dump() << "\n";
      metrics.flush();
      t_log = now;
      tokens_since_log = 0;
      loss_since_log = 0;
      steps_since_log = 0;
    }
  }

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
  auto [loss, tokens] = evaluate(*s.model, data, data.all_rows(), B, T, li);
  if (li.rank == 0)
    std::printf("%s\n", nlohmann::json{{"loss", loss}, {"tokens", tokens}, {"file", file}, {"device", s.backend->name()}}
                            .dump()
                            .c_str());
  return 0;
}

int run_generate(const RunConfig& cfg, const LaunchInfo& li, const std::string& prompt, int64_t max_new_tokens,
                 double temperature, double top_p, uint64_t seed) {
  Session s = open_session(cfg, li, 1);
  std::vector<int32_t> ids;
  if (auto bos = s.tokenizer->token_id("<|begin_of_text|>")) ids.push_back(*bos);
  auto p = s.tokenizer->encode(prompt);
  ids.insert(ids.end(), p.begin(), p.end());
  RT_REQUIRE(!ids.empty(), "ranktune generate: --prompt is empty and the tokenizer adds no <|begin_of_text|>: give some text");
  RT_REQUIRE(static_cast<int64_t>(ids.size()) < cfg.model.max_seq_length,
             "ranktune generate: the prompt has " + std::to_string(ids.size()) + " tokens, which fills model.max_seq_length (" +
                 std::to_string(cfg.model.max_seq_length) + "): shorten it or raise --set model.max_seq_length=N");
  std::vector<int32_t> stop;
  for (const char* t : {"<|end_of_text|>", "<|eot_id|>"})
    if (auto id = s.tokenizer->token_id(t)) stop.push_back(*id);
  auto out = generate(*s.model, {ids}, SamplingOptions{max_new_tokens, temperature, top_p, seed, stop});
  if (li.rank == 0) std::printf("%s%s\n", prompt.c_str(), s.tokenizer->decode(out[0]).c_str());
  return 0;
}

}  // namespace ranktune
