// The model on the CPU path: gradients against finite differences, checkpointing bitwise equal to
// no checkpointing, gradient accumulation, and the gradient ledger's exactly-once invariants.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <random>

#include "ranktune/backend.h"
#include "ranktune/error.h"
#include "ranktune/model.h"

using namespace ranktune;

namespace {

LlamaArch tiny_arch(bool tied) {
  LlamaArch a;
  a.vocab_size = 37;
  a.hidden_size = 24;
  a.intermediate_size = 40;
  a.n_layers = 2;
  a.n_heads = 4;
  a.n_kv_heads = 2;
  a.head_dim = 6;
  a.rms_norm_eps = 1e-5;
  a.rope_theta = 10000;
  a.max_position_embeddings = 64;
  a.tie_word_embeddings = tied;
  return a;
}

ModelOptions options(bool lora, Checkpointing ckpt, bool tied = false) {
  ModelOptions o;
  o.arch = tiny_arch(tied);
  o.lora = lora;
  o.train_base = !lora;
  o.lora_r = 3;
  o.lora_scaling = 2.0f;
  o.lora_targets = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"};
  o.checkpointing = ckpt;
  o.max_batch = 2;
  o.max_seq = 9;
  o.loss_chunk_rows = 7;  // several chunks, one partial
  return o;
}

struct Data {
  std::vector<int32_t> tokens, targets, positions;
  ModelInputs in(int64_t b = 2) const {
    return ModelInputs{b, 9, tokens.data(), targets.data(), positions.data(), nullptr};
  }
  int64_t counted() const {
    int64_t n = 0;
    for (int32_t t : targets) n += t != -100;
    return n;
  }
};

Data make_data(uint32_t seed) {
  std::mt19937 rng(seed);
  Data d;
  for (int b = 0; b < 2; ++b)
    for (int t = 0; t < 9; ++t) {
      d.tokens.push_back(static_cast<int32_t>(rng() % 37));
      d.positions.push_back(t);
    }
  for (int b = 0; b < 2; ++b)
    for (int t = 0; t < 9; ++t) {
      const bool last = t == 8, masked = b == 0 && t < 3;
      d.targets.push_back(last || masked ? -100 : d.tokens[static_cast<size_t>(b * 9 + t + 1)]);
    }
  return d;
}

void randomize(LlamaModel& m, uint64_t seed) {
  m.init_base_random(seed);
  if (m.has_lora()) {
    m.init_lora(seed + 1);
    std::mt19937 rng(static_cast<uint32_t>(seed));
    std::normal_distribution<float> n(0.f, 0.2f);
    for (const auto& p : m.lora().specs) {  // B != 0, so that A gets a gradient
      if (p.name.find("lora_B") == std::string::npos) continue;
      std::vector<float> w(static_cast<size_t>(p.numel));
      for (auto& x : w) x = n(rng);
      m.set_tensor(p.name, w);
    }
  }
}

double step(LlamaModel& m, const Data& d) {
  m.ledger().begin_step(1);
  m.ledger().begin_micro(0);
  const double loss = m.forward_backward(d.in(), 1.0f / static_cast<float>(d.counted()), 7);
  m.ledger().end_micro();
  m.ledger().end_step();
  return loss / static_cast<double>(d.counted());
}

double loss_only(LlamaModel& m, const Data& d) { return m.forward_loss(d.in()) / static_cast<double>(d.counted()); }

// With LoRA dropout the loss is the training forward's, whose masks depend only on the step's seed,
// so it is a deterministic function of the weights too.
void finite_difference_check(bool lora, bool tied, const std::vector<std::string>& names, float lora_dropout = 0.f) {
  auto backend = make_cpu_backend();
  ModelOptions o = options(lora, Checkpointing::off, tied);
  o.lora_dropout = lora_dropout;
  LlamaModel m(*backend, o);
  randomize(m, 11);
  Data d = make_data(3);
  step(m, d);
  const auto loss_at = [&] { return lora_dropout > 0 ? step(m, d) : loss_only(m, d); };
  for (const auto& name : names) {
    std::vector<float> w = m.get_tensor(name), g = m.get_grad(name);
    std::mt19937 rng(5);
    for (int trial = 0; trial < 4; ++trial) {
      const size_t i = rng() % w.size();
      const float h = 1e-2f * std::max(1.0f, std::fabs(w[i]));
      std::vector<float> wp = w, wm = w;
      wp[i] += h;
      wm[i] -= h;
      m.set_tensor(name, wp);
      const double lp = loss_at();
      m.set_tensor(name, wm);
      const double lm = loss_at();
      m.set_tensor(name, w);
      const double fd = (lp - lm) / (2.0 * h);
      EXPECT_NEAR(g[i], fd, 2e-3 + 2e-2 * std::fabs(fd)) << name << "[" << i << "]";
    }
  }
}

}  // namespace

