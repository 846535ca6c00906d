// The CPU path against HF transformers (+ PEFT) on the fixtures: loss to 1e-5 relative, logits and
// every gradient to 1e-4 relative (L2).
#include <gtest/gtest.h>

#include "hf_fixture.h"

using namespace ranktune;
using namespace ranktune::testing;

class HfParity : public ::testing::TestWithParam<std::string> {};

TEST_P(HfParity, CpuMatchesHf) {
  const HfCase c = load_case(GetParam());
  SafetensorsFile expected(c.dir + "/expected.safetensors");
  auto be = make_cpu_backend();
  auto m = build_model(*be, c, Checkpointing::on);

  const double hf_loss = expected.read_f32("loss")[0];
  std::vector<float> logits;
  const double eval_loss = m->forward_loss(inputs(c), &logits) / static_cast<double>(c.counted);
  EXPECT_NEAR(eval_loss, hf_loss, 1e-5 * std::fabs(hf_loss));
  EXPECT_LT(rel_l2(logits, expected.read_f32("logits")), 1e-4);

  const double loss = train_step(*m, c);
  EXPECT_NEAR(loss, hf_loss, 1e-5 * std::fabs(hf_loss));
  int compared = 0;
  for (const auto& p : m->trainable().specs) {
    const std::string key = grad_key(c, p.name);
    ASSERT_TRUE(expected.contains(key)) << key;
    const double err = rel_l2(m->get_grad(p.name), expected.read_f32(key));
    EXPECT_LT(err, 1e-4) << p.name;
    ++compared;
  }
  EXPECT_GT(compared, 0);
}

INSTANTIATE_TEST_SUITE_P(Fixtures, HfParity, ::testing::ValuesIn(all_cases()));
