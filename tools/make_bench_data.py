#!/usr/bin/env python3
"""Synthetic text for throughput runs (jobs/configs/llama1b_*.yaml): random words, one record per
line, enough bytes for the byte tokenizer to pack many 2048-token rows. Deterministic (seeded)."""
import argparse
import json
import os
import random

WORDS = ("the of and to in is was for on that with as by at from his her an were are which this be or "
         "had not but one all their they there been has when who will more if no out so said what up its "
         "about into than them can only other new some could time these two may then first any like now").split()


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default="jobs/data/bench/train.jsonl")
    ap.add_argument("--megabytes", type=float, default=8.0)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    rng = random.Random(args.seed)
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    target = int(args.megabytes * 1e6)
    written = 0
    with open(args.out, "w") as f:
        while written < target:
            text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(200, 600)))
            line = json.dumps({"text": text})
            f.write(line + "\n")
            written += len(text)
    print(f"wrote {args.out}: {written / 1e6:.1f} MB of text")


if __name__ == "__main__":
    main()
