// The GPU path against HF (fixtures) and against itself: bf16 tolerances, and checkpointing
// (recompute, offloaded to host memory, and keep_attention) bitwise identical to no checkpointing.
#include <gtest/gtest.h>

#include <cstring>

#include <cuda_runtime.h>

#include "gpu_skip.h"
#include "hf_fixture.h"

using namespace ranktune;
using namespace ranktune::testing;

class GpuHfParity : public ::testing::TestWithParam<std::string> {};

// bf16 weights and activations with fp32 accumulation: loss within 2e-2 relative of HF's fp32
// loss; logits and gradients within 5e-2 relative L2.
TEST_P(GpuHfParity, GpuMatchesHf) {
  SKIP_WITHOUT_GPU();
  const HfCase c = load_case(GetParam());
  SafetensorsFile expected(c.dir + "/expected.safetensors");
  auto be = make_cuda_backend(0);
  auto m = build_model(*be, c, Checkpointing::on);
  const double hf_loss = expected.read_f32("loss")[0];
  std::vector<float> logits;
  const double eval_loss = m->forward_loss(inputs(c), &logits) / static_cast<double>(c.counted);
  EXPECT_NEAR(eval_loss, hf_loss, 2e-2 * std::fabs(hf_loss));
  const double logit_err = rel_l2(logits, expected.read_f32("logits"));
  EXPECT_LT(logit_err, 5e-2);
  const double loss = train_step(*m, c);
  EXPECT_NEAR(loss, hf_loss, 2e-2 * std::fabs(hf_loss));
  double worst = 0;
  std::string worst_name;
  for (const auto& p : m->trainable().specs) {
    const double err = rel_l2(m->get_grad(p.name), expected.read_f32(grad_key(c, p.name)));
    EXPECT_LT(err, 5e-2) << p.name;
    if (err > worst) worst = err, worst_name = p.name;
  }
  std::printf("[%s] loss %.6f (HF %.6f), logits rel err %.2e, worst gradient rel err %.2e (%s)\n", GetParam().c_str(),
              loss, hf_loss, logit_err, worst, worst_name.c_str());
}

TEST_P(GpuHfParity, CheckpointingIsBitwiseIdentical) {
  SKIP_WITHOUT_GPU();
  const HfCase c = load_case(GetParam());
  auto be = make_cuda_backend(0);
  auto on = build_model(*be, c, Checkpointing::on);
  auto off = build_model(*be, c, Checkpointing::off);
  // Offloaded: layer inputs copied to pinned host memory and back on the copy stream.
  auto offload = build_model(*be, c, Checkpointing::offload);
  // keep_attention: the attention blocks kept, the norms and MLP recomputed.
  auto keep = build_model(*be, c, Checkpointing::keep_attention);
  const double loss_off = train_step(*off, c);
  EXPECT_EQ(train_step(*on, c), loss_off);
  EXPECT_EQ(train_step(*offload, c), loss_off);
  EXPECT_EQ(train_step(*keep, c), loss_off);
  for (const auto& p : on->trainable().specs) {
    std::vector<float> a = on->get_grad(p.name), b = off->get_grad(p.name), o = offload->get_grad(p.name),
                       k = keep->get_grad(p.name);
    ASSERT_EQ(0, std::memcmp(a.data(), b.data(), a.size() * 4)) << p.name;
    ASSERT_EQ(0, std::memcmp(o.data(), b.data(), o.size() * 4)) << p.name << " (offload)";
    ASSERT_EQ(0, std::memcmp(k.data(), b.data(), k.size() * 4)) << p.name << " (keep_attention)";
  }
}

INSTANTIATE_TEST_SUITE_P(Fixtures, GpuHfParity, ::testing::ValuesIn(all_cases()));
