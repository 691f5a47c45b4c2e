"""Per-linear speed of one LLaMA-2-7B decoder layer: bf16 vs dynamic per-token INT8 vs static INT8.

    python bench.py --out bench_out          # GPU: 7B shapes, prefill and decode token counts
    python bench.py --tiny                   # CPU, small shapes: exercises the code path in seconds

Weights are random (only shapes matter for speed). The INT8 layers are torch.compile'd so that the
elementwise quantize / rescale ops fuse around torch._int_mm; bf16 is a plain F.linear (cuBLAS).
Not measured here yet: whole-model training step, MFU, activation checkpointing (see README).
"""
import argparse
import json
import os

import torch
import torch.nn.functional as F

import int8
import sasq

SHAPES_7B = {"wq/wk/wv/wo": (4096, 4096), "w1/w3": (4096, 11008), "w2": (11008, 4096)}   # (in, out)
SHAPES_TINY = {"attn": (64, 64), "up": (64, 128), "down": (128, 64)}


def make_layers(k, n, device):
    lin = torch.nn.Linear(k, n, bias=False, device=device)
    act = sasq.ActQuantizer(k, sasq.QuantConfig(), truncate=True).to(device)
    with torch.no_grad():
        act.log_scale.fill_(torch.tensor(2.0 / 127).log().item())
        act.log_c.fill_(torch.tensor(8.0).log().item())
    static = int8.Int8Linear(sasq.QuantLinear(lin, act, 8))
    dynamic = int8.DynamicInt8Linear(lin)
    w_bf16 = lin.weight.to(torch.bfloat16)
    return (lambda x: F.linear(x, w_bf16)), dynamic, static, w_bf16


def timed(fn, x, reps):
    """Median milliseconds per call (CUDA events on GPU, wall clock on CPU)."""
    import time
    for _ in range(3):
        fn(x)
    times = []
    for _ in range(reps):
        if x.is_cuda:
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn(x)
            b.record()
            torch.cuda.synchronize()
            times.append(a.elapsed_time(b))
        else:
            t = time.perf_counter()
            fn(x)
            times.append((time.perf_counter() - t) * 1e3)
    return sorted(times)[len(times) // 2]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="small shapes on CPU (a smoke test of the code)")
    p.add_argument("--out", default=None, help="folder for bench.json")
    p.add_argument("--reps", type=int, default=20)
    a = p.parse_args(argv)
    device = "cpu" if a.tiny or not torch.cuda.is_available() else "cuda"
    shapes = SHAPES_TINY if a.tiny else SHAPES_7B
    tokens = [1, 8, 64, 2048, 8 * 2048] if not a.tiny else [1, 16]
    # one compiled graph per token count: raise dynamo's recompile limit (8) above len(tokens) x shapes
    cfg = torch._dynamo.config
    setattr(cfg, "recompile_limit" if hasattr(cfg, "recompile_limit") else "cache_size_limit", 64)
    compile_ = (lambda f: torch.compile(f, dynamic=False)) if device == "cuda" else (lambda f: f)
    rows = []
    print(f"{'tokens':>6} {'layer':>12} {'bf16 ms':>9} {'dyn int8':>9} {'static':>9} {'st/dyn':>7} {'st/bf16':>7}")
    for name, (k, n) in shapes.items():
        bf16, dynamic, static, w = make_layers(k, n, device)
        dynamic, static = compile_(dynamic), compile_(static)
        for m in tokens:
            x = torch.randn(m, k, device=device, dtype=torch.bfloat16)
            with torch.no_grad():
                t = [timed(f, x, a.reps) for f in (bf16, dynamic, static)]
            rows.append({"tokens": m, "layer": name, "bf16_ms": t[0], "dynamic_ms": t[1], "static_ms": t[2],
                         "weight_bytes_bf16": w.numel() * 2, "weight_bytes_int8": w.numel()})
            print(f"{m:>6} {name:>12} {t[0]:>9.4f} {t[1]:>9.4f} {t[2]:>9.4f} {t[1] / t[2]:>7.2f} {t[0] / t[2]:>7.2f}")
    if a.out:
        os.makedirs(a.out, exist_ok=True)
        device_name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
        with open(os.path.join(a.out, "bench.json"), "w") as f:
            json.dump({"device": device_name, "rows": rows}, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
