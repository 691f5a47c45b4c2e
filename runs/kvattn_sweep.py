"""Scratch sweep for kvcache.py's tensor-core decode attention (one layer, LLaMA-2-7B shape, 16k cached x batch 8):
correctness against the reference on the GPU, then every tile against the previous lane kernel and SDPA.
    git show f88efe4:kvcache.py > runs/kvcache_lanes.py   # the previous (lane) kernel, to compare
    python runs/kvattn_sweep.py     # from the project root, on the GPU; writes results/bench/kvattn/
*-before-asm: the same sweep with int8 converted per element (60 % of HBM at best, against 72 % after)."""
import itertools
import json
import os
import sys

import torch

sys.path.insert(0, os.getcwd())
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from extras import bench_kernels as kern  # noqa: E402
from extras import kvcache  # noqa: E402
try:
    import kvcache_lanes
except ImportError:
    kvcache_lanes = None

dev = "cuda"
torch.manual_seed(0)
B, H, Hkv, L, D = 3, 8, 2, 5000, 128
q = torch.randn(B, H, 1, D, device=dev, dtype=torch.bfloat16)
ks, vs = (torch.rand(Hkv, D, device=dev) * 0.02 + 0.005 for _ in range(2))
for (fmt, dt), (h, hkv) in itertools.product(list(kvcache.CODES.items()) + [("bf16", torch.bfloat16)], ((8, 2), (8, 8), (32, 4))):
    qq = torch.randn(B, h, 1, D, device=dev, dtype=torch.bfloat16)
    kc, vc = ((torch.randn(B, hkv, L, D, device=dev) * 40).clamp(-127, 127) for _ in range(2))
    kc, vc = (c.round().to(dt) if fmt == "int" else c.to(dt) for c in (kc, vc))
    s1, s2 = (torch.rand(hkv, D, device=dev) * 0.02 + 0.005 for _ in range(2))
    for n in (1, 300, 4097, L):
        for bt, w, st in ((64, 4, 2), (128, 8, 3), (32, 4, 1)):
            ref = kvcache.reference(qq, kc, vc, s1, s2, n).float()
            out = kvcache.triton_attend(qq, kc, vc, s1, s2, n, block_t=bt, num_warps=w, num_stages=st).float()
            err = ((out - ref).abs().max() / ref.abs().max()).item()
            if not err < 2e-2:
                print("WRONG", fmt, h, hkv, n, bt, w, st, err)
print("checked: all formats, GQA 1/4/8, n 1..5000")


def timed(fn, reps=50):
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    best = float("inf")
    for _ in range(3):
        e0.record()
        for _ in range(reps):
            fn()
        e1.record()
        torch.cuda.synchronize()
        best = min(best, e0.elapsed_time(e1) / reps)
    return best


ctx, batch = 16384, 8
shape = (batch, 32, ctx, 128)
q = torch.randn(batch, 32, 1, 128, device=dev, dtype=torch.bfloat16)
ones = torch.ones(32, 128, device=dev)
hbm = kern.spec(kern.HBM) or 4.8e12
rows = []
for dt in (torch.bfloat16, torch.int8, torch.float8_e4m3fn):
    k, v = (torch.randn(shape, device=dev, dtype=torch.bfloat16).to(dt) for _ in range(2))
    byts = 2 * k.numel() * k.element_size()
    ops = {}
    if dt == torch.bfloat16:
        ops["SDPA"] = lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v)
    if kvcache_lanes is not None:
        ops["lanes 64x8" if dt != torch.bfloat16 else "lanes 64x4"] = lambda: kvcache_lanes.triton_attend(q, k, v, ones, ones, ctx)
    for bt, w, st in itertools.product((64, 128, 256), (4, 8), (2, 3, 4)):
        ops[f"tc {bt} pos x {w} warps x {st} stages"] = (lambda bt=bt, w=w, st=st: kvcache.triton_attend(
            q, k, v, ones, ones, ctx, block_t=bt, num_warps=w, num_stages=st))
    for sp in (8, 16, 32, 64):
        ops[f"tc 128x4x3 splits {sp}"] = lambda sp=sp: kvcache.triton_attend(q, k, v, ones, ones, ctx, splits=sp,
                                                                              block_t=128, num_stages=3)
    for name, fn in ops.items():
        try:
            t = timed(fn)
        except Exception as e:           # a tile that does not compile (shared memory): say so
            print(str(dt), name, "failed:", str(e)[:200])
            continue
        gbs = byts / t / 1e6
        rows.append({"cache": str(dt).split(".")[-1], "kernel": name, "ms": t, "GB/s": gbs, "% HBM": 100 * gbs * 1e9 / hbm})
        print(f"{rows[-1]['cache']:14s} {name:34s} {t:8.4f} ms {gbs:7.0f} GB/s {rows[-1]['% HBM']:5.1f} %", flush=True)
    k = v = None
    torch.cuda.empty_cache()
out = os.environ.get("OUT", ".")
json.dump(rows, open(os.path.join(out, "attn-sweep.json"), "w"), indent=1)
