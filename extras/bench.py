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
  load    write a 7B-sized Hugging Face safetensors folder, time checkpoints.load_model on it (--tokenizer needed)
  kv      decode with a long KV cache (4k, 16k, 32k tokens; batch 1 and 8), static fused INT8 weights:
          bf16 cache (PyTorch's attention, and our kernel) against int8 and fp8 codes (kvcache.py)
  fp8     FP8 (e4m3) GEMMs through torch._scaled_mm (fp8.py): static per-tensor activation scales vs
          dynamic per-token vs bf16, the whole model, prefill and decode; logits against the FP8 fake-quant
  sweep   (not in the default list) time candidate tiles of our int8 GEMM per 7B shape and M bucket;
          writes int8_configs.json to --out: the table int8.py reads (copy it next to int8.py)
Where they live: peak, linear and the kernel profiles in bench_kernels.py (with the timers and the
variants), train in bench_train.py (which also times 13B / 70B under torchrun), the rest here.
GPU timings replay CUDA graphs (no Python or launch overhead in the numbers) of torch.compile'd
blocks; the training section times real optimizer steps with the wall clock.
"""
import argparse
import dataclasses
import json
import math
import os
import shutil
import tempfile
import time
import types

import torch

from extras import bench_kernels as kern
from extras import bench_train
import checkpoints
import cli
from extras import int8
from extras import kvcache
from extras import kvquant
import model as llama
import sasq
from extras.bench_kernels import VARIANTS, build, free, table, timed, use, use_variant, variants, weight_bytes

SECTIONS = ("peak", "linear", "infer", "eval", "train", "load", "kv", "fp8", "sweep")
DEFAULT = SECTIONS[:-1]


# --------------------------------------------------------------------------- the whole model: speed and memory

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


def speed(a, m, V, inputs, title, **kw):
    """ms per model call of each variant (use_variant), one row per input; the ratios compare static INT8
    with the dynamic variant of the same form (per linear; fused: the best dynamic) and with bf16. Decode
    (kw pos: cached tokens): the bytes a step must read (int8 weights, the bf16 KV cache) against the HBM."""
    rows, hbm = [], kern.spec(kern.HBM)
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
            if "pos" in kw:
                a_ = m.layers[0].attention
                cache = 2 * m.args.n_layers * tok.shape[0] * (kw["pos"] + 1) * a_.n_kv_heads * a_.head_dim * 2
                gb = (weight_bytes(V["static int8"]) + cache) / 1e9
                r["fused GB/s"] = gb / r["static fused"] * 1e3
                r["% of HBM"] = 100 * r["fused GB/s"] * 1e9 / hbm if hbm else None
                r["bound ms"] = gb * 1e9 / hbm * 1e3 if hbm else None
            rows.append(r)
            free()
    use_variant(m, V, "bf16")
    extra = ["fused GB/s", "% of HBM", "bound ms"] if "pos" in kw else []
    return table(rows, ["batch", "tokens", *VARIANTS, "static/dyn", "static/bf16", "fused/dyn", "fused/bf16",
                        "fused tokens/s", *extra], title + a.run_label)


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
        out["profile prefill"] = kern.profile_infer(m, V, prefill)
    if not a.no_decode:
        m.setup_cache(max(batches), ctx + 1)
        decode = [torch.randint(args.vocab_size, (b, 1), device=dev) for b in batches]
        out["decode"] = speed(a, m, V, decode, f"decode, ms per step ({ctx} tokens in the KV cache)", pos=ctx)
        if a.profile:
            out["profile decode"] = kern.profile_infer(m, V, decode[:1], ctx)
        m.setup_cache(0, 0)
    if a.profile and gpu:
        out["codegen"] = kern.codegen(m, V, a.out)
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


# --------------------------------------------------------------------------- decoding from a long KV cache

CACHES = {"bf16, PyTorch attention": None, "bf16, our kernel": "bf16", "int8 codes": "int", "fp8 codes": "fp8"}


def sec_kv(a, dev, args, results):
    """ms per decode step with the cache's K and V in bf16 or as 8-bit codes (kvcache.py), the weights static
    fused INT8 (what ships). Scales are set, not trained: speed does not depend on their values."""
    gpu = dev == "cuda"
    # on a CPU the cache kernels run their PyTorch reference: say so in the column names
    caches = CACHES if gpu else {k.replace("our kernel", "reference of our kernel (CPU)"): v
                                 for k, v in CACHES.items()}
    ctxs, batches = ((4096, 16384, 32768), (1, 8)) if gpu else ((48, 96), (1, 2))
    args = dataclasses.replace(args, max_seq_len=max(ctxs) + 1)
    m = build(args, dev)
    qs = sasq.attach(m, sasq.QuantConfig())
    sasq.calibrate(m, qs, torch.randint(args.vocab_size, (2, 64), device=dev), method="max", progress=False)
    int8.fuse(int8.convert(m, keep_float=False))
    if gpu:
        m.compile_blocks()
    at, rows = m.layers[0].attention, []
    per_token = 2 * args.n_layers * at.n_kv_heads * at.head_dim          # K and V values per cached token
    with torch.no_grad():
        for ctx in ctxs:
            for b in batches:
                r = {"cached tokens": ctx, "batch": b, "bf16 cache GB": per_token * b * ctx * 2 / 1e9}
                for name, fmt in caches.items():
                    kvquant.detach(m)
                    if fmt in kvcache.CODES:
                        for d in kvquant.attach(m, 8, fmt):
                            for q in d.values():
                                q.log_scale.fill_(math.log(0.02))
                    need = per_token * b * (ctx + 1) * (1 if fmt in kvcache.CODES else 2)
                    if gpu and need > 0.9 * torch.cuda.mem_get_info()[0]:
                        r[name] = "does not fit"
                        continue
                    m.setup_cache(b, ctx + 1, None if fmt is None else kvcache.quantized(m, fmt))
                    tok = torch.randint(args.vocab_size, (b, 1), device=dev)
                    r[name] = timed(lambda: m(tok, pos=ctx), a.reps)
                    m.setup_cache(0, 0)
                    free()
                bf16 = [r[n] for n in list(caches)[:2] if isinstance(r[n], float)]
                for n in list(caches)[2:]:
                    if bf16 and isinstance(r[n], float):
                        r[f"{n[:4]} vs best bf16"] = min(bf16) / r[n]
                rows.append(r)
    kvquant.detach(m)
    out = {"decode": table(rows, ["cached tokens", "batch", "bf16 cache GB", *caches, "int8 vs best bf16",
                                  "fp8  vs best bf16"],
                           "decode step with a long KV cache, ms (static fused INT8 weights; 'vs': speed-up)" + a.run_label)}
    if gpu:
        out["attention"] = attention_alone(a, args, dev)
    return out


def attention_alone(a, args, dev, ctx=16384, batch=8):
    """One layer's decode attention alone, against the bytes of cache it reads: what the kernel streams."""
    at = llama.Attention(args)
    shape, rows = (batch, at.n_kv_heads, ctx, at.head_dim), []
    q = torch.randn(batch, at.n_heads, 1, at.head_dim, device=dev, dtype=torch.bfloat16)
    ones = torch.ones(at.n_kv_heads, at.head_dim, device=dev)
    hbm = kern.spec(kern.HBM)
    for dtype in (torch.bfloat16, torch.int8, torch.float8_e4m3fn):
        k, v = (torch.zeros(shape, device=dev, dtype=torch.bfloat16).to(dtype) for _ in range(2))
        ops = {"PyTorch SDPA": lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v)} if dtype == torch.bfloat16 else {}
        ops.update({f"ours, {bt} positions x {w} warps x {st} stages": (lambda bt=bt, w=w, st=st: kvcache.triton_attend(
                        q, k, v, ones, ones, ctx, block_t=bt, num_warps=w, num_stages=st))
                    for bt, w, st in ((128, 4, 3), (64, 4, 3), (128, 4, 2), (128, 8, 3))})
        for name, fn in ops.items():
            t = timed(fn, a.reps)
            gbs = 2 * k.numel() * k.element_size() / t / 1e6
            rows.append({"cache": str(dtype).split(".")[-1], "kernel": name, "ms": t, "GB/s": gbs,
                         "% of HBM": 100 * gbs * 1e9 / hbm if hbm else None})
        k = v = ops = None
        free()
    return table(rows, ["cache", "kernel", "ms", "GB/s", "% of HBM"],
                 f"one layer's decode attention, {ctx} cached tokens x batch {batch}" + a.run_label)


