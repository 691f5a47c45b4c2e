#!/usr/bin/env bash
# docs/results.md's tables: the method's ablations (truncation, bits, PTQ init, calibration mix) and the
# baselines of the same harness, on WikiText-2 and Hamlet; `headline` rescores the committed scales.
#   OUT=DIR CKPT=GGUF WT=.data/wikitext bash runs/ablations.sh [train|eval|headline]   (H100: ~8 min)
# Artifacts: results/results.json, results/results-a4.json, results/headline.json, results/*.safetensors.
. "$(dirname "$0")/lib.sh"
stage=${1:-all}
if [ "$stage" = headline ]; then
  ev --modes fp,dynamic,static-tensor,static-channel,quarot --init max \
    --scales results/w8a8-max.safetensors --scales results/baselines/w8a8-rot.safetensors \
    --scales results/w8a8-mix.safetensors --json "$out/headline.json" --force
  exit 0
fi
if [ "$stage" != eval ]; then
  run w8a8-max                      # the paper's recipe with the max PTQ init
  run w8a8-max-notrunc --no-truncation
  run w8a6-max --abits 6
  run w8a4-max --abits 4
  run w8a8-mean --init mean         # the paper's PTQ init (mean of per-batch absmax)
  run w8a4-mean --init mean --abits 4
  run w8a8-mix --calib comedies     # + Shakespeare's comedies (Hamlet is not among them)
fi
[ "$stage" = train ] && exit 0
ev --modes fp,w8,dynamic,static-tensor,static-channel --init mean --json "$out/results.json" --force \
  $(for f in "$out"/w8a*.safetensors; do echo --scales "$f"; done)
ev --abits 4 --modes dynamic,static-channel --init mean --json "$out/results-a4.json" --force
