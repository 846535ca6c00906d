// Generation on the CPU path: KV-cache decoding against the full forward, greedy generate() against
// the full-recompute greedy loop it replaced, the sampler (top-p, seeds, frequencies), and the
// `ranktune generate` command.
#include <gtest/gtest.h>

#include <sys/wait.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <random>
#include <set>
#include <string>
#include <utility>

#include "ranktune/backend.h"
#include "ranktune/generate.h"
#include "ranktune/model.h"

using namespace ranktune;

namespace {

constexpr int64_t kVocab = 37, kMaxSeq = 12;

ModelOptions tiny_options(int64_t max_batch) {
  ModelOptions o;
  LlamaArch& a = o.arch;
  a.vocab_size = kVocab;
  a.hidden_size = 24;
  a.intermediate_size = 40;
  a.n_layers = 2;
  a.n_heads = 4;
  a.n_kv_heads = 2;  // grouped-query attention
  a.head_dim = 6;
  a.rms_norm_eps = 1e-5;
  a.rope_theta = 10000;
  a.max_position_embeddings = 64;
  o.lora = true;
  o.lora_r = 3;
  o.lora_scaling = 2.0f;
  o.lora_targets = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"};
  o.checkpointing = Checkpointing::on;
  o.max_batch = max_batch;
  o.max_seq = kMaxSeq;
  o.loss_chunk_rows = 5;
  return o;
}

// A random base model with LoRA adapters that change the output (B != 0). Weights are 10x HF's init
// so that the logits are far from uniform and greedy choices are not near-ties.
void randomize(LlamaModel& m, uint64_t seed) {
  m.init_base_random(seed);
  std::mt19937 rng(static_cast<uint32_t>(seed));
  std::normal_distribution<float> normal(0.f, 0.2f);
  for (const auto& p : m.base().specs) {
    if (p.is_norm) continue;
    std::vector<float> w(static_cast<size_t>(p.numel));
    for (auto& x : w) x = normal(rng);
    m.set_tensor(p.name, w);
  }
  m.init_lora(seed + 1);
  for (const auto& p : m.lora().specs) {
    if (p.name.find("lora_B") == std::string::npos) continue;
    std::vector<float> w(static_cast<size_t>(p.numel));
    for (auto& x : w) x = normal(rng);
    m.set_tensor(p.name, w);
  }
}

// Logits of every position of every row: the normal forward over [rows.size(), max_seq] tokens,
// padded with 0 after each row.
std::vector<float> full_forward_logits(LlamaModel& m, const std::vector<std::vector<int32_t>>& rows) {
  const int64_t B = static_cast<int64_t>(rows.size()), T = m.options().max_seq;
  std::vector<int32_t> tokens(static_cast<size_t>(B * T), 0), targets(tokens.size(), -100), positions(tokens.size());
  for (int64_t i = 0; i < B * T; ++i) positions[static_cast<size_t>(i)] = static_cast<int32_t>(i % T);
  for (int64_t b = 0; b < B; ++b) std::copy(rows[b].begin(), rows[b].end(), tokens.begin() + b * T);
  std::vector<float> logits;
  m.forward_loss(ModelInputs{B, T, tokens.data(), targets.data(), positions.data(), nullptr}, &logits);
  return logits;
}

// The greedy loop generate() replaced: one full forward per new token.
std::vector<std::vector<int32_t>> full_recompute_greedy(LlamaModel& m, std::vector<std::vector<int32_t>> prompts,
                                                        int64_t max_new, const std::vector<int32_t>& stop) {
  const int64_t T = m.options().max_seq;
  std::vector<std::vector<int32_t>> out(prompts.size());
  for (size_t i = 0; i < prompts.size(); ++i) {
    auto& p = prompts[i];
    for (int64_t k = 0; k < max_new && static_cast<int64_t>(p.size()) < T; ++k) {
      const std::vector<float> logits = full_forward_logits(m, {p});
      const float* row = logits.data() + (static_cast<int64_t>(p.size()) - 1) * kVocab;
      const int32_t next = static_cast<int32_t>(std::max_element(row, row + kVocab) - row);
      if (std::find(stop.begin(), stop.end(), next) != stop.end()) break;
      p.push_back(next);
      out[i].push_back(next);
    }
  }
  return out;
}

std::vector<std::vector<int32_t>> random_prompts(uint32_t seed, const std::vector<size_t>& lengths) {
  std::mt19937 rng(seed);
  std::vector<std::vector<int32_t>> prompts;
  for (size_t n : lengths) {
    prompts.emplace_back();
    for (size_t t = 0; t < n; ++t) prompts.back().push_back(static_cast<int32_t>(rng() % kVocab));
  }
  return prompts;
}

// max |a - b| over a row, relative to the row's largest |b|.
double row_rel_err(const float* a, const float* b, int64_t n) {
  double err = 0, scale = 0;
  for (int64_t i = 0; i < n; ++i) {
    err = std::max(err, std::fabs(static_cast<double>(a[i]) - b[i]));
    scale = std::max(scale, std::fabs(static_cast<double>(b[i])));
  }
  return err / scale;
}

}  // namespace

