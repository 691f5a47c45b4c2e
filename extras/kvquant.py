"""Static KV-cache scales, trained: K (after RoPE) and V quantized as they enter the cache, with scales
fixed before inference, PTQ-initialised and then trained by SASQ's loss together with the activation scales.

    python train.py --deployable --kv-bits 8                    # W8A8 + int8 KV cache, one scale per tensor
    python train.py --deployable --kv-bits 8 --kv-format fp8    # FP8-e4m3 cache, as vLLM stores it
    python train.py --kv-bits 4 --kv-granularity head           # the stress test, one scale per kv head
    python eval.py --scales deploy.safetensors --kv-baselines   # + the same scales with KV dynamic / PTQ / off

Nothing new in the method: a KV quantizer is one more quantization point per tensor (model.Attention's
k_in / v_in slots), its rounding passes the gradient straight through, the weights stay frozen. Attention
then reads the fake-quantized K and V exactly as it would read a dequantized 8-bit cache.

Engines take the cache's scales as one static number per attention layer (compressed-tensors'
`kv_cache_scheme`, vLLM's `k_scale` / `v_scale`), on the K and V the exported model computes. Those are our
K and V, except in the deployable model, where export.py folds the wo input's per-channel scale into the
rows of wv: the exported V is v / s_wo. So there the V quantizer scales v / s_wo (`pre`), and its one
trained number is exactly the checkpoint's v_scale.
"""
import json

import torch
import torch.nn as nn

import checkpoints
import sasq

FP8_MAX = sasq.qmax("fp8")           # 448, the largest finite float8_e4m3fn
FORMATS = ("int", "fp8")
GRANULARITIES = ("tensor", "head", "token")     # token: the dynamic baseline, a scale per token and head


def usage_problem(a) -> str | None:
    """train.py's KV options, checked before anything loads (None: they are fine); fills in their
    defaults."""
    if a.kv_bits is None:
        return "--kv-format and --kv-granularity describe the KV cache's scales: add --kv-bits 8 (or 4)"
    a.kv_format, a.kv_granularity = a.kv_format or "int", a.kv_granularity or "tensor"
    if a.kv_format == "fp8" and a.kv_bits != 8:
        return f"--kv-format fp8 is 8 bits; got --kv-bits {a.kv_bits}"
    return None


class KVQuantizer(nn.Module):
    """x (B, n_kv, T, head_dim) -> s * grid(x / s), in x's dtype. `pre`: the wo input's ActQuantizer when its
    scale is folded into wv (deployable), so the grid sees v / s_wo as the exported model computes it."""
    is_quantizer = True              # checkpoints.fingerprint leaves its parameters out

    def __init__(self, n_kv, head_dim, bits, fmt="int", granularity="tensor", pre=None):
        super().__init__()
        if fmt == "fp8" and bits != 8:
            raise ValueError("--kv-format fp8 is 8 bits")
        self.bits, self.fmt, self.granularity, self.shape = bits, fmt, granularity, (n_kv, head_dim)
        self.grid = "fp8" if fmt == "fp8" else bits        # sasq's grid: the one the activations use
        self.log_scale = nn.Parameter(torch.zeros(n_kv if granularity == "head" else 1)) if granularity != "token" else None
        object.__setattr__(self, "pre", pre)    # not a submodule: it belongs to the activation quantizers
        self.bypass = False

    def grid_max(self):
        return sasq.qmax(self.grid)

    def prepared(self, x):
        """What the grid quantizes: x, or v / s_wo in the deployable model (fp32)."""
        x = x.float()
        if self.pre is not None:
            x = x / self.pre.log_scale.exp().view(1, self.shape[0], 1, self.shape[1])
        return x

    def forward(self, x):
        if self.bypass:
            return x
        y = self.prepared(x)
        if self.granularity == "token":
            s = y.detach().abs().amax(-1, keepdim=True).clamp(min=1e-8) / self.grid_max()
        else:
            s = self.log_scale.exp().view(1, -1, 1, 1)
        y = sasq.quantize(y, s, self.grid) * s
        if self.pre is not None:
            y = y * self.pre.log_scale.exp().view(1, self.shape[0], 1, self.shape[1])
        return y.to(x.dtype)


def attach(model, bits, fmt="int", granularity="tensor", quantizers=None):
    """A K and a V quantizer in every attention layer; returns them, kv[layer]["k" / "v"]. `quantizers`: the
    activation quantizers, whose tied wo scale (deployable) folds into wv and so comes before the V grid."""
    if fmt not in FORMATS or granularity not in GRANULARITIES:
        raise ValueError(f"KV cache format {fmt!r} / granularity {granularity!r}: choose from "
                         f"{FORMATS} / {GRANULARITIES}")
    kv = nn.ModuleList()
    for i, layer in enumerate(model.layers):
        at = layer.attention
        wo = quantizers[i]["wo"] if quantizers is not None else None
        pre = wo if wo is not None and wo.groups is not None and wo.log_scale.numel() > 1 else None
        kv.append(nn.ModuleDict({"k": KVQuantizer(at.n_kv_heads, at.head_dim, bits, fmt, granularity),
                                 "v": KVQuantizer(at.n_kv_heads, at.head_dim, bits, fmt, granularity, pre)}))
        at.k_in, at.v_in = kv[i]["k"], kv[i]["v"]
    return kv.to(next(model.parameters()).device)


