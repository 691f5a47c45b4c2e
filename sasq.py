"""SASQ: quantization-aware training of static activation scales only (Mao, Chen, Kang;
arXiv 2512.14481).

Read top to bottom, this file is the method:
  1. the rounding straight-through estimator and the grids: integers, or float8-e4m3 (FP8);
  2. a quantization point (ActQuantizer): soft truncation c*tanh(x/c), then static codes round(x/s);
  3. QuantLinear: the per-input-channel scale folded into the weight, so that the fake-quant graph
     is exactly an int8 x int8 GEMM with one float scale per output column;
  4. attach/detach/freeze at four points per layer of a model.Transformer (one walker: points());
  5. PTQ calibration (the initial scales) from forward pre-hooks on the float model.
Weights stay frozen throughout; only log-scales and log-thresholds are trained (train.py). This file
imports no other file of the project; checkpoints.py saves and loads what it makes.

Example usage (prepare -> calibrate -> train -> freeze):

    model, tok = checkpoints.load_model()                    # a LLaMA-architecture checkpoint
    quantizers = sasq.attach(model, sasq.RECIPES["paper"])   # fake quantizers, 4 points a layer
    sasq.calibrate(model, quantizers, calib_windows)         # PTQ init of the scales
    train.train_scales(model, quantizers, windows, steps=100, batch_size=4, lr=2e-2)
    sasq.freeze(model)                                       # static: nothing computed at run time
"""
import contextlib
import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F


# ------------------------------------------------------------------------ 1. rounding and the grid

class RoundSTE(torch.autograd.Function):
    """Forward: round to the nearest grid value (ties to even): an integer, or with fp8 the nearest
    float8-e4m3 number. Backward: identity, d round(v)/dv := 1 (the straight-through estimator)."""

    @staticmethod
    def forward(ctx, v, fp8=False):
        return v.to(torch.float8_e4m3fn).to(v.dtype) if fp8 else torch.round(v)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


GRIDS = (2, 3, 4, 5, 6, 7, 8, "fp8")   # integer bit widths, or "fp8": e4m3, 3 mantissa bits


def qmax(bits) -> float:
    """The grid's largest value: 2^(bits-1) - 1, or 448 for float8-e4m3."""
    return 448.0 if bits == "fp8" else 2 ** (bits - 1) - 1


def quantize(x, scale, bits):
    """Codes clamp(round(x / s), -qmax-1, qmax) held in a float tensor; for FP8 the nearest e4m3
    number to x / s clamped to +-448 first (the cast's overflow is not defined everywhere).

    round passes the gradient straight through; clamp passes it only inside the range. Hence, with
    x_hat = s * codes, autograd yields LSQ's d x_hat / d s = round(x/s) - x/s inside, and the
    bound outside, without a hand-written backward.
    """
    if bits == "fp8":
        return RoundSTE.apply((x / scale).clamp(-448.0, 448.0), True)
    return RoundSTE.apply(x / scale).clamp(-qmax(bits) - 1, qmax(bits))


def soft_clip(x, c):
    """Adaptive non-linear truncation: ~identity where |x| << c, squeezes outliers towards +-c."""
    return c * torch.tanh(x / c)


def token_scale(x, bits: int, clip=1.0):
    """The dynamic baseline's scale: clip * (absmax over each token's channels) / qmax, (..., 1)."""
    return clip * x.detach().abs().amax(-1, keepdim=True).float().clamp(min=1e-8) / qmax(bits)


def quantize_weight(w, bits):
    """Per-output-channel absmax RTN: w (out, in) -> (integer codes (out, in), scales (out,))."""
    if bits is None:
        return w, None
    sw = w.abs().amax(dim=1).clamp(min=1e-12) / qmax(bits)      # (out,)
    return RoundSTE.apply(w / sw[:, None], bits == "fp8"), sw  # |w / sw| <= qmax: no clamp


# ------------------------------------------------------------------------- 2. a quantization point

