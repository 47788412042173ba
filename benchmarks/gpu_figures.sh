#!/usr/bin/env bash
# Both GPU figures of the trainer in one go, inside a wall-clock budget (a GPU lease is short):
#   benchmarks/gpu_figures.sh LOGDIR [SECONDS]
# train_throughput.py runs first (about 2.5 minutes on an H100 or H200); train_to_map.py gets
# what is left of SECONDS (default 570), less a minute for building its bucket and the final
# evaluation, at most 8 minutes of training (it reached its target in 4.3 on an H100).
# Logs and the trainer's eval.json / metrics.jsonl go to LOGDIR.
# SMOKE=1 runs both with --cpu-smoke (checks the script; the numbers mean nothing).
set -o pipefail
logs=${1:?usage: benchmarks/gpu_figures.sh LOGDIR [SECONDS]}
budget=${2:-570}
started=$(date +%s)
here=$(cd "$(dirname "$0")" && pwd)
python=${PYTHON:-python3}
workdir=${WORKDIR:-/tmp/oistream-train-bench}
export PYTHONUNBUFFERED=1
mkdir -p "$logs"

nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv >"$logs/gpu.txt" 2>&1
"$python" "$here/train_throughput.py" --workdir "$workdir" ${SMOKE:+--cpu-smoke} 2>&1 | tee "$logs/train_throughput.log"

left=$((budget - ($(date +%s) - started)))
minutes=$("$python" -c "print(round(min(8, ($left - 60) / 60), 2))")
echo "train_to_map.py gets $minutes minutes of training"
"$python" "$here/train_to_map.py" --workdir "$workdir" --minutes "$minutes" ${SMOKE:+--cpu-smoke} 2>&1 |
    tee "$logs/train_to_map.log"
run=$(ls -dt "$workdir"/run-to-map-* 2>/dev/null | head -1)
[ -n "$run" ] && cp "$run/eval.json" "$run/metrics.jsonl" "$logs/" 2>/dev/null
echo "done in $(($(date +%s) - started)) s; logs in $logs"
