"""Bad input gives one clear line and a non-zero exit; interrupted or failing training loses nothing."""
import os
import signal
import subprocess
import sys

import pytest
import torch

import sasq
import train
from conftest import ROOT, WIKITEXT, random_meta_state, write_meta


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("bad")
    write_meta(d / "tiny", random_meta_state())
    write_meta(d / "other", random_meta_state(seed=1))
    (d / "text.txt").write_text("A short line of text for a tiny model. " * 200)
    (d / "short.txt").write_text("too short")
    (d / "empty").mkdir()
    write_meta(d / "wrongcfg", random_meta_state())
    (d / "wrongcfg" / "params.json").write_text('{"dim": 64, "n_layers": 2, "n_heads": 4, "multiple_of": 32}')
    trunc = d / "trunc"
    trunc.mkdir()
    (trunc / "config.json").write_text('{"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, '
                                       '"vocab_size": 32000, "intermediate_size": 96}')
    (trunc / "model.safetensors").write_bytes(b"\x40\x00\x00\x00\x00\x00\x00\x00{\"a\":")
    (d / "corrupt.safetensors").write_bytes(b"not a safetensors file")
    import model
    m, _ = model.load(str(d / "other"))
    qs = sasq.attach(m, sasq.QuantConfig())
    sasq.save(d / "other.safetensors", m, qs, sasq.QuantConfig())
    return d


def cases(d):
    tiny, text = str(d / "tiny"), str(d / "text.txt")
    ev = ["eval.py", "--ckpt", tiny, "--test", text, "--seq-len", "64"]
    return {  # name: (argv, exit status, words the message must contain)
        "missing checkpoint": (["eval.py", "--ckpt", str(d / "nope")], 1, "no such file"),
        "folder without checkpoint": (["eval.py", "--ckpt", str(d / "empty")], 1, "no checkpoint found"),
        "config disagrees with weights": (["eval.py", "--ckpt", str(d / "wrongcfg")], 1, "do not match"),
        "truncated safetensors": (["eval.py", "--ckpt", str(d / "trunc")], 1, "cannot read"),
        "scales of another model": (ev + ["--scales", str(d / "other.safetensors")], 1, "another model"),
        "corrupt scales": (ev + ["--scales", str(d / "corrupt.safetensors")], 1, "not a readable scales"),
        "missing scales": (ev + ["--scales", str(d / "none.safetensors")], 2, "no such file"),
        "dataset path": (["eval.py", "--ckpt", tiny, "--test", f"{d}/nodata:x:test"], 1, "cannot load dataset"),
        "dataset config": (["eval.py", "--ckpt", tiny, "--test", f"{WIKITEXT}:nope:test"], 1, "cannot load dataset"),
        "dataset split": (["eval.py", "--ckpt", tiny, "--test", f"{WIKITEXT}:wikitext-2-v1:train"], 1,
                          "cannot load dataset"),
        "seq-len too long": (["eval.py", "--ckpt", tiny, "--test", text, "--seq-len", "9999"], 1, "exceeds"),
        "seq-len below 2": (["eval.py", "--ckpt", tiny, "--seq-len", "1"], 2, "at least 2"),
        "text too short": (["eval.py", "--ckpt", tiny, "--test", str(d / "short.txt")], 1, "fewer than one window"),
        "cuda without gpu": (["train.py", "--ckpt", tiny, "--device", "cuda"], 2, "no CUDA GPU"),
        "bits out of range": (["train.py", "--ckpt", tiny, "--abits", "9"], 2, "2..8"),
        "unknown mode": (ev + ["--modes", "fp,int3"], 1, "unknown mode"),
    }


@pytest.mark.parametrize("name", list(cases(ROOT).keys()))
def test_bad_input_one_line_no_traceback(files, name):
    if name == "cuda without gpu" and torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    argv, status, words = cases(files)[name]
    before = sorted(os.listdir(files))
    r = subprocess.run([sys.executable, *argv], cwd=ROOT, capture_output=True, text=True, timeout=120)
    err = [line for line in r.stderr.splitlines() if line.strip() and "examples/s" not in line]
    assert r.returncode == status, r.stderr
    assert len(err) == 1 and words in err[0] and "Traceback" not in r.stderr, r.stderr
    assert sorted(os.listdir(files)) == before


def test_train_refuses_to_overwrite(files, tmp_path):
    out = tmp_path / "s.safetensors"
    out.write_bytes(b"precious")
    r = subprocess.run([sys.executable, "train.py", "--ckpt", str(files / "tiny"), "--calib", str(files / "text.txt"),
                        "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and "--force" in r.stderr and out.read_bytes() == b"precious"


def _setup(tiny_model):
    torch.manual_seed(0)
    wins = torch.randint(0, 64, (8, 17))
    qs = sasq.attach(tiny_model, sasq.QuantConfig(abits=4))
    sasq.calibrate(tiny_model, qs, wins, batch_size=4, progress=False)
    return qs, wins, {k: v.clone() for k, v in qs.state_dict().items()}


def test_interrupt_and_resume_equals_straight_run(tiny_model, tmp_path):
    qs, wins, init = _setup(tiny_model)
    kw = dict(steps=10, batch_size=2, lr=2e-2, progress=False)
    train.train_scales(tiny_model, qs, wins, **kw)
    straight = {k: v.clone() for k, v in qs.state_dict().items()}
    qs.load_state_dict(init)
    forward, calls = tiny_model.forward, [0]

    def forward_then_sigint(*args, **kwargs):          # a real SIGINT arrives during step 5
        calls[0] += 1
        if calls[0] == 5:
            os.kill(os.getpid(), signal.SIGINT)
        return forward(*args, **kwargs)
    tiny_model.forward = forward_then_sigint
    state = str(tmp_path / "state.pt")
    with pytest.raises(train.Stopped, match="SIGINT after step 5"):
        train.train_scales(tiny_model, qs, wins, state_path=state, **kw)
    tiny_model.forward = forward
    qs.load_state_dict(init)                           # a fresh process would start from the PTQ init
    train.train_scales(tiny_model, qs, wins, state_path=state, resume=True, **kw)
    assert all(torch.equal(straight[k], v) for k, v in qs.state_dict().items())


def test_nan_loss_stops_and_keeps_previous_scales(tiny_model):
    qs, wins, init = _setup(tiny_model)
    forward, calls, before_step3 = tiny_model.forward, [0], {}

    def nan_at_step_3(*args, **kwargs):                # step 3 (0-based) is the 4th forward
        calls[0] += 1
        logits, loss = forward(*args, **kwargs)
        if calls[0] == 4:
            before_step3.update({k: v.clone() for k, v in qs.state_dict().items()})   # = after step 2
            loss = loss * float("nan")
        return logits, loss
    tiny_model.forward = nan_at_step_3
    with pytest.raises(train.Stopped, match="non-finite loss or scale at step 3"):
        train.train_scales(tiny_model, qs, wins, steps=8, batch_size=2, lr=2e-2, progress=False)
    tiny_model.forward = forward
    kept = qs.state_dict()
    assert all(torch.equal(before_step3[k], kept[k]) for k in kept)
    assert any(not torch.equal(init[k], kept[k]) for k in kept)      # it did train for three steps
