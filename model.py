"""A from-scratch LLaMA: LLaMA-2/3, and the models built like it (Mistral, Qwen2, SmolLM2).

Meta's parameter names and Meta's RoPE layout (adjacent pairs). checkpoints.py reads every file
format into this model; sasq.py attaches the quantizers from outside: this file knows nothing of
quantization.
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


# ----------------------------------------------------------------------------------- configuration

@dataclass
class ModelArgs:
    dim: int = 4096                  # defaults: LLaMA-2-7B
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int = 32             # < n_heads means grouped-query attention
    vocab_size: int = 32000
    hidden_dim: int = 11008          # FFN width
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_seq_len: int = 4096
    tie_embeddings: bool = False     # output head shares tok_embeddings.weight
    rope_scaling: dict | None = None  # {"type": "linear" | "llama3", "factor": ..., ...}
    qkv_bias: bool = False           # Qwen2: wq, wk, wv carry biases
    sliding_window: int | None = None  # Mistral v0.1: max_seq_len is capped to it (exact, no mask)


def rope_frequencies(args: ModelArgs) -> torch.Tensor:
    """The rotation speed of each pair of a head's channels, (head_dim / 2,), with the context
    extension the checkpoint was trained with: none, `linear` (positions divided by the factor) or
    Llama 3.1's `llama3` (slow channels divided by the factor, fast ones kept, a ramp between)."""
    hd = args.dim // args.n_heads
    inv_freq = 1.0 / args.rope_theta ** (torch.arange(0, hd, 2).float() / hd)   # fp32, as HF
    s = args.rope_scaling or {"type": "default"}
    if s["type"] == "linear":
        inv_freq = inv_freq / s["factor"]
    elif s["type"] == "llama3":
        old, lo, hi = (s["original_max_position_embeddings"], s["low_freq_factor"],
                       s["high_freq_factor"])
        wavelen = 2 * math.pi / inv_freq
        ramp = ((old / wavelen - lo) / (hi - lo)).clamp(0, 1)   # 0: slow (scaled), 1: fast (kept)
        inv_freq = (1 - ramp) * inv_freq / s["factor"] + ramp * inv_freq
    elif s["type"] != "default":
        raise ValueError(f"RoPE scaling {s['type']!r} is not supported")
    return inv_freq


# ----------------------------------------------------------------------------------- the model

class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        xf = x.float()        # normalise in fp32 (as Meta does), then cast back before the gain
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return xf.type_as(x) * self.weight


def apply_rope(x, cos, sin):
    """Rotate adjacent pairs (x[2i], x[2i+1]) by position-dependent angles. x: (B, T, H, D)."""
    xf = x.float().unflatten(-1, (-1, 2))            # (B, T, H, D/2, 2)
    x0, x1 = xf[..., 0], xf[..., 1]
    cos, sin = cos[:, None, :], sin[:, None, :]      # (T, 1, D/2), broadcast over heads
    out = torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1)
    return out.flatten(-2).type_as(x)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads, self.n_kv_heads = args.n_heads, args.n_kv_heads
        self.head_dim = hd = args.dim // args.n_heads
        self.wq = nn.Linear(args.dim, args.n_heads * hd, bias=args.qkv_bias)
        self.wk = nn.Linear(args.dim, args.n_kv_heads * hd, bias=args.qkv_bias)
        self.wv = nn.Linear(args.dim, args.n_kv_heads * hd, bias=args.qkv_bias)
        self.wo = nn.Linear(args.n_heads * hd, args.dim, bias=False)
        self.cache = None      # a KVCache while decoding (setup_cache)
        # K (after RoPE) and V as they enter the cache: extras/kvquant.py quantizes them here
        self.k_in, self.v_in = nn.Identity(), nn.Identity()

    def forward(self, x, cos, sin, pos=0):
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.n_heads, self.head_dim)
        k = self.wk(x).view(B, T, self.n_kv_heads, self.head_dim)
        v = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        # SDPA wants (B, H, T, D); enable_gqa lets n_heads query heads share n_kv_heads k/v heads
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        k, v, gqa = self.k_in(k), self.v_in(v), self.n_kv_heads != self.n_heads
        if self.cache is not None:     # decoding: store positions pos..pos+T, attend to 0..pos+T
            y = self.cache.attend(q, k, v, pos, gqa)
        else:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=T > 1, enable_gqa=gqa)
        return self.wo(y.transpose(1, 2).reshape(B, T, -1))


class KVCache:
    """K and V of up to `length` positions, (B, n_kv_heads, length, head_dim) in the model's dtype
    (extras/kvcache.py keeps 8-bit codes instead). attend() stores the new positions and attends to
    all so far."""

    def __init__(self, shape, like):
        self.k, self.v = like.new_zeros(shape), like.new_zeros(shape)

    def attend(self, q, k, v, pos, gqa):
        B, T = q.shape[0], q.shape[2]
        self.k[:B, :, pos:pos + T], self.v[:B, :, pos:pos + T] = k, v
        k, v = self.k[:B, :, :pos + T], self.v[:B, :, :pos + T]
        return F.scaled_dot_product_attention(q, k, v, is_causal=T > 1, enable_gqa=gqa)


