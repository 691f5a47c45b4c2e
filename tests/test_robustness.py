"""Bad input gives one clear line and a non-zero exit; interrupted or failing training loses nothing."""
import hashlib
import os
import signal
import subprocess
import sys

import pytest
import torch

import checkpoints
import cli
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
    gpt2 = d / "gpt2"
    gpt2.mkdir()
    (gpt2 / "config.json").write_text('{"n_embd": 768, "n_layer": 12, "n_head": 12, "vocab_size": 50257}')
    (gpt2 / "model.safetensors").write_bytes(b"\x02\x00\x00\x00\x00\x00\x00\x00{}")
    badjson = d / "badjson"
    badjson.mkdir()
    (badjson / "config.json").write_text('{"hidden_size": 32,')
    (badjson / "model.safetensors").write_bytes(b"\x02\x00\x00\x00\x00\x00\x00\x00{}")
    listpth = d / "listpth"
    write_meta(listpth, random_meta_state())
    torch.save([1, 2, 3], listpth / "consolidated.00.pth")
    (d / "latin1.txt").write_bytes("caf\xe9 ".encode("latin-1") * 100)
    (d / "garbage.safetensors.state.pt").write_bytes(b"not a torch file")
    (d / "adir").mkdir()
    import gguf
    w = gguf.GGUFWriter(str(d / "nofields.gguf"), "llama")
    w.add_tensor("token_embd.weight", torch.zeros(8, 4).numpy())
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    m, _ = checkpoints.load_model(str(d / "other"))
    qs = sasq.attach(m, sasq.QuantConfig())
    checkpoints.save_scales(d / "other.safetensors", m, qs, sasq.QuantConfig())
    return d


def snapshot(folder):
    """Every file under `folder` with the hash of its bytes."""
    out = {}
    for root, _, names in os.walk(folder):
        for n in names:
            p = os.path.join(root, n)
            out[p] = hashlib.sha256(open(p, "rb").read()).hexdigest()
    return out


def cases(d):
    tiny, text = str(d / "tiny"), str(d / "text.txt")
    ev = ["eval.py", "--ckpt", tiny, "--test", text, "--seq-len", "64"]
    TR = ["train.py", "--ckpt", tiny, "--calib", text, "--seq-len", "64", "--out", str(d / "t.safetensors")]
    return {  # name: (argv, exit status, words the message must contain)
        "missing checkpoint": (["eval.py", "--ckpt", str(d / "nope")], 1, "no such file"),
        "folder without checkpoint": (["eval.py", "--ckpt", str(d / "empty")], 1, "no checkpoint found"),
        "config disagrees with weights": (["eval.py", "--ckpt", str(d / "wrongcfg")], 1, "do not match"),
        "truncated safetensors": (["eval.py", "--ckpt", str(d / "trunc")], 1, "cannot read"),
        "scales of another model": (ev + ["--scales", str(d / "other.safetensors")], 1, "another model"),
        "corrupt scales": (ev + ["--scales", str(d / "corrupt.safetensors")], 1, "not a readable scales"),
        "missing scales": (ev + ["--scales", str(d / "none.safetensors")], 2, "no such file"),
        "dataset path": (["eval.py", "--ckpt", tiny, "--test", f"{d}/nodata:x:test"], 2, "no such file or folder"),
        "dataset config": (["eval.py", "--ckpt", tiny, "--test", f"{WIKITEXT}:nope:test"], 2, "no config 'nope'"),
        "dataset split": (["eval.py", "--ckpt", tiny, "--test", f"{WIKITEXT}:wikitext-2-v1:train"], 2,
                          "no split 'train'"),
        "calib misspelled": (TR[:4] + [str(d / "txet.txt")], 2, "txet.txt: no such file"),
        "seq-len too long": (["eval.py", "--ckpt", tiny, "--test", text, "--seq-len", "9999"], 1, "exceeds"),
        "seq-len below 2": (["eval.py", "--ckpt", tiny, "--seq-len", "1"], 2, "at least 2"),
        "text too short": (["eval.py", "--ckpt", tiny, "--test", str(d / "short.txt")], 1, "fewer than one window"),
        "cuda without gpu": (["train.py", "--ckpt", tiny, "--device", "cuda"], 2, "no CUDA GPU"),
        "bits out of range": (["train.py", "--ckpt", tiny, "--abits", "9"], 2, "2..8"),
        "unknown mode": (ev + ["--modes", "fp,int3"], 1, "unknown mode"),
        "steps 0": (TR + ["--steps", "0"], 2, "--steps must be at least 1"),
        "steps negative": (TR + ["--steps", "-2"], 2, "--steps must be at least 1"),
        "batch negative": (TR + ["--batch-size", "-1"], 2, "--batch-size must be at least 1"),
        "calib-windows 0": (TR + ["--calib-windows", "0"], 2, "--calib-windows must be at least 1"),
        "heldout 0": (TR + ["--heldout", "0"], 2, "--heldout must be at least 1"),
        "lr 0": (TR + ["--lr", "0"], 2, "--lr must be a positive number"),
        "trunc-mult 0": (TR + ["--trunc-mult", "0"], 2, "--trunc-mult must be a positive number"),
        "device bogus": (TR + ["--device", "bogus"], 2, "not a device"),
        "device mps": (TR + ["--device", "mps"], 2, "only cpu and cuda"),
        "out in missing folder": (TR[:-1] + [str(d / "nope" / "s.safetensors")], 2, "does not exist"),
        "out a directory": (TR[:-1] + [str(d / "adir"), "--force"], 2, "is a directory"),
        "garbage state": (TR[:-1] + [str(d / "garbage.safetensors"), "--resume"], 1, "not a readable training state"),
        "gpt2 config": (["eval.py", "--ckpt", str(d / "gpt2")], 1, "not a LLaMA config"),
        "config not json": (["eval.py", "--ckpt", str(d / "badjson")], 1, "config.json: cannot read it as JSON"),
        "meta pth holds a list": (["eval.py", "--ckpt", str(d / "listpth")], 1, "not a Meta LLaMA checkpoint"),
        "gguf without fields": (["eval.py", "--ckpt", str(d / "nofields.gguf")], 1, "not a LLaMA config"),
        "text not utf-8": (ev[:4] + [str(d / "latin1.txt"), "--seq-len", "64"], 1, "latin1.txt: not UTF-8"),
        "eval limit 0": (ev + ["--limit", "0"], 2, "--limit must be at least 1"),
        "plot windows 0": (["plot_activations.py", "--ckpt", tiny, "--windows", "0"], 2, "--windows must be at least 1"),
        "bench reps 0": (["-m", "extras.bench", "--tiny", "--reps", "0"], 2, "--reps must be at least 1"),
    }


