#!/usr/bin/env bash
# Produces the README's results table: every baseline and SASQ variant, on the same windows.
#   bash results.sh OUTDIR [CKPT] [WIKITEXT] [train|eval|all]   (H100: about 8 minutes for SmolLM2-135M)
#   bash results.sh OUTDIR [CKPT] [WIKITEXT] baselines|baselines-eval|baselines-long   SmoothQuant, QuaRot-RTN,
#     SASQ (+ rotation, + KL) at A8/A6/A4, and longer low-bit training (docs/baselines.md);
#   bash results.sh OUTDIR [CKPT] [WIKITEXT] kv|kv-eval   static KV-cache scales (kvquant.py): KV8 int, KV8 fp8,
#     KV4 int trained with the default recipe, exported, scored beside float / dynamic / PTQ caches;
#   bash results.sh OUTDIR [CKPT] [WIKITEXT] headline   the README's table, from the committed scales files;
#   bash results.sh OUTDIR [CKPT] [WIKITEXT] deploy|deploy-eval|deploy-decode|deploy-mix   the deployment table:
#     deploy: train --deployable, export it and the bf16 model, llm-compressor's recipes (peers.py);
#     deploy-eval: every row through eval.py, exported folders through transformers; deploy-decode:
#     static prefill + dynamic decode, and the INT8 path, with greedy agreement.
# WIKITEXT is the hub id `wikitext` or a local folder in its layout. Calibration and training use the
# tokenized wikitext-2-v1 validation split (the raw train split is not on our machines; with the hub,
# pass CALIB=wikitext:wikitext-2-raw-v1:train). The INT8 rows: eval.py --int8 with the same scales.
set -euo pipefail
out=${1:?usage: bash results.sh OUTDIR [CKPT] [WIKITEXT] [train|eval|all]}
ckpt=${2:-smollm2-135m}; wt=${3:-wikitext}; stage=${4:-all}
calib=${CALIB:-$wt:wikitext-2-v1:validation}; test=$wt:wikitext-2-raw-v1:test
mkdir -p "$out"
run() {  # name, then train.py arguments
  local name=$1; shift
  echo "== $name: $*"
  python3 train.py --ckpt "$ckpt" --calib "$calib" --out "$out/$name.safetensors" --force "$@"
}
if [ "$stage" = deploy ]; then
  run w8a8-deploy --deployable
  python3 export.py --ckpt "$ckpt" --scales "$out/w8a8-deploy.safetensors" --out "$out/hf-sasq-w8a8" --force
  python3 export.py --ckpt "$ckpt" --out "$out/hf-bf16" --force
  python3 peers.py --hf "$out/hf-bf16" --out "$out/peers" --calib "$calib"
  exit 0
fi
ev() { python3 eval.py --ckpt "$ckpt" --test "$test" --test hamlet --calib "$calib" "$@"; }
together() {  # one command per stdin line, "NAME ARGS...", run concurrently (a 135M model leaves the GPU idle);
  local pids=() fn=$1 line; shift  # each logs to OUT/NAME.log; fails if any fails
  while read -r line; do
    [ -n "$line" ] && { $fn $line > "$out/${line%% *}.log" 2>&1 & pids+=($!); }
  done
  for p in "${pids[@]}"; do wait "$p"; done
}
SHIP="dep dep-s128 dep-s256 dep-s128-kl dep-s128-c dep-s128-300 rot rot-s128 rot-s128-kl rot-s128-c"
missing() { while read -r line; do [ -e "$out/${line%% *}.safetensors" ] || echo "$line"; done; }   # resumable
if [ "$stage" = ship ]; then   # what a user ships: deployable scales (+ rotation) on calibration mixes, exported
  missing <<'LIST' | together run
dep --deployable
dep-s128 --deployable --calib self:128
dep-s256 --deployable --calib self:256
dep-s128-kl --deployable --calib self:128 --loss kl
dep-s128-c --deployable --calib self:128 --calib comedies
dep-s128-300 --deployable --calib self:128 --steps 300
rot --deployable --rotate
rot-s128 --deployable --rotate --calib self:128
rot-s128-kl --deployable --rotate --calib self:128 --loss kl
rot-s128-c --deployable --rotate --calib self:128 --calib comedies
LIST
  for n in $SHIP; do     # CPU work: two threads each, or ten exports fight over the cores
    OMP_NUM_THREADS=2 python3 export.py --ckpt "$ckpt" --scales "$out/$n.safetensors" --out "$out/hf-$n" --force \
      > "$out/export-$n.log" 2>&1 &
  done
  wait
  exit 0
