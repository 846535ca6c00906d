#!/usr/bin/env python3
"""Draws a run's loss and throughput curves from output_dir/metrics.jsonl to a PNG.

usage: tools/plot_metrics.py RUN_DIR_OR_METRICS_JSONL [more ...] [-o curves.png]

Several runs are drawn on the same axes (labelled by their directory), e.g. to compare a CPU and a
GPU run or two learning rates. Needs matplotlib (Debian: python3-matplotlib).
"""
import argparse
import json
import os
import sys


def load(path):
    if os.path.isdir(path):
        path = os.path.join(path, "metrics.jsonl")
    rows = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                sys.exit(f"{path}:{n}: not a JSON line ({e}); is this a ranktune metrics.jsonl?")
    if not rows:
        sys.exit(f"{path}: no metrics (the run logged nothing yet)")
    return path, rows


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", help="run directories or metrics.jsonl files")
    ap.add_argument("-o", "--output", default="curves.png", help="PNG to write (default curves.png)")
    args = ap.parse_args()
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        sys.exit("plot_metrics needs matplotlib: apt-get install python3-matplotlib (or pip install matplotlib)")

    fig, (ax_loss, ax_tput) = plt.subplots(1, 2, figsize=(11, 4))
    for run in args.runs:
        path, rows = load(run)
        label = os.path.basename(os.path.dirname(os.path.abspath(path))) or path
        steps = [r["step"] for r in rows]
        ax_loss.plot(steps, [r["loss"] for r in rows], label=f"{label} train")
        ev = [(r["step"], r["eval_loss"]) for r in rows if "eval_loss" in r]
        if ev:
            ax_loss.plot([s for s, _ in ev], [v for _, v in ev], "o--", label=f"{label} eval")
        ax_tput.plot(steps, [r["tokens_per_s"] for r in rows], label=label)
    ax_loss.set_xlabel("step")
    ax_loss.set_ylabel("loss")
    ax_loss.set_yscale("log")
    ax_loss.set_title("loss")
    ax_loss.legend()
    ax_tput.set_xlabel("step")
    ax_tput.set_ylabel("tokens/s")
    ax_tput.set_title("throughput")
    ax_tput.legend()
    fig.tight_layout()
    fig.savefig(args.output, dpi=110)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
