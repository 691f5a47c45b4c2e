"""The FP8 grid (float8-e4m3) in sasq: the same quantizer as the integer grid with another rounding, its
gradient LSQ's, the recipe's SmoothQuant-split init, and the command line that asks for it."""
import pytest
import torch

import sasq
import train

E4M3 = torch.float8_e4m3fn


def test_fp8_codes_are_e4m3_numbers_and_the_gradient_is_lsq():
    s = torch.tensor([0.5, 0.01])
    x = torch.tensor([[0.3, -0.2], [300.0, 0.001], [-7.0, -30.0], [1.26, 4.4]], requires_grad=True)
    log_s = s.log().requires_grad_(True)
    q = sasq.quantize(x, log_s.exp(), "fp8")
    v = x.detach() / s
    want = v.clamp(-448, 448).to(E4M3).float()
    assert torch.equal(q.detach(), want)
    assert torch.equal(q.detach().to(E4M3).float(), q.detach())          # every code is an e4m3 number
    assert q.detach().abs().max() == 448 and bool((q[1] != torch.round(v[1])).any())   # not integers
    (log_s.exp() * q).sum().backward()
    inside = v.abs() <= 448
    assert torch.equal(x.grad, inside.float())
    lsq = torch.where(inside, want - v, v.clamp(-448, 448))           # d xhat / ds, as the int grid's
    torch.testing.assert_close(log_s.grad, (lsq * s).sum(0))
    assert sasq.qmax("fp8") == 448 and sasq.qmax(8) == 127


def test_fp8_weights_and_dynamic_scales():
    w = torch.randn(6, 10)
    codes, sw = sasq.quantize_weight(w, "fp8")
    torch.testing.assert_close(sw, w.abs().amax(1) / 448)
    assert torch.equal(codes, (w / sw[:, None]).to(E4M3).float()) and codes.abs().max() == 448
    x = torch.randn(3, 10)
    dyn = sasq.ActQuantizer(10, sasq.QuantConfig(wbits="fp8", abits="fp8", act="dynamic"), False)
    q, s = dyn(x)
    torch.testing.assert_close(s, x.abs().amax(-1, keepdim=True) / 448)
    with pytest.raises(ValueError, match="fp8"):
        sasq.QuantConfig(abits="fp4")


def test_smooth_splits_the_ptq_scales_as_smoothquant(tiny_model):
    """alpha = 1 is the PTQ max itself; alpha = 0.5 gives s_j ~ sqrt(a_j / w_j), the largest a_j / s_j on
    448; the tied wo scale (GQA) takes the max over a kv channel's query heads."""
    m = tiny_model
    wins = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(0))
    qs = sasq.attach(m, sasq.RECIPES["fp8"])
    sasq.calibrate(m, qs, wins, progress=False)
    ptq = {(i, p): q.log_scale.exp().clone() for i, l in enumerate(qs) for p, q in l.items()}
    sasq.smooth(m, qs, 1.0)
    for (i, p), s in ptq.items():
        torch.testing.assert_close(qs[i][p].log_scale.exp(), s)
    sasq.smooth(m, qs, 0.5)
    for i, layer in enumerate(m.layers):
        for p, (sub, names, _) in sasq.POINTS.items():
            a = ptq[i, p] * 448
            w = torch.stack([getattr(getattr(layer, sub), n).linear.weight.abs().amax(0) for n in names]).amax(0)
            if p == "wo":                                     # (n_kv, n_rep, hd) -> max over the query heads
                w = w.view(2, 2, 8).amax(1).flatten()
            s = qs[i][p].log_scale.exp()
            torch.testing.assert_close((a / s).max(), torch.tensor(448.0))
            ratio = s / (a.sqrt() / w.sqrt())
            torch.testing.assert_close(ratio, ratio[0].expand_as(ratio))


def test_fp8_recipe_command_line(tmp_path, capsys):
    out = str(tmp_path / "s.safetensors")
    a = train.parse_args(["--fp8", "--out", out])
    cfg = train.quant_config(a)
    assert (cfg.wbits, cfg.abits, cfg.smooth, cfg.tied_wo, cfg.truncation) == ("fp8", "fp8", 0.5, True, False)
    assert train.quant_config(train.parse_args(["--fp8", "--alpha", "0.8", "--out", out])).smooth == 0.8
    assert train.quant_config(train.parse_args(["--deployable", "--out", out])).smooth is None
    assert train.quant_config(train.parse_args(["--abits", "fp8", "--out", out])).abits == "fp8"
    for bad, msg in ((["--fp8", "--abits", "6"], "--fp8 sets"), (["--alpha", "1.5"], "--alpha must be"),
                     (["--abits", "9"], "2..8 or fp8"), (["--wbits", "fp4"], "invalid grid value")):
        with pytest.raises(SystemExit) as e:
            train.parse_args(bad + ["--out", out])
        assert e.value.code == 2 and msg in capsys.readouterr().err


def test_fp8_run_saves_an_fp8_scales_file(tmp_path):
    """train.py --fp8 end to end on a tiny checkpoint: the file says FP8 and the SmoothQuant init."""
    import checkpoints
    from conftest import random_meta_state, write_meta
    write_meta(tmp_path / "tiny", random_meta_state())
    (tmp_path / "text.txt").write_text("A short line of text for a tiny model. " * 200)
    out = str(tmp_path / "s.safetensors")
    train.main(["--ckpt", str(tmp_path / "tiny"), "--calib", str(tmp_path / "text.txt"), "--fp8", "--steps", "2",
                "--batch-size", "2", "--calib-windows", "2", "--heldout", "1", "--seq-len", "64", "--out", out])
    cfg = checkpoints.read_scales_config(out)
    assert (cfg.wbits, cfg.abits, cfg.smooth) == ("fp8", "fp8", 0.5)
