"""Export to a Hugging Face folder that transformers and serving engines load.

    python export.py --out smollm2-hf                                   # plain bf16 HF model (GGUF/Meta -> HF)
    python export.py --scales deploy.safetensors --out smollm2-w8a8     # SASQ static W8A8, compressed-tensors
    python export.py --ckpt llama-2-7b --scales deploy.safetensors --out llama-2-7b-sasq-w8a8

Why SASQ's scales can be shipped at all. Engines (vLLM's compressed-tensors, TensorRT-LLM, torchao)
take one static activation scale per *tensor* (`input_scale`, shape (1,)), never one per input
channel. But each of SASQ's four quantized activations is made by an op that is linear channel by
channel in its output, so a per-channel scale s folds into that op exactly:
  attention input  rmsnorm(h) * gain              ->  gain / s_attn
  FFN input        rmsnorm(h) * gain              ->  gain / s_ffn
  wo input         softmax(q k^T) v, head by head ->  rows of wv / s_wo  (one scale per kv channel: GQA)
  w2 input         silu(w1 x) * (w3 x)            ->  rows of w3 / s_w2
Each activation then arrives already divided by its scale and is quantized with input_scale = 1. The
int8 weight codes are exactly the codes of W * s that SASQ trained with (W in the precision of training,
which the scales file records; --dtype sets only the float tensors); dividing the rows of wv and
w3 changes only their per-row weight_scale, never their codes. c * tanh(x / c) has no such home:
scales trained with it are refused (train with `train.py --deployable`).
"""
import argparse
import json
import os
import shutil
import sys

import torch

import checkpoints
import cli
import data
from extras import kvquant
import model as llama
import sasq

SHARD_BYTES = 4 << 30       # safetensors shards of at most 4 GiB, with an index, as the hub's models are


# --------------------------------------------------------------------------- Meta names -> HF names

TO_HF_TOP = {v: k for k, v in checkpoints.HF_TOP.items()}
TO_HF_LEAF = {v: k for k, v in checkpoints.HF_LEAF.items()}


def permute_meta_to_hf(w, n_heads):
    """The inverse of checkpoints._permute_hf_to_meta: adjacent RoPE pairs -> HF's halves. w: (n*hd, dim)."""
    d, dim = w.shape
    return w.view(n_heads, d // n_heads // 2, 2, dim).transpose(1, 2).reshape(d, dim)


def hf_name(name: str) -> str:
    """layers.3.attention.wq.weight -> model.layers.3.self_attn.q_proj.weight (also .weight_scale etc.)."""
    if not name.startswith("layers."):
        return TO_HF_TOP[name]
    _, i, *mid, leaf = name.split(".")
    return f"model.layers.{i}.{TO_HF_LEAF['.'.join(mid)]}.{leaf}"


def to_hf(sd: dict, a: llama.ModelArgs) -> dict:
    """Rename to HF and put the q/k rows (and their per-row scales) back into HF's RoPE order."""
    out = {}
    for k, v in sd.items():
        n = a.n_heads if ".attention.wq." in k else a.n_kv_heads if ".attention.wk." in k else None
        if n is not None and v.dim() == 2:
            v = permute_meta_to_hf(v, n)
        elif n is not None and k.endswith(".bias"):          # Qwen2's q/k biases follow their rows
            v = permute_meta_to_hf(v[:, None], n)[:, 0]
        out[hf_name(k)] = v.contiguous()
    return out


def hf_family(a: llama.ModelArgs) -> str:
    """The transformers family that computes this model: Qwen2 for q/k/v biases, Mistral for a
    sliding window, LLaMA otherwise (Mistral without a window is a LLaMA)."""
    return "qwen2" if a.qkv_bias else "mistral" if a.sliding_window else "llama"


def hf_config(a: llama.ModelArgs, tok, dtype) -> dict:
    family = hf_family(a)
    arch = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "mistral": "MistralForCausalLM"}
    extra = {"rope_scaling": {"rope_type": a.rope_scaling["type"], **{
        k: v for k, v in a.rope_scaling.items() if k != "type"}}} if a.rope_scaling else {}
    if family == "mistral":
        extra["sliding_window"] = a.sliding_window
    return {**hf_config_llama(a, tok, dtype), "architectures": [arch[family]], "model_type": family,
            **extra}


