// Generation on the GPU path: the decode attention kernel (kernels/decode.cu) against the CPU
// backend, and KV-cache decode logits against the GPU's own full forward, within bf16 tolerances.
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include "gpu_skip.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "ranktune/backend.h"
#include "ranktune/generate.h"
#include "ranktune/model.h"

using namespace ranktune;

namespace {

double rel_l2(const std::vector<float>& a, const std::vector<float>& b) {
  double num = 0, den = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    num += (static_cast<double>(a[i]) - b[i]) * (static_cast<double>(a[i]) - b[i]);
    den += static_cast<double>(b[i]) * b[i];
  }
  return std::sqrt(num / den);
}

// Random values rounded to bf16: the CPU reference gets exactly what the GPU sees.
std::vector<float> random_bf16_values(size_t n, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal(0.f, 1.f);
  std::vector<float> x(n);
  for (auto& e : x) e = bf16_to_f32(f32_to_bf16(normal(rng)));
  return x;
}

// A GPU copy of host fp32 values as bf16, kept alive with its buffer.
struct DeviceTensor {
  Buffer buffer;
  Tensor t;
  DeviceTensor(Backend& gpu, const std::vector<float>& host, std::initializer_list<int64_t> dims) {
    buffer = gpu.alloc(host.size() * 2);
    t = buffer.as(DType::bf16, dims);
    std::vector<uint16_t> bits(host.size());
    for (size_t i = 0; i < host.size(); ++i) bits[i] = f32_to_bf16(host[i]);
    gpu.upload(t, bits.data());
  }
  std::vector<float> download(Backend& gpu) const {
    std::vector<uint16_t> bits(static_cast<size_t>(t.numel()));
    gpu.download(bits.data(), t);
    std::vector<float> out(bits.size());
    for (size_t i = 0; i < bits.size(); ++i) out[i] = bf16_to_f32(bits[i]);
    return out;
  }
};

}  // namespace

TEST(GpuGenerate, AttentionDecodeMatchesCpu) {
  SKIP_WITHOUT_GPU();
  auto cpu = make_cpu_backend();
  auto gpu = make_cuda_backend(0);
  struct Case {
    int64_t B, max_len, n_keys, H, Hkv, D;
  };
  // Head dims of every team size, the 16-byte path (D % 8 == 0) and the scalar one, key counts below
  // and above one pass of the block's teams, a full cache and a single key.
  const Case cases[] = {{3, 37, 37, 4, 2, 6},  {2, 300, 257, 8, 2, 64}, {1, 64, 1, 4, 4, 128},
                        {2, 50, 33, 2, 1, 256}, {2, 40, 40, 4, 2, 96},   {1, 10, 5, 2, 1, 20},
                        {4, 700, 611, 32, 8, 64}};
  for (const Case& c : cases) {
    const std::string name = "B=" + std::to_string(c.B) + " max_len=" + std::to_string(c.max_len) +
                             " n_keys=" + std::to_string(c.n_keys) + " H=" + std::to_string(c.H) +
                             " Hkv=" + std::to_string(c.Hkv) + " D=" + std::to_string(c.D);
    const int64_t q_cols = c.H * c.D, kv_cols = c.Hkv * c.D, ld_q = q_cols + 2 * kv_cols;  // q inside a fused qkv row
    std::vector<float> qkv = random_bf16_values(static_cast<size_t>(c.B * ld_q), 1);
    std::vector<float> k = random_bf16_values(static_cast<size_t>(c.B * c.max_len * kv_cols), 2);
    std::vector<float> v = random_bf16_values(k.size(), 3);
    const AttnShape shape{c.B, c.max_len, c.H, c.Hkv, c.D, 1.0f / std::sqrt(static_cast<float>(c.D))};

    std::vector<float> expected(static_cast<size_t>(c.B * q_cols));
    cpu->attention_decode(Tensor(expected.data(), DType::f32, Device::cpu, {c.B, q_cols}),
                          Tensor(qkv.data(), DType::f32, Device::cpu, {c.B, ld_q}).col_slice(0, q_cols),
                          Tensor(k.data(), DType::f32, Device::cpu, {c.B, c.max_len, kv_cols}),
                          Tensor(v.data(), DType::f32, Device::cpu, {c.B, c.max_len, kv_cols}), c.n_keys, shape);

    DeviceTensor qkv_d(*gpu, qkv, {c.B, ld_q}), k_d(*gpu, k, {c.B, c.max_len, kv_cols}),
        v_d(*gpu, v, {c.B, c.max_len, kv_cols});
    DeviceTensor out_d(*gpu, std::vector<float>(expected.size(), NAN), {c.B, q_cols});
    gpu->attention_decode(out_d.t, qkv_d.t.col_slice(0, q_cols), k_d.t, v_d.t, c.n_keys, shape);
    const std::vector<float> got = out_d.download(*gpu);
    double max_err = 0;
    for (size_t i = 0; i < got.size(); ++i) {
      ASSERT_TRUE(std::isfinite(got[i])) << name << ": element " << i << " not written";
      max_err = std::max(max_err, std::fabs(static_cast<double>(got[i]) - expected[i]));
    }
    EXPECT_LT(rel_l2(got, expected), 1e-2) << name;
    EXPECT_LT(max_err, 2e-2) << name;
    // Deterministic: a second run is bitwise the same.
    gpu->attention_decode(out_d.t, qkv_d.t.col_slice(0, q_cols), k_d.t, v_d.t, c.n_keys, shape);
    const std::vector<float> again = out_d.download(*gpu);
    EXPECT_EQ(0, std::memcmp(again.data(), got.data(), got.size() * sizeof(float))) << name;
  }
}

