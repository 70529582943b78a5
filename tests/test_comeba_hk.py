"""COMEBA-HK's hook layers on tiny models of every architecture: the base weights never change, the hooks
off (or empty) give the base model bit for bit, an edit's own prompt routes through the hook, padding
does not change an answer, a failed edit changes nothing, and a killed lifelong run resumes to the
same numbers with its hook layers restored."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from helpers import Kill, comeba_hparams, kill_at, logits, numbered_records
from tiny import TINY_ARCHS, tiny_model_for
from wilke_lib.editing import EditCache, EditError, edit, rollback
from wilke_lib.editors.common import EditorState
from wilke_lib.editors.comeba_hk import largest_z_scores
from wilke_lib.editors.hook_layers import HookLayers, alpha_key, delta_key, keys_key, z_scores
from wilke_lib.hparams import COMEBAHKHParams, load_hparams
from wilke_lib.lifelong import LifelongConfig, run_lifelong

REQUEST = {"prompt": "The capital city of {}", "subject": "Valo Durn",
           "target_new": {"str": "Norway", "id": "Q20"}, "target_true": {"str": "Spain", "id": "Q29"}}
OTHER = {"prompt": "The mother tongue of {}", "subject": "Mira Quell",
         "target_new": {"str": "Welsh", "id": "Q9309"}, "target_true": {"str": "French", "id": "Q150"}}


hparams = comeba_hparams


def new_model(arch: str, tok):
    return tiny_model_for(tok, arch)


def test_z_scores_use_the_real_tokens_only():
    norms = torch.tensor([[1.0, 2.0, 3.0, 100.0], [5.0, 5.0, 9.0, 0.0]])
    real = torch.tensor([[True, True, True, False], [True, True, True, True]])
    z = z_scores(norms, real)
    assert torch.allclose(z[0, :3], torch.tensor([-1.0, 0.0, 1.0]))  # std with ddof 1, as the authors' code
    assert torch.isnan(z[0, 3])
    assert torch.isnan(z_scores(torch.tensor([[4.0, 0.0]]), torch.tensor([[True, False]]))).all()  # one real token


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_hook_layers_keep_the_base_model_and_route_the_edited_prompt(arch, tok, corpus_file, stats_dir):
    model = new_model(arch, tok)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    texts = ["The capital city of Valo Durn", "Mira Quell was born in the town"]
    before = logits(model, tok, texts)
    hp = hparams(corpus_file)
    cache = EditCache.for_model(model, stats_dir=stats_dir)
    hooks = HookLayers.attach(model, EditorState(), hp.layers)
    assert torch.equal(logits(model, tok, texts), before)  # hooks without an edit

    state = EditorState()
    result = edit(model, tok, REQUEST, hp, cache=cache, state=state)
    assert result.weight_deltas == {} and all(torch.equal(base[k], v) for k, v in model.state_dict().items())
    assert set(state.tensors) == {f(l) for l in hp.layers for f in (delta_key, alpha_key, keys_key)}
    assert all(float(state.tensors[alpha_key(l)]) <= hp.alpha_init for l in hp.layers)
    assert not torch.equal(logits(model, tok, texts), before)
    # the edited prompt passes the validated hook at every layer: its largest z-score reaches alpha
    found = largest_z_scores(model, tok, hooks, [REQUEST])
    assert all(float(found[l][0]) >= float(state.tensors[alpha_key(l)]) for l in hp.layers)
    with hooks.using("off"):
        assert torch.equal(logits(model, tok, texts), before)
    HookLayers.detach(model)
    assert torch.equal(logits(model, tok, texts), before)


def test_an_answer_does_not_depend_on_the_padding_of_its_batch(tok, corpus_file, stats_dir):
    model = new_model("gpt2", tok)
    hp = hparams(corpus_file)
    edit(model, tok, REQUEST, hp, cache=EditCache.for_model(model, stats_dir=stats_dir), state=EditorState())
    tok.padding_side = "right"
    alone = logits(model, tok, ["The capital city of Valo Durn"])
    padded = logits(model, tok, ["The capital city of Valo Durn", "Mira Quell was born in the town of the north"])
    n = alone.shape[1]
    assert torch.allclose(alone[0], padded[0, :n], atol=1e-5)


def test_a_failed_edit_and_a_copy_leave_everything_as_it_was(tok, corpus_file, stats_dir):
    model = new_model("gptj", tok)
    hp = hparams(corpus_file)
    cache = EditCache.for_model(model, stats_dir=stats_dir)
    state = EditorState()
    first = edit(model, tok, REQUEST, hp, cache=cache, state=state)
    rollback(model, tok, REQUEST, hp, first, cache=cache, state=state)
    kept = dict(state.tensors)
    with pytest.raises(EditError):
        edit(model, tok, {**REQUEST, "prompt": "The capital city of Spain", "subject": "Nobody"}, hp, cache=cache,
             state=state)
    assert set(state.tensors) == set(kept) and all(torch.equal(state.tensors[k], kept[k]) for k in kept)
    texts = ["The mother tongue of Mira Quell"]
    before = logits(model, tok, texts)
    copied = edit(model, tok, OTHER, hp, cache=cache, copy=True)  # the copy carries its own hook layers
    assert torch.equal(logits(model, tok, texts), before)
    assert not torch.equal(logits(copied.model, tok, texts), before)
    assert all(torch.equal(state.tensors[k], kept[k]) for k in kept)


def test_the_shipped_settings_load():
    for model_name in ("toy-gpt2", "toy-gptj", "gpt2-xl", "gpt-j-6b"):
        hp = load_hparams("comeba_hk", model_name)
        assert hp.alpha_init == 2.2 and hp.delta_runner == "full" and hp.layers == load_hparams("memit", model_name).layers


@pytest.mark.slow  # 23 s, measured on a shared 2-core machine
def test_a_killed_lifelong_run_resumes_with_its_hook_layers(tok, corpus_file, tmp_path, stats_dir):
    records = numbered_records(12)
    hp = hparams(corpus_file)

    def run(out: str, **kw):
        config = LifelongConfig(model_name="tiny-gpt2", editor="comeba_hk", hparams=hp, n_edits=4, seed=9,
                                out_dir=str(tmp_path / out), eval_batch_size=4, filter_known=False)
        model = new_model("gpt2", tok)
        return run_lifelong(model, tok, records, config, EditCache.for_model(model, stats_dir=stats_dir), **kw)

    full = run("a")
    with pytest.raises(Kill):
        run("b", on_step=kill_at(3))
    resumed = run("b")
    assert resumed.final == full.final
    assert resumed.checkpoints.equals(full.checkpoints)
    assert full.steps["ES"].tolist() == resumed.steps["ES"].tolist()
