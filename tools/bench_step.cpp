// Whole training steps on the GPU path at the Llama-3.2-1B shape with random weights: forward,
// backward and optimizer, timed over several steps after warm-up; and the bf16 GEMM rate of our
// cuBLASLt path, the denominator of MFU. tools/benchmark.py runs it next to the HF peer.
//
// Usage: ranktune_bench_step MODE [--gc 0|1|2|3] [--steps N] [--warmup N] [--batch B] [--seq T]
//                                 [--layers L] [--profile 0|1] [--ranks N] [--zero 0|1]
//                                 [--bucket-cap-mb N] [--copy-engines 0|1] [--iters N]
//   MODE: lora   LoRA r=16 on all seven projections
//         full   full fine-tuning
//         qlora  LoRA over NF4 base weights (load_in_4bit)
//         gemm   bf16 GEMM TFLOP/s through Backend::matmul on large shapes (--iters per shape)
//   --profile 1  time every backend op with CUDA events (tools/profiling_backend.h); the op table
//                goes to stderr and into the JSON line's "profile" field. Profiled steps run slower
//                (two event records per op), so take throughput from an unprofiled run.
//   --ranks N    data-parallel ranks under mpirun (one GPU each, NCCL as in training); with N > 1,
//                rank 0 prints the line, with gpus = N and tokens_per_s counting all ranks' tokens
//   --zero 1     ZeRO-1 (full with --ranks > 1 only), as distributed.zero_stage: 1 trains: fp32
//                masters and AdamW states sharded over the ranks, gradients reduced to their shard's
//                owner during backward, updated weights broadcast from their owners
//   --bucket-cap-mb N  NCCL's gradient reductions grouped up to N MiB, as distributed.ddp_bucket_cap_mb
//                (default 64; 0 = each layer alone)
//   --copy-engines 0|1  with --ranks > 1, LoRA's (and QLoRA's) gradients summed, or under --zero 1
//                sent to their owners, over the copy engines (CUDA IPC) as distributed.grad_reduce:
//                auto does on one host (1, the default), or by NCCL (0)
//
// Output: exactly one JSON line on stdout, in the form tools/hf_peer_baseline.py prints for the HF
// peer (peer, mode, gpus, batch_per_gpu, seq, layers, grad_ckpt, params_total, params_trainable,
// tokens_per_s, step_ms, peak_mem_gib, loss, gpu), plus model_flops_per_token (see
// flops_per_token below), model_tflops_per_s, plan_mem_gib (the memory plan's total for the run,
// src/memory_plan.cpp, to compare with peak_mem_gib), zero (0 or 1), grad_reduce (copy_engines or nccl; "" on one GPU),
// steps, warmup, profiled and, with --profile 1, profile: {steps, step_ms, gpu_span_ms, ops_ms, ops: [{op, calls, ms,
// gflop}], gaps: [{between: "op -> op", count, ms}] (the GPU's longest idle gaps)} (per step). gemm mode prints {peer,
// mode: "gemm", gemm_tflops (best shape), shapes: [...], gpu}. Errors go to stderr; exit 2 for a usage error or a mode
// that is not available, 1 for a failure.
#include <cuda_runtime.h>
#include <mpi.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <memory>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "profiling_backend.h"
#include "ranktune/backend.h"
#include "ranktune/comm.h"
#include "ranktune/memory_plan.h"
#include "ranktune/model.h"
#include "ranktune/optimizer.h"

using namespace ranktune;

