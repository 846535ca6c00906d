#!/usr/bin/env python3
"""End to end: train with ranktune, export, and load the exports in HF transformers / PEFT.

For each case (tied and untied embeddings, plain LoRA and rsLoRA on a subset of projections):

  1. a small random LlamaForCausalLM (float32) is saved with save_pretrained into OUT/<case>/base;
  2. `ranktune train` LoRA-fine-tunes it for a few steps on generated JSONL text (the byte tokenizer:
     the base directory has no tokenizer.json) so that every lora_B is non-zero;
  3. `ranktune export --format peft` and `--format merged` write OUT/<case>/adapter and .../merged;
  4. HF computes fp32 logits on one fixed batch of token ids for: the base model, the base with the
     adapter (peft.PeftModel.from_pretrained) and the merged model (AutoModelForCausalLM);
  5. ranktune_dump_logits computes ranktune's logits on the same ids, on --device, for the base,
     the base with the exported adapter, and the merged directory;
  6. the merged model.safetensors is compared tensor by tensor with W + scaling * B A computed here
     in double from the base and the exported adapter, and with PEFT's merge_and_unload.

It prints one table per case (max |a - b| and relative L2 ||a - b|| / ||b|| of the logits, and the
loss of each side) and exits 1 when a difference exceeds its tolerance:
  ranktune vs HF on the same weights: 1e-4 on the CPU (fp32 everywhere); 5e-2 on a GPU, where
    ranktune computes in bf16 (the tolerance of tests/gpu_model.cpp against the HF fixtures);
  anything against the merged model, whose weights are bf16, next to fp32 weights: 3e-2 (5e-2 on
    a GPU);
  merged weights: equal bit for bit to the double-precision merge rounded to bf16.
The adapter's effect (HF with the adapter vs HF's base model) is printed as well and must be well
above the tolerances, or the check would prove nothing.

Everything is local (no hub access). Needs torch, transformers, peft and safetensors, and a built
ranktune with the ranktune_dump_logits tool:

    python3 tools/check_export_hf.py --device cpu                    # about a minute on 2 cores
    python3 tools/check_export_hf.py --device cuda:0 \\
        --ranktune-bin build-device/ranktune --dump-bin build-device/ranktune_dump_logits

Exit codes: 0 all within tolerance, 1 a difference too large, 2 a command failed, 77 torch,
transformers or peft cannot be imported (ctest counts 77 as skipped).
"""

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything is local: never ask the hub
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SKIP = 77

try:
    import torch
    import peft
    import transformers
    from peft import PeftModel
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM
except ImportError as e:  # the ctest treats this as "skipped"
    print(f"check_export_hf: skipped: {e} (pip install torch transformers peft safetensors)")
    sys.exit(SKIP)

transformers.utils.logging.disable_progress_bar()
warnings.filterwarnings("ignore", category=FutureWarning)

ALL_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

CASES = {
    "tied_lora": dict(
        seed=11,
        config=dict(vocab_size=512, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                    num_attention_heads=8, num_key_value_heads=2, tie_word_embeddings=True,
                    max_position_embeddings=256, rms_norm_eps=1e-5, rope_theta=10000.0),
        lora=dict(r=8, lora_alpha=16, target_modules=ALL_MODULES, use_rslora=False, lora_dropout=0.05),
    ),
    "untied_rslora_subset": dict(
        seed=22,
        config=dict(vocab_size=512, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                    num_attention_heads=8, num_key_value_heads=2, tie_word_embeddings=False,
                    max_position_embeddings=256, rms_norm_eps=1e-6, rope_theta=500000.0),
        lora=dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], use_rslora=True,
                  lora_dropout=0.0),
    ),
}

BATCH, SEQ = 2, 64      # the compared batch of token ids
TRAIN_STEPS = 30


def make_base(case, out_dir):
    """A random HF Llama saved with save_pretrained (fp32). Weights are re-drawn so that logits are
    O(1) and attention is far from uniform: HF's default init (std 0.02) would hide most mistakes."""
    torch.manual_seed(case["seed"])
    config = LlamaConfig(**case["config"])
    model = LlamaForCausalLM(config).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.2 * torch.randn_like(p))
            elif "embed_tokens" in name:
                p.normal_(0, 0.2)
            else:
                p.normal_(0, p.shape[1] ** -0.5)
    model.save_pretrained(out_dir, safe_serialization=True)


