#!/usr/bin/env bash
# End-to-end check of mgpu on a machine with real NVIDIA GPUs (NVML), as root: the GPUs are
# found with their memory, jobs run as an ordinary user on the GPU they were given, two jobs
# share one GPU by memory, memory used outside mgpu holds jobs back until it is freed, a job's
# own memory is not mistaken for outside use, cancelling frees the GPU, a job array's tasks share
# the GPU, a PyTorch job that allocates past its --mem on a shared GPU ends OUT_OF_MEMORY while
# its neighbour runs on (and the time that takes), and a GPU job survives a server restart.
# Needs a Python with PyTorch (the CUDA workload).
#
# Usage: scripts/gpu-check.sh [BIN_DIR] [PYTHON]
#   BIN_DIR: where the mgpu binaries are (default: target/dist, then target/release)
#   PYTHON:  a python3 that can `import torch` (default: python3 on PATH)
# Exits non-zero at the first check that fails; prints what it saw either way.
set -euo pipefail
cd "$(dirname "$0")/.."

bin=${1:-}
if [ -z "$bin" ]; then
  bin=target/dist
  [ -x "$bin/mgpu_scheduler_server" ] || bin=target/release
fi
bin=$(cd "$bin" && pwd)
py=$(command -v "${2:-python3}")
user=mgpu-gpucheck

say() { printf '== %s\n' "$*"; }
fail() { printf 'FAILED: %s\n' "$*" >&2; exit 1; }
[ "$(id -u)" = 0 ] || fail "run as root (jobs run as the test user $user)"
nvidia-smi -L || fail "no NVIDIA GPU here"
"$py" -c 'import torch; assert torch.cuda.is_available()' || fail "$py cannot use CUDA through torch"
id "$user" >/dev/null 2>&1 || useradd --create-home --shell /bin/bash "$user"
home=$(getent passwd "$user" | cut -d: -f6)

work=$(mktemp -d /tmp/mgpu-gpucheck.XXXXXX)
chmod 755 "$work"
export MGPU_SOCKET="$work/mgpu.sock"
server=
start_server() {
  # shellcheck disable=SC2086 # MGPU_GPUCHECK_SERVER_ARGS: extra flags, split on spaces
  MGPU_LOG=debug "$bin/mgpu_scheduler_server" ${MGPU_GPUCHECK_SERVER_ARGS:-} --state-dir "$work/state" --log-dir "$work/logs" \
    --grace-period 2 2>>"$work/server.log" &
  server=$!
  for _ in $(seq 200); do [ -S "$MGPU_SOCKET" ] && return; sleep 0.05; done
  cat "$work/server.log"; fail "the server did not come up"
}
stop_server() { kill "$server"; wait "$server" || true; }
cleanup() {
  [ -n "$server" ] && kill "$server" 2>/dev/null || true
  pkill -u "$user" 2>/dev/null || true
  [ -n "${foreign:-}" ] && kill "$foreign" 2>/dev/null || true
  echo "== server log (last 40 lines of $work/server.log)"
  tail -n 40 "$work/server.log" || true
}
trap cleanup EXIT

# Runs an mgpu client as the test user, from their home, with the Python on PATH.
as_user() { (cd "$home" && runuser -u "$user" -- env PATH="$(dirname "$py"):$PATH" MGPU_SOCKET="$MGPU_SOCKET" "$@"); }
queue_json() { "$bin/mgpu_queue" --json; }
# Evaluates a Python expression over the queue's JSON (bound to q).
q() { queue_json | "$py" -c "import json,sys; q=json.load(sys.stdin); print($1)"; }
state_of() { q "next((j['state'] for j in q['jobs'] if j['id']==$1), 'GONE')"; }
wait_state() { # job, wanted state, seconds
  for _ in $(seq $(( $3 * 10 ))); do [ "$(state_of "$1")" = "$2" ] && return; sleep 0.1; done
  "$bin/mgpu_queue"; fail "job $1 is $(state_of "$1"), not $2, after $3 s"
}
nvml_used_mib() { nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -i 0; }
# A CUDA job: allocates GIB GiB on its GPU, says where it runs, then sleeps SECS.
cuda_job() { # gib secs
  echo "import os,time,torch,pwd
x=torch.empty($1*2**30,dtype=torch.uint8,device='cuda'); x.fill_(1); torch.cuda.synchronize()
print('job', os.environ.get('MGPU_JOB_ID'), 'user', pwd.getpwuid(os.getuid()).pw_name, 'uid', os.getuid(), 'CUDA_VISIBLE_DEVICES', os.environ.get('CUDA_VISIBLE_DEVICES'), torch.cuda.get_device_name(0), 'allocated GiB', $1, flush=True)
time.sleep($2)"
}

