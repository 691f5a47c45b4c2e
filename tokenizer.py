"""The tokenizers a LLaMA checkpoint comes with, behind one interface: SentencePiece (Meta's
tokenizer.model), Hugging Face `tokenizers` (tokenizer.json, Meta's Llama 3 tiktoken file), and the
byte-level BPE a GGUF file stores in its metadata."""

import json
import os


class TokenizerError(ValueError):
    """A tokenizer we cannot build; model.py names the checkpoint."""


class Tokenizer:
    """One interface over SentencePiece (`tokenizer.model`) and HF `tokenizers` (tokenizer.json,
    GGUF BPE)."""

    def __init__(self, backend, bos_id, eos_id, add_bos: bool):
        self.backend, self.bos_id, self.eos_id, self.add_bos = backend, bos_id, eos_id, add_bos

    @classmethod
    def from_sentencepiece(cls, path):
        import sentencepiece as spm
        sp = spm.SentencePieceProcessor(model_file=str(path))
        return cls(sp, sp.bos_id(), sp.eos_id(), add_bos=True)

    @classmethod
    def from_tokenizer_json(cls, path, eos_id, add_bos=None):
        """tokenizer.json; whether a BOS starts each text is what its post-processor does (Llama 3:
        <|begin_of_text|>, Qwen2: none), unless tokenizer_config.json's add_bos_token says."""
        from tokenizers import Tokenizer as HFTokenizer
        tok = HFTokenizer.from_file(str(path))
        plain = tok.encode("a", add_special_tokens=False).ids
        special = tok.encode("a", add_special_tokens=True).ids
        bos = special[0] if len(special) > len(plain) and special[1:] == plain else None
        return cls(tok, bos, eos_id, bool(bos is not None if add_bos is None else add_bos))

    @classmethod
    def from_gguf(cls, reader):
        """Rebuild a GPT-2-style byte-level BPE from the vocabulary and merges stored in a GGUF."""
        from tokenizers import (
            AddedToken,
            Tokenizer as HFTokenizer,
            decoders,
            models,
            pre_tokenizers,
        )

        fields = reader.fields
        kind, pre = fields["tokenizer.ggml.model"].contents(), fields.get("tokenizer.ggml.pre")
        pre = pre.contents() if pre is not None else "gpt2"
        if kind != "gpt2" or pre not in GGUF_PRETOKENIZERS:
            raise TokenizerError(f"GGUF tokenizer {kind}/{pre} is not supported; "
                                 "put its tokenizer.model next to the .gguf file")
        tokens = fields["tokenizer.ggml.tokens"].contents()
        merges = [tuple(m.split(" ", 1)) for m in fields["tokenizer.ggml.merges"].contents()]
        tok = HFTokenizer(models.BPE({t: i for i, t in enumerate(tokens)}, merges))
        tok.pre_tokenizer = pre_tokenizers.Sequence(GGUF_PRETOKENIZERS[pre]())
        tok.decoder = decoders.ByteLevel()
        types = fields["tokenizer.ggml.token_type"].contents()
        tok.add_special_tokens(
            [AddedToken(t, special=True) for t, ty in zip(tokens, types) if ty == 3]
        )
        get = lambda k, d: fields[k].contents() if k in fields else d  # noqa: E731
        return cls(
            tok,
            get("tokenizer.ggml.bos_token_id", None),
            get("tokenizer.ggml.eos_token_id", None),
            add_bos=bool(get("tokenizer.ggml.add_bos_token", True)),
        )

    def encode(self, text: str, bos: bool | None = None) -> list[int]:
        bos = self.add_bos if bos is None else bos
        if hasattr(self.backend, "encode_as_ids"):
            ids = self.backend.encode_as_ids(text)
        else:
            ids = self.backend.encode(text, add_special_tokens=False).ids
        return ([self.bos_id] if bos and self.bos_id is not None else []) + ids

    def decode(self, ids) -> str:
        return self.backend.decode(list(ids))