@dataclass
class QuantConfig:
    wbits: int | str | None = 8    # a GRIDS entry (8, or "fp8"); None: weights stay float
    abits: int | str | None = 8    # None: activations stay float (the "W8 only" baseline)
    act: str = "static"            # static (SASQ, PTQ) | dynamic (per-token absmax at run time)
    per_channel: bool = True       # static scales per input channel, or one per tensor
    truncation: bool = True        # learnable c * tanh(x / c) at the attention and FFN inputs
    tied_wo: bool = False          # one wo-input scale per kv channel, shared by its query
                                   # heads (GQA): then it folds into the rows of wv
    clip: float = 1.0              # dynamic only: scale = clip * absmax / qmax (QuaRot: 0.9)
    rotate: int | None = None      # the seed of a rotation applied first (extras/baselines.py)
    smooth: float | None = None    # PTQ init split SmoothQuant's way with this alpha (smooth())
    headroom: float = 1.0          # the w2 inputs' scales x this once trained (train.recipe)

    def __post_init__(self):
        for b in (self.wbits, self.abits):
            if b is not None and b not in GRIDS:
                raise ValueError(f"bits must be 2..8 or 'fp8', got {b!r}")
        if self.act not in ("static", "dynamic"):
            raise ValueError(f"act must be 'static' or 'dynamic', got {self.act!r}")


# the named recipes: the paper's (soft truncation, scales per channel); the one an engine can load,
# whose every scale folds into the weights (no truncation; wo scales tied per GQA group; headroom
# at the w2 inputs, docs/deploy.md); the same on the FP8 grid, weights and activations (Hopper's)
RECIPES = {"paper": QuantConfig(),
           "deployable": QuantConfig(truncation=False, tied_wo=True, headroom=1.41),
           "fp8": QuantConfig(wbits="fp8", abits="fp8", truncation=False, tied_wo=True, smooth=0.5)}


class ActQuantizer(nn.Module):
    """Quantizes one activation tensor (..., dim). Returns (codes, scale); scale is
    (dim,) or (1,) for static scales, (..., 1) per token for dynamic ones, None when off.

    `groups=(n_kv, n_rep, head_dim)` ties the scales of the wo input (n_heads * head_dim channels)
    across the n_rep query heads that read one kv head: n_kv * head_dim trained scales, expanded."""

    is_quantizer = True              # checkpoints.fingerprint leaves quantizers' parameters out

    def __init__(self, dim: int, cfg: QuantConfig, norm_input: bool, groups=None):
        super().__init__()
        self.bits, self.mode, self.groups = cfg.abits, cfg.act, groups
        n = 1 if not cfg.per_channel else dim if groups is None else groups[0] * groups[2]
        self.log_scale = nn.Parameter(torch.zeros(n))
        # thresholds start out of reach (identity); calibrate() sets them from the data
        use_c = norm_input and cfg.truncation and cfg.act == "static" and cfg.abits is not None
        self.log_c = nn.Parameter(torch.full((dim,), math.log(1e4))) if use_c else None
        self.clip = cfg.clip
        self.decode = "static"   # "dynamic": one-token decode steps take per-token scales instead

    def scale(self):
        """The static scale per input channel, (dim,) (or (1,) per tensor)."""
        s = self.log_scale.exp()
        if self.groups is not None and s.numel() > 1:    # (n_kv, hd) -> (n_kv, n_rep, hd) -> (dim,)
            n_kv, n_rep, hd = self.groups
            s = s.view(n_kv, 1, hd).expand(n_kv, n_rep, hd).reshape(-1)
        return s

    def truncate(self, x):
        return x if self.log_c is None else soft_clip(x, self.log_c.exp())

    def forward(self, x):
        if self.bits is None:
            return x, None
        x = self.truncate(x)
        if not self.per_token(x):             # SASQ: static scales, fixed before inference
            s = self.scale()
            return quantize(x, s, self.bits), s
        if self.mode == "static":  # a static model decoding with per-token scales (--decode
            x = x / self.scale()   # dynamic): the folded weights are W * s, the activation x / s
        # the dynamic baseline: a max over channels, every token, at run time
        s = token_scale(x, self.bits, self.clip)
        return quantize(x, s, self.bits), s

    def per_token(self, x):
        """Does this call use run-time per-token scales? In dynamic mode always; with static scales
        only for one-token decode steps when decode == "dynamic" (static prefill, dynamic
        decode)."""
        return self.mode == "dynamic" or (self.decode == "dynamic" and x.shape[-2] == 1)


# ------------------------------------------------------------------------- 3. the quantized linear

