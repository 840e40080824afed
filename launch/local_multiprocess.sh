#!/usr/bin/env bash
# Usage: launch/local_multiprocess.sh NUM_PROCESSES DEVICES_PER_PROCESS -- [anatjax.main flags]
#
# Runs anatjax.main as NUM_PROCESSES CPU processes on this machine, each with
# DEVICES_PER_PROCESS simulated devices, joined through jax.distributed on 127.0.0.1 with
# gloo collectives: the way to try a multi-host run on a laptop. Process 0's output goes
# to the terminal, the others' to $LOG_DIR/anatjax_process_<i>.log (default /tmp). SIGTERM or
# SIGINT to this script is passed to every process (they save together and exit); if any
# process fails, the others are stopped. Exit code: the first non-zero one, else 0.
#
#   launch/local_multiprocess.sh 2 2 -- --config=configs/afire_vitb.py:runlocal \
#       --workdir=workdirs/two_process
set -euo pipefail
if [[ $# -lt 3 || "$3" != "--" ]]; then
  sed -n '2,13p' "$0" >&2
  exit 2
fi
num_processes=$1
devices=$2
shift 3
port=${PORT:-$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}
log_dir=${LOG_DIR:-/tmp}
pids=()
stop_all() { kill -TERM "${pids[@]}" 2>/dev/null || true; }
trap stop_all TERM INT
for ((i = 0; i < num_processes; i++)); do
  log="$log_dir/anatjax_process_$i.log"
  if ((i == 0)); then log=/dev/stdout; fi
  JAX_NUM_CPU_DEVICES=$devices JAX_PLATFORMS=cpu \
    python -m anatjax.main --coordinator_address="127.0.0.1:$port" \
      --num_processes="$num_processes" --process_id="$i" "$@" >"$log" 2>&1 &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do
  # `wait` returns early when a trapped signal arrives: wait again until the process ends.
  while true; do
    set +e
    wait "$pid"
    code=$?
    set -e
    if kill -0 "$pid" 2>/dev/null; then continue; fi
    break
  done
  if ((code != 0)); then
    ((status == 0)) && status=$code
    stop_all
  fi
done
exit "$status"
