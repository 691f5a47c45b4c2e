"""Calibration text with no dataset: sampled from the float model itself (LLM-QAT's data-free recipe).

    python train.py --calib self:128                    # 128 windows of --seq-len tokens, all generated
    python train.py --calib wikitext:wikitext-2-raw-v1:train --calib self:128      # a mix (the default)

Liu et al. (LLM-QAT, arXiv 2305.17888) calibrate on text the float model writes: a random first token,
a few greedy tokens, then sampling at temperature 1. Text drawn from the model's own distribution
covers what the model knows, not one corpus' style, so scales trained on it are less fitted to the
calibration text (docs/deploy.md measures how much). The sampler is seeded: the same model, seed and
device give the same windows. Generation runs on the float model, before any quantizer is attached.
"""
import torch
from tqdm import tqdm

PREFIX = "self"                 # the --calib source `self:N`


def is_spec(spec: str) -> bool:
    return spec == PREFIX or spec.startswith(PREFIX + ":")


def parse(spec: str) -> int:
    """`self:N` -> N windows (`self` alone: 128)."""
    n = spec.split(":", 1)[1] if ":" in spec else "128"
    if not n.isdigit() or int(n) < 1:
        raise ValueError(f"--calib {spec}: write self:N with N a positive number of windows")
    return int(n)


@torch.no_grad()
def sample(model, n: int, seq_len: int, seed=0, greedy=3, temperature=1.0, batch=32, bos_id=None, progress=True):
    """(n, seq_len) token windows written by `model`: [BOS,] a uniformly random first token, `greedy` argmax
    tokens, then samples from softmax(logits / temperature). Sequences never stop early: an end-of-text token
    is followed by whatever the model writes next, as a document boundary in a corpus is."""
    device = next(model.parameters()).device
    gen = torch.Generator(device=device).manual_seed(seed)
    vocab, out = model.args.vocab_size, []
    for start in tqdm(range(0, n, batch), desc="generate calibration text", disable=not progress):
        B = min(batch, n - start)
        first = torch.randint(vocab, (B, 1), generator=gen, device=device)
        tokens = first if bos_id is None else torch.cat([first.new_full((B, 1), bos_id), first], 1)
        model.setup_cache(B, seq_len)
        try:
            logits = model(tokens)[0][:, -1]                          # (B, vocab)
            while tokens.shape[1] < seq_len:
                if tokens.shape[1] - (bos_id is not None) <= greedy:
                    nxt = logits.argmax(-1, keepdim=True)
                else:
                    probs = torch.softmax(logits.float() / temperature, -1)
                    nxt = torch.multinomial(probs, 1, generator=gen)  # (B, 1)
                tokens = torch.cat([tokens, nxt], 1)
                if tokens.shape[1] < seq_len:
                    logits = model(nxt, pos=tokens.shape[1] - 1)[0][:, -1]
        finally:
            model.setup_cache(0, 0)
        out.append(tokens.cpu())
    return torch.cat(out)


def windows(model, tok, spec: str, seq_len: int, seed=0, limit=None, progress=True):
    """The windows of a `self:N` source (at most `limit`), in the same form data.token_windows gives.
    Sequences are sampled side by side, 128 at a time on a GPU (a decode step costs about the same for
    1 or 128 of them), 16 on a CPU."""
    n = parse(spec) if limit is None else min(parse(spec), limit)
    batch = 128 if next(model.parameters()).is_cuda else 16
    return sample(model, n, seq_len, seed, batch=batch, bos_id=tok.bos_id if tok.add_bos else None,
                  progress=progress)
