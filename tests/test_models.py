"""Loading models: save/load round trip, device, dtype, pad token, organism paths, identity."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from tiny import make_tiny_model
from wilke_lib import models
from wilke_lib.models import (default_device, model_key, load_model, model_identity, resolve_dtype,
                              resolve_model_path)


def _save_tiny(directory: Path, arch: str, tok) -> torch.nn.Module:
    model = make_tiny_model(arch, len(tok), eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    model.save_pretrained(directory)
    tok.save_pretrained(directory)
    return model


@pytest.mark.parametrize("arch", ["gpt2", "gptj"])
def test_save_load_round_trip_gives_same_logits(tmp_path, tiny_tokenizer, arch):
    original = _save_tiny(tmp_path, arch, tiny_tokenizer)
    model, tok = load_model(tmp_path, device="cpu")
    assert not model.training
    assert model.dtype == torch.float32
    ids = torch.tensor([tiny_tokenizer("The mother tongue of Valo Durn is")["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, original(ids).logits, rtol=0, atol=0)
    assert tok("Valo Durn")["input_ids"] == tiny_tokenizer("Valo Durn")["input_ids"]
    # Same config and size: only the directory name part of the identity may differ.
    assert model_identity(model).split("-")[-2:] == model_identity(original).split("-")[-2:]
    assert model_identity(model) == model_identity(model)
    assert model_identity(model).startswith(tmp_path.name)


def test_identity_differs_between_models(tiny_tokenizer):
    small = make_tiny_model("gpt2", len(tiny_tokenizer), n_layers=2)
    large = make_tiny_model("gpt2", len(tiny_tokenizer), n_layers=3)
    assert model_identity(small) != model_identity(large)
    retrained = copy.deepcopy(small)  # same configuration, other weights: a retrained organism
    with torch.no_grad():
        next(retrained.parameters()).add_(1e-3)
    assert model_identity(retrained) != model_identity(small)


def test_default_device_follows_cuda(monkeypatch):
    assert default_device() == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert default_device() == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert default_device() == torch.device("cuda")


def test_load_model_uses_default_device(tmp_path, tiny_tokenizer):
    _save_tiny(tmp_path, "gpt2", tiny_tokenizer)
    model, _ = load_model(str(tmp_path))
    assert next(model.parameters()).device.type == default_device().type


def test_pad_token_is_set_from_eos(tmp_path, tiny_tokenizer):
    _save_tiny(tmp_path, "gpt2", tiny_tokenizer)
    no_pad = tiny_tokenizer.__class__.from_pretrained(tmp_path)
    no_pad.pad_token = None
    no_pad.save_pretrained(tmp_path)
    _, tok = load_model(tmp_path, device="cpu")
    assert tok.pad_token == tok.eos_token == "<|endoftext|>"
    assert tok.padding_side == "right"


def test_dtype_strings(tmp_path, tiny_tokenizer):
    _save_tiny(tmp_path, "gptj", tiny_tokenizer)
    model, _ = load_model(tmp_path, device="cpu", dtype="bfloat16")
    assert model.dtype == torch.bfloat16
    assert resolve_dtype(None) == torch.float32
    assert resolve_dtype("float16") == torch.float16
    assert resolve_dtype(torch.float64) == torch.float64
    with pytest.raises(ValueError, match="unknown dtype"):
        resolve_dtype("float8")


def test_missing_organism_says_make_organisms(tmp_path, monkeypatch):
    monkeypatch.setattr(models, "ORGANISMS_DIR", tmp_path / "organisms")
    with pytest.raises(FileNotFoundError, match="make organisms"):
        resolve_model_path("toy-gpt2")
    with pytest.raises(FileNotFoundError, match="toy-gptj"):
        load_model("toy-gptj", device="cpu")


def test_built_organism_and_other_names_resolve(tmp_path, monkeypatch):
    organism = tmp_path / "organisms" / "toy-gpt2"
    organism.mkdir(parents=True)
    (organism / "config.json").write_text("{}")
    monkeypatch.setattr(models, "ORGANISMS_DIR", tmp_path / "organisms")
    assert resolve_model_path("toy-gpt2") == str(organism)
    assert resolve_model_path(tmp_path) == str(tmp_path)
    assert resolve_model_path("EleutherAI/gpt-j-6b") == "EleutherAI/gpt-j-6b"


def test_organisms_dir_is_beside_the_package():
    assert models.ORGANISMS_DIR == Path(models.__file__).resolve().parents[1] / "organisms"


def test_model_key_follows_the_weights(tmp_path, tiny_tokenizer):
    model = make_tiny_model("gpt2", len(tiny_tokenizer), n_layers=2)
    model.save_pretrained(tmp_path / "a")
    first = model_key(tmp_path / "a")
    assert first.startswith("a-") and first == model_key(tmp_path / "a")
    with torch.no_grad():
        next(model.parameters()).add_(1e-3)
    model.save_pretrained(tmp_path / "a")
    assert model_key(tmp_path / "a") != first
    assert model_key("some-org/some-hub-model") == "some-hub-model"


def test_model_names_cannot_escape_the_results_folder():
    from wilke_lib.results import model_slug

    assert model_slug("EleutherAI/gpt-j-6b") == "gpt-j-6b" and model_slug("toy-gpt2") == "toy-gpt2"
    assert model_slug("a b/c:d") == "c-d"
    for bad in ("..", ".", "", "/", "x/.."):
        with pytest.raises(ValueError, match="no usable folder name"):
            model_slug(bad)
