#!/usr/bin/env bash
# docs/bench.md's tables: the LLaMA-2-7B shape (random weights) on one GPU - INT8 GEMMs, decode and
# prefill, the 8-bit KV cache, training speed and memory, loading. Run on the GPU from the project root:
#   bash runs/bench.sh OUTDIR [TOKENIZER]    # TOKENIZER: a LLaMA-2 tokenizer.model (load/eval rows)
# Artifacts: results/bench/ (decode-h200/: one H200; the rest: one H100). The tile table the INT8 kernels
# read, extras/int8_configs.json, is what `--sections sweep` writes.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:?usage: bash runs/bench.sh OUTDIR [TOKENIZER]}; tok=${2:-}
python3 -m extras.bench --sections sweep --reps 30 --out "$out/sweep"
python3 -m extras.bench --sections infer,linear,peak --repeat 2 --out "$out/infer"
python3 -m extras.bench --sections kv --reps 10 --repeat 2 --out "$out/kv"
python3 -m extras.bench --sections train --out "$out/train"
[ -n "$tok" ] && python3 -m extras.bench --sections eval,load --tokenizer "$tok" --out "$out/load"
exit 0
# the 8B-class shapes people serve (docs/bench.md, "Llama 3.1 and Qwen2.5 shapes"; results/bench/shapes-h100/)
for s in llama-3.1-8b qwen2.5-7b; do python3 -m extras.bench --shape $s --sections infer --reps 10 --out "$out/$s"; done