# --------------------------------------------------------------------------- loading a checkpoint

def write_hf(m, args, folder, tokenizer):
    """Save `m` as a Hugging Face folder (export.py's names, q/k order and config.json), in 2 safetensors
    shards as the hub's 7B has, with the tokenizer."""
    from safetensors.torch import save_file
    from extras import export
    sd = {k: v.cpu() for k, v in export.to_hf(m.state_dict(), args).items()}
    keys = list(sd)
    for j, part in enumerate((keys[:len(keys) // 2], keys[len(keys) // 2:])):
        save_file({k: sd[k] for k in part}, os.path.join(folder, f"model-{j + 1:05d}-of-00002.safetensors"))
    with open(os.path.join(folder, "config.json"), "w") as f:      # LLaMA-2's BOS/EOS ids
        json.dump(export.hf_config(args, types.SimpleNamespace(bos_id=1, eos_id=2), next(m.parameters()).dtype), f)
    shutil.copy(tokenizer, os.path.join(folder, "tokenizer.model"))


def sec_load(a, dev, args, results):
    """Time checkpoints.load_model on a HF-layout folder of the 7B shape (written first, so the page cache is warm)."""
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
        m, _ = checkpoints.load_model(folder, dev, torch.bfloat16)
        if dev == "cuda":
            torch.cuda.synchronize()
        load_s = time.perf_counter() - t0
        del m
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    cols = ["GB on disk", "build + write s", "load_model s (warm page cache)", "GB/s"]
    return table([dict(zip(cols, (size / 1e9, write_s, load_s, size / 1e9 / load_s)))], cols,
                 "loading a HF safetensors checkpoint")


def sec_fp8(a, dev, args, results):
    """FP8 (e4m3) GEMMs through torch._scaled_mm (fp8.py): static per-tensor activation scales (the
    quantization fused into the producer by torch.compile) vs dynamic per-token vs bf16, the whole model,
    prefill and one decode step; and the static layers' logits against the FP8 fake-quant."""
    from extras import fp8
    gpu = dev == "cuda"
    m = build(args, dev)
    bf16 = [getattr(p, n) for p, n in kern.linears(m)]
    qs = sasq.attach(m, sasq.RECIPES["fp8"])
    sasq.calibrate(m, qs, torch.randint(args.vocab_size, (2, 512 if gpu else 32), device=dev), progress=False,
                   alpha=0.5)
    sasq.freeze(m)
    fake, shared = [getattr(p, n) for p, n in kern.linears(m)], {}
    V = {"bf16": bf16, "dynamic fp8": [fp8.DynamicFp8Linear(q.linear) for q in fake],
         "static fp8": [fp8.Fp8Linear(q, shared) for q in fake]}
    x = torch.randint(args.vocab_size, (1, 512 if gpu else 32), device=dev)
    with torch.no_grad():
        ref = m(x)[0].float()
        rows = []
        for v in V:
            use(m, V[v])
            rows.append({"compare": f"{v} vs fake-quant static FP8, logits", **compare(ref, m(x)[0].float())})
    out = {"logits": table(rows, ["compare", "max |d| / std", "mean |d| / std", "top-1 agree"],
                           f"FP8 GEMMs vs fake-quant on {x.shape[1]} random tokens")}
    for q in fake:
        q.frozen = None                               # drop the fake-quant weight-code cache
    free()
    if gpu:
        m.compile_blocks()
    seq, ctx, batches = (2048, 512, (1, 8, 32, 64)) if gpu else (64, 32, (1, 4))

    def rows_of(inputs, **kw):
        rows = []
        with torch.no_grad():
            for tok in inputs:
                r = {"batch": tok.shape[0], "tokens": tok.numel()}
                for v in V:
                    use(m, V[v])
                    r[v] = timed(lambda: m(tok, **kw), a.reps if tok.shape[1] == 1 else max(2, a.reps // 5))
                r["static/dyn"], r["static/bf16"] = r["dynamic fp8"] / r["static fp8"], r["bf16"] / r["static fp8"]
                rows.append(r)
                free()
        return rows
    cols = ["batch", "tokens", *V, "static/dyn", "static/bf16"]
    prefill = [torch.randint(args.vocab_size, (b, seq), device=dev) for b in batches[:2]]
    out["prefill"] = table(rows_of(prefill), cols, f"FP8 prefill, ms per forward (seq {seq}){a.run_label}")
    m.setup_cache(max(batches), ctx + 1)
    decode = [torch.randint(args.vocab_size, (b, 1), device=dev) for b in batches]
    out["decode"] = table(rows_of(decode, pos=ctx), cols,
                          f"FP8 decode, ms per step ({ctx} tokens in the KV cache){a.run_label}")
    m.setup_cache(0, 0)
    use(m, bf16)
    return out


# 8B-class shapes people serve (their published configs): GQA, a large vocabulary, Qwen2's biases
SHAPES = {"llama-2-7b": {},
          "llama-3.1-8b": dict(n_kv_heads=8, vocab_size=128256, hidden_dim=14336, rope_theta=500000.0),
          "qwen2.5-7b": dict(dim=3584, n_layers=28, n_heads=28, n_kv_heads=4, vocab_size=152064,
                             hidden_dim=18944, rope_theta=1e6, qkv_bias=True)}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="tiny model on the CPU (a smoke test of the code)")
    p.add_argument("--shape", choices=SHAPES, default="llama-2-7b", help="the model shape, random weights "
                   "(default %(default)s)")
    p.add_argument("--sections", default=",".join(DEFAULT), help=f"comma-separated, from {', '.join(SECTIONS)} "
                   "(sweep is not in the default)")
    p.add_argument("--repeat", type=int, default=1, help="run the sections this many times in a row (tables say which "
                   "run they are): timings that repeat")
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
        names = [s if i == 0 else f"{s}-run{i + 1}" for i in range(a.repeat) for s in sections]
        there = [n for n in names if os.path.exists(os.path.join(a.out, f"bench-{n}.json"))]
        if there and not a.force:
            p.exit(2, f"{p.prog}: error: --out {a.out} already holds bench-{there[0]}.json; pass --force "
                      "to replace it\n")
        parent = a.out if os.path.isdir(a.out) else os.path.dirname(os.path.abspath(a.out))
        if os.path.isfile(a.out) or not (os.path.isdir(parent) and os.access(parent, os.W_OK)):
            p.exit(2, f"{p.prog}: error: --out {a.out}: not a folder we can write\n")
    dev = "cuda" if torch.cuda.is_available() and not a.tiny else "cpu"
    kern.CUDA = dev == "cuda"
    args = kern.TINY if a.tiny else llama.ModelArgs(**SHAPES[a.shape])
    llama.allow_recompiles()                                # one graph per shape and variant
    device_name = torch.cuda.get_device_name() if dev == "cuda" else "cpu"
    print(f"device {device_name}, torch {torch.__version__}, int8 back end {int8.BACKEND if dev == 'cuda' else 'torch'}")
    results = {}
    run = {"linear": kern.sec_linear, "infer": sec_infer, "eval": sec_eval, "train": bench_train.sec_train, "load": sec_load,
           "kv": sec_kv, "fp8": sec_fp8, "sweep": kern.sec_sweep}
    for i, s in ((i, s) for i in range(a.repeat) for s in sections):
        a.run_label = f" (run {i + 1} of {a.repeat})"
        t0 = time.perf_counter()
        try:
            key = s if i == 0 else f"{s}-run{i + 1}"               # repeated runs: bench-infer-run2.json, ...
            if s == "peak" or (s == "train" and "peak" not in results):     # train needs the peak for MFU
                results["peak"] = kern.sec_peak(a, dev, args, results)
            results[key] = results["peak"] if s == "peak" else run[s](a, dev, args, results)
        except Exception as e:           # on a GPU run, one failing section must not cost the others
            if a.tiny:
                raise
            import traceback
            traceback.print_exc()
            results[key] = {"error": f"{type(e).__name__}: {e}"[:500]}
        print(f"[{s}: {time.perf_counter() - t0:.0f} s]", flush=True)
        free()
        if a.out and key in results:
            os.makedirs(a.out, exist_ok=True)
            with open(os.path.join(a.out, f"bench-{key}.json"), "w") as f:
                json.dump({"device": device_name, "torch": torch.__version__, "section": s, "result": results[key],
                           **({"peak": results["peak"]} if s == "train" else {})}, f, indent=1)
    return results


if __name__ == "__main__":
    cli.run_main(main)
