"""Editors (ROME, MEMIT, WilKE, FT-L, KN) on tiny random models of every architecture.

Mechanics, not effectiveness: which weights change, ROME's rank-one identity (W + dW) k* = v*,
WilKE's argmin of Eq. 10 and its ablations, rollback, bit-identical weights after an impossible
edit, hyper-parameter files. Effectiveness on a trained model: tests/test_editors_organism.py.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from pathlib import Path

import pytest
import torch

from tiny import TINY_ARCHS, make_tiny_model
from wilke_lib import hparams as hp_mod
from wilke_lib import second_moments as stats
from wilke_lib.arch import ModelAdapter
from wilke_lib.editing import EDITORS, EditCache, EditError, edit, rollback
from wilke_lib.editors.cache import context_prefixes
from wilke_lib.editors.memit import apply_memit
from wilke_lib.experiments import edit_and_rollback
from wilke_lib.generation import greedy_matches, predict_greedy_ids
from wilke_lib.hparams import (AlphaEditHParams, FTHParams, KNHParams, MEMITHParams, ROMEHParams, WilKEHParams, hparams_from_file,
                               load_hparams)
from wilke_lib.editors.delta import LayerKeys
from wilke_lib.organisms import silence_mlps
from wilke_lib.editors.rome import compute_rome_update, rank_one_update, rome_target
from wilke_lib.editors.wilke import eq10_score, layer_scores
from wilke_lib.tokens import subject_last_token_index

SUBJECTS = ["Valo Durn", "Mira Quell", "Tobin Ash", "Sela Varn", "Orrin Pike", "Kesta Lum", "Danu Fell",
            "Ilsa Morrow", "Bram Tolle", "Nyra Cask"]
TEMPLATES = ["The capital city of {}", "The mother tongue of {}", "The home of {}", "A friend of {}"]
NEW = "Norway"  # one token of the tiny tokenizer
REQUEST = {"prompt": "The capital city of {}", "subject": "Valo Durn",
           "target_new": {"str": NEW, "id": "Q20"}, "target_true": {"str": "Spain", "id": "Q29"}}
FAST = dict(context_lengths=[[5, 3], [10, 3]])  # 6 generated prefixes instead of 20: faster tests


# ---- fixtures ------------------------------------------------------------------------------------

def fresh_model(arch: str, tok):
    return make_tiny_model(arch, len(tok), eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)


def mom2(corpus_file: Path) -> dict:
    return dict(mom2_corpus=str(corpus_file), mom2_n_samples=800, mom2_batch_size=128)


def all_hparams(corpus_file: Path) -> dict:
    return {
        "rome": ROMEHParams(layer=2, **FAST, **mom2(corpus_file)),
        "memit": MEMITHParams(layers=[1, 2], mom2_update_weight=50.0, **FAST, **mom2(corpus_file)),
        # a threshold above every eigenvalue of these tiny models' C: all directions free (the projection
        # itself is tested on a hand-built spectrum below)
        "alphaedit": AlphaEditHParams(layers=[1, 2], nullspace_threshold=1e6, l2=1.0, **FAST, **mom2(corpus_file)),
        "wilke": WilKEHParams(**FAST, **mom2(corpus_file)),
        "ft": FTHParams(layer=1, lr=1e-2, norm_constraint=1e-2),
        "kn": KNHParams(ig_steps=8, max_neurons=5, edit_lambda=2.0),
    }


def digest(model) -> dict[str, str]:
    """sha256 of every parameter's bytes."""
    return {name: hashlib.sha256(p.detach().cpu().contiguous().numpy().tobytes()).hexdigest()
            for name, p in model.named_parameters()}


def changed(before: dict[str, str], after: dict[str, str]) -> set[str]:
    return {name for name in before if before[name] != after[name]}


