"""What training costs: SASQ steps (train.train_scales itself) at the 7B shape, beside ordinary QAT of the
weights, and, under torchrun, sharded 13B / 70B steps (FSDP2) with random weights.

    python bench.py --sections peak,train --batches 1,4 --out DIR           # one GPU, a section of bench.py
    torchrun --nproc-per-node 4 bench_train.py --shape 70b --checkpointing  # several GPUs, FSDP2
"""
import argparse
import time

import torch
import torch.distributed as dist

import cli
from extras import fsdp
import model as llama
import sasq
import train
from extras.bench_kernels import build, by_kind, free, table


def train_flops_per_token(args, seq):
    """Matmul FLOPs per token of a SASQ step. Every decoder linear costs 6N, as in full fine-tuning:
    forward 2N, input gradient 2N, and a weight-shaped gradient 2N, because s is folded into W and
    reaches the loss through the quantized W * s (the gradient of s is a reduction of it). The frozen
    output head costs 4N. Causal attention: 2 * seq * dim per layer forward, 3x with its backward.
    Recomputation (checkpointing) is not counted."""
    hd = args.dim // args.n_heads
    per_layer = args.dim * (args.n_heads + 2 * args.n_kv_heads) * hd + args.dim * args.dim + 3 * args.dim * args.hidden_dim
    return 6 * args.n_layers * per_layer + 4 * args.dim * args.vocab_size + 3 * args.n_layers * 2 * seq * args.dim


def sec_train(a, dev, args, results):
    peak_tflops = results["peak"][0]["TFLOP/s"]
    gpu = dev == "cuda"
    seq, steps = (2048, 6) if gpu else (64, 3)
    m = build(args, dev)
    qs = sasq.attach(m, sasq.QuantConfig())
    sasq.calibrate(m, qs, torch.randint(args.vocab_size, (2, seq), device=dev), method="max", progress=False)
    if gpu:
        m.compile_blocks()                           # as train.py does
    wins = torch.randint(args.vocab_size, (32, seq + 1))
    flops = train_flops_per_token(args, seq)
    rows = []
    for ckpt in (False, True):
        m.checkpointing = ckpt
        for b in (a.batches if gpu else (1, 2)):
            free()
            if gpu:
                torch.cuda.reset_peak_memory_stats()
            r = {"checkpointing": ckpt, "batch": b}
            try:
                t0 = time.perf_counter()
                h = cli.Harness(progress=False)
                train.train_scales(m, qs, wins, steps, b, lr=1e-3, device=dev, harness=h)
                step = (time.perf_counter() - t0 - h.first) / (steps - 1)
            except torch.OutOfMemoryError:
                rows.append({**r, "s/step": "OOM"})
                print(f"checkpointing={ckpt} batch={b}: out of memory", flush=True)
                break
            r.update({"s/step": step, "tokens/s": b * seq / step, "MFU": b * seq / step * flops / (peak_tflops * 1e12),
                      "peak GB": torch.cuda.max_memory_allocated() / 1e9 if gpu else float("nan"),
                      "first step s": h.first, "500 x 8k tokens min": 500 * 8192 / (b * seq / step) / 60})
            rows.append(r)
    m.checkpointing = False
    if a.profile:
        best = max((r for r in rows if not r["checkpointing"] and "MFU" in r), key=lambda r: r["MFU"])
        profile_step(m, qs, wins, best["batch"], dev)
    rows = [{"trains": "scales (SASQ)", **r} for r in rows] + qat_weights(m, qs, wins, seq, dev, flops, peak_tflops,
                                                                                   a.batches if gpu else (1,))
    return table(rows, ["trains", "checkpointing", "batch", "s/step", "tokens/s", "MFU", "peak GB", "first step s",
                        "500 x 8k tokens min"], f"Training step, seq {seq} ({flops / 1e9:.1f} GFLOP/token)")


def qat_weights(m, qs, wins, seq, dev, flops, peak_tflops, batches):
    """Ordinary QAT for comparison (LLM-QAT style): the same fake-quant graph, but the decoder weights train
    too (their gradient flows through the weight rounding's STE), with SGD (no optimizer state) and with
    Adam (two fp32 states per weight). Same batches, checkpointing on, as the cheapest SASQ rows."""
    gpu, steps, rows = dev == "cuda", (6 if dev == "cuda" else 3), []
    weights = [ql.linear.weight for ql in sasq.quant_linears(m)]
    m.checkpointing = True
    torch._dynamo.reset()       # the compiled blocks took the weights as constants: trace them again
    for name, make in (("weights + scales, SGD", lambda p: torch.optim.SGD(p, lr=1e-6)),
                       ("weights + scales, Adam", lambda p: torch.optim.Adam(p, lr=1e-6))):
        for b in batches:
            free()
            if gpu:
                torch.cuda.reset_peak_memory_stats()
            r, opt = {"trains": name, "checkpointing": True, "batch": b}, None
            try:
                for w in weights:
                    w.requires_grad_(True)
                opt = make(weights + list(qs.parameters()))
                times = []
                for i in range(steps):
                    x = wins[i % len(wins):][:b].to(dev)
                    t0 = time.perf_counter()
                    with torch.autocast("cuda", torch.bfloat16, enabled=gpu):
                        loss = m(x[:, :-1], x[:, 1:])[1]
                    loss.backward()
                    if any(w.grad is None for w in weights):
                        raise RuntimeError("a weight got no gradient: this would not be weight QAT")
                    opt.step()
                    opt.zero_grad(set_to_none=True)
                    if gpu:
                        torch.cuda.synchronize()
                    times.append(time.perf_counter() - t0)
                step = sum(times[1:]) / (steps - 1)
                r.update({"s/step": step, "tokens/s": b * seq / step, "MFU": b * seq / step * flops / (peak_tflops * 1e12),
                          "peak GB": torch.cuda.max_memory_allocated() / 1e9 if gpu else float("nan"),
                          "first step s": times[0], "500 x 8k tokens min": 500 * 8192 / (b * seq / step) / 60})
            except torch.OutOfMemoryError:
                r["s/step"] = "OOM"
                print(f"{name} batch={b}: out of memory", flush=True)
            finally:
                del opt
                for w in weights:
                    w.requires_grad_(False)
                    w.grad = None
            rows.append(r)
            if r["s/step"] == "OOM":
                break
    m.checkpointing = False
    return rows


