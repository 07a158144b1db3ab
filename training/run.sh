#!/usr/bin/env bash
# The long CIFAR-10 runs of issue 23, one schedule each, resumed wherever they stopped: from the full state in
# $STATE (this machine, if it still has it), else from the compact copy committed under training/<run>/.
#   bash training/run.sh            # start or resume every run below, in the background, one thread each
#   bash training/run.sh msdnet     # only the runs whose name contains "msdnet"
# Logs: $STATE/<run>.log. The compact copies are rewritten every epoch: commit them before a session stops.
set -euo pipefail
cd "$(dirname "$0")/.."
STATE=${STATE:-/work/train_state}
DATA=${DATA:-../shared/data/cifar10_jpeg.npz}
PYTHON=${PYTHON:-python}
mkdir -p "$STATE"

start() {  # start NAME NICE ARGS...
  local name=$1 nice=$2; shift 2
  if [ -n "${ONLY:-}" ] && [[ $name != *$ONLY* ]]; then return; fi
  if pgrep -f -- "--output $STATE/$name " >/dev/null; then echo "$name: already running"; return; fi
  OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 nohup nice -n "$nice" "$PYTHON" -m dynzoo.train "$@" \
    --dataset cifar10 --data-path "$DATA" --output "$STATE/$name" --compact-dir "training/$name" --resume \
    --model-ema --workers 1 --no-progress --retain-freed-memory --export-name "$name" --export-dtype float16 >>"$STATE/$name.log" 2>&1 &
  echo "$name: started (log $STATE/$name.log)"
}

ONLY=${1:-}
# 1. MSDNet-b7, 100 epochs, and 2. SDPoint PreResNet-20, 200 epochs: finished and shipped (docs/training.md).
# 3. SCAN ResNet-18: 50 epochs of cosine after 2 warm-up epochs, the SCAN authors' loss (no label smoothing), bf16,
#    compiled step.
start scan_resnet18.c10 -10 --model scan_resnet18 --preset fast_cifar --epochs 50 --compile
