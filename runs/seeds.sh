#!/usr/bin/env bash
# One run is one draw: the default deployable recipe (WikiText-2 + self:256:genres) for several
# seeds, trained side by side on one GPU, each scored with fp and dynamic W8A8 on the same windows;
# runs/spread.py prints per text the mean and min / max against dynamic.
#   OUT=DIR CKPT=GGUF CALIB=wt2-val.txt TESTS="wt2-test.txt hamlet.txt ..." SEEDS="0 1 2" bash runs/seeds.sh
# TRAIN="--lr 5e-3" adds train.py options (a variant of the recipe, measured the same way).
# The SASQ rows are the fake-quant model (exported folders agree within 0.5 %: tests/extras/).
. "$(dirname "$0")/lib.sh"
seeds=${SEEDS:-0 1 2}; tests=${TESTS:-$test hamlet licenses gospels code}; pids=()
for s in $seeds; do
  python3 train.py --ckpt "$ckpt" --calib "$calib" --calib self:256:genres --deployable --seed "$s" \
    ${TRAIN:-} --out "$out/seed$s.safetensors" --force > "$out/seed$s.log" 2>&1 & pids+=($!)
done
for p in "${pids[@]}"; do wait "$p" || { tail -n 3 "$out"/seed*.log; exit 1; }; done
python3 eval.py --ckpt "$ckpt" $(for t in $tests; do echo --test "$t"; done) --modes fp,dynamic \
  $(for s in $seeds; do echo --scales "$out/seed$s.safetensors"; done) --json "$out/seeds.json" --force
python3 runs/spread.py "$out/seeds.json"