start_server
say "server: $(grep -o 'gpus=.* state_dir' "$work/server.log" | head -1 | sed 's/ state_dir//')"
"$bin/mgpu_queue"

say "1. the GPUs NVML reports, with their memory"
smi_total=$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits -i 0)
ours_total=$(q "q['gpus'][0]['total_mib']")
ngpus=$(q "len(q['gpus'])")
[ "$ngpus" = "$(nvidia-smi -L | wc -l)" ] || fail "mgpu manages $ngpus GPUs, nvidia-smi lists $(nvidia-smi -L | wc -l)"
[ "$ours_total" -le "$smi_total" ] && [ "$ours_total" -ge $(( smi_total - 1 )) ] ||
  fail "GPU 0: mgpu says $ours_total MiB, nvidia-smi $smi_total MiB"
echo "GPU 0: $(q "q['gpus'][0]['name']"), $ours_total MiB (nvidia-smi: $smi_total MiB)"
total_gib=$(( ours_total / 1024 ))

say "2. an attached CUDA job runs as $user on the GPU it was given"
out=$(as_user "$bin/mgpu_srun" --gpus 1 --mem 8G -J attached -- python3 -c "$(cuda_job 4 0)")
echo "$out"
grep -q "user $user uid $(id -u "$user") CUDA_VISIBLE_DEVICES 0 " <<<"$out" || fail "attached job output: $out"

say "3. two jobs share GPU 0 by memory, and a job's own memory is not counted as foreign"
half=$(( total_gib / 2 - 4 ))
a=$(as_user "$bin/mgpu_srun" --detach --parsable --mem "${half}G" -J share-a -- python3 -c "$(cuda_job $(( half - 8 )) 30)")
b=$(as_user "$bin/mgpu_srun" --detach --parsable --mem "${half}G" -J share-b -- python3 -c "$(cuda_job $(( half - 8 )) 30)")
wait_state "$a" RUNNING 5
wait_state "$b" RUNNING 5
# Wait until both hold their memory and NVML has been read again (every 0.5 s).
for _ in $(seq 300); do [ "$(nvml_used_mib)" -ge $(( (half - 8) * 2 * 1024 )) ] && break; sleep 0.1; done
sleep 3
"$bin/mgpu_queue"
used=$(q "q['gpus'][0]['used_mib']")
[ "$used" -ge $(( (half - 8) * 2 * 1024 )) ] || fail "mgpu_queue shows $used MiB used; the jobs hold $(( (half - 8) * 2 )) GiB"
# What is left beside the two reservations still fits a third job: their processes' memory is
# theirs, not someone else's (were it counted as foreign, this job would wait).
rest=$(( total_gib - 2 * half - 1 ))
c=$(as_user "$bin/mgpu_srun" --detach --parsable --mem "${rest}G" -J fits-beside -- true)
wait_state "$c" GONE 10
as_user "$bin/mgpu_acct" -j "$c" || true
[ "$(as_user "$bin/mgpu_acct" --json -j "$c" | "$py" -c 'import json,sys; print(json.load(sys.stdin)["jobs"][0]["state"])')" = COMPLETED ] ||
  fail "job $c did not complete"