def profile_step(m, qs, wins, batch, dev):
    """Where the GPU time of training steps goes: kernels grouped by kind."""
    groups = by_kind(lambda: train.train_scales(m, qs, wins, 1, batch, lr=1e-3, device=dev), 3)
    total = sum(groups.values())
    return table([{"kernels": k, "ms per step": v, "share": v / total} for k, v in sorted(groups.items(), key=lambda kv: -kv[1])],
                 ["kernels", "ms per step", "share"], f"GPU time of a training step, batch {batch}, no checkpointing")


# --------------------------------------------------------------------------- 13B / 70B on several GPUs

SHAPES = {"tiny": dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=128, vocab_size=256), "7b": dict(), "13b": dict(dim=5120, n_layers=40, n_heads=40, n_kv_heads=40, hidden_dim=13824),
          "70b": dict(dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, hidden_dim=28672)}


def sharded(argv=None):
    """Train SASQ scales for a few steps on a LLaMA-2 shape with random weights, built sharded (no rank ever
    holds the whole model): seconds per step, tokens/s, MFU (6N per token over the N decoder linear
    weights; attention and the head not counted) and peak memory per GPU."""
    p = argparse.ArgumentParser(description=sharded.__doc__)
    p.add_argument("--shape", choices=SHAPES, default="13b", help="LLaMA-2 shape, random weights (default 13b)")
    p.add_argument("--batch-size", type=int, default=1, help="windows per GPU")
    p.add_argument("--seq-len", type=int, default=2048, help="tokens per window (default 2048)")
    p.add_argument("--steps", type=int, default=6, help="timed steps after 2 warm-up steps")
    p.add_argument("--header", action="store_true", help="print the table header first")
    p.add_argument("--checkpointing", action="store_true", help="activation checkpointing")
    p.add_argument("--peak-tflops", type=float, default=989.0, help="bf16 dense peak of one GPU")
    a = p.parse_args(argv)
    cli.check_args(p, a)
    comm, device = fsdp.setup("cuda" if torch.cuda.is_available() else "cpu")
    if a.header:
        print("| shape | GPUs | batch per GPU | checkpointing | s/step | tokens/s | MFU | peak GiB per GPU |\n|---|---|---|---|---|---|---|---|")
    world = comm.world if comm else 1
    args = llama.ModelArgs(**SHAPES[a.shape])
    with torch.device("meta"):
        model = llama.Transformer(args).to(torch.bfloat16)
    model.checkpointing = a.checkpointing
    if comm:
        fsdp.shard(model, device)
    else:
        model.to_empty(device=device).init_rope(device)
        model.requires_grad_(False)
    with torch.no_grad():
        for name, prm in model.named_parameters():    # random weights on each shard (only shapes matter)
            local = prm.to_local() if hasattr(prm, "to_local") else prm
            local.fill_(1.0) if name.endswith("norm.weight") else local.normal_(0, 0.02)
    qs = sasq.attach(model, sasq.QuantConfig())
    wins = torch.randint(args.vocab_size, (64, a.seq_len + 1))
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    train.train_scales(model, qs, wins, 2, a.batch_size, 2e-2, device=device,
                       harness=cli.Harness(comm=comm, progress=False))
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    sync()
    t0 = time.perf_counter()
    train.train_scales(model, qs, wins, a.steps, a.batch_size, 2e-2, device=device,
                       harness=cli.Harness(comm=comm, progress=False))
    sync()
    sec = (time.perf_counter() - t0) / a.steps
    hd = args.dim // args.n_heads       # decoder linear weights per layer: q, o; k, v; w1, w2, w3
    n = args.n_layers * (2 * args.dim * args.n_heads * hd + 2 * args.dim * args.n_kv_heads * hd + 3 * args.dim * args.hidden_dim)
    tokens = world * a.batch_size * a.seq_len
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else float("nan")
    mfu = tokens / sec * 6 * n / (world * a.peak_tflops * 1e12)
    print(f"| {a.shape} | {world} | {a.batch_size} | {int(a.checkpointing)} | {sec:.3f} | {tokens / sec:,.0f} | "
          f"{mfu:.2f} | {peak:.1f} |")
    if comm:
        dist.destroy_process_group()


if __name__ == "__main__":
    cli.run_main(sharded)
