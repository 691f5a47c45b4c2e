"""Real static INT8 inference: each fake-quant QuantLinear of sasq.py becomes an int8 x int8 GEMM.

Static: the activation is divided by its frozen per-channel scale and rounded (elementwise, no
reduction over the tensor), multiplied with int8 codes of the folded weight W * s (int32
accumulation), and the int32 sums are scaled by one float per output column. This is the same
arithmetic the fake-quant graph simulates, so logits agree to float rounding.

The GEMM (`mm`) has two back ends. On a GPU with Triton it is our kernel below: the int32 tile is
scaled and cast to bf16 in the kernel's epilogue, so the int32 result never goes to memory. Elsewhere
(CPU, or `int8.BACKEND = "torch"`) it is torch._int_mm followed by the scaling in PyTorch.
"""
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
        group_m = min(grid_m - first_m, GROUP_M)
        return first_m + (pid % width) % group_m, (pid % width) // group_m

    @triton.jit
    def _int8_mm_kernel(a_ptr, w_ptr, ws_ptr, rs_ptr, c_ptr, M, N, K, ROW_SCALE: tl.constexpr,
                        EVEN_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                        BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
        """C[m, n] = (sum_k A[m, k] W[n, k]) * ws[n] (* rs[m]). A (M, K), W (N, K) int8, contiguous."""
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
        # epilogue: int32 -> float, per-column weight scale (and per-row token scale), cast, store
        out = acc.to(tl.float32) * tl.load(ws_ptr + rn, mask=rn < N, other=0.0)[None, :]
        if ROW_SCALE:
            out = out * tl.load(rs_ptr + rm, mask=rm < M, other=0.0)[:, None]
        mask = (rm < M)[:, None] & (rn < N)[None, :]
        tl.store(c_ptr + rm[:, None] * N + rn[None, :], out.to(c_ptr.dtype.element_ty), mask=mask)

    def _prune(configs, named_args, **kwargs):
        """Small BLOCK_M for decode-sized M, large for prefill: fewer configs to time."""
        m = named_args["M"]
        keep = [c for c in configs if (c.kwargs["BLOCK_M"] <= 64) == (m <= 64)]
        return keep or configs

    _CONFIGS = [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_stages=s, num_warps=w)
                for bm, bn, bk, s, w in [(128, 256, 128, 3, 8), (256, 128, 128, 3, 8), (128, 128, 128, 4, 8),
                                         (128, 128, 128, 4, 4), (16, 32, 256, 5, 4), (16, 64, 256, 4, 4),
                                         (32, 64, 256, 4, 4), (64, 128, 128, 4, 4)]]
    _int8_mm = triton.heuristics({"EVEN_K": lambda args: args["K"] % args["BLOCK_K"] == 0})(_int8_mm_kernel)
    _int8_mm_tuned = triton.autotune(_CONFIGS, key=["M", "N", "K"],
                                     prune_configs_by={"early_config_prune": _prune})(_int8_mm)


def triton_mm(q, w, w_scale, row_scale=None, out_dtype=torch.bfloat16, config=None):
    """Our Triton kernel; `config` (dict of BLOCK_M/N/K, GROUP_M) skips autotuning (the CPU interpreter test)."""
    (m, k), n = q.shape, w.shape[0]
    assert q.is_contiguous() and w.is_contiguous() and max(m, n) * k < 2 ** 31 and m * n < 2 ** 31
    out = torch.empty(m, n, device=q.device, dtype=out_dtype)
    rs = row_scale if row_scale is not None else w_scale                   # a dummy pointer when unused
    grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)
    kernel = _int8_mm_tuned if config is None else _int8_mm
    kernel[grid](q, w, w_scale, rs, out, m, n, k, ROW_SCALE=row_scale is not None, **(config or {}))
    return out


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
# epilogue: scale both int32 tiles, SwiGLU, divide by s2, round, and write int8 codes that the w2 GEMM reads.
# A per-token scale cannot be applied there: it needs the max over a whole 11008-wide row, which spans
# dozens of output tiles, so the dynamic path writes h in bf16, reduces and quantizes it in another pass.
# The epilogue rounds to the model dtype where the unfused model does (w1 x, w3 x, silu, the product), so
# both paths compute the same codes up to the exp of silu.

def _torch_gate_up(q, w1, w3, ws1, ws3, s2, dtype):
    """The same arithmetic in PyTorch (CPU, and the reference of the tests)."""
    g, u = _torch_mm(q, w1, ws1, None, dtype).float(), _torch_mm(q, w3, ws3, None, dtype).float()
    h = (F.silu(g).to(dtype).float() * u).to(dtype).float()
    return sasq.quantize(h, s2, 8).to(torch.int8)


