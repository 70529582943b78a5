"""Shared fixtures: a tiny trained BPE tokenizer, tiny random models of every architecture and a corpus
file for their second-moment statistics."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerFast

from tiny import TINY_ARCHS, make_tiny_model, make_tiny_tokenizer, tiny_corpus

# Tiny models spend their time in per-op overhead, which extra threads only add to (and on a
# shared 2-core machine they oversubscribe it): one thread makes the suite about 20x faster.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level BPE (vocab 400) with eos `<|endoftext|>` (id 0) and pad `<pad>` (id 1)."""
    return make_tiny_tokenizer()


@pytest.fixture(params=TINY_ARCHS)
def tiny_model(request: pytest.FixtureRequest, tiny_tokenizer: PreTrainedTokenizerFast) -> PreTrainedModel:
    """A fresh (so tests may edit it) 4-layer, d_model 32 random model, one per architecture."""
    return make_tiny_model(request.param, len(tiny_tokenizer),
                           eos_token_id=tiny_tokenizer.eos_token_id, pad_token_id=tiny_tokenizer.pad_token_id)


@pytest.fixture(scope="session", autouse=True)
def _results_outside_the_repository(tmp_path_factory: pytest.TempPathFactory):
    """Runs, cached analyses and figures of the tests go to a temporary folder, never to the book's."""
    root = tmp_path_factory.mktemp("wilke")
    saved = {k: os.environ.get(k) for k in ("WILKE_RUNS_DIR", "WILKE_RESULTS_DIR", "WILKE_FIGURES_DIR")}
    for key in saved:
        os.environ[key] = str(root / key.split("_")[1].lower())
    yield
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(scope="session")
def corpus_file(tmp_path_factory) -> Path:
    """Fact sentences plus random letter strings: enough distinct tokens for a full-rank C."""
    rng = random.Random(0)
    letters = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
    noise = [" ".join("".join(rng.choice(letters) for _ in range(rng.randint(2, 7))) for _ in range(8))
             for _ in range(400)]
    path = tmp_path_factory.mktemp("corpus") / "tiny.txt"
    path.write_text("\n".join(tiny_corpus(400) + noise), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def tok(tiny_tokenizer: PreTrainedTokenizerFast) -> PreTrainedTokenizerFast:
    """The tiny tokenizer, under the short name the editor tests use."""
    return tiny_tokenizer
