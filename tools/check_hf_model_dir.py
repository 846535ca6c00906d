#!/usr/bin/env python3
"""A Llama-3.2-1B-shaped HF model directory as users download it -- config.json and sharded
model-0000k-of-0000n.safetensors with model.safetensors.index.json, bf16, written by transformers'
save_pretrained from random weights -- loaded by ranktune (tools/dump_logits.cpp) and compared with
HF transformers on the same token ids: loss and logits. Needs torch and transformers (the GPU
machine has them). Prints one JSON line; exits 1 when the differences exceed bf16 tolerance.

  python3 tools/check_hf_model_dir.py --dump-bin build-device/ranktune_dump_logits --device cuda:0
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dump-bin", default="build/ranktune_dump_logits")
    ap.add_argument("--device", default="cuda:0")
    ap.add_argument("--out", default=None, help="directory for the model and outputs (default: a temp dir)")
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--shard", default="700MB", help="save_pretrained's max_shard_size")
    args = ap.parse_args()
    try:
        import torch
        from safetensors.torch import load_file, save_file
        from transformers import LlamaConfig, LlamaForCausalLM
    except ImportError as e:
        print(f"check_hf_model_dir: needs torch, transformers and safetensors ({e})", file=sys.stderr)
        return 77
    out = args.out or tempfile.mkdtemp(prefix="ranktune_hf_dir_")
    model_dir = os.path.join(out, "llama-3.2-1b-shape")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=args.layers,
                      num_attention_heads=32, num_key_value_heads=8, head_dim=64, rms_norm_eps=1e-5,
                      rope_theta=500000.0, max_position_embeddings=131072, tie_word_embeddings=True,
                      rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                    "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
                      torch_dtype="bfloat16")
    model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    model.save_pretrained(model_dir, max_shard_size=args.shard, safe_serialization=True)
    shards = sorted(f for f in os.listdir(model_dir) if f.endswith(".safetensors"))
    del model
    ids = torch.randint(0, cfg.vocab_size, (1, args.seq), generator=torch.Generator().manual_seed(1))
    tokens = os.path.join(out, "tokens.safetensors")
    save_file({"input_ids": ids.to(torch.int32).contiguous()}, tokens)

    # HF: the saved bf16 weights in fp32, fp32 math.
    ref = LlamaForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32, attn_implementation="eager")
    dev = args.device if args.device.startswith("cuda") and torch.cuda.is_available() else "cpu"
    ref = ref.to(dev).eval()
    with torch.no_grad():
        o = ref(ids.to(dev), labels=ids.to(dev))
    hf_logits, hf_loss = o.logits[0].float().cpu(), float(o.loss)
    del ref, o

    dump = os.path.join(out, "ranktune.safetensors")
    t0 = time.time()
    r = subprocess.run([args.dump_bin, "--model", model_dir, "--device", args.device, "--tokens", tokens, "--out", dump],
                       capture_output=True, text=True)
    if r.returncode != 0:
        print(r.stdout + r.stderr, file=sys.stderr)
        return 2
    got = load_file(dump)
    rt_logits, rt_loss = got["logits"][0].float(), float(got["loss"][0])
    rel_l2 = float((rt_logits - hf_logits).norm() / hf_logits.norm())
    result = {"model_dir": model_dir, "shards": len(shards), "index": os.path.exists(os.path.join(model_dir, "model.safetensors.index.json")),
              "seq": args.seq, "device": args.device, "hf_loss_fp32": hf_loss, "ranktune_loss": rt_loss,
              "loss_rel_diff": abs(rt_loss - hf_loss) / abs(hf_loss), "logits_rel_l2": rel_l2,
              "logits_max_abs_diff": float((rt_logits - hf_logits).abs().max()), "ranktune_load_and_forward_s": time.time() - t0}
    print(json.dumps(result))
    ok = result["loss_rel_diff"] < 2e-2 and rel_l2 < 5e-2 and result["shards"] > 1 and result["index"]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
