#!/usr/bin/env python3
"""Build the HF reference fixtures that ranktune's CPU and GPU paths are tested against.

Each case is a small random LlamaForCausalLM (float32, eager attention, CPU) and, for the LoRA
cases, a PEFT LoRA adapter on it. For every case this writes tests/fixtures/hf/<case>/:

  config.json, generation_config.json, model.safetensors
      the base model as model.save_pretrained() writes it (HF names, fp32; with tied embeddings
      save_pretrained omits lm_head.weight)
  adapter_config.json, adapter_model.safetensors          (LoRA cases only)
      PEFT's own save_pretrained output (keys like
      base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight); PEFT's README.md is removed
  inputs.safetensors
      input_ids [B, T] and labels [B, T], int32; labels are input_ids with -100 on a prompt
      prefix of each row and a few scattered positions
  expected.safetensors
      loss [1]        HF's own model(input_ids=..., labels=...).loss: next-token cross-entropy
                      over the shifted sequence, -100 ignored, mean over the counted tokens
      logits [B, T, V]
      rope_inv_freq [D/2]  the model's rotary inverse frequencies (llama3 scaling applied)
      grad.<name>     d loss / d parameter for every trainable parameter: all base weights for the
                      full fine-tuning cases (names as in model.safetensors; with tied embeddings
                      the embedding's gradient holds both uses), lora_A / lora_B only for the LoRA
                      cases (names as in adapter_model.safetensors)
      __metadata__    one key, "fixture": a JSON object with the case, torch / transformers / peft
                      versions, B, T and the LoRA scaling (one key keeps the file byte-identical
                      across runs: safetensors writes several keys in hash order)

Cases:
  tied_kv1            tied embeddings, H=4, Hkv=1, C=96 (D=24), F=160, 2 layers, V=300, T=24
  untied_kv2_llama3   untied, H=4, Hkv=2, C=72 (D=18), F=200, 2 layers, V=257, llama3 RoPE scaling
                      (factor 8, low 1, high 4, original_max_position_embeddings 32,
                      max_position_embeddings 128), T=40. With D=18 and theta 10000 the rotary
                      wavelengths are 6.3, 17.5, 48.8, ...: one below 32/4 (kept), one between
                      32/4 and 32/1 (smoothed), the rest above (divided by 8), so every branch
                      of transformers' _compute_llama3_parameters is exercised
  lora_all            untied_kv2_llama3's base + LoRA r=4, alpha=8 on all seven projections
  lora_rslora_subset  tied_kv1's base + LoRA r=8, alpha=16, use_rslora, on q_proj, v_proj, down_proj

PEFT initialises lora_B to zero, which makes every lora_A gradient zero and would let a wrong
dA pass the tests; this script overwrites lora_B with small random values before saving, so the
adapter's forward differs from the base model and both gradients are non-trivial.

The weights are re-drawn after construction (embeddings std 0.2, linear layers std 1/sqrt(fan_in),
norm weights 1 + 0.2 N(0,1)) so that attention is far from uniform and logits are O(1); HF's
default init (std 0.02, unit norms) would leave the tests insensitive to most mistakes.

Everything runs on the CPU in float32 (torch.set_default_device("cpu")), also on a GPU machine,
and needs no network: models are built from configs, never downloaded. Regenerate with:

    pip install torch transformers peft safetensors      # used: torch 2.15, transformers 5.24, peft 0.21.2
    python3 tools/make_fixtures.py                       # writes tests/fixtures/hf/<case>/
    python3 tools/make_fixtures.py --out /tmp/fixtures   # elsewhere

Regenerating gives byte-identical files (transformers 4.57 gives the same tensors; its config.json
uses rope_theta/rope_scaling where 5.x writes rope_parameters). The script reloads each saved case
from disk (from_pretrained on the local directory, PeftModel.from_pretrained for adapters) and
checks that the loss is reproduced.
"""

import argparse
import json
import math
import os
import shutil
import sys
import tempfile

# PEFT keeps target_modules in a set, so adapter_config.json's order follows string hashing: fix
# the hash seed so that regenerating gives byte-identical files.
if os.environ.get("PYTHONHASHSEED") != "0":
    os.environ["PYTHONHASHSEED"] = "0"
    os.execv(sys.executable, [sys.executable] + sys.argv)

import torch  # noqa: E402

torch.set_default_device("cpu")
torch.set_default_dtype(torch.float32)

import peft  # noqa: E402
import transformers  # noqa: E402
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

B = 2