say "4. cancelling a running CUDA job frees its memory"
as_user "$bin/mgpu_cancel" "$a" "$b"
wait_state "$a" GONE 10
wait_state "$b" GONE 10
for _ in $(seq 100); do [ "$(nvml_used_mib)" -lt 4096 ] && break; sleep 0.1; done
[ "$(nvml_used_mib)" -lt 4096 ] || fail "GPU memory still used after cancel: $(nvml_used_mib) MiB"
echo "GPU 0 memory used after cancel: $(nvml_used_mib) MiB"

say "4b. a job array's tasks share GPU 0 by memory, each told its index"
arr=$(as_user "$bin/mgpu_srun" --array 0-3 --parsable --mem "$(( total_gib / 4 - 2 ))G" -J arr -- \
  python3 -c "$(cuda_job 8 4)"'
import os; print("task", os.environ["MGPU_ARRAY_TASK_ID"], "of", os.environ["MGPU_ARRAY_TASK_COUNT"])')
for t in 0 1 2 3; do wait_state $(( arr + t )) RUNNING 10; done
"$bin/mgpu_queue"
for t in 0 1 2 3; do wait_state $(( arr + t )) GONE 60; done
for t in 0 1 2 3; do
  as_user "$bin/mgpu_log" $(( arr + t )) | grep -q "^task $t of 4" || fail "array task $t: $(as_user "$bin/mgpu_log" $(( arr + t )))"
done
as_user "$bin/mgpu_acct" -j "$arr"

say "5. memory used outside mgpu holds jobs back until it is freed"
hog=$(( total_gib - 40 ))
"$py" -c "$(cuda_job "$hog" 600)" >"$work/foreign.out" 2>&1 &
foreign=$!
for _ in $(seq 300); do grep -q allocated "$work/foreign.out" && break; sleep 0.1; done
grep -q allocated "$work/foreign.out" || { cat "$work/foreign.out"; fail "the foreign process did not allocate"; }
sleep 2 # the server reads NVML every 0.5 s
"$bin/mgpu_queue"
too_big=$(as_user "$bin/mgpu_srun" --detach --parsable --mem 50G -J too-big -- python3 -c "$(cuda_job 1 1)")
excl=$(as_user "$bin/mgpu_srun" --detach --parsable -J exclusive -- python3 -c "$(cuda_job 1 1)")
small=$(as_user "$bin/mgpu_srun" --detach --parsable --mem 20G -J small -- true)
wait_state "$small" GONE 10
sleep 1
[ "$(state_of "$too_big")" = PENDING ] || fail "job $too_big (50 GiB) runs beside $hog GiB of foreign memory"
[ "$(state_of "$excl")" = PENDING ] || fail "exclusive job $excl runs beside a foreign process"
"$bin/mgpu_queue"
kill "$foreign"; wait "$foreign" || true; foreign=
freed=$(date +%s%N)
for _ in $(seq 1000); do [ "$(state_of "$too_big")" = PENDING ] || break; sleep 0.01; done
echo "job $too_big left PENDING $(( ($(date +%s%N) - freed) / 1000000 )) ms after the foreign process ended"
wait_state "$too_big" GONE 30
wait_state "$excl" GONE 30
for j in "$too_big" "$excl"; do
  [ "$(as_user "$bin/mgpu_acct" --json -j "$j" | "$py" -c 'import json,sys; print(json.load(sys.stdin)["jobs"][0]["state"])')" = COMPLETED ] ||
    fail "job $j did not complete"
done
as_user "$bin/mgpu_log" "$too_big"

say "5b. a PyTorch job that allocates past its --mem on a shared GPU ends OUT_OF_MEMORY; its neighbour runs on"
nb=$(as_user "$bin/mgpu_srun" --detach --parsable --mem 8G -J neighbour -- python3 -c "$(cuda_job 4 30)")
wait_state "$nb" RUNNING 5
# 4 GiB inside its 8, then 1 GiB more every 0.2 s up to 16 GiB, saying when it crossed 8 GiB.
over=$(as_user "$bin/mgpu_srun" --detach --parsable --mem 8G -J over -- python3 -c "import time,torch
xs=[torch.empty(4*2**30,dtype=torch.uint8,device='cuda')]; torch.cuda.synchronize()
print('inside', flush=True)
for i in range(12):
    xs.append(torch.empty(2**30,dtype=torch.uint8,device='cuda')); xs[-1].fill_(1); torch.cuda.synchronize()
    if torch.cuda.memory_allocated() > 8*2**30 and 'crossed' not in globals():
        crossed=time.time_ns(); print('crossed', crossed, flush=True)
    time.sleep(0.2)
time.sleep(60)")
wait_state "$over" RUNNING 5
[ "$(q "[j for j in q['jobs'] if j['id']==$over][0]['gpu_ids']")" = "$(q "[j for j in q['jobs'] if j['id']==$nb][0]['gpu_ids']")" ] ||
  fail "jobs $over and $nb do not share a GPU"
for _ in $(seq 3000); do [ "$(state_of "$over")" = GONE ] && break; sleep 0.01; done
ended=$(date +%s%N)
wait_state "$over" GONE 1
crossed=$(as_user "$bin/mgpu_log" "$over" | awk '/^crossed/ {print $2}')
as_user "$bin/mgpu_log" "$over"
as_user "$bin/mgpu_acct" -j "$over"
acct_over=$(as_user "$bin/mgpu_acct" --json -j "$over")
[ "$("$py" -c 'import json,sys; print(json.load(sys.stdin)["jobs"][0]["state"])' <<<"$acct_over")" = OUT_OF_MEMORY ] ||
  fail "job $over (past its --mem on a shared GPU) did not end OUT_OF_MEMORY: $acct_over"
as_user "$bin/mgpu_log" "$over" | grep -q "over its reservation of 8192 MiB" || fail "job $over's log does not say why it was stopped"
[ "$("$py" -c 'import json,sys; print(json.load(sys.stdin)["jobs"][0]["peak_gpu_mem_mib"] > 8192)' <<<"$acct_over")" = True ] ||
  fail "job $over's peak GPU memory is not recorded above its --mem: $acct_over"
[ -n "$crossed" ] && echo "job $over crossed its reservation -> gone from the queue (OUT_OF_MEMORY): $(( (ended - crossed) / 1000000 )) ms (--gpu-mem-tolerance, default 2 s; NVML read every 0.5 s; then SIGTERM)"
[ "$(state_of "$nb")" = RUNNING ] || fail "neighbour $nb is $(state_of "$nb") after job $over was stopped"
wait_state "$nb" GONE 60
[ "$(as_user "$bin/mgpu_acct" --json -j "$nb" | "$py" -c 'import json,sys; print(json.load(sys.stdin)["jobs"][0]["state"])')" = COMPLETED ] ||
  fail "neighbour $nb did not complete"

say "6. a CUDA job survives a server restart"
r=$(as_user "$bin/mgpu_srun" --detach --parsable --mem 10G -J survivor -- python3 -c "$(cuda_job 4 15)")
wait_state "$r" RUNNING 5
for _ in $(seq 300); do as_user "$bin/mgpu_log" "$r" | grep -q allocated && break; sleep 0.1; done
stop_server
start_server
[ "$(state_of "$r")" = RUNNING ] || fail "job $r is $(state_of "$r") after the restart"
wait_state "$r" GONE 30
as_user "$bin/mgpu_acct" -j "$r"
as_user "$bin/mgpu_log" "$r" | grep -q "CUDA_VISIBLE_DEVICES 0" || fail "job $r's log: $(as_user "$bin/mgpu_log" "$r")"

say "7. NVML reads, as the server timed them"
grep -o 'NVML usage read in [0-9.]* *[µm]*s' "$work/server.log" | sort | uniq -c | sort -rn | head -5 || true
say "all GPU checks passed"
