"""Tests of tools/benchmark.py without a GPU: workload parsing, the run plan, the ratio and target
logic, the table and profile rendering, and a whole run against stand-in benchmark programs.
Run: /usr/bin/python3 -m unittest tools/test_benchmark.py   (ctest: tools_benchmark_table)"""
import contextlib
import io
import json
import os
import stat
import sys
import tempfile
import unittest
from unittest import mock

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchmark  # noqa: E402


def rt(mode, tps, step_ms, mem, gpus=1, fpt=7.8e9):
    return {"peer": "ranktune", "mode": mode, "gpus": gpus, "tokens_per_s": tps, "step_ms": step_ms,
            "peak_mem_gib": mem, "model_flops_per_token": fpt}


def hf(mode, tps, step_ms, mem):
    return {"peer": "hf-transformers", "mode": mode, "gpus": 1, "tokens_per_s": tps, "step_ms": step_ms,
            "peak_mem_gib": mem}


def rec(workload, peer, result=None, error=None):
    return {"workload": workload, "peer": peer, "command": [], "returncode": 0 if result else 2, "wall_s": 1.0,
            "result": result, "error": error}


META = {"gpu": "NVIDIA H100 80GB HBM3", "gpu_count": 1, "commit": "abc1234", "date": "2026-11-26 12:00 UTC",
        "batch": 2, "seq": 2048, "layers": 16, "steps": 10, "warmup": 3}