def detach(model):
    for layer in model.layers:
        layer.attention.k_in, layer.attention.v_in = nn.Identity(), nn.Identity()


@torch.no_grad()
def calibrate(model, kv, wins, batch_size=1, progress=True):
    """PTQ init: s = the max over calibration batches of |K| (|V|) per kv head (per tensor: over heads too),
    / the grid's largest value, observed on the float model."""
    from tqdm import tqdm
    if kv[0]["k"].granularity == "token":
        return
    rows, hooks = {}, []
    for q in (q for d in kv for q in d.values()):
        rows[q] = []
        hooks.append(q.register_forward_pre_hook(lambda m, args: rows[m].append(m.prepared(args[0]).abs().amax((0, 2, 3)))))
    device = next(model.parameters()).device
    try:
        with sasq.float_model(model):
            for i in tqdm(range(0, len(wins), batch_size), desc="calibrate KV", disable=not progress, leave=False):
                model(wins[i:i + batch_size].to(device))
    finally:
        for h in hooks:
            h.remove()
    for q, r in rows.items():
        a = torch.stack(r).amax(0)                                   # (n_kv,)
        a = a if q.granularity == "head" else a.amax(0, keepdim=True)
        q.log_scale.copy_((a.clamp(min=1e-6) / q.grid_max()).log())


def config(kv) -> dict:
    q = kv[0]["k"]
    return {"bits": q.bits, "format": q.fmt, "granularity": q.granularity}


def to_save(kv):
    """(tensors, metadata) for checkpoints.save_scales(more=...): the scales under "kv.", the config in "kv_config"."""
    return {f"kv.{k}": v for k, v in kv.state_dict().items()}, {"kv_config": json.dumps(config(kv))}


def read_config(path) -> dict | None:
    """The KV config a scales file was trained with, or None (no KV quantizers in it)."""
    meta = checkpoints.read_scales_meta(path)[0]
    return json.loads(meta["kv_config"]) if "kv_config" in meta else None


def load(path, model, quantizers=None, override=None):
    """Attach the KV quantizers stored in `path` (checkpoints.load_scales has checked the file belongs to the model).
    `override` (eval.py --kv-baselines): "ptq" or "token" keep the file's bits and format but take the
    scales from calibration or from each token; returns (kv, cfg), or (None, None) without KV in the file."""
    cfg = read_config(path)
    if cfg is None:
        return None, None
    kv = attach(model, cfg["bits"], cfg["format"], "token" if override == "token" else cfg["granularity"], quantizers)
    if override is None:
        tensors = {k[3:]: v for k, v in checkpoints.read_scales(path)[1].items() if k.startswith("kv.")}
        try:
            kv.load_state_dict(tensors, strict=True)
        except RuntimeError as e:
            detach(model)
            raise checkpoints.ScalesError(f"{path}: KV scales do not fit this model ({' '.join(str(e).split())[:200]})") from None
    return kv, cfg


def label(cfg, how="trained"):
    fmt = "FP8" if cfg["format"] == "fp8" else "int"
    return f"KV{cfg['bits']} {fmt} " + {"trained": f"static per-{cfg['granularity']}, trained", "token": "dynamic per-token",
                                         "ptq": f"static per-{cfg['granularity']}, PTQ max"}[how]


# --------------------------------------------------------------------------- export (compressed-tensors)

def kv_cache_scheme(cfg) -> dict:
    """compressed-tensors' kv_cache_scheme for static per-tensor scales (what vLLM reads)."""
    if cfg["granularity"] != "tensor" or cfg["bits"] != 8:
        raise ValueError(f"KV scales per {cfg['granularity']}, {cfg['bits']} bits: engines take 8-bit, one scale "
                         "per tensor (train with --kv-bits 8 --kv-granularity tensor)")
    return {"num_bits": 8, "type": "float" if cfg["format"] == "fp8" else "int", "symmetric": True,
            "strategy": "tensor", "dynamic": False}


def export_tensors(kv) -> dict:
    """HF names of the per-layer scales: model.layers.i.self_attn.k_scale / v_scale, shape (1,)."""
    return {f"model.layers.{i}.self_attn.{n}_scale": d[n].log_scale.detach().exp().float().reshape(1)
            for i, d in enumerate(kv) for n in ("k", "v")}