class QuantLinear(nn.Module):
    """y = x @ W.T computed as (x / s) @ (W * s).T with both factors on an integer grid.

    codes (..., in) x weight codes (out, in) -> integer sums; times the per-column weight scale
    (and the per-token scale when dynamic). A static scale never reaches the output: it lives in
    W * s. A bias (Qwen2's q/k/v) is added after, in float, as the INT8 GEMM's epilogue adds it.
    """

    def __init__(self, linear: nn.Linear, act: ActQuantizer, wbits):
        super().__init__()
        self.linear, self.act, self.wbits = linear, act, wbits
        self.frozen = None             # cached (weight codes, weight scales) once scales are final
        self.bypass = False            # float_model(): the plain float layer

    def folded_weight(self):
        """(integer codes of W * s, per-row scales); with wbits=None the float W * s and None."""
        if self.frozen is not None:
            return self.frozen
        w = self.linear.weight
        if self.act.mode == "static" and self.act.bits is not None:
            w = w * self.act.scale()                          # fold s into the input columns of W
        codes, sw = quantize_weight(w, self.wbits)
        return codes.to(self.linear.weight.dtype), sw    # codes <= 127 are exact in bf16 too

    def forward(self, x):
        if self.bypass:
            return self.linear(x)
        q, s = self.act(x)
        codes, sw = self.folded_weight()
        y = F.linear(q.to(codes.dtype), codes)           # the int8 GEMM (exact in fp32 sums)
        if sw is not None:
            y = y * sw.to(y.dtype)
        if s is not None and self.act.per_token(x):      # per-token scales stay outside the GEMM
            y = y * s.to(y.dtype)
        return y if self.linear.bias is None else y + self.linear.bias


# --------------------------------------------------------------------- 4. attach / detach / freeze

class Point(NamedTuple):
    """A quantization point: the sub-module of a decoder layer, the linears that read the
    activation, and whether it follows a norm (the attention and FFN inputs: the soft truncation
    applies there)."""
    sub: str
    readers: tuple
    after_norm: bool


POINTS = {"attn": Point("attention", ("wq", "wk", "wv"), True),       # after attention_norm
          "wo":   Point("attention", ("wo",), False),
          "ffn":  Point("feed_forward", ("w1", "w3"), True),          # after ffn_norm
          "w2":   Point("feed_forward", ("w2",), False)}


def points(model):
    """Walk the quantization points: (layer index, point, the sub-module holding the readers,
    reader names)."""
    for i, layer in enumerate(model.layers):
        for point, p in POINTS.items():
            yield i, point, getattr(layer, p.sub), p.readers


