"""Speed and memory at LLaMA-2-7B scale (random weights: only shapes matter), and the real INT8 path.

    python bench.py --out bench_out                          # GPU: every section (about 6 min on an H100)
    python bench.py --sections peak,linear,infer --out ...   # some of them
    python bench.py --tiny                                   # CPU, tiny shapes: a smoke test of the code

Sections (each prints a table; --out gets bench-SECTION.json):
  peak    bf16 and int8 matmul throughput at 8192^3: the reference for MFU
  linear  one linear of each 7B shape, bf16 vs dynamic per-token INT8 vs static INT8, with the
          torch._int_mm back end and with our Triton kernel (int8.py), decode and prefill token counts;
          the gate/up GEMM alone: two GEMMs, merged, fused with the SwiGLU + quantize epilogue
  infer   the whole model: INT8 vs fake-quant logits; prefill (seq 2048, batch 1 and 8) and one
          decode step (batch 1..64, 512 tokens in the KV cache); weight memory. Variants: bf16, dynamic
          INT8 (per linear, and with gate/up merged as engines run it), static INT8, static INT8 with
          the fused FFN (int8.FusedFeedForward). --profile: kernel time by kind (GEMMs vs hand-offs)
          and the kernels torch.compile generates for one block
  eval    a WikiText-2-sized evaluation forward: fp vs fake-quant static W8A8, eager and compiled
  train   SASQ training (train.train_scales itself) at seq 2048, batch 1..8, with and without
          activation checkpointing: tokens/s, peak memory, MFU against the measured bf16 peak
  load    write a 7B-sized Hugging Face safetensors folder, time model.load on it (--tokenizer needed)
GPU timings replay CUDA graphs (no Python or launch overhead in the numbers) of torch.compile'd
blocks; the training section times real optimizer steps with the wall clock.
"""
import argparse
import gc
import json
import os
import re
import shutil
import tempfile
import time
import types

import torch
import torch.nn.functional as F

import cli
import int8
import model as llama
import sasq

SECTIONS = ("peak", "linear", "infer", "eval", "train", "load")
TINY = llama.ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=4, vocab_size=128, hidden_dim=128, max_seq_len=256)


# --------------------------------------------------------------------------- helpers

def build(args, device, dtype=torch.bfloat16, seed=0):
    """A Transformer with random N(0, 0.02) weights allocated directly on `device` in `dtype`."""
    with torch.device("meta"):
        m = llama.Transformer(args).to(dtype)
    m = m.to_empty(device=device)
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.02) if p.dim() == 2 else p.fill_(1.0)
    m.init_rope(device)
    return m.eval().requires_grad_(False)


CUDA = False      # whether the work runs on the GPU: main() sets it (--tiny runs on the CPU even on a GPU machine)