class Workloads(unittest.TestCase):
    def test_expand_in_issue_order(self):
        self.assertEqual(benchmark.expand_workloads("e,c,a"), ["a", "c", "c1", "e-a", "e-c"])
        self.assertEqual(benchmark.expand_workloads("a,b,c,d,e"), ["a", "b", "c", "c1", "d", "e-a", "e-c"])
        self.assertEqual(benchmark.expand_workloads(""), [])
        with self.assertRaises(ValueError):
            benchmark.expand_workloads("a,x")

    def test_bad_workload_is_a_usage_error(self):
        with contextlib.redirect_stderr(io.StringIO()), self.assertRaises(SystemExit) as e:
            benchmark.parse_args(["--workloads", "a,z"])
        self.assertEqual(e.exception.code, 2)

    def test_plan_one_gpu_skips_e(self):
        args = benchmark.parse_args(["--build-dir", "/b", "--steps", "5", "--warmup", "1"])
        runs, notes = benchmark.plan(args, args.keys, n_gpus=1)
        cmds = {(k, p): c for k, p, c, _ in runs}
        self.assertEqual(runs[0][:3], ("gemm", "ranktune", ["/b/ranktune_bench_step", "gemm"]))
        self.assertEqual(cmds[("a", "ranktune")][:4], ["/b/ranktune_bench_step", "lora", "--gc", "1"])
        self.assertIn("--steps", cmds[("a", "ranktune")])
        self.assertEqual(cmds[("b", "hf")][1:5], [args.hf_script, "lora", "--gc", "0"])
        self.assertEqual(cmds[("c", "hf")][2:5], ["full", "--gc", "1"])
        # ranktune's (c) keeps the attention blocks; c1 recomputes every layer and has no HF run
        self.assertEqual(cmds[("c", "ranktune")][1:4], ["full", "--gc", "3"])
        self.assertEqual(cmds[("c1", "ranktune")][1:4], ["full", "--gc", "1"])
        self.assertNotIn(("c1", "hf"), cmds)
        self.assertEqual(cmds[("d", "ranktune")][1:4], ["qlora", "--gc", "1"])
        self.assertNotIn(("d", "hf"), cmds)
        self.assertNotIn(("e-a", "ranktune"), cmds)
        self.assertTrue(any("e-a: skipped" in n for n in notes))
        self.assertEqual(cmds[("a", "ranktune-profile")][-2:], ["--profile", "1"])
        self.assertEqual(cmds[("c", "ranktune-profile")][1], "full")
        # the same shape for both peers
        self.assertEqual(cmds[("a", "ranktune")][4:], cmds[("a", "hf")][5:])

    def test_plan_two_gpus(self):
        args = benchmark.parse_args(["--build-dir", "/b", "--workloads", "e", "--profile", ""])
        runs, notes = benchmark.plan(args, args.keys, n_gpus=2)
        cmds = {(k, p): (c, env) for k, p, c, env in runs}
        cmd, env = cmds[("e-a", "ranktune")]
        self.assertEqual(cmd[:6], ["mpirun", "--allow-run-as-root", "-np", "2", "/b/ranktune_bench_step", "lora"])
        self.assertEqual(cmd[-2:], ["--ranks", "2"])
        self.assertNotIn("--zero", cmd)
        self.assertEqual(env["NCCL_NVLS_ENABLE"], "0")
        # (e)'s full fine-tuning runs ZeRO-1; the label says so
        cmd, _ = cmds[("e-c", "ranktune")]
        self.assertEqual(cmd[5:10], ["full", "--gc", "3", "--zero", "1"])
        self.assertEqual(cmd[-2:], ["--ranks", "2"])
        self.assertIn("ZeRO-1", benchmark.WORKLOADS["e-c"][0])
        self.assertIn("--nproc_per_node=2", cmds[("e-c", "hf")][0])
        # the scaling's denominator: (a) and (c) alone on GPU 1 too
        cmd, env = cmds[("a", "ranktune-gpu1")]
        self.assertEqual(cmd[:4], ["/b/ranktune_bench_step", "lora", "--gc", "1"])
        self.assertEqual(env, {"CUDA_VISIBLE_DEVICES": "1"})
        self.assertEqual(cmds[("c", "ranktune-gpu1")][0][1:4], ["full", "--gc", "3"])
        self.assertEqual(notes, [])
        self.assertFalse(any(p == "ranktune-profile" for _, p, _, _ in runs))

    def test_skip_hf(self):
        args = benchmark.parse_args(["--skip-hf", "--workloads", "a"])
        runs, _ = benchmark.plan(args, args.keys, n_gpus=1)
        self.assertEqual([p for _, p, _, _ in runs], ["ranktune", "ranktune", "ranktune-profile"])


    def test_skipped_hf_rows_name_the_flag(self):
        records = [rec("a", "ranktune", rt("lora", 50000, 80, 3.4)),
                   rec("e-a", "ranktune", rt("lora", 97000, 82, 3.8, gpus=2))]
        for skipped, a_cell, e_cell in [("all", "not run (--skip-hf)", "not run (--skip-hf)"),
                                        ("multi_gpu", "not run", "not run (--skip-hf-multi-gpu)"),
                                        (None, "not run", "not run")]:
            text = benchmark.render_report(dict(META, hf_skipped=skipped), ["a", "e-a"], records, [])
            rows = {l.split(" | ")[0]: [c.strip() for c in l.strip("|").split(" | ")]
                    for l in text.splitlines() if l.startswith("| (")}
            self.assertEqual(rows["| (a) LoRA r=16, 7 modules, checkpointing"][5], a_cell)
            self.assertEqual(rows["| (e) 2 GPUs, data parallel (a)"][5], e_cell)