if triton is not None:
    @triton.jit
    def _gate_up_kernel(a_ptr, w1_ptr, w3_ptr, ws1_ptr, ws3_ptr, s2_ptr, c_ptr, M, N, K, BF16: tl.constexpr,
                        EVEN_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                        GROUP_M: tl.constexpr):
        """C[m, n] = int8 codes of silu(A W1.T * ws1) * (A W3.T * ws3) / s2: one A tile feeds both GEMMs."""
        pid_m, pid_n = _tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        rk = tl.arange(0, BLOCK_K)
        a = a_ptr + (rm % M)[:, None] * K + rk[None, :]
        w1 = w1_ptr + (rn % N)[None, :] * K + rk[:, None]
        w3 = w3_ptr + (rn % N)[None, :] * K + rk[:, None]
        acc1 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
        acc3 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
        for k in range(0, tl.cdiv(K, BLOCK_K)):
            if EVEN_K:
                x, y1, y3 = tl.load(a), tl.load(w1), tl.load(w3)
            else:
                x = tl.load(a, mask=rk[None, :] < K - k * BLOCK_K, other=0)
                y1 = tl.load(w1, mask=rk[:, None] < K - k * BLOCK_K, other=0)
                y3 = tl.load(w3, mask=rk[:, None] < K - k * BLOCK_K, other=0)
            acc1 = tl.dot(x, y1, acc1, out_dtype=tl.int32)
            acc3 = tl.dot(x, y3, acc3, out_dtype=tl.int32)
            a += BLOCK_K
            w1 += BLOCK_K
            w3 += BLOCK_K
        # epilogue: scales, SwiGLU and the static quantization of the w2 input, rounded as the model does
        cn = rn < N
        g = acc1.to(tl.float32) * tl.load(ws1_ptr + rn, mask=cn, other=0.0)[None, :]
        u = acc3.to(tl.float32) * tl.load(ws3_ptr + rn, mask=cn, other=0.0)[None, :]
        if BF16:
            g, u = g.to(tl.bfloat16).to(tl.float32), u.to(tl.bfloat16).to(tl.float32)
        act = g / (1.0 + tl.exp(-g))
        if BF16:
            act = act.to(tl.bfloat16).to(tl.float32)
        h = act * u
        if BF16:
            h = h.to(tl.bfloat16).to(tl.float32)
        v = h / tl.load(s2_ptr + rn, mask=cn, other=1.0)[None, :]
        r = tl.floor(v + 0.5)                                   # round half to even, as torch.round
        r = tl.where((r - v == 0.5) & (r - 2.0 * tl.floor(r * 0.5) == 1.0), r - 1.0, r)
        r = tl.minimum(tl.maximum(r, -128.0), 127.0)
        mask = (rm < M)[:, None] & cn[None, :]
        tl.store(c_ptr + rm[:, None] * N + rn[None, :], r.to(tl.int8), mask=mask)

    _FUSED_CONFIGS = [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_stages=s, num_warps=w)
                      for bm, bn, bk, s, w in [(128, 128, 128, 3, 8), (128, 64, 128, 4, 4), (64, 128, 128, 4, 4),
                                               (128, 128, 64, 4, 8), (16, 64, 256, 4, 4), (32, 64, 256, 4, 4)]]
    _gate_up = triton.heuristics({"EVEN_K": lambda args: args["K"] % args["BLOCK_K"] == 0})(_gate_up_kernel)
    _gate_up_tuned = triton.autotune(_FUSED_CONFIGS, key=["M", "N", "K"],
                                     prune_configs_by={"early_config_prune": _prune})(_gate_up)


def triton_gate_up(q, w1, w3, ws1, ws3, s2, dtype=torch.bfloat16, config=None):
    (m, k), n = q.shape, w1.shape[0]
    assert q.is_contiguous() and w1.is_contiguous() and w3.is_contiguous() and max(m, n) * k < 2 ** 31
    out = torch.empty(m, n, device=q.device, dtype=torch.int8)
    grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)
    kernel = _gate_up_tuned if config is None else _gate_up
    kernel[grid](q, w1, w3, ws1, ws3, s2, out, m, n, k, BF16=dtype == torch.bfloat16, **(config or {}))
    return out


