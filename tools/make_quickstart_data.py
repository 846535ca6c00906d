#!/usr/bin/env python3
"""Writes the quickstart SFT task: two-digit addition in prompt/completion JSONL.

    {"prompt": "07+58=", "completion": "65"}

Every pair of operands 00..99 appears exactly once (10,000 prompts); a seeded shuffle holds out
500 of them as eval.jsonl and the other 9,500 are train.jsonl, so no eval prompt is ever trained
on and the model must learn to add rather than memorize. Operands are zero-padded to two digits
so each digit sits at a fixed offset from the start, which a tiny byte-level Llama trained from
scratch picks up in a few minutes on a CPU; the answer is written plainly (0..198).

The output is deterministic (Python's seeded random.shuffle is stable across versions and
platforms) and the generated files are committed; re-running this script reproduces them
byte for byte.

    python3 tools/make_quickstart_data.py            # -> jobs/data/quickstart/{train,eval}.jsonl
"""
import argparse
import json
import pathlib
import random

REPO = pathlib.Path(__file__).resolve().parent.parent


def records():
    for a in range(100):
        for b in range(100):
            yield {"prompt": f"{a:02d}+{b:02d}=", "completion": str(a + b)}


def write_jsonl(path, rows):
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out-dir", type=pathlib.Path, default=REPO / "jobs/data/quickstart")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--n-eval", type=int, default=500)
    args = parser.parse_args()

    rows = list(records())
    random.Random(args.seed).shuffle(rows)
    eval_rows, train_rows = rows[: args.n_eval], rows[args.n_eval :]
    assert not {r["prompt"] for r in eval_rows} & {r["prompt"] for r in train_rows}

    args.out_dir.mkdir(parents=True, exist_ok=True)
    write_jsonl(args.out_dir / "train.jsonl", train_rows)
    write_jsonl(args.out_dir / "eval.jsonl", eval_rows)
    print(f"wrote {len(train_rows)} train and {len(eval_rows)} eval records to {args.out_dir}")


if __name__ == "__main__":
    main()