class Targets(unittest.TestCase):
    # The figures of docs/benchmarks.md (H100, commit 67f844f), and a 750 TFLOP/s GEMM rate.
    A_RT, A_HF = rt("lora", 53936, 75.9, 3.80), hf("lora", 15752, 260.0, 8.67)

    def test_a_speed_met_memory_not(self):
        v = benchmark.evaluate("a", self.A_RT, self.A_HF, {}, 750)
        self.assertEqual(v, "no (speed 3.42x, memory 0.44x)")
        v = benchmark.evaluate("a", rt("lora", 53936, 75.9, 3.40), self.A_HF, {}, 750)
        self.assertTrue(v.startswith("yes"), v)

    def test_b(self):
        self.assertTrue(benchmark.evaluate("b", rt("lora", 69970, 58.5, 7.93), hf("lora", 28931, 141.6, 18.02),
                                           {}, 750).startswith("yes (speed 2.42x"))
        self.assertTrue(benchmark.evaluate("b", rt("lora", 50000, 80, 7.9), hf("lora", 28931, 141.6, 18.02),
                                           {}, 750).startswith("no"))

    def test_c_mfu(self):
        c_rt, c_hf = rt("full", 43097, 95.0, 22.04), hf("full", 26129, 156.8, 21.68)
        # 7.8e9 * 43097 / 750e12 = 44.8%: speed met, MFU not
        self.assertEqual(benchmark.evaluate("c", c_rt, c_hf, {}, 750), "no (speed 1.65x, MFU 44.8%)")
        self.assertEqual(benchmark.evaluate("c", c_rt, c_hf, {}, 600), "yes (speed 1.65x, MFU 56.0%)")
        self.assertEqual(benchmark.evaluate("c", c_rt, c_hf, {}, None), "n/a (speed 1.65x, MFU unknown)")
        self.assertEqual(benchmark.evaluate("c", c_rt, None, {}, 750), "n/a (no HF figures)")

    def test_d_against_a(self):
        self.assertEqual(benchmark.evaluate("d", rt("qlora", 45000, 91.0, 2.1), None, {"a": self.A_RT}, 750),
                         "yes (1.20x (a)'s step)")
        self.assertTrue(benchmark.evaluate("d", rt("qlora", 40000, 100.0, 2.1), None, {"a": self.A_RT},
                                           750).startswith("no (1.32x"))
        self.assertEqual(benchmark.evaluate("d", rt("qlora", 1, 1, 1), None, {}, 750), "n/a (needs (a))")
        self.assertEqual(benchmark.evaluate("d", None, None, {"a": self.A_RT}, 750), "n/a")

    def test_e_scaling(self):
        base = {"a": self.A_RT}
        self.assertEqual(benchmark.evaluate("e-a", rt("lora", 105000, 78, 3.8, gpus=2), None, base, 750),
                         "yes (scaling 97.3%)")
        self.assertEqual(benchmark.evaluate("e-a", rt("lora", 100000, 82, 3.8, gpus=2), None, base, 750),
                         "no (scaling 92.7%)")
        self.assertEqual(benchmark.evaluate("e-c", rt("full", 1, 1, 1, gpus=2), None, base, 750), "n/a (needs (c))")
        # with (a) measured alone on GPU 1 as well, against the sum of the two: 105000 / (53936 + 55000)
        base["a@gpu1"] = rt("lora", 55000, 74.5, 3.8)
        self.assertEqual(benchmark.evaluate("e-a", rt("lora", 105000, 78, 3.8, gpus=2), None, base, 750),
                         "no (scaling 96.4% of 53,936 + 55,000 alone)")

    def test_mfu_counts_gpus(self):
        self.assertAlmostEqual(benchmark.mfu(rt("full", 100000, 1, 1, gpus=2, fpt=7.5e9), 750), 0.5)
        self.assertIsNone(benchmark.mfu({"tokens_per_s": 1}, 750))


