"""Trained scales with their w2-input scales widened (train.py --headroom), against
dynamic W8A8, on the first N windows of each text (fake-quant, fp32; a CPU-sized runs/seeds.sh).

    python runs/headroom.py --windows 8 --factors 1,1.41,2 seed0.safetensors ... \
        --test ../shared/data/wikitext:wikitext-2-raw-v1:test --test hamlet --test ood
--test takes texts as eval.py does (default: WikiText-2 test from the hub, hamlet, ood).
"""
import argparse
import math
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import checkpoints  # noqa: E402
import data  # noqa: E402
import sasq  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("scales", nargs="+")
    p.add_argument("--ckpt", default=None)
    p.add_argument("--test", action="append", help="texts as eval.py takes them (default: "
                   "WikiText-2 test from the hub, hamlet, ood)")
    p.add_argument("--windows", type=int, default=8, help="windows of 2048 tokens per text")
    p.add_argument("--factors", default="1,1.41,2")
    a = p.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, tok = checkpoints.load_model(a.ckpt, device, torch.float32)
    specs = [t for s in a.test or [data.TEST, "hamlet", "ood"]
             for t in (data.OOD if s == "ood" else [s])]
    texts = {s.rsplit("/", 1)[-1]: data.token_windows(tok, s, 2048, a.windows) for s in specs}

    def ppl():
        return [data.perplexity(model, w, 1, device, progress=False) for w in texts.values()]
    sasq.attach(model, sasq.QuantConfig(act="dynamic"))
    dyn = ppl()
    sasq.detach(model)
    print(f"{a.windows} windows of 2048 tokens per text; perplexity, and vs dynamic W8A8")
    print("| scales | headroom | " + " | ".join(texts) + " |\n|---|---|" + "---|" * len(texts))
    print("| dynamic W8A8 | | " + " | ".join(f"{v:.3f}" for v in dyn) + " |")
    for path in a.scales:
        qs, _ = checkpoints.load_scales(path, model)
        trained = [q["w2"].log_scale.detach().clone() for q in qs]
        for f in map(float, a.factors.split(",")):
            with torch.no_grad():                 # as train.py --headroom f does
                for q, t in zip(qs, trained):
                    q["w2"].log_scale.copy_(t + math.log(f))
            r = ppl()
            print(f"| {os.path.basename(path)} | x{f:g} | " + " | ".join(
                f"{v:.3f} ({100 * (v / d - 1):+.1f} %)" for v, d in zip(r, dyn)) + " |", flush=True)
        sasq.detach(model)


if __name__ == "__main__":
    main()
