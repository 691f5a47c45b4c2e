#!/usr/bin/env bash
# docs/baselines.md's tables: SmoothQuant, QuaRot-RTN and SASQ (+ rotation, + KL) at A8/A6/A4, and
# longer low-bit training.
#   OUT=DIR CKPT=GGUF WT=.data/wikitext bash runs/baselines.sh [train|eval|long]
# Artifacts: results/baselines/ (one H100).
. "$(dirname "$0")/lib.sh"
case "${1:-train}" in
train)
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
  ;;
eval)
  evb() { local name=$1 bits=$2; shift 2; ev --abits "$bits" --json "$out/$name.json" --force "$@"; }
  together evb <<'LIST'
base-a8 8 --modes dynamic,smoothquant,smoothquant-static,quarot
base-a6 6 --modes dynamic,smoothquant,smoothquant-static,quarot
base-a4 4 --modes dynamic,smoothquant,smoothquant-static,quarot
sq08-a8 8 --alpha 0.8 --modes smoothquant,smoothquant-static
sq08-a6 6 --alpha 0.8 --modes smoothquant,smoothquant-static
sq08-a4 4 --alpha 0.8 --modes smoothquant,smoothquant-static
LIST
  ev --modes fp --scales results/w8a8-max.safetensors --json "$out/sasq.json" --force \
    $(for n in w8a6-max w8a4-max w8a8-kl w8a4-kl w8a8-rot w8a6-rot w8a4-rot w8a6-rot-kl w8a4-rot-kl; do
        echo --scales "$out/$n.safetensors"; done)
  ;;
long)
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
  ev --modes fp --json "$out/longer.json" --force $(for n in w8a4-rot-s500 w8a4-s500 \
    w8a4-rot-s500-lr5 w8a6-rot-s300; do echo --scales "$out/$n.safetensors"; done)
  ev --modes fp --json "$out/longer2.json" --force $(for n in w8a4-rot-s1000-lr5 w8a4-s1000-lr5 \
    w8a4-rot-s1000-lr5-mix; do echo --scales "$out/$n.safetensors"; done)
  ;;
esac