class Report(unittest.TestCase):
    def records(self):
        profile = {"steps": 10, "step_ms": 80.0, "gpu_span_ms": 78.0, "ops_ms": 70.0,
                   "ops": [{"op": "matmul fwd layers", "calls": 224, "ms": 40.0, "gflop": 28000.0},
                           {"op": "attention bwd", "calls": 16, "ms": 30.0, "gflop": 0.0}]}
        prof_rt = dict(rt("lora", 50000, 80.0, 3.8), profile=profile, profiled=1)
        return [rec("gemm", "ranktune", {"gemm_tflops": 750.25, "gemm_shape": "square 8192x8192x8192"}),
                rec("a", "ranktune", Targets.A_RT), rec("a", "hf", Targets.A_HF),
                rec("b", "ranktune", None, "CUDA error | out of memory"),
                rec("b", "hf", None, "torch.OutOfMemoryError: CUDA out of memory."),
                rec("d", "ranktune", None, "QLoRA (NF4 base weights) is not built into ranktune yet"),
                rec("a", "ranktune-profile", prof_rt)]

    def test_table(self):
        text = benchmark.render_report(META, ["a", "b", "d"], self.records(), ["e-a: skipped, needs 2 GPUs"])
        lines = text.splitlines()
        self.assertIn("NVIDIA H100 80GB HBM3 x1", lines[0])
        self.assertIn("commit abc1234", lines[0])
        self.assertIn("bf16 GEMM 750.2 TFLOP/s measured (square 8192x8192x8192)", lines[0])
        header = next(l for l in lines if l.startswith("| workload"))
        self.assertEqual(header.count("|"), len(benchmark.HEADER) + 1)
        row_a = next(l for l in lines if l.startswith("| (a)"))
        cells = [c.strip() for c in row_a.strip("|").split(" | ")]
        self.assertEqual(cells[1:5], ["53,936", "75.9", "3.80", "56.1%"])
        self.assertEqual(cells[5:10], ["15,752", "260.0", "8.67", "3.42x", "0.44x"])
        self.assertEqual(cells[-1], "no (speed 3.42x, memory 0.44x)")
        row_b = next(l for l in lines if l.startswith("| (b)"))
        self.assertIn("not available: CUDA error \\| out of memory", row_b)  # a '|' cannot break the table
        self.assertIn("not available: torch.OutOfMemoryError", row_b)
        row_d = next(l for l in lines if l.startswith("| (d)"))
        self.assertIn("not available: QLoRA (NF4 base weights) is not built into ranktune yet", row_d)
        self.assertIn("n/a: the HF peer script has no 4-bit mode", row_d)
        self.assertIn("- e-a: skipped, needs 2 GPUs", lines)
        for l in lines:
            if l.startswith("| (") or l.startswith("| workload"):
                self.assertEqual(l.replace("\\|", "").count("|"), len(benchmark.HEADER) + 1, l)

    def test_profile(self):
        text = benchmark.render_report(META, ["a"], self.records(), [])
        self.assertIn("### Where the time goes: (a) LoRA r=16, 7 modules, checkpointing", text)
        self.assertIn("unprofiled: 75.9 ms per step", text)
        self.assertIn("| matmul fwd layers | 224 | 40.000 | 50.0% | 700 |", text)
        self.assertIn("| attention bwd | 16 | 30.000 | 37.5% | - |", text)
        self.assertIn("| GPU idle between ops (host-bound gaps) |  | 8.000 | 10.0% |  |", text)
        self.assertIn("| outside the ops' span (host, synchronization) |  | 2.000 | 2.5% |  |", text)

    def test_no_gemm_rate(self):
        records = [r for r in self.records() if r["workload"] != "gemm"]
        text = benchmark.render_report(META, ["a"], records, [])
        self.assertIn("bf16 GEMM rate not available", text.splitlines()[0])
        row_a = next(l for l in text.splitlines() if l.startswith("| (a)"))
        self.assertIn("| 3.80 | n/a |", row_a)

    def test_error_line(self):
        self.assertEqual(benchmark.error_line("ranktune_bench_step: not available: X\nmpirun: noise\n"), "X")
        self.assertEqual(benchmark.error_line("warning\nTraceback\nValueError: bad\n", last=True), "ValueError: bad")
        self.assertEqual(benchmark.error_line(""), "")
        self.assertEqual(benchmark.error_line("ChildFailedError:\n  x.py FAILED\n=======\n", last=True), "x.py FAILED")


FAKE_BENCH = """\
#!{python}
import json, sys
mode = sys.argv[1]
if mode == "gemm":
    print(json.dumps({{"peer": "ranktune", "mode": "gemm", "gemm_tflops": 700.0, "gemm_shape": "square"}}))
elif mode == "qlora":
    sys.exit(print("ranktune_bench_step: not available: QLoRA is not built", file=sys.stderr) or 2)
else:
    r = {{"peer": "ranktune", "mode": mode, "gpus": 1, "tokens_per_s": 50000, "step_ms": 80.0,
          "peak_mem_gib": 3.5, "model_flops_per_token": 7.8e9, "profiled": 0}}
    if "--profile" in sys.argv:
        r["profile"] = {{"steps": 2, "step_ms": 90.0, "gpu_span_ms": 85.0, "ops_ms": 80.0,
                        "ops": [{{"op": "matmul fwd layers", "calls": 10, "ms": 80.0, "gflop": 1.0}}]}}
    print("noise on stdout")
    print(json.dumps(r))
"""