def timed(fn, reps, graph=True):
    """Milliseconds per call of fn(). On a GPU: one call captured in a CUDA graph, replayed `reps`
    times between two events (graph=False: plain calls, as an evaluation loop runs). On the CPU:
    the median wall clock of `reps` calls."""
    for _ in range(2):                  # compile, autotune, allocate
        fn()
    if not CUDA:
        times = []
        for _ in range(reps):
            t = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t) * 1e3)
        return sorted(times)[len(times) // 2]
    torch.cuda.synchronize()
    if graph:
        try:
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                fn()
            fn = g.replay
            fn()
        except RuntimeError as e:       # not capturable: time plain calls, and say so
            print(f"(CUDA graph capture failed, timing plain calls: {str(e).splitlines()[0][:120]})")
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(reps):
        fn()
    b.record()
    torch.cuda.synchronize()
    return a.elapsed_time(b) / reps


def linears(m):
    """(parent module, attribute name) of every decoder linear at the four quantization points."""
    return [(parent, n) for _, _, parent, names in sasq.points(m) for n in names]


def use(m, variant):
    """Put one set of linears (a list in linears() order) into the model."""
    for (parent, name), mod in zip(linears(m), variant):
        setattr(parent, name, mod)


def variants(m, calib):
    """bf16 nn.Linear, fake-quant static W8A8 (frozen), real static INT8 and dynamic INT8 versions of
    every decoder linear, with PTQ-max scales from `calib` (random tokens: speed does not care)."""
    bf16 = [getattr(p, n) for p, n in linears(m)]
    qs = sasq.attach(m, sasq.QuantConfig())
    sasq.calibrate(m, qs, calib, method="max", progress=False)
    sasq.freeze(m)
    fake = [getattr(p, n) for p, n in linears(m)]
    shared = {}
    out = {"bf16": bf16, "fake-quant": fake, "static int8": [int8.Int8Linear(q, shared=shared) for q in fake],
           "dynamic int8": [int8.DynamicInt8Linear(q.linear) for q in fake], "ffn": [l.feed_forward for l in m.layers]}
    use(m, out["static int8"])
    out["ffn:static fused"] = [int8.FusedFeedForward(layer.feed_forward) for layer in m.layers]
    use(m, out["dynamic int8"])
    out["ffn:dynamic merged"] = [int8.DynamicFeedForward(layer.feed_forward) for layer in m.layers]
    use(m, bf16)
    return out


def weight_bytes(mods):
    return sum(b.numel() * b.element_size() for mod in mods for b in list(mod.buffers()) + list(mod.parameters()))


def table(rows, cols, title):
    """Print rows (dicts) as an aligned table."""
    print(f"\n## {title}")
    fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)
    widths = [max(len(c), *(len(fmt(r.get(c, ""))) for r in rows)) for c in cols]
    print("  ".join(c.rjust(w) for c, w in zip(cols, widths)))
    for r in rows:
        print("  ".join(fmt(r.get(c, "")).rjust(w) for c, w in zip(cols, widths)), flush=True)
    return rows


def free():
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# --------------------------------------------------------------------------- sections

def sec_peak(a, dev, args, results):
    n = 256 if a.tiny else 8192
    x, y = (torch.randn(n, n, device=dev, dtype=torch.bfloat16) for _ in range(2))
    qa, qb = (torch.randint(-128, 128, (n, n), device=dev, dtype=torch.int8) for _ in range(2))
    ws = torch.ones(n, device=dev)
    ops = {"bf16 matmul (cuBLAS)": lambda: x @ y, "int8 torch._int_mm (int32 out)": lambda: torch._int_mm(qa, qb.t())}
    if dev == "cuda" and int8.triton is not None:
        ops["int8 Triton kernel (bf16 out)"] = lambda: int8.triton_mm(qa, qb, ws)
    rows = []
    for name, fn in ops.items():
        t = timed(fn, a.reps)
        rows.append({"op": name, "n": n, "ms": t, "TFLOP/s": 2 * n ** 3 / t / 1e9})
    return table(rows, ["op", "n", "ms", "TFLOP/s"], f"matmul peak, {n}^3")


SHAPES_7B = {"wq/wk/wv/wo": (4096, 4096), "w1/w3": (4096, 11008), "w2": (11008, 4096)}   # (in, out)


