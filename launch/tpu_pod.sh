#!/usr/bin/env bash
# Usage: launch/tpu_pod.sh TPU_NAME ZONE CONFIG [anatjax.main flags]
#
# Copies this checkout to every worker of a Cloud TPU VM pod slice, installs
# requirements-tpu.txt there, and starts one anatjax process per worker. JAX detects the
# pod (coordinator, process count, index) from the TPU VM environment. Output of each
# worker goes to ~/anatjax.log on that worker; the workdir should be a bucket (gs://...)
# or a shared filesystem, since all workers write one checkpoint together.
#
#   launch/tpu_pod.sh my-v5p-64 us-east5-a configs/afire_vitb.py --workdir=gs://bucket/afire
set -euo pipefail
if [[ $# -lt 3 ]]; then
  sed -n '2,10p' "$0" >&2
  exit 2
fi
tpu=$1 zone=$2 config=$3
shift 3
repo=$(cd "$(dirname "$0")/.." && pwd)
flags=$(printf ' %q' "$@")

gcloud compute tpus tpu-vm scp --recurse --zone="$zone" --worker=all \
    "$repo" "$tpu":~/anatjax
gcloud compute tpus tpu-vm ssh "$tpu" --zone="$zone" --worker=all --command="
  set -e
  cd ~/anatjax
  python3 -m venv .venv && .venv/bin/pip install -q -r requirements-tpu.txt
  nohup .venv/bin/python -m anatjax.main --config=$config $flags > ~/anatjax.log 2>&1 &
  echo started on \$(hostname)"
