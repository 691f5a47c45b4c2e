"""Real FP8 (e4m3) GEMMs for the FP8 recipe (train.py --fp8), through torch._scaled_mm (cuBLASLt on
Hopper; oneDNN on the CPU), as an engine runs a static FP8 checkpoint:

    Fp8Linear         static: the activation arrives divided by its known scale and cast to e4m3, which
                      is elementwise, so torch.compile fuses it into the op that produces the activation
                      (the RMSNorm, the SwiGLU); the GEMM then scales each output column only
    DynamicFp8Linear  the baseline: per token, an absmax over the channels, a scale, the cast, every call

cuBLASLt takes its scales either as one per tensor for both operands or one per row of each (the
"rowwise" form), not one per tensor for the activation and one per output channel for the weight. The
static layer therefore folds its activation scale into the weight's column scales and hands the GEMM
a constant column of ones for the rows: a slice of one buffer, no kernel.
"""
import torch
import torch.nn as nn

import sasq

E4M3 = torch.float8_e4m3fn
ROWS = 16384              # the most tokens one call of a static layer takes (its ones buffer)


def to_e4m3(x, scale):
    """x / scale on the e4m3 grid, as sasq.quantize computes it (clamped to +-448 first)."""
    return (x.float() / scale).clamp(-sasq.qmax("fp8"), sasq.qmax("fp8")).to(E4M3)


def weight_codes(w):
    """(e4m3 codes of w (out, in), per-row scales (1, out) fp32), sasq.quantize_weight's."""
    codes, sw = sasq.quantize_weight(w.float(), "fp8")
    return codes.to(E4M3).contiguous(), sw.float()[None, :]


class Fp8Linear(nn.Module):
    """The static FP8 layer of a frozen sasq.QuantLinear of the FP8 recipe (per-channel scales s, folded
    into the weight as the export folds them): y = e4m3(x / s) @ e4m3(W * s).T * w_scale (+ bias)."""

    def __init__(self, ql: sasq.QuantLinear, shared=None):
        super().__init__()
        act = ql.act
        if act.mode != "static" or act.bits != "fp8" or ql.wbits != "fp8" or act.log_c is not None:
            raise ValueError("Fp8Linear needs static FP8 scales without truncation (train.py --fp8)")
        shared = {} if shared is None else shared     # one scale tensor per input: compile casts it once
        with torch.no_grad():
            s = act.scale().float()
            w, sw = weight_codes(ql.linear.weight.float() * s)
            self.register_buffer("weight", w)
            self.register_buffer("w_scale", sw)
            if act not in shared:
                shared[act] = s.expand(ql.linear.in_features).contiguous()
            if "ones" not in shared:
                shared["ones"] = torch.ones(ROWS, 1, device=s.device)
            self.register_buffer("a_scale", shared[act])
            self.register_buffer("ones", shared["ones"])
        bias = ql.linear.bias
        self.register_buffer("bias", None if bias is None else bias.detach().clone())

    def forward(self, x):
        q = to_e4m3(x, self.a_scale).reshape(-1, x.shape[-1])          # elementwise: no reduction
        y = torch._scaled_mm(q, self.weight.t(), scale_a=self.ones[:q.shape[0]], scale_b=self.w_scale,
                             bias=self.bias, out_dtype=x.dtype)
        return y.unflatten(0, x.shape[:-1])


class DynamicFp8Linear(nn.Module):
    """FP8 weights per output channel, activations per token at run time (a reduction per token)."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        with torch.no_grad():
            w, sw = weight_codes(linear.weight)
        self.register_buffer("weight", w)
        self.register_buffer("w_scale", sw)
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().clone())

    def forward(self, x):
        xf = x.float().reshape(-1, x.shape[-1])
        s = sasq.token_scale(xf, "fp8")                                   # (tokens, 1)
        y = torch._scaled_mm(to_e4m3(xf, s), self.weight.t(), scale_a=s, scale_b=self.w_scale,
                             bias=self.bias, out_dtype=x.dtype)
        return y.unflatten(0, x.shape[:-1])


def convert(model, dynamic=False):
    """Swap every sasq.QuantLinear of a frozen FP8 model for Fp8Linear (dynamic: DynamicFp8Linear on its
    float weight). Returns the model."""
    shared = {}
    for _, _, parent, names in sasq.points(model):
        for n in names:
            ql = getattr(parent, n)
            setattr(parent, n, DynamicFp8Linear(ql.linear) if dynamic else Fp8Linear(ql, shared))
    return model
