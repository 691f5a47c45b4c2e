"""Train SASQ's static activation scales: PTQ-initialise, then minimise next-token loss over the scales only.

    python train.py                         # the embedded default model (SmolLM2-135M), hub WikiText-2
    python train.py --ckpt llama-2-7b --checkpointing
"""
import argparse
import math
import os
import sys
import time

import torch
from tqdm import tqdm

import data
import model as llama
import sasq


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", default=None, help="checkpoint folder/file, hub id or short name "
                   f"(default: {llama.DEFAULT_CKPT}, the embedded GGUF)")
    p.add_argument("--calib", default=data.CALIB, help="training text, SOURCE[:CONFIG[:SPLIT]] (default %(default)s)")
    p.add_argument("--out", default="scales.safetensors", help="where the trained scales go")
    p.add_argument("--force", action="store_true", help="overwrite --out if it exists")
    p.add_argument("--wbits", type=int, default=8)
    p.add_argument("--abits", type=int, default=8)
    p.add_argument("--no-truncation", action="store_true", help="ablation: no c*tanh(x/c) truncation")
    p.add_argument("--init", choices=("mean", "max"), default="max",
                   help="PTQ init: max or (the paper's) mean over batches of the per-channel absmax")
    p.add_argument("--trunc-mult", type=float, default=4.0, help="initial threshold c = this x calib absmax")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--lr", type=float, default=2e-2, help="Adam lr on log-scales (cosine decay to 0)")
    p.add_argument("--calib-windows", type=int, default=16, help="windows for the PTQ initialisation")
    p.add_argument("--heldout", type=int, default=4, help="last windows of --calib kept for evaluation")
    p.add_argument("--checkpointing", action="store_true", help="activation checkpointing (7B on one GPU)")
    p.add_argument("--no-compile", action="store_true", help="do not torch.compile the blocks (GPU only)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                   help="weights dtype (default: bfloat16 on GPU, float32 on CPU)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--debug", action="store_true", help="show the full traceback on errors")
    a = p.parse_args(argv)
    data.check_args(p, a)
    return a


def train_scales(model, quantizers, wins, steps, batch_size, lr, seed=0, device="cpu", progress=True):
    """Adam + cosine decay on the quantizers' parameters only; returns the loss of every step and the
    seconds of the first step (which includes torch.compile's work when the blocks are compiled)."""
    params = list(quantizers.parameters())
    opt = torch.optim.Adam(params, lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
    gen = torch.Generator().manual_seed(seed)
    autocast = torch.autocast("cuda", torch.bfloat16, enabled=str(device).startswith("cuda"))
    losses, t0, first = [], time.time(), None
    bar = tqdm(range(steps), desc="train scales", disable=None if progress else True)
    for _ in bar:
        x = wins[torch.randint(len(wins), (batch_size,), generator=gen)].to(device)
        with autocast:
            _, loss = model(x[:, :-1], x[:, 1:])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
        first = first or time.time() - t0
        bar.set_postfix(loss=f"{losses[-1]:.4f}")
    # the method's contract: the pretrained weights neither receive gradients nor change
    assert all(p.grad is None for p in model.parameters() if not any(p is q for q in params))
    return losses, first


def main(argv=None):
    a = parse_args(argv)
    if os.path.exists(a.out) and not a.force:
        raise SystemExit(f"error: {a.out} exists; pass --force to overwrite it or --out elsewhere")
    dtype = getattr(torch, a.dtype or ("bfloat16" if a.device.startswith("cuda") else "float32"))
    torch.manual_seed(a.seed)
    model, tok = llama.load(a.ckpt, a.device, dtype)
    data.check_seq_len(model, a.seq_len)
    model.checkpointing = a.checkpointing
    wins = data.token_windows(tok, a.calib, a.seq_len)
    if len(wins) <= a.heldout:
        raise SystemExit(f"error: {a.calib} gives {len(wins)} windows of {a.seq_len}, need more than --heldout={a.heldout}")
    train_wins, held = wins[:-a.heldout], wins[-a.heldout:]
    cfg = sasq.QuantConfig(wbits=a.wbits, abits=a.abits, truncation=not a.no_truncation)
    fp_ppl = data.perplexity(model, held, device=a.device)
    quantizers = sasq.attach(model, cfg)
    sasq.calibrate(model, quantizers, train_wins[: a.calib_windows], batch_size=a.batch_size,
                   method=a.init, trunc_mult=a.trunc_mult)
    sasq.freeze(model)
    ptq_ppl = data.perplexity(model, held, device=a.device)
    sasq.freeze(model, False)
    if a.device.startswith("cuda") and not a.no_compile:
        for layer in model.layers:   # identical blocks share one compiled graph; the first steps compile
            layer.compile()
    t0 = time.time()
    losses, first = train_scales(model, quantizers, train_wins, a.steps, a.batch_size, a.lr, a.seed, a.device)
    secs = time.time() - t0
    sasq.freeze(model)
    sasq_ppl = data.perplexity(model, held, device=a.device)
    tokens = a.steps * a.batch_size * (a.seq_len - 1)
    print(f"held-out perplexity ({a.heldout} windows of {a.seq_len}): fp {fp_ppl:.3f} | "
          f"PTQ init {ptq_ppl:.3f} | SASQ {sasq_ppl:.3f}")
    print(f"trained {a.steps} steps, {tokens:,} tokens, {secs:.1f} s (first step {first:.1f} s); loss {losses[0]:.4f} -> {losses[-1]:.4f}")
    sasq.save(a.out, model, quantizers, cfg, extra={"steps": a.steps, "tokens": tokens, "seconds": secs,
                                                   "calib": a.calib, "ppl_fp": fp_ppl, "ppl_sasq": sasq_ppl})
    print(f"scales saved to {a.out}")


if __name__ == "__main__":
    try:
        main()
    except (llama.CheckpointError, data.DataError, sasq.ScalesError, ValueError) as e:
        if "--debug" in sys.argv:
            raise
        sys.exit(f"error: {e}")   # one line on stderr, exit status 1
