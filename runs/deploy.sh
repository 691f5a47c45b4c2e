#!/usr/bin/env bash
# docs/deploy.md's tables: the deployable recipe exported, beside the bf16 model and llm-compressor's
# recipes (extras/peers.py); greedy agreement, static prefill + dynamic decode, the INT8 path.
#   OUT=DIR CKPT=GGUF WT=.data/wikitext bash runs/deploy.sh [train|eval|mix|decode]
# Artifacts: results/deploy/ (one H100).
. "$(dirname "$0")/lib.sh"
case "${1:-train}" in
train)
  run w8a8-deploy --deployable
  python3 -m extras.export --ckpt "$ckpt" --scales "$out/w8a8-deploy.safetensors" \
    --out "$out/hf-sasq-w8a8" --force
  python3 -m extras.export --ckpt "$ckpt" --out "$out/hf-bf16" --force
  python3 -m extras.peers --hf "$out/hf-bf16" --out "$out/peers" --calib "$calib"
  ;;
eval)
  ev --modes fp,dynamic --scales results/w8a8-max.safetensors --scales "$out/w8a8-deploy.safetensors" \
    --hf "$out/hf-sasq-w8a8" --hf "$out/peers/w8a8-dynamic" --hf "$out/peers/w8a8-static-tensor" \
    --hf "$out/peers/w8a8-static-tensor-sq" --json "$out/deploy.json" --force
  ;;
mix)
  run w8a8-deploy-mix --deployable --calib comedies
  python3 -m extras.export --ckpt "$ckpt" --scales "$out/w8a8-deploy-mix.safetensors" \
    --out "$out/hf-sasq-w8a8-mix" --force
  ev --modes fp --scales "$out/w8a8-deploy-mix.safetensors" --hf "$out/hf-sasq-w8a8-mix" \
    --json "$out/deploy-mix.json" --force
  ev --limit 1 --greedy 8 --modes fp --scales "$out/w8a8-deploy.safetensors" --int8 \
    --json "$out/int8-greedy.json" --force
  ;;
decode)   # 8 prompts x 64 greedy tokens (token by token in Python)
  ev --limit 1 --greedy 8 --modes fp,dynamic --scales "$out/w8a8-deploy.safetensors" \
    --hf "$out/hf-sasq-w8a8" --json "$out/greedy.json" --force
  ev --limit 1 --greedy 8 --modes fp --scales "$out/w8a8-deploy.safetensors" --decode dynamic \
    --json "$out/decode-dynamic.json" --force
  ;;
esac
