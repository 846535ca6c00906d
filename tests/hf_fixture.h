// Loads a tests/fixtures/hf/<case> directory (made by tools/make_fixtures.py with HF transformers
// and PEFT) into a LlamaModel on any backend, runs HF's loss, and compares with HF's numbers.
#pragma once
#include <gtest/gtest.h>

#include <cmath>
#include <filesystem>
#include <memory>
#include <string>
#include <vector>

#include "ranktune/backend.h"
#include "ranktune/hf_config.h"
#include "ranktune/model.h"
#include "ranktune/safetensors.h"
#include "ranktune/weights.h"

namespace ranktune::testing {

struct HfCase {
  std::string dir;
  LlamaArch arch;
  bool lora = false;
  PeftLoraConfig peft;
  int64_t B = 0, T = 0;
  std::vector<int32_t> tokens, targets, positions;
  int64_t counted = 0;
};

inline HfCase load_case(const std::string& name) {
  HfCase c;
  c.dir = std::string(RANKTUNE_FIXTURES) + "/hf/" + name;
  c.arch = read_hf_arch(c.dir + "/config.json");
  c.lora = std::filesystem::exists(c.dir + "/adapter_config.json");
  if (c.lora) c.peft = read_peft_config(c.dir + "/adapter_config.json");
  SafetensorsFile inputs(c.dir + "/inputs.safetensors");
  const auto& shape = inputs.info("input_ids").shape;
  c.B = shape[0];
  c.T = shape[1];
  c.tokens = inputs.read_i32("input_ids");
  const std::vector<int32_t> labels = inputs.read_i32("labels");
  // HF shifts inside the loss: position t predicts labels[t+1].
  for (int64_t b = 0; b < c.B; ++b)
    for (int64_t t = 0; t < c.T; ++t) {
      const int32_t target = t + 1 < c.T ? labels[static_cast<size_t>(b * c.T + t + 1)] : -100;
      c.targets.push_back(target);
      c.positions.push_back(static_cast<int32_t>(t));
      c.counted += target != -100;
    }
  return c;
}

inline std::unique_ptr<LlamaModel> build_model(Backend& be, const HfCase& c, Checkpointing ckpt) {
  ModelOptions o;
  o.arch = c.arch;
  o.lora = c.lora;
  o.train_base = !c.lora;
  if (c.lora) {
    o.lora_r = c.peft.r;
    o.lora_scaling = static_cast<float>(c.peft.scaling());
    o.lora_dropout = 0.f;
    o.lora_targets = c.peft.target_modules;
  }
  o.checkpointing = ckpt;
  o.max_batch = c.B;
  o.max_seq = c.T;
  o.loss_chunk_rows = 17;  // several chunks, the last one partial
  auto m = std::make_unique<LlamaModel>(be, o);
  load_hf_weights(*m, c.dir);
  if (c.lora) load_peft_adapter(*m, c.dir);
  return m;
}

inline ModelInputs inputs(const HfCase& c) {
  return ModelInputs{c.B, c.T, c.tokens.data(), c.targets.data(), c.positions.data(), nullptr};
}

// One training micro-batch: returns HF's mean loss.
inline double train_step(LlamaModel& m, const HfCase& c) {
  m.ledger().begin_step(1);
  m.ledger().begin_micro(0);
  const double sum = m.forward_backward(inputs(c), 1.0f / static_cast<float>(c.counted), 0);
  m.ledger().end_micro();
  m.ledger().end_step();
  return sum / static_cast<double>(c.counted);
}

inline double rel_l2(const std::vector<float>& got, const std::vector<float>& want) {
  double num = 0, den = 0;
  for (size_t i = 0; i < want.size(); ++i) {
    if (!std::isfinite(got[i])) return INFINITY;
    num += (static_cast<double>(got[i]) - want[i]) * (static_cast<double>(got[i]) - want[i]);
    den += static_cast<double>(want[i]) * want[i];
  }
  return std::sqrt(num / std::max(den, 1e-30));
}

inline std::vector<std::string> all_cases() { return {"tied_kv1", "untied_kv2_llama3", "lora_all", "lora_rslora_subset"}; }

// The HF name of a trainable tensor's gradient in expected.safetensors.
inline std::string grad_key(const HfCase& c, const std::string& name) {
  return c.lora ? "grad.base_model.model." + name : "grad." + name;
}

}  // namespace ranktune::testing
