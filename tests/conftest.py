"""Shared fixtures: a tiny trained BPE tokenizer, tiny random models of every architecture, a corpus
file for their second-moment statistics, and the undamaged runs of the fake editor that the tests of
damaged run files compare with. Shared helper functions live in tests/helpers.py and tests/tiny.py."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerFast

from helpers import FakeEditor, fake_run
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


@pytest.fixture(scope="session")
def reference_run(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer: PreTrainedTokenizerFast):
    """`reference_run(records, known_limit=None, **config)`: the result of an undamaged run of the fake
    editor (`helpers.fake_run`, a `FakeEditor(known_limit)`, `config` passed to `helpers.fake_config`),
    computed once per session for each settings. Read-only: compare with `helpers.same_numbers`."""
    done: dict[str, object] = {}

    def reference(records: list[dict], known_limit: int | None = None, **config):
        key = json.dumps([records, known_limit, config], sort_keys=True, default=repr)
        if key not in done:
            done[key] = fake_run(tmp_path_factory.mktemp("reference"), tiny_tokenizer, records,
                                 editor=FakeEditor(known_limit=known_limit), **config)
        return done[key]

    return reference


@pytest.fixture(scope="session")
def stats_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One on-disk cache of second moments for the session: statistics are stored under the original
    model's identity (weights included), so the tiny models of every module share them safely."""
    return tmp_path_factory.mktemp("stats")


def _weights_digest(model: torch.nn.Module) -> str:
    import hashlib

    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


@pytest.fixture(scope="session")
def toy_gpt2():
    """The committed organism toy-gpt2 as (model, tokenizer) on the CPU, loaded once per session; skips when
    it has not been built. Shared, so read-only: tests edit copies (`edit(..., copy=True)`,
    `copy.deepcopy`). Its weights are checked unchanged when the session ends."""
    from wilke_lib.models import ORGANISMS_DIR, load_model

    if not (ORGANISMS_DIR / "toy-gpt2" / "model.safetensors").is_file():
        pytest.skip("organism toy-gpt2 not built (run `make organisms`)")
    model, tok = load_model("toy-gpt2", device="cpu")
    before = _weights_digest(model)
    yield model, tok
    assert _weights_digest(model) == before, "a test changed the shared toy-gpt2 fixture's weights: edit a copy"


@pytest.fixture(scope="session")
def toy_gpt2_known20(toy_gpt2) -> tuple:
    """(model, tokenizer, records): toy-gpt2 and 20 evenly spaced toy-world records it knows (the known-record
    filter over the 4,800 records runs once per session). Read-only, like `toy_gpt2`."""
    from wilke_lib.counterfact import known_records, load_counterfact
    from wilke_lib.experiments import evenly_spaced

    model, tok = toy_gpt2
    known = known_records(model, tok, load_counterfact("toy-world"))
    assert len(known) >= 20, f"the organism knows only {len(known)} records"
    return model, tok, evenly_spaced(known, 20)
