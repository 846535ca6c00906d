// Whole training steps on the GPU path at the Llama-3.2-1B shape with random weights: forward,
// backward and optimizer, timed over several steps after warm-up. One JSON line per workload, in
// the same form as tools/hf_peer_baseline.py prints for the HF peer.
// Usage: ranktune_bench_step MODE [--gc 0|1] [--steps N] [--batch B] [--seq T] [--layers L]
//   MODE: lora | full
#include <cuda_runtime.h>

#include <chrono>
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "ranktune/backend.h"
#include "ranktune/model.h"
#include "ranktune/optimizer.h"

using namespace ranktune;

int main(int argc, char** argv) {
  std::string mode = argc > 1 ? argv[1] : "lora";
  int gc = 1, steps = 10, warmup = 3;
  int64_t B = 2, T = 2048, layers = 16;
  for (int i = 2; i + 1 < argc; i += 2) {
    const std::string k = argv[i];
    const long v = std::atol(argv[i + 1]);
    if (k == "--gc") gc = static_cast<int>(v);
    else if (k == "--steps") steps = static_cast<int>(v);
    else if (k == "--batch") B = v;
    else if (k == "--seq") T = v;
    else if (k == "--layers") layers = v;
  }
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
  ModelOptions o;
  o.arch = a;
  o.lora = mode == "lora";
  o.train_base = !o.lora;
  o.lora_r = 16;
  o.lora_scaling = 1.0f;
  o.lora_targets = lora_module_names();
  o.checkpointing = gc ? Checkpointing::on : Checkpointing::off;
  o.max_batch = B;
  o.max_seq = T;
  // Memory is counted from after context creation, like torch.cuda.max_memory_allocated; ranktune
  // allocates everything up front, so what is in use after the steps is the peak.
  cudaFree(nullptr);
  size_t free_start = 0, total = 0;
  cudaMemGetInfo(&free_start, &total);
  auto be = make_cuda_backend(0);
  LlamaModel model(*be, o);
  model.init_base_random(1);
  if (o.lora) model.init_lora(2);
  TrainingSection tc;
  tc.optim = "adamw";
  tc.adam_beta1 = 0.9;
  tc.adam_beta2 = 0.999;
  tc.adam_epsilon = 1e-8;
  Optimizer opt(*be, model.trainable(), tc);
  std::vector<int32_t> tokens(static_cast<size_t>(B * T)), targets(tokens.size()), positions(tokens.size());
  uint64_t state = 1234;
  for (size_t i = 0; i < tokens.size(); ++i) {
    state = state * 6364136223846793005ull + 1442695040888963407ull;
    tokens[i] = static_cast<int32_t>((state >> 33) % static_cast<uint64_t>(a.vocab_size));
    positions[i] = static_cast<int32_t>(static_cast<int64_t>(i) % T);
  }
  for (size_t i = 0; i < tokens.size(); ++i)
    targets[i] = (static_cast<int64_t>(i) % T == T - 1) ? -100 : tokens[i + 1];
  ModelInputs in{B, T, tokens.data(), targets.data(), positions.data(), nullptr};
  double loss = 0;
  auto step = [&] {
    model.ledger().begin_step(1);
    model.ledger().begin_micro(0);
    loss = model.forward_backward(in, 1.0f / static_cast<float>(B * (T - 1)), 0) / static_cast<double>(B * (T - 1));
    model.ledger().end_micro();
    model.ledger().end_step();
    opt.step(2e-4, 1.0f);
  };
  for (int i = 0; i < warmup; ++i) step();
  be->synchronize();
  const auto t0 = std::chrono::steady_clock::now();
  for (int i = 0; i < steps; ++i) step();
  be->synchronize();
  const double dt = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  size_t free_end = 0;
  cudaMemGetInfo(&free_end, &total);
  cudaDeviceProp prop{};
  cudaGetDeviceProperties(&prop, 0);
  const double tokens_per_s = static_cast<double>(B * T * steps) / dt;
  nlohmann::json j = {{"peer", "ranktune"},
                      {"mode", mode},
                      {"gpus", 1},
                      {"batch_per_gpu", B},
                      {"seq", T},
                      {"layers", layers},
                      {"grad_ckpt", gc},
                      {"params_total", a.n_params()},
                      {"params_trainable", model.trainable().numel},
                      {"tokens_per_s", static_cast<int64_t>(tokens_per_s)},
                      {"step_ms", 1000 * dt / steps},
                      {"peak_mem_gib", static_cast<double>(free_start - free_end) / (1 << 30)},
                      {"loss", loss},
                      {"gpu", prop.name}};
  std::printf("%s\n", j.dump().c_str());
  return 0;
}