def known_prompt(model, tok) -> tuple[str, str, str]:
    """(template, subject, answer): a prompt whose greedy next token is one clean word token."""
    for template in TEMPLATES:
        for subject in SUBJECTS:
            ids = predict_greedy_ids(model, tok, [template.format(subject)], max_new_tokens=1)[0]
            token = tok.convert_ids_to_tokens(ids)[0]
            if (token.startswith("Ġ") and len(token) > 1 and token != "Ġ" + NEW
                    and tok(token.replace("Ġ", " "), add_special_tokens=False)["input_ids"] == ids):
                return template, subject, token[1:]
    raise AssertionError("no prompt with a one-token word answer")


# ---- every editor, every architecture ---------------------------------------------------------------

@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_every_editor_changes_only_its_modules(arch, tok, corpus_file, stats_dir):
    cache = EditCache.for_model(fresh_model(arch, tok), stats_dir=stats_dir)
    for name, hparams in all_hparams(corpus_file).items():
        model = fresh_model(arch, tok)
        adapter = ModelAdapter(model)
        before = digest(model)
        originals = {l: adapter.out_weight(l).clone() for l in range(adapter.n_layers)}
        result = edit(model, tok, REQUEST, hparams, cache=cache)
        assert result.editor == name
        assert result.model is model
        assert result.seconds > 0
        expected = {adapter.name_of("mlp_out", l) + ".weight" for l in result.layers}
        assert changed(before, digest(model)) == expected, name
        assert set(result.weight_deltas) == {adapter.name_of("mlp_out", l) for l in result.layers}
        for l in result.layers:
            recorded = result.weight_deltas[adapter.name_of("mlp_out", l)]
            assert recorded.device.type == "cpu"
            assert torch.equal(recorded, (adapter.out_weight(l).float() - originals[l].float()).cpu())
        if name == "rome":
            assert result.layers == [2]
        if name in ("memit", "alphaedit"):
            assert result.layers == [1, 2]
        if name == "wilke":
            assert set(result.scores) == set(range(adapter.n_layers))
            assert len(result.layers) == 1
        if name == "ft":
            assert result.layers == [1]
            assert result.weight_deltas[adapter.name_of("mlp_out", 1)].abs().max() <= 1e-2 + 1e-6
        if name == "kn":
            for l in result.layers:
                cols = result.weight_deltas[adapter.name_of("mlp_out", l)].abs().sum(0).nonzero().flatten().tolist()
                assert sorted(cols) == sorted(i for nl, i, _ in result.info["neurons"] if nl == l)


def test_registry_and_copy(tok, corpus_file, stats_dir):
    assert set(EDITORS) == {"rome", "memit", "wilke", "ft", "kn", "alphaedit", "comeba_hk", "lemoe", "mend", "ke"}
    model = fresh_model("gpt2", tok)
    before = digest(model)
    result = edit(model, tok, REQUEST, all_hparams(corpus_file)["rome"], copy=True,
                  cache=EditCache.for_model(model, stats_dir=stats_dir))
    assert result.model is not model
    assert digest(model) == before
    assert changed(before, digest(result.model))


# ---- ROME -------------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_rome_rank_one_identity(arch, tok, corpus_file, stats_dir):
    """ROME's released update maps the bare prompt's key to v* = W k_bare + delta exactly (ROME Eq. 2)."""
    model = fresh_model(arch, tok)
    hparams = all_hparams(corpus_file)["rome"]
    cache = EditCache.for_model(model, stats_dir=stats_dir)
    outcome = compute_rome_update(model, tok, REQUEST, hparams.layer, hparams, cache)
    result = edit(model, tok, REQUEST, hparams, cache=cache)
    new_w = ModelAdapter(model).out_weight(hparams.layer).double()
    v_star, k_bare = outcome.v_star.double(), outcome.k_target.double()
    assert not torch.allclose(k_bare, outcome.k_star.double())  # the prefixes move the averaged key
    relative = (new_w @ k_bare - v_star).norm() / v_star.norm()
    assert relative < 1e-4
    assert result.info["rank_one_residual"] < 1e-4
    # delta = v* - W k_bare (WilKE Eq. 9 with the key of the edited prompt, Eq. 11)
    old_w = new_w - result.weight_deltas[ModelAdapter(model).name_of("mlp_out", hparams.layer)].double()
    assert torch.allclose(v_star - old_w @ k_bare, outcome.delta.double(), atol=1e-4)


