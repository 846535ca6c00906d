#!/usr/bin/env bash
# One GPU session in one call: build for the GPU, run the gpu tests, the quickstart on the GPU,
# the op and step benchmarks and (optionally) the HF peer; logs under $OUT (default ./device-out).
# Usage: tools/device_check.sh [stages...]   stages: build tests quickstart env bench_ops bench_step hf benchmark
#   benchmark: tools/benchmark.py, ranktune and the HF peer in one table (report in $OUT/benchmark/report.md);
#              BENCHMARK_ARGS passes it more flags, e.g. BENCHMARK_ARGS="--workloads a,c --skip-hf".
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-device-out}
mkdir -p "$OUT"
export NCCL_NVLS_ENABLE=0 OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 PYTHONUNBUFFERED=1
stages=${*:-build tests quickstart env bench_ops bench_step}
build=build-device
log() { echo "=== $* ($(date +%T))"; }
for stage in $stages; do
  case $stage in
    build)
      log build
      nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.txt" 2>&1; cat "$OUT/gpu.txt"
      cmake -S . -B $build -G Ninja -DCMAKE_BUILD_TYPE=Release -DCMAKE_CUDA_ARCHITECTURES=90a > "$OUT/build.log" 2>&1 &&
        cmake --build $build -j 16 >> "$OUT/build.log" 2>&1 || { grep -E "error|Error" "$OUT/build.log" | head -40; exit 1; } ;;
    tests)
      log gpu tests
      ./$build/tests/ranktune_gpu_tests > "$OUT/gpu_tests.log" 2>&1
      grep -E "^\[  (FAILED|PASSED|SKIPPED) |Failure|rel err|^\[[a-z_0-9]+\] loss|Which is|Expected" "$OUT/gpu_tests.log" | head -60 ;;
    quickstart)
      log quickstart on the GPU
      /usr/bin/time -f "wall %e s" ./$build/ranktune train jobs/configs/quickstart.yaml --set training.output_dir=/tmp/qs \
        > "$OUT/quickstart.log" 2>&1; tail -8 "$OUT/quickstart.log" ;;
    env)
      log mpirun -np 2 ranktune env
      mpirun --allow-run-as-root -np 2 ./$build/ranktune env > "$OUT/env.json" 2>&1; head -40 "$OUT/env.json" ;;
    bench_ops)
      log op benchmark
      ./$build/ranktune_bench_ops 20 > "$OUT/bench_ops.log" 2>&1; tail -20 "$OUT/bench_ops.log"
      ./$build/tests/ranktune_gpu_tests --gtest_also_run_disabled_tests --gtest_filter='*DISABLED_*' >> "$OUT/bench_ops.log" 2>&1
      grep -iE "TFLOP|ms" "$OUT/bench_ops.log" | tail -6 ;;
    bench_step)
      log step benchmark
      for args in "lora --gc 1" "lora --gc 0" "full --gc 1"; do
        ./$build/ranktune_bench_step $args >> "$OUT/bench_step.log" 2>&1
      done
      cat "$OUT/bench_step.log" ;;
    hf)
      log HF peer
      for args in "lora --gc 1" "lora --gc 0" "full --gc 1"; do
        python3 tools/hf_peer_baseline.py $args --steps 10 --warmup 3 >> "$OUT/hf_peer.log" 2>&1
      done
      grep '^{' "$OUT/hf_peer.log" ;;
    benchmark)
      log benchmark: ranktune and the HF peer, one table
      mkdir -p "$OUT/benchmark"
      python3 tools/benchmark.py --build-dir $build --out "$OUT/benchmark" ${BENCHMARK_ARGS:-} 2>&1 |
        tee "$OUT/benchmark/console.log" ;;
  esac
done