def hf_config_llama(a: llama.ModelArgs, tok, dtype) -> dict:
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": a.dim,
            "intermediate_size": a.hidden_dim, "num_hidden_layers": a.n_layers,
            "num_attention_heads": a.n_heads, "num_key_value_heads": a.n_kv_heads, "head_dim": a.dim // a.n_heads,
            "hidden_act": "silu", "vocab_size": a.vocab_size, "rms_norm_eps": a.norm_eps,
            "rope_theta": a.rope_theta, "max_position_embeddings": a.max_seq_len,
            "tie_word_embeddings": a.tie_embeddings, "attention_bias": False, "mlp_bias": False,
            "bos_token_id": tok.bos_id, "eos_token_id": tok.eos_id, "torch_dtype": str(dtype).split(".")[-1]}


def quantization_config(grid) -> dict:
    """compressed-tensors: 8-bit weights per output channel, 8-bit activations per tensor, both static and
    symmetric; int8 ("int-quantized") or float8-e4m3 ("float-quantized", grid "fp8")."""
    kind = {"num_bits": 8, "type": "float" if grid == "fp8" else "int", "symmetric": True, "dynamic": False}
    return {"quant_method": "compressed-tensors", "quantization_status": "compressed",
            "format": "float-quantized" if grid == "fp8" else "int-quantized",
            "config_groups": {"group_0": {"targets": ["Linear"], "weights": {**kind, "strategy": "channel"},
                                          "input_activations": {**kind, "strategy": "tensor"}}},
            "ignore": ["lm_head"]}


CODES = {8: torch.int8, "fp8": torch.float8_e4m3fn}      # the dtype the weight codes are stored in


# --------------------------------------------------------------------------- folding

def check_foldable(cfg: sasq.QuantConfig, a: llama.ModelArgs):
    """Refuse, in one line, scales that no per-tensor static W8A8 engine format can hold."""
    if cfg.act != "static" or cfg.wbits not in CODES or cfg.abits != cfg.wbits:
        raise checkpoints.ScalesError(f"export writes static W8A8 (int8 or fp8); these scales are "
                                      f"W{cfg.wbits}A{cfg.abits} {cfg.act}")
    if cfg.truncation:
        raise checkpoints.ScalesError("these scales were trained with c*tanh(x/c) truncation, which no engine format "
                               "holds; train them with train.py --deployable")
    if cfg.rotate is not None:
        raise checkpoints.ScalesError("scales of a rotated model (train.py --rotate) do not export: the rotated "
                               "export was behind QuaRot-RTN on every text and was retired (docs/deploy.md)")
    if not cfg.tied_wo and a.n_kv_heads != a.n_heads:
        raise checkpoints.ScalesError(f"the wo scales are not tied across the {a.n_heads // a.n_kv_heads} query heads "
                               "of each kv head (GQA), so they cannot fold into wv; train with --deployable")


@torch.no_grad()
def folded_state(model, quantizers) -> dict:
    """Meta-named tensors of the deployable model: int8 (fp8) codes, weight_scale (out, 1), input_scale (1,) = 1
    for every decoder linear; norm gains divided by the input scales; wv/w3 row scales divided by s_wo/s_w2."""
    sd = {k: v for k, v in model.state_dict().items() if not k.startswith("layers.")}
    for i, (layer, qs) in enumerate(zip(model.layers, quantizers)):
        p = f"layers.{i}."
        sd[p + "attention_norm.weight"] = layer.attention_norm.weight.float() / qs["attn"].scale()
        sd[p + "ffn_norm.weight"] = layer.ffn_norm.weight.float() / qs["ffn"].scale()
        # the producers of the wo and w2 inputs take their scales as per-row divisors
        # (wo's tied scale has one entry per kv channel, i.e. per row of wv)
        row_div = {"wv": qs["wo"].log_scale.exp(), "w3": qs["w2"].scale()}
        for sub, names, _ in sasq.POINTS.values():
            for n in names:
                linear = getattr(getattr(layer, sub), n)
                codes, sw = linear.folded_weight()     # exactly SASQ's codes of W * s
                name = f"{p}{sub}.{n}."
                if linear.linear.bias is not None:     # a bias follows its rows' divisor (wv: s_wo)
                    sd[name + "bias"] = linear.linear.bias.float() / torch.as_tensor(row_div.get(n, 1.0))
                if sw is None:      # float weights (wbits=None): the fold alone, W * s with rows / divisor
                    sd[name + "weight"] = codes / torch.as_tensor(row_div.get(n, 1.0))[..., None]
                    continue
                sd[name + "weight"] = codes.to(CODES[linear.wbits])
                sd[name + "weight_scale"] = (sw.float() / row_div.get(n, 1.0))[:, None]
                sd[name + "input_scale"] = torch.ones(1)
    return sd