def test_rank_one_update_formula():
    gen = torch.Generator().manual_seed(0)
    W = torch.randn(6, 10, generator=gen, dtype=torch.float64)
    A = torch.randn(10, 40, generator=gen, dtype=torch.float64)
    C = A @ A.T / 40
    k, v = torch.randn(10, generator=gen, dtype=torch.float64), torch.randn(6, generator=gen, dtype=torch.float64)
    dW = rank_one_update(W, torch.linalg.inv(C), k, v)
    assert torch.allclose((W + dW) @ k, v, atol=1e-10)
    assert torch.linalg.matrix_rank(dW) == 1
    u = torch.linalg.solve(C, k)
    assert torch.allclose(dW, torch.outer(v - W @ k, u) / (u @ k))


def test_rome_update_forms_on_a_hand_built_case():
    """Which key each form maps to v* and divides by (values computed by hand)."""
    W = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    C_inv = torch.diag(torch.tensor([1.0, 2.0, 4.0]))
    keys = LayerKeys(star=torch.tensor([1.0, 1.0, 0.0]), bare=torch.tensor([1.0, 0.0, 1.0]))
    delta = torch.tensor([1.0, -1.0])  # C^-1 k* = (1, 2, 0); (C^-1 k*)^T k_bare = 1, (C^-1 k*)^T k* = 3
    expected = {"released": [[1.0, 2.0, 0.0], [-1.0, -2.0, 0.0]],  # delta u^T / 1, k_bare -> W k_bare + delta
                "r-rome": [[1 / 3, 2 / 3, 0.0], [-2 / 3, -4 / 3, 0.0]]}  # (W k_bare + delta - W k*) u^T / 3
    for form, dW_expected in expected.items():
        v_star, k_target = rome_target(W, keys, delta, form)
        dW = rank_one_update(W, C_inv, keys.star, v_star, k_target)
        torch.testing.assert_close(dW, torch.tensor(dW_expected))
        torch.testing.assert_close((W + dW) @ k_target, v_star)
        assert torch.equal(k_target, keys.bare if form == "released" else keys.star)
    same = LayerKeys(star=keys.star, bare=keys.star)  # r-ROME is ROME's released update when the keys agree
    released = rank_one_update(W, C_inv, same.star, *rome_target(W, same, delta, "released"))
    torch.testing.assert_close(released, rank_one_update(W, C_inv, same.star, *rome_target(W, same, delta, "r-rome")))
    with pytest.raises(ValueError, match="update_form"):
        rome_target(W, keys, delta, "rebuilt")
    with pytest.raises(ValueError, match="update_form"):
        ROMEHParams(layer=1, update_form="rebuilt")


def test_subject_last_token_index(tok):
    template = "The mother tongue of {} is"
    index = subject_last_token_index(tok, template, "Valo Durn")
    ids = tok(template.format("Valo Durn"))["input_ids"]
    assert tok.convert_ids_to_tokens(ids[index]) == "ĠDurn"
    # a prompt already containing the subject is accepted
    assert subject_last_token_index(tok, "The mother tongue of Valo Durn is", "Valo Durn") == index
    with_prefix = subject_last_token_index(tok, template, "Valo Durn", prefix="Hello there. ")
    assert with_prefix > index
    with pytest.raises(EditError, match="empty subject"):
        subject_last_token_index(tok, template, "")
    with pytest.raises(EditError, match="not found"):
        subject_last_token_index(tok, "The mother tongue is", "Valo Durn")


def test_context_prefixes_are_deterministic(tok):
    model = fresh_model("gpt2", tok)
    hparams = ROMEHParams(layer=1)
    first = context_prefixes(model, tok, hparams)
    assert first == context_prefixes(model, tok, hparams)
    assert len(first) == 21 and first[0] == ""
    assert all(p.endswith(". ") for p in first[1:])
    other = context_prefixes(model, tok, ROMEHParams(layer=1, context_seed=1))
    assert other != first
    given = context_prefixes(model, tok, ROMEHParams(layer=1, context_prefixes=["A. ", "B. "]))
    assert given == ["", "A. ", "B. "]


