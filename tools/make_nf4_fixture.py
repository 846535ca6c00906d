#!/usr/bin/env python3
"""Build tests/fixtures/nf4/bnb_nf4.safetensors with real bitsandbytes: NF4 weights in the layout a
bnb-4bit checkpoint has on disk, plus the inputs they were made from and bnb's own dequantization.

Each case quantizes a random matrix with bitsandbytes.nn.Linear4bit (quant_type "nf4", uint8
storage, blocksize 64) on the CPU and stores the module's state_dict under an HF-style prefix, i.e.
exactly the entries model.save_pretrained() writes for a bnb-4bit model:

  <prefix>.weight                                   U8 [ceil(numel/2), 1]  packed 4-bit codes
  <prefix>.weight.absmax                            U8 [n_blocks] (double quantization) or F32
  <prefix>.weight.quant_map                         F32 [16]   the NF4 table
  <prefix>.weight.nested_absmax                     F32 [ceil(n_blocks/256)]      (double quant.)
  <prefix>.weight.nested_quant_map                  F32 [256]  create_dynamic_map(signed=True)
  <prefix>.weight.quant_state.bitsandbytes__nf4     U8 JSON: quant_type, blocksize, dtype, shape,
                                                    nested_blocksize, nested_dtype, nested_offset

and beside it, for the test:

  <prefix>.original      the matrix before quantization (F32 or BF16, the dtype bnb was given)
  <prefix>.dequantized   bitsandbytes.functional.dequantize_4bit(weight, quant_state), in that dtype

Cases:
  fp32_nested   F32 [64, 260], compress_statistics=True: 260 blocks, so two nested blocks, the
                second one of 4 absmax values
  bf16_odd      BF16 [33, 65], compress_statistics=True: 2145 elements, a partial last block of 33
                and an odd count (the last byte's low nibble is padding)
  fp32_plain    F32 [8, 128], compress_statistics=False: F32 absmax, no nested entries

__metadata__ has one key, "fixture": a JSON object with the torch and bitsandbytes versions.

Everything runs on the CPU (bitsandbytes quantizes there too). Its 4-bit CPU path has the same
rules as its CUDA kernel (block absmax, scaling by the fp32 reciprocal, the fp32 midpoints of the
NF4 table as thresholds, ties down). Two things differ from a checkpoint quantized on a GPU, and
tests/test_nf4.cpp allows for exactly these: the offset is torch's fp32 mean of the absmax values
(one ulp from the exactly rounded mean ranktune takes), and bnb's CPU 8-bit quantizer, used for the
nested absmax, can pick the farther map entry for a value within ~1e-5 of a midpoint (the CUDA
kernel picks the nearer, as ranktune does). Regenerate with:

    pip install torch bitsandbytes safetensors     # used: torch 2.15, bitsandbytes 0.50.2
    python3 tools/make_nf4_fixture.py              # writes tests/fixtures/nf4/bnb_nf4.safetensors
"""

import argparse
import json
import os

import torch

import bitsandbytes as bnb
import bitsandbytes.functional as bnb_functional
from safetensors.torch import save_file

CASES = [
    # name, prefix, shape, dtype, compress_statistics, seed
    ("fp32_nested", "model.layers.0.mlp.down_proj", (64, 260), torch.float32, True, 1),
    ("bf16_odd", "model.layers.1.self_attn.q_proj", (33, 65), torch.bfloat16, True, 2),
    ("fp32_plain", "model.layers.1.self_attn.o_proj", (8, 128), torch.float32, False, 3),
]


def quantize_case(prefix, shape, dtype, compress_statistics, seed):
    gen = torch.Generator().manual_seed(seed)
    # Weight-like values with a few outliers, so blocks have different absmax values.
    original = torch.randn(shape, generator=gen) * 0.05
    outliers = torch.rand(shape, generator=gen) < 0.01
    original[outliers] *= 8.0
    original = original.to(dtype)

    out_features, in_features = shape
    linear = bnb.nn.Linear4bit(in_features, out_features, bias=False, compute_dtype=dtype,
                               compress_statistics=compress_statistics, quant_type="nf4",
                               quant_storage=torch.uint8)
    linear.weight = bnb.nn.Params4bit(original.clone(), requires_grad=False,
                                      compress_statistics=compress_statistics, quant_type="nf4",
                                      quant_storage=torch.uint8)
    linear = linear.to("cpu")  # quantizes
    weight = linear.weight
    assert weight.bnb_quantized and weight.dtype == torch.uint8

    tensors = {f"{prefix}.{k}": v.detach().clone().contiguous()
               for k, v in linear.state_dict().items()}
    dequantized = bnb_functional.dequantize_4bit(weight.data, weight.quant_state)
    assert dequantized.dtype == dtype and tuple(dequantized.shape) == shape
    tensors[f"{prefix}.original"] = original.contiguous()
    tensors[f"{prefix}.dequantized"] = dequantized.contiguous()
    return tensors


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.path.join(here, "..", "tests", "fixtures", "nf4",
                                                      "bnb_nf4.safetensors"))
    args = parser.parse_args()

    tensors = {}
    for _name, prefix, shape, dtype, compress_statistics, seed in CASES:
        tensors.update(quantize_case(prefix, shape, dtype, compress_statistics, seed))
    meta = {"torch": torch.__version__.split("+")[0], "bitsandbytes": bnb.__version__,
            "cases": [{"name": n, "prefix": p, "shape": list(s), "dtype": str(d).split(".")[-1],
                       "compress_statistics": c} for n, p, s, d, c, _ in CASES]}
    args.out = os.path.normpath(args.out)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    save_file(tensors, args.out, metadata={"fixture": json.dumps(meta, sort_keys=True)})
    print(f"wrote {args.out} ({os.path.getsize(args.out)} bytes, {len(tensors)} tensors)")


if __name__ == "__main__":
    main()
