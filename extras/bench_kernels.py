"""How bench.py measures, and the GPU kernels themselves: the timers (CUDA graphs on a GPU), the model
variants every section compares, the matmul peak, one linear and the gate/up GEMM per back end, and where
the GPU time goes (kernels by kind, the code torch.compile generates).

    python bench.py --sections peak,linear             # these sections (bench.py is the command)
"""
import gc
import os
import re
import time

import torch
import torch.nn.functional as F

from extras import int8
import model as llama
import sasq

TINY = llama.ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=4, vocab_size=128, hidden_dim=128, max_seq_len=256)


# --------------------------------------------------------------------------- timing and the variants

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



# --------------------------------------------------------------------------- kernels

def sec_peak(a, dev, args, results):
    n = 256 if a.tiny else 8192
    x, y = (torch.randn(n, n, device=dev, dtype=torch.bfloat16) for _ in range(2))
    qa, qb = (torch.randint(-128, 128, (n, n), device=dev, dtype=torch.int8) for _ in range(2))
    ws = torch.ones(n, device=dev)
    ops = {f"bf16 matmul ({'cuBLAS' if dev == 'cuda' else 'CPU'})": lambda: x @ y,
           "int8 torch._int_mm (int32 out)": lambda: torch._int_mm(qa, qb.t())}
    if dev == "cuda" and int8.triton is not None:
        ops["int8 Triton kernel (bf16 out)"] = lambda: int8.triton_mm(qa, qb, ws)
    rows = []
    for name, fn in ops.items():
        t = timed(fn, a.reps)
        rows.append({"op": name, "n": n, "ms": t, "TFLOP/s": 2 * n ** 3 / t / 1e9})
    return table(rows, ["op", "n", "ms", "TFLOP/s"], f"matmul peak, {n}^3" + getattr(a, "run_label", ""))


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



# --------------------------------------------------------------------------- where the GPU time goes

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


# --------------------------------------------------------------------------- the tile table (int8_configs.json)

HBM = {"H200": 4.8e12, "H100": 3.35e12}            # bytes/s, the SXM data sheets: the decode bound
INT8_PEAK = {"H200": 1979e12, "H100": 1979e12}      # dense int8 ops/s: the prefill bound


def spec(table):
    """This GPU's entry of HBM or INT8_PEAK (None off the GPU or for other cards)."""
    name = torch.cuda.get_device_name() if CUDA else ""
    return next((v for k, v in table.items() if k in name), None)


SWEEP_SHAPES = [("mm", 4096, 4096), ("mm", 11008, 4096), ("mm", 22016, 4096), ("mm", 4096, 11008),
                ("swiglu", 22016, 4096)]      # (kind, N, K): q/k/v/o, w1/w3, merged gate/up, w2, fused gate/up
SWEEP_M = {16: 1, 32: 32, 64: 64, 4096: 2048}   # the M each bucket is timed at


def candidates(b):
    mm = lambda bm, bn, bk, s, w: dict(kernel="mm", BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8, num_stages=s, num_warps=w)  # noqa: E731
    mv = lambda bn, bk, sk, s=4, w=4: dict(kernel="mv", BLOCK_N=bn, BLOCK_K=bk, SPLIT_K=sk, num_stages=s, num_warps=w)  # noqa: E731
    return {16: [mm(16, 32, 256, 5, 4), mm(16, 64, 256, 4, 4)] +
                [mv(bn, bk, sk) for bn, bk, sk in ((32, 512, 1), (32, 512, 2), (64, 512, 1), (64, 512, 2), (64, 256, 1),
                                                   (64, 256, 4), (128, 256, 1), (128, 256, 2), (64, 1024, 1), (128, 512, 1))] +
                [mv(64, 512, 1, 6), mv(64, 256, 1, 6), mv(128, 256, 1, 3, 8), mv(32, 1024, 1, 3)],
            32: [mm(32, 64, 256, 4, 4), mm(16, 64, 256, 4, 4), mm(32, 128, 128, 4, 4), mm(32, 64, 128, 5, 4)],
            64: [mm(64, 128, 128, 4, 4), mm(64, 64, 256, 4, 4), mm(64, 128, 256, 3, 4), mm(64, 256, 128, 3, 8)],
            4096: [mm(128, 256, 128, 3, 8), mm(256, 128, 128, 3, 8), mm(128, 256, 128, 4, 8), mm(256, 128, 128, 4, 8),
                   mm(128, 256, 64, 5, 8), mm(128, 128, 128, 4, 8), mm(128, 128, 128, 3, 8), mm(128, 128, 64, 4, 8),
                   mm(128, 128, 128, 4, 4)]}[b]