def test_parameters_frozen_during_optimisation(tok, corpus_file, stats_dir):
    model = fresh_model("gptj", tok)
    seen: list[bool] = []
    handle = model.register_forward_pre_hook(
        lambda module, args: seen.append(any(p.requires_grad for p in module.parameters())))
    edit(model, tok, REQUEST, all_hparams(corpus_file)["rome"], cache=EditCache.for_model(model, stats_dir=stats_dir))
    handle.remove()
    assert seen and not any(seen)
    assert all(p.requires_grad for p in model.parameters())  # restored


# ---- WilKE ------------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_wilke_chooses_argmin_of_eq10(arch, tok, corpus_file, stats_dir):
    model = fresh_model(arch, tok)
    adapter = ModelAdapter(model)
    spectral = {l: torch.linalg.svdvals(adapter.out_weight(l).double())[0].item() for l in range(adapter.n_layers)}
    hparams = all_hparams(corpus_file)["wilke"]
    result = edit(model, tok, REQUEST, hparams, cache=EditCache.for_model(model, stats_dir=stats_dir))
    info = result.info
    recomputed = {}
    for l in range(adapter.n_layers):
        assert info["spectral_norms"][l] == pytest.approx(spectral[l], rel=1e-5)
        recomputed[l] = info["delta_norms"][l] / (spectral[l] * info["activation_norms"][l])
        assert result.scores[l] == pytest.approx(recomputed[l], rel=1e-5)
    assert result.layers == [min(recomputed, key=recomputed.get)]


def test_wilke_ablations_and_update_norm(tok, corpus_file, stats_dir):
    model = fresh_model("gpt2", tok)
    cache = EditCache.for_model(model, stats_dir=stats_dir)
    base = all_hparams(corpus_file)["wilke"]
    candidates = layer_scores(model, tok, REQUEST, base, cache)
    variants = {
        "full": dict(),
        "no_delta": dict(use_delta=False),
        "no_activation": dict(use_activation=False),
        "no_weight_norm": dict(use_weight_norm=False),
    }
    for label, switches in variants.items():
        hparams = WilKEHParams(**{**vars(base), **switches})
        for l, c in candidates.items():
            d = c.delta_norm if hparams.use_delta else 1.0
            a = c.activation_norm if hparams.use_activation else 1.0
            s = c.spectral_norm if hparams.use_weight_norm else 1.0
            assert eq10_score(c.delta_norm, c.activation_norm, c.spectral_norm, hparams) == pytest.approx(d / (s * a))
        # the editor with the switch reports exactly those scores
        result = edit(model, tok, REQUEST, hparams, copy=True, cache=cache)
        for l, score in result.scores.items():
            expected = eq10_score(result.info["delta_norms"][l], result.info["activation_norms"][l],
                                  result.info["spectral_norms"][l], hparams)
            assert score == pytest.approx(expected, rel=1e-6), label
        assert result.layers == [min(result.scores, key=result.scores.get)]
    # the released code's criterion: ||dW||_F / ||W||_F of ROME's update at each layer
    hparams = WilKEHParams(**{**vars(base), "score": "update_norm"})
    result = edit(model, tok, REQUEST, hparams, copy=True, cache=cache)
    adapter = ModelAdapter(result.model)
    chosen = result.layers[0]
    applied = result.weight_deltas[adapter.name_of("mlp_out", chosen)]
    fro = ModelAdapter(model).out_weight(chosen).float().norm()
    assert result.scores[chosen] == pytest.approx(float(applied.norm() / fro), rel=1e-3)
    assert chosen == min(result.scores, key=result.scores.get)
    # update_norm = ||delta|| * ||C^-1 k*|| / (k_t^T C^-1 k*) / ||W||_F (k_t: the bare prompt's key in
    # ROME's released update); each switch drops one factor
    delta_norm = result.info["delta_norms"][chosen]
    k_star, k_target = candidates[chosen].k_star, candidates[chosen].k_target
    c_inv_k = cache.get_mom2_inv(model, tok, chosen, hparams) @ k_star
    key_gain = float(c_inv_k.norm() / (k_target @ c_inv_k))
    expected = {"no_delta": key_gain / float(fro), "no_activation": delta_norm / float(fro),
                "no_weight_norm": delta_norm * key_gain}
    for label, value in expected.items():
        ablated = WilKEHParams(**{**vars(hparams), **variants[label]})
        scored = edit(model, tok, REQUEST, ablated, copy=True, cache=cache).scores
        assert scored[chosen] == pytest.approx(value, rel=1e-3), label