@torch.library.custom_op("sasq::int8_gate_up", mutates_args=())
def gate_up(q: torch.Tensor, w1: torch.Tensor, w3: torch.Tensor, ws1: torch.Tensor, ws3: torch.Tensor,
            s2: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(M, K) int8 codes of the FFN input -> (M, N) int8 codes of the w2 input, static scale s2 (N,)."""
    if q.is_cuda and BACKEND == "triton":
        return triton_gate_up(q.contiguous(), w1, w3, ws1, ws3, s2, dtype)
    return _torch_gate_up(q, w1, w3, ws1, ws3, s2, dtype)


@gate_up.register_fake
def _(q, w1, w3, ws1, ws3, s2, dtype):
    return q.new_empty(q.shape[0], w1.shape[0], dtype=torch.int8)


class FusedFeedForward(nn.Module):
    """A static INT8 FFN: quantize x once (elementwise), the fused gate/up GEMM writes int8 codes, w2 reads them.
    Built from a FeedForward whose w1, w3, w2 are Int8Linears (convert()); fuse()/unfuse() swap it in."""

    def __init__(self, ff):
        super().__init__()
        w1, w3, w2 = ff.w1, ff.w3, ff.w2
        if not all(isinstance(m, Int8Linear) for m in (w1, w3, w2)) or not isinstance(ff.w2_in, nn.Identity) \
                or w2.c is not None:
            raise ValueError("fusing needs static INT8 w1/w3/w2 (int8.convert) and no online rotation")
        self.source, self.w1, self.w3, self.w2 = (ff,), w1, w3, w2

    def forward(self, x):
        xf = x.float().reshape(-1, x.shape[-1])
        if self.w1.c is not None:
            xf = sasq.soft_clip(xf, self.w1.c)
        q = sasq.quantize(xf, self.w1.a_scale, 8).to(torch.int8)
        h = gate_up(q, self.w1.weight, self.w3.weight, self.w1.w_scale, self.w3.w_scale, self.w2.a_scale, x.dtype)
        return mm(h, self.w2.weight, self.w2.w_scale, None, x.dtype).unflatten(0, x.shape[:-1])


def fuse(model):
    """Swap each layer's (converted) FeedForward for a FusedFeedForward."""
    for layer in model.layers:
        layer.feed_forward = FusedFeedForward(layer.feed_forward)
    return model


def unfuse(model):
    for layer in model.layers:
        if isinstance(layer.feed_forward, FusedFeedForward):
            layer.feed_forward = layer.feed_forward.source[0]
    return model


# --------------------------------------------------------------------------- the layers

class Int8Linear(nn.Module):
    """y = (int8(trunc(x) / s) @ int8(W * s).T) * w_scale: static scales, no run-time statistics."""

    def __init__(self, ql: sasq.QuantLinear, keep_float=True):
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
            self.register_buffer("a_scale", s.expand(ql.linear.in_features).contiguous())
            c = act.log_c.exp().float() if act.log_c is not None else None
            self.register_buffer("c", c)
        # the fake-quant layer, for revert(); a tuple keeps it out of .modules(). Without it the
        # float weight can be freed: the converted model then holds int8 weights only.
        self.source = (ql,) if keep_float else None

    def forward(self, x):
        xf = x.float()
        if self.c is not None:
            xf = sasq.soft_clip(xf, self.c)                                     # the learned truncation
        q = sasq.quantize(xf, self.a_scale, 8).to(torch.int8)                   # elementwise: no reduction
        return mm(q.reshape(-1, q.shape[-1]), self.weight, self.w_scale, None, x.dtype).unflatten(0, x.shape[:-1])


class DynamicInt8Linear(nn.Module):
    """The usual baseline: per-token absmax computed at run time (a reduction per token, every call)."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        with torch.no_grad():
            wq, sw = sasq.quantize_weight(linear.weight.float(), 8)
        self.register_buffer("weight", wq.to(torch.int8).contiguous())
        self.register_buffer("w_scale", sw.float())

    def forward(self, x):
        xf = x.float().reshape(-1, x.shape[-1])
        s = sasq.token_scale(xf, 8)                                             # (tokens, 1): a reduction per token
        q = sasq.quantize(xf, s, 8).to(torch.int8)
        return mm(q, self.weight, self.w_scale, s[:, 0], x.dtype).unflatten(0, x.shape[:-1])


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
    """Swap every static W8A8 QuantLinear (from sasq.attach / sasq.load) for a real Int8Linear."""
    n = _swap(model, lambda m: Int8Linear(m, keep_float) if isinstance(m, sasq.QuantLinear) else None)
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
