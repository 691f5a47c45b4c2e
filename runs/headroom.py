"""Trained scales with their w2-input scales widened (train.py --headroom), against
dynamic W8A8, on the first N windows of each text (fake-quant, fp32; a CPU-sized runs/seeds.sh).

    python runs/headroom.py --windows 8 --factors 1,1.41,2 seed0.safetensors ... \
        --test ../shared/data/wikitext:wikitext-2-raw-v1:test --test hamlet --test ood
--test takes texts as eval.py does (default: WikiText-2 test from the hub, hamlet, ood).
--write DIR instead writes each file widened by each factor into DIR, as train.py --headroom leaves
its files (the config's headroom multiplied too): how results/recipe-genres-h100/*-x1.41 were made.
"""
import argparse
import dataclasses
import json
import math
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import checkpoints  # noqa: E402
import data  # noqa: E402
import sasq  # noqa: E402


def write(path, factor, folder):
    meta, tensors, cfg = checkpoints.read_scales(path)
    tensors = {k: v + math.log(factor) if k.endswith(".w2.log_scale") else v
               for k, v in tensors.items()}
    cfg = dataclasses.replace(cfg, headroom=cfg.headroom * factor)
    name = os.path.basename(path).replace(".safetensors", f"-x{factor:g}.safetensors")
    out = os.path.join(folder, name)
    if os.path.exists(out):
        sys.exit(f"error: {out} exists; nothing written over")
    with checkpoints.atomic_path(out, force=False) as tmp:
        checkpoints.save_safetensors(tensors, tmp,
                                     {**meta, "config": json.dumps(dataclasses.asdict(cfg))})
    print("wrote", out)


def main():
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("scales", nargs="+")
    p.add_argument("--ckpt", default=None)
    p.add_argument("--test", action="append", help="texts as eval.py takes them (default: "
                   "WikiText-2 test from the hub, hamlet, ood)")
    p.add_argument("--windows", type=int, default=8, help="windows of 2048 tokens per text")
    p.add_argument("--factors", default="1,1.41,2")
    p.add_argument("--write", metavar="DIR", help="write the widened files there; no evaluation")
    a = p.parse_args()
    factors = [float(f) for f in a.factors.split(",")]
    if a.write:
        for path in a.scales:
            for f in factors:
                write(path, f, a.write)
        return
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
        for f in factors:
            with torch.no_grad():                 # as train.py --headroom f does
                for q, t in zip(qs, trained):
                    q["w2"].log_scale.copy_(t + math.log(f))
            r = ppl()
            print(f"| {os.path.basename(path)} | x{f:g} | " + " | ".join(
                f"{v:.3f} ({100 * (v / d - 1):+.1f} %)" for v, d in zip(r, dyn)) + " |", flush=True)
        sasq.detach(model)


if __name__ == "__main__":
    main()