namespace {

ModelOptions gpu_tiny_options() {
  ModelOptions o;
  LlamaArch& a = o.arch;
  a.vocab_size = 101;
  a.hidden_size = 256;
  a.intermediate_size = 512;
  a.n_layers = 2;
  a.n_heads = 4;
  a.n_kv_heads = 2;
  a.head_dim = 64;
  a.rms_norm_eps = 1e-5;
  a.rope_theta = 10000;
  a.max_position_embeddings = 64;
  o.lora = true;
  o.lora_r = 8;
  o.lora_scaling = 2.0f;
  o.lora_targets = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"};
  o.max_batch = 2;
  o.max_seq = 24;
  return o;
}

void randomize(LlamaModel& m, uint64_t seed) {
  m.init_base_random(seed);
  m.init_lora(seed + 1);
  std::mt19937 rng(static_cast<uint32_t>(seed));
  std::normal_distribution<float> normal(0.f, 0.05f);
  for (const auto& p : m.lora().specs) {
    if (p.name.find("lora_B") == std::string::npos) continue;
    std::vector<float> w(static_cast<size_t>(p.numel));
    for (auto& x : w) x = normal(rng);
    m.set_tensor(p.name, w);
  }
}

}  // namespace

TEST(GpuGenerate, KvCacheDecodeLogitsMatchTheFullForward) {
  SKIP_WITHOUT_GPU();
  auto gpu = make_cuda_backend(0);
  const ModelOptions o = gpu_tiny_options();
  LlamaModel m(*gpu, o);
  randomize(m, 3);
  const int64_t B = o.max_batch, T = o.max_seq, V = o.arch.vocab_size;
  std::mt19937 rng(5);
  std::vector<int32_t> tokens, targets, positions;
  for (int64_t i = 0; i < B * T; ++i) {
    tokens.push_back(static_cast<int32_t>(rng() % V));
    targets.push_back(-100);
    positions.push_back(static_cast<int32_t>(i % T));
  }
  std::vector<float> full;
  m.forward_loss(ModelInputs{B, T, tokens.data(), targets.data(), positions.data(), nullptr}, &full);

  const int64_t n_prefill = 5;
  std::vector<int32_t> prefix;
  for (int64_t b = 0; b < B; ++b) prefix.insert(prefix.end(), tokens.begin() + b * T, tokens.begin() + b * T + n_prefill);
  m.prefill(B, T, n_prefill, prefix.data());
  double worst = 0;
  for (int64_t pos = n_prefill; pos < T; ++pos) {
    const std::vector<float> logits = m.decode_step({tokens[static_cast<size_t>(pos)], tokens[static_cast<size_t>(T + pos)]});
    for (int64_t b = 0; b < B; ++b) {
      const std::vector<float> got(logits.begin() + b * V, logits.begin() + (b + 1) * V);
      const std::vector<float> want(full.begin() + (b * T + pos) * V, full.begin() + (b * T + pos + 1) * V);
      const double err = rel_l2(got, want);
      EXPECT_LT(err, 2e-2) << "row " << b << ", position " << pos;
      worst = std::max(worst, err);
    }
  }
  std::printf("KV-cache decode vs full forward (bf16): worst logits rel L2 %.2e\n", worst);
}

TEST(GpuGenerate, SamplingIsDeterministicPerSeed) {
  SKIP_WITHOUT_GPU();
  auto gpu = make_cuda_backend(0);
  LlamaModel m(*gpu, gpu_tiny_options());
  randomize(m, 8);
  const std::vector<std::vector<int32_t>> prompts = {{1, 2, 3}, {4, 5, 6, 7, 8, 9}, {10}};
  SamplingOptions opt;
  opt.max_new_tokens = 10;
  opt.temperature = 0.7;
  opt.top_p = 0.9;
  opt.seed = 17;
  const auto first = generate(m, prompts, opt);
  EXPECT_EQ(generate(m, prompts, opt), first);
  for (const auto& g : first) EXPECT_EQ(g.size(), 10u);
}
