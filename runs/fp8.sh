#!/usr/bin/env bash
# Static FP8 (docs/fp8.md): the FP8 recipe (train.py --fp8) for several seeds, trained side by side on one
# GPU, scored beside every FP8 baseline on the same windows and calibration text: weights only, dynamic
# per-token, static per-tensor PTQ (max), and SmoothQuant a=0.5 / a=0.8 folded (dynamic, static, weights
# only). runs/fp8.py prints the table and each seed against the best dynamic FP8 on each text.
#   OUT=DIR CKPT=GGUF CALIB=wt2-val.txt TESTS="wt2-test.txt hamlet.txt ..." SEEDS="0 1 2" bash runs/fp8.sh
# TRAIN="..." adds train.py options (a variant, measured the same way); HF=1 also exports each seed
# (extras.export) and scores the folder through transformers + compressed-tensors (--hf rows).
. "$(dirname "$0")/lib.sh"
seeds=${SEEDS:-0 1 2}; tests=${TESTS:-$test hamlet licenses gospels code}; tag=${TAG:-fp8}; pids=()
for s in $seeds; do
  python3 train.py --ckpt "$ckpt" --calib "$calib" --calib self:256 --fp8 --seed "$s" ${TRAIN:-} \
    --out "$out/$tag-seed$s.safetensors" --force > "$out/$tag-seed$s.log" 2>&1 & pids+=($!)
done
ev8() { python3 eval.py --ckpt "$ckpt" $(for t in $tests; do echo --test "$t"; done) --calib "$calib" \
  --wbits fp8 --abits fp8 "$@"; }
if [ -z "${NO_BASELINES:-}" ]; then
  ev8 --modes fp,w8,dynamic,static-tensor,smoothquant,smoothquant-static,smoothquant-w --alpha 0.5 \
    --json "$out/fp8-base-a0.5.json" --force > "$out/fp8-base-a0.5.log" 2>&1 & pids+=($!)
  ev8 --modes smoothquant,smoothquant-static,smoothquant-w --alpha 0.8 \
    --json "$out/fp8-base-a0.8.json" --force > "$out/fp8-base-a0.8.log" 2>&1 & pids+=($!)
fi
for p in "${pids[@]}"; do wait "$p" || { tail -n 3 "$out"/*.log; exit 1; }; done
hf=()
if [ -n "${HF:-}" ]; then
  for s in $seeds; do exp_ "$tag-seed$s" & done; wait
  for s in $seeds; do hf+=(--hf "$out/hf-$tag-seed$s"); done
fi
ev8 --modes dynamic $(for s in $seeds; do echo --scales "$out/$tag-seed$s.safetensors"; done) "${hf[@]}" \
  --json "$out/$tag-seeds.json" --force
python3 runs/fp8.py "$out"/fp8-base-a0.*.json "$out/$tag-seeds.json"
