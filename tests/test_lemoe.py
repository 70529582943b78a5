"""LEMoE's expert bypass on tiny models of every architecture: the base weights never change, no expert
(or the bypass detached) gives the base model bit for bit, a seen edit prompt routes to its own expert,
a failed edit adds no expert, the clustering order groups similar prompts, and a killed lifelong run
resumes with its experts."""

from __future__ import annotations

import pytest
import torch

from helpers import Kill, kill_at, logits, numbered_records
from tiny import TINY_ARCHS, tiny_model_for
from wilke_lib.editing import EditCache, EditError, edit
from wilke_lib.editors.common import EditorState
from wilke_lib.editors.lemoe import ExpertBypass, expert_keys, plan_batches, prompt_queries
from wilke_lib.hparams import LEMoEHParams, load_hparams
from wilke_lib.lifelong import LifelongConfig, run_lifelong

FIRST = {"prompt": "The capital city of {}", "subject": "Valo Durn",
         "target_new": {"str": "Norway", "id": "Q20"}, "target_true": {"str": "Spain", "id": "Q29"}}
SECOND = {"prompt": "{} plays the", "subject": "Mira Quell",
          "target_new": {"str": "violin", "id": "v"}, "target_true": {"str": "guitar", "id": "g"}}


def hparams(**kw) -> LEMoEHParams:
    return LEMoEHParams(layer=2, expert_dim=16, steps=30, lr=0.05, **kw)


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_experts_beside_the_base_model_and_routing_to_their_own_edit(arch, tok):
    model = tiny_model_for(tok, arch)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    texts = ["The capital city of Valo Durn", "Mira Quell plays the"]
    before = logits(model, tok, texts)
    hp = hparams()
    bypass = ExpertBypass.attach(model, EditorState(), hp)
    assert torch.equal(logits(model, tok, texts), before)  # no expert yet

    state = EditorState()
    for request in (FIRST, SECOND):
        result = edit(model, tok, request, hp, state=state, cache=EditCache.for_model(model))
        assert result.weight_deltas == {} and result.layers == [2]
    assert all(torch.equal(base[k], v) for k, v in model.state_dict().items())
    assert expert_keys(state) == [0, 1]
    queries = prompt_queries(model, tok, texts)
    chosen, gate = bypass.route(queries[:, None, :])
    assert chosen[:, 0].tolist() == [0, 1] and gate.all()
    assert not torch.equal(logits(model, tok, texts), before)
    ExpertBypass.detach(model)
    assert torch.equal(logits(model, tok, texts), before)


def test_a_failed_edit_adds_no_expert(tok):
    model = tiny_model_for(tok, "gpt2")
    state = EditorState()
    edit(model, tok, FIRST, hparams(), state=state)
    kept = dict(state.tensors)
    with pytest.raises(EditError):
        edit(model, tok, {**FIRST, "target_new": {"str": " ", "id": "x"}}, hparams(), state=state)
    assert set(state.tensors) == set(kept) and all(torch.equal(state.tensors[k], kept[k]) for k in kept)


def test_the_clustering_order_groups_similar_prompts(tok):
    model = tiny_model_for(tok, "gpt2")
    capital = [{**FIRST, "subject": s} for s in ("Valo Durn", "Tobin Ash", "Sela Varn")]
    plays = [{**SECOND, "subject": s} for s in ("Mira Quell", "Orrin Pike", "Kesta Lum")]
    batches = plan_batches(model, tok, [capital[0], plays[0], capital[1], plays[1], capital[2], plays[2]], 3)
    assert sorted(sorted(b) for b in batches) == [[0, 2, 4], [1, 3, 5]]


def test_the_shipped_settings_load():
    for model_name in ("toy-gpt2", "toy-gptj", "gpt2-xl", "gpt-j-6b"):
        assert load_hparams("lemoe", model_name).layer == load_hparams("rome", model_name).layer


@pytest.mark.slow  # 24 s, measured on a shared 2-core machine
def test_a_killed_lifelong_run_resumes_with_its_experts(tok, tmp_path):
    records = numbered_records(12)

    def run(out: str, **kw):
        config = LifelongConfig(model_name="tiny-gpt2", editor="lemoe", hparams=hparams(), n_edits=4, seed=9,
                                out_dir=str(tmp_path / out), eval_batch_size=4, filter_known=False)
        return run_lifelong(tiny_model_for(tok, "gpt2"), tok, records, config, **kw)

    full = run("a")
    with pytest.raises(Kill):
        run("b", on_step=kill_at(3))
    resumed = run("b")
    assert resumed.final == full.final and resumed.checkpoints.equals(full.checkpoints)


def test_routing_breaks_ties_for_the_newest_expert_and_sees_new_experts(tok):
    """Two experts with the same key (an edit and the rollback that undoes it): the newer one takes the
    token; an expert added after a forward is routed to at the next one (the stacked keys are cached)."""
    model = tiny_model_for(tok, "gpt2")
    d = model.config.n_embd
    state = EditorState({f"lemoe/expert{i}/key": key for i, key in enumerate(torch.eye(d)[[0, 1, 1]])})
    bypass = ExpertBypass.attach(model, state, hparams(route_threshold=0.5))
    query = torch.stack([torch.eye(d)[0], torch.eye(d)[1], -torch.eye(d)[0]])[None]
    chosen, gate = bypass.route(query)
    assert chosen[0].tolist()[:2] == [0, 2] and gate[0].tolist() == [True, True, False]
    state.tensors["lemoe/expert3/key"] = -torch.eye(d)[0]
    chosen, gate = bypass.route(query)
    assert chosen[0].tolist() == [0, 2, 3] and gate[0].tolist() == [True, True, True]
    bypass.state = EditorState({"lemoe/expert0/key": torch.eye(d)[1]})
    chosen, _ = bypass.route(query)
    assert chosen[0].tolist() == [0, 0, 0]


def test_an_edit_no_token_routes_to_fails_cleanly(tok, monkeypatch):
    """Training routes as inference will; when no token of the batch reaches the new expert (an older
    expert's key closer, or no similarity at the threshold: here the gate is shut), the edit fails with
    a clear error and adds no expert."""
    model = tiny_model_for(tok, "gpt2")
    state = EditorState()
    base = logits(model, tok, ["The capital city of Valo Durn"])
    shut = ExpertBypass.route

    def nowhere(self, query):
        chosen, gate = shut(self, query)
        return chosen, torch.zeros_like(gate)

    monkeypatch.setattr(ExpertBypass, "route", nowhere)
    with pytest.raises(EditError, match="no token of the batch's prompts routes to it"):
        edit(model, tok, FIRST, hparams(), state=state)
    assert expert_keys(state) == []
    monkeypatch.undo()
    ExpertBypass.detach(model)
    assert torch.equal(logits(model, tok, ["The capital city of Valo Durn"]), base)
