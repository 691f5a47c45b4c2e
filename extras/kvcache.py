"""Decoding from an 8-bit KV cache: K and V kept as int8 or float8-e4m3 codes with the static scales kvquant.py
trains, dequantized inside the attention kernel, never in memory.

    kv, _ = kvquant.load("deploy.safetensors", model, quantizers)   # or kvquant.attach + training
    model.setup_cache(batch, length, kvcache.quantized(model))      # then decode as usual (model.generate)
    python bench.py --sections kv                                   # ms per decode step, 4k-32k cached tokens

At long context a decode step reads more cache than weights (LLaMA-2-7B: 0.5 MB of K and V per token, so 16k
tokens x 8 sequences is 69 GB in bf16 against 6.5 GB of int8 weights), and attention at decode is a pure stream
over the cache: 8-bit codes halve it. The kernel is flash-decoding: one program per (sequence, kv head, slice of
the cached positions) takes the query heads that share the kv head as the rows of a tensor-core dot (padded to
16: LLaMA-2-7B has one, 70B eight), converts each block of codes to fp16 in registers and runs flash attention
over the slice; a second small kernel merges the slices. K's scale (per kv head and dim) is folded into the query,
V's into the merged output, so the loop only converts codes. Speed: docs/bench.md.
Off the GPU (and for the prompt) the codes are dequantized and PyTorch's attention runs: the same numbers.
"""
import math

import torch
import torch.nn.functional as F

from extras import kvquant

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None

CODES = {"int": torch.int8, "fp8": torch.float8_e4m3fn}
LOG2E = 1.4426950408889634              # softmax in base 2: exp(x) = exp2(x * log2(e))


if triton is not None:
    @triton.jit
    def _to_half(x, CODE: tl.constexpr, ASM: tl.constexpr):
        """Cache codes -> the dtype of the tensor-core dot: bf16 stays; float8-e4m3 -> fp16 (one instruction per
        pair on Hopper); int8 -> fp16 without the slow conversion instruction: the byte x + 128 put under the
        exponent of 1024.0 is the half 1024 + 128 + x exactly. On the GPU four bytes at once (one xor, two byte
        permutes, two paired subtractions); in Triton's CPU interpreter, which runs no PTX, the same trick per
        element."""
        if CODE == 1 and ASM:
            y = tl.inline_asm_elementwise(
                """{ .reg .b32 t, c;
                xor.b32 t, $2, 0x80808080;
                prmt.b32 $0, t, 0x64646464, 0x4140;
                prmt.b32 $1, t, 0x64646464, 0x4342;
                mov.b32 c, 0x64806480;
                sub.f16x2 $0, $0, c;
                sub.f16x2 $1, $1, c; }""",
                "=r,=r,r", [x], dtype=tl.float16, is_pure=True, pack=4)
        elif CODE == 1:
            u = ((x.to(tl.uint8, bitcast=True).to(tl.uint32) ^ 0x80) | 0x6400).to(tl.uint16)
            y = (u.to(tl.float16, bitcast=True) - 1152.0).to(tl.float16)
        elif CODE == 2:
            y = x.to(tl.float16)
        else:
            y = x
        return y

    @triton.jit
    def _attend_slice(q_ptr, k_ptr, v_ptr, ks_ptr, part_ptr, ml_ptr, n, HKV, GROUP, L, qk_scale, D: tl.constexpr,
                      BLOCK_T: tl.constexpr, ROWS: tl.constexpr, SPLITS: tl.constexpr, CODE: tl.constexpr,
                      ASM: tl.constexpr):
        """Program (b * HKV + hk, j): the GROUP query heads that share kv head hk of sequence b (padded to ROWS,
        the tensor cores' 16) against cached positions [j * span, (j + 1) * span). Flash attention on one
        block of BLOCK_T positions at a time, both products on the tensor cores. Writes each head's
        unnormalised sum of p * v_codes, its max m and its sum l (base-2 exponents)."""
        bk, j = tl.program_id(0), tl.program_id(1)
        hk = bk % HKV
        g, d = tl.arange(0, ROWS), tl.arange(0, D)
        rows = bk * GROUP + g                                 # = b * H + hk * GROUP + g
        q = tl.load(q_ptr + rows[:, None] * D + d[None, :], mask=(g < GROUP)[:, None], other=0.0).to(tl.float32)
        q = q * tl.load(ks_ptr + hk * D + d)[None, :]         # K's scale folded into the query
        c = tl.maximum(tl.max(tl.abs(q), 1), 1e-30)           # and q brought to [-1, 1]: no fp16 range issue
        q = (q / c[:, None]).to(tl.bfloat16 if CODE == 0 else tl.float16)
        c = c * qk_scale
        span = tl.cdiv(tl.cdiv(n, SPLITS), BLOCK_T) * BLOCK_T
        start = j * span
        end = tl.minimum(n, start + span)
        base = bk.to(tl.int64) * L * D
        m_i = tl.full((ROWS,), -1e30, tl.float32)             # finite: a slice that saw nothing has weight 0
        l_i = tl.zeros((ROWS,), tl.float32)
        acc = tl.zeros((ROWS, D), tl.float32)
        for t in range(start, end, BLOCK_T):
            rt = t + tl.arange(0, BLOCK_T)
            ok = rt < end
            offs = base + rt[:, None] * D + d[None, :]
            k = _to_half(tl.load(k_ptr + offs, mask=ok[:, None], other=0.0), CODE, ASM)
            s = tl.where(ok[None, :], tl.dot(q, tl.trans(k)) * c[:, None], -1e30)
            m_new = tl.maximum(m_i, tl.max(s, 1))
            alpha, p = tl.exp2(m_i - m_new), tl.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            v = _to_half(tl.load(v_ptr + offs, mask=ok[:, None], other=0.0), CODE, ASM)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            m_i = m_new
        out = (rows * SPLITS + j)
        keep = g < GROUP
        tl.store(part_ptr + out[:, None] * D + d[None, :], acc, mask=keep[:, None])
        tl.store(ml_ptr + out * 2, m_i, mask=keep)
        tl.store(ml_ptr + out * 2 + 1, l_i, mask=keep)

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


