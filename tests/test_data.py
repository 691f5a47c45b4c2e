"""Text sources: the out-of-domain texts from their pinned wheels, and calibration text the model writes."""
import pytest
import torch

import data


@pytest.mark.parametrize("name, start, chars", [("licenses", "Apache License", 120_000),
                                                 ("gospels", "The book of the generation of Jesus Christ", 430_000),
                                                 ("code", "# $Id: states.py", 200_000)])
def test_ood_texts_come_from_their_packages(name, start, chars):
    text = data.load_text(name)
    assert text.startswith(start) and len(text) > chars
    assert name in data.OOD and "wikitext" not in text.lower()[:10_000]


def test_gospels_drop_leading_verse_numbers():
    first = data.load_text("gospels").split("\n\n")[0]      # Matthew 1, one paragraph
    assert first.startswith("The book") and "1:1 " not in first and "1:2 " not in first and first.count("begat") > 30


def test_self_generated_windows_are_seeded(tiny_model):
    a = data.sample(tiny_model, 5, 12, seed=3, batch=2, progress=False)
    b = data.sample(tiny_model, 5, 12, seed=3, batch=2, progress=False)
    c = data.sample(tiny_model, 5, 12, seed=4, batch=2, progress=False)
    assert a.shape == (5, 12) and a.dtype == torch.long
    assert torch.equal(a, b) and not torch.equal(a, c)
    # after the random first token, `greedy` argmax tokens, then samples (which here differ from argmax)
    logits = tiny_model(a[:, :-1])[0]
    argmax = logits.argmax(-1)
    assert torch.equal(a[:, 1:4], argmax[:, :3])
    assert not torch.equal(a[:, 4:], argmax[:, 3:])


def test_self_generated_windows_start_with_bos(tiny_model):
    w = data.sample(tiny_model, 2, 8, seed=0, bos_id=1, progress=False)
    assert (w[:, 0] == 1).all() and torch.equal(w[:, 2:5], tiny_model(w[:, :-1])[0].argmax(-1)[:, 1:4])


def test_self_generated_windows_begin_with_the_openings_round_robin(tiny_model):
    """Window i begins [BOS,] openings[(first + i) % len] (empty: one random token), then `greedy`
    argmax tokens, then samples; a rank's share (first=) continues the round robin."""
    openings = [[], [5, 6, 7], [], [9]]
    w = data.sample(tiny_model, 6, 16, seed=0, batch=4, bos_id=1, progress=False, openings=openings)
    argmax = tiny_model(w[:, :-1])[0].argmax(-1)
    for i, row in enumerate(w):
        head = [1] + openings[i % 4]
        given = max(len(head), 2)
        assert row[:len(head)].tolist() == head
        assert torch.equal(row[given:given + 3], argmax[i, given - 1:given + 2])
        assert not torch.equal(row[given + 3:], argmax[i, given + 2:])
    assert w[0, 1] != w[2, 1]                              # the random first tokens differ
    for first, head in ((1, [1, 5, 6, 7]), (3, [1, 9])):
        shifted = data.sample(tiny_model, 1, 16, bos_id=1, progress=False, openings=openings,
                              first=first)
        assert shifted[0, :len(head)].tolist() == head


def test_decode_steps_equal_the_full_forward(tiny_model):
    """The sampler's step (one token at a device-held position, the whole cache read under a mask)
    gives the logits of one forward over the sequence, at every position (GQA model)."""
    x = torch.randint(64, (3, 20), generator=torch.Generator().manual_seed(0))
    full = tiny_model(x)[0]
    step = data.decoder(tiny_model, 3, 20, graph=False)
    try:
        steps = torch.stack([step(x[:, p:p + 1], p).clone() for p in range(20)], 1)
    finally:
        tiny_model.setup_cache(0, 0)
    torch.testing.assert_close(steps, full, atol=1e-5, rtol=1e-5)
    assert all(layer.attention.cache is None for layer in tiny_model.layers)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_graph_sampler_writes_what_the_eager_one_does(tiny_model):
    m = tiny_model.cuda()
    a = data.sample(m, 5, 30, seed=1, batch=4, progress=False, graph=True)
    b = data.sample(m, 5, 30, seed=1, batch=4, progress=False, graph=False)
    assert torch.equal(a, b)