TEST(Model, LoraGradientsMatchFiniteDifferences) {
  finite_difference_check(
      true, false,
      {"model.layers.0.self_attn.q_proj.lora_A.weight", "model.layers.0.self_attn.k_proj.lora_B.weight",
       "model.layers.1.self_attn.v_proj.lora_A.weight", "model.layers.1.self_attn.o_proj.lora_B.weight",
       "model.layers.0.mlp.gate_proj.lora_A.weight", "model.layers.1.mlp.up_proj.lora_B.weight",
       "model.layers.0.mlp.down_proj.lora_A.weight"});
}

// With dropout every module keeps its own mask and GEMMs (without, the q/k/v and gate/up adapters
// share them): the same check on that path.
TEST(Model, LoraGradientsWithDropoutMatchFiniteDifferences) {
  finite_difference_check(
      true, false,
      {"model.layers.0.self_attn.q_proj.lora_A.weight", "model.layers.1.self_attn.k_proj.lora_A.weight",
       "model.layers.0.self_attn.v_proj.lora_B.weight", "model.layers.1.mlp.up_proj.lora_A.weight",
       "model.layers.0.mlp.down_proj.lora_A.weight"},
      0.3f);
}

TEST(Model, FullGradientsMatchFiniteDifferences) {
  finite_difference_check(
      false, true,
      {"model.embed_tokens.weight", "model.layers.0.input_layernorm.weight", "model.layers.0.self_attn.k_proj.weight",
       "model.layers.1.self_attn.o_proj.weight", "model.layers.1.post_attention_layernorm.weight",
       "model.layers.0.mlp.down_proj.weight", "model.norm.weight"});
  finite_difference_check(false, false, {"lm_head.weight", "model.embed_tokens.weight"});
}

// Recompute (on), offloaded recompute (layer inputs in host memory, two device slots) and recompute
// of the norms and MLP only (keep_attention) give bitwise the gradients of keeping everything (off),
// over two steps of three layers.
// With LoRA the recompute takes the adapters' xa kept from the forward (dropout masks included).
TEST(Model, CheckpointingIsBitwiseIdentical) {
  struct Case {
    bool lora;
    float dropout;
  };
  for (const Case c : {Case{true, 0.f}, Case{true, 0.1f}, Case{false, 0.f}})
    for (Checkpointing mode : {Checkpointing::on, Checkpointing::offload, Checkpointing::keep_attention}) {
      const bool lora = c.lora;
      auto backend = make_cpu_backend();
      ModelOptions o_off = options(lora, Checkpointing::off), o_ckpt = options(lora, mode);
      o_off.arch.n_layers = o_ckpt.arch.n_layers = 3;
      o_off.lora_dropout = o_ckpt.lora_dropout = c.dropout;
      LlamaModel off(*backend, o_off);
      LlamaModel ckpt(*backend, o_ckpt);
      randomize(off, 4);
      randomize(ckpt, 4);
      for (uint32_t seed : {9u, 10u}) {
        Data d = make_data(seed);
        const double l_off = step(off, d), l_ckpt = step(ckpt, d);
        EXPECT_EQ(l_off, l_ckpt);
        // The last layer's activations are still in the set from the forward: only the other two
        // are recomputed.
        EXPECT_EQ(off.layers_recomputed(), 0);
        EXPECT_EQ(ckpt.layers_recomputed(), 2);
        for (const auto& p : off.trainable().specs) {
          std::vector<float> a = off.get_grad(p.name), b = ckpt.get_grad(p.name);
          ASSERT_EQ(0, std::memcmp(a.data(), b.data(), a.size() * 4))
              << p.name << (lora ? " (lora, dropout " + std::to_string(c.dropout) + ", " : " (full, ")
              << checkpointing_name(mode) << ")";
        }
      }
    }
}