def test_wilke_skips_attention_only_layers(tok, corpus_file, stats_dir):
    """An MLP that writes nothing (an organism's attention-only layer) is no candidate: the default
    search leaves it out, and naming it is an error that says why."""
    model = fresh_model("gpt2", tok)
    silence_mlps(model, 1)
    base = all_hparams(corpus_file)["wilke"]
    everywhere = WilKEHParams(**{**vars(base), "candidate_layers": None, "score": "update_norm"})
    result = edit(model, tok, REQUEST, everywhere, copy=True, cache=EditCache.for_model(model, stats_dir=stats_dir))
    assert sorted(result.scores) == list(range(1, ModelAdapter(model).n_layers))
    assert all(math.isfinite(score) for score in result.scores.values())
    named = WilKEHParams(**{**vars(base), "candidate_layers": [0, 1]})
    with pytest.raises(ValueError, match=r"candidate layers \[0\].*all zero"):
        edit(model, tok, REQUEST, named, copy=True, cache=EditCache.for_model(model, stats_dir=stats_dir))


# ---- rollback -----------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_rollback_restores_original_answer(arch, tok, corpus_file, stats_dir):
    model = fresh_model(arch, tok)
    cache = EditCache.for_model(model, stats_dir=stats_dir)
    template, subject, answer = known_prompt(model, tok)
    prompt = template.format(subject)
    request = {"prompt": template, "subject": subject, "target_new": {"str": NEW}, "target_true": {"str": answer}}
    successes = 0
    for layer in (2, 1):
        hparams = ROMEHParams(layer=layer, **FAST, **mom2(corpus_file))
        trial = fresh_model(arch, tok)
        first = edit(trial, tok, request, hparams, cache=cache)
        if not greedy_matches(trial, tok, [prompt], [NEW])[0]:
            continue
        successes += 1
        back = rollback(trial, tok, request, hparams, first, cache=cache)
        assert back.layers == first.layers
        assert greedy_matches(trial, tok, [prompt], [answer]) == [True]
    assert successes > 0, "no ROME edit flipped the answer; the rollback test would be vacuous"
    # WilKE rolls back at the layer it chose, without searching
    hparams = all_hparams(corpus_file)["wilke"]
    first = edit(model, tok, request, hparams, cache=cache)
    back = rollback(model, tok, request, hparams, first, cache=cache)
    assert back.layers == first.layers and back.scores is None and back.info["searched"] is False
    assert greedy_matches(model, tok, [prompt], [answer]) == [True]


def test_edit_and_rollback_leaves_the_original_untouched(tok, corpus_file, stats_dir):

    model = fresh_model("gpt2", tok)
    before = digest(model)
    template, subject, answer = known_prompt(model, tok)
    record = {"case_id": 7, "requested_rewrite": {"prompt": template, "subject": subject,
                                                  "target_new": {"str": NEW}, "target_true": {"str": answer}}}
    hparams = ROMEHParams(layer=2, **FAST, **mom2(corpus_file))
    row = edit_and_rollback(model, tok, record, hparams, EditCache.for_model(model, stats_dir=stats_dir))
    assert digest(model) == before
    assert row["case_id"] == 7 and row["editor"] == "rome" and row["layers"] == [2]
    assert row["success"] == greedy_matches(edit(model, tok, record["requested_rewrite"], hparams, copy=True,
                                                 cache=EditCache.for_model(model, stats_dir=stats_dir)).model,
                                            tok, [template.format(subject)], [NEW])[0]
    assert row["seconds"] > 0 and row["rollback_seconds"] > 0


