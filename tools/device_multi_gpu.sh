#!/usr/bin/env bash
# Multi-GPU checks in one device call: build, the gpu tests (two-GPU data-parallel equivalence
# among them), and the scaling of `ranktune train` at the Llama-3.2-1B shape from 1 to N GPUs for
# LoRA and full fine-tuning. Logs under $OUT (default ./device-out).
# Usage: tools/device_multi_gpu.sh [stages...]
#   stages: build tests scaling export_hf hf_dir memory auto_cap perf comm lora_dp
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-device-out}
mkdir -p "$OUT"
export NCCL_NVLS_ENABLE=0 OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 PYTHONUNBUFFERED=1
build=build-device
bin=./$build/ranktune
log() { echo "=== $* ($(date +%T))"; }
n_gpus=$(nvidia-smi -L 2>/dev/null | wc -l)
# One line per ranktune_bench_step JSON line of a log: the run, tokens/s, step time, peak and plan.
summarize() {
  python3 - "$1" <<'PY'
import json, sys
for line in open(sys.argv[1]):
    if line.startswith("{"):
        j = json.loads(line)
        print(f"{j['mode']:6s} gpus={j['gpus']} zero={j.get('zero', 0)} gc={j['grad_ckpt']} tok/s {j['tokens_per_s']:7d} "
              f"step {j['step_ms']:7.1f} ms peak {j['peak_mem_gib']:6.2f} GiB plan {j['plan_mem_gib']:6.2f} GiB "
              f"({100*(j['plan_mem_gib']/j['peak_mem_gib']-1):+.1f}%)")
PY
}
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
      if [ "$n_gpus" -ge 2 ]; then  # full fine-tuning with ZeRO-1 (optimizer states sharded over the ranks)
        for np in 2 4 8; do
          [ "$np" -le "$n_gpus" ] || continue
          dir=/tmp/scaling_zero1_$np
          rm -rf $dir
          mpirun --allow-run-as-root -np $np -x NCCL_NVLS_ENABLE=0 $bin train jobs/configs/llama1b_full.yaml \
            --set model.enable_multi_gpu=true --set distributed.zero_stage=1 --set training.output_dir=$dir \
            > "$OUT/scaling_zero1_$np.log" 2>&1
          echo "full zero1 x$np GPUs: rc=$? $(grep -E '^step 30/' "$OUT/scaling_zero1_$np.log" | head -1)"
        done
      fi
      if [ "$n_gpus" -ge 4 ]; then  # 2 ranks x 2 GPUs: data parallel over ranks, device_map auto inside each
        dir=/tmp/scaling_lora_2x2
        rm -rf $dir
        mpirun --allow-run-as-root -np 2 -x NCCL_NVLS_ENABLE=0 $bin train jobs/configs/llama1b_lora.yaml \
          --set model.enable_multi_gpu=true --set model.device_map=auto --set training.output_dir=$dir \
          > "$OUT/scaling_lora_2x2.log" 2>&1
        echo "lora 2 ranks x 2 GPUs (device_map auto): rc=$? $(grep -E '^step 30/' "$OUT/scaling_lora_2x2.log" | head -1)"
        grep -hE "Multi-GPU|rank [0-9]|device_map auto|rror" "$OUT/scaling_lora_2x2.log" | sort -u | head -8
      fi
      grep -hE "Multi-GPU|rank [0-9]:" "$OUT"/scaling_lora_*.log | sort -u | head -12 ;;
    export_hf)
      log "HF transformers/peft load ranktune's exports"
      python3 tools/check_export_hf.py --device cuda:0 --ranktune-bin ./$build/ranktune \
        --dump-bin ./$build/ranktune_dump_logits --out /tmp/export_hf > "$OUT/export_hf.log" 2>&1
      echo "rc=$?"; tail -30 "$OUT/export_hf.log" ;;
    hf_dir)
      log "a sharded Llama-3.2-1B-shaped HF directory (save_pretrained) loaded by ranktune vs HF"
      python3 tools/check_hf_model_dir.py --dump-bin ./$build/ranktune_dump_logits --device cuda:0 --out /tmp/hf_dir \
        > "$OUT/hf_dir.log" 2>&1
      echo "rc=$?"; tail -3 "$OUT/hf_dir.log"
      if [ -d /tmp/hf_dir/llama-3.2-1b-shape ]; then
        python3 tools/make_bench_data.py > /dev/null
        printf 'model: {name_or_path: /tmp/hf_dir/llama-3.2-1b-shape, tokenizer: byte, max_seq_length: 2048}\nlora: {enabled: true, r: 16, lora_alpha: 16}\ndata: {train_file: jobs/data/bench/train.jsonl, format: text, packing: true}\ntraining: {per_device_train_batch_size: 2, max_steps: 20, warmup_steps: 2, learning_rate: 2.0e-4}\nlogging: {logging_steps: 10, progress_bar: "false"}\n' > /tmp/hf_dir/run.yaml
        for q in false true; do
          $bin train /tmp/hf_dir/run.yaml --set model.load_in_4bit=$q --set training.output_dir=/tmp/hf_dir/run_$q \
            > "$OUT/hf_dir_train_4bit_$q.log" 2>&1
          echo "load_in_4bit=$q: rc=$? $(grep -E '^step 20/|^memory' "$OUT/hf_dir_train_4bit_$q.log" | tr '\n' ' ')"
        done
      fi ;;
    memory)
      log "1B shape at 2 x 2048: measured peak vs the memory plan (LoRA, QLoRA, offload)"
      for args in "lora --gc 1" "qlora --gc 1" "lora --gc 2" "lora --gc 0" "full --gc 1"; do
        ./$build/ranktune_bench_step $args --steps 8 --warmup 2 >> "$OUT/memory.log" 2>&1
      done
      summarize "$OUT/memory.log"
      ;;
    perf)
      log "ranktune_bench_step at 2 x 2048: (a) LoRA, (c) full with its op profile, and on 2 GPUs (c) plain and ZeRO-1"
      run() { echo "--- $*" >> "$OUT/perf.log"; "$@" >> "$OUT/perf.log" 2>&1; }
      run ./$build/ranktune_bench_step lora --gc 1 --steps 8 --warmup 2
      run ./$build/ranktune_bench_step full --gc 1 --steps 8 --warmup 2
      run ./$build/ranktune_bench_step full --gc 1 --steps 4 --warmup 2 --profile 1
      if [ "$n_gpus" -ge 2 ]; then
        run mpirun --allow-run-as-root -np 2 -x NCCL_NVLS_ENABLE=0 ./$build/ranktune_bench_step full --gc 1 --ranks 2 --steps 8 --warmup 2
        run mpirun --allow-run-as-root -np 2 -x NCCL_NVLS_ENABLE=0 ./$build/ranktune_bench_step full --gc 1 --ranks 2 --zero 1 --steps 8 --warmup 2
      fi
      summarize "$OUT/perf.log"
      grep -A40 "^op profile" "$OUT/perf.log" | head -45 ;;
    comm)
      log "2 GPUs: (c) ZeRO-1 and plain, (a) plain, under NCCL CTA limits; (c) ZeRO-1 op profile per rank"
      step=./$build/ranktune_bench_step
      for ctas in default 4 8 16; do
        env=""; [ "$ctas" = default ] || env="-x NCCL_MAX_CTAS=$ctas -x NCCL_MIN_CTAS=$ctas"
        for args in "full --zero 1" "full --zero 0" "lora"; do
          line=$(mpirun --allow-run-as-root -np 2 -x NCCL_NVLS_ENABLE=0 $env $step $args --gc 1 --ranks 2 --steps 8 --warmup 2 2>>"$OUT/comm.err" | grep '^{')
          echo "ctas=$ctas $args: $(echo "$line" | python3 -c 'import json,sys; j=json.loads(sys.stdin.read()); print(j["tokens_per_s"], "tok/s", round(j["step_ms"],1), "ms")')"
        done
      done
      mpirun --allow-run-as-root -np 2 -x NCCL_NVLS_ENABLE=0 --output-filename "$OUT/prof_zero" $step full --zero 1 --gc 1 --ranks 2 --steps 4 --warmup 2 --profile 1 > /dev/null 2>&1
      for f in $(find "$OUT/prof_zero" -name 'stderr' | sort); do echo "## $f"; grep -A30 "^op profile" "$f" | grep -E "matmul|adamw|attention|idle|outside|wall|sum of"; done ;;
    lora_dp)
      log "(a) on each GPU alone, then on 2 GPUs with every rank's op profile"
      step=./$build/ranktune_bench_step
      for gpu in $(seq 0 $((n_gpus - 1))); do
        CUDA_VISIBLE_DEVICES=$gpu $step lora --gc 1 --steps 8 --warmup 2 >> "$OUT/lora_dp.log" 2>&1
      done
      mpirun --allow-run-as-root -np 2 -x NCCL_NVLS_ENABLE=0 $step lora --gc 1 --ranks 2 --steps 8 --warmup 2 \
        >> "$OUT/lora_dp.log" 2>&1
      summarize "$OUT/lora_dp.log"
      $step lora --gc 1 --steps 4 --warmup 2 --profile 1 > /dev/null 2> "$OUT/prof_lora_1.txt"
      mpirun --allow-run-as-root -np 2 -x NCCL_NVLS_ENABLE=0 --output-filename "$OUT/prof_lora_dp" $step lora --gc 1 \
        --ranks 2 --steps 4 --warmup 2 --profile 1 > /dev/null 2>&1
      for f in "$OUT/prof_lora_1.txt" $(find "$OUT/prof_lora_dp" -name 'stderr' | sort); do
        echo "## $f"; grep -A40 "^op profile" "$f" | grep -E "matmul|attention|idle|outside|wall|sum of|step"
      done ;;
    auto_cap)
      log "a per-GPU cap of 3 GiB: one GPU is refused with the plan, device_map auto over $n_gpus GPUs trains"
      python3 tools/make_bench_data.py > /dev/null
      $bin train jobs/configs/llama1b_lora.yaml --set distributed.max_memory_per_gpu=3GiB --set training.max_steps=20 \
        --set training.output_dir=/tmp/cap_one > "$OUT/cap_one.log" 2>&1
      echo "one GPU: rc=$?"; grep -iE "exceed|budget|error" "$OUT/cap_one.log" | head -3
      $bin train jobs/configs/llama1b_lora.yaml --set model.device_map=auto --set distributed.max_memory_per_gpu=3GiB \
        --set training.max_steps=30 --set training.output_dir=/tmp/cap_auto > "$OUT/cap_auto.log" 2>&1
      echo "device_map auto: rc=$?"; grep -E "device_map auto|^step 30/|^memory|rror" "$OUT/cap_auto.log" | head -6
      nvidia-smi --query-gpu=index,memory.used --format=csv ;;
  esac
done
