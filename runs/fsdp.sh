#!/usr/bin/env bash
# docs/fsdp.md's table: sharded SASQ training (FSDP2) on LLaMA-2 shapes with random weights, seconds per
# step, tokens/s, MFU and peak memory per GPU, for 1..N GPUs of one host.
#   bash runs/fsdp.sh [SHAPE] [GPUS]       # default: 13b on 2 GPUs; 70b needs 2+ H200s
# Artifacts: results/fsdp/ (two H200s).
set -euo pipefail
cd "$(dirname "$0")/.."
shape=${1:-13b}; gpus=${2:-2}
python3 -m extras.bench_train --shape "$shape" --checkpointing --batch-size 2 --header
for n in $(seq 2 "$gpus"); do
  torchrun --standalone --nproc-per-node "$n" -m extras.bench_train --shape "$shape" --checkpointing \
    --batch-size 2
done
