"""WikiText-2 perplexity of the float model, the quantization baselines and SASQ, on the same windows.

    python eval.py                                      # fp perplexity of the embedded default
    python eval.py --modes fp,w8,dynamic,static-tensor,static-channel --scales scales.safetensors
    python eval.py --test wikitext:wikitext-2-raw-v1:test --test hamlet --json results.json

Modes: fp; w8 (weights only); dynamic (W8A8, per-token absmax at run time); static-tensor (one static
scale per tensor, the max over calibration); static-channel (per-channel static scales after PTQ
initialisation only); sasq (one row per --scales file, trained by train.py).
"""
import argparse
import json
import os
import time

import torch

import data
import model as llama
import sasq

BASELINES = {   # mode -> (quantizer config, PTQ init method or None, table label)
    "w8": (lambda w, a: sasq.QuantConfig(wbits=w, abits=None), None, "W{w} (weights only)"),
    "dynamic": (lambda w, a: sasq.QuantConfig(wbits=w, abits=a, act="dynamic"), None,
                "W{w}A{a} dynamic per-token"),
    "static-tensor": (lambda w, a: sasq.QuantConfig(wbits=w, abits=a, per_channel=False, truncation=False),
                      "max", "W{w}A{a} static per-tensor (max)"),
    "static-channel": (lambda w, a: sasq.QuantConfig(wbits=w, abits=a, truncation=False), "mean",
                       "W{w}A{a} static per-channel (PTQ init)"),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", default=None, help=f"checkpoint (default: {llama.DEFAULT_CKPT})")
    p.add_argument("--test", action="append", help=f"text to score, repeatable (default {data.TEST})")
    p.add_argument("--modes", default="fp", help="comma-separated: fp,w8,dynamic,static-tensor,static-channel")
    p.add_argument("--scales", action="append", default=[], help="SASQ scales file(s) from train.py")
    p.add_argument("--wbits", type=int, default=8)
    p.add_argument("--abits", type=int, default=8)
    p.add_argument("--calib", default=data.CALIB, help="PTQ calibration text for the static baselines")
    p.add_argument("--calib-windows", type=int, default=16, help="as train.py's PTQ initialisation")
    p.add_argument("--calib-seq-len", type=int, default=2048)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--limit", type=int, default=None, help="only the first N windows")
    p.add_argument("--batch-size", type=int, default=None, help="windows per forward (default 8 on GPU, 1 on CPU)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                   help="weights dtype (default: bfloat16 on GPU, float32 on CPU)")
    p.add_argument("--compile", action="store_true", help="torch.compile the blocks (GPU): fake-quant then "
                   "costs what fp does (bench.py eval); pays off on 7B, not on a 135M model")
    p.add_argument("--int8", action="store_true", help="run SASQ rows through real INT8 GEMMs (int8.py)")
    p.add_argument("--json", default=None, help="also write the rows as JSON here")
    p.add_argument("--prompt", default=None, help="print a greedy completion of this prompt (fp model)")
    p.add_argument("--debug", action="store_true", help="show the full traceback on errors")
    a = p.parse_args(argv)
    data.check_args(p, a)
    return a


def attach_mode(model, tok, mode, a):
    """Put the model into one evaluation mode; returns a label for the table."""
    if mode == "fp":
        return "fp"
    if mode.endswith(".safetensors") or os.path.exists(mode):
        _, cfg = sasq.load(mode, model)
        label = f"SASQ W{cfg.wbits}A{cfg.abits}" + ("" if cfg.truncation else " no truncation") + \
            f" [{os.path.basename(mode)}]"
        if a.int8:
            import int8
            int8.convert(model)
            return label + " INT8"
    else:
        make, init, label = BASELINES[mode]
        qs = sasq.attach(model, make(a.wbits, a.abits))
        if init is not None:
            cal = data.token_windows(tok, a.calib, a.calib_seq_len, a.calib_windows)
            sasq.calibrate(model, qs, cal, batch_size=4, method=init)
        label = label.format(w=a.wbits, a=a.abits)
    sasq.freeze(model)
    return label


def main(argv=None):
    a = parse_args(argv)
    gpu = a.device.startswith("cuda")
    a.batch_size = a.batch_size or (8 if gpu else 1)
    a.dtype = a.dtype or ("bfloat16" if gpu else "float32")
    modes = [m for m in a.modes.split(",") if m] + a.scales
    bad = [m for m in modes if m not in ("fp", *BASELINES) and m not in a.scales]
    if bad:
        raise SystemExit(f"error: unknown mode(s) {', '.join(bad)}; choose from fp, {', '.join(BASELINES)}")
    model, tok = llama.load(a.ckpt, a.device, getattr(torch, a.dtype))
    data.check_seq_len(model, a.seq_len)
    if a.compile and gpu:
        model.compile_blocks()
    if a.prompt:
        out = model.generate(torch.tensor([tok.encode(a.prompt)], device=a.device), 32, tok.eos_id)
        print(repr(tok.decode(out[0].tolist())))
    tests = a.test or [data.TEST]
    wins = {t: data.token_windows(tok, t, a.seq_len, a.limit) for t in tests}
    rows = []
    for mode in modes:
        label = attach_mode(model, tok, mode, a)
        row = {"mode": label, "wbits": a.wbits, "abits": a.abits}
        for t, w in wins.items():
            if str(a.device).startswith("cuda"):
                torch.cuda.synchronize()
            t0 = time.time()
            row[t] = data.perplexity(model, w, a.batch_size, a.device)
            if str(a.device).startswith("cuda"):
                torch.cuda.synchronize()
            row[f"{t} seconds"] = time.time() - t0
            row[f"{t} windows"] = len(w)
        print(f"{label}: " + " | ".join(f"{t} ppl {row[t]:.3f}" for t in tests), flush=True)
        rows.append(row)
        if a.int8:
            import int8
            int8.revert(model)
        sasq.detach(model)
    print(markdown_table(rows, tests))
    if a.json:
        with open(a.json + ".tmp", "w") as f:
            json.dump({"ckpt": a.ckpt or llama.DEFAULT_CKPT, "seq_len": a.seq_len, "rows": rows}, f, indent=1)
        os.replace(a.json + ".tmp", a.json)


def markdown_table(rows, tests):
    head = "| mode | " + " | ".join(f"{t} ppl | s" for t in tests) + " |"
    lines = [head, "|" + "---|" * (1 + 2 * len(tests))]
    for r in rows:
        lines.append(f"| {r['mode']} | " + " | ".join(f"{r[t]:.3f} | {r[t + ' seconds']:.1f}" for t in tests) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    data.run(main)