TEST(Generate, CpuAttentionDecodeMatchesTheLastRowOfAttentionForward) {
  auto be = make_cpu_backend();
  const int64_t B = 2, T = 7, H = 4, Hkv = 2, D = 6, q_cols = H * D, kv_cols = Hkv * D;
  std::mt19937 rng(3);
  std::normal_distribution<float> normal(0.f, 1.f);
  std::vector<float> q(static_cast<size_t>(B * T * q_cols)), k(static_cast<size_t>(B * T * kv_cols)), v(k.size());
  for (auto* x : {&q, &k, &v})
    for (auto& e : *x) e = normal(rng);
  std::vector<float> out(q.size()), lse(static_cast<size_t>(B * H * T));
  const AttnShape full{B, T, H, Hkv, D, 1.0f / std::sqrt(static_cast<float>(D))};
  be->attention_forward(Tensor(out.data(), DType::f32, Device::cpu, {B * T, q_cols}),
                        Tensor(lse.data(), DType::f32, Device::cpu, {B * H * T}),
                        Tensor(q.data(), DType::f32, Device::cpu, {B * T, q_cols}),
                        Tensor(k.data(), DType::f32, Device::cpu, {B * T, kv_cols}),
                        Tensor(v.data(), DType::f32, Device::cpu, {B * T, kv_cols}), Tensor(), full);
  // The cache is k/v itself ([B, T, kv_cols]); query t of each sequence sees keys 0..t.
  for (int64_t t = 0; t < T; ++t) {
    Tensor q_t(q.data() + t * q_cols, DType::f32, Device::cpu, {B, q_cols});
    q_t.row_stride = T * q_cols;
    std::vector<float> out_t(static_cast<size_t>(B * q_cols));
    be->attention_decode(Tensor(out_t.data(), DType::f32, Device::cpu, {B, q_cols}), q_t,
                         Tensor(k.data(), DType::f32, Device::cpu, {B, T, kv_cols}),
                         Tensor(v.data(), DType::f32, Device::cpu, {B, T, kv_cols}), t + 1, full);
    for (int64_t b = 0; b < B; ++b)
      for (int64_t c = 0; c < q_cols; ++c)
        EXPECT_NEAR(out_t[static_cast<size_t>(b * q_cols + c)], out[static_cast<size_t>((b * T + t) * q_cols + c)], 1e-6)
            << "b=" << b << " t=" << t << " c=" << c;
  }
}

TEST(Generate, KvCacheDecodeLogitsMatchTheFullForward) {
  auto be = make_cpu_backend();
  LlamaModel m(*be, tiny_options(2));
  randomize(m, 7);
  const std::vector<std::vector<int32_t>> rows = random_prompts(11, {kMaxSeq, kMaxSeq});
  const std::vector<float> full = full_forward_logits(m, rows);
  for (int64_t n_prefill : {0, 1, 4}) {
    // Prefill n_prefill tokens, then decode the rest of the rows one position at a time.
    std::vector<int32_t> prefix;
    for (const auto& r : rows) prefix.insert(prefix.end(), r.begin(), r.begin() + n_prefill);
    m.prefill(2, kMaxSeq, n_prefill, prefix.data());
    for (int64_t pos = n_prefill; pos < kMaxSeq; ++pos) {
      ASSERT_EQ(m.kv_len(), pos);
      const std::vector<float> logits = m.decode_step({rows[0][pos], rows[1][pos]});
      for (int64_t b = 0; b < 2; ++b)
        EXPECT_LT(row_rel_err(logits.data() + b * kVocab, full.data() + (b * kMaxSeq + pos) * kVocab, kVocab), 1e-5)
            << "prefill " << n_prefill << ", row " << b << ", position " << pos;
    }
  }
}

TEST(Generate, GreedyEqualsTheFullRecomputeGreedyLoop) {
  auto be = make_cpu_backend();
  LlamaModel m(*be, tiny_options(2));
  randomize(m, 5);
  // Five prompts in batches of two, of different lengths; one fills the context already, one
  // reaches max_seq before max_new tokens.
  const auto prompts = random_prompts(2, {3, 5, 1, kMaxSeq, 9});
  SamplingOptions greedy;
  greedy.max_new_tokens = 6;
  const auto expected = full_recompute_greedy(m, prompts, 6, {});
  EXPECT_EQ(generate(m, prompts, greedy), expected);
  EXPECT_TRUE(expected[3].empty());
  EXPECT_EQ(expected[4].size(), 3u);
  // A stop id taken from the middle of one output ends that sequence (and maybe others) early.
  greedy.stop_ids = {expected[0][2]};
  const auto stopped = full_recompute_greedy(m, prompts, 6, greedy.stop_ids);
  EXPECT_EQ(generate(m, prompts, greedy), stopped);
  EXPECT_LE(stopped[0].size(), 2u);
}