BASES = {
    "tied": dict(
        seed=1234,
        config=dict(
            vocab_size=300, hidden_size=96, intermediate_size=160, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=1, head_dim=24, tie_word_embeddings=True,
            rope_theta=10000.0, max_position_embeddings=2048, rms_norm_eps=1e-5,
        ),
    ),
    "untied_llama3": dict(
        seed=5678,
        config=dict(
            vocab_size=257, hidden_size=72, intermediate_size=200, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=18, tie_word_embeddings=False,
            rope_theta=10000.0, max_position_embeddings=128, rms_norm_eps=1e-6,
            rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                              original_max_position_embeddings=32),
        ),
    ),
}

ALL_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

CASES = {
    "tied_kv1": dict(base="tied", T=24, lora=None),
    "untied_kv2_llama3": dict(base="untied_llama3", T=40, lora=None),
    "lora_all": dict(base="untied_llama3", T=40,
                     lora=dict(r=4, lora_alpha=8, target_modules=ALL_MODULES, use_rslora=False)),
    "lora_rslora_subset": dict(base="tied", T=32,
                               lora=dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"],
                                         use_rslora=True)),
}


def llama_config(cfg):
    """A LlamaConfig from our dict, for transformers 4 (rope_theta/rope_scaling) or 5 (rope_parameters)."""
    cfg = dict(cfg)
    scaling = cfg.pop("rope_scaling", None)
    theta = cfg.pop("rope_theta")
    if int(transformers.__version__.split(".")[0]) >= 5:
        params = dict(rope_type="default", rope_theta=theta) if scaling is None else dict(scaling, rope_theta=theta)
        config = LlamaConfig(**cfg, rope_parameters=params, attn_implementation="eager")
    else:
        config = LlamaConfig(**cfg, rope_theta=theta, rope_scaling=scaling, attn_implementation="eager")
    config.attention_dropout = 0.0
    return config


def build_base(name):
    spec = BASES[name]
    torch.manual_seed(spec["seed"])
    model = LlamaForCausalLM(llama_config(spec["config"])).float()
    gen = torch.Generator().manual_seed(spec["seed"] + 1)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if pname.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=gen))
            elif "embed_tokens" in pname:
                p.copy_(0.2 * torch.randn(p.shape, generator=gen))
            else:  # Linear weight [out, in]
                p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(p.shape[1]))
    if spec["config"]["tie_word_embeddings"]:
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr(), "lm_head not tied"
    model.eval()  # no dropout anywhere (attention_dropout is 0 anyway); gradients still flow
    return model


def make_inputs(vocab_size, T, seed):
    gen = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, vocab_size, (B, T), generator=gen, dtype=torch.int64)
    labels = input_ids.clone()
    labels[0, :7] = -100  # a prompt
    labels[1, :4] = -100  # a shorter prompt
    labels[1, 10] = -100  # scattered ignored positions
    labels[1, 15] = -100
    labels[1, T - 2:] = -100  # a padded tail
    return input_ids, labels


def adapter_key(param_name):
    """PEFT's in-memory name -> the key in adapter_model.safetensors (the adapter name is dropped)."""
    return param_name.replace(".lora_A.default.", ".lora_A.").replace(".lora_B.default.", ".lora_B.")


def compute(model, input_ids, labels):
    model.zero_grad(set_to_none=True)
    out = model(input_ids=input_ids, labels=labels)
    out.loss.backward()
    return out


