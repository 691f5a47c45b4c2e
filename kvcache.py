"""Decoding from an 8-bit KV cache: K and V kept as int8 or float8-e4m3 codes with the static scales kvquant.py
trains, dequantized inside the attention kernel, never in memory.

    kv, _ = kvquant.load("deploy.safetensors", model, quantizers)   # or kvquant.attach + training
    model.setup_cache(batch, length, kvcache.quantized(model))      # then decode as usual (model.generate)
    python bench.py --sections kv                                   # ms per decode step, 4k-32k cached tokens

At long context a decode step reads more cache than weights (LLaMA-2-7B: 0.5 MB of K and V per token, so 16k
tokens x 8 sequences is 69 GB in bf16 against 6.5 GB of int8 weights), and attention at decode is a pure stream
over the cache: 8-bit codes halve it. The kernel is flash-decoding: one program per (sequence, head, slice of the
cached positions), each a running softmax over its slice; a second small kernel merges the slices. K's scale
(per kv head and dim) is folded into the query, V's into the merged output, so the loop only converts codes.
Off the GPU (and for the prompt) the codes are dequantized and PyTorch's attention runs: the same numbers.
"""
import math

import torch
import torch.nn.functional as F

import kvquant

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None

CODES = {"int": torch.int8, "fp8": torch.float8_e4m3fn}
LOG2E = 1.4426950408889634              # softmax in base 2: exp(x) = exp2(x * log2(e))


if triton is not None:
    @triton.jit
    def _to_float(x, INT8: tl.constexpr):
        """Codes -> fp32. int8 without a conversion instruction (those run at a quarter of the ALU rate, and at
        8-bit codes the loop converts two values per byte it reads): the byte x + 128, put in the mantissa of
        2^23, is the float 2^23 + 128 + x exactly; one integer OR and one subtraction."""
        if INT8:
            u = (x.to(tl.uint8, bitcast=True).to(tl.uint32) ^ 0x80) | 0x4B000000
            return u.to(tl.float32, bitcast=True) - 8388736.0
        return x.to(tl.float32)

    @triton.jit
    def _attend_slice(q_ptr, k_ptr, v_ptr, ks_ptr, part_ptr, ml_ptr, n, H, GROUP, L, HKV, qk_scale, D: tl.constexpr,
                      BLOCK_T: tl.constexpr, SPLITS: tl.constexpr, INT8: tl.constexpr):
        """Program (b * H + h, j): query head h of sequence b against cached positions [j * span, (j + 1) * span)
        of kv head h // GROUP. Each of the BLOCK_T lanes keeps its own running softmax over the positions it
        sees (t, t + BLOCK_T, ...), so the loop has no reduction across positions; the lanes merge once at the
        end. Writes the unnormalised sum of p * v_codes, the max m and the sum l (base-2 exponents)."""
        bh, j = tl.program_id(0), tl.program_id(1)
        b, hk = bh // H, (bh % H) // GROUP
        d = tl.arange(0, D)
        q = tl.load(q_ptr + bh * D + d).to(tl.float32) * tl.load(ks_ptr + hk * D + d) * qk_scale
        span = tl.cdiv(tl.cdiv(n, SPLITS), BLOCK_T) * BLOCK_T
        start = j * span
        end = tl.minimum(n, start + span)
        base = (b * HKV + hk).to(tl.int64) * L * D
        m_i = tl.full((BLOCK_T,), -1e30, tl.float32)         # finite: a lane that saw nothing has weight 0
        l_i = tl.zeros((BLOCK_T,), tl.float32)
        acc = tl.zeros((BLOCK_T, D), tl.float32)
        for t in range(start, end, BLOCK_T):
            rt = t + tl.arange(0, BLOCK_T)
            ok = rt < end
            offs = base + rt[:, None] * D + d[None, :]
            k = _to_float(tl.load(k_ptr + offs, mask=ok[:, None], other=0.0), INT8)
            s = tl.where(ok, tl.sum(k * q[None, :], 1), -1e30)
            m_new = tl.maximum(m_i, s)
            alpha, p = tl.exp2(m_i - m_new), tl.where(ok, tl.exp2(s - m_new), 0.0)
            v = _to_float(tl.load(v_ptr + offs, mask=ok[:, None], other=0.0), INT8)
            acc = acc * alpha[:, None] + p[:, None] * v
            l_i = l_i * alpha + p
            m_i = m_new
        m = tl.max(m_i, 0)
        w = tl.exp2(m_i - m)
        row = bh * SPLITS + j
        tl.store(part_ptr + row * D + d, tl.sum(acc * w[:, None], 0))
        tl.store(ml_ptr + row * 2, m)
        tl.store(ml_ptr + row * 2 + 1, tl.sum(l_i * w, 0))

    @triton.jit
    def _merge(part_ptr, ml_ptr, vs_ptr, o_ptr, H, GROUP, D: tl.constexpr, SPLITS: tl.constexpr):
        """One program per (sequence, head): softmax-weighted merge of the slices, times V's scale."""
        bh = tl.program_id(0)
        hk = (bh % H) // GROUP
        j, d = tl.arange(0, SPLITS), tl.arange(0, D)
        m = tl.load(ml_ptr + (bh * SPLITS + j) * 2)
        w = tl.exp2(m - tl.max(m, 0))                     # empty slices: m = -1e30, weight 0
        l = tl.sum(w * tl.load(ml_ptr + (bh * SPLITS + j) * 2 + 1), 0)
        part = tl.load(part_ptr + (bh * SPLITS + j)[:, None] * D + d[None, :])
        out = tl.sum(w[:, None] * part, 0) / l * tl.load(vs_ptr + hk * D + d)
        tl.store(o_ptr + bh * D + d, out.to(o_ptr.dtype.element_ty))