@pytest.mark.parametrize("spec, n", [("self", 128), ("self:7", 7), ("self:7:genres", 7)])
def test_self_spec(spec, n):
    assert data.is_self(spec) and data.parse_self(spec) == n
    assert data.self_openings(spec) == (data.OPENINGS if spec.endswith("genres") else ("",))
    assert not data.is_self("selfish.txt")
    for bad in ("self:0", "self:7:genre", "self:7:genres:x"):
        with pytest.raises(data.DataError, match="self:N"):
            data.parse_self(bad)


def test_an_unreachable_dataset_names_the_local_forms(tmp_path):
    """Offline, a hub id fails with the forms that work without the hub (issue 23)."""
    with pytest.raises(data.DataError, match="name a local text"):
        data.load_text("no-such-dataset-anywhere:cfg:train")
    with pytest.raises(data.DataError) as e:                    # a local folder: no hint, the folder is named
        data.load_text(f"{tmp_path}:cfg:train")
    assert "name a local text" not in str(e.value)


def test_unreachable_hub_fails_at_once_naming_the_fix(monkeypatch):
    """Offline, a hub dataset name fails with one line naming a local form, without datasets' retry loop
    (the probe finds the hub closed and datasets goes straight to its cache)."""
    import datasets
    for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(v, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")        # the discard port: nothing listens
    assert not data.hub_reachable()
    before = datasets.config.HF_HUB_OFFLINE
    with pytest.raises(data.DataError, match="hub is not reachable.*FOLDER:CONFIG:SPLIT"):
        data.load_text("no-such-org/no-such-dataset:x:train")
    assert datasets.config.HF_HUB_OFFLINE == before


def test_sampler_batch_fits_the_free_memory():
    """The self-written text's KV cache is sized from the free memory: a LLaMA-2-7B model (1 GiB of
    bf16 cache per 2,048-token sequence) samples 32 at a time with 65 GiB free, not 128 (128 GiB)."""
    import model
    with torch.device("meta"):
        m = model.Transformer(model.ModelArgs()).to(torch.bfloat16)
    assert data.sampler_batch(m, 2048, free=65 * 2**30) == 32
    assert data.sampler_batch(m, 2048, free=10 * 2**30) == 4      # 5 GiB for 1 GiB + logits each
    assert data.sampler_batch(m, 2048, free=2**30) == 1
    assert data.sampler_batch(m, 256, free=10**15) == 128


def test_self_windows_allocate_no_more_cache_than_the_memory_bound(tiny_model, monkeypatch):
    """A tiny model given the free memory of 3 sequences' cache: the sampler writes 7 windows 3 at a time
    and never allocates a cache for more (the bound that keeps a 7B model's text on one 80 GB GPU)."""
    a = tiny_model.args
    per_seq = 2 * a.n_layers * a.n_kv_heads * (a.dim // a.n_heads) * 16 * 4 + 8 * a.vocab_size
    real, shapes = data.sampler_batch, []
    monkeypatch.setattr(data, "sampler_batch", lambda m, seq_len: real(m, seq_len, free=2 * 3 * per_seq))

    class Recording(data.StepCache):
        def __init__(self, shape, like):
            shapes.append(shape)
            super().__init__(shape, like)
    monkeypatch.setattr(data, "StepCache", Recording)
    tok = type("Tok", (), {"bos_id": 1, "add_bos": True})()
    w = data.self_windows(tiny_model, tok, "self:7", 16, progress=False)
    assert w.shape == (7, 16) and (w[:, 0] == 1).all()
    assert {s[0] for s in shapes} == {3, 1} and max(s[0] for s in shapes) == 3
    assert len(shapes) == 3 * a.n_layers                         # batches of 3, 3, 1: one cache per layer
