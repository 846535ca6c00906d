// ranktune's own logits for a batch of token ids, written to a safetensors file, so that a script
// (tools/check_export_hf.py) can compare them with what HF transformers / PEFT compute from the
// same weights: the base model of an HF model directory, plus a PEFT adapter when one is given.
//
// Usage: ranktune_dump_logits --model DIR [--adapter DIR] [--device cpu|cuda:N]
//                             (--tokens FILE | --seed S --batch B --seq T) --out FILE
//   --tokens FILE  a safetensors file with input_ids [B, T] (any integer dtype)
//   --seed S       else B x T ids drawn uniformly from [0, vocab_size) by a seeded generator
// Writes FILE (safetensors): input_ids [B, T] i32, logits [B, T, V] f32 (the full LM head output of
// LlamaModel::forward_loss, no training, no dropout), loss [1] f32 (mean next-token cross-entropy
// over the T-1 shifted positions of every row, as HF's model(input_ids, labels=input_ids).loss) and
// the backend's name as metadata "device".
#include <cstdint>
#include <cstdio>
#include <exception>
#include <memory>
#include <string>
#include <vector>

#include "ranktune/backend.h"
#include "ranktune/error.h"
#include "ranktune/hf_config.h"
#include "ranktune/model.h"
#include "ranktune/safetensors.h"
#include "ranktune/weights.h"

using namespace ranktune;

namespace {

struct Options {
  std::string model_dir, adapter_dir, device = "cpu", tokens_file, out;
  uint64_t seed = 0;
  int64_t batch = 2, seq = 32;
  bool have_seed = false;
};

const char* kUsage =
    "usage: ranktune_dump_logits --model DIR [--adapter DIR] [--device cpu|cuda:N]\n"
    "                            (--tokens FILE | --seed S [--batch B] [--seq T]) --out FILE\n";

Options parse(int argc, char** argv) {
  Options o;
  for (int i = 1; i < argc; i += 2) {
    const std::string key = argv[i];
    RT_REQUIRE(i + 1 < argc, std::string(kUsage) + key + " needs a value");
    const std::string value = argv[i + 1];
    if (key == "--model")
      o.model_dir = value;
    else if (key == "--adapter")
      o.adapter_dir = value;
    else if (key == "--device")
      o.device = value;
    else if (key == "--tokens")
      o.tokens_file = value;
    else if (key == "--out")
      o.out = value;
    else if (key == "--seed")
      o.seed = std::stoull(value), o.have_seed = true;
    else if (key == "--batch")
      o.batch = std::stoll(value);
    else if (key == "--seq")
      o.seq = std::stoll(value);
    else
      throw UserError(std::string(kUsage) + "unknown option " + key);
  }
  RT_REQUIRE(!o.model_dir.empty() && !o.out.empty(), std::string(kUsage) + "give --model and --out");
  RT_REQUIRE(o.tokens_file.empty() != !o.have_seed, std::string(kUsage) + "give either --tokens or --seed");
  RT_REQUIRE(o.batch >= 1 && o.seq >= 2, "--batch must be >= 1 and --seq >= 2");
  return o;
}

std::unique_ptr<Backend> make_backend(const std::string& device) {
  if (device == "cpu") return make_cpu_backend();
  RT_REQUIRE(device.rfind("cuda:", 0) == 0 && device.size() > 5, "--device must be cpu or cuda:N, got " + device);
  return make_cuda_backend(std::stoi(device.substr(5)));
}

// splitmix64: a seeded stream of token ids, the same on every machine.
std::vector<int32_t> random_ids(uint64_t seed, int64_t n, int64_t vocab) {
  std::vector<int32_t> ids(static_cast<size_t>(n));
  for (auto& id : ids) {
    uint64_t z = (seed += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    id = static_cast<int32_t>((z ^ (z >> 31)) % static_cast<uint64_t>(vocab));
  }
  return ids;
}

int run(const Options& o) {
  LlamaArch arch = read_hf_arch(o.model_dir + "/config.json");
  arch.validate(o.model_dir + "/config.json");

  std::vector<int32_t> ids;
  int64_t B = o.batch, T = o.seq;
  if (!o.tokens_file.empty()) {
    SafetensorsFile f(o.tokens_file);
    const StTensorInfo& info = f.info("input_ids");
    RT_REQUIRE(info.shape.size() == 2, o.tokens_file + ": input_ids must be [B, T], is " + info.shape_str());
    B = info.shape[0];
    T = info.shape[1];
    ids = f.read_i32("input_ids");
  } else {
    ids = random_ids(o.seed, B * T, arch.vocab_size);
  }
  for (int32_t id : ids)
    RT_REQUIRE(id >= 0 && id < arch.vocab_size,
               "token id " + std::to_string(id) + " is outside the vocabulary of " + std::to_string(arch.vocab_size));

  ModelOptions mo;
  mo.arch = arch;
  mo.lora = !o.adapter_dir.empty();
  mo.checkpointing = Checkpointing::off;
  mo.max_batch = B;
  mo.max_seq = T;
  if (mo.lora) {
    const PeftLoraConfig pc = read_peft_config(o.adapter_dir);
    mo.lora_r = pc.r;
    mo.lora_scaling = static_cast<float>(pc.scaling());
    mo.lora_targets = pc.target_modules;
  }
  auto backend = make_backend(o.device);
  LlamaModel model(*backend, mo);
  load_hf_weights(model, o.model_dir);
  if (mo.lora) load_peft_adapter(model, o.adapter_dir);

  // Targets are the next token of each row (the last position is not counted), positions 0..T-1.
  std::vector<int32_t> targets(ids.size()), positions(ids.size());
  for (int64_t b = 0; b < B; ++b)
    for (int64_t t = 0; t < T; ++t) {
      const size_t i = static_cast<size_t>(b * T + t);
      targets[i] = t + 1 < T ? ids[i + 1] : -100;
      positions[i] = static_cast<int32_t>(t);
    }
  std::vector<float> logits;
  const double loss_sum =
      model.forward_loss(ModelInputs{B, T, ids.data(), targets.data(), positions.data(), nullptr}, &logits);
  const float loss = static_cast<float>(loss_sum / static_cast<double>(B * (T - 1)));

  SafetensorsWriter w;
  w.add_i32("input_ids", {B, T}, ids);
  w.add_f32("logits", {B, T, arch.vocab_size}, logits);
  w.add_f32("loss", {1}, std::vector<float>{loss});
  w.set_metadata("device", backend->name());
  w.write(o.out);
  std::printf("%s: logits [%lld, %lld, %lld] on %s%s, loss %.6f\n", o.out.c_str(), (long long)B, (long long)T,
              (long long)arch.vocab_size, backend->name().c_str(), mo.lora ? " with the adapter" : "", loss);
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    return run(parse(argc, argv));
  } catch (const UserError& e) {
    std::fprintf(stderr, "ranktune_dump_logits: error: %s\n", e.what());
    return kExitUserError;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "ranktune_dump_logits: error: %s\n", e.what());
    return 1;
  }
}