def sec_linear(a, dev, args, results):
    """Each column: ms per call of one linear. 'torch' = torch._int_mm + scaling in PyTorch (int32
    result through memory); 'triton' = our kernel with the scaling in its epilogue."""
    shapes = {"attn": (64, 64), "up": (64, 128), "down": (128, 64)} if a.tiny else SHAPES_7B
    tokens = [1, 16] if a.tiny else [1, 16, 64, 2048, 16384]
    compile_ = (lambda f: torch.compile(f, dynamic=False)) if dev == "cuda" else (lambda f: f)
    backends = ["torch", "triton"] if dev == "cuda" and int8.triton is not None else ["torch"]
    rows = []
    for name, (k, n) in shapes.items():
        lin = torch.nn.Linear(k, n, bias=False, device=dev)
        act = sasq.ActQuantizer(k, sasq.QuantConfig(), norm_input=True).to(dev)
        with torch.no_grad():
            act.log_scale.fill_(torch.tensor(2.0 / 127).log().item())
            act.log_c.fill_(torch.tensor(8.0).log().item())
        static = compile_(int8.Int8Linear(sasq.QuantLinear(lin, act, 8)))
        dynamic = compile_(int8.DynamicInt8Linear(lin))
        w = lin.weight.to(torch.bfloat16)
        for m in tokens:
            x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
            r = {"tokens": m, "layer": name, "bf16": timed(lambda: F.linear(x, w), a.reps)}
            for b in backends:
                for label, f in (("dynamic", dynamic), ("static", static)):
                    r[f"{label} {b}"] = timed(lambda: (setattr(int8, "BACKEND", b), f(x)), a.reps)
            best = backends[-1]
            r["static/dyn"] = r[f"dynamic {best}"] / r[f"static {best}"]
            r["static/bf16"] = r["bf16"] / r[f"static {best}"]
            rows.append(r)
    int8.BACKEND = backends[-1]
    cols = ["tokens", "layer", "bf16"] + [f"{v} {b}" for b in backends for v in ("dynamic", "static")]
    table(rows, cols + ["static/dyn", "static/bf16"], "one linear, ms per call (speed-ups use " + backends[-1] + ")")
    return rows + gate_up(a, dev, list(shapes.values())[1], tokens[-2:])       # w1/w3's shape


def gate_up(a, dev, shape, tokens):
    """The gate/up GEMM alone, ms per call: w1 and w3 as two GEMMs (bf16 out), as one merged GEMM (bf16 out),
    and fused with the SwiGLU + static-quantization epilogue (int8 out): what the epilogue costs."""
    (k, n), ops = shape, {}
    w13 = torch.randint(-127, 128, (2 * n, k), device=dev, dtype=torch.int8)
    ws13, s2 = torch.rand(2 * n, device=dev) * 1e-4, torch.rand(n, device=dev) + 0.5
    rows = []
    for m in tokens:
        q = torch.randint(-128, 128, (m, k), device=dev, dtype=torch.int8)
        ops = {"w1 + w3": lambda: (int8.mm(q, w13[:n], ws13[:n], None, torch.bfloat16),
                                   int8.mm(q, w13[n:], ws13[n:], None, torch.bfloat16)),
               "merged": lambda: int8.mm(q, w13, ws13, None, torch.bfloat16),
               "fused SwiGLU + quantize": lambda: int8.gate_up(q, w13, ws13, s2, torch.bfloat16)}
        rows.append({"tokens": m, "layer": f"gate/up {k}->2x{n}", **{name: timed(f, a.reps) for name, f in ops.items()}})
    return table(rows, ["tokens", "layer", *ops], "the gate/up GEMM, ms per call")


def compare(ref, out):
    """How far logits `out` are from `ref`, in units of ref's standard deviation, and top-1 agreement."""
    d = (out - ref).abs()
    return {"max |d| / std": (d.max() / ref.std()).item(), "mean |d| / std": (d.mean() / ref.std()).item(),
            "top-1 agree": (out.argmax(-1) == ref.argmax(-1)).float().mean().item()}


def agreement(m, V, x):
    """Static INT8 against fake-quant (and fake-quant against bf16, the quantization error itself):
    on the logits, and on one decoder layer's output for the same input (before depth amplifies)."""
    h, cos, sin = m.tok_embeddings(x), m.rope_cos[:x.shape[1]], m.rope_sin[:x.shape[1]]
    logits, layer = {}, {}
    with torch.no_grad():
        for v in ("bf16", "fake-quant", "static int8", "static fused", "dynamic int8", "dynamic merged"):
            use_variant(m, V, v)
            logits[v] = m(x)[0].float()
            layer[v] = (m.layers[0](h, cos, sin) - h).float()
    rows = [{"compare": f"{b} vs {a_}, {what}", **compare(d[a_], d[b])}
            for what, d in (("logits", logits), ("layer 0 output", layer))
            for a_, b in (("fake-quant", "static int8"), ("bf16", "fake-quant"), ("static int8", "static fused"),
                          ("dynamic int8", "dynamic merged"))]
    return table(rows, ["compare", "max |d| / std", "mean |d| / std", "top-1 agree"],
                 f"INT8 vs fake-quant on {x.shape[1]} random tokens (top-1: argmax over the last dim)")


