// Weights in and out: HF model directories (config.json + safetensors, sharded or not) into the
// model's flat buffers, and LoRA adapters in PEFT's format (adapter_config.json +
// adapter_model.safetensors) in and out.
#pragma once
#include <string>

#include "ranktune/config.h"
#include "ranktune/model.h"

namespace ranktune {

// The architecture of the run: model.architecture, or name_or_path/config.json.
LlamaArch resolve_arch(const RunConfig& cfg);
// Loads every base tensor from an HF model directory; UserError naming the tensor, expected and
// found shape on a mismatch, or the missing tensor.
void load_hf_weights(LlamaModel& model, const std::string& model_dir);
// PEFT adapter directory -> the model's LoRA tensors (names base_model.model.<name>).
void load_peft_adapter(LlamaModel& model, const std::string& adapter_dir);
// The model's LoRA tensors -> a PEFT adapter directory (fp32 tensors).
void save_peft_adapter(LlamaModel& model, const RunConfig& cfg, const std::string& adapter_dir);

}  // namespace ranktune