def write_run(case, case_dir, device):
    """The ranktune run config (absolute paths) and its generated training data."""
    rng = torch.Generator().manual_seed(case["seed"])
    words = ["".join(chr(97 + int(c)) for c in torch.randint(0, 26, (int(n),), generator=rng))
             for n in torch.randint(2, 7, (64,), generator=rng)]
    with open(os.path.join(case_dir, "train.jsonl"), "w") as f:
        for _ in range(256):
            picks = torch.randint(0, len(words), (12,), generator=rng)
            f.write(json.dumps({"text": " ".join(words[int(i)] for i in picks)}) + "\n")
    lora = case["lora"]
    config = f"""model:
  name_or_path: {case_dir}/base
  tokenizer: byte
  max_seq_length: 64
  gradient_checkpointing: false
  device_map: {"cpu" if device == "cpu" else device}
lora:
  enabled: true
  r: {lora["r"]}
  lora_alpha: {lora["lora_alpha"]}
  lora_dropout: {lora["lora_dropout"]}
  target_modules: [{", ".join(lora["target_modules"])}]
  use_rslora: {str(lora["use_rslora"]).lower()}
data:
  train_file: {case_dir}/train.jsonl
  format: text
training:
  output_dir: {case_dir}/run
  per_device_train_batch_size: 8
  learning_rate: 5.0e-3
  lr_scheduler_type: constant
  max_steps: {TRAIN_STEPS}
  seed: {case["seed"]}
logging:
  logging_steps: 10
  progress_bar: false
"""
    path = os.path.join(case_dir, "run.yaml")
    with open(path, "w") as f:
        f.write(config)
    return path


def run(cmd, log_path):
    """Runs a command, its output appended to log_path; exits 2 with the log's tail on failure."""
    with open(log_path, "a") as log:
        log.write("$ " + " ".join(cmd) + "\n")
        log.flush()
        rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT).returncode
    if rc != 0:
        with open(log_path) as log:
            tail = log.read()[-3000:]
        print(f"check_export_hf: `{' '.join(cmd)}` exited with {rc}; the end of {log_path}:\n{tail}")
        sys.exit(2)


def hf_logits(model, ids):
    with torch.no_grad():
        out = model(input_ids=ids.long(), labels=ids.long())
    return out.logits.float(), float(out.loss)


def diff(a, b):
    """Max absolute and relative L2 difference of a against the reference b (double)."""
    a, b = a.double(), b.double()
    return float((a - b).abs().max()), float((a - b).norm() / b.norm())


def reference_merge(base_dir, adapter_dir):
    """The merged weights as the export should write them, from the files alone: W + scaling * B A
    in double for every LoRA target (scaling from adapter_config.json), rounded to float and then
    to bf16 (round to nearest even), the base weight rounded for every other tensor."""
    with open(os.path.join(adapter_dir, "adapter_config.json")) as f:
        config = json.load(f)
    scaling = config["lora_alpha"] / (math.sqrt(config["r"]) if config.get("use_rslora") else config["r"])
    adapter = load_file(os.path.join(adapter_dir, "adapter_model.safetensors"))
    merged = {}
    for name, weight in load_file(os.path.join(base_dir, "model.safetensors")).items():
        key = "base_model.model." + name.removesuffix(".weight")
        weight = weight.double()
        if key + ".lora_A.weight" in adapter:
            weight = weight + scaling * (adapter[key + ".lora_B.weight"].double() @ adapter[key + ".lora_A.weight"].double())
        merged[name] = weight.float().to(torch.bfloat16)
    return merged


