"""WikiText-2 perplexity of the float model, the quantization baselines and SASQ, on the same
windows.

    python eval.py                                      # fp perplexity of the embedded default
    python eval.py --modes fp,w8,dynamic,static-tensor,static-channel --scales scales.safetensors
    python eval.py --test wikitext:wikitext-2-raw-v1:test --test hamlet --json results.json
    python eval.py --scales deploy.safetensors --hf smollm2-w8a8 --greedy 32   # + the export

Modes: fp; w8 (weights only); dynamic (W8A8, per-token absmax at run time); static-tensor (one
static scale per tensor, the max over calibration); static-channel (per-channel static scales after
PTQ initialisation only); smoothquant / smoothquant-static / smoothquant-w (SmoothQuant's fold with
--alpha, then dynamic per-token, static per-tensor or float activations); quarot (QuaRot-style
rotation, dynamic per-token RTN with clip 0.9); --wbits fp8 --abits fp8: the same rows on the FP8
(e4m3) grid; one SASQ row per --scales file (train.py; a --rotate file rotates the
model first); one row per --hf folder, run by transformers (export.py's output, or any HF /
compressed-tensors checkpoint). --greedy N: N prompts of 64 tokens cut from the first test text, 64
greedy tokens each; per mode, the share of next tokens equal to fp's (teacher-forced on fp's
continuation) and the mean length of the generated prefix identical to fp's.
"""
import argparse
import json
import math
import os
import sys
import time

import torch

import checkpoints
import cli
import data
import sasq


def DYNAMIC(w, a):
    return sasq.QuantConfig(wbits=w, abits=a, act="dynamic")


def TENSOR(w, a):
    return sasq.QuantConfig(wbits=w, abits=a, per_channel=False, truncation=False)


def CHANNEL(w, a):
    return sasq.QuantConfig(wbits=w, abits=a, truncation=False)


def QUAROT(w, a):
    return sasq.QuantConfig(wbits=w, abits=a, act="dynamic", clip=0.9)


def W_ONLY(w, a):
    return sasq.QuantConfig(wbits=w, abits=None)


