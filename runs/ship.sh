#!/usr/bin/env bash
# The README's table and docs/deploy.md's "what a user ships" table: deployable scales on calibration
# mixes, exported, every row on WikiText-2, Hamlet and the out-of-domain texts. (The rot* rows of
# docs/deploy.md came from this script at commit 83d8cdf, before the rotated export was retired.)
#   OUT=DIR CKPT=GGUF WT=.data/wikitext bash runs/ship.sh train   # the six recipes (ten before 83d8cdf), exported
#   OUT=DIR CKPT=GGUF WT=.data/wikitext bash runs/ship.sh eval    # every row (one GPU: ~10 min each)
# Artifacts: results/ship/ (one H200, bf16).
. "$(dirname "$0")/lib.sh"
SHIP="dep dep-s128 dep-s256 dep-s128-kl dep-s128-c dep-s128-300"
if [ "${1:-train}" = train ]; then
  missing <<'LIST' | together run
dep --deployable
dep-s128 --deployable --calib self:128
dep-s256 --deployable --calib self:256
dep-s128-kl --deployable --calib self:128 --loss kl
dep-s128-c --deployable --calib self:128 --calib comedies
dep-s128-300 --deployable --calib self:128 --steps 300
LIST
  for n in $SHIP; do exp_ "$n" & done
  wait
  exit 0
fi
each() { local flag=$1; shift; for n in "$@"; do printf -- '%s %s ' "$flag" "$n"; done; }
dep=$SHIP
together evo <<LIST
eval-base --modes fp,dynamic,smoothquant,quarot --alpha 0.8
eval-fq-dep --modes fp $(each --scales $(for n in $dep; do echo "$out/$n.safetensors"; done))
eval-hf-dep --modes fp $(each --hf $(for n in $dep; do echo "$out/hf-$n"; done))
LIST
