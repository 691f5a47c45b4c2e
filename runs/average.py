"""Average the log-scales (and log-thresholds) of several scales files trained on the same model with
the same config: one of the recipe ideas for a lower spread between runs (docs/LOG.md).

    python runs/average.py OUT.safetensors A.safetensors B.safetensors [...]
"""
import json
import os
import sys

import torch

sys.path.insert(0, os.getcwd())
import checkpoints  # noqa: E402

out, paths = sys.argv[1], sys.argv[2:]
files = [checkpoints.read_scales(p) for p in paths]
meta = dict(files[0][0])
for p, (m, t, cfg) in zip(paths, files):
    if (m["fingerprint"], m["config"]) != (meta["fingerprint"], meta["config"]) or t.keys() != files[0][1].keys():
        sys.exit(f"error: {p} was trained on another model or config than {paths[0]}")
tensors = {k: torch.stack([t[k] for _, t, _ in files]).mean(0) for k in files[0][1]}
meta["extra"] = json.dumps({"averaged": [os.path.basename(p) for p in paths]})
checkpoints.check_scales(tensors)
with checkpoints.atomic_path(out, force=False) as tmp:
    checkpoints.save_safetensors(tensors, tmp, meta)
print(f"wrote {out}: the mean log-scales of {len(paths)} files")