# ---- impossible edits ---------------------------------------------------------------------------

BAD_REQUESTS = {
    "empty subject": {**REQUEST, "subject": ""},
    "not found": {**REQUEST, "prompt": "The capital city is", "subject": "Valo Durn"},
    "target_new": {**REQUEST, "target_new": {"str": ""}},
}


@pytest.mark.parametrize("editor", ["rome", "memit", "wilke", "ft", "kn"])
def test_impossible_requests_leave_weights_bit_identical(editor, tok, corpus_file, stats_dir):
    model = fresh_model("llama", tok)
    cache = EditCache.for_model(model, stats_dir=stats_dir)
    hparams = all_hparams(corpus_file)[editor]
    before = digest(model)
    for reason, request in BAD_REQUESTS.items():
        with pytest.raises(EditError, match=reason):
            edit(model, tok, request, hparams, cache=cache)
        assert digest(model) == before


def test_nan_loss_and_singular_system_leave_weights_bit_identical(tok, corpus_file, stats_dir):
    model = fresh_model("gpt2", tok)
    adapter = ModelAdapter(model)
    hps = all_hparams(corpus_file)
    cache = EditCache.for_model(model, stats_dir=stats_dir)
    before = digest(model)
    cache.get_prefixes(model, tok, hps["rome"])  # generated by the healthy model
    # NaN loss: poison the final norm's output
    handle = adapter.final_norm.register_forward_hook(lambda m, i, o: o * float("nan"))
    for editor in ("rome", "memit", "wilke", "ft"):
        with pytest.raises(EditError, match="NaN"):
            edit(model, tok, REQUEST, hps[editor], cache=cache)
        assert digest(model) == before, editor
    handle.remove()
    # singular C: a zero second moment at the ROME layer
    singular = EditCache.for_model(model, stats_dir=stats_dir)
    rome = hps["rome"]
    singular.mom2[singular._stats_key(rome, rome.layer)] = torch.zeros(adapter.d_mlp, adapter.d_mlp)
    with pytest.raises(EditError, match="singular"):
        edit(model, tok, REQUEST, rome, cache=singular)
    assert digest(model) == before
    # MEMIT fails at its second layer after changing the first: everything is restored
    memit = hps["memit"]
    partial = EditCache.for_model(model, stats_dir=stats_dir)
    partial.get_mom2(model, tok, memit.layers, memit)
    partial.mom2[partial._stats_key(memit, memit.layers[1])] = torch.full((adapter.d_mlp, adapter.d_mlp), float("nan"))
    with pytest.raises(EditError, match="singular"):
        edit(model, tok, REQUEST, memit, cache=partial)
    assert digest(model) == before
    # FT changes its weight at step 0, then the loss turns NaN at step 1: restored too
    calls = []

    def nan_from_second_call(module, inputs, output):
        calls.append(1)
        return output * float("nan") if len(calls) > 1 else output

    handle = adapter.final_norm.register_forward_hook(nan_from_second_call)
    with pytest.raises(EditError, match="NaN"):
        edit(model, tok, REQUEST, FTHParams(layer=1, lr=1e-2, norm_constraint=1e-2), cache=cache)
    handle.remove()
    assert len(calls) == 2
    assert digest(model) == before


def test_memit_batch(tok, corpus_file, stats_dir):

    model = fresh_model("gptj", tok)
    adapter = ModelAdapter(model)
    before = digest(model)
    second = {**REQUEST, "subject": "Mira Quell", "target_new": {"str": "Spain"}}
    info = apply_memit(model, tok, [REQUEST, second], all_hparams(corpus_file)["memit"],
                       cache=EditCache.for_model(model, stats_dir=stats_dir))
    assert len(info["z_infos"]) == 2
    assert changed(before, digest(model)) == {adapter.name_of("mlp_out", l) + ".weight" for l in (1, 2)}


