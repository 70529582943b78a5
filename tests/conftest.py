"""Shared fixtures: a tiny trained BPE tokenizer and tiny random models of every architecture."""

from __future__ import annotations

import pytest
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerFast

from tiny import TINY_ARCHS, make_tiny_model, make_tiny_tokenizer

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