def load_hf(folder, dtype=torch.float32):
    """Read an exported folder with transformers (+ compressed-tensors for the quantized ones)."""
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).eval()


# --------------------------------------------------------------------------- writing the folder

def save_tokenizer(tok, folder):
    """tokenizer.model (SentencePiece) or tokenizer.json (HF tokenizers, also the GGUF's BPE), plus its config."""
    b = tok.backend
    if hasattr(b, "serialized_model_proto"):
        with open(os.path.join(folder, "tokenizer.model"), "wb") as f:
            f.write(b.serialized_model_proto())
        cls, piece = "LlamaTokenizer", b.id_to_piece
    else:
        b.save(os.path.join(folder, "tokenizer.json"))
        cls, piece = "PreTrainedTokenizerFast", b.id_to_token
    cfg = {"tokenizer_class": cls, "add_bos_token": tok.add_bos, "add_eos_token": False,
           "bos_token": piece(tok.bos_id) if tok.bos_id is not None else None,
           "eos_token": piece(tok.eos_id) if tok.eos_id is not None else None}
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump(cfg, f, indent=1)


def write_folder(out, sd: dict, config: dict, tok, force=False):
    """config.json + safetensors shards (+ index) + tokenizer, written into a temporary folder of our own
    beside `out` (never a name the user may own) and renamed to `out` at the end. With force, an existing
    `out` is first renamed aside, then the new folder moved in, then the old one deleted: a kill at any point
    leaves one of them whole. An error or Ctrl-C while writing removes the temporary folder."""
    import tempfile
    if os.path.exists(out) and not force:
        raise data.DataError(f"{out} exists; pass --force to replace it or --out elsewhere")
    out = out.rstrip("/")
    parent, name = os.path.dirname(os.path.abspath(out)), os.path.basename(out)
    tmp = tempfile.mkdtemp(dir=parent, prefix=f".{name}.writing-")
    os.chmod(tmp, 0o777 & ~checkpoints.current_umask())         # mkdtemp makes 0700: readable as the umask says
    import signal
    from safetensors import SafetensorError
    # SIGTERM (a scheduler, `kill`) ends us like Ctrl-C does, so the temporary folder is removed too
    term = signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        shards, size = [[]], 0
        for k, v in sd.items():
            if size and size + v.nbytes > SHARD_BYTES:
                shards.append([])
                size = 0
            shards[-1].append(k)
            size += v.nbytes
        names = ["model.safetensors"] if len(shards) == 1 else \
            [f"model-{j + 1:05d}-of-{len(shards):05d}.safetensors" for j in range(len(shards))]
        for shard, keys in zip(names, shards):
            checkpoints.save_safetensors({k: sd[k] for k in keys}, os.path.join(tmp, shard), {"format": "pt"})
        if len(shards) > 1:
            index = {"metadata": {"total_size": sum(v.nbytes for v in sd.values())},
                     "weight_map": {k: n for n, keys in zip(names, shards) for k in keys}}
            with open(os.path.join(tmp, "model.safetensors.index.json"), "w") as f:
                json.dump(index, f, indent=1)
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(config, f, indent=1)
        save_tokenizer(tok, tmp)
    except (OSError, SafetensorError) as e:     # a full disk: the folder named, nothing left behind
        shutil.rmtree(tmp, ignore_errors=True)
        raise OSError(f"--out {out}: cannot write the folder ({' '.join(str(e).split())[:120]}); "
                      "nothing was left behind") from None
    except BaseException:           # Ctrl-C, SIGTERM: nothing half-written stays behind
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        signal.signal(signal.SIGTERM, term)
    aside = None
    if os.path.lexists(out):
        aside = tempfile.mkdtemp(dir=parent, prefix=f".{name}.old-")
        os.replace(out, os.path.join(aside, name))
    os.replace(tmp, out)
    if aside:
        shutil.rmtree(aside)