# ---- statistics cache -----------------------------------------------------------------------------

def test_stats_second_call_hits_disk(tok, corpus_file, tmp_path, monkeypatch):
    model = fresh_model("gpt_neox", tok)
    hparams = all_hparams(corpus_file)["rome"]
    cache = EditCache.for_model(model, stats_dir=tmp_path)
    first = cache.get_mom2(model, tok, [hparams.layer], hparams)[hparams.layer]
    path = stats.stats_path(cache.model_key, str(corpus_file), hparams.layer, hparams.mom2_n_samples, tmp_path)
    assert path.is_file()

    def no_compute(*args, **kwargs):
        raise AssertionError("statistics recomputed instead of read from disk")

    monkeypatch.setattr(stats, "_accumulate", no_compute)
    # a new cache for the same ORIGINAL model, and the model after an edit: both read the file
    edit(model, tok, REQUEST, hparams, cache=cache)
    again = EditCache(model_key=cache.model_key, stats_dir=tmp_path).get_mom2(model, tok, [hparams.layer], hparams)
    assert torch.equal(again[hparams.layer], first)


# ---- hyper-parameters -------------------------------------------------------------------------------

def test_shipped_hparams_load():
    for editor in ("rome", "memit", "wilke", "ft", "kn"):
        for model_name in ("toy-gpt2", "toy-gptj", "gpt2-xl", "gpt-j-6b"):
            load_hparams(editor, model_name)
    assert load_hparams("rome", "gpt2-xl").layer == 17
    assert load_hparams("rome", "gpt-j-6b").layer == 5
    memit = load_hparams("memit", "gpt2-xl")
    assert memit.layers == [13, 14, 15, 16, 17] and memit.mom2_update_weight == 20000
    memit_j = load_hparams("memit", "gpt-j-6b")
    assert memit_j.layers == list(range(3, 9)) and memit_j.mom2_update_weight == 15000
    assert memit_j.v_num_grad_steps == 25 and memit_j.clamp_norm_factor == 0.75
    assert load_hparams("wilke", "gpt2-xl").candidate_layers == list(range(24))
    assert load_hparams("wilke", "gpt-j-6b").candidate_layers == list(range(7))
    for organism in ("toy-gpt2", "toy-gptj"):  # MEMIT spreads over the range that holds ROME's layer
        assert load_hparams("rome", organism).layer in load_hparams("memit", organism).layers


def test_hparams_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="available models"):
        load_hparams("rome", "no-such-model")
    with pytest.raises(ValueError, match="available editors"):
        load_hparams("serac", "toy-gpt2")
    bad = tmp_path / "bad.yaml"
    bad.write_text("editor: rome\nlayer: 3\nv_lrr: 0.1\n")
    with pytest.raises(ValueError, match="v_lrr"):
        hparams_from_file(bad)
    good = tmp_path / "good.json"
    good.write_text('{"editor": "wilke", "candidate_layers": "0..3", "score": "update_norm"}')
    loaded = hparams_from_file(good)
    assert isinstance(loaded, WilKEHParams) and loaded.candidate_layers == [0, 1, 2, 3]
    assert hp_mod.to_dict(loaded)["editor"] == "wilke"
    with pytest.raises(ValueError, match="score"):
        WilKEHParams(score="max_activation")


@pytest.mark.parametrize("key, value, words", [
    ("v_num_grad_steps", "40", "expected int, got '40'"), ("v_lr", "fast", "expected float, got 'fast'"),
    ("clamp_norm_factor", None, "expected float, got None"), ("mom2_n_samples", -1, "must be >= 1"),
    ("kl_factor", -0.1, "must be >= 0"), ("v_lr", float("nan"), "finite"), ("update_form", "rebuilt", "update_form"),
])
def test_hparams_values_are_checked_by_type_and_range(tmp_path, key, value, words):
    path = tmp_path / "rome" / "bad.yaml"
    path.parent.mkdir()
    path.write_text(f"layer: 1\n{key}: {json.dumps(value) if value == value else '.nan'}\n")
    with pytest.raises(ValueError, match=f"bad.yaml.*{re.escape(words)}"):
        hparams_from_file(path)


