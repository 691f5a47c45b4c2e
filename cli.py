"""What the scripts share on the command line: usage checks before any loading, and one entry point
that turns an error the user can fix into one line and a non-zero exit status."""
import math
import os
import sys

import torch

import checkpoints
import data
import sasq

# the least value each numeric option may take (options a script does not have are skipped)
MINIMUM = {"steps": 1, "batch_size": 1, "calib_windows": 1, "heldout": 1, "save_every": 0,
           "limit": 1, "windows": 1, "reps": 1, "repeat": 1, "greedy": 0, "seq_len": 2,
           "calib_seq_len": 2, "headroom": 1}
POSITIVE = ("lr", "trunc_mult", "headroom")   # floats that must be > 0 (and finite)


def grid(text: str):
    """argparse type of --wbits / --abits: a bit width, or fp8 (float8-e4m3)."""
    return "fp8" if text.lower() == "fp8" else int(text)


def check_args(parser, a):
    """Reject bad command lines before any loading: one line on stderr, exit status 2."""
    def error(msg):
        parser.exit(2, f"{parser.prog}: error: {msg}\n")
    device = getattr(a, "device", "cpu")
    try:
        kind = torch.device(device).type
    except RuntimeError:
        error(f"--device {device}: not a device (cpu, cuda, cuda:N)")
    if kind == "cuda" and not torch.cuda.is_available():
        error(f"--device {device}: no CUDA GPU is visible here; use --device cpu")
    if kind not in ("cpu", "cuda"):
        error(f"--device {device}: only cpu and cuda are supported")
    for name in ("wbits", "abits"):
        bits = getattr(a, name, None)
        if bits is not None and bits not in sasq.GRIDS:
            error(f"--{name} must be 2..8 or fp8, got {bits}")
    for name, least in MINIMUM.items():
        v = getattr(a, name, None)
        if v is not None and v < least:
            error(f"--{name.replace('_', '-')} must be at least {least}, got {v}")
    for name in POSITIVE:
        v = getattr(a, name, None)
        if v is not None and not (math.isfinite(v) and v > 0):
            error(f"--{name.replace('_', '-')} must be a positive number, got {v}")
    scales = getattr(a, "scales", None) or []
    for path in [scales] if isinstance(scales, str) else scales:
        if not os.path.isfile(path):
            error(f"--scales {path}: no such file")


def check_writable(parser, path, force, what="--out"):
    """Before any work: `path` must be a file we may create (or, with force, replace) in an
    existing, writable folder; a directory is never replaced."""
    def error(msg):
        parser.exit(2, f"{parser.prog}: error: {msg}\n")
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        error(f"{what} {path} is a directory; give a file name")
    if os.path.exists(path) and not force:
        error(f"{what} {path} exists; pass --force to overwrite it or choose another path")
    if not os.path.isdir(folder):
        error(f"{what} {path}: folder {folder} does not exist")
    if not os.access(folder, os.W_OK):
        error(f"{what} {path}: folder {folder} is not writable")


class LineFile:
    """stderr as tqdm sees it when it is a file: each refresh of a bar becomes a line of its own
    (tqdm's carriage returns would glue the next result line to the bar's)."""

    def __init__(self, f):
        self.f = f

    def write(self, s):
        s = s.replace("\r", "").rstrip()
        if s:
            self.f.write(s + "\n")

    def flush(self):
        self.f.flush()


try:
    from safetensors import SafetensorError
except ImportError:                    # safetensors is a requirement; this only keeps imports cheap
    SafetensorError = OSError
# errors the user can fix: run_main turns them into one line
USER_ERRORS = (checkpoints.CheckpointError, checkpoints.ScalesError, data.DataError, ValueError,
               OSError, SafetensorError)


def run_main(main):
    """Script entry point: an error the user can fix (path, file, data, scales, value) becomes one
    'error:' line on stderr and exit status 1 (Ctrl-C: one line, 130); --debug shows the traceback.
    """
    # sent to a file, each result line arrives when printed
    sys.stdout.reconfigure(line_buffering=True)
    # a bar appears after 10 s, then a line every 30 s (not 10 a second)
    if not sys.stderr.isatty():
        from functools import partialmethod
        from tqdm import tqdm
        quiet = dict(mininterval=30, delay=10, file=LineFile(sys.stderr))
        tqdm.__init__ = partialmethod(tqdm.__init__, **quiet)
    try:
        main()
    except KeyboardInterrupt:
        if "--debug" in sys.argv:
            raise
        sys.stderr.write("\ninterrupted (Ctrl-C)\n")
        sys.exit(130)
    except USER_ERRORS as e:
        if "--debug" in sys.argv:
            raise
        sys.exit(f"error: {e}")