TEST(Generate, GeneratingLeavesTheTrainingForwardUnchanged) {
  auto be = make_cpu_backend();
  LlamaModel m(*be, tiny_options(2));
  randomize(m, 9);
  const auto rows = random_prompts(4, {kMaxSeq, kMaxSeq});
  const std::vector<float> before = full_forward_logits(m, rows);
  SamplingOptions sampling;
  sampling.temperature = 1.0;
  generate(m, random_prompts(5, {2, 4, 3}), sampling);
  EXPECT_EQ(full_forward_logits(m, rows), before);
}

TEST(Generate, TinyTopPIsGreedy) {
  auto be = make_cpu_backend();
  LlamaModel m(*be, tiny_options(2));
  randomize(m, 3);
  const auto prompts = random_prompts(8, {2, 6, 4});
  SamplingOptions greedy;
  greedy.max_new_tokens = 5;
  SamplingOptions nucleus = greedy;
  nucleus.temperature = 0.8;
  nucleus.top_p = 1e-9;
  nucleus.seed = 12345;
  EXPECT_EQ(generate(m, prompts, nucleus), generate(m, prompts, greedy));
}

TEST(Generate, SameSeedSameSamplesOtherSeedOthers) {
  auto be = make_cpu_backend();
  LlamaModel m(*be, tiny_options(2));
  randomize(m, 4);
  const auto prompts = random_prompts(6, {2, 3, 5});
  SamplingOptions opt;
  opt.max_new_tokens = 7;
  opt.temperature = 2.0;  // flat enough that two seeds all but surely differ
  opt.top_p = 0.95;
  opt.seed = 1;
  const auto first = generate(m, prompts, opt);
  EXPECT_EQ(generate(m, prompts, opt), first);
  // A prompt's stream depends on (seed, its index) only, not on the rest of its batch.
  EXPECT_EQ(generate(m, {prompts[0]}, opt)[0], first[0]);
  opt.seed = 2;
  EXPECT_NE(generate(m, prompts, opt), first);
}

TEST(Generate, SamplingFrequenciesFollowTheTemperedSoftmax) {
  const std::vector<float> logits = {std::log(0.1f), std::log(0.2f), std::log(0.3f), std::log(0.4f)};
  const int draws = 200000;
  auto frequencies = [&](double temperature, double top_p) {
    uint64_t rng = 42;
    std::vector<double> f(logits.size(), 0.0);
    for (int i = 0; i < draws; ++i) f[static_cast<size_t>(sample_token(logits.data(), 4, temperature, top_p, rng))] += 1.0 / draws;
    return f;
  };
  auto expect_close = [](const std::vector<double>& got, const std::vector<double>& want, const char* what) {
    for (size_t i = 0; i < want.size(); ++i) EXPECT_NEAR(got[i], want[i], 0.006) << what << ", token " << i;
  };
  expect_close(frequencies(1.0, 1.0), {0.1, 0.2, 0.3, 0.4}, "T=1");
  // T=2: probabilities proportional to p^(1/2).
  std::vector<double> sqrt_p = {std::sqrt(0.1), std::sqrt(0.2), std::sqrt(0.3), std::sqrt(0.4)};
  double sum = 0;
  for (double x : sqrt_p) sum += x;
  for (double& x : sqrt_p) x /= sum;
  expect_close(frequencies(2.0, 1.0), sqrt_p, "T=2");
  // top_p 0.5: the nucleus is {0.4, 0.3} (0.4 alone is short of 0.5), renormalised.
  expect_close(frequencies(1.0, 0.5), {0, 0, 3.0 / 7, 4.0 / 7}, "top_p=0.5");
  expect_close(frequencies(1.0, 0.35), {0, 0, 0, 1}, "top_p=0.35");
}

TEST(Generate, GreedyAndNucleusBreakTiesByTheLowestId) {
  const std::vector<float> logits = {1.f, 3.f, 3.f, 0.f};
  uint64_t rng = 1;
  EXPECT_EQ(sample_token(logits.data(), 4, 0.0, 1.0, rng), 1);
  EXPECT_EQ(sample_token(logits.data(), 4, 0.7, 1e-9, rng), 1);
}

