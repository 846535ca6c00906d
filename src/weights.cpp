#include "ranktune/weights.h"

#include "ranktune/nf4.h"

#include <filesystem>

#include "ranktune/error.h"
#include "ranktune/hf_config.h"
#include "ranktune/safetensors.h"

namespace ranktune {

namespace fs = std::filesystem;

LlamaArch resolve_arch(const RunConfig& cfg) {
  if (cfg.model.has_inline_arch) return cfg.model.arch;
  const std::string path = cfg.model.name_or_path + "/config.json";
  RT_REQUIRE(fs::exists(path), cfg.source + ": model.name_or_path = " + cfg.model.name_or_path +
                                   " has no config.json: point it at an HF model directory");
  LlamaArch a = read_hf_arch(path);
  a.validate(path);
  return a;
}

void load_hf_weights(LlamaModel& model, const std::string& model_dir) {
  HfCheckpoint ckpt(model_dir, "model");
  for (const auto& p : model.base().specs) {
    // A bitsandbytes 4-bit checkpoint ("-bnb-4bit" repos): its NF4 weights load as they are under
    // load_in_4bit, and are dequantized for a bf16 or fp32 model.
    if (is_bnb_nf4(ckpt, p.name)) {
      Nf4Tensor w = load_bnb_nf4(ckpt, p.name);
      RT_REQUIRE(w.shape == p.shape, ckpt.source() + ": 4-bit tensor " + p.name + " has another shape than the model expects");
      if (model.quantized(p.name)) model.set_nf4(p.name, w);
      else model.set_tensor(p.name, nf4_dequantize(w));
      continue;
    }
    RT_REQUIRE(ckpt.contains(p.name), ckpt.source() + ": tensor " + p.name +
                                          " is missing (expected shape " + [&] {
                                            std::string s = "[";
                                            for (size_t i = 0; i < p.shape.size(); ++i) s += (i ? ", " : "") + std::to_string(p.shape[i]);
                                            return s + "]";
                                          }() + ")");
    ckpt.expect_shape(p.name, p.shape);
    model.set_tensor(p.name, ckpt.read_f32(p.name));
  }
}

void load_peft_adapter(LlamaModel& model, const std::string& adapter_dir) {
  RT_REQUIRE(model.has_lora(), adapter_dir + ": a LoRA adapter needs lora.enabled: true");
  HfCheckpoint ckpt(adapter_dir, "adapter_model");
  for (const auto& p : model.lora().specs) {
    const std::string key = "base_model.model." + p.name;
    RT_REQUIRE(ckpt.contains(key), ckpt.source() + ": adapter tensor " + key +
                                       " is missing: the adapter's r/target_modules must match lora.r and lora.target_modules");
    ckpt.expect_shape(key, p.shape);
    model.set_tensor(p.name, ckpt.read_f32(key));
  }
}

void save_peft_adapter(LlamaModel& model, const RunConfig& cfg, const std::string& adapter_dir) {
  fs::create_directories(adapter_dir);
  SafetensorsWriter w;
  for (const auto& p : model.lora().specs) {
    std::vector<float> v = model.get_tensor(p.name);
    w.add_f32("base_model.model." + p.name, p.shape, v);
  }
  w.set_metadata("format", "pt");
  w.write(adapter_dir + "/adapter_model.safetensors");
  PeftLoraConfig pc;
  pc.r = cfg.lora.r;
  pc.lora_alpha = cfg.lora.lora_alpha;
  pc.lora_dropout = cfg.lora.lora_dropout;
  pc.target_modules = cfg.lora.target_modules;
  pc.use_rslora = cfg.lora.use_rslora;
  pc.bias = cfg.lora.bias;
  pc.base_model_name_or_path = cfg.model.name_or_path;
  write_peft_config(adapter_dir + "/adapter_config.json", pc);
}

}  // namespace ranktune
