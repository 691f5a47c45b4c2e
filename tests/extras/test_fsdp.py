"""fsdp.py (train.py's recipe) under torchrun (FSDP2, gloo on the CPU, 2 processes) against one process with the same global
batch: the same calibration, the same first steps, rank 0 alone writes, and an interrupted run resumes to
the same result."""
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT, random_meta_state, write_meta


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("fsdp")
    write_meta(d / "tiny", random_meta_state())
    (d / "text.txt").write_text("A short line of text for a tiny model. " * 400)
    args = ["--ckpt", str(d / "tiny"), "--calib", str(d / "text.txt"), "--seq-len", "64", "--calib-windows", "8",
            "--heldout", "1", "--seed", "3", "--device", "cpu"]   # gloo, also on a GPU machine
    return d, args


def train(args, out, procs=1, batch=2, extra=(), wait=True, fsdp=False):
    cmd = [sys.executable, "train.py"] if procs == 1 and not fsdp else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={procs}", "-m", "extras.fsdp"]
    p = subprocess.Popen(cmd + args + ["--batch-size", str(batch), "--out", str(out), *extra], cwd=ROOT,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    if wait:
        o, e = p.communicate(timeout=120)
        assert p.returncode == 0, "\n".join([l for l in e.splitlines() if "rror" in l][:8] + [e[-1000:]])
        return o
    return p


def test_two_processes_calibrate_exactly_and_step_like_one(setup):
    d, args = setup
    # a learning rate of 1e-12 leaves the PTQ init: it must be bit-identical (here the mean init)
    train(args, d / "one.safetensors", extra=("--steps", "1", "--lr", "1e-12", "--init", "mean"))
    (d / "two").mkdir()
    out = train(args, d / "two" / "s.safetensors", procs=2, batch=1, extra=("--steps", "1", "--lr", "1e-12", "--init", "mean"))
    assert "global batch 2 x 1" in out and out.count("scales saved") == 1          # rank 1 prints nothing
    a, b = load_file(d / "one.safetensors"), load_file(d / "two" / "s.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert sorted(os.listdir(d / "two")) == ["s.safetensors"]                      # one writer, no leftovers
    # two training steps with the max init: equal to float rounding (later steps flip rounding codes, so
    # the two summation orders of the gradient drift apart by more)
    train(args, d / "one2.safetensors", extra=("--steps", "2"))
    train(args, d / "two2.safetensors", procs=2, batch=1, extra=("--steps", "2"))
    a, b = load_file(d / "one2.safetensors"), load_file(d / "two2.safetensors")
    assert all(torch.allclose(a[k], b[k], atol=1e-5, rtol=0) for k in a)
    assert any(not torch.equal(a[k], load_file(d / "one.safetensors")[k]) for k in a)   # they did train


def test_interrupted_two_process_run_resumes_to_the_same_scales(setup):
    d, args = setup
    steps = ("--steps", "12", "--save-every", "2")
    train(args, d / "straight.safetensors", procs=2, batch=1, extra=steps)
    out, state = d / "cut.safetensors", d / "cut.safetensors.state.pt"
    p = train(args, out, procs=2, batch=1, extra=steps, wait=False)
    t0 = time.time()
    while not state.exists() and p.poll() is None and time.time() - t0 < 60:
        time.sleep(0.01)
    os.killpg(p.pid, signal.SIGINT)                                               # Ctrl-C: every process
    _, err = p.communicate(timeout=60)
    assert p.returncode != 0 and "stopped:" in err and state.exists() and not out.exists(), err[-2000:]
    train(args, out, procs=2, batch=1, extra=(*steps, "--resume"))
    a, b = load_file(d / "straight.safetensors"), load_file(out)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not state.exists()


def test_self_written_text_comes_from_the_sharded_model(setup):
    """--calib self:N under torchrun: written by the sharded model. One process writes train.py's text (the
    same scales, bit for bit); two write a share each (rank 1 with its own seed) and train on them."""
    d, args = setup
    extra = ("--calib", "self:3", "--steps", "1", "--lr", "1e-12", "--init", "mean")
    train(args, d / "self-one.safetensors", extra=extra)
    train(args, d / "self-fsdp1.safetensors", fsdp=True, extra=extra)
    a, b = load_file(d / "self-one.safetensors"), load_file(d / "self-fsdp1.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    out = train(args, d / "self-two.safetensors", procs=2, batch=1, extra=extra)
    assert "global batch 2 x 1" in out and out.count("scales saved") == 1
    c = load_file(d / "self-two.safetensors")
    assert c.keys() == a.keys() and any(not torch.equal(a[k], c[k]) for k in a)   # rank 1 wrote other text
