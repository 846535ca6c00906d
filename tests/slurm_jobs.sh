#!/usr/bin/env bash
# The job scripts in jobs/slurm/ under a real Slurm: brings up a private single-node cluster
# (tools/slurm_local.sh, in a temp dir, on free ports) and submits two-rank CPU trainings through
# sbatch, one per script:
#   single_node.sbatch        mpirun inside the allocation; runs to the end
#   multi_node_mpirun.sbatch  on one node; runs to the end
#   multi_node_srun.sbatch    srun --mpi=pmix; gets `scancel --batch --signal=USR1` mid-run, must
#                             checkpoint, exit 75, requeue itself and finish with --resume latest
# Each must end COMPLETED with exit code 0, print the two-rank banner, and leave metrics.jsonl
# (one line per logging step, the last at max_steps) and the LoRA adapter. Stops the cluster on any
# exit. Usage: slurm_jobs.sh RANKTUNE_BINARY SOURCE_DIR
set -uo pipefail
ranktune=$(realpath "$1")
source_dir=$(realpath "$2")
deadline=$((SECONDS + 360))  # ctest's TIMEOUT is longer, so cleanup always runs

if [ "$(id -u)" -ne 0 ]; then
  echo "SKIP: the Slurm daemons run as root; run this test as root"
  exit 77
fi
# A test run inside someone's Slurm job must not take that job's settings for its own jobs.
while read -r var; do unset "$var"; done < <(compgen -e | grep -E '^(SLURM_|SBATCH_|SRUN_|SALLOC_)')

tmp=$(mktemp -d /tmp/ranktune_slurm_test.XXXXXX)
failures=0
cleanup() {
  bash "$source_dir/tools/slurm_local.sh" stop "$tmp/slurm" >/dev/null 2>&1 || true
  if [ "$failures" -eq 0 ]; then rm -rf "$tmp"; else echo "kept $tmp (job outputs, Slurm logs in slurm/log)"; fi
}
trap cleanup EXIT
trap 'exit 1' INT TERM

fail() { echo "FAIL: $*"; failures=$((failures + 1)); }

t0=$SECONDS
bash "$source_dir/tools/slurm_local.sh" start "$tmp/slurm" || { failures=1; echo "FAIL: Slurm did not come up"; exit 1; }
export SLURM_CONF=$tmp/slurm/slurm.conf
echo "Slurm up in $((SECONDS - t0)) s"

export RANKTUNE_BIN=$ranktune OMP_NUM_THREADS=1
cd "$source_dir" || exit 1  # the jobs run in the submit directory: jobs/configs and jobs/data resolve there

# A 0.8M-parameter Llama with LoRA on the quickstart's data, 2 CPU ranks, 0.1-0.3 s a step.
train_args=(jobs/configs/quickstart.yaml --set model.device_map=cpu --set lora.enabled=true
            --set training.per_device_train_batch_size=32 --set training.warmup_steps=5
            --set data.eval_file= --set logging.logging_steps=10)

# submit NAME SCRIPT MAX_STEPS [sbatch args...]: prints the job id.
submit() {
  local name=$1 script=$2 steps=$3
  shift 3
  mkdir -p "$tmp/$name"
  # The GPU scripts' requests, scaled down to this node: 2 tasks of 1 CPU, no GPUs.
  sbatch --parsable --job-name="rt-test-$name-$$" --output="$tmp/$name/job.out" --time=8 \
    --nodes=1 --ntasks-per-node=2 --cpus-per-task=1 --gpus-per-node=0 "$@" \
    "jobs/slurm/$script" "${train_args[@]}" --set training.output_dir="$tmp/$name/run" --set training.max_steps="$steps"
}

job_field() { scontrol show job "$1" 2>/dev/null | grep -o "$2=[^ ]*" | head -1 | cut -d= -f2; }

job_ended() {
  case "$(job_field "$1" JobState)" in
    COMPLETED | FAILED | CANCELLED | TIMEOUT | NODE_FAIL | OUT_OF_MEMORY | BOOT_FAIL | DEADLINE | PREEMPTED) return 0 ;;
    *) return 1 ;;
  esac
}

# wait_done JOB: until the job has ended or the deadline passes.
wait_done() {
  while [ $SECONDS -lt $deadline ]; do
    job_ended "$1" && return 0
    sleep 1
  done
  echo "job $1 still $(job_field "$1" JobState) at the test's deadline"
  return 1
}

