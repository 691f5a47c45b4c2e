"""The field's alternatives to SASQ, in the same harness: SmoothQuant and QuaRot-style rotation.

Both rewrite the float model into one that computes the same function (exactly, up to rounding) but
whose activations are easier to quantize; sasq.attach then quantizes it like any other model.
  1. SmoothQuant (Xiao et al. 2023): divide each activation channel by s_j and multiply the weights'
     input column j by s_j, moving outliers from activations into weights.
  2. Hadamard matrices of the sizes LLaMA needs, built here (Sylvester x Paley), applied in float64.
     Optional reading: the rotation only calls hadamard(x) (= x @ H / sqrt(n)); the finite-field
     construction of Paley's matrices is a detail of how H exists for n = 11008, not of the method.
  3. Rotation (QuaRot, Ashkboos et al. 2024): rotate the residual stream by an orthogonal Q, the w2 input
     by a Hadamard at run time and each head's values by a Hadamard folded into wv/wo. Rotated outliers
     spread over all channels, so one scale per token (QuaRot) or per channel (SASQ + rotation) fits.
Row-vector convention throughout: a linear computes y = x @ W.T with W (out, in).
"""
import functools
import itertools
import math
from dataclasses import replace

import torch
import torch.nn as nn

import checkpoints


# --------------------------------------------------------------------------- 1. SmoothQuant

@torch.no_grad()
def smooth(model, stats, alpha=0.5):
    """Fold s_j = max|X_j|^alpha / max|W_j|^(1-alpha) into the attention and FFN inputs.

    stats: sasq.observe(model, calibration windows), the float model's per-channel absmax per batch.
    max|W_j| is over the rows of every linear that reads X (q, k, v concatenated; gate and up), so one
    division of the RMSNorm gain serves them all: norm.weight / s, then W[:, j] * s_j. The wo and w2
    inputs have no norm in front of them and stay as they are (SmoothQuant's LLaMA setting)."""
    for layer, st in zip(model.layers, stats):
        at, ff = layer.attention, layer.feed_forward
        for norm, readers, ax in ((layer.attention_norm, (at.wq, at.wk, at.wv), st["attn"]),
                                  (layer.ffn_norm, (ff.w1, ff.w3), st["ffn"])):
            ax = ax.amax(0).double().clamp(min=1e-5)                                   # (in,) over all tokens
            aw = torch.cat([r.weight for r in readers]).abs().amax(0).double().clamp(min=1e-5)
            s = (ax.pow(alpha) / aw.pow(1 - alpha)).clamp(min=1e-5)
            norm.weight.copy_(norm.weight.double() / s)
            for r in readers:
                r.weight.copy_(r.weight.double() * s)
    return model


# --------------------------------------------------------------------------- 2. Hadamard matrices (optional reading)

def _prime_power(q):
    """(p, k) with q = p^k, p prime, else None."""
    p = next(d for d in range(2, q + 1) if q % d == 0)
    k = round(math.log(q, p))
    return (p, k) if p ** k == q else None