// Data-parallel full fine-tuning of a tied embedding exchanges the lookup part of the embedding's
// gradient as rows (LlamaModel::EmbeddingRows). One rank of two, with a batch smaller than planned
// (so its slot is zero-padded) and an all-padding slot standing in for the other rank: adding the
// exchanged rows gives the gradient of the same rank without the exchange, bitwise, and every other
// gradient is unchanged.
TEST(Model, ExchangedEmbeddingRowsAddUpToTheLookupGradient) {
  auto backend = make_cpu_backend();
  ModelOptions plain = options(false, Checkpointing::on, /*tied=*/true), exchanged = plain;
  exchanged.data_parallel_ranks = 2;
  exchanged.data_parallel_rank = 0;
  LlamaModel a(*backend, plain), b(*backend, exchanged);
  ASSERT_EQ(a.embedding_rows().bucket, -1);
  ASSERT_GE(b.embedding_rows().bucket, 0);
  randomize(a, 6);
  randomize(b, 6);
  Data d = make_data(8);
  const auto train_step = [&](LlamaModel& m, int64_t sequences) {
    m.ledger().begin_step(1);
    m.ledger().begin_micro(0);
    m.forward_backward(d.in(sequences), 0.1f, 7);
    m.ledger().end_micro();
    m.ledger().end_step();
  };
  train_step(b, 2);  // fills the whole slot, so stale rows would show below
  train_step(a, 1);
  train_step(b, 1);
  const LlamaModel::EmbeddingRows& rows = b.embedding_rows();
  const int64_t planned = rows.rows_per_rank;
  ASSERT_EQ(planned, 2 * 9);
  // This rank's slot: its 9 rows, then zeros; the other rank's slot as an all-padding rank sends it.
  const std::vector<float> mine = [&] {
    std::vector<float> v(static_cast<size_t>(rows.rows.numel()));
    backend->download(v.data(), rows.rows);
    return v;
  }();
  const int64_t C = rows.rows.cols();
  for (int64_t i = 9 * C; i < planned * C; ++i)
    ASSERT_EQ(mine[static_cast<size_t>(i)], 0.f) << "padding row value " << i;
  backend->fill(rows.rows.row_slice(planned, planned), 0.f);
  const std::vector<int32_t> zeros(static_cast<size_t>(planned), 0);
  backend->upload(rows.tokens.flat_slice(planned, planned), zeros.data());
  const std::vector<float> before = b.get_grad("model.embed_tokens.weight");
  b.add_exchanged_embedding_rows();
  const std::vector<float> after = b.get_grad("model.embed_tokens.weight");
  EXPECT_NE(before, after) << "the lookup rows added nothing";
  EXPECT_EQ(after, a.get_grad("model.embed_tokens.weight"));
  for (const auto& p : a.base().specs)
    if (p.name != "model.embed_tokens.weight") EXPECT_EQ(a.get_grad(p.name), b.get_grad(p.name)) << p.name;
}

TEST(Model, AccumulationOverMicroBatchesMatchesOneBatch) {
  auto backend = make_cpu_backend();
  LlamaModel m(*backend, options(true, Checkpointing::on));
  randomize(m, 8);
  Data d = make_data(21);
  step(m, d);
  std::vector<float> g_one = m.get_grad("model.layers.1.mlp.down_proj.lora_A.weight");
  // The same rows as two micro-batches of one sequence each, scaled by the step's token count.
  m.ledger().begin_step(2);
  for (int micro = 0; micro < 2; ++micro) {
    m.ledger().begin_micro(micro);
    Data part;
    part.tokens.assign(d.tokens.begin() + micro * 9, d.tokens.begin() + micro * 9 + 9);
    part.targets.assign(d.targets.begin() + micro * 9, d.targets.begin() + micro * 9 + 9);
    part.positions.assign(d.positions.begin() + micro * 9, d.positions.begin() + micro * 9 + 9);
    m.forward_backward(part.in(1), 1.0f / static_cast<float>(d.counted()), 7);
    m.ledger().end_micro();
  }
  m.ledger().end_step();
  std::vector<float> g_acc = m.get_grad("model.layers.1.mlp.down_proj.lora_A.weight");
  double num = 0, den = 0;
  for (size_t i = 0; i < g_one.size(); ++i) num += std::pow(g_one[i] - g_acc[i], 2), den += std::pow(g_one[i], 2);
  EXPECT_LT(std::sqrt(num / den), 1e-5);
}

