"""The default recipe end to end on a LLaMA-2 shape with random weights, on one GPU: the self-written
calibration text (its batch sized to the free memory, data.sampler_batch), the PTQ init, training with
--checkpointing and compiled blocks, the saved scales; seconds and peak GPU memory per stage.

    python runs/recipe_7b.py --windows 256 --steps 100     # train.py's defaults (one H100: see the table)
    python runs/recipe_7b.py --windows 33 --steps 10       # a shorter check (one H100: one sampler batch)

Random weights: the compute and memory are a real model's, the text is not (a random model writes
noise). The WikiText part of the calibration is random tokens here, as many windows as self-written ones.
"""
import argparse
import os
import sys
import tempfile
import time
import types

import torch

sys.path.insert(0, os.getcwd())
import checkpoints  # noqa: E402
import data  # noqa: E402
import model as llama  # noqa: E402
import sasq  # noqa: E402
import train  # noqa: E402

SHAPES = {"7b": {}, "13b": dict(dim=5120, n_layers=40, n_heads=40, n_kv_heads=40, hidden_dim=13824)}


def random_model(shape, seq_len):
    """A LLaMA-2 shape in bf16 on the GPU with random weights, and a tokenizer stand-in (BOS = 1)."""
    args = llama.ModelArgs(**SHAPES[shape], max_seq_len=seq_len)
    with torch.device("meta"):
        m = llama.Transformer(args).to(torch.bfloat16)
    m.to_empty(device="cuda").init_rope("cuda")
    with torch.no_grad():
        for name, prm in m.named_parameters():
            prm.fill_(1.0) if name.endswith("norm.weight") else prm.normal_(0, 0.02)
    return m.eval().requires_grad_(False), types.SimpleNamespace(bos_id=1, add_bos=True)


def stage(name, rows, fn):
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    t0 = time.time()
    out = fn()
    torch.cuda.synchronize()
    rows.append((name, time.time() - t0, torch.cuda.max_memory_allocated() / 2**30))
    print(f"{name}: {rows[-1][1]:.1f} s, peak {rows[-1][2]:.1f} GiB", flush=True)
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=SHAPES, default="7b")
    p.add_argument("--windows", type=int, default=256, help="self-written windows (train.py: 256)")
    p.add_argument("--steps", type=int, default=100, help="training steps (train.py: 100)")
    p.add_argument("--seq-len", type=int, default=2048)
    a = p.parse_args()
    m, tok = random_model(a.shape, a.seq_len)
    args = m.args
    free = torch.cuda.mem_get_info()[0]
    print(f"{torch.cuda.get_device_name()}: {a.shape}, {free / 2**30:.1f} GiB free after the weights; "
          f"sampler batch {data.sampler_batch(m, a.seq_len)}", flush=True)
    rows = []
    own = stage(f"write {a.windows} windows x {a.seq_len}", rows,
                lambda: data.self_windows(m, tok, f"self:{a.windows}", a.seq_len))
    text = torch.randint(args.vocab_size, (a.windows, a.seq_len))
    wins = torch.cat([text, own])
    cfg = sasq.RECIPES["deployable"]
    qs = sasq.attach(m, cfg)
    stage("PTQ init (16 windows)", rows, lambda: sasq.calibrate(m, qs, wins[:16], 4, progress=False))
    m.checkpointing = True
    m.compile_blocks()
    stage(f"train {a.steps} steps x 4 x {a.seq_len}", rows,
          lambda: train.train_scales(m, qs, wins, a.steps, 4, 2e-2, device="cuda"))
    out = os.path.join(tempfile.mkdtemp(), "scales.safetensors")
    stage("save", rows, lambda: checkpoints.save_scales(out, m, qs, cfg))
    print(f"\n| stage ({torch.cuda.get_device_name()}, {a.shape}, random weights) | s | peak GiB |")
    print("|---|---|---|")
    for name, s, gib in rows:
        print(f"| {name} | {s:.1f} | {gib:.1f} |")
    print(f"| total | {sum(r[1] for r in rows):.1f} | {max(r[2] for r in rows):.1f} |")


if __name__ == "__main__":
    main()