fi
evo() { local name=$1; shift; ev --test ood --json "$out/$name.json" --force "$@"; }
if [ "$stage" = kv ]; then   # static KV-cache scales (kvquant.py), deployable, calibrated on CALIB alone (no
  missing <<'LIST' | together run       # self-written text: three generators at once outran a 10-minute GPU call)
kv8 --deployable --kv-bits 8
kv8-fp8 --deployable --kv-bits 8 --kv-format fp8
kv4 --deployable --kv-bits 4
LIST
  for n in kv8 kv8-fp8; do
    OMP_NUM_THREADS=2 python3 export.py --ckpt "$ckpt" --scales "$out/$n.safetensors" --out "$out/hf-$n" --force \
      > "$out/export-$n.log" 2>&1 &
  done
  wait
  exit 0
fi
if [ "$stage" = kv-eval ]; then   # each KV file: trained, float cache, per-token dynamic, PTQ max; the exports
  together evo <<LIST
eval-kv8 --modes fp --scales $out/kv8.safetensors --kv-baselines
eval-kv8-fp8 --scales $out/kv8-fp8.safetensors --kv-baselines
eval-kv4 --scales $out/kv4.safetensors --kv-baselines
eval-hf-kv --hf $out/hf-kv8 --hf $out/hf-kv8-fp8
LIST
  exit 0
fi
if [ "$stage" = ship-eval ]; then   # every row on WikiText-2, Hamlet and the out-of-domain set (--test ood)
  each() { local flag=$1; shift; for n in "$@"; do printf -- '%s %s ' "$flag" "$n"; done; }
  together evo <<LIST
eval-base --modes fp,dynamic,smoothquant,quarot --alpha 0.8
eval-fq-dep --modes fp $(each --scales $(for n in $SHIP; do echo "$out/$n.safetensors"; done | grep /dep))
eval-fq-rot --modes fp $(each --scales $(for n in $SHIP; do echo "$out/$n.safetensors"; done | grep /rot))
eval-hf-dep --modes fp $(each --hf $(for n in $SHIP; do echo "$out/hf-$n"; done | grep /hf-dep))
eval-hf-rot --modes fp $(each --hf $(for n in $SHIP; do echo "$out/hf-$n"; done | grep /hf-rot))
LIST
  exit 0
fi
if [ "$stage" = baselines ]; then    # SASQ at A6/A4, on the rotated model (--rotate), with the KL loss
  together run <<'LIST'
w8a6-max --abits 6
w8a4-max --abits 4
w8a8-kl --loss kl
LIST
  together run <<'LIST'
w8a8-rot --rotate
w8a6-rot --rotate --abits 6
w8a4-rot --rotate --abits 4
LIST
  together run <<'LIST'
w8a4-kl --loss kl --abits 4
w8a6-rot-kl --rotate --loss kl --abits 6
w8a4-rot-kl --rotate --loss kl --abits 4
LIST
  exit 0
fi
if [ "$stage" = baselines-long ]; then   # longer training at A4/A6 (what the low-bit targets needed)
  together run <<'LIST'
w8a4-rot-s1000-lr5 --rotate --abits 4 --steps 1000 --lr 5e-2
w8a4-s1000-lr5 --abits 4 --steps 1000 --lr 5e-2
w8a4-rot-s1000-lr5-mix --rotate --abits 4 --steps 1000 --lr 5e-2 --calib comedies
LIST
  together run <<'LIST'
w8a4-rot-s500 --rotate --abits 4 --steps 500
w8a4-s500 --abits 4 --steps 500
w8a4-rot-s500-lr5 --rotate --abits 4 --steps 500 --lr 5e-2
w8a6-rot-s300 --rotate --abits 6 --steps 300
LIST
  ev --modes fp $(for n in w8a4-rot-s500 w8a4-s500 w8a4-rot-s500-lr5 w8a6-rot-s300; do echo --scales "$out/$n.safetensors"; done) \
    --json "$out/longer.json"
  ev --modes fp $(for n in w8a4-rot-s1000-lr5 w8a4-s1000-lr5 w8a4-rot-s1000-lr5-mix; do echo --scales "$out/$n.safetensors"; done) \
    --json "$out/longer2.json"
  exit 0
