"""SASQ's pieces against their formulas, and its contract: only scales train, weights never change."""
import pytest
import torch

import checkpoints
import data
import sasq
import train
from conftest import CALIB_SPEC, TEST_SPEC


def formula(x, s, bits):
    return torch.clamp(torch.round(x / s), -2 ** (bits - 1), 2 ** (bits - 1) - 1)


@pytest.mark.parametrize("bits", [2, 4, 6, 8])
def test_fake_quant_equals_formula(bits):
    x = torch.randn(3, 5, 16) * 3
    cfg = sasq.QuantConfig(abits=bits, truncation=False)
    static = sasq.ActQuantizer(16, cfg, norm_input=False)
    with torch.no_grad():
        static.log_scale.copy_(torch.rand(16).add(0.05).log())
    q, s = static(x)
    torch.testing.assert_close(q, formula(x, static.log_scale.exp(), bits), atol=0, rtol=0)
    tensor = sasq.ActQuantizer(16, sasq.QuantConfig(abits=bits, per_channel=False), norm_input=False)
    q, s = tensor(x)
    assert s.shape == (1,)
    torch.testing.assert_close(q, formula(x, torch.ones(1), bits), atol=0, rtol=0)
    dyn = sasq.ActQuantizer(16, sasq.QuantConfig(abits=bits, act="dynamic"), norm_input=True)
    q, s = dyn(x)
    per_token = x.abs().amax(-1, keepdim=True) / (2 ** (bits - 1) - 1)
    torch.testing.assert_close(s, per_token, atol=0, rtol=0)
    torch.testing.assert_close(q, formula(x, per_token, bits), atol=0, rtol=0)


def test_ste_gradients_are_lsq():
    bits, s = 4, torch.tensor([0.5, 0.25])
    x = torch.tensor([[0.3, -0.2], [5.0, 0.1], [-7.0, -3.0], [1.26, 0.6]], requires_grad=True)
    log_s = s.log().requires_grad_(True)
    xhat = log_s.exp() * sasq.quantize(x, log_s.exp(), bits)
    xhat.sum().backward()
    v = x.detach() / s
    inside = (v >= -8) & (v <= 7)
    assert torch.equal(x.grad, inside.float())                       # d xhat / dx: the in-range mask
    lsq = torch.where(inside, torch.round(v) - v, torch.clamp(v, -8, 7))   # d xhat / ds (LSQ)
    torch.testing.assert_close(log_s.grad, (lsq * s).sum(0))         # chain rule through log s


def test_folded_linear_is_an_integer_gemm():
    torch.manual_seed(0)
    lin = torch.nn.Linear(24, 8, bias=False)
    act = sasq.ActQuantizer(24, sasq.QuantConfig(), norm_input=False)
    with torch.no_grad():
        act.log_scale.copy_((torch.rand(24) * 0.05 + 0.01).log())
    ql = sasq.QuantLinear(lin, act, wbits=8)
    x = torch.randn(5, 24)
    y = ql(x)
    s = act.log_scale.exp().double()
    xq = torch.clamp(torch.round(x.double() / s), -128, 127).long()               # int8 activation codes
    w = lin.weight.double() * s                                                     # W * s
    sw = w.abs().amax(1) / 127
    wq = torch.round(w / sw[:, None]).long()                                        # int8 weight codes
    assert xq.abs().max() <= 128 and wq.abs().max() <= 127
    ref = (xq @ wq.T).double() * sw                                                 # int32 GEMM, column scales
    torch.testing.assert_close(y.double(), ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(y, lin(x), atol=0.1, rtol=0.1)                       # and it is a close copy


def test_training_changes_only_scales(tiny_model):
    torch.manual_seed(0)
    with torch.no_grad():
        tiny_model.output.weight.mul_(8)    # sharp logits, so the activation rounding matters to the loss
    wins = torch.randint(0, 64, (8, 33))
    before = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    qs = sasq.attach(tiny_model, sasq.QuantConfig(abits=3))
    sasq.calibrate(tiny_model, qs, wins, batch_size=4, progress=False)
    init = {k: v.clone() for k, v in qs.state_dict().items()}
    loss0 = tiny_model(wins[:, :-1], wins[:, 1:])[1].item()
    losses = train.train_scales(tiny_model, qs, wins, steps=60, batch_size=8, lr=5e-2)
    assert len(losses) == 60 and all(isinstance(v, float) for v in losses)
    loss1 = tiny_model(wins[:, :-1], wins[:, 1:])[1].item()
    assert loss1 < loss0 - 0.05, (loss0, loss1)
    assert any(not torch.equal(init[k], v) for k, v in qs.state_dict().items())
    sasq.detach(tiny_model)
    after = tiny_model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.grad is None for p in tiny_model.parameters())