FAKE_HF = """\
import json, sys
print("some warning", file=sys.stderr)
if sys.argv[1] == "full":
    sys.exit("RuntimeError: CUDA out of memory")
print(json.dumps({"peer": "hf-transformers+peft", "mode": sys.argv[1], "gpus": 1, "tokens_per_s": 20000,
                  "step_ms": 200.0, "peak_mem_gib": 9.0}))
"""


class WholeRun(unittest.TestCase):
    def test_run_and_rerender(self):
        with tempfile.TemporaryDirectory() as tmp:
            build = os.path.join(tmp, "build")
            os.makedirs(build)
            bench = os.path.join(build, "ranktune_bench_step")
            with open(bench, "w") as f:
                f.write(FAKE_BENCH.format(python=sys.executable))
            os.chmod(bench, os.stat(bench).st_mode | stat.S_IXUSR)
            hf_script = os.path.join(tmp, "hf.py")
            with open(hf_script, "w") as f:
                f.write(FAKE_HF)
            out = os.path.join(tmp, "out")
            argv = ["--build-dir", build, "--hf-script", hf_script, "--python", sys.executable, "--out", out,
                    "--steps", "2", "--warmup", "1", "--timeout", "60"]
            stdout = io.StringIO()
            with mock.patch.object(benchmark, "gpu_info", return_value=(1, "Fake GPU")), \
                    contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(io.StringIO()):
                self.assertEqual(benchmark.main(argv), 0)
            report = stdout.getvalue()
            with open(os.path.join(out, "report.md")) as f:
                self.assertEqual(f.read(), report)
            self.assertIn("Fake GPU x1", report)
            self.assertIn("bf16 GEMM 700.0 TFLOP/s measured (square)", report)
            row_a = next(l for l in report.splitlines() if l.startswith("| (a)"))
            self.assertIn("| 50,000 | 80.0 | 3.50 | 55.7% | 20,000 | 200.0 | 9.00 | 2.50x | 0.39x |", row_a)
            self.assertTrue(row_a.endswith("| yes (speed 2.50x, memory 0.39x) |"), row_a)
            row_c = next(l for l in report.splitlines() if l.startswith("| (c)"))
            self.assertIn("not available: RuntimeError: CUDA out of memory", row_c)
            row_d = next(l for l in report.splitlines() if l.startswith("| (d)"))
            self.assertIn("| not available: QLoRA is not built |", row_d)
            self.assertIn("e-a: skipped, needs 2 GPUs", report)
            self.assertIn("| (e) 2 GPUs, data parallel (a) | not run (see below) |", report)
            self.assertEqual(report.count("### Where the time goes"), 2)
            with open(os.path.join(out, "results.jsonl")) as f:
                lines = [json.loads(l) for l in f]
            self.assertIn("meta", lines[0])
            self.assertEqual([(l["workload"], l["peer"]) for l in lines[1:]],
                             [("gemm", "ranktune"), ("a", "ranktune"), ("a", "hf"), ("b", "ranktune"), ("b", "hf"),
                              ("c", "ranktune"), ("c", "hf"), ("c1", "ranktune"), ("d", "ranktune"),
                              ("a", "ranktune-profile"),
                              ("c", "ranktune-profile")])
            self.assertTrue(os.path.exists(os.path.join(out, "logs", "a-hf.log")))
            again = io.StringIO()
            with contextlib.redirect_stdout(again):
                benchmark.main(["--from-results", os.path.join(out, "results.jsonl")])
            self.assertEqual(again.getvalue(), report)

    def test_missing_binary_and_timeout(self):
        with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stderr(io.StringIO()):
            r = benchmark.run_one("a", "ranktune", [os.path.join(tmp, "nope")], 5, dict(os.environ), None)
            self.assertIn("cannot run", r["error"])
            r = benchmark.run_one("a", "hf", [sys.executable, "-c", "import time; time.sleep(5)"], 1,
                                  dict(os.environ), tmp)
            self.assertEqual(r["error"], "timed out after 1 s")
            self.assertTrue(os.path.exists(os.path.join(tmp, "a-hf.log")))


if __name__ == "__main__":
    unittest.main()
