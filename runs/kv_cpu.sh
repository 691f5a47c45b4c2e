#!/usr/bin/env bash
# docs/kvcache.md's CPU rows: KV8 FP8 / int8 / KV4 trained at quick-start size on a 2-core CPU, scored
# against a float, a per-token and a PTQ cache.   WT=../shared/data/wikitext bash runs/kv_cpu.sh
# Artifacts: results/kvcpu/.
set -euo pipefail
cd "$(dirname "$0")/.."
W=${WT:-wikitext}; out=results/kvcpu
C="--calib $W:wikitext-2-v1:validation"
S="--steps 20 --seq-len 256 --batch-size 2 --calib-windows 8 --checkpointing"
for spec in "kv8fp8 --kv-bits 8 --kv-format fp8" "kv8 --kv-bits 8" "kv4 --kv-bits 4"; do
  set -- $spec; n=$1; shift
  /usr/bin/time -f "$n train %e s" -a -o $out/times.txt python3 train.py --deployable $C $S "$@" \
    --out $out/$n.safetensors --force > $out/$n.log 2>&1
done
for n in kv8fp8 kv8 kv4; do
  /usr/bin/time -f "$n eval %e s" -a -o $out/times.txt python3 eval.py --test $W:wikitext-2-raw-v1:test \
    --test ood --limit 8 --seq-len 512 $C --calib-seq-len 256 --calib-windows 8 \
    --scales $out/$n.safetensors --kv-baselines --json $out/eval-$n.json --force > $out/eval-$n.log 2>&1
done