def _pretok_gpt2():
    from tokenizers import pre_tokenizers as pt
    return [pt.ByteLevel(add_prefix_space=False)]


def _pretok_digits():
    from tokenizers import pre_tokenizers as pt
    return [pt.Digits(individual_digits=True), pt.ByteLevel(add_prefix_space=False)]


# llama.cpp's `tokenizer.ggml.pre` names the pre-tokenizer; the ones we can rebuild:
GGUF_PRETOKENIZERS = {"gpt2": _pretok_gpt2, "smollm": _pretok_digits}


def from_hf_folder(folder, cfg):
    """A Hugging Face folder's tokenizer: tokenizer.model (SentencePiece, or Meta's Llama 3
    tiktoken file) or tokenizer.json; `cfg`: its config.json."""
    tc_path = os.path.join(folder, "tokenizer_config.json")
    tc = json.load(open(tc_path)) if os.path.exists(tc_path) else {}
    if os.path.exists(os.path.join(folder, "tokenizer.model")):
        return from_model_file(os.path.join(folder, "tokenizer.model"))
    if os.path.exists(os.path.join(folder, "tokenizer.json")):
        return Tokenizer.from_tokenizer_json(os.path.join(folder, "tokenizer.json"),
                                             cfg.get("eos_token_id"), tc.get("add_bos_token"))
    raise TokenizerError(f"{folder}: no tokenizer.model or tokenizer.json")


def from_model_file(path):
    """tokenizer.model: SentencePiece (LLaMA-2) or tiktoken's text format (Meta's Llama 3)."""
    with open(path, "rb") as f:
        head = f.read(256).split(b"\n")[0].split()
    if len(head) == 2 and head[1].isdigit():      # "<base64 token> <rank>" lines
        return from_tiktoken(path)
    return Tokenizer.from_sentencepiece(path)


# Llama 3's pre-tokenizer split (Meta's tokenizer.py): contractions, letters, 1-3 digits, others
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
                r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


def from_tiktoken(path):
    """Meta's Llama 3 tokenizer.model (byte-pair ranks, base64) as a `tokenizers` byte-level BPE.
    tiktoken merges, anywhere in a piece, the adjacent pair whose concatenation ranks lowest; so
    every split of a token into two ranked parts is a merge with the token's rank as priority. A
    token's rank is its id; 256 special tokens follow the ranks, the first the BOS."""
    import base64
    from tokenizers import AddedToken, Regex, Tokenizer as HFTokenizer, decoders, models
    from tokenizers import pre_tokenizers as pt
    ranks = {}
    with open(path, "rb") as f:
        for line in f:
            if line.strip():
                token, rank = line.split()
                ranks[base64.b64decode(token)] = int(rank)
    byte_char = _bytes_to_unicode()
    text = lambda b: "".join(byte_char[c] for c in b)  # noqa: E731
    merges = [(text(t[:i]), text(t[i:])) for t, _ in sorted(ranks.items(), key=lambda kv: kv[1])
              for i in range(1, len(t)) if t[:i] in ranks and t[i:] in ranks]
    vocab = {text(b): r for b, r in ranks.items()}
    tok = HFTokenizer(models.BPE(vocab, merges, ignore_merges=True))
    tok.pre_tokenizer = pt.Sequence([pt.Split(Regex(LLAMA3_SPLIT), "isolated"),
                                     pt.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    n = len(ranks)
    names = ["<|begin_of_text|>", "<|end_of_text|>"] + [
        f"<|reserved_special_token_{i}|>" for i in range(254)]
    tok.add_special_tokens([AddedToken(t, special=True) for t in names])
    return Tokenizer(tok, n, n + 1, add_bos=True)


def _bytes_to_unicode():
    """GPT-2's map of the 256 bytes to printable characters (byte-level BPE vocabularies use it)."""
    keep = [*range(33, 127), *range(161, 173), *range(174, 256)]
    extra = [b for b in range(256) if b not in keep]
    return {**{b: chr(b) for b in keep}, **{b: chr(256 + i) for i, b in enumerate(extra)}}