def memory(m, V):
    """Bytes of the decoder linears (int8: codes + fp32 scales) and of the whole model."""
    rest = sum(p.numel() * p.element_size() for n, p in m.named_parameters()
               if not n.startswith("layers.") or "norm" in n)              # embeddings, head, norms
    rows = [{"weights": v, "linears GB": weight_bytes(V[v]) / 1e9, "whole model GB": (weight_bytes(V[v]) + rest) / 1e9}
            for v in ("bf16", "static int8")]
    return table(rows, ["weights", "linears GB", "whole model GB"], "weight memory")


VARIANTS = ("bf16", "dynamic int8", "dynamic merged", "static int8", "static fused")
FUSED = {"static fused": "static int8", "dynamic merged": "dynamic int8"}     # FFN form -> the linears it is built from


def use_variant(m, V, v):
    """Put variant v into the model. "static fused": static INT8 with each FFN an int8.FusedFeedForward (the
    gate/up GEMM writes the w2 input's codes); "dynamic merged": dynamic INT8 with each FFN an
    int8.DynamicFeedForward (gate and up as one GEMM, as serving engines run the dynamic baseline)."""
    for layer, ff in zip(m.layers, V["ffn"]):
        layer.feed_forward = ff
    use(m, V[FUSED.get(v, v)])
    for layer, ff in zip(m.layers, V.get("ffn:" + v, [])):
        layer.feed_forward = ff