# check NAME JOB MAX_STEPS RESTARTS: the job's end state, output and files.
check() {
  local name=$1 job=$2 steps=$3 restarts=$4 out=$tmp/$1/job.out run=$tmp/$1/run
  echo "--- $name: job $job, $(job_field "$job" JobState), exit $(job_field "$job" ExitCode), restarts $(job_field "$job" Restarts)"
  local ok=1
  [ "$(job_field "$job" JobState)" = COMPLETED ] || { fail "$name: job state $(job_field "$job" JobState)"; ok=0; }
  [ "$(job_field "$job" ExitCode)" = 0:0 ] || { fail "$name: exit code $(job_field "$job" ExitCode)"; ok=0; }
  [ "$(job_field "$job" Restarts)" = "$restarts" ] || { fail "$name: $(job_field "$job" Restarts) restarts, expected $restarts"; ok=0; }
  grep -q "^Multi-GPU training enabled: 2 ranks x 1 CPU" "$out" || { fail "$name: no two-rank banner"; ok=0; }
  grep -q "^  rank 1: " "$out" || { fail "$name: the banner lists no rank 1"; ok=0; }
  local lines
  lines=$(grep -c '"step":' "$run/metrics.jsonl" 2>/dev/null)
  [ "${lines:-0}" -eq $((steps / 10)) ] || { fail "$name: metrics.jsonl has ${lines:-no} lines, expected $((steps / 10))"; ok=0; }
  tail -n 1 "$run/metrics.jsonl" 2>/dev/null | grep -q "\"step\":${steps}[,}]" || { fail "$name: metrics.jsonl does not end at step $steps"; ok=0; }
  for f in adapter/adapter_config.json adapter/adapter_model.safetensors; do
    [ -s "$run/$f" ] || { fail "$name: no $f"; ok=0; }
  done
  if [ "$ok" -eq 0 ]; then
    echo "--- $out:"
    cat "$out"
  fi
}

# Slurm runs them one after another (each takes both CPUs of the node), in this order.
t0=$SECONDS
single=$(submit single single_node.sbatch 40) || { failures=1; exit 1; }
mpirun_job=$(submit mpirun multi_node_mpirun.sbatch 40) || { failures=1; exit 1; }
srun_job=$(submit srun multi_node_srun.sbatch 100) || { failures=1; exit 1; }
echo "submitted jobs $single $mpirun_job $srun_job"

# Preempt the srun job once it has logged step 20: Slurm's warning signal to the batch shell.
until grep -q "^step 20/100" "$tmp/srun/job.out" 2>/dev/null; do
  if [ $SECONDS -ge $deadline ] || job_ended "$srun_job"; then break; fi
  sleep 0.5
done
if grep -q "^step 20/100" "$tmp/srun/job.out" 2>/dev/null; then
  scancel --batch --signal=USR1 "$srun_job"
  echo "sent SIGUSR1 to job $srun_job at $((SECONDS - t0)) s"
else
  fail "srun: never reached step 20"
fi

for job in "$single" "$mpirun_job" "$srun_job"; do wait_done "$job" || failures=$((failures + 1)); done
echo "jobs done in $((SECONDS - t0)) s"

check single "$single" 40 0
grep -q "^job $single (restart 0) on .*: mpirun -np 2 " "$tmp/single/job.out" || fail "single: not launched by mpirun -np 2"
check mpirun "$mpirun_job" 40 0
check srun "$srun_job" 100 1
out=$tmp/srun/job.out
grep -q ": srun --mpi=pmix " "$out" || fail "srun: not launched by srun --mpi=pmix"
grep -q "^SIGUSR1 received: stopped after step" "$out" || fail "srun: ranktune did not stop on SIGUSR1"
grep -q "ranktune exited 75: requeueing" "$out" || fail "srun: the script did not requeue on exit 75"
grep -q "^job $srun_job (restart 1) on .* train jobs/configs/quickstart.yaml --resume latest --set " "$out" ||
  fail "srun: the restarted job did not pass --resume latest"
grep -q "^resumed from $tmp/srun/run/checkpoints/step-" "$out" || fail "srun: the restart did not resume from the checkpoint"

if [ "$failures" -ne 0 ]; then
  echo "--- slurmctld log (tail):"
  tail -n 30 "$tmp/slurm/log/slurmctld.log"
  echo "slurm jobs: $failures failure(s)"
  exit 1
fi
echo "slurm jobs: all three scripts ran, the srun job was preempted, requeued and resumed ($((SECONDS - t0)) s)"
