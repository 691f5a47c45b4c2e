"""What the scripts share on the command line: usage checks before any loading, and one entry point
that turns an error the user can fix into one line and a non-zero exit status."""
import math
import os
import sys

import torch

import data
import model
import sasq

# the least value each numeric option may take (options a script does not have are skipped)
MINIMUM = {"steps": 1, "batch_size": 1, "calib_windows": 1, "heldout": 1, "save_every": 0, "limit": 1,
           "windows": 1, "reps": 1, "repeat": 1, "greedy": 0, "seq_len": 2, "calib_seq_len": 2}
POSITIVE = ("lr", "trunc_mult")      # floats that must be > 0 (and finite)


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
        if bits is not None and bits not in sasq.BITS:
            error(f"--{name} must be in 2..8, got {bits}")
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
    """Before any work: `path` must be a file we may create (or, with force, replace) in an existing,
    writable folder; a directory is never replaced."""
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


def run(main):
    """Script entry point: an error the user can fix (path, file, data, scales, value) becomes one
    'error:' line on stderr and exit status 1; --debug shows the traceback instead."""
    from safetensors import SafetensorError
    sys.stdout.reconfigure(line_buffering=True)      # sent to a file, each result line arrives when printed
    if not sys.stderr.isatty():      # and a progress bar appears after 10 s, then updates every 30 s (not 10/s)
        from functools import partialmethod
        from tqdm import tqdm
        tqdm.__init__ = partialmethod(tqdm.__init__, mininterval=30, delay=10)
    try:
        main()
    except (model.CheckpointError, data.DataError, sasq.ScalesError, ValueError, OSError, SafetensorError) as e:
        if "--debug" in sys.argv:
            raise
        sys.exit(f"error: {e}")