TEST(Model, EverySlotWrittenOncePerMicroBatchAndEveryBucketReducedOncePerStep) {
  for (Checkpointing ckpt : {Checkpointing::off, Checkpointing::on}) {
    for (bool lora : {true, false}) {
      auto backend = make_cpu_backend();
      LlamaModel m(*backend, options(lora, ckpt, /*tied=*/!lora));
      randomize(m, 2);
      std::vector<int> ready_order;
      m.ledger().on_bucket_ready = [&](int b) { ready_order.push_back(b); };
      Data d = make_data(1);
      const int micro = 3;
      m.ledger().begin_step(micro);
      for (int k = 0; k < micro; ++k) {
        m.ledger().begin_micro(k);
        m.forward_backward(d.in(), 0.01f, 1);
        m.ledger().end_micro();
        if (k < micro - 1) EXPECT_TRUE(ready_order.empty()) << "a bucket was reduced before the last micro-batch";
      }
      m.ledger().end_step();
      for (size_t s = 0; s < m.ledger().n_slots(); ++s) {
        const int per_micro = (!lora && s == 0) ? 2 : 1;  // the tied embedding: lookup and head
        EXPECT_EQ(m.ledger().writes(static_cast<int>(s)), micro * per_micro);
      }
      ASSERT_EQ(static_cast<int>(ready_order.size()), m.ledger().n_buckets());
      for (int b = 0; b < m.ledger().n_buckets(); ++b) EXPECT_EQ(m.ledger().reductions(b), 1);
      // Layers become ready in backward order: the last layer's bucket first; with full fine-tuning
      // the embedding/norm/head bucket (2) completes last, with the embedding lookup's gradient.
      EXPECT_EQ(ready_order.front(), 1);
      if (!lora) EXPECT_EQ(ready_order.back(), 2);
    }
  }
}

// A bucket whose slots were not all written in the step's last micro-batch was never reported for
// reduction: caught at the end of the step.
TEST(LedgerDeathTest, UnreportedBucketIsCaught) {
  GradLedger ledger;
  ledger.add_slot("w", 1, 0);
  ledger.add_slot("v", 2, 1);
  ledger.begin_step(1);
  ledger.begin_micro(0);
  ledger.write({0}, [](float) {});
  ledger.write({1}, [](float) {});
  EXPECT_DEATH(ledger.end_step(), "bucket 1 was not reduced exactly once");
}

TEST(LedgerDeathTest, WritingASlotTwiceAborts) {
  GradLedger ledger;
  const int s = ledger.add_slot("w", 1, 0);
  ledger.begin_step(1);
  ledger.begin_micro(0);
  ledger.write({s}, [](float) {});
  EXPECT_DEATH(ledger.write({s}, [](float) {}), "written more often than declared");
}

TEST(LedgerDeathTest, MissingWriteIsCaught) {
  GradLedger ledger;
  ledger.add_slot("w", 1, 0);
  ledger.add_slot("v", 1, 0);
  ledger.begin_step(1);
  ledger.begin_micro(0);
  ledger.write({0}, [](float) {});
  EXPECT_DEATH(ledger.end_micro(), "slot v written 0 times");
}

TEST(Ledger, BetaIsZeroOnlyForTheFirstWriteOfAStep) {
  GradLedger ledger;
  const int s = ledger.add_slot("w", 2, 0);
  std::vector<float> betas;
  ledger.begin_step(2);
  for (int k = 0; k < 2; ++k) {
    ledger.begin_micro(k);
    ledger.write({s}, [&](float b) { betas.push_back(b); });
    ledger.write({s}, [&](float b) { betas.push_back(b); });
    ledger.end_micro();
  }
  ledger.end_step();
  EXPECT_EQ(betas, (std::vector<float>{0.f, 1.f, 1.f, 1.f}));
}

