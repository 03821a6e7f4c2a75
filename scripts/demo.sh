#!/usr/bin/env bash
# Builds mgpu's commands (only those: not the simulator or the benchmarks), starts a scheduler
# on a private socket (real GPUs through NVML when this machine has them, else 4 simulated
# 24 GiB GPUs), runs sample jobs through mgpu_srun, shows the queue, and stops the scheduler
# again.
# Usage: scripts/demo.sh [--keep]
#   --keep: leave the scheduler running and print the two `export` lines (PATH, MGPU_SOCKET)
#           that point a shell at it, to try the README's examples; and how to stop it.
set -euo pipefail
cd "$(dirname "$0")/.."
keep=false
case "${1:-}" in
  --keep) keep=true ;;
  "") ;;
  *) echo "usage: scripts/demo.sh [--keep]" >&2; exit 2 ;;
esac
cargo build --release --locked -p mgpu --bins
bin="$PWD/target/release"
demo=$(mktemp -d /tmp/mgpu-demo.XXXXXX)
chmod 755 "$demo"
export MGPU_SOCKET="$demo/mgpu.sock"

gpu_args=()
if ! nvidia-smi -L >/dev/null 2>&1; then
  echo "== no NVIDIA GPU here: using 4 simulated 24 GiB GPUs"
  gpu_args=(--simulate-gpus 4x24GiB)
fi
"$bin/mgpu_scheduler_server" --state-dir "$demo/state" --log-dir "$demo/logs" "${gpu_args[@]}" \
  </dev/null >/dev/null 2>"$demo/server.log" &
server=$!
stop() {
  kill "$server" 2>/dev/null
  wait "$server" 2>/dev/null
  echo "== scheduler stopped (its log: $demo/server.log)"
}
trap stop EXIT
for _ in $(seq 100); do [ -S "$MGPU_SOCKET" ] && break; sleep 0.1; done

echo "== an attached job: its output streams here and srun exits with its exit code"
"$bin/mgpu_srun" --gpus 1 --mem 4096 --job-name hello -- \
  bash -c 'echo "hello from job $MGPU_JOB_ID, running as $USER on GPU $CUDA_VISIBLE_DEVICES"'
echo "== two detached jobs sharing one GPU by memory, and one exclusive 2-GPU job"
"$bin/mgpu_srun" --detach --mem 8G --job-name share-a -- sleep 3
"$bin/mgpu_srun" --detach --mem 8G --job-name share-b -- sleep 3
"$bin/mgpu_srun" --detach --gpus 2 --time-limit 10:00 --job-name train -- sleep 3
echo "== a job array of 8 tasks, at most 2 at once (the others wait as JobArrayTaskLimit)"
"$bin/mgpu_srun" --array 0-7%2 --mem 2G --job-name sweep -- \
  bash -c 'echo "task $MGPU_ARRAY_TASK_ID of $MGPU_ARRAY_TASK_COUNT"; sleep 3'
"$bin/mgpu_queue"
if $keep; then
  trap - EXIT
  cat <<END
== the scheduler keeps running (pid $server, its log: $demo/server.log). In your shell:

export PATH="$bin:\$PATH"
export MGPU_SOCKET="$demo/mgpu.sock"

then try the README's examples (mgpu_queue, mgpu_srun --gpus 1 -- nvidia-smi, mgpu_acct, ...).
Stop it, and remove what it kept, with:
  MGPU_SOCKET=$demo/mgpu.sock $bin/mgpu_cancel --all; kill $server; rm -rf $demo
END
  exit 0
fi
echo "== cancelling everything"
"$bin/mgpu_cancel" --all --verbose
