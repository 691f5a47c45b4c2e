#!/usr/bin/env bash
# docs/outliers.md's numbers and docs/plots/: activations before and after truncation + clipping, and
# max |x| against its 99.9th percentile across depth (2 windows of 512; 55 s on a 2-core CPU).
#   WT=../shared/data/wikitext bash runs/outliers.sh [OUTDIR]
set -euo pipefail
cd "$(dirname "$0")/.."
wt=${WT:-wikitext}
python3 plot_activations.py --text "$wt:wikitext-2-raw-v1:test" --calib "$wt:wikitext-2-v1:validation" \
  --scales results/w8a8-max.safetensors --out "${1:-docs/plots}" --force