def time_tiles(kind, m, n, k, cfg, reps):
    """ms per GEMM with these tiles. Several weight copies, called in turn, together 4x the L2: every call
    streams its weights from HBM, as a model's layers do."""
    copies = min(16, 1 + int(200e6 // (n * k)))
    ws = [torch.randint(-127, 128, (n, k), device="cuda", dtype=torch.int8) for _ in range(copies)]
    q = torch.randint(-128, 128, (m, k), device="cuda", dtype=torch.int8)
    scale, s2 = torch.rand(n, device="cuda") * 1e-4, torch.rand(n // 2, device="cuda") + 0.5
    one = (lambda w: int8.triton_gate_up(q, w, scale, s2, config=cfg)) if kind == "swiglu" else \
        (lambda w: int8.triton_mm(q, w, scale, config=cfg))
    return timed(lambda: [one(w) for w in ws], reps) / copies


def sec_sweep(a, dev, args, results):
    """Time every candidate tile configuration of each 7B GEMM shape and M bucket; the fastest go into
    int8_configs.json (in --out; copy it next to int8.py to commit it) and into this run's table."""
    if dev != "cuda" or int8.triton is None:
        print("\n## sweep: skipped (times our Triton kernels: needs a CUDA GPU)")
        return []
    import json
    rows, best = [], {}
    hbm, peak = spec(HBM), spec(INT8_PEAK)
    for kind, n, k in SWEEP_SHAPES:
        for b, m in SWEEP_M.items():
            times = []
            for cfg in candidates(b):
                try:
                    times.append((time_tiles(kind, m, n, k, cfg, a.reps), cfg))
                except Exception as e:            # too much shared memory for this tile, say
                    print(f"  {kind} {m}x{n}x{k} {cfg}: {type(e).__name__}")
            t, cfg = min(times, key=lambda tc: tc[0])
            default = time_tiles(kind, m, n, k, int8.DEFAULTS[b], a.reps)
            best[f"{kind} {b} {n} {k}"] = cfg
            tiles = ",".join(str(v) for key, v in cfg.items() if key != "kernel")
            r = {"kind": kind, "M": m, "N": n, "K": k, "best": f"{cfg['kernel']} {tiles}", "ms": t, "default ms": default,
                 "weights GB/s": n * k / t / 1e6, "TOPS": 2 * m * n * k / t / 1e9, "tried": times}
            r["% of HBM"] = 100 * r["weights GB/s"] * 1e9 / hbm if hbm else None
            r["% of int8 peak"] = 100 * r["TOPS"] * 1e12 / peak if peak else None
            rows.append(r)
            print(f"  {kind} {m}x{n}x{k}: {r['best']} {t * 1e3:.1f} us ({r['weights GB/s']:.0f} GB/s, {r['TOPS']:.0f} TOPS)",
                  flush=True)
    int8.CONFIGS.update(best)                     # the rest of this run uses them
    if a.out:
        os.makedirs(a.out, exist_ok=True)
        with open(os.path.join(a.out, "int8_configs.json"), "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                       "triton": int8.triton.__version__, "configs": best}, f, indent=1)
    return table(rows, ["kind", "M", "N", "K", "best", "ms", "default ms", "weights GB/s", "% of HBM", "TOPS",
                        "% of int8 peak"], "int8 GEMM tiles per shape and M bucket (weights stream from HBM)")
