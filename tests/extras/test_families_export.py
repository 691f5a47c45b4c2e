"""Llama 3.1 (scaled RoPE, tied head) and Qwen2 (q/k/v biases) through the whole path: train.py
--deployable -> extras.export -> transformers + compressed-tensors, equal to our fake-quant model; and
the INT8 layers (biases added after the GEMM) equal to fake-quant."""
import json

import pytest
import torch

import checkpoints
import data
import sasq
import train
from extras import export, int8
from test_families import LLAMA3, save_hf

FAMILIES = {"llama-3.1": ("LlamaConfig", {"rope_theta": 500000.0, "rope_scaling": LLAMA3,
                                          "tie_word_embeddings": True}),
            "qwen2": ("Qwen2Config", {"rope_theta": 1e6})}


@pytest.fixture(scope="module", params=list(FAMILIES))
def trained(request, tmp_path_factory):
    d = tmp_path_factory.mktemp(request.param)
    cls, options = FAMILIES[request.param]
    save_hf(d / "m", cls, **options)
    (d / "text.txt").write_text(data.load_text("comedies")[:60000])
    train.main(["--ckpt", str(d / "m"), "--calib", str(d / "text.txt"), "--deployable", "--steps", "3",
                "--seq-len", "96", "--batch-size", "2", "--calib-windows", "4", "--heldout", "2",
                "--out", str(d / "s.safetensors")])
    export.main(["--ckpt", str(d / "m"), "--scales", str(d / "s.safetensors"), "--out", str(d / "hf"),
                 "--dtype", "float32"])
    return d, request.param


def fake_quant(d):
    m, tok = checkpoints.load_model(str(d / "m"))
    checkpoints.load_scales(str(d / "s.safetensors"), m)
    sasq.freeze(m)
    return m, data.token_windows(tok, str(d / "text.txt"), 96, limit=6)


def test_export_equals_fake_quant_in_transformers(trained):
    d, family = trained
    config = json.loads((d / "hf" / "config.json").read_text())
    assert config["model_type"] == ("qwen2" if family == "qwen2" else "llama")
    assert config.get("rope_scaling", {}).get("rope_type") == ("llama3" if family != "qwen2" else None)
    m, wins = fake_quant(d)
    ours = data.perplexity(m, wins, progress=False)
    hf = export.load_hf(str(d / "hf"))
    theirs = data.perplexity(lambda x: (hf(x).logits,), wins, progress=False)
    assert abs(theirs - ours) / ours < 0.005, (ours, theirs)
    if family == "qwen2":                  # the wv bias was divided by the folded wo scale
        assert "model.layers.0.self_attn.v_proj.bias" in dict(hf.named_parameters())


def test_int8_layers_equal_fake_quant(trained):
    d, family = trained
    m, wins = fake_quant(d)
    with torch.no_grad():
        ref = m(wins[:2])[0]
        int8.convert(m)
        got = m(wins[:2])[0]
    assert isinstance(m.layers[0].attention.wv, int8.Int8Linear)
    assert (m.layers[0].attention.wv.bias is not None) == (family == "qwen2")
    torch.testing.assert_close(got, ref, atol=1e-3, rtol=1e-3)
