"""Second-moment statistics C = E[k k^T] of mlp_out inputs, and their on-disk cache."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tiny import make_tiny_model, make_tiny_tokenizer, tiny_corpus
from wilke_lib import second_moments as stats
from wilke_lib.arch import ModelAdapter
from wilke_lib.models import model_identity


@pytest.fixture(scope="module")
def tok():
    return make_tiny_tokenizer()


@pytest.fixture
def corpus(tmp_path) -> Path:
    path = tmp_path / "corpus.txt"
    path.write_text("\n".join(tiny_corpus(60, seed=3)) + "\n\n", encoding="utf-8")
    return path


def model_of(arch: str, tok):
    return make_tiny_model(arch, len(tok), eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)


def manual_second_moment(model, tok, layer: int, texts: list[str]) -> torch.Tensor:
    """E[k k^T] text by text, without padding: the reference."""
    adapter = ModelAdapter(model)
    keys = []
    handle = adapter.mlp_out(layer).register_forward_pre_hook(lambda m, args: keys.append(args[0][0].double()))
    with torch.no_grad():
        for text in texts:
            model(input_ids=torch.tensor([tok(text)["input_ids"]]))
    handle.remove()
    K = torch.cat(keys)
    return K.T @ K / K.shape[0]


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_matches_manual_computation(arch, tok, corpus, tmp_path):
    model = model_of(arch, tok)
    texts = [line for line in corpus.read_text().splitlines() if line.strip()][:50]
    C = stats.second_moment(model, tok, 1, str(corpus), n_samples=50, batch_size=16, dtype=torch.float64,
                            cache_dir=tmp_path / "cache", progress=False)
    d_mlp = ModelAdapter(model).d_mlp
    assert C.shape == (d_mlp, d_mlp) and C.dtype == torch.float64
    reference = manual_second_moment(model, tok, 1, texts)
    assert torch.allclose(C, reference, rtol=1e-5, atol=1e-6)  # stored as float32
    assert torch.allclose(C, C.T)
    assert torch.linalg.eigvalsh(C).min() > -1e-5


def test_cache_layout_and_disk_hit(tok, corpus, tmp_path, monkeypatch):
    model = model_of("gptj", tok)
    cache_dir = tmp_path / "cache"
    first = stats.second_moments(model, tok, [0, 2], str(corpus), n_samples=40, batch_size=8,
                                 cache_dir=cache_dir, progress=False)
    key = model_identity(model)
    for layer in (0, 2):
        path = stats.stats_path(key, str(corpus), layer, 40, cache_dir)
        assert path.is_file()
        assert path.parent.parent.name == key
        assert path.name == f"layer{layer}_n40.safetensors"
        assert path.parent.name == stats.corpus_key(str(corpus))

    def no_compute(*args, **kwargs):
        raise AssertionError("recomputed")

    monkeypatch.setattr(stats, "_accumulate", no_compute)
    again = stats.second_moment(model, tok, 2, str(corpus), n_samples=40, cache_dir=cache_dir, progress=False)
    assert torch.equal(again, first[2])
    # a different n_samples is another file: it would have to be computed
    with pytest.raises(AssertionError, match="recomputed"):
        stats.second_moment(model, tok, 2, str(corpus), n_samples=41, cache_dir=cache_dir, progress=False)


def test_one_pass_equals_single_layers(tok, corpus, tmp_path):
    model = model_of("gpt_neox", tok)
    together = stats.second_moments(model, tok, [1, 3], str(corpus), 30, cache_dir=tmp_path / "a", progress=False)
    alone = stats.second_moment(model, tok, 3, str(corpus), 30, cache_dir=tmp_path / "b", progress=False)
    assert torch.allclose(together[3], alone, rtol=1e-6, atol=1e-7)


def test_model_key_is_explicit(tok, corpus, tmp_path):
    """Edited weights do not change where stats are read from; an explicit key chooses the folder."""
    model = model_of("gpt2", tok)
    stats.second_moment(model, tok, 1, str(corpus), 20, model_key="original-model", cache_dir=tmp_path,
                        progress=False)
    assert stats.stats_path("original-model", str(corpus), 1, 20, tmp_path).is_file()
    assert not (tmp_path / model_identity(model)).exists()


def test_corpus_key(tmp_path):
    assert stats.corpus_key("toy-world") == "toy-world"
    assert "/" not in stats.corpus_key("some/odd name")
    path = tmp_path / "wiki.txt"
    path.write_text("a\nb\n")
    first = stats.corpus_key(str(path))
    assert first.startswith("wiki-")
    path.write_text("a\nc\n")
    assert stats.corpus_key(str(path)) != first


def test_a_statistics_file_of_another_layer_or_corrupt_is_recomputed(tok, corpus, tmp_path):
    """A file copied from another layer, or garbage, is never used: it is recomputed."""
    import shutil

    model = model_of("gpt2", tok)
    cache_dir = tmp_path / "cache"
    first = stats.second_moments(model, tok, [0, 1], str(corpus), 20, cache_dir=cache_dir, progress=False)
    assert not torch.equal(first[0], first[1])
    key = model_identity(model)
    layer0, layer1 = (stats.stats_path(key, str(corpus), layer, 20, cache_dir) for layer in (0, 1))
    shutil.copy(layer0, layer1)  # layer 0's statistics under layer 1's name
    assert torch.equal(stats.second_moment(model, tok, 1, str(corpus), 20, cache_dir=cache_dir, progress=False),
                       first[1])
    layer1.write_bytes(b"not a safetensors file")
    assert torch.equal(stats.second_moment(model, tok, 1, str(corpus), 20, cache_dir=cache_dir, progress=False),
                       first[1])
