#!/usr/bin/env python3
"""ranktune against the HF peer, back to back on one GPU machine, as one table (issue #8).

usage: tools/benchmark.py [--build-dir build-device] [--workloads a,b,c,d,e] [--steps 10]
                          [--warmup 3] [--skip-hf] [--out DIR] [--timeout S] [--profile a,c]
       tools/benchmark.py --from-results DIR/results.jsonl     (re-render a saved run's table)

Runs, in this order: the bf16 GEMM probe (`ranktune_bench_step gemm`: cuBLASLt TFLOP/s through
Backend::matmul, the MFU denominator of this run); then for each workload ranktune_bench_step and
tools/hf_peer_baseline.py (HF transformers + PEFT) with the same model shape, batch and sequence
length; then `--profile 1` runs of (a) and (c) for the op-by-op table (separate runs, so the event
overhead does not touch the throughput figures). Prints one markdown report and writes to --out:
results.jsonl (one line per run: workload, peer, command, exit code, wall seconds, the run's JSON
line or its error), report.md (what was printed) and logs/ (each run's stdout and stderr).

Workloads, Llama-3.2-1B shape with random weights, batch 2 x 2048 per GPU:
  a  LoRA r=16 on all seven projections, gradient checkpointing
  b  LoRA r=16, no checkpointing
  c  full fine-tuning, checkpointing (HF under bf16 autocast, every layer recomputed); ranktune
     keeps each layer's attention block and recomputes its norms and MLP (keep_attention), and
     also runs c1: the same with every layer recomputed (no HF run, no target)
  d  QLoRA (ranktune only: the HF peer script has no 4-bit mode; the target is against (a))
  e  2-GPU data parallel of (a) and (c) (mpirun -np 2 / torchrun; skipped with fewer than 2 GPUs);
     ranktune's (c) runs ZeRO-1 with keep_attention (`--zero 1`: data parallel with the fp32 masters and optimizer
     states sharded over the ranks, as distributed.zero_stage: 1 trains), its (a) plain data
     parallel; the HF peer runs both as plain DDP
A row that cannot run (a mode not built yet, a missing binary, a timeout) says "not available:"
with the first line of its stderr (the last line for the HF peer, where Python's error is).

Under mpirun, ranktune_bench_step --ranks N is to print one JSON line (rank 0) with gpus = N and
tokens_per_s counting every rank's tokens, as the HF peer does under torchrun; 2-GPU scaling is that
over the sum of each of those GPUs' one-GPU tokens/s of the same workload: the one-GPU workload also
runs alone on GPUs 1..N-1 (CUDA_VISIBLE_DEVICES), since GPUs of one machine differ by a percent or
two and the multi-GPU step runs at the pace of the slowest.

MFU = model FLOPs per token (ranktune_bench_step's model_flops_per_token, the formula of
src/trainer.cpp) x tokens/s / (GPUs x the GEMM rate measured above). Ratios are ranktune / HF.
Needs only the Python 3 standard library; the HF peer needs torch, transformers and peft.
"""
import argparse
import datetime
import json
import os
import shutil
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# key -> (label, ranktune mode and flags, HF peer mode and flags or None, GPUs)
WORKLOADS = {
    "a": ("(a) LoRA r=16, 7 modules, checkpointing", ["lora", "--gc", "1"], ["lora", "--gc", "1"], 1),
    "b": ("(b) LoRA r=16, no checkpointing", ["lora", "--gc", "0"], ["lora", "--gc", "0"], 1),
    # ranktune's (c) keeps each layer's attention block and recomputes the norms and MLP
    # (gradient_checkpointing: keep_attention); HF recomputes every layer. c1 is ranktune's (c) with
    # every layer recomputed too (gradient_checkpointing: true), for comparison.
    "c": ("(c) full fine-tuning, checkpointing (ranktune: keep_attention)", ["full", "--gc", "3"],
          ["full", "--gc", "1"], 1),
    "c1": ("(c) full fine-tuning, every layer recomputed (ranktune: true)", ["full", "--gc", "1"], None, 1),
    "d": ("(d) QLoRA r=16, 7 modules, checkpointing", ["qlora", "--gc", "1"], None, 1),
    "e-a": ("(e) 2 GPUs, data parallel (a)", ["lora", "--gc", "1"], ["lora", "--gc", "1"], 2),
    "e-c": ("(e) 2 GPUs, ZeRO-1 data parallel (c)", ["full", "--gc", "3", "--zero", "1"], ["full", "--gc", "1"], 2),
}
HF_NONE_REASON = {"d": "n/a: the HF peer script has no 4-bit mode", "c1": "(c)'s HF row"}
TARGETS = {
    "a": ">= 2.5x HF tok/s at <= 0.4x its peak memory",
    "b": ">= 2x HF tok/s",
    "c": ">= 1.5x HF tok/s, MFU >= 50%",
    "c1": "none (for comparison)",
    "d": "step time <= 1.3x (a)'s",
    "e-a": "2-GPU scaling >= 97% of (a) on each GPU alone",
    "e-c": "2-GPU scaling >= 97% of (c) on each GPU alone",
}