@pytest.mark.parametrize("name", list(cases(ROOT).keys()))
def test_bad_input_one_line_no_traceback(files, name, capsys):
    if name == "cuda without gpu" and torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    argv, status, words = cases(files)[name]
    before = snapshot(files)
    code, stderr = in_process(argv, capsys)
    err = [line for line in stderr.splitlines() if line.strip() and "examples/s" not in line]
    assert code == status, stderr
    assert len(err) == 1 and words in err[0], stderr
    assert snapshot(files) == before          # nothing created, changed or removed


def in_process(argv, capsys):
    """A command run as cli.run_main runs it, in this process (a subprocess costs a second of imports):
    (exit status, stderr). An exception run_main would not turn into one line fails the test."""
    import importlib
    module = argv[1] if argv[0] == "-m" else argv[0].removesuffix(".py")
    main, args = importlib.import_module(module).main, argv[2 if argv[0] == "-m" else 1:]
    capsys.readouterr()
    try:
        main(args)
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
        if isinstance(e.code, str):
            print(e.code, file=sys.stderr)
    except cli.USER_ERRORS as e:
        code = 1
        print(f"error: {e}", file=sys.stderr)
    return code, capsys.readouterr().err


def test_train_refuses_to_overwrite(files, tmp_path):
    out = tmp_path / "s.safetensors"
    out.write_bytes(b"precious")
    r = subprocess.run([sys.executable, "train.py", "--ckpt", str(files / "tiny"), "--calib", str(files / "text.txt"),
                        "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "--force" in r.stderr and out.read_bytes() == b"precious"


def _setup(tiny_model):
    torch.manual_seed(0)
    wins = torch.randint(0, 64, (8, 17))
    qs = sasq.attach(tiny_model, sasq.QuantConfig(abits=4))
    sasq.calibrate(tiny_model, qs, wins, batch_size=4, progress=False)
    return qs, wins, {k: v.clone() for k, v in qs.state_dict().items()}


def test_interrupt_and_resume_equals_straight_run(tiny_model, tmp_path):
    qs, wins, init = _setup(tiny_model)
    kw = dict(steps=10, batch_size=2, lr=2e-2)
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
    with pytest.raises(cli.Stopped, match="SIGINT after step 5"):
        train.train_scales(tiny_model, qs, wins, harness=cli.Harness(state, progress=False), **kw)
    tiny_model.forward = forward
    qs.load_state_dict(init)                           # a fresh process would start from the PTQ init
    train.train_scales(tiny_model, qs, wins, harness=cli.Harness(state, resume=True, progress=False), **kw)
    assert all(torch.equal(straight[k], v) for k, v in qs.state_dict().items())


def test_nan_loss_stops_and_keeps_previous_scales(tiny_model):
    qs, wins, init = _setup(tiny_model)
    forward, calls, before_step3 = tiny_model.forward, [0], {}

    def nan_at_step_3(*args, **kwargs):                # step 3 (0-based) is the 4th forward
        calls[0] += 1
        logits, loss = forward(*args, **kwargs)
        if calls[0] == 3:      # the scales step 2 computes its (finite) loss with: the last good ones
            before_step3.update({k: v.clone() for k, v in qs.state_dict().items()})
        if calls[0] == 4:      # the scales of step 3 give NaN: they are not kept
            loss = loss * float("nan")
        return logits, loss
    tiny_model.forward = nan_at_step_3
    with pytest.raises(cli.NonFinite, match="non-finite loss or scale at step 3; kept the scales of step 2"):
        train.train_scales(tiny_model, qs, wins, steps=8, batch_size=2, lr=2e-2)
    tiny_model.forward = forward
    kept = qs.state_dict()
    assert all(torch.equal(before_step3[k], kept[k]) for k in kept)
    assert any(not torch.equal(init[k], kept[k]) for k in kept)      # it did train for three steps


def test_exploding_lr_keeps_sane_scales(tiny_model):
    """--lr 1e9: log-scales of +-1e9 are finite numbers but e^(1e9) is not a scale; they must not be kept."""
    qs, wins, init = _setup(tiny_model)
    with pytest.raises(cli.NonFinite) as e:
        train.train_scales(tiny_model, qs, wins, steps=5, batch_size=2, lr=1e9)
    assert e.value.kept is not None
    assert all(v.abs().max() <= cli.LOG_LIMIT for v in qs.state_dict().values())
    checkpoints.check_scales(qs.state_dict())


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf"), 1e9])
def test_non_finite_scales_refused_on_save_and_load(tiny_model, tmp_path, bad):
    qs = sasq.attach(tiny_model, sasq.QuantConfig())
    with torch.no_grad():
        qs[0]["attn"].log_scale[3] = bad
    with pytest.raises(checkpoints.ScalesError, match="non-finite"):
        checkpoints.save_scales(tmp_path / "s.safetensors", tiny_model, qs, sasq.QuantConfig())
    assert not (tmp_path / "s.safetensors").exists()
    from safetensors.torch import save_file        # a file edited by hand after training
    good = tmp_path / "good.safetensors"
    with torch.no_grad():
        qs[0]["attn"].log_scale[3] = 0.0
    checkpoints.save_scales(good, tiny_model, qs, sasq.QuantConfig())
    from safetensors import safe_open
    with safe_open(good, "pt") as f:
        meta, t = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    t["0.attn.log_scale"][3] = bad
    save_file(t, tmp_path / "edited.safetensors", metadata=meta)
    sasq.detach(tiny_model)
    with pytest.raises(checkpoints.ScalesError, match="non-finite"):
        checkpoints.load_scales(tmp_path / "edited.safetensors", tiny_model)


def test_out_created_during_run_is_not_overwritten(tiny_model, tmp_path):
    qs = sasq.attach(tiny_model, sasq.QuantConfig())
    out = tmp_path / "s.safetensors"
    out.write_bytes(b"made by another run meanwhile")
    with pytest.raises(checkpoints.ScalesError, match="appeared while this run"):
        checkpoints.save_scales(out, tiny_model, qs, sasq.QuantConfig(), force=False)
    assert out.read_bytes() == b"made by another run meanwhile"


def test_resume_refuses_other_settings_and_finishes_a_done_state(tiny_model, tmp_path):
    qs, wins, init = _setup(tiny_model)
    state, run = str(tmp_path / "state.pt"), {"lr": 2e-2, "abits": 4}
    kw = dict(steps=4, batch_size=2, lr=2e-2)
    harness = lambda record, resume=False: cli.Harness(state, 4, resume, record, progress=False)  # noqa: E731
    train.train_scales(tiny_model, qs, wins, harness=harness(run), **kw)   # the state holds step 4 of 4
    straight = {k: v.clone() for k, v in qs.state_dict().items()}
    qs.load_state_dict(init)
    with pytest.raises(checkpoints.ScalesError, match=r"another run \(lr 0.02 -> 5"):
        train.train_scales(tiny_model, qs, wins, harness=harness({**run, "lr": 5}, True), **kw)
    h = harness(run, True)
    losses = train.train_scales(tiny_model, qs, wins, harness=h, **kw)
    assert h.first is None and len(losses) == 4
    assert all(torch.equal(straight[k], v) for k, v in qs.state_dict().items())


def test_json_rows_carry_the_scales_files_bits(files, tmp_path):
    import json
    m, _ = checkpoints.load_model(str(files / "tiny"))
    cfg = sasq.QuantConfig(abits=6)
    checkpoints.save_scales(tmp_path / "a6.safetensors", m, sasq.attach(m, cfg), cfg)
    r = subprocess.run([sys.executable, "eval.py", "--ckpt", str(files / "tiny"), "--test", str(files / "text.txt"),
                        "--seq-len", "64", "--limit", "1", "--modes", "fp,w8", "--scales", str(tmp_path / "a6.safetensors"),
                        "--json", str(tmp_path / "r.json")], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    rows = json.loads((tmp_path / "r.json").read_text())["rows"]
    assert [(x["wbits"], x["abits"]) for x in rows] == [(None, None), (8, None), (8, 6)]