@functools.lru_cache
def paley(q: int) -> torch.Tensor:
    """A Hadamard matrix of order q + 1 (Paley's first construction), for a prime power q = p^k = 3 mod 4
    with k <= 3: H = I + [[0, 1], [-1, J]], J[a, b] = chi(a - b), chi the quadratic character of GF(q).
    GF(p^k) elements are polynomials of degree < k over GF(p) (here: their base-p digits), multiplied
    modulo a monic irreducible cubic/quadratic, found by search (for k <= 3, no root means irreducible)."""
    (p, k), n = _prime_power(q), q + 1
    digits = lambda a: [a // p ** i % p for i in range(k)]                   # noqa: E731
    number = lambda d: sum(c * p ** i for i, c in enumerate(d))              # noqa: E731
    tail = next(t for t in itertools.product(range(p), repeat=k)             # t^k + t[k-1] t^(k-1) + ... + t[0]
                if k == 1 or all((x ** k + sum(c * x ** i for i, c in enumerate(t))) % p for x in range(p)))

    def mul(a, b):
        prod = [0] * (2 * k - 1)
        for (i, x), (j, y) in itertools.product(enumerate(digits(a)), enumerate(digits(b))):
            prod[i + j] += x * y
        for d in range(2 * k - 2, k - 1, -1):                                # t^d = -t^(d-k) * tail
            c, prod[d] = prod[d], 0
            for i, t in enumerate(tail):
                prod[d - k + i] -= c * t
        return number([c % p for c in prod[:k]])

    squares = {mul(a, a) for a in range(1, q)}
    J = [[0 if a == b else 1 if number([(x - y) % p for x, y in zip(digits(a), digits(b))]) in squares else -1
          for b in range(q)] for a in range(q)]
    H = torch.eye(n, dtype=torch.float64)
    H[0, 1:], H[1:, 0] = 1, -1
    H[1:, 1:] += torch.tensor(J, dtype=torch.float64)
    return H


def hadamard_order(n: int) -> int:
    """The smallest m with n = m * 2^k and a Paley matrix of order m (1: n is a power of two).
    576 = 72*8, 1536 = 12*128, 11008 = 344*32 (q = 7^3), 13824 = 108*128, 28672 = 28*1024 (q = 3^3)."""
    for m in (n >> k for k in range(n.bit_length() - 1, -1, -1) if n % (1 << k) == 0):
        if m == 1 or (m % 4 == 0 and _prime_power(m - 1) and (m - 1) % 4 == 3 and _prime_power(m - 1)[1] <= 3):
            return m
    raise ValueError(f"no Hadamard matrix of order {n} is built here (need m * 2^k, m - 1 a prime power = 3 mod 4)")


def hadamard(x, hm=None):
    """x @ H / sqrt(n) over the last dim, H = H_m (Paley) kron H_{2^k} (Sylvester), never built densely:
    view x as (m, 2^k); the Sylvester factor is k butterfly steps (x+y, x-y), the Paley one an m x m
    product. O(n (k + m)) per row. Computed in x's dtype (float64 for weights)."""
    n = x.shape[-1]
    m = hadamard_order(n)
    y, h = x.unflatten(-1, (m, n // m)), 1
    while h < n // m:                                                          # Sylvester: [[H, H], [H, -H]]
        y = y.unflatten(-1, (-1, 2, h))
        y = torch.stack((y[..., 0, :] + y[..., 1, :], y[..., 0, :] - y[..., 1, :]), -2).flatten(-3)
        h *= 2
    if m > 1:                                                                  # (A kron B): X -> A.T X B
        hm = paley(m - 1) if hm is None else hm
        y = torch.einsum("im,...ij->...mj", hm.to(y), y)
    return y.flatten(-2) / math.sqrt(n)


class Hadamard(nn.Module):
    """The online rotation of w2's input, x -> x H / sqrt(n), in fp32. Its cost at run time: one
    butterfly pass over the activation plus an (m x m) product per row, against w2's (n x dim) GEMM."""

    def __init__(self, n):
        super().__init__()
        m = hadamard_order(n)
        self.register_buffer("hm", paley(m - 1).float() if m > 1 else torch.ones(1, 1), persistent=False)

    def forward(self, x):
        return hadamard(x.float(), self.hm).to(x.dtype)


# --------------------------------------------------------------------------- 3. rotation (QuaRot-style)

@torch.no_grad()
def rotate(model, seed=0):
    """Rewrite `model` in place so that its residual stream is h @ Q, with Q = diag(+-1) H / sqrt(dim)
    (a randomised Hadamard; the signs from `seed`). The function it computes does not change:
      a. RMSNorm(x) * g feeds W: fold g into W's columns; the norm keeps no gain and, without one,
         commutes with Q (||h Q|| = ||h||). The final norm's gain goes into the head, so a tied head
         is untied first.
      b. writers of the residual (embeddings, wo, w2) produce h @ Q: E @ Q, and Q.T @ W (output side);
         readers (wq, wk, wv, w1, w3, head) take W @ Q (input side).
      c. w2's input z becomes z @ H at run time (FeedForward.w2_in) and W2 @ H offline.
      d. each head's values become v @ H_hd: wv's rows per kv head and wo's columns per head.
    Every weight is transformed in float64 and rounded once. The model remembers what it was rotated from
    (`rotated_from`), so its fingerprint names the original weights and the signs, not bits of the float64
    arithmetic that differ between a GPU and a CPU."""
    a, p = model.args, model.tok_embeddings.weight
    base = checkpoints.fingerprint(model)
    signs = (torch.randint(0, 2, (a.dim,), generator=torch.Generator().manual_seed(seed)) * 2 - 1).to(p.device, torch.float64)
    q_in = lambda w: hadamard(w * signs)                                       # W @ Q      # noqa: E731
    q_out = lambda w: hadamard(w.T * signs).T                                  # Q.T @ W    # noqa: E731

    def update(param, *maps):
        w = param.double()
        for f in maps:
            w = f(w)
        param.copy_(w)

    if model.output is None:                                                   # a. untie the head
        model.output = nn.Linear(a.dim, a.vocab_size, bias=False).to(p.device, p.dtype)
        model.output.weight.copy_(p)
        model.output.requires_grad_(p.requires_grad)
        model.args = replace(a, tie_embeddings=False)
    gain = lambda norm: lambda w: w * norm.weight.double()                     # noqa: E731
    update(model.tok_embeddings.weight, q_in)
    update(model.output.weight, gain(model.norm), q_in)
    hd = a.dim // a.n_heads
    per_head_rows = lambda w: hadamard(w.view(a.n_kv_heads, hd, -1).transpose(1, 2)).transpose(1, 2).flatten(0, 1)  # noqa: E731
    per_head_cols = lambda w: hadamard(w.view(w.shape[0], a.n_heads, hd)).flatten(1)                            # noqa: E731
    for layer in model.layers:
        at, ff = layer.attention, layer.feed_forward
        for w in (at.wq, at.wk):
            update(w.weight, gain(layer.attention_norm), q_in)
        update(at.wv.weight, gain(layer.attention_norm), q_in, per_head_rows)
        if at.wv.bias is not None:     # Qwen2: v's bias takes v's per-head rotation (q/k's: nothing)
            update(at.wv.bias, lambda b: hadamard(b.view(a.n_kv_heads, hd)).flatten())
        update(at.wo.weight, per_head_cols, q_out)
        for w in (ff.w1, ff.w3):
            update(w.weight, gain(layer.ffn_norm), q_in)
        update(ff.w2.weight, hadamard, q_out)
        ff.w2_in = Hadamard(a.hidden_dim).to(p.device)
    for norm in (model.norm, *(n for layer in model.layers for n in (layer.attention_norm, layer.ffn_norm))):
        norm.weight.fill_(1.0)
    model.rotated_from = (base, seed)
    return model
