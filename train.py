"""Train SASQ's static activation scales: PTQ-initialise, then minimise next-token loss over the scales only.

    python train.py                         # the embedded default model (SmolLM2-135M), hub WikiText-2
    python train.py --ckpt llama-2-7b --checkpointing
    python train.py --rotate --abits 4 --loss kl     # static scales on the rotated model, distilled from fp
    torchrun --nproc-per-node 4 fsdp.py --ckpt llama-2-70b --checkpointing     # several GPUs: FSDP2, same options
"""
import argparse
import dataclasses
import math
import os
import signal
import sys
import time

import torch
import torch.nn.functional as F
from tqdm import tqdm

import baselines
import cli
import data
import kvquant
import model as llama
import sasq
import selfgen


# the default calibration: the local text plus 256 windows the float model writes itself (LLM-QAT's
# data-free text); of the mixes tried it was the best on texts none of them saw (docs/deploy.md)
CALIB = (data.CALIB, "self:256")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", default=None, help="checkpoint folder/file, hub id or short name "
                   f"(default: {llama.DEFAULT_CKPT}, the embedded GGUF)")
    p.add_argument("--calib", action="append", help="training text, SOURCE[:CONFIG[:SPLIT]] or self:N (N "
                   "windows written by the float model, selfgen.py); repeat it for a mix (default: "
                   f"{' + '.join(CALIB)}, chosen on the out-of-domain texts: docs/deploy.md); held-out windows "
                   "come from the first")
    p.add_argument("--out", default="scales.safetensors", help="where the trained scales go")
    p.add_argument("--force", action="store_true", help="overwrite --out if it exists")
    p.add_argument("--wbits", type=int, default=8, help="weight bits, per output channel, RTN (default 8)")
    p.add_argument("--abits", type=int, default=8, help="activation bits, static scales (default 8; 6 and 4 are the "
                   "stress tests)")
    p.add_argument("--no-truncation", action="store_true", help="ablation: no c*tanh(x/c) truncation")
    p.add_argument("--deployable", action="store_true", help="the recipe export.py can fold into a standard "
                   "static W8A8 checkpoint: no truncation, wo scales tied across each GQA group (with --rotate "
                   "also one scale for the w2 input, behind the online Hadamard)")
    p.add_argument("--rotate", action="store_true", help="train on the QuaRot-style rotated model "
                   "(baselines.rotate, signs from --seed); eval.py rotates again when it loads these scales")
    p.add_argument("--kv-bits", type=int, default=None, choices=(4, 8), help="also quantize the KV cache (K after "
                   "RoPE, V) with static scales, trained with the others (kvquant.py; default: a float cache)")
    p.add_argument("--kv-format", choices=kvquant.FORMATS, default="int", help="the cache's grid: int or fp8 "
                   "(e4m3, 8 bits) (default %(default)s)")
    p.add_argument("--kv-granularity", choices=("tensor", "head"), default="tensor", help="one KV scale per "
                   "tensor (what engines take) or per kv head (default %(default)s)")
    p.add_argument("--loss", choices=("ce", "kl"), default="ce", help="ce: next-token cross-entropy on the text "
                   "(the paper); kl: KL divergence from the float model's next-token distribution")
    p.add_argument("--init", choices=("mean", "max"), default=sasq.INIT,
                   help="PTQ init: max or (the paper's) mean over batches of the per-channel absmax "
                   "(default %(default)s)")
    p.add_argument("--trunc-mult", type=float, default=4.0, help="initial threshold c = this x calib absmax (default %(default)s)")
    p.add_argument("--steps", type=int, default=100, help="training steps (default 100)")
    p.add_argument("--batch-size", type=int, default=4, help="windows per step (default 4)")
    p.add_argument("--seq-len", type=int, default=2048, help="tokens per window (default 2048)")
    p.add_argument("--lr", type=float, default=2e-2, help="Adam lr on log-scales, cosine decay to 0 (default %(default)s)")
    p.add_argument("--calib-windows", type=int, default=16, help="windows for the PTQ initialisation (default %(default)s)")
    p.add_argument("--heldout", type=int, default=4, help="last windows of --calib kept for evaluation (default %(default)s)")
    p.add_argument("--checkpointing", action="store_true", help="activation checkpointing (7B on one GPU)")
    p.add_argument("--no-compile", action="store_true", help="do not torch.compile the blocks (GPU only)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cpu, cuda or cuda:N (default: cuda when a GPU is visible)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                   help="weights dtype (default: bfloat16 on GPU, float32 on CPU)")
    p.add_argument("--seed", type=int, default=0, help="seed of the batch sampler, the rotation's signs and "
                   "self:N's text (default 0)")
    p.add_argument("--save-every", type=int, default=50, help="checkpoint the trainable state every N steps (default %(default)s)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run from OUT.state.pt")
    p.add_argument("--debug", action="store_true", help="show the full traceback on errors")
    if os.environ.get("RANK", "0") != "0":     # under torchrun, one rank explains a bad command line, not all
        p.exit = lambda status=0, message=None: sys.exit(status)
        p.print_usage = p.print_help = lambda file=None: None
    a = p.parse_args(argv)
    a.calib = a.calib or list(CALIB)
    cli.check_args(p, a)
    for spec in filter(selfgen.is_spec, a.calib):
        try:
            selfgen.parse(spec)
        except ValueError as e:
            p.exit(2, f"{p.prog}: error: {e}\n")
    if a.kv_format == "fp8" and a.kv_bits not in (None, 8):
        p.exit(2, f"{p.prog}: error: --kv-format fp8 is 8 bits; got --kv-bits {a.kv_bits}\n")
    if selfgen.is_spec(a.calib[0]):
        p.exit(2, f"{p.prog}: error: --calib {a.calib[0]}: held-out windows come from the first --calib; "
                  "put a text first\n")
    check_paths(p, a, a.out + ".state.pt")
    return a


class Stopped(Exception):
    """Training ended early on a signal; the message says why, and where the state is."""


class NonFinite(Stopped):
    """A non-finite loss or scale; `kept` says which step's scales were restored (None: none usable)."""

    def __init__(self, msg, kept):
        super().__init__(msg)
        self.kept = kept


class StopOnSignal:
    """Turn SIGINT/SIGTERM into a flag, so the loop can finish its step, checkpoint and stop cleanly."""

    def __enter__(self):
        self.flag, self.old = None, {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
        for s in self.old:
            signal.signal(s, lambda signum, frame: setattr(self, "flag", signal.Signals(signum).name))
        return self

    def __exit__(self, *exc):
        for s, handler in self.old.items():
            signal.signal(s, handler)


def save_state(path, step, quantizers, opt, sched, gen, losses, run):
    """Everything needed to resume, and what the run was (checked by --resume); atomic write."""
    state = {"step": step, "quantizers": quantizers.state_dict(), "opt": opt.state_dict(),
             "sched": sched.state_dict(), "gen": gen.get_state(), "losses": losses, "run": run}
    torch.save(state, path + ".tmp")
    os.replace(path + ".tmp", path)


def load_state(path, run):
    """The saved state of an interrupted run; refuses a file from another command line or model."""
    try:
        st = torch.load(path, weights_only=True)
        saved = st["run"]
    except Exception as e:       # a truncated or foreign file: torch raises many types
        raise sasq.ScalesError(f"{path}: not a readable training state ({type(e).__name__}); "
                               "delete it to start afresh") from None
    diff = [f"{k} {saved.get(k)!r} -> {v!r}" for k, v in run.items() if saved.get(k) != v]
    if diff:
        raise sasq.ScalesError(f"{path} belongs to another run ({'; '.join(diff)}); resume with the same "
                               "settings, or delete it to start afresh")
    return st


def resume_state(path, run, quantizers, opt, sched, gen):
    """Load an interrupted run's state into the trainable objects; returns (next step, losses so far)."""
    st = load_state(path, run or {})
    quantizers.load_state_dict(st["quantizers"]), opt.load_state_dict(st["opt"])
    sched.load_state_dict(st["sched"]), gen.set_state(st["gen"])
    return st["step"], st["losses"]


# |log s| above this makes no sense for an activation scale (e^80 ~ 5e34) and overflows soon after
LOG_LIMIT = 80.0


def step_loss(model, x, kind="ce"):
    """The objective on windows x (B, T+1): next-token cross-entropy on the text (the paper's), or the KL
    divergence KL(fp || quantized) per token, the teacher being this model with its quantizers bypassed."""
    if kind == "ce":
        return model(x[:, :-1], x[:, 1:])[1]
    with torch.no_grad(), sasq.float_model(model):
        teacher = model(x[:, :-1])[0].float().log_softmax(-1).flatten(0, 1)
    student = model(x[:, :-1])[0].float().log_softmax(-1).flatten(0, 1)
    return F.kl_div(student, teacher, log_target=True, reduction="batchmean")


class FiniteGuard:
    """Remembers the scales each step starts from. check() makes one host sync per step (the loss and the
    largest |log s| per parameter); on a non-finite loss or scale it restores the last scales that gave a
    finite loss and raises NonFinite (a non-finite loss condemns this step's scales, a finite one only the
    update)."""

    def __init__(self, quantizers, start):
        self.q, self.params, self.start, self.cur, self.prev = quantizers, list(quantizers.parameters()), start, None, None

    def remember(self):
        self.prev, self.cur = self.cur, {k: v.clone() for k, v in self.q.state_dict().items()}

    def check(self, loss, step) -> float:
        vals = torch.stack([loss.detach().float(), *torch._foreach_norm(self.params, float("inf"))]).tolist()
        if math.isfinite(vals[0]) and all(math.isfinite(v) and v <= LOG_LIMIT for v in vals[1:]):
            return vals[0]
        good, kept = (self.cur, step) if math.isfinite(vals[0]) else (self.prev, step - 1)
        if good is None or kept < self.start:
            raise NonFinite(f"non-finite loss at step {step}, the first step of this run; no usable scales", None)
        self.q.load_state_dict(good)
        raise NonFinite(f"non-finite loss or scale at step {step}; kept the scales of step {kept}", kept)


def train_scales(model, quantizers, wins, steps, batch_size, lr, seed=0, device="cpu", progress=True,
                 state_path=None, save_every=0, resume=False, run=None, loss="ce", comm=None):
    """Adam + cosine decay on the quantizers' parameters only; returns the loss of every step and the
    seconds of the first step (None if none ran: a resumed run that had finished its steps).
    A non-finite loss or scale raises NonFinite (FiniteGuard); SIGINT/SIGTERM raises Stopped after
    writing `state_path` for --resume. `comm` (fsdp.py): batch_size windows per rank, one global batch."""
    rank, world = (comm.rank, comm.world) if comm else (0, 1)
    params = list(quantizers.parameters())
    opt = torch.optim.Adam(params, lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
    gen = torch.Generator().manual_seed(seed)
    start, losses = resume_state(state_path, run, quantizers, opt, sched, gen) if resume else (0, [])
    autocast = torch.autocast("cuda", torch.bfloat16, enabled=str(device).startswith("cuda"))
    guard, t0, first = FiniteGuard(quantizers, start), time.time(), None
    with StopOnSignal() as stop:
        for step in tqdm(range(start, steps), desc="train scales", disable=not progress or bool(rank)):
            guard.remember()
            idx = torch.randint(len(wins), (batch_size * world,), generator=gen)[rank * batch_size:][:batch_size]
            x = wins[idx].to(device)
            with autocast:
                value = step_loss(model, x, loss)
            opt.zero_grad(set_to_none=True)
            value.backward()
            if comm:               # the replicated quantizers: average the gradients (and the loss, for the log)
                comm.average_grads(params)
                value = comm.mean(value)
            opt.step()
            sched.step()
            losses.append(guard.check(value, step))
            first = first or time.time() - t0
            flag = comm.any(stop.flag) if comm else stop.flag       # every rank stops at the same step
            last = step + 1 == steps        # the final state too: a failing final save loses nothing (--resume)
            if state_path and not rank and (flag or last or (save_every and (step + 1) % save_every == 0)):
                save_state(state_path, step + 1, quantizers, opt, sched, gen, losses, run)
            if flag:
                raise Stopped(f"{stop.flag or 'a signal to another rank'} after step {step + 1} of {steps}; state "
                              f"saved to {state_path}, continue with --resume")
    return losses, first


def prepare(a, device=None):
    """Load the model and cut the calibration text into training and held-back windows."""
    dtype = getattr(torch, a.dtype or ("bfloat16" if a.device.startswith("cuda") else "float32"))
    model, tok = llama.load(a.ckpt, device or a.device, dtype)
    data.check_seq_len(model, a.seq_len)
    model.checkpointing = a.checkpointing
    sources = [selfgen.windows(model, tok, spec, a.seq_len, a.seed) if selfgen.is_spec(spec)
               else data.token_windows(tok, spec, a.seq_len) for spec in a.calib]
    if len(sources[0]) <= a.heldout:
        raise data.DataError(f"{a.calib[0]} gives {len(sources[0])} windows of {a.seq_len} tokens; "
                             f"need more than --heldout={a.heldout}")
    held, sources[0] = sources[0][-a.heldout:], sources[0][:-a.heldout]
    # PTQ calibration takes an equal share of --calib-windows from each source
    share = -(-a.calib_windows // len(sources))
    return model, torch.cat(sources), torch.cat([s[:share] for s in sources]), held


def heldout_ppl(model, held, a, comm=None):
    if not comm:                       # evaluate exactly what inference will run (sharded: the codes are
        sasq.freeze(model)             # computed inside each block's forward, the same numbers)
    ppl = data.perplexity(model, held, a.batch_size, a.device, progress=not (comm and comm.rank))
    sasq.unfreeze(model)
    return ppl


def run_record(a, fingerprint, cfg, comm=None) -> dict:
    """What this run is: --resume refuses a state whose record differs."""
    return {**({"world": comm.world} if comm else {}), "fingerprint": fingerprint, "config": dataclasses.asdict(cfg), "steps": a.steps,
            "batch_size": a.batch_size, "seq_len": a.seq_len, "lr": a.lr, "calib": list(a.calib), "init": a.init,
            "trunc_mult": a.trunc_mult, "calib_windows": a.calib_windows, "heldout": a.heldout, "seed": a.seed,
            "loss": a.loss, **({"kv": [a.kv_bits, a.kv_format, a.kv_granularity]} if a.kv_bits else {})}


def check_paths(p, a, state):
    """Before loading anything: --out writable and not clobbered, the state file consistent with --resume."""
    cli.check_writable(p, a.out, a.force)
    if a.resume and not os.path.exists(state):
        p.exit(2, f"{p.prog}: error: --resume but no {state} from an interrupted run\n")
    if a.resume:                     # unreadable: say so now, not after loading and calibrating
        load_state(state, {})
    if not a.resume and os.path.exists(state) and not a.force:
        p.exit(2, f"{p.prog}: error: {state} holds an interrupted run: continue it with --resume, or pass "
                  "--force to discard it\n")


def main(argv=None):
    a = parse_args(argv)
    if "RANK" in os.environ:
        raise ValueError("train.py is one process; under torchrun run fsdp.py with the same options")
    torch.manual_seed(a.seed)
    model, train_wins, calib_wins, held = prepare(a)
    base_fp = sasq.fingerprint(model)          # of the model as loaded: eval.py checks it before rotating
    if a.rotate:
        baselines.rotate(model, a.seed)
    run(a, model, train_wins, calib_wins, held, base_fp)


def run(a, model, train_wins, calib_wins, held, base_fp, comm=None):
    """The recipe once the model and windows are there: attach the quantizers, PTQ-initialise, train, save.
    With `comm` (fsdp.py): `model` is sharded, the windows are every rank's, and rank 0 alone prints and writes."""
    state = a.out + ".state.pt"
    fingerprint = base_fp if comm else sasq.fingerprint(model)     # sharded: the unsharded model's id
    cfg = sasq.QuantConfig(wbits=a.wbits, abits=a.abits, truncation=not (a.no_truncation or a.deployable),
                           tied_wo=a.deployable, rotate=a.seed if a.rotate else None,
                           w2_tensor=a.deployable and a.rotate)
    quiet = bool(comm and comm.rank)
    fp_ppl = data.perplexity(model, held, a.batch_size, a.device, progress=not quiet)
    quantizers = sasq.attach(model, cfg)
    (comm.calibrate if comm else sasq.calibrate)(model, quantizers, calib_wins, a.batch_size, a.init, a.trunc_mult,
                                                 progress=not quiet)
    kv = None
    if a.kv_bits:                    # the KV cache's scales: PTQ-initialised, then trained with the others
        kv = kvquant.attach(model, a.kv_bits, a.kv_format, a.kv_granularity, quantizers)
        kvquant.calibrate(model, kv, calib_wins, a.batch_size, progress=not quiet)
    trained = quantizers if kv is None else torch.nn.ModuleDict({"act": quantizers, "kv": kv})
    ptq_ppl = heldout_ppl(model, held, a, comm)
    if a.device.startswith("cuda") and not a.no_compile and not comm:
        model.compile_blocks()       # identical blocks share one compiled graph; the first steps compile
    t0 = time.time()
    try:
        losses, first = train_scales(model, trained, train_wins, a.steps, a.batch_size, a.lr, a.seed, a.device,
                                     state_path=state, save_every=a.save_every, resume=a.resume,
                                     run=run_record(a, fingerprint, cfg, comm), loss=a.loss, comm=comm)
    except NonFinite as e:
        if e.kept is None:
            raise SystemExit(f"error: {e}; nothing saved")
        if not quiet:
            sasq.save(a.out, model, quantizers, cfg, extra={"stopped": str(e)}, force=a.force, fingerprint_=fingerprint,
                      more=kvquant.to_save(kv) if kv is not None else None)
        raise SystemExit(f"error: {e}; those scales saved to {a.out}")
    except Stopped as e:
        raise SystemExit(f"stopped: {e}")
    secs, sasq_ppl = time.time() - t0, heldout_ppl(model, held, a, comm)
    tokens = a.steps * a.batch_size * (comm.world if comm else 1) * (a.seq_len - 1)
    print(f"held-out perplexity ({a.heldout} windows of {a.seq_len}): fp {fp_ppl:.3f} | "
          f"PTQ init {ptq_ppl:.3f} | SASQ {sasq_ppl:.3f}")
    k = max(1, len(losses) // 10)    # per-batch losses are noisy: compare the means of the first and last tenth
    print(f"trained {a.steps} steps, {tokens:,} tokens, {secs:.1f} s" +
          (f" (first step {first:.1f} s)" if first is not None else " (all steps were done before --resume)") +
          f"; training loss ({a.loss}), mean of the first / last {k} steps: {sum(losses[:k]) / k:.4f} -> {sum(losses[-k:]) / k:.4f}")
    if quiet:                        # rank 0 writes; the scales are identical on every rank
        return
    if sasq_ppl > ptq_ppl:           # saved all the same (it may be what was asked for), but said plainly
        print(f"warning: training made the held-out perplexity worse than its PTQ init ({sasq_ppl:.3f} > {ptq_ppl:.3f}); "
              "check --lr and --steps", file=sys.stderr)
    from safetensors import SafetensorError
    try:
        sasq.save(a.out, model, quantizers, cfg, force=a.force, fingerprint_=fingerprint, more=kvquant.to_save(kv) if kv is not None else None,
                  extra={"steps": a.steps, "tokens": tokens, "seconds": secs, "calib": " + ".join(a.calib),
                         "loss": a.loss, "ppl_fp": fp_ppl, "ppl_sasq": sasq_ppl, "base_fingerprint": base_fp,
                         "dtype": str(next(model.parameters()).dtype).removeprefix("torch.")})
    except (OSError, SafetensorError) as e:
        raise SystemExit(f"error: cannot write {a.out} ({' '.join(str(e).split())[:120]}); the trained state is "
                         f"in {state}: make room and run the same command with --resume to write the scales")
    if os.path.exists(state):
        os.remove(state)
    print(f"scales saved to {a.out}")


if __name__ == "__main__":
    cli.run(main)
