#!/usr/bin/env bash
# Multi-GPU checks in one device call: build, the gpu tests (two-GPU data-parallel equivalence
# among them), and the scaling of `ranktune train` at the Llama-3.2-1B shape from 1 to N GPUs for
# LoRA and full fine-tuning. Logs under $OUT (default ./device-out).
# Usage: tools/device_multi_gpu.sh [stages...]   stages: build tests scaling
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-device-out}
mkdir -p "$OUT"
export NCCL_NVLS_ENABLE=0 OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 PYTHONUNBUFFERED=1
build=build-device
bin=./$build/ranktune
log() { echo "=== $* ($(date +%T))"; }
n_gpus=$(nvidia-smi -L 2>/dev/null | wc -l)
for stage in ${*:-build tests scaling}; do
  case $stage in
    build)
      log "build ($n_gpus GPUs)"
      nvidia-smi --query-gpu=index,name,memory.total --format=csv > "$OUT/gpu.txt" 2>&1; cat "$OUT/gpu.txt"
      cmake -S . -B $build -G Ninja -DCMAKE_BUILD_TYPE=Release -DCMAKE_CUDA_ARCHITECTURES=90a > "$OUT/build.log" 2>&1 &&
        cmake --build $build -j 16 >> "$OUT/build.log" 2>&1 || { grep -E "error|Error" "$OUT/build.log" | head -40; exit 1; } ;;
    tests)
      log gpu tests
      ./$build/tests/ranktune_gpu_tests > "$OUT/gpu_tests.log" 2>&1
      grep -E "^\[  (FAILED|PASSED|SKIPPED) |Failure|rel err|^\[[a-z_0-9]+\] |Which is|Expected" "$OUT/gpu_tests.log" | head -60 ;;
    scaling)
      log "scaling at the 1B shape: 1..$n_gpus GPUs"
      python3 tools/make_bench_data.py > /dev/null
      for mode in lora full; do
        for np in 1 2 4 8; do
          [ "$np" -le "$n_gpus" ] || continue
          dir=/tmp/scaling_${mode}_$np
          rm -rf $dir
          mpirun --allow-run-as-root -np $np -x NCCL_NVLS_ENABLE=0 $bin train jobs/configs/llama1b_$mode.yaml \
            --set model.enable_multi_gpu=true --set training.output_dir=$dir > "$OUT/scaling_${mode}_$np.log" 2>&1
          echo "$mode x$np GPUs: rc=$? $(grep -E '^step 30/' "$OUT/scaling_${mode}_$np.log" | head -1)"
        done
      done
      grep -hE "Multi-GPU|rank [0-9]:" "$OUT"/scaling_lora_*.log | sort -u | head -12 ;;
  esac
done
