"""SmoothQuant and the rotation leave the float model's function unchanged; the Hadamards are orthogonal;
the baselines quantize by their formulas; --rotate scales belong to the rotated model only."""
import copy
import dataclasses
import json
import math

import pytest
import torch

from extras import baselines
import checkpoints
import data
import eval as evaluate
from extras import export
import model as llama
import sasq
import train
from conftest import random_meta_state, write_meta


def rand_gains(m, seed=0):
    """Non-trivial norm gains, so that folding them is tested."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.endswith("norm.weight"):
                p.mul_(1 + 0.5 * torch.rand(p.shape, generator=g))
    return m


@pytest.fixture
def tiny48():
    """dim 48 = 12 * 4, head_dim 12, FFN 96 = 12 * 8: every Hadamard needs the Paley factor of order 12."""
    torch.manual_seed(0)
    a = llama.ModelArgs(dim=48, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=64, hidden_dim=96, max_seq_len=64,
                        tie_embeddings=True)
    return rand_gains(llama.Transformer(a).eval().requires_grad_(False))


@pytest.mark.parametrize("q", [3, 11, 19, 27, 43, 71, 107, 343])
def test_paley_matrices_are_hadamard(q):
    H = baselines.paley(q)
    assert set(H.unique().tolist()) == {-1.0, 1.0}
    assert torch.equal(H @ H.T, (q + 1) * torch.eye(q + 1, dtype=torch.float64))


def test_hadamard_transform_is_orthogonal_at_llama_sizes():
    for n in (12, 64, 576, 1536):                    # dense: orthonormal, entries +-1/sqrt(n)
        H = baselines.hadamard(torch.eye(n, dtype=torch.float64))
        torch.testing.assert_close(H @ H.T, torch.eye(n, dtype=torch.float64), atol=1e-12, rtol=0)
        torch.testing.assert_close(H.abs(), torch.full_like(H, n ** -0.5), atol=1e-15, rtol=0)
    g = torch.Generator().manual_seed(0)
    for n, m in ((4096, 1), (11008, 344), (5120, 20), (13824, 108), (8192, 1), (28672, 28)):   # LLaMA-2 7B/13B/70B
        assert baselines.hadamard_order(n) == m
        x = torch.randn(6, n, dtype=torch.float64, generator=g)
        y = baselines.hadamard(x)                    # inner products kept: x H (x H).T = x x.T
        torch.testing.assert_close(y @ y.T, x @ x.T, atol=1e-9, rtol=1e-12)
    with pytest.raises(ValueError, match="no Hadamard"):
        baselines.hadamard_order(3 * 7)


@pytest.mark.parametrize("tied", [True, False])
def test_rotation_keeps_the_logits(tiny48, tied):
    m = tiny48
    if not tied:
        m.output = torch.nn.Linear(48, 64, bias=False).requires_grad_(False)
        m.args.tie_embeddings = False
    x = torch.randint(0, 64, (2, 24))
    ref = m(x)[0]
    baselines.rotate(m, seed=3)
    assert m.output is not None and not m.args.tie_embeddings
    assert not any(p.requires_grad for p in m.parameters())     # a frozen model stays frozen
    assert all(torch.equal(n.weight, torch.ones_like(n.weight)) for n in (m.norm, m.layers[0].ffn_norm))
    torch.testing.assert_close(m(x)[0], ref, atol=5e-5, rtol=1e-5)
    # the residual stream really is rotated: the embedding rows moved
    assert not torch.allclose(m.tok_embeddings.weight.abs().amax(0), m.tok_embeddings.weight.abs().amax(0)[0])


def test_smoothquant_keeps_the_logits_and_follows_its_formula(tiny48):
    m = tiny48
    m.layers[0].attention_norm.weight[5] = 30.0       # an outlier channel for the fold to move
    wins = torch.randint(0, 64, (4, 24))
    x = wins[:2]
    ref = m(x)[0]
    before = sasq.observe(m, wins, batch_size=2, progress=False)
    at = m.layers[0].attention
    w_before = torch.cat([at.wq.weight, at.wk.weight, at.wv.weight]).clone()
    g_before = m.layers[0].attention_norm.weight.clone()
    baselines.smooth(m, before, alpha=0.5)
    torch.testing.assert_close(m(x)[0], ref, atol=2e-5, rtol=1e-5)
    ax, aw = before[0]["attn"].amax(0).double(), w_before.abs().amax(0).double()
    s = (ax.sqrt() / aw.sqrt()).float()                                   # alpha = 0.5
    torch.testing.assert_close(m.layers[0].attention_norm.weight, g_before / s, rtol=1e-6, atol=0)
    torch.testing.assert_close(torch.cat([at.wq.weight, at.wk.weight, at.wv.weight]), w_before * s, rtol=1e-6, atol=0)
    after = sasq.observe(m, wins, batch_size=2, progress=False)          # the activations shrank by s
    torch.testing.assert_close(after[0]["attn"], before[0]["attn"] / s, rtol=1e-5, atol=1e-6)
    r = after[0]["attn"].amax(0)
    assert r.max() / r.median() < before[0]["attn"].amax(0).max() / before[0]["attn"].amax(0).median()


def test_quarot_rtn_quantizes_by_its_formula():
    """Dynamic per-token RTN with clip 0.9: codes = clamp(round(x / (0.9 * absmax / qmax))), y = codes @ Wq.T * sw * s."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(16, 8, bias=False)
    q = sasq.ActQuantizer(16, sasq.QuantConfig(abits=4, act="dynamic", clip=0.9), norm_input=False)
    ql = sasq.QuantLinear(lin, q, 8)
    x = torch.randn(3, 5, 16)
    s = 0.9 * x.abs().amax(-1, keepdim=True) / 7
    codes = torch.clamp(torch.round(x / s), -8, 7)
    sw = lin.weight.abs().amax(1) / 127
    ref = (codes @ torch.round(lin.weight / sw[:, None]).T) * sw * s
    torch.testing.assert_close(ql(x), ref, atol=1e-5, rtol=1e-5)
    assert (torch.round(x / s) > 7).any()         # the clip ratio does clip each token's largest entries