# -------------------------------------------------------------------- a training run that survives

def report(a, fp_ppl, ptq_ppl, sasq_ppl, losses, harness, comm=None):
    """The end of a train.py run: held-out perplexities, time, the loss's first and last steps."""
    print(f"held-out perplexity ({a.heldout} windows of {a.seq_len}): fp {fp_ppl:.3f} | "
          f"PTQ init {ptq_ppl:.3f} | SASQ {sasq_ppl:.3f}")
    k = max(1, len(losses) // 10)    # per-batch losses are noisy: compare the first and last tenth
    first = (f" (first step {harness.first:.1f} s)" if harness.first
             else " (all done before --resume)")
    print(f"trained {a.steps} steps in {harness.seconds():.1f} s{first}; training loss ({a.loss}), "
          f"first / last {k} steps: {sum(losses[:k]) / k:.4f} -> {sum(losses[-k:]) / k:.4f}")
    if torch.cuda.is_available() and torch.cuda.max_memory_allocated():
        print(f"peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB (this process)")
    if sasq_ppl > ptq_ppl and not (comm and comm.rank):
        print(f"warning: training made the held-out perplexity worse than its PTQ init "
              f"({sasq_ppl:.3f} > {ptq_ppl:.3f}); check --lr and --steps", file=sys.stderr)


class Stopped(Exception):
    """Training ended early on a signal; the message says why, and where the state is."""


class NonFinite(Stopped):
    """A non-finite loss or scale; `kept` says which step's scales were restored (None: none
    usable)."""

    def __init__(self, msg, kept):
        super().__init__(msg)
        self.kept = kept


# |log s| above this makes no sense for an activation scale (e^80 ~ 5e34) and overflows soon after
LOG_LIMIT = 80.0


class Harness:
    """What wraps train.train_scales so that a run survives, kept out of the loop itself: --resume
    from a state file, the state written every `save_every` steps and after the last, SIGINT/SIGTERM
    finishing the step and saving (then Stopped), a non-finite loss or scale restoring the last good
    scales (then NonFinite). `comm` (extras/fsdp.py): several processes drawing one global batch."""

    def __init__(
        self, state_path=None, save_every=0, resume=False, record=None, comm=None, progress=True
    ):
        self.path, self.every, self.resume = state_path, save_every, resume
        self.record = record or {}
        self.comm, self.progress = comm, progress
        self.rank, self.world = (comm.rank, comm.world) if comm else (0, 1)
        self.first = None              # seconds of the first step run here
        # seconds of training before --resume; when this part began
        self.before, self.t0 = 0.0, None
        self.state_error = None        # why the last state save failed (the run goes on without it)

    def share(self, idx):
        """This process' slice of a global batch of world x batch_size window indices."""
        return idx.view(self.world, -1)[self.rank]

    def reduce(self, params):
        """Several processes: average the quantizers' gradients, so Adam takes the same step
        everywhere."""
        if self.comm:
            self.comm.average_grads(params)

    def steps(self, steps, quantizers, opt, sched, gen, losses):
        """Yield the steps still to run. Before each: remember the scales; after it: check the loss
        and scales (losses[-1] becomes a float), write the state when due, stop on a signal."""
        import time
        from tqdm import tqdm
        start = self.load(quantizers, opt, sched, gen, losses) if self.resume else 0
        guard, self.t0 = FiniteGuard(quantizers, start), time.time()
        with StopOnSignal() as stop:
            hide = not self.progress or bool(self.rank)
            bar = tqdm(range(start, steps), desc="train scales", disable=hide)
            for step in bar:
                guard.remember()
                yield step
                loss = self.comm.mean(losses[-1]) if self.comm else losses[-1]
                losses[-1] = guard.check(loss, step)
                self.first = self.first or time.time() - self.t0
                # all ranks stop together
                flag = self.comm.any(stop.flag) if self.comm else stop.flag
                last = step + 1 == steps
                if self.path and (flag or last or (self.every and (step + 1) % self.every == 0)):
                    self.save(step + 1, quantizers, opt, sched, gen, losses)
                if flag:
                    where = (f"state saved to {self.path}, continue with --resume" if not
                             self.state_error else f"the state could not be saved "
                             f"({self.state_error})")
                    raise Stopped(f"{stop.flag or 'a signal to another rank'} after step "
                                  f"{step + 1} of "
                                  f"{steps}; {where}")

    def save(self, step, quantizers, opt, sched, gen, losses):
        if self.rank:
            return
        state = {"step": step, "quantizers": quantizers.state_dict(), "opt": opt.state_dict(),
                 "sched": sched.state_dict(), "gen": gen.get_state(), "losses": losses,
                 "run": self.record, "seconds": self.seconds()}
        try:
            checkpoints.save_state(self.path, state)
            self.state_error = None
        except OSError as e:           # insurance only: the run goes on, the caller learns why
            self.state_error = str(e)
            print(f"warning: {e}; training goes on", file=sys.stderr)

    def load(self, quantizers, opt, sched, gen, losses):
        st = checkpoints.load_state(self.path, self.record)
        quantizers.load_state_dict(st["quantizers"])
        opt.load_state_dict(st["opt"])
        sched.load_state_dict(st["sched"])
        gen.set_state(st["gen"])
        losses[:] = st["losses"]
        self.before = st.get("seconds", 0.0)
        return st["step"]

    def seconds(self) -> float:
        """Training time so far, the part before --resume included."""
        import time
        return self.before + (time.time() - self.t0 if self.t0 else 0.0)

    def save_finished(self, out, save):
        """Write the scales of a finished run with save(out). If that fails, the state (written
        after the last step) lets --resume write them; if the state failed too, the scales go to
        the temporary folder. Returns where they went."""
        from safetensors import SafetensorError
        try:
            save(out)
        except (OSError, SafetensorError) as e:
            why = " ".join(str(e).split())[:120]
            if not self.state_error and self.path and os.path.exists(self.path):
                raise SystemExit(f"error: cannot write {out} ({why}); the trained state is in "
                                 f"{self.path}: make room and run the same command with --resume "
                                 "to write the scales")
            import tempfile
            out = os.path.join(tempfile.mkdtemp(prefix="sasq-"), os.path.basename(out))
            save(out)
            raise SystemExit(f"error: cannot write the scales or the state beside --out ({why}); "
                             f"the scales were saved to {out} instead")
        if self.path and os.path.exists(self.path):
            os.remove(self.path)
        print(f"scales saved to {out}")
        return out


class StopOnSignal:
    """Turn SIGINT/SIGTERM into a flag, so the loop can finish its step, checkpoint and stop
    cleanly."""

    def __enter__(self):
        import signal
        sigs = (signal.SIGINT, signal.SIGTERM)
        self.flag, self.old = None, {s: signal.getsignal(s) for s in sigs}
        for s in self.old:
            signal.signal(s, lambda num, frame: setattr(self, "flag", signal.Signals(num).name))
        return self

    def __exit__(self, *exc):
        import signal
        for s, handler in self.old.items():
            signal.signal(s, handler)


class FiniteGuard:
    """Remembers the scales each step starts from. check() makes one host sync per step (the loss
    and the largest |log s| per parameter); on a non-finite loss or scale it restores the last
    scales that gave a finite loss and raises NonFinite (a non-finite loss condemns this step's
    scales, a finite one only the update)."""

    def __init__(self, quantizers, start):
        self.q, self.params, self.start = quantizers, list(quantizers.parameters()), start
        self.cur = self.prev = None

    def remember(self):
        self.prev, self.cur = self.cur, {k: v.clone() for k, v in self.q.state_dict().items()}

    def check(self, loss, step) -> float:
        vals = torch.stack([loss.detach().float(), *torch._foreach_norm(self.params, float("inf"))])
        vals = vals.tolist()
        if math.isfinite(vals[0]) and all(math.isfinite(v) and v <= LOG_LIMIT for v in vals[1:]):
            return vals[0]
        good, kept = (self.cur, step) if math.isfinite(vals[0]) else (self.prev, step - 1)
        if good is None or kept < self.start:
            raise NonFinite(f"non-finite loss at step {step}, the first step of this run; no "
                            "usable scales", None)
        self.q.load_state_dict(good)
        raise NonFinite(f"non-finite loss or scale at step {step}; kept the scales of step {kept}",
                        kept)