def export(model, tok, out, quantizers=None, dtype=torch.bfloat16, force=False, kv=None):
    """Write `model` (with SASQ quantizers attached: the folded static W8A8 model) as an HF folder; `kv`:
    static KV-cache quantizers (kvquant.py), written as compressed-tensors' kv_cache_scheme."""
    a = model.args
    if quantizers is None:
        sd = {k: v for k, v in model.state_dict().items()}
    else:
        sd = folded_state(model, quantizers)
    if a.tie_embeddings:
        sd.pop("output.weight", None)
    # float weights and norm gains in the model dtype; int8 / fp8 codes and the fp32 scales stay as they are
    keep = lambda k, v: k.endswith("_scale") or v.dtype in CODES.values() or not v.is_floating_point()  # noqa: E731
    sd = {k: v if keep(k, v) else v.to(dtype) for k, v in sd.items()}
    config = hf_config(a, tok, dtype)
    hf = to_hf(sd, a)
    if quantizers is not None:
        config["quantization_config"] = quantization_config(sasq.quant_linears(model)[0].wbits)
        if kv is not None:
            config["quantization_config"]["kv_cache_scheme"] = kvquant.kv_cache_scheme(kvquant.config(kv))
            hf.update(kvquant.export_tensors(kv))
    write_folder(out, {k: v.cpu() for k, v in hf.items()}, config, tok, force)


# --------------------------------------------------------------------------- command line

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", default=None, help=f"checkpoint (default: {checkpoints.DEFAULT_CKPT}, the embedded GGUF)")
    p.add_argument("--scales", default=None, help="SASQ scales from train.py --deployable; without them the "
                   "plain float model is written")
    p.add_argument("--out", required=True, help="the Hugging Face folder to write")
    p.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default="bfloat16",
                   help="dtype of the float tensors (weights of the plain model, embeddings, norms)")
    p.add_argument("--force", action="store_true", help="replace --out if it exists")
    p.add_argument("--debug", action="store_true", help="show the full traceback on errors")
    a = p.parse_args(argv)
    if a.scales and os.path.isdir(a.scales):
        p.exit(2, f"{p.prog}: error: --scales {a.scales} is a folder; give the scales file train.py wrote\n")
    cli.check_args(p, a)
    if os.path.exists(a.out) and not a.force:
        p.exit(2, f"{p.prog}: error: --out {a.out} exists; pass --force to replace it\n")
    parent = os.path.dirname(os.path.abspath(a.out.rstrip("/")))
    if not (os.path.isdir(parent) and os.access(parent, os.W_OK)):
        p.exit(2, f"{p.prog}: error: --out {a.out}: cannot write in {parent}\n")
    return a


def main(argv=None):
    a = parse_args(argv)
    dtype = getattr(torch, a.dtype)
    # the int8 codes are those of W * s: W in the precision the scales were trained with (train.py records it;
    # bf16 weights give other codes than fp32 ones, 2.3 % of them for SmolLM2), whatever --dtype the floats get
    trained = json.loads(checkpoints.read_scales_meta(a.scales)[0].get("extra", "{}")).get("dtype") if a.scales else None
    kv_cfg = kvquant.read_config(a.scales) if a.scales else None
    if kv_cfg is not None:                       # before loading: engines take 8-bit per-tensor KV scales only
        kvquant.kv_cache_scheme(kv_cfg)
    model, tok = checkpoints.load_model(a.ckpt, "cpu", getattr(torch, trained) if trained else dtype)
    if a.scales and not trained:
        print(f"{a.scales} does not record the weights' precision it was trained in: codes from {a.dtype} weights")
    quantizers = kv = None
    if a.scales:
        cfg = checkpoints.read_scales_config(a.scales)
        check_foldable(cfg, model.args)          # before attaching: one line, nothing written
        quantizers, _ = checkpoints.load_scales(a.scales, model)
        kv, _ = kvquant.load(a.scales, model, quantizers)
    export(model, tok, a.out, quantizers, dtype, a.force, kv)
    fp8 = a.scales and checkpoints.read_scales_config(a.scales).wbits == "fp8"
    kind = (f"SASQ static {'FP8' if fp8 else 'W8A8'}" + (f" + static KV{kv_cfg['bits']} {kv_cfg['format']}" if kv_cfg else "") +
            " (compressed-tensors)") if a.scales else f"plain {a.dtype}"
    print(f"wrote {kind} Hugging Face folder {a.out}")


if __name__ == "__main__":
    cli.run_main(main)