fi
if [ "$stage" = headline ]; then   # the README's table: committed scales, the PTQ row with the recipe's init
  ev --modes fp,dynamic,static-tensor,static-channel,quarot --init max --scales results/w8a8-max.safetensors \
    --scales results/baselines/w8a8-rot.safetensors --scales results/w8a8-mix.safetensors --json "$out/headline.json"
  exit 0
fi
evb() { local name=$1 bits=$2; shift 2; ev --abits "$bits" --json "$out/$name.json" "$@"; }
if [ "$stage" = baselines-eval ]; then   # the field's methods at A8/A6/A4, then fp and every SASQ file
  together evb <<'LIST'
base-a8 8 --modes dynamic,smoothquant,smoothquant-static,quarot
base-a6 6 --modes dynamic,smoothquant,smoothquant-static,quarot
base-a4 4 --modes dynamic,smoothquant,smoothquant-static,quarot
sq08-a8 8 --alpha 0.8 --modes smoothquant,smoothquant-static
sq08-a6 6 --alpha 0.8 --modes smoothquant,smoothquant-static
sq08-a4 4 --alpha 0.8 --modes smoothquant,smoothquant-static
LIST
  ev --modes fp --scales results/w8a8-max.safetensors $(for n in w8a6-max w8a4-max w8a8-kl w8a4-kl w8a8-rot \
    w8a6-rot w8a4-rot w8a6-rot-kl w8a4-rot-kl; do echo --scales "$out/$n.safetensors"; done) --json "$out/sasq.json"
  exit 0
fi
if [ "$stage" = deploy-eval ]; then
  ev --modes fp,dynamic --scales results/w8a8-max.safetensors --scales "$out/w8a8-deploy.safetensors" \
    --hf "$out/hf-sasq-w8a8" --hf "$out/peers/w8a8-dynamic" --hf "$out/peers/w8a8-static-tensor" \
    --hf "$out/peers/w8a8-static-tensor-sq" --json "$out/deploy.json"
  exit 0
fi
if [ "$stage" = deploy-mix ]; then   # the deployable recipe on the calibration mix (+ comedies)
  run w8a8-deploy-mix --deployable --calib comedies
  python3 export.py --ckpt "$ckpt" --scales "$out/w8a8-deploy-mix.safetensors" --out "$out/hf-sasq-w8a8-mix" --force
  ev --modes fp --scales "$out/w8a8-deploy-mix.safetensors" --hf "$out/hf-sasq-w8a8-mix" --json "$out/deploy-mix.json"
  ev --limit 1 --greedy 8 --modes fp --scales "$out/w8a8-deploy.safetensors" --int8 --json "$out/int8-greedy.json"
  exit 0
fi
if [ "$stage" = deploy-decode ]; then
  # greedy agreement: 8 prompts x 64 tokens (generation runs token by token in Python: 32 prompts x 9 rows
  # did not fit one 10-minute device call)
  ev --limit 1 --greedy 8 --modes fp,dynamic --scales "$out/w8a8-deploy.safetensors" --hf "$out/hf-sasq-w8a8" \
    --json "$out/greedy.json"
  ev --limit 1 --greedy 8 --modes fp --scales "$out/w8a8-deploy.safetensors" --decode dynamic --json "$out/decode-dynamic.json"
  exit 0
fi
if [ "$stage" != eval ]; then
run w8a8-max                  # the default recipe
run w8a8-max-notrunc --no-truncation
run w8a6-max --abits 6
run w8a4-max --abits 4
run w8a8-mean --init mean     # the paper's PTQ init (mean of per-batch absmax)
run w8a4-mean --init mean --abits 4
run w8a8-mix --calib comedies  # calibration mix: + Shakespeare's comedies (Hamlet is not among them)
fi
[ "$stage" = train ] && exit 0
python3 eval.py --ckpt "$ckpt" --test "$test" --test hamlet --calib "$calib" \
  --modes fp,w8,dynamic,static-tensor,static-channel --init mean --json "$out/results.json" \
  $(for f in "$out"/w8a*.safetensors; do echo --scales "$f"; done)
python3 eval.py --ckpt "$ckpt" --test "$test" --test hamlet --calib "$calib" --abits 4 \
  --modes dynamic,static-channel --init mean --json "$out/results-a4.json"
