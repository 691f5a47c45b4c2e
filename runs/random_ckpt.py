"""Write a LLaMA-2 shape with random bf16 weights in Meta's layout (params.json + consolidated.00.pth,
the tokenizer beside it), for runs that need a checkpoint path (extras.fsdp) rather than a model in memory.

    python runs/random_ckpt.py 13b /tmp/llama-13b-random --tokenizer ../shared/models/llama-2-tokenizer/tokenizer.model
"""
import argparse
import json
import os
import shutil
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from recipe_7b import SHAPES  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("shape", choices=SHAPES)
    p.add_argument("out")
    p.add_argument("--tokenizer", required=True, help="a LLaMA-2 tokenizer.model (copied into OUT)")
    a = p.parse_args()
    s = {"dim": 4096, "n_layers": 32, "n_heads": 32, "n_kv_heads": 32, "hidden_dim": 11008, **SHAPES[a.shape]}
    d, h, dev = s["dim"], s["hidden_dim"], "cuda" if torch.cuda.is_available() else "cpu"
    r = lambda *shape: torch.randn(*shape, device=dev).mul_(0.02).to(torch.bfloat16).cpu()  # noqa: E731
    sd = {"tok_embeddings.weight": r(32000, d), "output.weight": r(32000, d), "norm.weight": torch.ones(d)}
    for i in range(s["n_layers"]):
        q = f"layers.{i}."
        sd.update({q + f"attention.w{n}.weight": r(d, d) for n in "qkvo"})
        sd.update({q + "feed_forward.w1.weight": r(h, d), q + "feed_forward.w3.weight": r(h, d),
                   q + "feed_forward.w2.weight": r(d, h), q + "attention_norm.weight": torch.ones(d),
                   q + "ffn_norm.weight": torch.ones(d)})
    os.makedirs(a.out, exist_ok=True)
    torch.save(sd, os.path.join(a.out, "consolidated.00.pth"))
    params = {"dim": d, "n_layers": s["n_layers"], "n_heads": s["n_heads"], "multiple_of": 256,
              "ffn_dim_multiplier": None, "norm_eps": 1e-5, "vocab_size": -1}
    with open(os.path.join(a.out, "params.json"), "w") as f:
        json.dump(params, f)
    shutil.copy(a.tokenizer, os.path.join(a.out, "tokenizer.model"))
    print(f"wrote {a.out}: {a.shape} shape, {sum(t.numel() for t in sd.values()) / 1e9:.2f} B parameters")


if __name__ == "__main__":
    main()