def make_case(case_name, spec, out_root):
    out_dir = os.path.join(out_root, case_name)
    if os.path.isdir(out_dir):
        shutil.rmtree(out_dir)
    os.makedirs(out_dir)

    model = build_base(spec["base"])
    config = model.config
    T = spec["T"]
    assert T <= config.max_position_embeddings
    model.save_pretrained(out_dir, safe_serialization=True)
    input_ids, labels = make_inputs(config.vocab_size, T, seed=hash_seed(case_name))

    metadata = {
        "case": case_name,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "B": str(B),
        "T": str(T),
        "loss": "HF LlamaForCausalLM(input_ids, labels).loss: shifted next-token CE, ignore -100, mean",
    }

    lora = spec["lora"]
    if lora is None:
        for p in model.parameters():
            p.requires_grad_(True)
        trainable = {name: p for name, p in model.named_parameters()}  # tied lm_head appears once
        net = model
    else:
        lcfg = LoraConfig(r=lora["r"], lora_alpha=lora["lora_alpha"], target_modules=lora["target_modules"],
                          lora_dropout=0.0, use_rslora=lora["use_rslora"], bias="none", task_type="CAUSAL_LM")
        torch.manual_seed(BASES[spec["base"]]["seed"] + 2)
        net = get_peft_model(model, lcfg)
        gen = torch.Generator().manual_seed(BASES[spec["base"]]["seed"] + 3)
        with torch.no_grad():
            for name, p in net.named_parameters():
                if ".lora_B." in name:  # PEFT's zero init would make dA == 0: use small random values
                    p.copy_(0.1 * torch.randn(p.shape, generator=gen))
        trainable = {adapter_key(name): p for name, p in net.named_parameters() if p.requires_grad}
        assert all(".lora_A." in n or ".lora_B." in n for n in trainable), sorted(trainable)
        net.save_pretrained(out_dir, safe_serialization=True)
        readme = os.path.join(out_dir, "README.md")
        if os.path.exists(readme):
            os.remove(readme)
        saved = set(load_file(os.path.join(out_dir, "adapter_model.safetensors")).keys())
        assert saved == set(trainable), (sorted(saved ^ set(trainable)))
        scaling = lora["lora_alpha"] / (math.sqrt(lora["r"]) if lora["use_rslora"] else lora["r"])
        metadata["lora_scaling"] = repr(scaling)
        metadata["lora_b_init"] = "0.1 * N(0, 1) (not PEFT's zeros, so that dA != 0)"

    net.eval()
    out = compute(net, input_ids, labels)
    expected = {
        "loss": out.loss.detach().reshape(1).contiguous(),
        "logits": out.logits.detach().float().contiguous(),
        "rope_inv_freq": model.model.rotary_emb.inv_freq.detach().float().contiguous(),
    }
    for name, p in trainable.items():
        assert p.grad is not None, f"{case_name}: no gradient for {name}"
        assert p.grad.abs().max().item() > 0, f"{case_name}: zero gradient for {name}"
        expected["grad." + name] = p.grad.detach().contiguous()
    save_file(expected, os.path.join(out_dir, "expected.safetensors"),
              metadata={"fixture": json.dumps(metadata, sort_keys=True)})
    save_file({"input_ids": input_ids.to(torch.int32).contiguous(), "labels": labels.to(torch.int32).contiguous()},
              os.path.join(out_dir, "inputs.safetensors"))

    check_reload(out_dir, lora is not None, input_ids, labels, out.loss.item(), out.logits.detach())
    n_counted = int((labels[:, 1:] != -100).sum())
    print(f"{case_name}: loss {out.loss.item():.6f} over {n_counted} tokens, {len(trainable)} trainable tensors, "
          f"{dir_size(out_dir) / 1024:.0f} KiB")


def check_reload(out_dir, is_lora, input_ids, labels, loss, logits):
    """The saved files alone reproduce the loss (catches anything save_pretrained drops)."""
    # The base alone from a directory without adapter files (transformers would otherwise attach
    # the adapter itself), then PEFT's loader for the adapter.
    with tempfile.TemporaryDirectory() as base_dir:
        for f in ("config.json", "model.safetensors"):
            shutil.copy(os.path.join(out_dir, f), base_dir)
        model = LlamaForCausalLM.from_pretrained(base_dir, attn_implementation="eager").float()
    if is_lora:
        model = PeftModel.from_pretrained(model, out_dir)
    model.eval()
    with torch.no_grad():
        out = model(input_ids=input_ids, labels=labels)
    assert abs(out.loss.item() - loss) <= 1e-6 * max(1.0, abs(loss)), (out.loss.item(), loss)
    assert torch.allclose(out.logits, logits, rtol=0, atol=1e-5), (out.logits - logits).abs().max()


def hash_seed(text):
    return sum((i + 1) * ord(c) for i, c in enumerate(text)) % (2**31)


def dir_size(path):
    return sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path))


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.path.join(here, "..", "tests", "fixtures", "hf"))
    parser.add_argument("--case", action="append", choices=sorted(CASES), help="only these cases")
    args = parser.parse_args()
    torch.use_deterministic_algorithms(True)
    transformers.logging.set_verbosity_error()
    os.makedirs(args.out, exist_ok=True)
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}",
          file=sys.stderr)
    for name in args.case or CASES:
        make_case(name, CASES[name], args.out)
    total = sum(dir_size(os.path.join(args.out, d)) for d in os.listdir(args.out)
                if os.path.isdir(os.path.join(args.out, d)))
    print(f"total {total / 1024:.0f} KiB in {os.path.abspath(args.out)}")


if __name__ == "__main__":
    main()