def speed(a, m, V, inputs, title, **kw):
    """ms per model call of each variant (use_variant), one row per input; the ratios compare static INT8
    with the dynamic variant of the same form (per linear; fused: the best dynamic) and with bf16."""
    rows = []
    with torch.no_grad():
        for tok in inputs:
            r = {"batch": tok.shape[0], "tokens": tok.numel()}
            for v in VARIANTS:
                use_variant(m, V, v)
                r[v] = timed(lambda: m(tok, **kw), a.reps if tok.shape[1] == 1 else max(2, a.reps // 5))
            r["static/dyn"], r["static/bf16"] = r["dynamic int8"] / r["static int8"], r["bf16"] / r["static int8"]
            r["fused/dyn"] = min(r["dynamic int8"], r["dynamic merged"]) / r["static fused"]
            r["fused/bf16"] = r["bf16"] / r["static fused"]
            r["fused tokens/s"] = tok.numel() / r["static fused"] * 1e3
            rows.append(r)
            free()
    use_variant(m, V, "bf16")
    return table(rows, ["batch", "tokens", *VARIANTS, "static/dyn", "static/bf16", "fused/dyn", "fused/bf16",
                        "fused tokens/s"], title)


def sec_infer(a, dev, args, results):
    gpu = dev == "cuda"
    m = build(args, dev)
    V = variants(m, torch.randint(args.vocab_size, (2, 512 if gpu else 32), device=dev))
    out = {"logits": agreement(m, V, torch.randint(args.vocab_size, (1, 512 if gpu else 32), device=dev))}
    for q in V["fake-quant"]:
        q.frozen = None                               # drop the fake-quant weight-code cache
    out["memory"] = memory(m, V)
    if gpu:
        m.compile_blocks()
    seq, ctx, batches = (2048, 512, (1, 8, 32, 64)) if gpu else (64, 32, (1, 4))
    prefill = [torch.randint(args.vocab_size, (b, seq), device=dev) for b in batches[:2]]
    out["prefill"] = speed(a, m, V, prefill, f"prefill, ms per forward (seq {seq})")
    if a.profile:
        out["profile prefill"] = profile_infer(m, V, prefill)
    if not a.no_decode:
        m.setup_cache(max(batches), ctx + 1)
        decode = [torch.randint(args.vocab_size, (b, 1), device=dev) for b in batches]
        out["decode"] = speed(a, m, V, decode, f"decode, ms per step ({ctx} tokens in the KV cache)", pos=ctx)
        if a.profile:
            out["profile decode"] = profile_infer(m, V, decode[:1], ctx)
        m.setup_cache(0, 0)
    if a.profile and gpu:
        out["codegen"] = codegen(m, V, a.out)
    return out


def sec_eval(a, dev, args, results):
    """WikiText-2 test with the LLaMA-2 tokenizer is 166 windows of 2048 tokens; eval.py's GPU batch is 8."""
    gpu = dev == "cuda"
    m = build(args, dev)
    V = variants(m, torch.randint(args.vocab_size, (2, 512 if gpu else 32), device=dev))
    tok = torch.randint(args.vocab_size, (8, 2048) if gpu else (2, 64), device=dev)
    rows = []
    with torch.no_grad():
        for compiled in (False, True):
            if compiled and gpu:
                m.compile_blocks()
            for v in ("bf16", "fake-quant"):
                use(m, V[v])
                t = timed(lambda: m(tok), max(2, a.reps // 5), graph=False)
                rows.append({"model": v, "compiled": compiled and gpu, "ms/forward": t,
                             "tokens/s": tok.numel() / t * 1e3, "166 windows s": 166 * 2048 / (tok.numel() / t * 1e3)})
            rows[-1]["vs bf16"] = rows[-1]["ms/forward"] / rows[-2]["ms/forward"]
            if not gpu:
                break
    return table(rows, ["model", "compiled", "ms/forward", "tokens/s", "166 windows s", "vs bf16"],
                 f"evaluation forward, batch {tok.shape[0]} x {tok.shape[1]}")


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
    import train
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
                _, first = train.train_scales(m, qs, wins, steps, b, lr=1e-3, device=dev, progress=False)
                step = (time.perf_counter() - t0 - first) / (steps - 1)
            except torch.OutOfMemoryError:
                rows.append({**r, "s/step": "OOM"})
                print(f"checkpointing={ckpt} batch={b}: out of memory", flush=True)
                break
            r.update({"s/step": step, "tokens/s": b * seq / step, "MFU": b * seq / step * flops / (peak_tflops * 1e12),
                      "peak GB": torch.cuda.max_memory_allocated() / 1e9 if gpu else float("nan"),
                      "first step s": first, "500 x 8k tokens min": 500 * 8192 / (b * seq / step) / 60})
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


def kind(name):
    """The kind of a GPU kernel, by name. Inductor's kernels first: their names list the ops they feed
    ("..._int8_mm_..._silu", "..._scaled_dot_product_cudnn_attention_...")."""
    k = name.lower()
    return ("compiled elementwise" if k.startswith(("triton_", "cpp_fused")) else
            "int8 GEMM (ours)" if "int8_mm" in k or "int8_gate_up" in k else
            "attention" if any(w in k for w in ("flash", "fmha", "attention", "sdpa")) else
            "matmul" if any(w in k for w in ("gemm", "nvjet", "cutlass", "sm90_xmma", "matmul", "aten::mm")) else "other")


def by_kind(fn, reps, top=0):
    """GPU kernel time of fn() in ms per call, by kernel kind (torch.profiler over `reps` plain calls), and
    the `top` longest kernels. On the CPU (--tiny): the ops' self CPU time, grouped the same way (a smoke test)."""
    from torch.profiler import ProfilerActivity, profile
    gpu = CUDA
    sync = torch.cuda.synchronize if gpu else (lambda: None)
    fn()
    sync()
    with profile(activities=[ProfilerActivity.CUDA if gpu else ProfilerActivity.CPU]) as prof:
        for _ in range(reps):
            fn()
        sync()
    times = {e.key: (e.self_device_time_total if gpu else e.self_cpu_time_total) / 1e3 / reps for e in prof.key_averages()}
    groups = {}
    for name, t in times.items():
        groups[kind(name)] = groups.get(kind(name), 0) + t
    for name, t in sorted(times.items(), key=lambda kv: -kv[1])[:top]:
        print(f"    {t:8.4f} ms  {kind(name):21s} {name[:110]}")
    return groups


def profile_step(m, qs, wins, batch, dev):
    """Where the GPU time of training steps goes: kernels grouped by kind."""
    import train
    groups = by_kind(lambda: train.train_scales(m, qs, wins, 1, batch, lr=1e-3, device=dev, progress=False), 3)
    total = sum(groups.values())
    return table([{"kernels": k, "ms per step": v, "share": v / total} for k, v in sorted(groups.items(), key=lambda kv: -kv[1])],
                 ["kernels", "ms per step", "share"], f"GPU time of a training step, batch {batch}, no checkpointing")


def profile_infer(m, V, inputs, ctx=None):
    """Where the GPU time goes, per variant: at prefill one decoder block's (GEMMs vs the hand-offs between
    them: quantization, norms, SwiGLU, RoPE, residuals), at decode (ctx: KV-cache length) a whole step's.
    Kernel time only: a decode step's kernel sum against its CUDA-graph time shows the gaps between kernels."""
    cols, rows = ["int8 GEMM (ours)", "matmul", "attention", "compiled elementwise", "other"], []
    with torch.no_grad():
        for tok in inputs:
            h = m.tok_embeddings(tok)
            cos, sin = m.rope_cos[:tok.shape[1]], m.rope_sin[:tok.shape[1]]
            for v in VARIANTS:
                use_variant(m, V, v)
                print(f"  batch {tok.shape[0]}, {v}: longest kernels")
                g = by_kind((lambda: m.layers[0](h, cos, sin, 0)) if ctx is None else (lambda: m(tok, pos=ctx)), 5, 6)
                rows.append({"batch": tok.shape[0], "variant": v, **{c: g.get(c, 0.0) for c in cols},
                             "kernels ms": sum(g.values()), "hand-off share": g.get(cols[3], 0.0) / sum(g.values())})
    use_variant(m, V, "bf16")
    what = f"one decoder block at prefill (seq {inputs[0].shape[1]})" if ctx is None else "a whole decode step"
    return table(rows, ["batch", "variant", *cols, "kernels ms", "hand-off share"],
                 f"GPU kernel time of {what} by kind, ms (int8 GEMM (ours) includes the fused gate/up GEMM)")


# a kernel inductor generates: name = async_compile.triton('name', '''source''' (GPU) or .cpp_pybinding([...], r'''...
KERNEL = re.compile(r"^(\w+) = async_compile\.\w+\(.*?'''(.*?)'''", re.S | re.M)
WRITES_INT8 = re.compile(r"\.to\(tl\.int8\)|(?<!const )\bint8_t\* out_ptr")       # Triton cast, C++ output


def kernels(code):
    """(name, computes an RMSNorm (a square root), writes int8) for each kernel in inductor's generated code."""
    return [(name, "sqrt" in body, bool(WRITES_INT8.search(body))) for name, body in KERNEL.findall(code)]


def codegen(m, V, out_dir=None, seq=256, which=VARIANTS[1:]):
    """What torch.compile generates for one decoder block: how many kernels, which compute the RMSNorm and
    which write int8 codes. With static scales the norm kernel itself should write the codes (the scale is
    folded into the division that follows the norm, no reduction needed). Code goes to out_dir/codegen-*.txt."""
    from torch._inductor.utils import run_and_get_code
    layer, rows = m.layers[0], []
    h = torch.randn(1, seq, m.args.dim, device=m.rope_cos.device, dtype=torch.bfloat16)
    for v in which:
        use_variant(m, V, v)
        torch._dynamo.reset()
        with torch.no_grad(), torch._inductor.config.patch(force_disable_caches=True):
            code = "\n".join(run_and_get_code(torch.compile(layer.forward), h, m.rope_cos[:seq], m.rope_sin[:seq])[1])
        if out_dir:
            os.makedirs(out_dir, exist_ok=True)
            with open(os.path.join(out_dir, f"codegen-{v.replace(' ', '-')}.txt"), "w") as f:
                f.write(code)
        ks = kernels(code)
        rows.append({"variant": v, "kernels": len(ks), "norm kernels": sum(n for _, n, _ in ks),
                     "norm kernels writing int8": sum(n and i for _, n, i in ks), "kernels writing int8": sum(i for *_, i in ks)})
        print(f"{v}: " + ", ".join(name for name, *_ in ks))
    torch._dynamo.reset()
    use_variant(m, V, "bf16")
    return table(rows, ["variant", "kernels", "norm kernels", "norm kernels writing int8", "kernels writing int8"],
                 "kernels torch.compile generates for one decoder block (ours not counted)")


def write_hf(m, args, folder, tokenizer):
    """Save `m` as a Hugging Face folder (export.py's names, q/k order and config.json), in 2 safetensors
    shards as the hub's 7B has, with the tokenizer."""
    from safetensors.torch import save_file
    import export
    sd = {k: v.cpu() for k, v in export.to_hf(m.state_dict(), args).items()}
    keys = list(sd)
    for j, part in enumerate((keys[:len(keys) // 2], keys[len(keys) // 2:])):
        save_file({k: sd[k] for k in part}, os.path.join(folder, f"model-{j + 1:05d}-of-00002.safetensors"))
    with open(os.path.join(folder, "config.json"), "w") as f:      # LLaMA-2's BOS/EOS ids
        json.dump(export.hf_config(args, types.SimpleNamespace(bos_id=1, eos_id=2), next(m.parameters()).dtype), f)
    shutil.copy(tokenizer, os.path.join(folder, "tokenizer.model"))


def sec_load(a, dev, args, results):
    """Time llama.load on a HF-layout folder of the 7B shape (written first, so the page cache is warm)."""
    if not a.tokenizer:
        print("\n## load: skipped (needs --tokenizer PATH/tokenizer.model)")
        return []
    folder = tempfile.mkdtemp(prefix="bench-hf-", dir=a.load_dir)
    try:
        t0 = time.perf_counter()
        write_hf(build(args, dev), args, folder, a.tokenizer)
        write_s = time.perf_counter() - t0
        free()
        size = sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder))
        t0 = time.perf_counter()
        m, _ = llama.load(folder, dev, torch.bfloat16)
        if dev == "cuda":
            torch.cuda.synchronize()
        load_s = time.perf_counter() - t0
        del m
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    cols = ["GB on disk", "build + write s", "llama.load s (warm page cache)", "GB/s"]
    return table([dict(zip(cols, (size / 1e9, write_s, load_s, size / 1e9 / load_s)))], cols,
                 "loading a HF safetensors checkpoint")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="tiny model on the CPU (a smoke test of the code)")
    p.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated, from {', '.join(SECTIONS)}")
    p.add_argument("--batches", default="1,2,4,8", help="train section: batch sizes (GPU)")
    p.add_argument("--no-decode", action="store_true", help="infer section: prefill only")
    p.add_argument("--out", default=None, help="folder for bench-SECTION.json files")
    p.add_argument("--reps", type=int, default=20, help="timed repetitions (fewer for whole-model forwards)")
    p.add_argument("--profile", action="store_true", help="GPU time by kernel kind (GEMMs vs hand-offs): infer (one "
                   "block at prefill, a decode step; plus the kernels compile generates) and train (one step)")
    p.add_argument("--tokenizer", default=None, help="a tokenizer.model, for the load section's folder")
    p.add_argument("--load-dir", default=None, help="where the load section writes its checkpoint (default: tmp)")
    p.add_argument("--force", action="store_true", help="replace bench-SECTION.json files that exist in --out")
    p.add_argument("--debug", action="store_true", help="show the full traceback on errors")
    a = p.parse_args(argv)
    try:
        a.batches = [int(b) for b in a.batches.split(",")]
    except ValueError:
        p.exit(2, f"{p.prog}: error: --batches {a.batches}: write batch sizes separated by commas, e.g. 1,2,4\n")
    cli.check_args(p, a)
    for flag, path, kind in (("--tokenizer", a.tokenizer, os.path.isfile), ("--load-dir", a.load_dir, os.path.isdir)):
        if path is not None and not kind(path):
            p.exit(2, f"{p.prog}: error: {flag} {path}: no such {'file' if kind is os.path.isfile else 'folder'}\n")
    if not a.tiny and not torch.cuda.is_available():
        p.exit(2, f"{p.prog}: error: no CUDA GPU here: the 7B-shape sections need one; --tiny runs them on the CPU\n")
    sections = [s for s in a.sections.split(",") if s]
    if bad := [s for s in sections if s not in SECTIONS]:
        p.error(f"unknown section(s) {', '.join(bad)}; choose from {', '.join(SECTIONS)}")
    if a.out:                    # before minutes of measuring: a place we may write, nothing replaced
        there = [s for s in sections if os.path.exists(os.path.join(a.out, f"bench-{s}.json"))]
        if there and not a.force:
            p.exit(2, f"{p.prog}: error: --out {a.out} already holds bench-{there[0]}.json; pass --force to replace it\n")
        parent = a.out if os.path.isdir(a.out) else os.path.dirname(os.path.abspath(a.out))
        if os.path.isfile(a.out) or not (os.path.isdir(parent) and os.access(parent, os.W_OK)):
            p.exit(2, f"{p.prog}: error: --out {a.out}: not a folder we can write\n")
    dev = "cuda" if torch.cuda.is_available() and not a.tiny else "cpu"
    global CUDA
    CUDA = dev == "cuda"
    args = TINY if a.tiny else llama.ModelArgs()          # ModelArgs() is LLaMA-2-7B
    llama.allow_recompiles()                                # one graph per shape and variant
    device_name = torch.cuda.get_device_name() if dev == "cuda" else "cpu"
    print(f"device {device_name}, torch {torch.__version__}, int8 back end {int8.BACKEND if dev == 'cuda' else 'torch'}")
    results = {}
    run = {"linear": sec_linear, "infer": sec_infer, "eval": sec_eval, "train": sec_train, "load": sec_load}
    for s in sections:
        t0 = time.perf_counter()
        try:
            if s == "peak" or (s == "train" and "peak" not in results):     # train needs the peak for MFU
                results["peak"] = sec_peak(a, dev, args, results)
            if s != "peak":
                results[s] = run[s](a, dev, args, results)
        except Exception as e:           # on a GPU run, one failing section must not cost the others
            if a.tiny:
                raise
            import traceback
            traceback.print_exc()
            results[s] = {"error": f"{type(e).__name__}: {e}"[:500]}
        print(f"[{s}: {time.perf_counter() - t0:.0f} s]", flush=True)
        free()
        if a.out:
            os.makedirs(a.out, exist_ok=True)
            with open(os.path.join(a.out, f"bench-{s}.json"), "w") as f:
                json.dump({"device": device_name, "torch": torch.__version__, "section": s, "result": results[s],
                           **({"peak": results["peak"]} if s == "train" else {})}, f, indent=1)
    return results


if __name__ == "__main__":
    cli.run(main)
