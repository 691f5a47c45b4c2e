"""The model families people serve, each against `transformers` on tiny random configurations saved by
it (fp32): Llama 3.x (scaled RoPE, tied heads), Mistral, Qwen2 (q/k/v biases), in transformers 5's
config form and in the hub's; and what this model cannot compute exactly, refused before any weight
is read."""
import json
import shutil

import pytest
import torch

import checkpoints
import data
import tokenizer
from conftest import SP_MODEL

COMMON = dict(vocab_size=32000, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
              rms_norm_eps=1e-5)
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 64}
FAMILIES = {   # name: (transformers config class, its options)
    "llama-2 gqa": ("LlamaConfig", {}),
    "llama-3.1 (llama3 RoPE)": ("LlamaConfig", {"rope_theta": 500000.0, "rope_scaling": LLAMA3}),
    "llama-3.2 (tied head)": ("LlamaConfig", {"rope_theta": 500000.0, "rope_scaling": LLAMA3,
                                              "tie_word_embeddings": True}),
    "linear RoPE": ("LlamaConfig", {"rope_scaling": {"rope_type": "linear", "factor": 2.0}}),
    "mistral (theta 1e6)": ("MistralConfig", {"rope_theta": 1e6, "sliding_window": None}),
    "qwen2 (biases)": ("Qwen2Config", {"rope_theta": 1e6, "tie_word_embeddings": True}),
}


def save_hf(folder, cls, hub_form=False, **options):
    """A random model of this family saved by transformers; hub_form rewrites its config.json the
    way the hub's published configs read (top-level rope_theta and rope_scaling)."""
    import transformers
    cfg = getattr(transformers, cls)(**{**COMMON, **options})
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():             # transformers starts biases at 0 and weights tiny
        for name, p in hf.named_parameters():
            p.normal_(1.0 if "norm" in name else 0.0, 0.3 if "bias" in name else 0.1)
    hf.save_pretrained(folder)
    shutil.copy(SP_MODEL, folder / "tokenizer.model")
    if hub_form:
        path = folder / "config.json"
        c = json.loads(path.read_text())
        rope = c.pop("rope_parameters")
        c["rope_theta"] = rope.pop("rope_theta")
        if rope.get("rope_type", "default") != "default":
            c["rope_scaling"] = rope
        path.write_text(json.dumps(c))
    return hf