// LoRA dropout is a training-time op: evaluation (and generation) sees the plain adapters.
TEST(Model, EvalIgnoresLoraDropout) {
  auto backend = make_cpu_backend();
  ModelOptions with = options(true, Checkpointing::on), without = options(true, Checkpointing::on);
  with.lora_dropout = 0.5f;
  LlamaModel a(*backend, with), b(*backend, without);
  randomize(a, 6);
  randomize(b, 6);
  Data d = make_data(4);
  EXPECT_EQ(loss_only(a, d), loss_only(b, d));
  EXPECT_NE(step(a, d), step(b, d));  // while training, dropout changes the loss
}

// device_map auto's layer stages, on CPU backends: a model spread over three backends computes
// bitwise what one backend computes (losses, every LoRA gradient, eval logits and KV-cache
// generation), with checkpointing on and off and with LoRA dropout.
TEST(ModelStages, ThreeStagesEqualOne) {
  for (Checkpointing ckpt : {Checkpointing::on, Checkpointing::off}) {
    ModelOptions o = options(true, ckpt, true);
    o.arch.n_layers = 4;
    o.lora_dropout = 0.1f;
    auto one_be = make_cpu_backend();
    std::vector<std::unique_ptr<Backend>> bes;
    for (int i = 0; i < 3; ++i) bes.push_back(make_cpu_backend());
    LlamaModel one(*one_be, o);
    o.stage_layers = {1, 2, 1};
    LlamaModel three({bes[0].get(), bes[1].get(), bes[2].get()}, o);
    EXPECT_EQ(three.n_stages(), 3);
    EXPECT_EQ(three.stage_of_layer(0), 0);
    EXPECT_EQ(three.stage_of_layer(2), 1);
    EXPECT_EQ(three.stage_of_layer(3), 2);
    randomize(one, 21);
    randomize(three, 21);
    Data d = make_data(4);
    EXPECT_EQ(step(one, d), step(three, d));
    // Each stage's last layer is left in its set by the forward: of {0}, {1, 2}, {3} only layer 1
    // is recomputed, against layers 0-2 on one backend.
    const bool on = ckpt == Checkpointing::on;
    EXPECT_EQ(one.layers_recomputed(), on ? 3 : 0);
    EXPECT_EQ(three.layers_recomputed(), on ? 1 : 0);
    for (const auto& p : one.lora().specs) EXPECT_EQ(one.get_grad(p.name), three.get_grad(p.name)) << p.name;
    std::vector<float> la, lb;
    EXPECT_EQ(one.forward_loss(d.in(), &la), three.forward_loss(d.in(), &lb));
    EXPECT_EQ(la, lb);
    one.prefill(2, 9, 4, d.tokens.data());
    three.prefill(2, 9, 4, d.tokens.data());
    EXPECT_EQ(one.decode_step({3, 5}), three.decode_step({3, 5}));
  }
}

TEST(ModelStages, FullFineTuningOverStagesIsRefusedWithAdvice) {
  ModelOptions o = options(false, Checkpointing::on);
  o.stage_layers = {1, 1};
  auto a = make_cpu_backend(), b = make_cpu_backend();
  try {
    LlamaModel m({a.get(), b.get()}, o);
    FAIL() << "expected a UserError";
  } catch (const UserError& e) {
    EXPECT_NE(std::string(e.what()).find("zero_stage"), std::string::npos) << e.what();
  }
}

TEST(ModelStages, BalanceGivesEveryStageALayerAndTheFirstFewer) {
  ModelOptions o = options(true, Checkpointing::on);
  o.arch.n_layers = 16;
  o.arch.hidden_size = 2048;
  o.arch.intermediate_size = 8192;
  o.arch.n_heads = 32;
  o.arch.n_kv_heads = 8;
  o.arch.head_dim = 64;
  o.arch.vocab_size = 128256;
  o.max_batch = 2;
  o.max_seq = 2048;
  for (int n = 1; n <= 4; ++n) {
    const auto layers = balance_stages(o, n, 2);
    ASSERT_EQ(static_cast<int>(layers.size()), n);
    int64_t total = 0;
    for (int64_t k : layers) {
      EXPECT_GE(k, 1);
      total += k;
    }
    EXPECT_EQ(total, 16);
    if (n > 1) EXPECT_LT(layers.front(), layers.back()) << n;  // the embedding and head weigh on the first
  }
}
