#!/usr/bin/env bash
# The default recipe under extras.fsdp on a LLaMA-2 shape with random weights (docs/fsdp.md): the
# self-written text written by the sharded model, the PTQ init, training, the save; seconds and peak
# memory as the run prints them. Random weights: a real model's compute and memory, not its text.
#   TOK=tokenizer.model CALIB=text.txt bash runs/fsdp_recipe.sh [SHAPE] [GPUS] [WINDOWS] [STEPS]
# default 13b on 1 GPU, self:8, 5 steps (train.py's default is self:256 and 100 steps: the same code, longer);
# TRAIN="..." adds options (e.g. --seq-len 512).
. "$(dirname "$0")/lib.sh"
shape=${1:-13b}; gpus=${2:-1}; windows=${3:-8}; steps=${4:-5}
ck="$out/$shape-random"
[ -e "$ck/params.json" ] || python3 runs/random_ckpt.py "$shape" "$ck" --tokenizer "$TOK"
t0=$(date +%s)
torchrun --standalone --nproc-per-node "$gpus" -m extras.fsdp --ckpt "$ck" --calib "$calib" \
  --calib "self:$windows" --deployable --checkpointing --steps "$steps" --out "$out/$shape-fsdp.safetensors" \
  --force ${TRAIN:-}
echo "end to end (checkpoint read, text, PTQ, training, save): $(( $(date +%s) - t0 )) s"
