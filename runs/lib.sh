# Shared by the runs/ scripts (sourced, not run). Every script runs from the project root:
#   OUT     where results go (default /tmp/sasq-runs)
#   CKPT    the model (default smollm2-135m, the embedded GGUF)
#   WT      WikiText-2: the hub id `wikitext` or a local folder in its layout (default wikitext)
#   CALIB   calibration text (default $WT's tokenized wikitext-2-v1 validation split; with the hub,
#           CALIB=wikitext:wikitext-2-raw-v1:train is the code's default)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
out=${OUT:-/tmp/sasq-runs}; ckpt=${CKPT:-smollm2-135m}; wt=${WT:-wikitext}
calib=${CALIB:-$wt:wikitext-2-v1:validation}; test=$wt:wikitext-2-raw-v1:test
mkdir -p "$out"

run() {  # NAME TRAIN.PY-OPTIONS...: train scales to $out/NAME.safetensors
  local name=$1; shift
  echo "== $name: $*"
  python3 train.py --ckpt "$ckpt" --calib "$calib" --out "$out/$name.safetensors" --force "$@"
}
ev() { python3 eval.py --ckpt "$ckpt" --test "$test" --test hamlet --calib "$calib" "$@"; }
evo() { local name=$1; shift; ev --test ood --json "$out/$name.json" --force "$@"; }
exp_() {  # NAME: export $out/NAME.safetensors to $out/hf-NAME (two threads: several run at once)
  OMP_NUM_THREADS=2 python3 -m extras.export --ckpt "$ckpt" --scales "$out/$1.safetensors" \
    --out "$out/hf-$1" --force > "$out/export-$1.log" 2>&1
}
together() {  # FN, then stdin lines "NAME ARGS...": run concurrently (a 135M model leaves a GPU idle),
  local pids=() fn=$1 line; shift   # each logging to $out/NAME.log; fails if any fails
  while read -r line; do
    [ -n "$line" ] && { $fn $line > "$out/${line%% *}.log" 2>&1 & pids+=($!); }
  done
  for p in "${pids[@]}"; do wait "$p"; done
}
missing() { while read -r line; do [ -e "$out/${line%% *}.safetensors" ] || echo "$line"; done; }
