"""plot_activations.py on a tiny random model saved in Meta layout: PNGs written, numbers that add up."""
import torch

import plot_activations
import sasq
from conftest import random_meta_state, write_meta


def test_plot_main_writes_pngs_and_true_stats(tmp_path, capsys):
    write_meta(tmp_path / "tiny", random_meta_state())
    text = tmp_path / "t.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 60)
    stats, acts, quantizers, paths = plot_activations.main(
        ["--ckpt", str(tmp_path / "tiny"), "--text", str(text), "--calib", str(text), "--seq-len", "64",
         "--layers", "0,1", "--points", "attn,w2", "--out", str(tmp_path / "png"), "--device", "cpu"])
    assert len(paths) == 2 * 2 + 1
    for p in paths:
        assert open(p, "rb").read(8) == b"\x89PNG\r\n\x1a\n" and len(open(p, "rb").read()) > 1000
    out = capsys.readouterr().out
    for (layer, point), st in stats.items():
        q, x = quantizers[layer][point], acts[layer, point]
        assert x.shape == (2 * 64, {"attn": 32, "w2": 96}[point])    # 2 windows x 64 tokens, channels
        # recompute from the captured activations with the formulas, independently of the script
        s, qm = q.log_scale.exp().detach(), 2 ** (q.bits - 1) - 1
        c = q.log_c.exp().detach() if q.log_c is not None else None
        t = (c * torch.tanh(x / c) if c is not None else x) / s
        clipped = ((t > qm) | (t < -qm - 1)).float().mean().item()
        xa = torch.clamp(torch.round(t), -qm - 1, qm) * s
        assert abs(st["clipped"] - clipped) < 1e-9
        assert abs(st["max_after"] - xa.abs().max().item()) < 1e-5
        assert abs(st["max_before"] - x.abs().max().item()) < 1e-6
        assert f"{layer:>5} {point:>5} {clipped:>9.3%}" in out
    assert isinstance(quantizers[0]["attn"], sasq.ActQuantizer)