def test_smollm2_rotation_and_smoothing_keep_the_logits(smollm):
    m0, tok = smollm
    x = data.token_windows(tok, "hamlet", 128, limit=1)
    ref = m0(x)[0]
    rot = baselines.rotate(copy.deepcopy(m0))
    torch.testing.assert_close(rot(x)[0], ref, atol=2e-3, rtol=1e-3)    # 30 layers, fp32
    sm = copy.deepcopy(m0)
    baselines.smooth(sm, sasq.observe(sm, x, progress=False), alpha=0.8)
    torch.testing.assert_close(sm(x)[0], ref, atol=2e-3, rtol=1e-3)


def test_rotate_scales_belong_to_the_rotated_model(tmp_path):
    write_meta(tmp_path / "tiny", random_meta_state())
    (tmp_path / "text.txt").write_text("A short line of text for a tiny model. " * 200)
    out, ckpt, text = tmp_path / "rot.safetensors", str(tmp_path / "tiny"), str(tmp_path / "text.txt")
    train.main(["--ckpt", ckpt, "--calib", text, "--out", str(out), "--seq-len", "64", "--steps", "3",
                "--batch-size", "2", "--calib-windows", "2", "--heldout", "1", "--abits", "6", "--rotate",
                "--loss", "kl", "--seed", "5"])
    cfg = checkpoints.read_scales_config(out)
    assert cfg.rotate == 5 and cfg.abits == 6
    m, _ = checkpoints.load_model(ckpt)
    with pytest.raises(checkpoints.ScalesError, match="another model"):
        checkpoints.load_scales(out, m)                           # the unrotated model
    with pytest.raises(checkpoints.ScalesError, match="another model"):
        checkpoints.load_scales(out, baselines.rotate(copy.deepcopy(m), seed=6))     # other signs
    rot = baselines.rotate(m, seed=5)
    nudged = copy.deepcopy(rot)                     # float64 on a GPU rounds a few weights the other way
    with torch.no_grad():
        for p in nudged.parameters():
            p.copy_(torch.nextafter(p, torch.full_like(p, math.inf)))
    assert checkpoints.fingerprint(nudged) == checkpoints.fingerprint(rot) != checkpoints.fingerprint(nudged, raw=True)
    checkpoints.load_scales(out, nudged)
    checkpoints.load_scales(out, rot)
    with pytest.raises(checkpoints.ScalesError, match="rotated"):
        export.check_foldable(dataclasses.replace(cfg, abits=8, truncation=False, tied_wo=True), m.args)
    evaluate.main(["--ckpt", ckpt, "--test", text, "--seq-len", "64", "--limit", "2", "--modes", "fp,quarot",
                   "--scales", str(out), "--json", str(tmp_path / "r.json")])
    rows = json.loads((tmp_path / "r.json").read_text())["rows"]
    assert "rotation" in rows[2]["mode"] and "QuaRot" in rows[1]["mode"]
    assert all(r[text] < 1e5 for r in rows)


def test_kl_loss_is_zero_for_the_float_model_and_trains(tiny_model):
    x = torch.randint(0, 64, (4, 17))
    qs = sasq.attach(tiny_model, sasq.QuantConfig(abits=4))
    sasq.calibrate(tiny_model, qs, x, progress=False)
    with sasq.float_model(tiny_model):
        assert train.step_loss(tiny_model, x, "kl").abs().item() < 1e-6
    with torch.no_grad():
        k0 = train.step_loss(tiny_model, x, "kl").item()
    train.train_scales(tiny_model, qs, x, steps=20, batch_size=4, lr=5e-2, loss="kl")
    with torch.no_grad():
        k1 = train.step_loss(tiny_model, x, "kl").item()
    assert 0 < k1 < k0


@pytest.mark.parametrize("recipe", ["--deployable", "--fp8"])
def test_rotate_is_not_a_deployable_recipe(tmp_path, capsys, recipe):
    """The rotated export was retired (docs/deploy.md): --rotate with an exportable recipe is a usage error."""
    import train
    with pytest.raises(SystemExit) as e:
        train.parse_args([recipe, "--rotate", "--out", str(tmp_path / "s.safetensors")])
    assert e.value.code == 2 and "--rotate does not export" in capsys.readouterr().err
