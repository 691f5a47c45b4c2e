"""Real static INT8 inference: each fake-quant QuantLinear of sasq.py becomes an int8 x int8 GEMM.

Static: the activation is divided by its frozen per-channel scale and rounded (elementwise, no
reduction over the tensor), multiplied with int8 codes of the folded weight W * s (int32
accumulation), and the int32 sums are scaled by one float per output column. This is the same
arithmetic the fake-quant graph simulates, so logits agree to float rounding.

The GEMM (`mm`) has two back ends. On a GPU with Triton it is our kernel below: the int32 tile is
scaled and cast to bf16 in the kernel's epilogue, so the int32 result never goes to memory. Elsewhere
(CPU, or `int8.BACKEND = "torch"`) it is torch._int_mm followed by the scaling in PyTorch.

Where only a static scale can be applied, the same kernel fuses more: `FusedFeedForward` runs gate and up
as one GEMM whose epilogue applies SwiGLU and writes the w2 input's int8 codes. `DynamicFeedForward` is the
dynamic baseline as serving engines run it (gate/up merged into one GEMM). bench.py times all of them.
"""
import json
import os
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

import sasq

try:
    import triton
    import triton.language as tl
except ImportError:      # CPU-only installs: the torch back end is used
    triton = None

BACKEND = "triton" if triton is not None else "torch"


# --------------------------------------------------------------------------- the GEMM

def _torch_mm(q, w, w_scale, row_scale, out_dtype):
    m = q.shape[0]
    if q.is_cuda and m <= 16:                  # cuBLAS int8 wants M > 16: pad small batches (decode)
        q = F.pad(q, (0, 0, 0, 17 - m))
    y = torch._int_mm(q, w.t())[:m].float() * w_scale
    return (y if row_scale is None else y * row_scale[:, None]).to(out_dtype)


