"""The FP8-KV export of the H200-trained scales (results/kv/fp8-fixed/kv8-fp8.safetensors) read by vLLM's CPU
build and by transformers + compressed-tensors, beside our fake-quant, on the same windows of the WikiText-2 test.

    python runs/kv_vllm.py [WINDOWS]     # from the project root; needs .venv-vllm (bash tests/extras/vllm-venv.sh)

Writes results/kv/vllm/result.json. vLLM: its static oneDNN path (float32), float cache and fp8 cache.
"""
import json
import os
import subprocess
import sys
import tempfile

import torch

sys.path.insert(0, os.getcwd())
import data  # noqa: E402
from extras import export  # noqa: E402
from extras import kvquant  # noqa: E402
import checkpoints  # noqa: E402
import sasq  # noqa: E402

SCALES, TEST = "results/kv/fp8-fixed/kv8-fp8.safetensors", "../shared/data/wikitext:wikitext-2-raw-v1:test"
n = int(sys.argv[1]) if len(sys.argv) > 1 else 8
m, tok = checkpoints.load_model()
wins = data.token_windows(tok, TEST, 512, n)
qs, _ = checkpoints.load_scales(SCALES, m)
kv, _ = kvquant.load(SCALES, m, qs)
sasq.freeze(m)
ppl = lambda f: data.perplexity(f, wins, progress=False)      # noqa: E731
rows = {"ours, fake-quant, FP8 cache": ppl(m)}
with tempfile.TemporaryDirectory() as tmp:
    folder = os.path.join(tmp, "hf-kv8-fp8")
    export.export(m, tok, folder, qs, dtype=torch.float32, kv=kv)
    kvquant.detach(m)
    rows["ours, fake-quant, float cache"] = ppl(m)
    hf = export.load_hf(folder)
    rows["transformers + compressed-tensors, FP8 scheme"] = ppl(lambda x: (hf(x).logits,))
    json.dump(wins.tolist(), open(os.path.join(tmp, "wins.json"), "w"))
    out = subprocess.run([".venv-vllm/bin/python", "tests/extras/vllm_reader.py", os.path.join(tmp, "wins.json"),
                          f"{folder}:static", f"{folder}:fp8kv"], capture_output=True, text=True, timeout=3000)
    got = {k: v for line in out.stdout.splitlines() if line.startswith("RESULT ") for k, v in json.loads(line[7:]).items()}
    for job, r in got.items():
        rows[f"vLLM CPU, {job.rsplit(':', 1)[1]}"] = r.get("ppl", r.get("error"))
        if "kv" in r:
            rows[f"vLLM CPU, {job.rsplit(':', 1)[1]}, cache"] = r["kv"]
    if not got:
        rows["vLLM error"] = out.stderr[-2000:]
rows["windows"] = f"{n} x 512 tokens of {TEST}"
for k, v in rows.items():
    print(f"{k}: {v}")
json.dump(rows, open("results/kv/vllm/result.json", "w"), indent=1)
