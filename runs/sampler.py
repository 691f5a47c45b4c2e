"""How fast the self-written calibration text is written (data.sample), the decode step replayed as a
CUDA graph against the same step run kernel by kernel, side by side in one process on one GPU:
seconds, tokens/s and peak GPU memory.

    python runs/sampler.py --ckpt smollm2-135m --windows 256        # SmolLM2 (the default recipe's text)
    python runs/sampler.py --shape 7b --windows 32                  # LLaMA-2-7B shape, random weights

--modes graph,eager picks the rows. A model's whole text is seeded: both rows write the same tokens.
"""
import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.getcwd())
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import checkpoints  # noqa: E402
import data  # noqa: E402
from recipe_7b import SHAPES, random_model  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", help="a checkpoint train.py takes (default: --shape)")
    p.add_argument("--shape", choices=SHAPES, default="7b")
    p.add_argument("--windows", type=int, default=256)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--modes", default="graph,eager")
    a = p.parse_args()
    if a.ckpt:
        m, tok = checkpoints.load_model(a.ckpt, "cuda", torch.bfloat16)
        m.eval().requires_grad_(False)
    else:
        m, tok = random_model(a.shape, a.seq_len)
    name = a.ckpt or f"{a.shape} shape"
    batch = data.sampler_batch(m, a.seq_len)
    bos = tok.bos_id if tok.add_bos else None
    rows, texts = [], []
    for mode in a.modes.split(","):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        t0 = time.time()
        texts.append(data.sample(m, a.windows, a.seq_len, batch=batch, bos_id=bos, graph=mode == "graph"))
        torch.cuda.synchronize()
        s = time.time() - t0
        rows.append((mode, s, a.windows * a.seq_len / s, torch.cuda.max_memory_allocated() / 2**30))
        print(f"{mode}: {s:.1f} s", flush=True)
    same = all(torch.equal(t, texts[0]) for t in texts)
    print(f"\n{torch.cuda.get_device_name()}, {name}, {a.windows} windows x {a.seq_len} tokens, batch {batch}"
          f" (data.sampler_batch); the rows wrote the same tokens: {same}")
    print("| decode step | s | tokens/s | peak GiB |\n|---|---|---|---|")
    for mode, s, tps, gib in rows:
        print(f"| {mode} | {s:.1f} | {tps:,.0f} | {gib:.1f} |")


if __name__ == "__main__":
    main()
