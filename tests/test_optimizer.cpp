// The optimizer over a model's trainable group: schedules, weight decay only off norms, and the
// 8-bit state budget.
#include <gtest/gtest.h>

#include <cmath>

#include "ranktune/backend.h"
#include "ranktune/model.h"
#include "ranktune/optimizer.h"

using namespace ranktune;

TEST(Schedule, WarmupThenDecay) {
  EXPECT_DOUBLE_EQ(learning_rate_at(0, 100, 10, 1.0, "linear"), 0.0);
  EXPECT_DOUBLE_EQ(learning_rate_at(5, 100, 10, 1.0, "linear"), 0.5);
  EXPECT_DOUBLE_EQ(learning_rate_at(10, 100, 10, 1.0, "linear"), 1.0);
  EXPECT_NEAR(learning_rate_at(55, 100, 10, 1.0, "linear"), 0.5, 1e-12);
  EXPECT_DOUBLE_EQ(learning_rate_at(55, 100, 10, 1.0, "constant"), 1.0);
  EXPECT_NEAR(learning_rate_at(55, 100, 10, 1.0, "cosine"), 0.5, 1e-12);
  EXPECT_NEAR(learning_rate_at(99, 100, 0, 1.0, "cosine"), 0.5 * (1 + std::cos(M_PI * 0.99)), 1e-12);
}

// The Llama-3.2-1B LoRA shape (one layer is enough: every layer has the same adapters).
TEST(Optimizer, EightBitStatesStayUnder2Point1BytesPerParameter) {
  ModelOptions o;
  o.arch.vocab_size = 256;
  o.arch.hidden_size = 2048;
  o.arch.intermediate_size = 8192;
  o.arch.n_layers = 1;
  o.arch.n_heads = 32;
  o.arch.n_kv_heads = 8;
  o.arch.head_dim = 64;
  o.arch.max_position_embeddings = 16;
  o.lora = true;
  o.lora_r = 16;
  o.lora_targets = lora_module_names();
  o.max_batch = 1;
  o.max_seq = 4;
  auto be = make_cpu_backend();
  LlamaModel m(*be, o);
  TrainingSection tc;
  tc.optim = "adamw_8bit";
  tc.adam_beta1 = 0.9;
  tc.adam_beta2 = 0.999;
  tc.adam_epsilon = 1e-8;
  Optimizer opt(*be, m.trainable(), tc);
  const double per_param = static_cast<double>(opt.state_bytes()) / static_cast<double>(m.trainable().numel);
  EXPECT_LE(per_param, 2.1);
  EXPECT_GE(per_param, 2.0);
  tc.optim = "adamw";
  Optimizer fp32(*be, m.trainable(), tc);
  EXPECT_EQ(fp32.state_bytes(), 8 * m.trainable().numel);
}

TEST(Optimizer, NoWeightDecayOnNorms) {
  ModelOptions o;
  o.arch.vocab_size = 16;
  o.arch.hidden_size = 8;
  o.arch.intermediate_size = 8;
  o.arch.n_layers = 1;
  o.arch.n_heads = 2;
  o.arch.n_kv_heads = 1;
  o.arch.head_dim = 4;
  o.arch.max_position_embeddings = 8;
  o.lora = false;
  o.train_base = true;
  o.max_batch = 1;
  o.max_seq = 4;
  auto be = make_cpu_backend();
  LlamaModel m(*be, o);
  m.init_base_random(3);
  be->fill(m.base().grad, 0.f);  // zero gradients: only weight decay moves a weight
  TrainingSection tc;
  tc.optim = "adamw";
  tc.adam_beta1 = 0.9;
  tc.adam_beta2 = 0.999;
  tc.adam_epsilon = 1e-8;
  tc.weight_decay = 0.5;
  Optimizer opt(*be, m.trainable(), tc);
  const auto norm_before = m.get_tensor("model.layers.0.input_layernorm.weight");
  const auto proj_before = m.get_tensor("model.layers.0.self_attn.q_proj.weight");
  opt.step(0.1, 1.f);
  EXPECT_EQ(m.get_tensor("model.layers.0.input_layernorm.weight"), norm_before);
  const auto proj_after = m.get_tensor("model.layers.0.self_attn.q_proj.weight");
  EXPECT_NEAR(proj_after[0], proj_before[0] * (1 - 0.1f * 0.5f), 1e-7);
}
