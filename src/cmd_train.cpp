// `ranktune train`, `eval`, `generate`, `prep` and `export`: argument parsing, then the trainer
// (src/trainer.cpp) or the data preparation (src/dataset.cpp).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <string>

#include "ranktune/cli.h"
#include "ranktune/config.h"
#include "ranktune/dataset.h"
#include "ranktune/error.h"
#include "ranktune/tokenizer.h"
#include "ranktune/trainer.h"

namespace ranktune {

namespace {

std::string flag(const ConfigArgs& ca, const std::string& name, const std::string& fallback) {
  for (size_t i = 0; i + 1 < ca.flags.size(); i += 2)
    if (ca.flags[i] == name) return ca.flags[i + 1];
  return fallback;
}
bool has_flag(const ConfigArgs& ca, const std::string& name) {
  for (size_t i = 0; i < ca.flags.size(); i += 2)
    if (ca.flags[i] == name) return true;
  return false;
}
int64_t int_flag(const ConfigArgs& ca, const std::string& name, int64_t fallback) {
  const std::string v = flag(ca, name, "");
  if (v.empty()) return fallback;
  try {
    size_t used = 0;
    const long long x = std::stoll(v, &used);
    if (used == v.size() && x > 0) return x;
  } catch (const std::logic_error&) {
  }
  throw UserError(name + " = '" + v + "' is not a positive whole number");
}

}  // namespace

int cmd_train(const Args& args, const LaunchInfo& li) {
  if (wants_help(args)) {
    std::puts("usage: ranktune train CONFIG [--resume [latest|PATH]] [--set section.key=value]...\n\n"
              "Fine-tunes as the run config says (jobs/configs/reference.yaml lists every key). Writes the\n"
              "resolved config, metrics.jsonl, checkpoints (every checkpoint.save_steps and at the end, under\n"
              "checkpoints/) and the LoRA adapter (PEFT format) under training.output_dir.\n"
              "--resume latest continues from the newest valid checkpoint there (from step 0 when there is none),\n"
              "--resume PATH from that checkpoint file. SIGUSR1, SIGTERM or SIGINT stop after the current step,\n"
              "save a checkpoint and exit with code 75 (requeue); a second SIGINT exits at once.\n"
              "Several ranks: mpirun -np N ranktune train CONFIG --set model.enable_multi_gpu=true");
    return 0;
  }
  // --resume takes an optional value: latest when the next argument is absent or another option.
  Args rest;
  std::string resume;
  for (size_t i = 0; i < args.size(); ++i) {
    if (args[i] != "--resume") {
      rest.push_back(args[i]);
      continue;
    }
    resume = i + 1 < args.size() && args[i + 1].rfind("-", 0) != 0 ? args[++i] : "latest";
  }
  ConfigArgs ca = parse_config_args(rest, "train", {}, {});
  RT_REQUIRE(!ca.config_path.empty(), "ranktune train: give a run config, e.g. ranktune train jobs/configs/quickstart.yaml");
  return run_train(load_run_config(ca.config_path, ca.overrides), li, resume);
}

int cmd_eval(const Args& args, const LaunchInfo& li) {
  if (wants_help(args)) {
    std::puts("usage: ranktune eval CONFIG [--set section.key=value]...\n\n"
              "Prints one JSON line with the mean loss and token count of the configured model (+ lora.adapter_path)\n"
              "on data.eval_file (else data.train_file).");
    return 0;
  }
  ConfigArgs ca = parse_config_args(args, "eval", {}, {});
  RT_REQUIRE(!ca.config_path.empty(), "ranktune eval: give a run config");
  return run_eval(load_run_config(ca.config_path, ca.overrides), li);
}

int cmd_generate(const Args& args, const LaunchInfo& li) {
  if (wants_help(args)) {
    std::puts("usage: ranktune generate CONFIG --prompt TEXT [--max-new-tokens N] [--temperature T] [--top-p P]\n"
              "                         [--seed S] [--set section.key=value]...\n\n"
              "Continues TEXT with the configured model (+ lora.adapter_path), decoding with a KV cache. Each new\n"
              "token is drawn from softmax(logits / T), restricted to the most probable tokens whose probabilities\n"
              "add up to P (nucleus sampling), by a random stream seeded with S: the same seed gives the same text.\n"
              "--temperature 0 decodes greedily. Generation stops at <|end_of_text|> or <|eot_id|>, after N tokens,\n"
              "or when the text fills model.max_seq_length.\n"
              "Defaults: --max-new-tokens 32 --temperature 0.7 --top-p 0.9 --seed 0.");
    return 0;
  }
  ConfigArgs ca = parse_config_args(args, "generate",
                                    {"--prompt", "--max-new-tokens", "--temperature", "--top-p", "--seed"}, {});
  RT_REQUIRE(!ca.config_path.empty(), "ranktune generate: give a run config");
  RT_REQUIRE(has_flag(ca, "--prompt"), "ranktune generate: give --prompt TEXT");
  const auto real_flag = [&](const std::string& name, double fallback) {
    const std::string v = flag(ca, name, "");
    if (v.empty()) return fallback;
    try {
      size_t used = 0;
      const double x = std::stod(v, &used);
      if (used == v.size()) return x;
    } catch (const std::logic_error&) {
    }
    throw UserError(name + " = '" + v + "' is not a number");
  };
  const double temperature = real_flag("--temperature", 0.7), top_p = real_flag("--top-p", 0.9);
  RT_REQUIRE(std::isfinite(temperature) && temperature >= 0,
             "--temperature must be 0 (greedy) or positive, got " + flag(ca, "--temperature", ""));
  RT_REQUIRE(top_p > 0 && top_p <= 1, "--top-p must be in (0, 1], got " + flag(ca, "--top-p", ""));
  const std::string seed_text = flag(ca, "--seed", "0");
  bool seed_ok = !seed_text.empty() &&
                 std::all_of(seed_text.begin(), seed_text.end(), [](char c) { return c >= '0' && c <= '9'; });
  uint64_t seed = 0;
  try {
    if (seed_ok) seed = std::stoull(seed_text);
  } catch (const std::out_of_range&) {
    seed_ok = false;
  }
  RT_REQUIRE(seed_ok, "--seed = '" + seed_text + "' is not a whole number in 0..2^64-1");
  return run_generate(load_run_config(ca.config_path, ca.overrides), li, flag(ca, "--prompt", ""),
                      int_flag(ca, "--max-new-tokens", 32), temperature, top_p, seed);
}

int cmd_prep(const Args& args, const LaunchInfo& li) {
  if (wants_help(args)) {
    std::puts("usage: ranktune prep INPUT.jsonl OUTPUT.h5 [--tokenizer byte|PATH] [--format auto|text|prompt_completion|alpaca|messages]\n"
              "                     [--max-seq-length N] [--packing] [--all-tokens]\n\n"
              "Tokenizes JSONL records into an HDF5 token dataset (input_ids, labels, offsets; the tokenizer's hash\n"
              "and vocab size as attributes). --all-tokens trains on prompts too (train_on_responses_only off).");
    return 0;
  }
  ConfigArgs ca = parse_config_args(args, "prep", {"--tokenizer", "--format", "--max-seq-length"},
                                    {"--packing", "--all-tokens"}, 2);
  RT_REQUIRE(ca.more_positionals.size() == 1, "ranktune prep: give INPUT.jsonl and OUTPUT.h5");
  const std::string input = ca.config_path, output = ca.more_positionals[0];
  if (li.rank != 0) return 0;
  auto tok = load_tokenizer(flag(ca, "--tokenizer", "byte"));
  PrepOptions po{input, output, *tok};
  po.format = flag(ca, "--format", "auto");
  po.max_seq_length = int_flag(ca, "--max-seq-length", 2048);
  po.packing = has_flag(ca, "--packing");
  po.train_on_responses_only = !has_flag(ca, "--all-tokens");
  PrepSummary s = prep_dataset(po);
  std::printf("%s\n", s.report().c_str());
  return 0;
}

int cmd_export(const Args& args, const LaunchInfo& li) {
  if (wants_help(args)) {
    std::puts("usage: ranktune export CONFIG [--checkpoint latest|PATH] --format peft|merged --output DIR\n"
              "                       [--set section.key=value]...\n\n"
              "Writes a training checkpoint (default: the newest valid one in training.output_dir/checkpoints) as\n"
              "peft:   a PEFT adapter directory (adapter_config.json, adapter_model.safetensors) for the base model;\n"
              "merged: an HF model directory (config.json, model.safetensors in bf16) with the LoRA updates merged\n"
              "        into the base weights (W + scaling * B A), or the fully fine-tuned weights.");
    return 0;
  }
  ConfigArgs ca = parse_config_args(args, "export", {"--checkpoint", "--format", "--output"}, {});
  RT_REQUIRE(!ca.config_path.empty(), "give the run config the checkpoint was trained with");
  const std::string format = flag(ca, "--format", "");
  RT_REQUIRE(format == "peft" || format == "merged",
             "--format must be peft or merged" + (format.empty() ? std::string() : ", got '" + format + "'"));
  RT_REQUIRE(!flag(ca, "--output", "").empty(), "give --output DIR");
  return run_export(load_run_config(ca.config_path, ca.overrides), li, flag(ca, "--checkpoint", "latest"), format,
                    flag(ca, "--output", ""));
}

}  // namespace ranktune
