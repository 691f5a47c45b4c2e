"""Real static INT8 inference: each fake-quant QuantLinear of sasq.py becomes an int8 x int8 GEMM.

Static: the activation is divided by its frozen per-channel scale and rounded (elementwise, no
reduction over the tensor), multiplied with int8 codes of the folded weight W * s by torch._int_mm
(int32 accumulation), and the int32 result is scaled by one float per output column. This is the same
arithmetic the fake-quant graph simulates, so logits agree to float rounding.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

import sasq


def int_mm(q, w):
    """(M, K) int8 @ (N, K).T int8 -> (M, N) int32. cuBLAS wants M > 16: pad small batches (decode)."""
    m = q.shape[0]
    if q.is_cuda and m <= 16:
        q = F.pad(q, (0, 0, 0, 17 - m))
    return torch._int_mm(q, w.t())[:m]


class Int8Linear(nn.Module):
    """y = (int8(trunc(x) / s) @ int8(W * s).T) * w_scale: static scales, no run-time statistics."""

    def __init__(self, ql: sasq.QuantLinear):
        super().__init__()
        act = ql.act
        if act.mode != "static" or act.bits != 8 or ql.wbits != 8:
            raise ValueError("Int8Linear needs static W8A8 scales")
        with torch.no_grad():
            s = act.log_scale.exp().float()
            wq, sw = sasq.quantize_weight(ql.linear.weight.float() * s, 8)
            self.register_buffer("weight", wq.to(torch.int8).contiguous())       # (out, in) codes of W * s
            self.register_buffer("w_scale", sw.float())                          # (out,)
            self.register_buffer("a_scale", s.expand(ql.linear.in_features).contiguous())
            c = act.log_c.exp().float() if act.log_c is not None else None
            self.register_buffer("c", c)
        self.source = (ql,)       # the fake-quant layer, for revert(); a tuple keeps it out of .modules()

    def forward(self, x):
        xf = x.float()
        if self.c is not None:
            xf = self.c * torch.tanh(xf / self.c)                               # the learned truncation
        q = torch.clamp(torch.round(xf / self.a_scale), -128, 127).to(torch.int8)
        y = int_mm(q.reshape(-1, q.shape[-1]), self.weight)                     # (tokens, out) int32
        return (y.float() * self.w_scale).to(x.dtype).reshape(*x.shape[:-1], -1)


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
        s = xf.abs().amax(-1, keepdim=True).clamp(min=1e-8) / 127                # (tokens, 1)
        q = torch.clamp(torch.round(xf / s), -128, 127).to(torch.int8)
        y = int_mm(q, self.weight).float() * s * self.w_scale
        return y.to(x.dtype).reshape(*x.shape[:-1], -1)


def convert(model):
    """Swap every static W8A8 QuantLinear (from sasq.attach / sasq.load) for a real Int8Linear."""
    n = 0
    for layer in model.layers:
        for sub, names, _ in sasq.POINTS.values():
            parent = getattr(layer, sub)
            for name in names:
                if isinstance(getattr(parent, name), sasq.QuantLinear):
                    setattr(parent, name, Int8Linear(getattr(parent, name)))
                    n += 1
    if n == 0:
        raise ValueError("no quantized linears to convert: load SASQ scales first")
    return model


def revert(model):
    """Undo convert(): put the fake-quant QuantLinears back (sasq.detach then restores nn.Linear)."""
    for layer in model.layers:
        for sub, names, _ in sasq.POINTS.values():
            parent = getattr(layer, sub)
            for name in names:
                if isinstance(getattr(parent, name), Int8Linear):
                    setattr(parent, name, getattr(parent, name).source[0])
    return model