def attach(model, cfg: QuantConfig) -> nn.ModuleList:
    """Swap the decoder's linears for QuantLinears; returns the quantizers[layer][point]."""
    quantizers = nn.ModuleList(nn.ModuleDict() for _ in model.layers)
    for i, point, parent, names in points(model):
        at = model.layers[i].attention
        tied = point == "wo" and cfg.tied_wo
        groups = (at.n_kv_heads, at.n_heads // at.n_kv_heads, at.head_dim) if tied else None
        dim = getattr(parent, names[0]).in_features
        q = quantizers[i][point] = ActQuantizer(dim, cfg, POINTS[point].after_norm, groups)
        for n in names:
            setattr(parent, n, QuantLinear(getattr(parent, n), q, cfg.wbits))
    p = next(model.parameters())
    return quantizers.to(device=p.device)   # scales stay fp32 whatever the model's dtype


def detach(model):
    """Restore the original nn.Linears (the weights were never touched)."""
    for _, _, parent, names in points(model):
        for n in names:
            if isinstance(getattr(parent, n), QuantLinear):
                setattr(parent, n, getattr(parent, n).linear)
    return model


def quant_linears(model):
    return [m for m in model.modules() if isinstance(m, QuantLinear)]


@contextlib.contextmanager
def float_model(model):
    """Inside this block the model runs in float: every QuantLinear (and KV-cache quantizer) is
    bypassed (calibration, KL teacher)."""
    qls = [m for m in model.modules() if hasattr(m, "bypass")]
    before = [m.bypass for m in qls]          # nested blocks restore what they found
    for m in qls:
        m.bypass = True
    try:
        yield model
    finally:
        for m, b in zip(qls, before):
            m.bypass = b


def freeze(model):
    """Cache the weight codes (scales are final) so inference does no per-call weight work."""
    with torch.no_grad():
        for m in quant_linears(model):
            m.frozen = None
            m.frozen = m.folded_weight()


def unfreeze(model):
    """Back to computing the weight codes from the current scales (training)."""
    for m in quant_linears(model):
        m.frozen = None


# --------------------------------------------------------------------------- 5. PTQ initialisation

@torch.no_grad()
def observe(model, wins, batch_size=1, progress=True):
    """The float model's per-channel absmax at every quantization point, one row per calibration
    batch: stats[layer][point] is (batches, dim) fp32. Forward pre-hooks on each point's first
    reader record it (a point read by q, k and v once); attached quantizers are bypassed."""
    from tqdm import tqdm
    stats = [{p: [] for p in POINTS} for _ in model.layers]
    def record(rows):
        return lambda mod, args: rows.append(args[0].detach().abs().flatten(0, -2).amax(0).float())
    hooks = [getattr(parent, names[0]).register_forward_pre_hook(record(stats[i][point]))
             for i, point, parent, names in points(model)]
    device = next(model.parameters()).device
    try:
        with float_model(model):
            for i in tqdm(range(0, len(wins), batch_size), desc="calibrate", disable=not progress,
                          leave=False):
                model(wins[i:i + batch_size].to(device))
    finally:
        for h in hooks:
            h.remove()
    return [{p: torch.stack(rows) for p, rows in s.items()} for s in stats]


INIT = "max"    # the PTQ init of the recipe (train.py --init); the paper's is "mean"


@torch.no_grad()
def init_scales(quantizers, stats, method=INIT, trunc_mult=4.0):
    """Initial static scales from observe()'s rows: per channel, `max` (or `mean`) over batches of
    the batch's absmax, divided by qmax. Truncation thresholds start at trunc_mult x the absmax."""
    for q, a in ((quantizers[i][p], stats[i][p]) for i in range(len(stats)) for p in POINTS):
        if q.log_c is not None:
            q.log_c.copy_((trunc_mult * a.amax(0).clamp(min=1e-6)).log())
        if q.log_scale.numel() == 1:
            a = a.amax(-1, keepdim=True)          # per tensor: the batch's overall absmax
        elif q.groups is not None:                # tied wo: the max over a group's query heads
            n_kv, n_rep, hd = q.groups
            a = a.view(-1, n_kv, n_rep, hd).amax(2).flatten(1)
        init = a.mean(0) if method == "mean" else a.amax(0)
        q.log_scale.copy_((init.clamp(min=1e-6) / qmax(q.bits or 8)).log())


def calibrate(model, quantizers, wins, batch_size=1, method=INIT, trunc_mult=4.0, progress=True,
              alpha=None):
    """PTQ initialisation: observe the float model on calibration windows, set the scales from what
    it saw; with alpha, split them SmoothQuant's way."""
    init_scales(quantizers, observe(model, wins, batch_size, progress), method, trunc_mult)
    if alpha is not None:
        smooth(model, quantizers, alpha)


@torch.no_grad()
def smooth(model, quantizers, alpha):
    """Re-split calibrated per-channel scales as SmoothQuant does (Xiao et al. 2023): s_j ~
    a_j^alpha / w_j^(1-alpha) (a_j: calibrated absmax, w_j: the readers' max |W| in column j), the
    largest a_j / s_j on the grid's max. FP8's init: its step is relative; the scales balance."""
    for i, point, parent, names in points(model):
        q = quantizers[i][point]
        if q.log_scale.numel() == 1:
            continue
        w = torch.stack([getattr(parent, n).linear.weight.abs().amax(0) for n in names]).amax(0)
        if q.groups is not None:                   # tied wo: the max over a kv channel's heads
            n_kv, n_rep, hd = q.groups
            w = w.view(n_kv, n_rep, hd).amax(1).flatten()
        a = q.log_scale.exp() * qmax(q.bits)
        m = a.pow(alpha) / w.float().clamp(min=1e-6).pow(1 - alpha)
        q.log_scale.copy_((m * (a / m).amax() / qmax(q.bits)).log())