def splits_for(batch_heads, n, device):
    """Slices per (sequence, head): enough programs for ~4 per SM, slices of at least 256 positions."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4
    want = min(triton.cdiv(4 * sms, batch_heads), max(1, n // 256), 64)
    return 1 << max(0, math.ceil(math.log2(max(want, 1))))


def triton_attend(q, k, v, ks, vs, n, splits=None, block_t=64, num_warps=None):
    """q (B, H, 1, D); k, v (B', Hkv, L, D) codes (B' >= B); ks, vs (Hkv, D) fp32 -> (B, H, 1, D) in q's dtype,
    attending to the first n cached positions. Warps: 8 for 8-bit codes, 4 for bf16 (bench.py --sections kv,
    one layer alone, H200)."""
    B, H, _, D = q.shape
    num_warps = num_warps or (8 if k.element_size() == 1 else 4)
    Hkv, L = k.shape[1], k.shape[2]
    splits = splits or splits_for(B * H, n, q.device)
    part = torch.empty(B * H * splits, D, device=q.device, dtype=torch.float32)
    ml = torch.empty(B * H * splits, 2, device=q.device, dtype=torch.float32)
    out = torch.empty(B, H, 1, D, device=q.device, dtype=q.dtype)
    _attend_slice[(B * H, splits)](q.contiguous(), k, v, ks, part, ml, n, H, H // Hkv, L, Hkv, LOG2E / math.sqrt(D),
                                   D=D, BLOCK_T=block_t, SPLITS=splits, INT8=k.dtype == torch.int8, num_warps=num_warps)
    _merge[(B * H,)](part, ml, vs, out, H, H // Hkv, D=D, SPLITS=splits, num_warps=4)
    return out


@torch.library.custom_op("sasq::attend_cache", mutates_args=())
def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ks: torch.Tensor, vs: torch.Tensor, n: int) -> torch.Tensor:
    """One decode step's attention over an 8-bit cache (a custom op: torch.compile leaves it whole)."""
    return triton_attend(q, k, v, ks, vs, n) if q.is_cuda and triton is not None else reference(q, k, v, ks, vs, n)


def reference(q, k, v, ks, vs, n):
    """The same attention in PyTorch: dequantize the codes, then attend in fp32."""
    kf, vf = (c[:q.shape[0], :, :n].float() * s[None, :, None, :] for c, s in ((k, ks), (v, vs)))
    return F.scaled_dot_product_attention(q.float(), kf, vf, enable_gqa=k.shape[1] != q.shape[1]).to(q.dtype)


@attend.register_fake
def _(q, k, v, ks, vs, n):
    return torch.empty_like(q)


class QuantKVCache:
    """model.KVCache's interface with 8-bit codes: K / s_k and V / s_v, s per (kv head, dim), as int8 or
    float8-e4m3 ("bf16": the same kernel over a bf16 cache, scales 1, the like-for-like baseline)."""

    def __init__(self, shape, like, ks, vs, fmt="int"):
        dtype = CODES.get(fmt, like.dtype)
        self.k, self.v = (torch.zeros(shape, dtype=dtype, device=like.device) for _ in range(2))
        self.ks, self.vs = (s.float().to(like.device).expand(shape[1], shape[3]).contiguous() for s in (ks, vs))
        self.fmt = fmt

    def codes(self, x, s):
        y = x.float() / s[None, :, None, :]
        if self.fmt == "fp8":
            return y.clamp(-kvquant.FP8_MAX, kvquant.FP8_MAX).to(torch.float8_e4m3fn)
        return y.round().clamp(-128, 127).to(torch.int8) if self.fmt == "int" else y.to(self.k.dtype)

    def attend(self, q, k, v, pos, gqa):
        B, T = q.shape[0], q.shape[2]
        self.k[:B, :, pos:pos + T], self.v[:B, :, pos:pos + T] = self.codes(k, self.ks), self.codes(v, self.vs)
        if T > 1:          # the prompt: k, v are what the codes hold (kvquant's fake-quant), causal attention
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        return attend(q, self.k, self.v, self.ks, self.vs, pos + T)


def scale_of(q):
    """A static KVQuantizer's scale per (kv head, dim) in the cache's terms (the deployable V: s_v * s_wo)."""
    n_kv, hd = q.shape
    s = q.log_scale.detach().exp().float().view(-1, 1).expand(n_kv, hd)
    return s * q.pre.log_scale.detach().exp().float().view(n_kv, hd) if q.pre is not None else s


def quantized(model, fmt=None):
    """setup_cache's `make` for the 8-bit KV quantizers attached to `model` (kvquant.attach or load): each layer
    gets a QuantKVCache with its trained scales. fmt "bf16": the same kernel over a cache in the model's dtype
    (no quantizers needed)."""
    scales = []
    for a in (layer.attention for layer in model.layers):
        kq, vq = a.k_in, a.v_in
        if fmt == "bf16":
            scales.append((torch.ones(a.n_kv_heads, a.head_dim),) * 2)
        elif isinstance(kq, kvquant.KVQuantizer) and kq.granularity != "token" and kq.bits == 8:
            scales.append((scale_of(kq), scale_of(vq)))
        else:
            raise ValueError("an 8-bit cache needs static 8-bit KV scales: train with --kv-bits 8 (kvquant.py)")
    fmt = fmt or model.layers[0].attention.k_in.fmt
    return lambda i, shape, like: QuantKVCache(shape, like, *scales[i], fmt)
