"""The tokenizers a LLaMA checkpoint comes with, behind one interface: SentencePiece (Meta's tokenizer.model),
Hugging Face `tokenizers` (tokenizer.json), and the byte-level BPE a GGUF file stores in its metadata."""
import json
import os


class TokenizerError(ValueError):
    """A tokenizer we cannot build; model.py names the checkpoint."""


class Tokenizer:
    """One interface over SentencePiece (`tokenizer.model`) and HF `tokenizers` (tokenizer.json, GGUF BPE)."""

    def __init__(self, backend, bos_id, eos_id, add_bos: bool):
        self.backend, self.bos_id, self.eos_id, self.add_bos = backend, bos_id, eos_id, add_bos

    @classmethod
    def from_sentencepiece(cls, path):
        import sentencepiece as spm
        sp = spm.SentencePieceProcessor(model_file=str(path))
        return cls(sp, sp.bos_id(), sp.eos_id(), add_bos=True)

    @classmethod
    def from_tokenizer_json(cls, path, bos_id, eos_id, add_bos):
        from tokenizers import Tokenizer as HFTokenizer
        return cls(HFTokenizer.from_file(str(path)), bos_id, eos_id, add_bos)

    @classmethod
    def from_gguf(cls, reader):
        """Rebuild a GPT-2-style byte-level BPE from the vocabulary and merges stored in a GGUF."""
        from tokenizers import AddedToken, Tokenizer as HFTokenizer, decoders, models, pre_tokenizers
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
        tok.add_special_tokens([AddedToken(t, special=True) for t, ty in zip(tokens, types) if ty == 3])
        get = lambda k, d: fields[k].contents() if k in fields else d  # noqa: E731
        return cls(tok, get("tokenizer.ggml.bos_token_id", None), get("tokenizer.ggml.eos_token_id", None),
                   add_bos=bool(get("tokenizer.ggml.add_bos_token", True)))

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
    """A Hugging Face folder's tokenizer: tokenizer.model (SentencePiece) or tokenizer.json; `cfg`: its config.json."""
    tc_path = os.path.join(folder, "tokenizer_config.json")
    tc = json.load(open(tc_path)) if os.path.exists(tc_path) else {}
    if os.path.exists(os.path.join(folder, "tokenizer.model")):
        return Tokenizer.from_sentencepiece(os.path.join(folder, "tokenizer.model"))
    if os.path.exists(os.path.join(folder, "tokenizer.json")):
        return Tokenizer.from_tokenizer_json(os.path.join(folder, "tokenizer.json"), cfg.get("bos_token_id"),
                                             cfg.get("eos_token_id"), tc.get("add_bos_token", True))
    raise TokenizerError(f"{folder}: no tokenizer.model or tokenizer.json")