def splits_for(programs, n, device):
    """Slices per (sequence, kv head): enough programs for ~4 per SM, slices of at least 256 positions."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4
    want = min(triton.cdiv(4 * sms, programs), max(1, n // 256), 64)
    return 1 << max(0, math.ceil(math.log2(max(want, 1))))


def triton_attend(q, k, v, ks, vs, n, splits=None, block_t=128, num_warps=4, num_stages=3):
    """q (B, H, 1, D); k, v (B', Hkv, L, D) codes (B' >= B); ks, vs (Hkv, D) fp32 -> (B, H, 1, D) in q's dtype,
    attending to the first n cached positions. The tile (128 positions, 4 warps, 3 stages in flight) was the
    fastest for all three cache dtypes on an H200 (results/bench/kvattn/, bench.py --sections kv)."""
    B, H, _, D = q.shape
    Hkv, L = k.shape[1], k.shape[2]
    group = H // Hkv
    splits = splits or splits_for(B * Hkv, n, q.device)
    part = torch.empty(B * H * splits, D, device=q.device, dtype=torch.float32)
    ml = torch.empty(B * H * splits, 2, device=q.device, dtype=torch.float32)
    out = torch.empty(B, H, 1, D, device=q.device, dtype=q.dtype)
    code = {torch.int8: 1, torch.float8_e4m3fn: 2}.get(k.dtype, 0)
    _attend_slice[(B * Hkv, splits)](q.contiguous(), k, v, ks, part, ml, n, Hkv, group, L, LOG2E / math.sqrt(D),
                                     D=D, BLOCK_T=block_t, ROWS=max(16, triton.next_power_of_2(group)),
                                     SPLITS=splits, CODE=code, ASM=q.is_cuda, num_warps=num_warps, num_stages=num_stages)
    _merge[(B * H,)](part, ml, vs, out, H, group, D=D, SPLITS=splits, num_warps=4)
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
