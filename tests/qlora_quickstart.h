// QLoRA against LoRA on the quickstart task, as a user runs them: a base model trained from scratch
// on two-digit addition (jobs/configs/quickstart.yaml) and exported as an HF model directory, then
// LoRA and QLoRA (the same base frozen in NF4) fine-tuned from it on the same task. Returns the
// two final eval losses. Used by the CPU test (tests/test_qlora.cpp) and the GPU one.
#pragma once
#include <gtest/gtest.h>

#include <fstream>
#include <nlohmann/json.hpp>
#include <string>
#include <utility>

#include "subprocess.h"

inline double last_eval_loss(const std::string& dir) {
  std::ifstream in(dir + "/metrics.jsonl");
  std::string line, last;
  while (std::getline(in, line))
    if (!line.empty()) last = line;
  return nlohmann::json::parse(last).at("eval_loss").get<double>();
}

inline std::pair<double, double> lora_and_qlora_losses(const std::string& dir, const std::string& device_map,
                                                       int base_steps, int lora_steps) {
  const std::string bin = RANKTUNE_BINARY, dm = " --set model.device_map=" + device_map;
  const CommandResult base = run_command(bin + " train jobs/configs/quickstart.yaml" + dm +
                                             " --set training.max_steps=" + std::to_string(base_steps) +
                                             " --set training.output_dir=" + dir + "/base",
                                         2);
  EXPECT_EQ(base.code, 0) << base.output;
  const CommandResult hf = run_command(bin + " export jobs/configs/quickstart.yaml --set training.output_dir=" + dir +
                                           "/base --format merged --output " + dir + "/base_hf",
                                       2);
  EXPECT_EQ(hf.code, 0) << hf.output;
  std::ofstream(dir + "/lora.yaml")
      << "model: {name_or_path: " << dir
      << "/base_hf, tokenizer: byte, max_seq_length: 12, gradient_checkpointing: false}\n"
      << "lora: {enabled: true, r: 16, lora_alpha: 32}\n"
      << "data: {train_file: jobs/data/quickstart/train.jsonl, eval_file: jobs/data/quickstart/eval.jsonl,\n"
      << "       format: prompt_completion}\n"
      << "training: {per_device_train_batch_size: 128, per_device_eval_batch_size: 128, learning_rate: 3.0e-3,\n"
      << "           max_steps: " << lora_steps << ", seed: 7}\n"
      << "logging: {logging_steps: 50}\n";
  double losses[2] = {0, 0};
  for (int four_bit = 0; four_bit < 2; ++four_bit) {
    const std::string out = dir + (four_bit ? "/qlora" : "/lora");
    const CommandResult r = run_command(bin + " train " + dir + "/lora.yaml" + dm + " --set model.load_in_4bit=" +
                                            (four_bit ? "true" : "false") + " --set training.output_dir=" + out,
                                        2);
    EXPECT_EQ(r.code, 0) << r.output;
    if (r.code == 0) losses[four_bit] = last_eval_loss(out);
  }
  std::printf(
      "quickstart task (%s): base %d steps from scratch, then %d steps: LoRA eval loss %.4f, QLoRA %.4f "
      "(%+.2f%%)\n",
      device_map.c_str(), base_steps, lora_steps, losses[0], losses[1], 100 * (losses[1] - losses[0]) / losses[0]);
  return {losses[0], losses[1]};
}
