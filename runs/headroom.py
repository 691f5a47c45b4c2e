"""Trained scales with their w2-input scales widened (train.py --headroom), against
dynamic W8A8, on the first N windows of each text (fake-quant, fp32; a CPU-sized runs/seeds.sh).

    python runs/headroom.py --texts DIR --windows 8 --factors 1,1.41,2 seed0.safetensors ...
DIR holds wt2-test.txt, hamlet.txt, licenses.txt, gospels.txt and code.txt, the scored texts as
plain files.
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

TEXTS = ("wt2-test", "hamlet", "licenses", "gospels", "code")


def main():
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("scales", nargs="+")
    p.add_argument("--ckpt", default=None)
    p.add_argument("--texts", default=".texts", help="folder of the five texts (default .texts)")
    p.add_argument("--windows", type=int, default=8, help="windows of 2048 tokens per text")
    p.add_argument("--factors", default="1,1.41,2")
    a = p.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, tok = checkpoints.load_model(a.ckpt, device, torch.float32)
    texts = {n: data.windows(tok.encode(open(os.path.join(a.texts, n + ".txt")).read()), 2048,
                             a.windows) for n in TEXTS}

    def ppl():
        return [data.perplexity(model, w, 1, device, progress=False) for w in texts.values()]
    sasq.attach(model, sasq.QuantConfig(act="dynamic"))
    dyn = ppl()
    sasq.detach(model)
    print(f"{a.windows} windows of 2048 tokens per text; perplexity, and vs dynamic W8A8")
    print("| scales | headroom | " + " | ".join(TEXTS) + " |\n|---|---|" + "---|" * len(TEXTS))
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
