"""Where a static model loses to dynamic W8A8 on a text: perplexity with every scale static, every
scale dynamic, and one quantization point of every layer switched to dynamic per-token scales at a
time (the rest static); then, per layer, how many w2 inputs per million the static scales clip, on
this text and on a reference text (docs/deploy.md, round 4). Fake-quant, fp32, first N windows.

    python runs/points.py results/recipe-h100/seed0.safetensors --test code --windows 6 \
        --reference ../shared/data/wikitext:wikitext-2-raw-v1:test
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import checkpoints  # noqa: E402
import data  # noqa: E402
import sasq  # noqa: E402


def clipped_per_million(model, qs, wins):
    """Per layer: the share of w2-input elements beyond the static grid (|x| > 127 s), in ppm."""
    over, count, hooks = [0] * len(qs), [0] * len(qs), []
    for i, layer in enumerate(model.layers):
        def hook(m, args, i=i):
            x = args[0].detach().abs()
            over[i] += (x > qs[i]["w2"].scale() * sasq.qmax(8)).sum().item()
            count[i] += x.numel()
        hooks.append(layer.feed_forward.w2.register_forward_pre_hook(hook))
    try:
        with torch.no_grad(), sasq.float_model(model):    # the float model's activations
            for w in wins:
                model(w[None, :-1])
    finally:
        for h in hooks:
            h.remove()
    return [1e6 * o / c for o, c in zip(over, count)]


def main():
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("scales")
    p.add_argument("--ckpt", default=None)
    p.add_argument("--test", default="code", help="the text, as eval.py takes it (default code)")
    p.add_argument("--reference", default=data.TEST, help="the text to compare clipping with "
                   "(default: WikiText-2 test from the hub)")
    p.add_argument("--windows", type=int, default=6, help="windows of 2048 tokens (default 6)")
    a = p.parse_args()
    model, tok = checkpoints.load_model(a.ckpt, "cpu", torch.float32)
    wins = data.token_windows(tok, a.test, 2048, a.windows)
    qs, _ = checkpoints.load_scales(a.scales, model)

    def ppl(dynamic=()):
        for row in qs:
            for point, q in row.items():
                q.mode = "dynamic" if point in dynamic else "static"
        return data.perplexity(model, wins, 1, "cpu", progress=False)
    print(f"{a.test}, first {a.windows} windows of 2048 tokens, {os.path.basename(a.scales)}")
    print(f"| dynamic | perplexity |\n|---|---|\n| nothing (all static) | {ppl():.3f} |")
    print(f"| everything | {ppl(tuple(sasq.POINTS)):.3f} |")
    for point in sasq.POINTS:
        print(f"| {point} inputs only | {ppl((point,)):.3f} |", flush=True)
    ppl()
    ref = data.token_windows(tok, a.reference, 2048, a.windows)
    mine, theirs = clipped_per_million(model, qs, wins), clipped_per_million(model, qs, ref)
    name = a.reference.rsplit("/", 1)[-1]
    print(f"\nw2 inputs clipped per million, per layer: {a.test} | {name}")
    for i, (m, t) in enumerate(zip(mine, theirs)):
        print(f"layer {i:2d}: {m:7.1f} | {t:7.1f}")


if __name__ == "__main__":
    main()