class FeedForward(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.w1 = nn.Linear(args.dim, args.hidden_dim, bias=False)   # gate
        self.w3 = nn.Linear(args.dim, args.hidden_dim, bias=False)   # up
        self.w2 = nn.Linear(args.hidden_dim, args.dim, bias=False)   # down
        self.w2_in = nn.Identity()     # a run-time map of w2's input (a rotation's Hadamard)

    def forward(self, x):
        return self.w2(self.w2_in(F.silu(self.w1(x)) * self.w3(x)))


def allow_recompiles():
    """torch.compile makes a graph per input shape and per set of swapped-in modules: allow many."""
    cfg = torch._dynamo.config
    setattr(cfg, "recompile_limit" if hasattr(cfg, "recompile_limit") else "cache_size_limit", 256)
    if hasattr(cfg, "accumulated_recompile_limit"):
        cfg.accumulated_recompile_limit = 4096


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)
        self.attention, self.feed_forward = Attention(args), FeedForward(args)

    def forward(self, x, cos, sin, pos=0):
        h = x + self.attention(self.attention_norm(x), cos, sin, pos)
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(TransformerBlock(args) for _ in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = (None if args.tie_embeddings
                       else nn.Linear(args.dim, args.vocab_size, bias=False))
        self.checkpointing = False    # recompute each block in backward (saves training memory)
        self.init_rope()

    def init_rope(self, device=None):
        """(Re)build the fp32 cos/sin tables; needed after building on the meta device."""
        inv_freq = rope_frequencies(self.args).to(device)
        angles = torch.outer(torch.arange(self.args.max_seq_len, device=device).float(), inv_freq)
        self.register_buffer("rope_cos", angles.cos(), persistent=False)   # (max_seq_len, hd/2)
        self.register_buffer("rope_sin", angles.sin(), persistent=False)

    def forward(self, tokens, targets=None, pos=0):
        """tokens: (B, T) -> logits (B, T, vocab) at every position, and the mean CE loss if
        targets. With a KV cache (setup_cache), `pos` is the position of tokens[:, 0]: a prompt at
        0, then one token at a time."""
        T, limit = tokens.shape[1], self.args.max_seq_len
        if torch.is_tensor(pos):   # a 0-dim tensor: one token at a position the GPU holds (a graph)
            cos, sin = (t.index_select(0, pos.view(1)) for t in (self.rope_cos, self.rope_sin))
        elif pos + T > limit:
            raise ValueError(f"sequence of {pos + T} tokens exceeds max_seq_len={limit}")
        elif pos and T > 1:
            raise ValueError("with a KV cache, feed the prompt at pos 0, then one token at a time")
        else:
            cos, sin = self.rope_cos[pos:pos + T], self.rope_sin[pos:pos + T]
        h = self.tok_embeddings(tokens)
        for layer in self.layers:
            if self.checkpointing and torch.is_grad_enabled():
                h = torch.utils.checkpoint.checkpoint(layer, h, cos, sin, pos, use_reentrant=False)
            else:
                h = layer(h, cos, sin, pos)
        head = self.tok_embeddings if self.output is None else self.output
        logits = F.linear(self.norm(h), head.weight)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=-1)
        return logits, loss

    def compile_blocks(self):
        """torch.compile every decoder block. One graph per input shape and per set of swapped-in
        linears (quantizers, INT8 layers), so dynamo's recompile limit is raised."""
        allow_recompiles()
        for layer in self.layers:
            layer.compile()

    def setup_cache(self, batch, length, make=None):
        """Allocate a KV cache for `batch` sequences of up to `length` tokens; batch=0 removes it.
        make(layer index, shape, like): another kind of cache (extras/kvcache.quantized)."""
        make, p = make or (lambda i, shape, like: KVCache(shape, like)), self.tok_embeddings.weight
        for i, a in enumerate(layer.attention for layer in self.layers):
            a.cache = make(i, (batch, a.n_kv_heads, length, a.head_dim), p) if batch else None

    @torch.no_grad()
    def generate(self, tokens, max_new_tokens: int, eos_id=None, cache=None):
        """Greedy decoding with a KV cache (cache: setup_cache's `make`). tokens: (1, T)."""
        T = tokens.shape[1]
        n = max(0, min(max_new_tokens, self.args.max_seq_len - T))   # the prompt may fill it
        self.setup_cache(1, T + n, cache)
        try:
            logits = self(tokens)[0]
            for pos in range(T, T + n):
                nxt = logits[:, -1].argmax(-1, keepdim=True)
                tokens = torch.cat([tokens, nxt], dim=1)
                if eos_id is not None and nxt.item() == eos_id:
                    break
                logits = self(nxt, pos=pos)[0]
            return tokens
        finally:
            self.setup_cache(0, 0)