namespace {

constexpr const char* kUsage =
    "usage: ranktune_bench_step lora|full|qlora|gemm [--gc 0|1|2|3 (2 = offload, 3 = keep_attention)]\n"
    "                           [--steps N] [--warmup N] [--batch B]\n"
    "                           [--seq T] [--layers L] [--profile 0|1] [--ranks N] [--zero 0|1 (full, --ranks > 1)]\n"
    "                           [--bucket-cap-mb N] [--copy-engines 0|1 (--ranks > 1; lora, qlora or --zero 1)]\n"
    "                           [--iters N]\n";

[[noreturn]] void usage_error(const std::string& msg) {
  std::fprintf(stderr, "ranktune_bench_step: %s\n%s", msg.c_str(), kUsage);
  std::exit(2);
}

struct Args {
  std::string mode;
  int gc = 1, steps = 10, warmup = 3, profile = 0, ranks = 1, zero = 0, iters = 50, bucket_cap_mb = 64,
      copy_engines = 1;
  int64_t batch = 2, seq = 2048, layers = 16;
};

Args parse_args(int argc, char** argv) {
  if (argc < 2) usage_error("missing MODE");
  Args a;
  a.mode = argv[1];
  if (a.mode != "lora" && a.mode != "full" && a.mode != "qlora" && a.mode != "gemm")
    usage_error("unknown MODE '" + a.mode + "'");
  for (int i = 2; i < argc; i += 2) {
    const std::string key = argv[i];
    if (i + 1 >= argc) usage_error(key + " needs a value");
    char* end = nullptr;
    const long v = std::strtol(argv[i + 1], &end, 10);
    if (*argv[i + 1] == '\0' || *end != '\0') usage_error(key + ": '" + argv[i + 1] + "' is not an integer");
    if (key == "--gc")
      a.gc = static_cast<int>(v);
    else if (key == "--steps")
      a.steps = static_cast<int>(v);
    else if (key == "--warmup")
      a.warmup = static_cast<int>(v);
    else if (key == "--batch")
      a.batch = v;
    else if (key == "--seq")
      a.seq = v;
    else if (key == "--layers")
      a.layers = v;
    else if (key == "--profile")
      a.profile = static_cast<int>(v);
    else if (key == "--ranks")
      a.ranks = static_cast<int>(v);
    else if (key == "--zero")
      a.zero = static_cast<int>(v);
    else if (key == "--iters")
      a.iters = static_cast<int>(v);
    else if (key == "--bucket-cap-mb")
      a.bucket_cap_mb = static_cast<int>(v);
    else if (key == "--copy-engines")
      a.copy_engines = static_cast<int>(v);
    else
      usage_error("unknown option '" + key + "'");
  }
  if (a.steps < 1 || a.warmup < 0 || a.batch < 1 || a.seq < 2 || a.layers < 1 || a.iters < 1 || a.ranks < 1)
    usage_error("--steps, --batch, --layers, --iters, --ranks must be >= 1, --seq >= 2, --warmup >= 0");
  if (a.zero != 0 && a.zero != 1) usage_error("--zero must be 0 or 1");
  if (a.bucket_cap_mb < 0) usage_error("--bucket-cap-mb must be >= 0");
  if (a.copy_engines != 0 && a.copy_engines != 1) usage_error("--copy-engines must be 0 or 1");
  if (a.gc < 0 || a.gc > 3) usage_error("--gc must be 0 (off), 1 (on), 2 (offload) or 3 (keep_attention)");
  if (a.zero == 1 && (a.mode != "full" || a.ranks < 2))
    usage_error("--zero 1 shards full fine-tuning over ranks: it needs MODE full and --ranks > 1");
  return a;
}

// How many processes the launcher started (mpirun, or 1 when run bare).
int launched_ranks() {
  for (const char* var : {"OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_SIZE"})
    if (const char* s = std::getenv(var)) return std::atoi(s);
  return 1;
}

LlamaArch llama_3_2_1b(int64_t layers) {
  LlamaArch a;
  a.vocab_size = 128256;
  a.hidden_size = 2048;
  a.intermediate_size = 8192;
  a.n_layers = layers;
  a.n_heads = 32;
  a.n_kv_heads = 8;
  a.head_dim = 64;
  a.rms_norm_eps = 1e-5;
  a.rope_theta = 500000;
  a.max_position_embeddings = 131072;
  a.tie_word_embeddings = true;
  a.rope_scaling = {"llama3", 32.0, 1.0, 4.0, 8192};
  return a;
}

// Model FLOPs per trained token, the numerator of MFU. A copy of flops_per_token in
// src/trainer.cpp (keep the two equal): 6 FLOPs per weight (forward 2, data gradient 2, weight
// gradient 2) for full fine-tuning, 4 for LoRA (no base-weight gradients; the adapters' own FLOPs
// are left out); the LM head counted once even when tied (the embedding lookup is no GEMM); causal
// attention 6 * layers * seq * heads * head_dim (QK^T and PV over half of the T x T scores, forward
// and backward). Recompute under checkpointing is not counted, as MFU conventionally does not.
double flops_per_token(const LlamaArch& a, bool full, int64_t seq) {
  const double VC = static_cast<double>(a.vocab_size * a.hidden_size);
  const double layers =
      static_cast<double>(a.n_params()) - VC * (a.tie_word_embeddings ? 1 : 2) - static_cast<double>(a.hidden_size);
  const double per_weight = full ? 6.0 : 4.0;
  const double attn = 6.0 * static_cast<double>(a.n_layers * seq * a.n_heads * a.head_dim);
  return per_weight * (layers + VC) + attn;
}

std::string gpu_name() {
  int device = 0;
  BENCH_CUDA_CHECK(cudaGetDevice(&device));
  cudaDeviceProp prop{};
  BENCH_CUDA_CHECK(cudaGetDeviceProperties(&prop, device));
  return prop.name;
}

// A bf16 matrix of uniform values in [-1, 1): GEMMs over zeros draw less power and would run at
// clocks a real workload never sees.
Tensor random_bf16(Backend& be, std::vector<Buffer>& keep, int64_t rows, int64_t cols, uint64_t seed) {
  keep.push_back(be.alloc(static_cast<size_t>(rows * cols) * 2));
  Tensor t = keep.back().as(DType::bf16, {rows, cols});
  std::vector<uint16_t> host(static_cast<size_t>(rows * cols));
  uint64_t state = seed * 0x9E3779B97F4A7C15ull + 1;
  for (auto& h : host) {
    state = state * 6364136223846793005ull + 1442695040888963407ull;
    h = f32_to_bf16(static_cast<float>(state >> 40) * (2.0f / 16777216.0f) - 1.0f);
  }
  be.upload(t, host.data());
  return t;
}

// bf16 GEMM TFLOP/s of Backend::matmul (cuBLASLt) in the model's forward layout, out = a b^T with
// a [M,K], b [N,K] (nn.Linear), on a large square shape and the 1B model's two biggest layer GEMMs.
// The best of them is what tools/benchmark.py divides model FLOPs by for MFU.
int run_gemm_probe(const Args& args) {
  auto be = make_cuda_backend(0);
  struct Shape {
    const char* name;
    int64_t m, n, k;
  };
  const Shape shapes[] = {{"square 8192x8192x8192", 8192, 8192, 8192},
                          {"gate_up fwd [4096x2048]x[2048x16384]", 4096, 16384, 2048},
                          {"down fwd [4096x8192]x[8192x2048]", 4096, 2048, 8192}};
  cudaStream_t stream = static_cast<cudaStream_t>(be->native_stream());
  cudaEvent_t start = nullptr, stop = nullptr;
  BENCH_CUDA_CHECK(cudaEventCreate(&start));
  BENCH_CUDA_CHECK(cudaEventCreate(&stop));
  nlohmann::json rows = nlohmann::json::array();
  double best = 0;
  std::string best_name;
  for (const Shape& s : shapes) {
    std::vector<Buffer> keep;
    Tensor a = random_bf16(*be, keep, s.m, s.k, 1), b = random_bf16(*be, keep, s.n, s.k, 2);
    keep.push_back(be->alloc(static_cast<size_t>(s.m * s.n) * 2));
    Tensor out = keep.back().as(DType::bf16, {s.m, s.n});
    for (int i = 0; i < 5; ++i) be->matmul(out, a, b, false, true, 1.f, 0.f);
    BENCH_CUDA_CHECK(cudaEventRecord(start, stream));
    for (int i = 0; i < args.iters; ++i) be->matmul(out, a, b, false, true, 1.f, 0.f);
    BENCH_CUDA_CHECK(cudaEventRecord(stop, stream));
    BENCH_CUDA_CHECK(cudaEventSynchronize(stop));
    float total_ms = 0;
    BENCH_CUDA_CHECK(cudaEventElapsedTime(&total_ms, start, stop));
    const double ms = total_ms / args.iters;
    const double tflops =
        2.0 * static_cast<double>(s.m) * static_cast<double>(s.n) * static_cast<double>(s.k) / (ms * 1e-3) / 1e12;
    rows.push_back({{"name", s.name}, {"m", s.m}, {"n", s.n}, {"k", s.k}, {"ms", ms}, {"tflops", tflops}});
    std::fprintf(stderr, "gemm %-40s %8.3f ms %7.1f TFLOP/s\n", s.name, ms, tflops);
    if (tflops > best) {
      best = tflops;
      best_name = s.name;
    }
  }
  BENCH_CUDA_CHECK(cudaEventDestroy(start));
  BENCH_CUDA_CHECK(cudaEventDestroy(stop));
  nlohmann::json j = {{"peer", "ranktune"},  {"mode", "gemm"}, {"gemm_tflops", best}, {"gemm_shape", best_name},
                      {"iters", args.iters}, {"shapes", rows}, {"gpu", gpu_name()}};
  std::printf("%s\n", j.dump().c_str());
  return 0;
}

nlohmann::json profile_json(const bench::ProfilingBackend& prof, double step_ms) {
  nlohmann::json ops = nlohmann::json::array();
  double ops_ms = 0;
  for (const auto& r : prof.rows()) {
    ops.push_back({{"op", r.op}, {"calls", r.calls}, {"ms", r.ms}, {"gflop", r.gflop}});
    ops_ms += r.ms;
  }
  nlohmann::json gaps = nlohmann::json::array();
  for (const auto& g : prof.gaps(12)) gaps.push_back({{"between", g.op}, {"count", g.calls}, {"ms", g.ms}});
  return {{"steps", prof.steps()}, {"step_ms", step_ms}, {"gpu_span_ms", prof.gpu_span_ms()},
          {"ops_ms", ops_ms},      {"ops", ops},         {"gaps", gaps}};
}

void print_profile(const nlohmann::json& p) {
  const double step_ms = p["step_ms"].get<double>();
  std::fprintf(stderr, "\nop profile, per step (mean of %d profiled steps; CUDA events around each op)\n",
               p["steps"].get<int>());
  std::fprintf(stderr, "%-40s %8s %10s %7s %9s\n", "op", "calls", "ms", "%", "TFLOP/s");
  for (const auto& r : p["ops"]) {
    const double ms = r["ms"].get<double>(), gflop = r["gflop"].get<double>();
    std::fprintf(stderr, "%-40s %8.0f %10.3f %6.1f%% %9s\n", r["op"].get<std::string>().c_str(),
                 r["calls"].get<double>(), ms, 100 * ms / step_ms,
                 gflop > 0 && ms > 0 ? std::to_string(static_cast<int>(gflop / ms)).c_str() : "-");
  }
  const double ops_ms = p["ops_ms"].get<double>(), span = p["gpu_span_ms"].get<double>();
  std::fprintf(stderr, "%-40s %8s %10.3f %6.1f%%\n", "sum of ops", "", ops_ms, 100 * ops_ms / step_ms);
  std::fprintf(stderr, "%-40s %8s %10.3f %6.1f%%\n", "GPU idle between ops (host-bound gaps)", "", span - ops_ms,
               100 * (span - ops_ms) / step_ms);
  std::fprintf(stderr, "%-40s %8s %10.3f %6.1f%%\n", "outside the ops' span (host, sync)", "", step_ms - span,
               100 * (step_ms - span) / step_ms);
  std::fprintf(stderr, "%-40s %8s %10.3f\n", "step wall time (profiled)", "", step_ms);
  std::fprintf(stderr, "\nthe GPU's longest idle gaps, per step (previous op -> next op)\n");
  for (const auto& g : p["gaps"])
    std::fprintf(stderr, "%-90s %6.0f x %8.3f ms\n", g["between"].get<std::string>().c_str(), g["count"].get<double>(),
                 g["ms"].get<double>());
}

int run_training(const Args& args) {
  const LlamaArch a = llama_3_2_1b(args.layers);
  const int64_t B = args.batch, T = args.seq;
  ModelOptions o;
  o.arch = a;
  o.lora = args.mode == "lora" || args.mode == "qlora";
  o.train_base = args.mode == "full";
  o.load_in_4bit = args.mode == "qlora";
  o.lora_r = 16;
  o.lora_scaling = 1.0f;
  o.lora_targets = lora_module_names();
  const Checkpointing by_gc[] = {Checkpointing::off, Checkpointing::on, Checkpointing::offload,
                                 Checkpointing::keep_attention};
  o.checkpointing = by_gc[args.gc];
  o.max_batch = B;
  o.max_seq = T;
  // ZeRO-1 as the trainer runs it on the GPU: the optimizer keeps the fp32 masters of its shard.
  o.master_weights = args.zero == 0;
  o.data_parallel_ranks = args.ranks;
  // This rank's GPU, current before anything creates a context (a rank would otherwise leave a
  // context on GPU 0, and measure its free memory there).
  const char* local = std::getenv("OMPI_COMM_WORLD_LOCAL_RANK");
  const int device = local ? std::atoi(local) : 0;
  BENCH_CUDA_CHECK(cudaSetDevice(device));
  // Memory is counted from after context creation, like torch.cuda.max_memory_allocated; ranktune
  // allocates everything up front, so what is in use after the steps is the peak.
  BENCH_CUDA_CHECK(cudaFree(nullptr));
  size_t free_start = 0, free_end = 0, total = 0;
  BENCH_CUDA_CHECK(cudaMemGetInfo(&free_start, &total));
  int rank = 0;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  o.data_parallel_rank = rank;
  std::unique_ptr<Backend> cuda = make_cuda_backend(device);
  std::unique_ptr<bench::ProfilingBackend> prof;
  if (args.profile) prof = std::make_unique<bench::ProfilingBackend>(*cuda, a.vocab_size, o.lora ? o.lora_r : 0);
  Backend& be = prof ? static_cast<Backend&>(*prof) : *cuda;
  LlamaModel model(be, o);
  model.init_base_random(1);
  if (o.lora) model.init_lora(2);
  TrainingSection tc;
  tc.optim = "adamw";
  tc.adam_beta1 = 0.9;
  tc.adam_beta2 = 0.999;
  tc.adam_epsilon = 1e-8;
  // Data parallel as in training: bucket all-reduces overlapped with backward (src/comm.cpp); under
  // ZeRO-1 bucket reduces to the shards' owners, and the optimizer's broadcasts of the updated
  // weights overlapped with its updates (src/optimizer.cpp).
  std::unique_ptr<Communicator> comm = make_communicator(be, 600);
  Optimizer opt(be, model.trainable(), tc, args.zero ? comm.get() : nullptr);
  // As the trainer: the copy engines carry ZeRO-1's or LoRA's gradients on one host, each layer as
  // soon as it is ready; NCCL's reductions go in groups of --bucket-cap-mb.
  const bool by_copies =
      args.ranks > 1 && args.copy_engines && (args.zero || o.lora) &&
      comm->reduce_by_peer_copies(model.trainable().grad, args.zero ? opt.shard_offsets() : std::vector<int64_t>{});
  GradReducer reducer(*comm, model.trainable(), static_cast<int>(a.n_layers), int64_t{args.bucket_cap_mb} << 20,
                      args.zero ? &opt.shard_offsets() : nullptr);
  reducer.exchange_embedding_rows(model);  // as the trainer: the tied embedding's lookup rows
  model.ledger().on_bucket_ready = [&](int bucket) { reducer.reduce_bucket(bucket); };
  model.before_forward_weights = [&](int layer) { opt.wait_for_weights(layer); };  // as the trainer
  int64_t step_no = 0;
  std::vector<int32_t> tokens(static_cast<size_t>(B * T)), targets(tokens.size()), positions(tokens.size());
  uint64_t state = 1234;
  for (size_t i = 0; i < tokens.size(); ++i) {
    state = state * 6364136223846793005ull + 1442695040888963407ull;
    tokens[i] = static_cast<int32_t>((state >> 33) % static_cast<uint64_t>(a.vocab_size));
    positions[i] = static_cast<int32_t>(static_cast<int64_t>(i) % T);
  }
  for (size_t i = 0; i < tokens.size(); ++i) targets[i] = (static_cast<int64_t>(i) % T == T - 1) ? -100 : tokens[i + 1];
  ModelInputs in{B, T, tokens.data(), targets.data(), positions.data(), nullptr};
  double loss = 0;
  auto step = [&] {
    model.ledger().begin_step(1);
    model.ledger().begin_micro(0);
    loss = model.forward_backward(in, 1.0f / static_cast<float>(B * (T - 1)), 0) / static_cast<double>(B * (T - 1));
    model.ledger().end_micro();
    model.ledger().end_step();
    reducer.finish(++step_no);  // every reduce finished before the optimizer reads its gradients
    opt.step(2e-4, 1.0f);
  };
  for (int i = 0; i < args.warmup; ++i) step();
  opt.finish_gather();
  be.synchronize();
  if (prof) prof->set_recording(true);
  const auto t0 = std::chrono::steady_clock::now();
  for (int i = 0; i < args.steps; ++i) {
    step();
    if (prof) prof->end_step();
  }
  opt.finish_gather();  // ZeRO-1: the last step's all-gather counts
  be.synchronize();
  const double dt = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  BENCH_CUDA_CHECK(cudaMemGetInfo(&free_end, &total));
  comm->barrier("the end of the benchmark");
  const double tokens_per_s = static_cast<double>(B * T * args.steps) * args.ranks / dt;
  const double step_ms = 1000 * dt / args.steps;
  const double fpt = flops_per_token(a, o.train_base, T);
  PlanSettings plan;  // adamw on the GPU path
  plan.load_in_4bit = args.mode == "qlora";
  plan.world_size = args.ranks;
  plan.zero_stage = args.zero;
  plan.reduce_by_copies = by_copies;
  nlohmann::json j = {{"peer", "ranktune"},
                      {"mode", args.mode},
                      {"gpus", args.ranks},
                      {"batch_per_gpu", B},
                      {"seq", T},
                      {"layers", args.layers},
                      {"grad_ckpt", args.gc},
                      {"params_total", a.n_params()},
                      {"params_trainable", model.trainable().numel},
                      {"tokens_per_s", static_cast<int64_t>(tokens_per_s)},
                      {"step_ms", step_ms},
                      {"peak_mem_gib", static_cast<double>(free_start - free_end) / (1 << 30)},
                      {"plan_mem_gib", static_cast<double>(plan_memory(o, plan).total) / (1 << 30)},
                      {"loss", loss},
                      {"zero", args.zero},
                      {"grad_reduce", args.ranks > 1 ? (by_copies ? "copy_engines" : "nccl") : ""},
                      {"bucket_cap_mb", args.bucket_cap_mb},
                      {"gpu", gpu_name()},
                      {"model_flops_per_token", fpt},
                      {"model_tflops_per_s", fpt * tokens_per_s / 1e12},
                      {"steps", args.steps},
                      {"warmup", args.warmup},
                      {"profiled", args.profile ? 1 : 0}};
  if (prof) {
    j["profile"] = profile_json(*prof, step_ms);
    print_profile(j["profile"]);
  }
  if (rank == 0) std::printf("%s\n", j.dump().c_str());
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  const Args args = parse_args(argc, argv);
  if (launched_ranks() != args.ranks)
    usage_error("launched as " + std::to_string(launched_ranks()) + " processes but --ranks is " +
                std::to_string(args.ranks));
  MPI_Init(&argc, &argv);
  int code = 1;
  try {
    code = args.mode == "gemm" ? run_gemm_probe(args) : run_training(args);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "ranktune_bench_step: %s\n", e.what());
  }
  MPI_Finalize();
  return code;
}