def check_case(name, case, args, tol_same, tol_bf16):
    case_dir = os.path.abspath(os.path.join(args.out, name))
    shutil.rmtree(case_dir, ignore_errors=True)
    os.makedirs(case_dir)
    log = os.path.join(case_dir, "log.txt")
    base_dir, adapter_dir, merged_dir = (os.path.join(case_dir, d) for d in ("base", "adapter", "merged"))

    t0 = time.time()
    make_base(case, base_dir)
    config = write_run(case, case_dir, args.device)
    run([args.ranktune_bin, "train", config], log)
    run([args.ranktune_bin, "export", config, "--format", "peft", "--output", adapter_dir], log)
    run([args.ranktune_bin, "export", config, "--format", "merged", "--output", merged_dir], log)
    t_train = time.time() - t0

    # The compared batch: fixed ids over the whole vocabulary (not only the byte tokenizer's).
    ids = torch.randint(0, case["config"]["vocab_size"], (BATCH, SEQ), generator=torch.Generator().manual_seed(7),
                        dtype=torch.int32)
    tokens = os.path.join(case_dir, "tokens.safetensors")
    save_file({"input_ids": ids}, tokens)

    ours = {}
    for key, model_dir, adapter in (("base", base_dir, None), ("adapter", base_dir, adapter_dir),
                                    ("merged", merged_dir, None)):
        out = os.path.join(case_dir, f"ranktune_{key}.safetensors")
        cmd = [args.dump_bin, "--model", model_dir, "--device", args.device, "--tokens", tokens, "--out", out]
        if adapter:
            cmd += ["--adapter", adapter]
        run(cmd, log)
        t = load_file(out)
        ours[key] = (t["logits"], float(t["loss"][0]))

    # HF: eager attention in fp32 on the CPU, the reference.
    dtype_key = "dtype" if tuple(int(x) for x in transformers.__version__.split(".")[:2]) >= (4, 56) else "torch_dtype"
    load = {dtype_key: torch.float32, "attn_implementation": "eager"}
    hf = {}
    base = LlamaForCausalLM.from_pretrained(base_dir, **load).eval()
    hf["base"] = hf_logits(base, ids)
    with_adapter = PeftModel.from_pretrained(base, adapter_dir).eval()
    hf["adapter"] = hf_logits(with_adapter, ids)
    merged = AutoModelForCausalLM.from_pretrained(merged_dir, **load).eval()
    hf["merged"] = hf_logits(merged, ids)

    # The merge itself, tensor by tensor: our merged model.safetensors against the merge computed
    # here from the base and the exported adapter (must be equal bit for bit), and against PEFT's
    # merge_and_unload (fp32 arithmetic, so a few weights near a bf16 rounding midpoint round the
    # other way: for information).
    exported = load_file(os.path.join(merged_dir, "model.safetensors"))
    expected = reference_merge(base_dir, adapter_dir)
    peft_merged = {k: v.detach().to(torch.bfloat16) for k, v in with_adapter.merge_and_unload().state_dict().items()}
    missing = sorted(set(expected) ^ set(exported))
    common = [k for k in exported if k in expected]
    wrong_dtype = [k for k in exported if exported[k].dtype != torch.bfloat16]
    n_total = sum(exported[k].numel() for k in common)
    n_wrong = sum(int((exported[k] != expected[k]).sum()) for k in common)
    n_peft = sum(int((exported[k] != peft_merged[k]).sum()) for k in common)

    # Rows: (what, a, reference b, tolerance)
    rows = [
        ("ranktune base      vs HF base", ours["base"], hf["base"], tol_same),
        ("ranktune +adapter  vs HF PEFT", ours["adapter"], hf["adapter"], tol_same),
        ("ranktune merged    vs HF merged", ours["merged"], hf["merged"], tol_same),
        ("ranktune +adapter  vs HF merged", ours["adapter"], hf["merged"], tol_bf16),
        ("HF merged          vs HF PEFT", hf["merged"], hf["adapter"], tol_bf16),
    ]
    effect = diff(hf["adapter"][0], hf["base"][0])
    print(f"\n{name}: {case['config']['num_hidden_layers']} layers, hidden {case['config']['hidden_size']}, "
          f"vocab {case['config']['vocab_size']}, tied {case['config']['tie_word_embeddings']}, LoRA r={case['lora']['r']} "
          f"alpha={case['lora']['lora_alpha']} rslora={case['lora']['use_rslora']} on {', '.join(case['lora']['target_modules'])}; "
          f"{TRAIN_STEPS} steps on {args.device} ({t_train:.0f} s); logits [{BATCH}, {SEQ}, {case['config']['vocab_size']}]")
    print(f"  {'comparison':34s} {'max |diff|':>11s} {'rel L2':>10s} {'tolerance':>10s} {'loss a':>9s} {'loss b':>9s}")
    failures = []
    # ranktune against HF, on the same weights and against the bf16 merged model: the largest
    # max |diff|, its rel L2 and where.
    largest = {"same": (0.0, 0.0, ""), "merged": (0.0, 0.0, "")}
    for what, (a, loss_a), (b, loss_b), tol in rows:
        max_abs, rel = diff(a, b)
        ok = rel <= tol
        kind = "same" if tol == tol_same else "merged"
        if what.startswith("ranktune") and max_abs > largest[kind][0]:
            largest[kind] = (max_abs, rel, f"{name}, {' '.join(what.split())}")
        print(f"  {what:34s} {max_abs:11.3e} {rel:10.3e} {tol:10.1e} {loss_a:9.5f} {loss_b:9.5f}{'' if ok else '  FAIL'}")
        if not ok:
            failures.append(what)
    print(f"  {'adapter effect: HF PEFT vs HF base':34s} {effect[0]:11.3e} {effect[1]:10.3e} {'> ' + format(10 * tol_bf16, '.0e'):>10s}")
    if effect[1] <= 10 * tol_bf16:
        failures.append("adapter effect too small to tell a wrong export from a right one")
    print(f"  merged model.safetensors: {n_wrong} of {n_total} bf16 weights differ from W + scaling * B A (double, rounded); "
          f"{n_peft} from PEFT's merge_and_unload (fp32, rounded)"
          + (f"; tensors in only one of them: {missing}" if missing else "")
          + (f"; not bf16: {wrong_dtype}" if wrong_dtype else ""))
    if n_wrong or missing or wrong_dtype:
        failures.append("merged weights")
    return failures, largest


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ranktune-bin", default=os.path.join(REPO, "build", "ranktune"))
    p.add_argument("--dump-bin", default=None, help="default: ranktune_dump_logits beside --ranktune-bin")
    p.add_argument("--device", default="cpu", help="cpu or cuda:N: where ranktune trains and computes its logits")
    p.add_argument("--out", default=None, help="directory for the models, exports and logs (default: a temporary one)")
    p.add_argument("--cases", default=",".join(CASES), help="comma-separated, from: " + ", ".join(CASES))
    args = p.parse_args()
    args.ranktune_bin = os.path.abspath(args.ranktune_bin)
    args.dump_bin = os.path.abspath(args.dump_bin or os.path.join(os.path.dirname(args.ranktune_bin), "ranktune_dump_logits"))
    for binary in (args.ranktune_bin, args.dump_bin):
        if not os.access(binary, os.X_OK):
            print(f"check_export_hf: {binary} is not an executable: build it, or pass --ranktune-bin / --dump-bin")
            return 2
    temporary = args.out is None
    args.out = args.out or tempfile.mkdtemp(prefix="check_export_hf.")
    torch.set_num_threads(max(1, min(torch.get_num_threads(), os.cpu_count() or 1)))

    # On a GPU ranktune computes in bf16 (weights and activations, fp32 accumulation): the GPU
    # tests' tolerance against HF (tests/gpu_model.cpp) then holds for every row.
    gpu = args.device != "cpu"
    tol_same = 5e-2 if gpu else 1e-4
    tol_bf16 = 5e-2 if gpu else 3e-2
    print(f"check_export_hf: torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}; "
          f"ranktune on {args.device}; logs and files in {args.out}")
    failures, largest = [], {"same": (0.0, 0.0, ""), "merged": (0.0, 0.0, "")}
    for name in args.cases.split(","):
        case_failures, case_largest = check_case(name, CASES[name], args, tol_same, tol_bf16)
        failures += [f"{name}: {f}" for f in case_failures]
        largest = {k: max(largest[k], case_largest[k]) for k in largest}
    print(f"\nlargest logit difference, ranktune on {args.device} vs HF fp32:")
    for kind, what in (("same", "on the same weights"), ("merged", "against the bf16 merged model")):
        print(f"  {what:30s} max |diff| {largest[kind][0]:.3e}, rel L2 {largest[kind][1]:.3e} ({largest[kind][2]})")
    if temporary and not failures:
        shutil.rmtree(args.out, ignore_errors=True)
    if failures:
        print("\nFAILED: " + "; ".join(failures))
        return 1
    print("\nall within tolerance")
    return 0


if __name__ == "__main__":
    sys.exit(main())
