#!/usr/bin/env bash
# docs/kvcache.md's GPU table: static KV-cache scales (KV8 int, KV8 FP8, KV4 int) trained with the
# deployable recipe, exported, scored beside a float, a per-token dynamic and a PTQ cache.
#   OUT=DIR CKPT=GGUF WT=.data/wikitext bash runs/kv.sh [train|eval]
# Artifacts: results/kv/ (one H200). The CPU rows: runs/kv_cpu.sh; vLLM's reading: runs/kv_vllm.py.
. "$(dirname "$0")/lib.sh"
if [ "${1:-train}" = train ]; then
  missing <<'LIST' | together run
kv8 --deployable --kv-bits 8
kv8-fp8 --deployable --kv-bits 8 --kv-format fp8
kv4 --deployable --kv-bits 4
LIST
  for n in kv8 kv8-fp8; do exp_ "$n" & done
  wait
  exit 0
fi
together evo <<LIST
eval-kv8 --modes fp --scales $out/kv8.safetensors --kv-baselines
eval-kv8-fp8 --scales $out/kv8-fp8.safetensors --kv-baselines
eval-kv4 --scales $out/kv4.safetensors --kv-baselines
eval-hf-kv --hf $out/hf-kv8 --hf $out/hf-kv8-fp8
LIST