if triton is not None:
    @triton.jit
    def _tile(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
        """This program's (row, column) tile: GROUP_M row-tiles run side by side, so the W tiles they share
        are still in L2."""
        pid = tl.program_id(0)
        grid_m, grid_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
        width = GROUP_M * grid_n
        first_m = (pid // width) * GROUP_M
        group_m = tl.minimum(grid_m - first_m, GROUP_M)
        return first_m + (pid % width) % group_m, (pid % width) // group_m

    @triton.jit
    def _int8_mm_kernel(a_ptr, w_ptr, ws_ptr, rs_ptr, c_ptr, M, N, K, ROW_SCALE: tl.constexpr, SWIGLU: tl.constexpr,
                        BF16: tl.constexpr, EVEN_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                        BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
        """C[m, n] = (sum_k A[m, k] W[n, k]) * ws[n] (* rs[m]). A (M, K), W (N, K) int8, contiguous.
        SWIGLU: W's rows interleave w1 and w3 (gate 0, up 0, gate 1, ...), rs is the w2 input's static
        scale, and C (M, N / 2) gets the int8 codes of silu(gate) * up / rs (see the fused FFN below)."""
        pid_m, pid_n = _tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        rk = tl.arange(0, BLOCK_K)
        a = a_ptr + (rm % M)[:, None] * K + rk[None, :]      # rows past M re-read valid rows, never stored
        w = w_ptr + (rn % N)[None, :] * K + rk[:, None]      # a (BLOCK_K, BLOCK_N) tile of W.T
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
        for k in range(0, tl.cdiv(K, BLOCK_K)):
            if EVEN_K:
                x, y = tl.load(a), tl.load(w)
            else:
                x = tl.load(a, mask=rk[None, :] < K - k * BLOCK_K, other=0)
                y = tl.load(w, mask=rk[:, None] < K - k * BLOCK_K, other=0)
            acc = tl.dot(x, y, acc, out_dtype=tl.int32)
            a += BLOCK_K
            w += BLOCK_K
        _epilogue(acc, rm, rn, pid_n, ws_ptr, rs_ptr, c_ptr, M, N, ROW_SCALE, SWIGLU, BF16, BLOCK_M, BLOCK_N)

    @triton.jit
    def _epilogue(acc, rm, rn, pid_n, ws_ptr, rs_ptr, c_ptr, M, N, ROW_SCALE: tl.constexpr, SWIGLU: tl.constexpr,
                  BF16: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        """int32 tile (BLOCK_M, BLOCK_N) -> float, times the per-column weight scale (and per-row token scale),
        cast and stored; or, SWIGLU, the fused FFN's codes."""
        out = acc.to(tl.float32) * tl.load(ws_ptr + rn, mask=rn < N, other=0.0)[None, :]
        if SWIGLU:
            _swiglu_quantize(out, rm, pid_n, rs_ptr, c_ptr, M, N // 2, BF16, BLOCK_M, BLOCK_N // 2)
        else:
            if ROW_SCALE:
                out = out * tl.load(rs_ptr + rm, mask=rm < M, other=0.0)[:, None]
            mask = (rm < M)[:, None] & (rn < N)[None, :]
            tl.store(c_ptr + rm[:, None] * N + rn[None, :], out.to(c_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _int8_mv_kernel(a_ptr, w_ptr, ws_ptr, rs_ptr, c_ptr, sums_ptr, count_ptr, M, N, K, ROW_SCALE: tl.constexpr,
                        SWIGLU: tl.constexpr, BF16: tl.constexpr, EVEN_K: tl.constexpr, BLOCK_N: tl.constexpr,
                        BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr):
        """Decode (M <= 16): the same product, written C.T = W A.T so that the weight tile (BLOCK_N rows, K
        contiguous) is the wide operand and the 16 token rows the narrow one, with K split over SPLIT_K
        programs so that a 4096-wide output still keeps every SM streaming weights. Each split adds its int32
        sums into `sums` with atomics (integer sums: exact in any order); the split that finishes last reads
        them back, zeroes `sums` and its counter for the next call, and runs the epilogue: no second kernel."""
        pid_n, pid_k = tl.program_id(0), tl.program_id(1)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        rm = tl.arange(0, 16)
        span = tl.cdiv(K, SPLIT_K * BLOCK_K) * BLOCK_K          # each split's share of K
        rk = tl.arange(0, BLOCK_K)
        w = w_ptr + (rn % N)[:, None] * K + pid_k * span + rk[None, :]     # (BLOCK_N, BLOCK_K)
        a = a_ptr + (rm % M)[None, :] * K + pid_k * span + rk[:, None]     # (BLOCK_K, 16): A.T
        acc = tl.zeros((BLOCK_N, 16), dtype=tl.int32)
        for k in range(0, span, BLOCK_K):
            if EVEN_K:
                x, y = tl.load(w), tl.load(a)
            else:
                left = K - pid_k * span - k
                x = tl.load(w, mask=rk[None, :] < left, other=0)
                y = tl.load(a, mask=rk[:, None] < left, other=0)
            acc = tl.dot(x, y, acc, out_dtype=tl.int32)
            w += BLOCK_K
            a += BLOCK_K
        if SPLIT_K > 1:
            sums, mask = sums_ptr + rm[None, :] * N + rn[:, None], (rm < M)[None, :] & (rn < N)[:, None]
            tl.atomic_add(sums, acc, mask=mask, sem="relaxed")
            tl.debug_barrier()                                   # all of this program's adds before its count
            if tl.atomic_add(count_ptr + pid_n, 1, sem="acq_rel") == SPLIT_K - 1:
                acc = tl.where(mask, tl.atomic_xchg(sums, 0, mask=mask, sem="acq_rel"), 0)
                tl.atomic_xchg(count_ptr + pid_n, 0)
                _epilogue(tl.trans(acc), rm, rn, pid_n, ws_ptr, rs_ptr, c_ptr, M, N, ROW_SCALE, SWIGLU, BF16, 16, BLOCK_N)
        else:
            _epilogue(tl.trans(acc), rm, rn, pid_n, ws_ptr, rs_ptr, c_ptr, M, N, ROW_SCALE, SWIGLU, BF16, 16, BLOCK_N)


# --------------------------------------------------------------------------- which tiles: a table, no autotuning

# Autotuning at run time picks tiles from noisy timings, differently from run to run and between the static and
# dynamic epilogues. The tiles come from a table instead: one configuration per kernel kind ("mm": the plain
# epilogue, static and dynamic alike; "swiglu": the fused gate/up), M bucket and (N, K), measured on a GPU by
# `python bench.py --sections sweep` and committed as int8_configs.json; shapes not in it get DEFAULTS.
CONFIG_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "int8_configs.json")
BUCKETS = (16, 32, 64, 128, 256, 4096)             # M up to 16 (decode), ..., more than 256 (prefill)
DEFAULTS = {16: dict(kernel="mv", BLOCK_N=64, BLOCK_K=256, SPLIT_K=4, num_stages=4, num_warps=4),
            32: dict(kernel="mm", BLOCK_M=32, BLOCK_N=64, BLOCK_K=256, GROUP_M=8, num_stages=4, num_warps=4),
            64: dict(kernel="mm", BLOCK_M=64, BLOCK_N=128, BLOCK_K=128, GROUP_M=8, num_stages=4, num_warps=4),
            128: dict(kernel="mm", BLOCK_M=128, BLOCK_N=128, BLOCK_K=128, GROUP_M=8, num_stages=4, num_warps=8),
            256: dict(kernel="mm", BLOCK_M=128, BLOCK_N=256, BLOCK_K=128, GROUP_M=8, num_stages=3, num_warps=8),
            4096: dict(kernel="mm", BLOCK_M=128, BLOCK_N=256, BLOCK_K=128, GROUP_M=8, num_stages=3, num_warps=8)}


def bucket(m):
    return next((b for b in BUCKETS if m <= b), BUCKETS[-1])


def read_configs(path=CONFIG_FILE):
    """{"kind bucket N K": config} from a sweep's file ({} if there is none)."""
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return json.load(f)["configs"]


CONFIGS = read_configs()


def tiles(kind, m, n, k):
    """The kernel and tiles for an (m, k) x (n, k) product of this kind."""
    return CONFIGS.get(f"{kind} {bucket(m)} {n} {k}", DEFAULTS[bucket(m)])


_SCRATCH = {}        # device -> (int32 sums, int32 counters) of the split-K decode kernel: zero between calls


def _launch(q, w, ws, rs, out, swiglu, bf16, cfg):
    (m, k), n = q.shape, w.shape[0]
    cfg = dict(cfg)
    kernel, stages, warps = cfg.pop("kernel", "mm"), cfg.pop("num_stages", 3), cfg.pop("num_warps", 4)
    flags = dict(ROW_SCALE=rs is not None and not swiglu, SWIGLU=swiglu, BF16=bf16, num_stages=stages, num_warps=warps)
    rs = rs if rs is not None else ws                                      # a dummy pointer when unused
    if kernel == "mv":
        assert m <= 16 and n <= 2 ** 16, "the decode kernel takes up to 16 rows and 65536 columns"
        if q.device not in _SCRATCH:
            _SCRATCH[q.device] = (torch.zeros(16 * 2 ** 16, dtype=torch.int32, device=q.device),
                                  torch.zeros(2 ** 16 // 16, dtype=torch.int32, device=q.device))
        grid = (triton.cdiv(n, cfg["BLOCK_N"]), cfg["SPLIT_K"])
        _int8_mv_kernel[grid](q, w, ws, rs, out, *_SCRATCH[q.device], m, n, k,
                              EVEN_K=k % (cfg["BLOCK_K"] * cfg["SPLIT_K"]) == 0, **cfg, **flags)
    else:
        grid = (triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(n, cfg["BLOCK_N"]),)
        _int8_mm_kernel[grid](q, w, ws, rs, out, m, n, k, EVEN_K=k % cfg["BLOCK_K"] == 0, **cfg, **flags)
    return out


def triton_mm(q, w, w_scale, row_scale=None, out_dtype=torch.bfloat16, config=None):
    """Our Triton kernel, tiles from the table (`config`: a dict of the kernel and its tiles, as in DEFAULTS)."""
    (m, k), n = q.shape, w.shape[0]
    assert q.is_contiguous() and w.is_contiguous() and max(m, n) * k < 2 ** 31 and m * n < 2 ** 31
    out = torch.empty(m, n, device=q.device, dtype=out_dtype)
    return _launch(q, w, w_scale, row_scale, out, False, False, config or tiles("mm", m, n, k))


@torch.library.custom_op("sasq::int8_mm", mutates_args=())
def mm(q: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor, row_scale: Optional[torch.Tensor],
       out_dtype: torch.dtype) -> torch.Tensor:
    """(M, K) int8 x (N, K) int8 -> (M, N) out_dtype, times w_scale per column (and row_scale per row).
    A custom op, so torch.compile fuses the quantize / rescale ops around it and leaves it whole."""
    if q.is_cuda and BACKEND == "triton":
        return triton_mm(q.contiguous(), w, w_scale, row_scale, out_dtype)
    return _torch_mm(q, w, w_scale, row_scale, out_dtype)


@mm.register_fake
def _(q, w, w_scale, row_scale, out_dtype):
    return q.new_empty(q.shape[0], w.shape[0], dtype=out_dtype)


# --------------------------------------------------------------------------- the fused gate/up GEMM (static only)

# The w2 input is h = silu(w1 x) * (w3 x). With a static scale s2 the gate/up GEMM can finish the job in its
# epilogue: scale the int32 sums, SwiGLU, divide by s2, round, and write int8 codes that the w2 GEMM reads.
# A per-token scale cannot be applied there: it needs the max over a whole 11008-wide row, which spans
# dozens of output tiles, so the dynamic path writes h in bf16, reduces and quantizes it in another pass.
# w1 and w3 run as one GEMM over a weight whose rows interleave them (gate j, up j): each output tile then
# holds matching gate and up columns side by side, one accumulator, the plain GEMM's main loop.
# The epilogue rounds to the model dtype where the unfused model does (w1 x, w3 x, silu, the product), so
# both paths compute the same codes up to the exp of silu.

def interleave(a, b):
    """Rows (or elements) a0, b0, a1, b1, ...: the layout of the fused gate/up weight and scales."""
    return torch.stack([a, b], 1).flatten(0, 1)


def _torch_gate_up(q, w13, ws13, s2, dtype):
    """The same arithmetic in PyTorch (CPU, and the reference of the tests)."""
    gu = _torch_mm(q, w13, ws13, None, dtype).float()
    g, u = gu[:, 0::2], gu[:, 1::2]
    h = (F.silu(g).to(dtype).float() * u).to(dtype).float()
    return sasq.quantize(h, s2, 8).to(torch.int8)


if triton is not None:
    @triton.jit
    def _swiglu_quantize(out, rm, pid_n, s2_ptr, c_ptr, M, N, BF16: tl.constexpr, BLOCK_M: tl.constexpr,
                         BLOCK_N: tl.constexpr):
        """Epilogue of the gate/up GEMM: `out` (BLOCK_M, 2 BLOCK_N) holds gate/up column pairs; store the
        int8 codes of silu(gate) * up / s2 into C (M, N), rounded as the model does."""
        g, u = tl.split(tl.reshape(out, (BLOCK_M, BLOCK_N, 2)))
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        cn = rn < N
        if BF16:
            g, u = g.to(tl.bfloat16).to(tl.float32), u.to(tl.bfloat16).to(tl.float32)
        act = g / (1.0 + tl.exp(-g))
        if BF16:
            act = act.to(tl.bfloat16).to(tl.float32)
        h = act * u
        if BF16:
            h = h.to(tl.bfloat16).to(tl.float32)
        v = tl.minimum(tl.maximum(h / tl.load(s2_ptr + rn, mask=cn, other=1.0)[None, :], -128.0), 127.0)
        r = (v + 12582912.0) - 12582912.0        # round half to even as torch.round: 1.5 * 2^23 leaves no fraction bits
        tl.store(c_ptr + rm[:, None] * N + rn[None, :], r.to(tl.int8), mask=(rm < M)[:, None] & cn[None, :])


def triton_gate_up(q, w13, ws13, s2, dtype=torch.bfloat16, config=None):
    """Our GEMM with the SwiGLU + static-quantize epilogue: (M, K) codes, (2N, K) interleaved -> (M, N) int8."""
    (m, k), n2 = q.shape, w13.shape[0]
    assert q.is_contiguous() and w13.is_contiguous() and max(m, n2) * k < 2 ** 31 and m * n2 < 2 ** 31
    out = torch.empty(m, n2 // 2, device=q.device, dtype=torch.int8)
    return _launch(q, w13, ws13, s2, out, True, dtype == torch.bfloat16, config or tiles("swiglu", m, n2, k))


@torch.library.custom_op("sasq::int8_gate_up", mutates_args=())
def gate_up(q: torch.Tensor, w13: torch.Tensor, ws13: torch.Tensor, s2: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(M, K) int8 codes of the FFN input -> (M, N) int8 codes of the w2 input, static scale s2 (N,)."""
    if q.is_cuda and BACKEND == "triton":
        return triton_gate_up(q.contiguous(), w13, ws13, s2, dtype)
    return _torch_gate_up(q, w13, ws13, s2, dtype)


@gate_up.register_fake
def _(q, w13, ws13, s2, dtype):
    return q.new_empty(q.shape[0], w13.shape[0] // 2, dtype=torch.int8)


class FusedFeedForward(nn.Module):
    """A static INT8 FFN: quantize x once (elementwise), the fused gate/up GEMM writes int8 codes, w2 reads them.
    Built from a FeedForward whose w1, w3, w2 are Int8Linears (convert()); fuse()/unfuse() swap it in."""

    def __init__(self, ff):
        super().__init__()
        w1, w3, w2 = ff.w1, ff.w3, ff.w2
        if not all(isinstance(m, Int8Linear) for m in (w1, w3, w2)) or not isinstance(ff.w2_in, nn.Identity) \
                or w2.c is not None:
            raise ValueError("fusing needs static INT8 w1/w3/w2 (int8.convert) and no online rotation")
        self.source, self.w1, self.w2 = (ff,), w1, w2        # w1 for its input quantization, w2 as it is
        self.register_buffer("w13", interleave(w1.weight, w3.weight))
        self.register_buffer("ws13", interleave(w1.w_scale, w3.w_scale))

    def forward(self, x):
        xf = x.float().reshape(-1, x.shape[-1])
        if self.w1.c is not None:
            xf = sasq.soft_clip(xf, self.w1.c)
        q = sasq.quantize(xf, self.w1.a_scale, 8).to(torch.int8)
        h = gate_up(q, self.w13, self.ws13, self.w2.a_scale, x.dtype)
        return mm(h, self.w2.weight, self.w2.w_scale, None, x.dtype).unflatten(0, x.shape[:-1])


def fuse(model):
    """Swap each layer's converted FeedForward for its fused form: FusedFeedForward (static INT8) or
    DynamicFeedForward (dynamic INT8, the merged gate/up GEMM)."""
    for layer in model.layers:
        ff = layer.feed_forward
        layer.feed_forward = (DynamicFeedForward if isinstance(ff.w1, DynamicInt8Linear) else FusedFeedForward)(ff)
    return model


def unfuse(model):
    for layer in model.layers:
        if isinstance(layer.feed_forward, (FusedFeedForward, DynamicFeedForward)):
            layer.feed_forward = layer.feed_forward.source[0]
    return model


# --------------------------------------------------------------------------- the layers

class Int8Linear(nn.Module):
    """y = (int8(trunc(x) / s) @ int8(W * s).T) * w_scale: static scales, no run-time statistics."""

    def __init__(self, ql: sasq.QuantLinear, keep_float=True, shared=None):
        """shared: a dict that the linears of one model share, so that those reading one input (q/k/v, gate/up)
        hold the same a_scale and c tensors: torch.compile then computes that input's truncation and codes
        once (instead of a tanh per linear), as it does for the dynamic path."""
        super().__init__()
        act = ql.act
        if act.mode != "static" or act.bits != 8 or ql.wbits != 8:
            raise ValueError("Int8Linear needs static W8A8 scales")
        with torch.no_grad():
            s = act.scale().float()
            if not bool(torch.isfinite(s).all() and (s > 0).all()):     # NaN would become code 0, silently
                raise ValueError("non-finite or zero activation scales: refusing to convert them to INT8")
            wq, sw = sasq.quantize_weight(ql.linear.weight.float() * s, 8)
            self.register_buffer("weight", wq.to(torch.int8).contiguous())       # (out, in) codes of W * s
            self.register_buffer("w_scale", sw.float())                          # (out,)
            shared = {} if shared is None else shared
            if act not in shared:
                shared[act] = (s.expand(ql.linear.in_features).contiguous(),
                               act.log_c.exp().float() if act.log_c is not None else None)
            self.register_buffer("a_scale", shared[act][0])
            self.register_buffer("c", shared[act][1])
        bias = ql.linear.bias        # Qwen2's q/k/v: added after the GEMM, in float, as fake-quant does
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        # the fake-quant layer, for revert(); a tuple keeps it out of .modules(). Without it the
        # float weight can be freed: the converted model then holds int8 weights only.
        self.source = (ql,) if keep_float else None

    def forward(self, x):
        xf = x.float()
        if self.c is not None:
            xf = sasq.soft_clip(xf, self.c)                                     # the learned truncation
        q = sasq.quantize(xf, self.a_scale, 8).to(torch.int8)                   # elementwise: no reduction
        y = mm(q.reshape(-1, q.shape[-1]), self.weight, self.w_scale, None, x.dtype).unflatten(0, x.shape[:-1])
        return y if self.bias is None else y + self.bias


class DynamicInt8Linear(nn.Module):
    """The usual baseline: per-token absmax computed at run time (a reduction per token, every call)."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        with torch.no_grad():
            wq, sw = sasq.quantize_weight(linear.weight.float(), 8)
        self.register_buffer("weight", wq.to(torch.int8).contiguous())
        self.register_buffer("w_scale", sw.float())
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().clone())

    def forward(self, x):
        xf = x.float().reshape(-1, x.shape[-1])
        s = sasq.token_scale(xf, 8)                                             # (tokens, 1): a reduction per token
        q = sasq.quantize(xf, s, 8).to(torch.int8)
        y = mm(q, self.weight, self.w_scale, s[:, 0], x.dtype).unflatten(0, x.shape[:-1])
        return y if self.bias is None else y + self.bias


class DynamicFeedForward(nn.Module):
    """The dynamic baseline's FFN as serving engines run it: w1 and w3 as one GEMM (x quantized once, one
    launch), then SwiGLU and the per-token absmax and quantization of its output in one compiled pass, then w2.
    Built from a FeedForward of DynamicInt8Linears (convert_dynamic())."""

    def __init__(self, ff):
        super().__init__()
        if not all(isinstance(m, DynamicInt8Linear) for m in (ff.w1, ff.w3, ff.w2)):
            raise ValueError("needs dynamic INT8 w1/w3/w2 (int8.convert_dynamic)")
        self.source, self.w2, self.w2_in = (ff,), ff.w2, ff.w2_in
        self.register_buffer("w13", torch.cat([ff.w1.weight, ff.w3.weight]))
        self.register_buffer("ws13", torch.cat([ff.w1.w_scale, ff.w3.w_scale]))

    def forward(self, x):
        xf = x.float().reshape(-1, x.shape[-1])
        s = sasq.token_scale(xf, 8)
        g, u = mm(sasq.quantize(xf, s, 8).to(torch.int8), self.w13, self.ws13, s[:, 0], x.dtype).chunk(2, -1)
        return self.w2(self.w2_in(F.silu(g) * u)).unflatten(0, x.shape[:-1])


def _swap(model, fn):
    """Replace each linear at the four quantization points by fn(current module) (None: keep it)."""
    n = 0
    for _, _, parent, names in sasq.points(model):
        for name in names:
            new = fn(getattr(parent, name))
            if new is not None:
                setattr(parent, name, new)
                n += 1
    return n


def convert(model, keep_float=True):
    """Swap every static W8A8 QuantLinear (from sasq.attach / checkpoints.load_scales) for a real Int8Linear."""
    shared = {}
    n = _swap(model, lambda m: Int8Linear(m, keep_float, shared) if isinstance(m, sasq.QuantLinear) else None)
    if n == 0:
        raise ValueError("no quantized linears to convert: load SASQ scales first")
    return model


def convert_dynamic(model):
    """The dynamic per-token W8A8 baseline with real int8 GEMMs (from nn.Linear or QuantLinear)."""
    _swap(model, lambda m: DynamicInt8Linear(getattr(m, "linear", m)) if isinstance(m, (nn.Linear, sasq.QuantLinear))
          else None)
    return model


def revert(model):
    """Undo convert() (and fuse()): put the fake-quant QuantLinears back (sasq.detach then restores nn.Linear)."""
    unfuse(model)
    _swap(model, lambda m: m.source[0] if isinstance(m, Int8Linear) and m.source else None)
    return model
