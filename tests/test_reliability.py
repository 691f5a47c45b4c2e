"""The reliability probes' defects, each reproduced: no finished result lost to a late check, nothing of the user's
overwritten or removed, files readable by others, bad input answered in one line before any loading."""
import json
import os
import stat
import subprocess
import sys

import pytest
import torch


import checkpoints
import sasq
import train
from conftest import ROOT, random_meta_state, write_meta


@pytest.fixture(scope="module")
def d(tmp_path_factory):
    d = tmp_path_factory.mktemp("rel")
    write_meta(d / "tiny", random_meta_state())
    write_meta(d / "other", random_meta_state(seed=1))
    (d / "text.txt").write_text("A short line of text for a tiny model. " * 200)
    (d / "blank.txt").write_text(" \n\t\n" * 500)
    (d / "nul.txt").write_text("\x00" * 2000)
    m, _ = checkpoints.load_model(str(d / "other"))
    checkpoints.save_scales(d / "other.safetensors", m, sasq.attach(m, sasq.QuantConfig()), sasq.QuantConfig())
    return d


def cli(*args, timeout=180):
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def usage_error(main, args, capsys, text):
    """In-process: a usage error is one line on stderr and exit status 2, before anything loads."""
    with pytest.raises(SystemExit) as e:
        main(args)
    err = capsys.readouterr().err
    assert e.value.code == 2 and text in err and len(err.strip().splitlines()) <= 2, err   # usage + error line
    return err


def one_line(r, code, text):
    err = r.stderr.strip().splitlines()
    assert r.returncode == code and text in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]
    return err[-1]


def test_final_save_failing_keeps_the_state_and_resume_writes_it(d, monkeypatch, capsys):
    """#1: a full disk at the final save: one line, the state is on disk, --resume writes the scales."""
    out = d / "final.safetensors"
    argv = ["--ckpt", str(d / "tiny"), "--calib", str(d / "text.txt"), "--seq-len", "64", "--steps", "3",
            "--batch-size", "2", "--calib-windows", "2", "--heldout", "1", "--save-every", "0", "--out", str(out)]
    real = checkpoints.save_scales
    monkeypatch.setattr(checkpoints, "save_scales", lambda *a, **k: (_ for _ in ()).throw(OSError(28, "No space left on device")))
    with pytest.raises(SystemExit, match="--resume"):
        train.main(argv)
    assert os.path.exists(f"{out}.state.pt") and not out.exists()
    assert torch.load(f"{out}.state.pt", weights_only=True)["step"] == 3
    monkeypatch.setattr(checkpoints, "save_scales", real)
    train.main(argv + ["--resume"])
    assert out.exists() and not os.path.exists(f"{out}.state.pt")


def test_training_that_made_things_worse_says_so(d, monkeypatch, capsys):
    """A run whose held-out perplexity ends above its PTQ init (a first FP8-KV run did, silently) warns on stderr;
    the scales are still saved."""
    ppls = iter([12.0, 15.0])                           # PTQ init, SASQ (fp is scored apart)
    monkeypatch.setattr(train, "heldout_ppl", lambda *a, **k: next(ppls))
    out = d / "worse.safetensors"
    train.main(["--ckpt", str(d / "tiny"), "--calib", str(d / "text.txt"), "--seq-len", "64", "--steps", "1",
                "--batch-size", "2", "--calib-windows", "2", "--heldout", "1", "--out", str(out)])
    assert "worse than its PTQ init (15.000 > 12.000)" in capsys.readouterr().err and out.exists()


def test_eval_checks_scales_and_folders_before_the_first_row(d):
    """#2, #3: scales of another model and a missing --hf folder fail before any row is computed."""
    ev = ["eval.py", "--ckpt", str(d / "tiny"), "--test", str(d / "text.txt"), "--seq-len", "64", "--modes", "fp,dynamic"]
    r = cli(*ev, "--scales", str(d / "other.safetensors"))
    one_line(r, 1, "belong to another model")
    assert " ppl " not in r.stdout                        # no row ran first
    one_line(cli(*ev, "--hf", str(d / "nowhere")), 2, "--hf " + str(d / "nowhere") + ": no such folder")
    (d / "nocfg").mkdir(exist_ok=True)
    one_line(cli(*ev, "--hf", str(d / "nocfg")), 2, "no config.json")


def test_eval_json_is_never_replaced_or_lost(d, capsys):
    """#4, #5: an existing --json needs --force; a missing folder is refused up front."""
    import eval as evaluate
    ev = ["--ckpt", str(d / "tiny"), "--test", str(d / "text.txt"), "--seq-len", "64", "--limit", "1"]
    (d / "r.json").write_text("mine")
    usage_error(evaluate.main, ev + ["--json", str(d / "r.json")], capsys, "exists; pass --force")
    assert (d / "r.json").read_text() == "mine"
    usage_error(evaluate.main, ev + ["--json", str(d / "no" / "r.json")], capsys, "does not exist")
    evaluate.main(ev + ["--json", str(d / "r.json"), "--force"])
    assert json.loads((d / "r.json").read_text())["rows"][0]["mode"] == "fp"
    assert not (d / "r.json.tmp").exists()


def test_scales_files_are_readable_by_others(d):
    """#9: checkpoints.save_scales honours the umask (safetensors alone writes 0600)."""
    old = os.umask(0o022)
    try:
        m, _ = checkpoints.load_model(str(d / "tiny"))
        checkpoints.save_scales(d / "mode.safetensors", m, sasq.attach(m, sasq.QuantConfig()), sasq.QuantConfig())
        assert stat.S_IMODE(os.stat(d / "mode.safetensors").st_mode) == 0o644
    finally:
        os.umask(old)


@pytest.mark.parametrize("name", ["blank.txt", "nul.txt"])
def test_calibration_text_of_nothing_is_refused(d, name):
    """#12: whitespace or NUL bytes do not train and save scales."""
    r = cli("train.py", "--ckpt", str(d / "tiny"), "--calib", str(d / name), "--seq-len", "64",
            "--out", str(d / f"{name}.safetensors"))
    one_line(r, 1, "the text is empty")
    assert not (d / f"{name}.safetensors").exists()


def test_short_second_source_is_named(d):
    """#21: with two --calib sources, the one that is too short is named."""
    (d / "short.txt").write_text("too short")
    r = cli("train.py", "--ckpt", str(d / "tiny"), "--calib", str(d / "text.txt"), "--calib", str(d / "short.txt"),
            "--seq-len", "64", "--out", str(d / "s.safetensors"))
    assert str(d / "short.txt") + ": the text has" in one_line(r, 1, "fewer than one window")


def test_eval_refuses_what_it_would_get_wrong(d, capsys):
    """#10, #11: --int8 with --decode dynamic (Int8Linear has static scales only); an --hf folder whose
    quantization config transformers would not apply."""
    import eval as evaluate
    ev = ["--ckpt", str(d / "tiny"), "--test", str(d / "text.txt"), "--seq-len", "64"]
    usage_error(evaluate.main, ev + ["--int8", "--decode", "dynamic", "--scales", str(d / "other.safetensors")],
                capsys, "--decode dynamic is not implemented on the INT8 path")
    bogus = d / "bogus"
    bogus.mkdir(exist_ok=True)
    (bogus / "config.json").write_text(json.dumps({"quantization_config": {"quant_method": "bogus"}}))
    (bogus / "model.safetensors").write_bytes(b"")
    usage_error(evaluate.main, ev + ["--hf", str(bogus)], capsys, "quant_method 'bogus'")