# mode -> (quantizer config, PTQ init ("init": --init's) or None, label, float-model rewrite)
BASELINES = {
    "w8": (W_ONLY, None, "W{w} (weights only)", None),
    "dynamic": (DYNAMIC, None, "W{w}A{a} dynamic per-token", None),
    "static-tensor": (TENSOR, "max", "W{w}A{a} static per-tensor (max)", None),
    "static-channel": (CHANNEL, "init", "W{w}A{a} static per-channel (PTQ init, {init})", None),
    "smoothquant": (DYNAMIC, None, "W{w}A{a} SmoothQuant a={alpha} dynamic per-token", "smooth"),
    "smoothquant-static": (TENSOR, "max", "W{w}A{a} SmoothQuant a={alpha} static per-tensor (max)",
                           "smooth"),
    "smoothquant-w": (W_ONLY, None, "W{w} SmoothQuant a={alpha} weights only", "smooth"),
    "quarot": (QUAROT, None, "W{w}A{a} QuaRot-RTN (rotation, dynamic per-token, clip 0.9)",
               "rotate"),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add = p.add_argument
    add("--ckpt", default=None, help=f"checkpoint (default: {checkpoints.DEFAULT_CKPT})")
    add("--test", action="append", help=f"text to score, repeatable (default {data.TEST}); `ood` "
        f"stands for the out-of-domain set, {', '.join(data.OOD)}")
    add("--modes", default="fp", help="comma-separated: fp," + ",".join(BASELINES))
    add("--alpha", type=float, default=0.5, help="SmoothQuant's migration strength (paper 0.5; "
        "llm-compressor uses 0.8 for LLaMA)")
    add("--scales", action="append", default=[], help="SASQ scales file(s) from train.py")
    add("--wbits", type=cli.grid, default=8, help="weight bits of the baseline rows, or fp8 "
        "(default 8; a scales file's row uses its own)")
    add("--abits", type=cli.grid, default=8, help="activation bits of the baseline rows, or fp8 "
        "(default 8)")
    add("--calib", default=data.CALIB, help="PTQ calibration text for the static baselines")
    add("--calib-windows", type=int, default=16, help="as train.py's PTQ initialisation")
    add("--init", choices=("mean", "max"), default=sasq.INIT, help="static-channel's PTQ init, as "
        "train.py's")
    add("--calib-seq-len", type=int, default=2048, help="tokens per PTQ calibration window "
        "(default 2048)")
    add("--seq-len", type=int, default=2048, help="tokens per test window (default 2048, the "
        "protocol's)")
    add("--limit", type=int, default=None, help="only the first N windows")
    add("--batch-size", type=int, default=None, help="windows per forward (default 8 on GPU, 1 "
        "on CPU)")
    add("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu, cuda or "
        "cuda:N (default: cuda when a GPU is visible)")
    add("--dtype", choices=("float32", "bfloat16"), default=None, help="weights dtype (default: "
        "bfloat16 on GPU, float32 on CPU)")
    add("--compile", action="store_true", help="torch.compile the blocks (GPU): fake-quant then "
        "costs what fp does; pays off on 7B, not on a 135M model")
    add("--int8", action="store_true", help="run SASQ rows through real INT8 GEMMs "
        "(extras/int8.py)")
    add("--fused", action="store_true", help="with --int8: the gate/up GEMM writes the w2 "
        "input's int8 codes (static scales without rotation)")
    add("--json", default=None, help="also write the rows as JSON here")
    add("--force", action="store_true", help="replace an existing --json file")
    add("--hf", action="append", default=[], help="a Hugging Face folder to evaluate through "
        "transformers (e.g. extras/export.py's output); repeatable")
    add("--prompt", default=None, help="print each mode's greedy completion of this prompt "
        "beside fp's")
    add("--greedy", type=int, default=0, help="greedy agreement with fp on N prompts from the "
        "test text")
    add("--decode", choices=("static", "dynamic"), default="static", help="SASQ rows: scales of "
        "one-token decode steps (dynamic: static prefill, per-token dynamic decode)")
    add("--kv-baselines", action="store_true", help="each scales file with KV-cache scales "
        "(train.py --kv-bits) is also scored with a float cache, a per-token dynamic one and PTQ "
        "max KV scales, its activation scales unchanged")
    add("--debug", action="store_true", help="show the full traceback on errors")
    a = p.parse_args(argv)
    cli.check_args(p, a)
    check_usage(p, a)
    if a.json:                   # where the result goes is checked before minutes of evaluation
        cli.check_writable(p, a.json, a.force, "--json")
    for folder in a.hf:
        missing = hf_folder_problem(folder)
        if missing:
            p.exit(2, f"{p.prog}: error: --hf {folder}: {missing}\n")
    return a


def check_usage(p, a):
    """Options that do nothing in the mode given are usage errors, not silence."""
    def error(msg):
        p.exit(2, f"{p.prog}: error: {msg}\n")
    if a.fused and not a.int8:
        error("--fused needs --int8 (it fuses the real INT8 FFN)")
    for opt, on in (("--int8", a.int8), ("--kv-baselines", a.kv_baselines),
                    ("--decode dynamic", a.decode == "dynamic")):
        if on and not a.scales:
            error(f"{opt} applies to the SASQ rows: add --scales FILE")
    if a.int8 and a.decode == "dynamic":        # extras/int8.Int8Linear has static scales only
        error("--decode dynamic is not implemented on the INT8 path; run it without --int8")
    if a.decode == "dynamic" and not (a.greedy or a.prompt):
        error("--decode dynamic changes only generation (one-token steps); perplexity is the "
              "static "
              "row's: add --greedy N or --prompt TEXT")
    if not 0 <= a.alpha <= 1:
        error(f"--alpha must be in 0..1, got {a.alpha}")
    for path in a.scales if a.kv_baselines else []:
        if os.path.isfile(path) and not has_kv(path):
            error(f"--kv-baselines: {path} holds no KV-cache scales (train.py --kv-bits)")
    tests = [t for spec in a.test or [data.TEST] for t in (data.OOD if spec == "ood" else [spec])]
    problems = [data.source_problem(t) for t in tests]
    if set(a.modes.split(",")) & NEEDS_CALIB or a.kv_baselines:
        problems.append(data.source_problem(a.calib))
    if any(problems):                  # every missing text named at once, before the model loads
        error("; ".join(filter(None, problems)))


def hf_folder_problem(folder):
    """Why --hf FOLDER cannot be scored, or None."""
    if not os.path.isdir(folder):
        return "no such folder"
    if not os.path.isfile(os.path.join(folder, "config.json")):
        return "no config.json in it"
    if not any(n.endswith(".safetensors") for n in os.listdir(folder)):
        return "no .safetensors weights in it"
    return hf_quant_problem(folder)


def hf_quant_problem(folder):
    """None if transformers reads `folder` as we score it (plain, or compressed-tensors), else why
    not: another quant_method would load its int8 codes as float weights and drop the scales."""
    try:
        with open(os.path.join(folder, "config.json")) as f:
            qc = json.load(f).get("quantization_config")
    except (OSError, ValueError) as e:
        return f"config.json is not readable JSON ({type(e).__name__})"
    method = qc.get("quant_method") if isinstance(qc, dict) else None
    if qc is not None and method != "compressed-tensors":
        return (f"quantization_config quant_method {method!r}: eval.py reads plain and "
                "compressed-tensors folders")
    return None


def check_scales(path, model):
    """Before the first row: the scales file must belong to this model (a rotated file: to the model
    it was rotated from, if the file records it; older files are checked when their row comes)."""
    meta, cfg = checkpoints.read_scales_meta(path)
    rotated = cfg.rotate is not None
    want = json.loads(meta.get("extra", "{}")).get("base_fingerprint") if rotated else \
        meta.get("fingerprint")
    if want is not None and want != checkpoints.fingerprint(model):
        raise checkpoints.ScalesError(f"{path}: these scales belong to another model (fingerprint "
                                      f"{want}, this model "
                               f"is {checkpoints.fingerprint(model)})")


NEEDS_CALIB = {"static-tensor", "static-channel", "smoothquant", "smoothquant-static"}


def calib_windows(tok, a):
    """The PTQ calibration windows, loaded once (main loads them before the first row)."""
    if getattr(a, "calib_wins", None) is None:
        a.calib_wins = data.token_windows(tok, a.calib, a.calib_seq_len, a.calib_windows)
    return a.calib_wins


def rewritten(tok, a, how, seed=0):
    """A fresh float model with SmoothQuant's fold or the rotation applied (the shared model stays
    as loaded)."""
    model = checkpoints.load_model(a.ckpt, a.device, getattr(torch, a.dtype))[0]
    from extras import baselines
    if how == "smooth":
        baselines.smooth(model, sasq.observe(model, calib_windows(tok, a), batch_size=4), a.alpha)
    else:
        baselines.rotate(model, seed)
    if a.compile and a.device.startswith("cuda"):
        model.compile_blocks()
    return model


def attach_mode(model, tok, mode, a):
    """Put the model into one evaluation mode ("fp", a baseline name, or ("scales", path)); returns
    (the model it runs on, label, weight bits, activation bits)."""
    if mode == "fp":
        return model, "fp", None, None
    # a scales file: its own config, never the command line's bits
    if isinstance(mode, tuple):
        rotate = checkpoints.read_scales_config(mode[1]).rotate
        if rotate is not None:
            model = rewritten(tok, a, "rotate", rotate)
        qs, cfg = checkpoints.load_scales(mode[1], model)
        for q in (q for qs_ in qs for q in qs_.values()):
            q.decode = a.decode
        kv_how = mode[2] if len(mode) > 2 else "trained"
        kv = kv_cfg = None
        if kv_how != "off" and has_kv(mode[1]):
            from extras import kvquant
            kv, kv_cfg = kvquant.load(mode[1], model, qs, None if kv_how == "trained" else kv_how)
        if kv_how == "ptq":
            kvquant.calibrate(model, kv, calib_windows(tok, a), batch_size=4)
        recipe = (" deployable" if cfg.tied_wo and not cfg.truncation else
                  "" if cfg.truncation else " no truncation")
        label = (named_grid(f"SASQ W{cfg.wbits}A{cfg.abits}{recipe}")
                 + (" + rotation" if rotate is not None else "")
                 + (" decode dynamic" if a.decode == "dynamic" else "")
                 + (f" {kv_label(kv_cfg, kv_how)}" if kv else "")
                 + (" float KV cache" if kv_how == "off" else "")
                 + f" [{os.path.basename(mode[1])}]")
        if a.int8:
            from extras import int8
            int8.convert(model)
            label += " INT8"
            if a.fused:
                int8.fuse(model)
                label += " fused FFN"
        sasq.freeze(model)
        return model, label, cfg.wbits, cfg.abits
    make, init, label, how = BASELINES[mode]
    if how is not None:
        model = rewritten(tok, a, how)
    cfg = make(a.wbits, a.abits)
    qs = sasq.attach(model, cfg)
    init = a.init if init == "init" else init
    if init is not None:
        sasq.calibrate(model, qs, calib_windows(tok, a), batch_size=4, method=init)
    sasq.freeze(model)
    label = label.format(w=a.wbits, a=a.abits, alpha=a.alpha, init=init)
    return model, named_grid(label), cfg.wbits, cfg.abits


def named_grid(label):
    """W8A8 FP8 for Wfp8Afp8, W8 FP8 for Wfp8 (the grids' names in a row's label)."""
    return label.replace("Wfp8Afp8", "W8A8 FP8").replace("Wfp8", "W8 FP8").replace("Afp8", "A8 FP8")


def has_kv(path) -> bool:
    """Does a scales file hold KV-cache scales (train.py --kv-bits)?"""
    return "kv_config" in checkpoints.read_scales_meta(path)[0]


def kv_label(cfg, how):
    from extras import kvquant
    return kvquant.label(cfg, how)


def detach_mode(model, a):
    if a.int8:
        from extras import int8
        int8.revert(model)
    sasq.detach(model)
    if "extras.kvquant" in sys.modules:
        sys.modules["extras.kvquant"].detach(model)


class HFModel:
    """A transformers model behind our model's interface: model(tokens) -> (logits,), generate()."""

    def __init__(self, folder, device, dtype):
        from extras import export
        self.hf = export.load_hf(folder, dtype).to(device)

    @torch.no_grad()
    def __call__(self, tokens):
        return (self.hf(tokens).logits,)

    @torch.no_grad()
    def generate(self, tokens, max_new_tokens, eos_id=None):
        n = max_new_tokens
        return self.hf.generate(tokens, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                eos_token_id=None, pad_token_id=0)


@torch.no_grad()
def greedy_agreement(m, prompts, fp_out):
    """(share of fp's next tokens that m also predicts on fp's continuation, mean identical free-run
    prefix)."""
    same, total, prefix = 0, 0, 0
    for p, ref in zip(prompts, fp_out):
        P = p.shape[1]
        # teacher-forced on fp's continuation
        pred = m(ref[:, :-1])[0][0, P - 1:].argmax(-1)
        same += (pred == ref[0, P:]).sum().item()
        total += ref.shape[1] - P
        gen = m.generate(p, ref.shape[1] - P)[0, P:]
        diff = (gen[:ref.shape[1] - P] != ref[0, P:]).nonzero()
        prefix += diff[0].item() if len(diff) else ref.shape[1] - P
    return same / total, prefix / len(prompts)


def score(m, label, bits, wins, a, ctx):
    """One table row: perplexity (and seconds) per text, greedy agreement, the completion."""
    row = {"mode": label, "wbits": bits[0], "abits": bits[1]}
    for t, w in wins.items():
        sync = torch.cuda.synchronize if str(a.device).startswith("cuda") else (lambda: None)
        sync()
        t0 = time.time()
        row[t] = data.perplexity(m, w, a.batch_size, a.device)
        sync()
        row[f"{t} seconds"], row[f"{t} windows"] = time.time() - t0, len(w)
    if a.greedy:
        if "fp_out" not in ctx:     # fp comes first: its continuations are the reference
            ctx["fp_out"] = [m.generate(p, 64) for p in ctx["prompts"]]
        agree = greedy_agreement(m, ctx["prompts"], ctx["fp_out"])
        row["greedy agreement"], row["greedy prefix"] = agree
    if a.prompt:
        out = m.generate(ctx["prompt"], 32)
        row["completion"] = ctx["tok"].decode(out[0, ctx["prompt"].shape[1]:].tolist())
    extra = (f" | greedy agreement {row['greedy agreement']:.3f}, prefix "
             f"{row['greedy prefix']:.1f}" if a.greedy else "")
    print(f"{label}: " + " | ".join(f"{t} ppl {row[t]:.3f}" for t in wins) + extra, flush=True)
    if a.prompt:
        print(f"    {row['completion']!r}")
    return row


def main(argv=None):
    a = parse_args(argv)
    gpu = a.device.startswith("cuda")
    a.batch_size = a.batch_size or (8 if gpu else 1)
    a.dtype = a.dtype or ("bfloat16" if gpu else "float32")
    modes = [m for m in a.modes.split(",") if m]
    bad = [m for m in modes if m not in ("fp", *BASELINES)]
    if bad:
        raise SystemExit(f"error: unknown mode(s) {', '.join(bad)}; choose from fp, "
                         f"{', '.join(BASELINES)} "
                         "(scales files go to --scales)")
    # unreadable or non-finite scales fail before any row is computed
    for path in a.scales:
        checkpoints.read_scales_config(path)
    model, tok = checkpoints.load_model(a.ckpt, a.device, getattr(torch, a.dtype))
    data.check_seq_len(model, a.seq_len)
    for path in a.scales:
        check_scales(path, model)
    if a.compile and gpu:
        model.compile_blocks()
    tests = [t for spec in a.test or [data.TEST] for t in (data.OOD if spec == "ood" else [spec])]
    wins = {t: data.token_windows(tok, t, a.seq_len, a.limit) for t in tests}
    ctx = {"tok": tok}
    if a.greedy:     # prompts of 64 tokens, evenly spaced through the first test text
        ids = data.token_windows(tok, tests[0], 64)
        step = max(1, len(ids) // a.greedy)
        starts = range(0, step * a.greedy, step)[:a.greedy]
        ctx["prompts"] = [ids[i:i + 1].to(a.device) for i in starts]
        modes = ["fp"] + [m for m in modes if m != "fp"]      # fp's continuations are the reference
    if a.prompt:
        ctx["prompt"] = torch.tensor([tok.encode(a.prompt)], device=a.device)
        if ctx["prompt"].shape[1] + 32 > model.args.max_seq_len:
            raise data.DataError(f"--prompt: {ctx['prompt'].shape[1]} tokens + 32 generated exceed "
                                 f"the model's context of {model.args.max_seq_len}")
    if set(modes) & NEEDS_CALIB or a.kv_baselines:    # a bad --calib fails before the first row
        calib_windows(tok, a)
    rows = []
    kv_rows = [("scales", s, how) for s in a.scales if a.kv_baselines and has_kv(s)
               for how in ("off", "token", "ptq")]
    for mode in modes + [("scales", s) for s in a.scales] + kv_rows:
        m, label, *bits = attach_mode(model, tok, mode, a)
        rows.append(score(m, label, bits, wins, a, ctx))
        detach_mode(m, a)
    for folder in a.hf:
        hf = HFModel(folder, a.device, getattr(torch, a.dtype))
        rows.append(score(hf, f"HF [{os.path.basename(folder.rstrip('/'))}]", (None, None), wins,
                          a, ctx))
    print(markdown_table(rows, tests))
    if a.json:
        write_json(a, rows)


def write_json(a, rows):
    finite = lambda v: None if isinstance(v, float) and not math.isfinite(v) else v  # noqa: E731
    clean = [{k: finite(v) for k, v in r.items()} for r in rows]
    doc = {"ckpt": a.ckpt or checkpoints.DEFAULT_CKPT, "seq_len": a.seq_len, "rows": clean}
    try:
        with checkpoints.atomic_path(a.json, force=True) as tmp, open(tmp, "w") as f:
            json.dump(doc, f, indent=1, allow_nan=False)
    except OSError as e:            # the table above is printed: say so, leave no half file
        raise OSError(f"--json {a.json}: cannot write it ({e.strerror}); the table above has the "
                      "rows") from None


def markdown_table(rows, tests):
    greedy = "greedy agreement" in rows[0]
    head = ("| mode | " + " | ".join(f"{t} ppl | s" for t in tests)
            + (" | greedy agreement | prefix" if greedy else ""))
    lines = [head + " |", "|" + "---|" * (1 + 2 * len(tests) + 2 * greedy)]
    for r in rows:
        cells = [f"{r[t]:.3f} | {r[t + ' seconds']:.1f}" for t in tests]
        if greedy:
            cells.append(f"{r['greedy agreement']:.3f} | {r['greedy prefix']:.1f}")
        lines.append(f"| {r['mode']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    cli.run_main(main)