@pytest.mark.parametrize("hub_form", [False, True], ids=["transformers-5 form", "hub form"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_matches_transformers(tmp_path, family, hub_form):
    cls, options = FAMILIES[family]
    hf = save_hf(tmp_path / "m", cls, hub_form, **options)
    ours, _ = checkpoints.load_model(str(tmp_path / "m"))
    tokens = torch.randint(0, 32000, (1, 96), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref, got = hf(tokens).logits, ours(tokens)[0]
    print("DIFF", family, float((ref - got).abs().max()), float(ref.abs().max()))
    # fp32: 3e-6 here (a few ulps of logits near 4); another CPU's BLAS sums in another order, so the
    # bound is relative to the logits' size. A wrong RoPE or theta differs by 2e-2 (docs/LOG.md).
    assert (ref - got).abs().max() < 1e-5 * ref.abs().max(), (family, (ref - got).abs().max())
    assert ref.abs().max() > 0.5          # the logits are not all near zero


def test_scaled_rope_changes_positions_beyond_the_original_context(tmp_path):
    """The llama3 scaling matters: reading it as plain RoPE would differ past 64 positions."""
    save_hf(tmp_path / "m", "LlamaConfig", rope_theta=500000.0, rope_scaling=LLAMA3)
    ours, _ = checkpoints.load_model(str(tmp_path / "m"))
    plain = checkpoints.load_model(str(tmp_path / "m"))[0]
    plain.args.rope_scaling = None
    plain.init_rope()
    tokens = torch.randint(0, 32000, (1, 96), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (ours(tokens)[0] - plain(tokens)[0]).abs().max() > 1e-3


def test_meta_llama3_params_json_reads_the_scaled_rope():
    """Meta's params.json says use_scaled_rope; the factor is 8 for Llama 3.1 (32+ layers) and 32
    for 3.2 1B/3B, so a smaller model without an explicit factor is refused, not guessed."""
    p = {"dim": 64, "n_layers": 32, "n_heads": 4, "n_kv_heads": 2, "multiple_of": 32,
         "rope_theta": 500000.0, "use_scaled_rope": True}
    a = checkpoints.args_from_params_json(p, vocab_size=128256)
    assert a.rope_scaling == {"type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                              "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    small = {**p, "n_layers": 16}
    with pytest.raises(ValueError, match="rope_scaling_factor"):
        checkpoints.args_from_params_json(small, vocab_size=128256)
    assert checkpoints.args_from_params_json({**small, "rope_scaling_factor": 32.0},
                                             128256).rope_scaling["factor"] == 32.0


def refused(folder, cfg, words):
    """A config refused in one line naming what is wrong, before the (corrupt) weights are read."""
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({**COMMON, **cfg}))
    (folder / "model.safetensors").write_bytes(b"not weights: reading them would fail otherwise")
    with pytest.raises(checkpoints.CheckpointError, match=words) as e:
        checkpoints.load_model(str(folder))
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("cfg, words", [
    ({"model_type": "gpt_neox"}, "model_type 'gpt_neox' is not supported"),
    ({"model_type": "llama", "rope_scaling": {"rope_type": "yarn", "factor": 4.0}},
     "RoPE scaling type 'yarn' is not supported"),
    ({"model_type": "llama", "rope_parameters": {"rope_theta": 1e4, "rope_type": "dynamic"}},
     "RoPE scaling type 'dynamic' is not supported"),
    ({"model_type": "llama", "attention_bias": True}, "attention_bias=True"),
    ({"model_type": "mistral", "head_dim": 32}, "head_dim=32"),
])
def test_unsupported_configs_are_refused_before_loading(tmp_path, cfg, words):
    refused(tmp_path / "m", cfg, words)


def test_gguf_of_another_architecture_is_refused(tmp_path):
    import gguf
    w = gguf.GGUFWriter(str(tmp_path / "q.gguf"), "qwen2")
    w.add_tensor("token_embd.weight", torch.zeros(8, 4).numpy())
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    with pytest.raises(checkpoints.CheckpointError, match="architecture 'qwen2' is not supported"):
        checkpoints.load_model(str(tmp_path / "q.gguf"))


def test_sliding_window_shorter_than_the_sequence_is_refused(tmp_path):
    save_hf(tmp_path / "m", "MistralConfig", sliding_window=32)
    m, _ = checkpoints.load_model(str(tmp_path / "m"))
    data.check_seq_len(m, 32)                          # exact: the window covers the sequence
    with pytest.raises(data.DataError, match="sliding attention window of 32"):
        data.check_seq_len(m, 64)


def test_tiktoken_model_file_encodes_as_tiktoken(tmp_path):
    """Meta's Llama 3 tokenizer.model (tiktoken ranks) read through `tokenizers` gives tiktoken's
    ids; ranks trained here with tiktoken's own reference trainer (no Llama 3 file ships in a wheel
    on the package index that we know of)."""
    import base64
    import tiktoken
    from tiktoken._educational import bpe_train
    train = data.load_text("comedies")[:20000]
    ranks = bpe_train(train, 400, tokenizer.LLAMA3_SPLIT)
    path = tmp_path / "tokenizer.model"
    path.write_bytes(b"".join(base64.b64encode(t) + b" %d\n" % r for t, r in ranks.items()))
    ref = tiktoken.Encoding("t", pat_str=tokenizer.LLAMA3_SPLIT, mergeable_ranks=ranks,
                            special_tokens={})
    ours = tokenizer.from_model_file(path)
    text = data.load_text("hamlet")[:5000] + " 12345 ünïcødé\n\n  tabs\tand 'll"
    assert ours.encode(text) == [ours.bos_id] + ref.encode(text)
    assert ours.bos_id == len(ranks) and ours.decode(ours.encode(text)[1:]) == text


def test_tokenizer_json_bos_follows_its_post_processor(tmp_path):
    """Llama 3's tokenizer.json adds <|begin_of_text|> in its post-processor, Qwen2's adds nothing:
    the BOS we add is whatever the file's own post-processor adds."""
    from tokenizers import Tokenizer as HFTokenizer, models, pre_tokenizers, processors
    hf = HFTokenizer(models.BPE({"a": 0, "b": 1, "<s>": 2}, []))
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.save(str(tmp_path / "plain.json"))
    hf.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 2)])
    hf.save(str(tmp_path / "bos.json"))
    assert tokenizer.Tokenizer.from_tokenizer_json(tmp_path / "bos.json", None).bos_id == 2
    assert tokenizer.Tokenizer.from_tokenizer_json(tmp_path / "bos.json", None).add_bos
    assert not tokenizer.Tokenizer.from_tokenizer_json(tmp_path / "plain.json", None).add_bos