def expand_workloads(spec, companions=True):
    """'a,b,e' -> ['a', 'b', 'e-a', 'e-c'] in the issue's order, and c with c1 unless companions is
    False; raises ValueError on unknown keys."""
    keys = []
    for part in (p.strip() for p in spec.split(",")):
        if not part:
            continue
        if part == "e":
            keys += ["e-a", "e-c"]
        elif part == "c" and companions:
            keys += ["c", "c1"]
        elif part in WORKLOADS:
            keys.append(part)
        else:
            raise ValueError(f"unknown workload '{part}' (choose from a, b, c, d, e)")
    order = list(WORKLOADS)
    return sorted(set(keys), key=order.index)


# ---- running ------------------------------------------------------------------------------------

def gpu_info():
    """(count, name) from `nvidia-smi -L`; (0, 'no GPU') without nvidia-smi."""
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.TimeoutExpired):
        return 0, "no GPU (nvidia-smi not found)"
    names = []
    for line in out.splitlines():
        if line.startswith("GPU ") and ":" in line:
            names.append(line.split(":", 1)[1].split("(UUID")[0].strip())
    return len(names), (names[0] if names else "no GPU")


def git_commit():
    # A copy of the working tree without its history (a remote GPU machine) names its commit here.
    if os.environ.get("RANKTUNE_COMMIT"):
        return os.environ["RANKTUNE_COMMIT"] + " (RANKTUNE_COMMIT)"
    try:
        sha = subprocess.run(["git", "-C", REPO, "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=30)
        if sha.returncode != 0:
            return "unknown (no git checkout)"
        dirty = subprocess.run(["git", "-C", REPO, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=30).stdout.strip()
        return sha.stdout.strip() + (" + uncommitted changes" if dirty else "")
    except (OSError, subprocess.TimeoutExpired):
        return "unknown (no git)"


def error_line(stderr, last=False):
    """The line of stderr that says what went wrong, without the tool's name and 'not available:'."""
    lines = [l.strip() for l in stderr.splitlines() if any(c.isalnum() for c in l)]  # no ==== rulers
    if not lines:
        return ""
    line = lines[-1] if last else lines[0]
    for prefix in ("ranktune_bench_step: ", "not available: "):
        if line.startswith(prefix):
            line = line[len(prefix):]
    return line


def parse_json_line(stdout):
    for line in stdout.splitlines():
        line = line.strip()
        if line.startswith("{"):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                pass
    return None


def run_one(key, peer, cmd, timeout, env, log_dir):
    """Runs one benchmark process; returns its record for results.jsonl."""
    print(f"[benchmark] {key} {peer}: {' '.join(cmd)}", file=sys.stderr, flush=True)
    t0 = time.monotonic()
    rec = {"workload": key, "peer": peer, "command": cmd, "returncode": None, "wall_s": None,
           "result": None, "error": None}
    stdout = stderr = ""
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO)
        stdout, stderr = p.stdout, p.stderr
        rec["returncode"] = p.returncode
        rec["result"] = parse_json_line(stdout) if p.returncode == 0 else None
        if rec["result"] is None and p.returncode == 0:
            rec["error"] = "exit code 0 but no JSON line on stdout"
        elif rec["result"] is None:
            rec["error"] = error_line(stderr, last=(peer == "hf")) or f"exit code {p.returncode}"
    except subprocess.TimeoutExpired as e:
        stdout = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        stderr = e.stderr.decode() if isinstance(e.stderr, bytes) else (e.stderr or "")
        rec["error"] = f"timed out after {timeout} s"
    except OSError as e:
        rec["error"] = f"cannot run {cmd[0]}: {e.strerror}"
    rec["wall_s"] = round(time.monotonic() - t0, 1)
    if log_dir:
        with open(os.path.join(log_dir, f"{key}-{peer}.log"), "w") as f:
            f.write(f"$ {' '.join(cmd)}\n--- stdout\n{stdout}\n--- stderr\n{stderr}")
    status = f"error: {rec['error']}" if rec["error"] else "ok"
    print(f"[benchmark] {key} {peer}: {status} ({rec['wall_s']} s)", file=sys.stderr, flush=True)
    return rec


def plan(args, keys, n_gpus):
    """The runs in order, as (workload, peer, command, extra env) tuples, and notes on skipped ones."""
    bench = os.path.join(args.build_dir, "ranktune_bench_step")
    shape = ["--steps", str(args.steps), "--warmup", str(args.warmup), "--batch", str(args.batch),
             "--seq", str(args.seq), "--layers", str(args.layers)]
    multi_env = {"NCCL_NVLS_ENABLE": "0", "OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1"}
    runs, notes = [("gemm", "ranktune", [bench, "gemm"], {})], []
    for key in keys:
        _, rt_args, hf_args, gpus = WORKLOADS[key]
        if gpus > n_gpus:
            notes.append(f"{key}: skipped, needs {gpus} GPU{'s' if gpus > 1 else ''} and nvidia-smi -L lists {n_gpus}")
            continue
        if gpus == 1:
            runs.append((key, "ranktune", [bench] + rt_args + shape, {}))
        else:
            # The one-GPU workload on each other GPU of the run, for the scaling's denominator.
            base = key[2:]
            for gpu in range(1, gpus):
                runs.append((base, f"ranktune-gpu{gpu}", [bench] + WORKLOADS[base][1] + shape,
                             {"CUDA_VISIBLE_DEVICES": str(gpu)}))
            runs.append((key, "ranktune", ["mpirun", "--allow-run-as-root", "-np", str(gpus), bench] + rt_args
                         + shape + ["--ranks", str(gpus)], multi_env))
        if hf_args is not None and not args.skip_hf and not (gpus > 1 and args.skip_hf_multi_gpu):
            hf = [args.python, args.hf_script] + hf_args + shape
            if gpus > 1:
                hf = [args.python, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={gpus}",
                      args.hf_script] + hf_args + shape
            runs.append((key, "hf", hf, multi_env if gpus > 1 else {}))
    for key in expand_workloads(args.profile, companions=False):
        if key not in keys or WORKLOADS[key][3] != 1 or n_gpus < 1:
            continue
        runs.append((key, "ranktune-profile", [bench] + WORKLOADS[key][1] + shape + ["--profile", "1"], {}))
    return runs, notes


# ---- the report ---------------------------------------------------------------------------------

def fmt_int(x):
    return f"{x:,.0f}"


def fmt_ratio(x):
    return f"{x:.2f}x"


def fmt_pct(x):
    return f"{100 * x:.1f}%"


def mfu(result, gemm_tflops):
    fpt = result.get("model_flops_per_token")
    if not fpt or not gemm_tflops:
        return None
    return fpt * result["tokens_per_s"] / (result.get("gpus", 1) * gemm_tflops * 1e12)


def evaluate(key, rt, hf, base, gemm_tflops):
    """'yes'/'no'/'n/a' with the measured figures the target is about. rt/hf: JSON results or None;
    base: the single-GPU ranktune results by workload key, for (d) and (e)."""
    if rt is None:
        return "n/a"
    if key == "c1":
        return "-"
    checks = []  # (met, text)
    if key in ("a", "b", "c"):
        if hf is None:
            return "n/a (no HF figures)"
        speed = rt["tokens_per_s"] / hf["tokens_per_s"]
        need = {"a": 2.5, "b": 2.0, "c": 1.5}[key]
        checks.append((speed >= need, f"speed {fmt_ratio(speed)}"))
        if key == "a":
            mem = rt["peak_mem_gib"] / hf["peak_mem_gib"]
            checks.append((mem <= 0.4, f"memory {fmt_ratio(mem)}"))
        if key == "c":
            m = mfu(rt, gemm_tflops)
            if m is None:
                checks.append((None, "MFU unknown"))
            else:
                checks.append((m >= 0.5, f"MFU {fmt_pct(m)}"))
    elif key == "d":
        a = base.get("a")
        if a is None:
            return "n/a (needs (a))"
        r = rt["step_ms"] / a["step_ms"]
        checks.append((r <= 1.3, f"{fmt_ratio(r)} (a)'s step"))
    else:  # e-a, e-c: tokens/s of N GPUs over the sum of each GPU's alone (GPU 0's N times if unknown)
        one = base.get(key[2:])
        if one is None:
            return f"n/a (needs ({key[2:]}))"
        gpus = rt.get("gpus", 2)
        alone = [one] + [base.get(f"{key[2:]}@gpu{g}") for g in range(1, gpus)]
        if all(alone):
            s = rt["tokens_per_s"] / sum(r["tokens_per_s"] for r in alone)
            each = " + ".join(fmt_int(r["tokens_per_s"]) for r in alone)
            checks.append((s >= 0.97, f"scaling {fmt_pct(s)} of {each} alone"))
        else:
            s = rt["tokens_per_s"] / (gpus * one["tokens_per_s"])
            checks.append((s >= 0.97, f"scaling {fmt_pct(s)}"))
    if any(ok is False for ok, _ in checks):
        verdict = "no"
    elif any(ok is None for ok, _ in checks):
        verdict = "n/a"
    else:
        verdict = "yes"
    return f"{verdict} ({', '.join(t for _, t in checks)})"


def cell(text):
    return str(text).replace("|", "\\|")


def hf_skip_reason(key, hf_skipped):
    """Why a workload has no HF figures though the peer has a mode for it; hf_skipped is the meta's
    "hf_skipped" (absent in reports from before it was recorded)."""
    if hf_skipped == "all":
        return "not run (--skip-hf)"
    if hf_skipped == "multi_gpu" and WORKLOADS[key][3] > 1:
        return "not run (--skip-hf-multi-gpu)"
    return "not run"


def table_rows(keys, results, gemm_tflops, hf_skipped=None):
    """Markdown rows of the main table. results: {(workload, peer): record}."""
    base = {}  # one-GPU results: "a", "c" on GPU 0, "a@gpu1" ... alone on the other GPUs
    for (key, peer), rec in results.items():
        if key in ("a", "c") and rec["result"] and (peer == "ranktune" or peer.startswith("ranktune-gpu")):
            base[key if peer == "ranktune" else f"{key}@{peer[len('ranktune-'):]}"] = rec["result"]
    rows = []
    for key in keys:
        label, _, hf_args, _ = WORKLOADS[key]
        rt_rec, hf_rec = results.get((key, "ranktune")), results.get((key, "hf"))
        if rt_rec is None:  # skipped: the notes under the table say why
            rows.append([label, "not run (see below)"] + ["-"] * 8 + [TARGETS[key], "n/a"])
            continue
        rt = rt_rec["result"]
        hf = hf_rec["result"] if hf_rec else None
        if rt:
            m = mfu(rt, gemm_tflops)
            rt_cells = [fmt_int(rt["tokens_per_s"]), f"{rt['step_ms']:.1f}", f"{rt['peak_mem_gib']:.2f}",
                        fmt_pct(m) if m is not None else "n/a"]
        else:
            rt_cells = [f"not available: {rt_rec['error']}", "-", "-", "-"]
        if hf:
            hf_cells = [fmt_int(hf["tokens_per_s"]), f"{hf['step_ms']:.1f}", f"{hf['peak_mem_gib']:.2f}"]
        elif hf_rec:
            hf_cells = [f"not available: {hf_rec['error']}", "-", "-"]
        elif hf_args is None:
            hf_cells = [HF_NONE_REASON.get(key, "n/a"), "-", "-"]
        else:
            hf_cells = [hf_skip_reason(key, hf_skipped), "-", "-"]
        if rt and hf:
            ratios = [fmt_ratio(rt["tokens_per_s"] / hf["tokens_per_s"]),
                      fmt_ratio(rt["peak_mem_gib"] / hf["peak_mem_gib"])]
        else:
            ratios = ["-", "-"]
        verdict = evaluate(key, rt, hf, base, gemm_tflops)
        rows.append([label] + rt_cells + hf_cells + ratios + [TARGETS[key], verdict])
    return rows


HEADER = ["workload", "ranktune tok/s", "ranktune step ms", "ranktune peak GiB", "ranktune MFU", "HF tok/s",
          "HF step ms", "HF peak GiB", "speed ratio", "memory ratio", "target", "met?"]


def markdown_table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def profile_section(key, rec, unprofiled):
    label = WORKLOADS[key][0]
    if rec["result"] is None or "profile" not in rec["result"]:
        return f"### Where the time goes: {label}\n\nnot available: {rec['error'] or 'no profile in the output'}\n"
    p = rec["result"]["profile"]
    step = p["step_ms"]
    rows = []
    for op in p["ops"]:
        tflops = op["gflop"] / op["ms"] if op["gflop"] and op["ms"] else None
        rows.append([op["op"], f"{op['calls']:.0f}", f"{op['ms']:.3f}", fmt_pct(op["ms"] / step),
                     f"{tflops:.0f}" if tflops else "-"])
    gaps = p["gpu_span_ms"] - p["ops_ms"]
    outside = step - p["gpu_span_ms"]
    rows.append(["**sum of ops**", "", f"{p['ops_ms']:.3f}", fmt_pct(p["ops_ms"] / step), ""])
    rows.append(["GPU idle between ops (host-bound gaps)", "", f"{gaps:.3f}", fmt_pct(gaps / step), ""])
    rows.append(["outside the ops' span (host, synchronization)", "", f"{outside:.3f}", fmt_pct(outside / step), ""])
    rows.append(["**step (profiled wall time)**", "", f"{step:.3f}", "100.0%", ""])
    note = f"{p['steps']} profiled steps; CUDA events around every backend op"
    if unprofiled:
        note += f"; the same workload unprofiled: {unprofiled['step_ms']:.1f} ms per step"
    return (f"### Where the time goes: {label}\n\n{note}.\n\n"
            + markdown_table(["op", "calls/step", "ms/step", "% of step", "TFLOP/s"], rows) + "\n")


def render_report(meta, keys, records, notes):
    """The whole markdown report from the run records (as results.jsonl holds them)."""
    results = {(r["workload"], r["peer"]): r for r in records}
    gemm = results.get(("gemm", "ranktune"))
    gemm_tflops = gemm["result"]["gemm_tflops"] if gemm and gemm["result"] else None
    if gemm_tflops:
        gemm_text = f"bf16 GEMM {gemm_tflops:.1f} TFLOP/s measured ({gemm['result'].get('gemm_shape', '')})"
    else:
        gemm_text = "bf16 GEMM rate not available" + (f": {gemm['error']}" if gemm else "")
    out = [f"## ranktune vs HF peer: {meta['gpu']} x{meta['gpu_count']}, {meta['date']}, commit {meta['commit']}, "
           f"{gemm_text}", "",
           f"Llama-3.2-1B shape, random weights, batch {meta['batch']} x {meta['seq']} per GPU, {meta['layers']} "
           f"layers, {meta['steps']} timed steps after {meta['warmup']} warm-up. Ratios are ranktune / HF; MFU = "
           "model FLOPs per token x tokens/s / (GPUs x the GEMM rate above). Peak memory: ranktune's device "
           "memory in use after the steps, counted from after CUDA context creation (it allocates everything "
           "up front); HF's torch.cuda.max_memory_allocated.", "",
           markdown_table(HEADER, table_rows(keys, results, gemm_tflops, meta.get("hf_skipped")))]
    if notes:
        out += [""] + [f"- {n}" for n in notes]
    for rec in records:
        if rec["peer"] == "ranktune-profile":
            unprofiled = results.get((rec["workload"], "ranktune"))
            out += ["", profile_section(rec["workload"], rec, unprofiled["result"] if unprofiled else None)]
    return "\n".join(out) + "\n"


# ---- main ---------------------------------------------------------------------------------------

def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--build-dir", default=os.path.join(REPO, "build-device"),
                    help="where ranktune_bench_step is (default build-device)")
    ap.add_argument("--workloads", default="a,b,c,d,e", help="comma-separated from a,b,c,d,e (default all)")
    ap.add_argument("--steps", type=int, default=10, help="timed steps per run (default 10)")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps first (default 3)")
    ap.add_argument("--batch", type=int, default=2, help="sequences per GPU (default 2)")
    ap.add_argument("--seq", type=int, default=2048, help="tokens per sequence (default 2048)")
    ap.add_argument("--layers", type=int, default=16, help="decoder layers (default 16, Llama-3.2-1B)")
    ap.add_argument("--skip-hf", action="store_true", help="ranktune only")
    ap.add_argument("--skip-hf-multi-gpu", action="store_true",
                    help="no HF peer for (e): its target is ranktune's own scaling from (a) and (c)")
    ap.add_argument("--profile", default="a,c", help="workloads to profile op by op (default a,c; '' for none)")
    ap.add_argument("--out", default=os.path.join(REPO, "out", "benchmark"),
                    help="directory for results.jsonl, report.md, logs/ (default out/benchmark)")
    ap.add_argument("--timeout", type=int, default=600, help="seconds per run (default 600)")
    ap.add_argument("--python", default=sys.executable or "python3", help="interpreter for the HF peer")
    ap.add_argument("--hf-script", default=os.path.join(REPO, "tools", "hf_peer_baseline.py"))
    ap.add_argument("--from-results", metavar="JSONL", help="re-render the report of a saved results.jsonl")
    args = ap.parse_args(argv)
    try:
        args.keys = expand_workloads(args.workloads)
        expand_workloads(args.profile)
    except ValueError as e:
        ap.error(str(e))
    if args.steps < 1 or args.warmup < 0 or args.timeout < 1:
        ap.error("--steps and --timeout must be >= 1, --warmup >= 0")
    for name in ("build_dir", "hf_script", "out"):
        setattr(args, name, os.path.abspath(getattr(args, name)))
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.from_results:
        with open(args.from_results) as f:
            lines = [json.loads(l) for l in f if l.strip()]
        meta = next((l["meta"] for l in lines if "meta" in l), None)
        if meta is None:
            sys.exit(f"{args.from_results}: no meta line; is this a tools/benchmark.py results.jsonl?")
        records = [l for l in lines if "meta" not in l]
        sys.stdout.write(render_report(meta, meta["workloads"], records, meta.get("notes", [])))
        return 0
    n_gpus, gpu = gpu_info()
    meta = {"gpu": gpu, "gpu_count": n_gpus, "commit": git_commit(),
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "batch": args.batch, "seq": args.seq, "layers": args.layers, "steps": args.steps,
            "warmup": args.warmup, "workloads": args.keys,
            "hf_skipped": "all" if args.skip_hf else "multi_gpu" if args.skip_hf_multi_gpu else None}
    runs, notes = plan(args, args.keys, n_gpus)
    if not os.path.exists(os.path.join(args.build_dir, "ranktune_bench_step")):
        notes.append(f"{args.build_dir}/ranktune_bench_step not found: build it first "
                     "(cmake --build BUILD --target ranktune_bench_step)")
    if any(cmd[0] == "mpirun" for _, _, cmd, _ in runs) and shutil.which("mpirun") is None:
        notes.append("mpirun not found: the 2-GPU ranktune rows cannot run")
    meta["notes"] = notes
    log_dir = os.path.join(args.out, "logs")
    os.makedirs(log_dir, exist_ok=True)
    records = []
    with open(os.path.join(args.out, "results.jsonl"), "w") as f:
        f.write(json.dumps({"meta": meta}) + "\n")
        for key, peer, cmd, extra_env in runs:
            env = dict(os.environ, PYTHONUNBUFFERED="1", **extra_env)
            rec = run_one(key, peer, cmd, args.timeout, env, log_dir)
            records.append(rec)
            f.write(json.dumps(rec) + "\n")
            f.flush()
    report = render_report(meta, args.keys, records, notes)
    with open(os.path.join(args.out, "report.md"), "w") as f:
        f.write(report)
    sys.stdout.write(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