TEST(Generate, NucleusOfALargeFlatVocabularyIsExact) {
  // 1000 distinct probabilities with a nucleus of several hundred tokens: more than the first
  // sorted head of 64, so the head must grow. Every draw must fall inside the brute-force nucleus.
  const int64_t V = 1000;
  std::vector<float> logits(static_cast<size_t>(V));
  for (int64_t i = 0; i < V; ++i) logits[static_cast<size_t>(i)] = 0.003f * static_cast<float>((i * 379) % V);
  const double top_p = 0.8;
  std::vector<int32_t> order(static_cast<size_t>(V));
  for (int64_t i = 0; i < V; ++i) order[static_cast<size_t>(i)] = static_cast<int32_t>(i);
  std::vector<double> w(static_cast<size_t>(V));
  const float max_logit = *std::max_element(logits.begin(), logits.end());
  double total = 0;
  for (int64_t i = 0; i < V; ++i) total += w[static_cast<size_t>(i)] = std::exp(static_cast<double>(logits[static_cast<size_t>(i)]) - max_logit);
  std::sort(order.begin(), order.end(), [&](int32_t a, int32_t b) { return w[static_cast<size_t>(a)] > w[static_cast<size_t>(b)] || (w[static_cast<size_t>(a)] == w[static_cast<size_t>(b)] && a < b); });
  std::set<int32_t> nucleus;
  double mass = 0;
  for (int32_t id : order) {
    if (mass >= top_p * total) break;
    nucleus.insert(id);
    mass += w[static_cast<size_t>(id)];
  }
  ASSERT_GT(nucleus.size(), 64u);
  uint64_t rng = 9;
  std::set<int32_t> seen;
  for (int i = 0; i < 20000; ++i) {
    const int32_t id = sample_token(logits.data(), V, 1.0, top_p, rng);
    ASSERT_TRUE(nucleus.count(id)) << "token " << id << " is outside the nucleus";
    seen.insert(id);
  }
  EXPECT_GT(seen.size(), nucleus.size() * 9 / 10);
}

TEST(Generate, RejectsBadOptionsAndEmptyPrompts) {
  auto be = make_cpu_backend();
  LlamaModel m(*be, tiny_options(1));
  randomize(m, 1);
  SamplingOptions opt;
  opt.temperature = -1;
  EXPECT_THROW(generate(m, {{1, 2}}, opt), UserError);
  opt.temperature = 1;
  opt.top_p = 0;
  EXPECT_THROW(generate(m, {{1, 2}}, opt), UserError);
  opt.top_p = 1;
  EXPECT_THROW(generate(m, {{}}, opt), UserError);
  EXPECT_THROW(generate(m, {{1, static_cast<int32_t>(kVocab)}}, opt), UserError);
}

namespace {

// `ranktune ARGS` from the source directory: exit code and output.
std::pair<int, std::string> run_cli(const std::string& args) {
  const std::string cmd = std::string("cd ") + RANKTUNE_SOURCE_DIR + " && OMP_NUM_THREADS=2 " + RANKTUNE_BINARY + " " +
                          args + " 2>&1";
  FILE* pipe = popen(cmd.c_str(), "r");
  std::string output;
  char buf[4096];
  size_t n;
  while ((n = fread(buf, 1, sizeof buf, pipe)) > 0) output.append(buf, n);
  const int status = pclose(pipe);
  return {WIFEXITED(status) ? WEXITSTATUS(status) : -1, output};
}

}  // namespace

// The quickstart's model, untrained (random weights from training.seed): sampled text depends on
// --seed only, and bad options are user errors (exit code 2).
TEST(GenerateCli, SameSeedSameTextAndCheckedOptions) {
  const std::string base = "generate jobs/configs/quickstart.yaml --prompt 12+34= --max-new-tokens 4 --temperature 1.5 ";
  const auto first = run_cli(base + "--seed 7");
  ASSERT_EQ(first.first, 0) << first.second;
  EXPECT_EQ(first.second.rfind("12+34=", 0), 0u) << first.second;
  EXPECT_EQ(run_cli(base + "--seed 7"), first);
  const auto greedy = run_cli("generate jobs/configs/quickstart.yaml --prompt 12+34= --max-new-tokens 4 --temperature 0");
  ASSERT_EQ(greedy.first, 0) << greedy.second;
  for (const char* bad : {"--temperature -1", "--temperature x", "--top-p 0", "--top-p 1.5", "--seed -3", "--seed 1e3"}) {
    const auto r = run_cli("generate jobs/configs/quickstart.yaml --prompt 1+1= " + std::string(bad));
    EXPECT_EQ(r.first, 2) << bad << ": " << r.second;
  }
  const auto help = run_cli("generate --help");
  EXPECT_NE(help.second.find("--top-p"), std::string::npos) << help.second;
}