def test_a_lifelong_config_of_one_editor_refuses_the_settings_of_another():
    from wilke_lib.lifelong import LifelongConfig, resolve_hparams

    with pytest.raises(ValueError, match="editor 'memit' but hyper-parameters of 'rome'"):
        resolve_hparams(LifelongConfig(model_name="toy-gpt2", editor="memit", hparams=ROMEHParams(layer=1)))
    with pytest.raises(TypeError, match="n_edits must be an int, got 'four'"):
        LifelongConfig(model_name="toy-gpt2", editor="rome", n_edits="four")


# ---- AlphaEdit --------------------------------------------------------------------------------

def test_alphaedit_update_leaves_the_preserved_keys_alone():
    """The null-space property: dW k_0 = 0 for every preserved key (eigen-directions of C above the threshold)."""
    from wilke_lib.editors.alphaedit import projected_update

    gen = torch.Generator().manual_seed(0)
    basis, _ = torch.linalg.qr(torch.randn(8, 8, generator=gen))
    eigvals = torch.tensor([10.0, 5.0, 2.0, 1.0, 0.5, 1e-3, 5e-4, 1e-4])
    small = basis[:, eigvals < 2e-2]
    projector = small @ small.T
    earlier = torch.randn(8, 3, generator=gen) @ torch.randn(3, 8, generator=gen)
    earlier = earlier @ earlier.T
    dW = projected_update(torch.randn(5, 2, generator=gen), torch.randn(8, 2, generator=gen), projector, earlier, 10.0)
    preserved = basis[:, eigvals >= 2e-2]
    assert dW.abs().max() > 1e-3
    assert (dW @ preserved).abs().max() <= 1e-5 * dW.abs().max()


def test_alphaedit_remembers_the_keys_of_earlier_edits_and_forgets_a_failed_one(tok, corpus_file, stats_dir):
    from wilke_lib.editors.common import EditorState

    model = fresh_model("gptj", tok)
    hparams = all_hparams(corpus_file)["alphaedit"]
    cache = EditCache.for_model(model, stats_dir=stats_dir)
    state = EditorState()
    result = edit(model, tok, REQUEST, hparams, cache=cache, state=state)
    assert set(state.tensors) == {"alphaedit/layer1", "alphaedit/layer2"}
    first = {k: v.clone() for k, v in state.tensors.items()}
    rollback(model, tok, REQUEST, hparams, result, cache=cache, state=state)
    assert all(float(state.tensors[k].trace()) > float(first[k].trace()) for k in first)  # the rollback's keys too
    kept = {k: v.clone() for k, v in state.tensors.items()}
    with pytest.raises(EditError):
        edit(model, tok, {**REQUEST, "prompt": "The capital city of Spain", "subject": "Nobody"}, hparams, cache=cache,
             state=state)
    assert all(torch.equal(state.tensors[k], kept[k]) for k in kept)


def test_edit_and_rollback_counts_an_impossible_edit_as_a_failure(tok, corpus_file, stats_dir, monkeypatch):
    model = fresh_model("gpt2", tok)
    before = digest(model)
    template, subject, answer = known_prompt(model, tok)
    record = {"case_id": 8, "requested_rewrite": {"prompt": template, "subject": subject,
                                                  "target_new": {"str": NEW}, "target_true": {"str": answer}}}

    def impossible(*args, **kwargs):
        raise EditError("singular system (test)")

    monkeypatch.setitem(EDITORS, "rome", impossible)
    hparams = ROMEHParams(layer=2, **FAST, **mom2(corpus_file))
    row = edit_and_rollback(model, tok, record, hparams, EditCache.for_model(model, stats_dir=stats_dir))
    assert digest(model) == before
    assert row["success"] is False and row["layers"] == [] and "singular system (test)" in row["error"]
    assert row["rollback_restored"] is True  # the unchanged model still answers the known fact