def test_headroom_widens_the_trained_w2_scales_only(tmp_path, capsys):
    """train.py --headroom F: the same run's saved scales, the w2 inputs' x F, every other one equal."""
    from conftest import random_meta_state, write_meta
    write_meta(tmp_path / "tiny", random_meta_state())
    (tmp_path / "text.txt").write_text("A short line of text for a tiny model. " * 200)
    runs = {}
    for f in ("1", "1.5"):
        out = str(tmp_path / f"s{f}.safetensors")
        train.main(["--ckpt", str(tmp_path / "tiny"), "--calib", str(tmp_path / "text.txt"),
                    "--deployable", "--headroom", f, "--steps", "2", "--batch-size", "2",
                    "--calib-windows", "2", "--heldout", "1", "--seq-len", "64", "--out", out])
        runs[f] = checkpoints.read_scales(out)
    assert runs["1.5"][2].headroom == 1.5 and runs["1"][2].headroom == 1.0
    one, wide = runs["1"][1], runs["1.5"][1]
    assert one.keys() == wide.keys() and any(k.endswith("w2.log_scale") for k in one)
    for k in one:
        factor = 1.5 if k.endswith("w2.log_scale") else 1.0
        torch.testing.assert_close(wide[k].exp(), one[k].exp() * factor)
    for bad, msg in (("0.5", "must be at least 1"), ("nan", "must be a positive number")):
        with pytest.raises(SystemExit) as e:
            train.parse_args(["--headroom", bad, "--out", str(tmp_path / "x.safetensors")])
        assert e.value.code == 2 and f"--headroom {msg}" in capsys.readouterr().err


def test_save_load_round_trip_and_wrong_model(tiny_model, tmp_path):
    import model
    x = torch.randint(0, 64, (2, 16))
    qs = sasq.attach(tiny_model, sasq.QuantConfig(abits=6))
    sasq.calibrate(tiny_model, qs, torch.randint(0, 64, (4, 16)), progress=False)
    ref = tiny_model(x)[0]
    checkpoints.save_scales(tmp_path / "s.safetensors", tiny_model, qs, sasq.QuantConfig(abits=6))
    sasq.detach(tiny_model)
    _, cfg = checkpoints.load_scales(tmp_path / "s.safetensors", tiny_model)
    assert cfg.abits == 6
    torch.testing.assert_close(tiny_model(x)[0], ref, atol=0, rtol=0)
    torch.manual_seed(1)
    other = model.Transformer(tiny_model.args)
    with pytest.raises(checkpoints.ScalesError, match="another model"):
        checkpoints.load_scales(tmp_path / "s.safetensors", other)
    (tmp_path / "bad.safetensors").write_bytes(b"garbage")
    with pytest.raises(checkpoints.ScalesError, match="not a readable"):
        checkpoints.load_scales(tmp_path / "bad.safetensors", other)


def test_smollm2_static_per_tensor_collapses_per_channel_does_not(smollm):
    """The paper's starting point on a real model: one static scale per tensor is far off, per-channel is not."""
    m, tok = smollm
    test = data.token_windows(tok, TEST_SPEC, 1024, limit=1)      # fp 14.1, tensor 1.84x, channel 1.27x
    cal = data.token_windows(tok, CALIB_SPEC, 512, limit=4)
    fp = data.perplexity(m, test, progress=False)
    ppl = {}
    for name, cfg, method in (("tensor", sasq.QuantConfig(per_channel=False, truncation=False), "max"),
                              ("channel", sasq.QuantConfig(truncation=False), "mean")):
        qs = sasq.attach(m, cfg)
        sasq.calibrate(m, qs, cal, batch_size=4, method=method, progress=False)
        sasq.freeze(m)
        ppl[name] = data.perplexity(m, test, progress=False)
        sasq.detach(m)
    assert ppl["tensor"] > 1.6 * fp and ppl["channel"] < 1.45 * fp, (fp, ppl)


def test_fingerprint_sees_a_merged_lora(tiny_model):
    """Every weight is sampled: a low-rank update of the projections alone changes the id."""
    before = checkpoints.fingerprint(tiny_model)
    with torch.no_grad():
        for layer in tiny_model.layers:
            w = layer.attention.wq.weight
            w += 1e-2 * torch.randn(w.shape[0], 2) @ torch.randn(2, w.shape[1])
    assert checkpoints.fingerprint(tiny_model) != before
