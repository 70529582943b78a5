"""Organism training: how the corpus is packed into rows, and that training is reproducible."""

from __future__ import annotations

import random
from dataclasses import replace

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from wilke_lib import organisms
from wilke_lib.organisms import world as world_lib


@pytest.fixture(scope="module")
def corpus_and_tokenizer():
    texts = world_lib.corpus(world_lib.build_world())[:400]
    return texts, organisms.train_tokenizer(texts, vocab_size=512)


def test_pack_rows_uses_every_sentence_once_within_the_limits(corpus_and_tokenizer):
    texts, tok = corpus_and_tokenizer
    limit = max(len(tok(t)["input_ids"]) for t in texts) + 20
    rows = organisms.pack_rows(texts, tok, max_sentences=3, max_tokens=limit, rng=random.Random(0))
    assert all(row[-1] == tok.eos_token_id and len(row) <= limit for row in rows)
    decoded = [tok.decode(row[:-1]) for row in rows]
    assert sorted(" ".join(decoded).split()) == sorted(" ".join(texts).split())
    sizes = {sum(text in d for text in texts) for d in decoded}
    assert 1 in sizes and max(sizes) >= 2, f"rows should hold 1..3 sentences, got sizes {sizes}"


def test_pack_rows_respects_a_tight_token_limit(corpus_and_tokenizer):
    texts, tok = corpus_and_tokenizer
    longest = max(len(tok(t)["input_ids"]) for t in texts) + 1
    rows = organisms.pack_rows(texts, tok, max_sentences=3, max_tokens=longest, rng=random.Random(1))
    assert all(len(row) <= longest for row in rows)
    assert len(rows) < len(texts)
    single = organisms.pack_rows(texts, tok, max_sentences=1, max_tokens=longest, rng=random.Random(1))
    assert len(single) == len(texts)


@pytest.mark.slow
def test_training_is_reproducible(tmp_path):
    """Two trainings with the same configuration give bit-identical weights (CPU)."""
    cfg = replace(organisms.ORGANISMS["toy-gpt2"], n_layer=1, d_model=16, n_head=2, d_mlp=32,
                  vocab_size=300, epochs=1, batch_size=256, warmup_steps=5, attention_only_layers=0)
    weights = []
    for run in ("a", "b"):
        organisms.train(cfg, tmp_path / run, device="cpu")
        model = AutoModelForCausalLM.from_pretrained(tmp_path / run)
        weights.append({k: v.clone() for k, v in model.state_dict().items()})
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


@pytest.mark.parametrize("arch", ["gpt2", "gptj"])
def test_mlp_drop_skips_a_branch_per_row_and_leaves_a_plain_model(arch, corpus_and_tokenizer):
    """Stochastic depth on the MLPs: in training a dropped row runs without the MLP (its branch is
    zero), a kept row's branch is scaled by 1 / (1 - p); in eval mode and after the block nothing is
    changed."""
    _, tok = corpus_and_tokenizer
    cfg = replace(organisms.ORGANISMS[f"toy-{arch}"], n_layer=2, d_model=16, n_head=2, d_mlp=32)
    model = organisms.build_model(cfg, tok)
    model.train()
    mlp = model.transformer.h[0].mlp
    x = torch.randn(64, 3, 16)
    plain = mlp(x)
    with organisms.mlp_drop_hooks(model, (0.5, 0.0), torch.Generator().manual_seed(0)):
        dropped = mlp(x)
        zero = dropped.abs().sum(dim=(1, 2)) == 0
        assert 10 < int(zero.sum()) < 54
        assert torch.allclose(dropped[~zero], 2 * plain[~zero])
        assert torch.equal(model.transformer.h[1].mlp(x), model.transformer.h[1].mlp(x))  # p = 0: no hook
        model.eval()
        assert torch.equal(mlp(x), plain)
    model.train()
    assert torch.equal(mlp(x), plain)


def test_mlp_drop_names_a_bad_setting(corpus_and_tokenizer):
    _, tok = corpus_and_tokenizer
    model = organisms.build_model(replace(organisms.ORGANISMS["toy-gpt2"], n_layer=2, d_model=16, n_head=2,
                                          d_mlp=32), tok)
    with pytest.raises(ValueError, match="3 probabilities for 2 MLP layers"):
        with organisms.mlp_drop_hooks(model, (0.1, 0.1, 0.1), torch.Generator()):
            pass
    with pytest.raises(ValueError, match=r"must be in \[0, 1\)"):
        with organisms.mlp_drop_hooks(model, (1.0, 0.0), torch.Generator()):
            pass


@pytest.mark.parametrize("arch", ["gpt2", "gptj"])
def test_silenced_mlps_stay_zero_through_training_steps(arch, corpus_and_tokenizer):
    """Attention-only early layers: the first MLP outputs zero before and after optimiser steps (its
    parameters are frozen), the others still learn; a bad count is named."""
    _, tok = corpus_and_tokenizer
    cfg = replace(organisms.ORGANISMS[f"toy-{arch}"], n_layer=2, d_model=16, n_head=2, d_mlp=32)
    model = organisms.build_model(cfg, tok)
    organisms.silence_mlps(model, 1)
    second = model.transformer.h[1].mlp.fc_in.weight if arch == "gptj" else model.transformer.h[1].mlp.c_fc.weight
    before = second.detach().clone()
    optimiser = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    ids = torch.randint(0, len(tok) - 1, (4, 8))
    for _ in range(3):
        model(input_ids=ids, labels=ids).loss.backward()
        optimiser.step()
        optimiser.zero_grad()
    x = torch.randn(2, 3, 16)
    assert model.transformer.h[0].mlp(x).abs().max() == 0
    assert not torch.equal(second, before)
    with pytest.raises(ValueError, match=r"attention_only_layers: 2 is not in \[0, 2\)"):
        organisms.silence_mlps(model, 2)


def test_syllable_names_come_in_anagram_pairs_and_stay_in_pieces():
    """Persons named by syllables: two subjects share each multiset of syllables in another order, and
    the tokenizer keeps every name word in pieces of at most three letters (no token is a name)."""
    spec = replace(world_lib.DEFAULT_SPEC.scaled(0.1), syllable_names=True)
    world = world_lib.build_world(spec)
    persons = [p for p in world.subjects["person"] if p not in world.famous]
    assert len(set(persons)) == len(persons) and all(2 == len(p.split()) for p in persons)
    letters = [sorted(p.replace(" ", "").lower()) for p in persons]
    assert all(letters[i] == letters[i + 1] for i in range(0, len(persons) - 1, 2))
    tok = organisms.train_tokenizer(world_lib.corpus(world, 0), vocab_size=1024, split_words=world.split_words)
    pieces = [t.replace("\u0120", "") for p in persons for t in tok.tokenize(" " + p)]
    assert max(len(t) for t in pieces) <= 3
    assert tok.decode(tok(" " + persons[0])["input_ids"]) == " " + persons[0]
    assert world_lib.build_world(world_lib.WorldSpec()).split_words == ()  # a world without syllable names has none


@pytest.mark.parametrize("arch", ["gpt2", "gptj"])
def test_knockout_mask_hides_a_names_earlier_pieces_from_later_positions(arch):
    """With nothing knocked out the 4D mask gives the model's outputs under its usual padding mask; with
    every name knocked out, a position after a name no longer sees the name's earlier pieces."""
    import random as random_lib

    world = world_lib.build_world(world_lib.DEFAULT_SPEC.scaled(0.1))
    texts = world_lib.corpus(world, 0)
    tok = organisms.train_tokenizer(texts, vocab_size=512)
    finder = organisms.NameFinder([n for names in world.subjects.values() for n in names], tok)
    rows = organisms.pack_rows(texts[:40], tok, 3, 64, random_lib.Random(0))[:4]
    spans = [finder.spans(row) for row in rows]
    assert any(spans) and all(tok.decode(row[s:e]).strip() in {n for v in world.subjects.values() for n in v}
                              for row, found in zip(rows, spans) for s, e in found)
    model = organisms.build_model(replace(organisms.ORGANISMS[f"toy-{arch}"], n_layer=2, d_model=16, n_head=2,
                                          d_mlp=32), tok).eval()
    ids, mask = organisms.collate(rows, tok.pad_token_id)
    real = mask.bool()
    plain = model(input_ids=ids, attention_mask=mask).logits
    none = organisms.knockout_mask(rows, ids.shape[1], finder, 0.0, random_lib.Random(0))
    assert torch.allclose(model(input_ids=ids, attention_mask=none).logits[real], plain[real], atol=1e-5)
    every = organisms.knockout_mask(rows, ids.shape[1], finder, 1.0, random_lib.Random(0))
    r, (s, e) = next((r, found[0]) for r, found in enumerate(spans) if found)
    assert not every[r, 0, e:, s:e - 1].any() and every[r, 0, e - 1, s:e].all()
    assert not torch.allclose(model(input_ids=ids, attention_mask=every).logits[real], plain[real], atol=1e-5)


def test_planted_depth_skips_the_mlps_below_a_names_layer_at_its_pieces_only():
    """With p = 1 every MLP below a subject's planted layer outputs zero at the name's pieces while
    training; the other positions, the layers from the planted one on, and eval mode are untouched."""
    import random as random_lib

    world = world_lib.build_world(world_lib.DEFAULT_SPEC.scaled(0.1))
    texts = world_lib.corpus(world, 0)
    tok = organisms.train_tokenizer(texts, vocab_size=512)
    names = [n for kind in world.subjects.values() for n in kind]
    assert {organisms.planted_layer(n, 1, 3) for n in names} == {1, 2, 3}
    assert organisms.planted_layer(names[0], 1, 3) == organisms.planted_layer(names[0], 1, 3)
    finder = organisms.NameFinder(names, tok, min_pieces=1)
    rows = organisms.pack_rows(texts[:40], tok, 3, 64, random_lib.Random(0))[:4]
    model = organisms.build_model(replace(organisms.ORGANISMS["toy-gpt2"], n_layer=4, d_model=16, n_head=2,
                                          d_mlp=32), tok).train()
    planted = organisms.PlantedDepth(model, finder, 1, 3, 1.0, random_lib.Random(0))
    ids, _ = organisms.collate(rows, tok.pad_token_id)
    planted.plant(rows, ids.shape[1])
    r, (s, e) = next((r, found[0]) for r, row in enumerate(rows) if (found := finder.spans(row)))
    layer = organisms.planted_layer(finder.name_of[tuple(rows[r][s:e])], 1, 3)
    x = torch.randn(len(rows), ids.shape[1], 16)
    with planted.hooks():
        outputs = [model.transformer.h[l].mlp(x) for l in range(4)]
        model.eval()
        assert model.transformer.h[0].mlp(x)[r, s:e].abs().sum(dim=-1).gt(0).all()
    for l in range(4):
        assert bool((outputs[l][r, s:e].abs().sum(dim=-1) == 0).all()) == (l < layer)
    outside = planted.floor == 0
    assert outside.any() and outputs[0][outside].abs().sum(dim=-1).gt(0).all()
    with pytest.raises(ValueError, match=r"planted_depth \(1, 4\) must lie in \[0, 4\)"):
        organisms.PlantedDepth(model, finder, 1, 4, 0.5, random_lib.Random(0))
    per_layer = organisms.PlantedDepth(model, finder, 1, 3, 0.5, random_lib.Random(0), per_layer=True)
    per_layer.plant(rows, ids.shape[1])
    below = torch.stack([per_layer.floor > l for l in range(3)])
    assert set(per_layer.scale[below].tolist()) == {0.0, 2.0} and bool((per_layer.scale[~below] == 1).all())
    with pytest.raises(ValueError, match="per layer"):
        organisms.PlantedDepth(model, finder, 1, 3, 1.0, random_lib.Random(0), per_layer=True)


@pytest.mark.slow  # about 5 min (measured 317 s on a shared 2-core machine)
def test_training_resumes_from_its_checkpoint_to_the_same_weights(tmp_path):
    """Training stopped after one epoch and run again gives the weights of an uninterrupted run, and
    leaves no checkpoint behind; a checkpoint of another configuration is refused by name."""
    cfg = replace(organisms.ORGANISMS["toy-gpt2"], n_layer=1, d_model=16, n_head=2, d_mlp=32,
                  vocab_size=300, epochs=2, batch_size=256, warmup_steps=5, subject_knockout=0.5,
                  planted_depth=(0, 0), attention_only_layers=0)
    organisms.train(cfg, tmp_path / "whole", device="cpu")
    first = organisms.train(cfg, tmp_path / "sliced", device="cpu", time_budget=0.0)  # stops after the first epoch
    assert first["finished"] is False and first["epoch"] == 1 and (tmp_path / "sliced" / organisms.CHECKPOINT_FILE).is_file()
    with pytest.raises(ValueError, match="another configuration"):
        organisms.train(replace(cfg, lr=1e-3), tmp_path / "sliced", device="cpu")
    summary = organisms.train(cfg, tmp_path / "sliced", device="cpu")
    assert summary["finished"] and summary["history"][-1]["epoch"] == 2 and summary["history"][0]["device"] == "cpu"
    assert not (tmp_path / "sliced" / organisms.CHECKPOINT_FILE).exists()
    whole = AutoModelForCausalLM.from_pretrained(tmp_path / "whole").state_dict()
    sliced = AutoModelForCausalLM.from_pretrained(tmp_path / "sliced").state_dict()
    assert all(torch.equal(whole[k], sliced[k]) for k in whole)


def _fact(case_id: int, subject: str, true: str) -> dict:
    return {"case_id": case_id, "requested_rewrite": {
        "prompt": "The mother tongue of {} is", "subject": subject, "relation_id": "P103",
        "target_true": {"str": true, "id": "Q1"}, "target_new": {"str": "French", "id": "Q2"}}}


def test_report_traces_with_impostors_and_keeps_them_out_of_the_targets(tiny_tokenizer):
    from tiny import make_tiny_model
    from wilke_lib.analysis import organism_report as report

    model = make_tiny_model("gpt2", len(tiny_tokenizer))
    pool = [_fact(0, "Valo Durn", "Welsh"), _fact(1, "Mira Durn", "Welsh"), _fact(2, "Nyra Durn", "Dutch"),
            _fact(3, "Mira Quell", "Welsh")]
    chosen = report.impostors(tiny_tokenizer, pool, pool)
    assert chosen[0] == "Nyra Durn"  # same last token, and a different answer ranks before Mira Durn's "Welsh"
    assert chosen[3] is None  # no other subject ends in " Quell"
    rows = report.trace_records(model, tiny_tokenizer, pool, pool=pool, n_samples=3, progress=False)
    assert [r["impostor"] for r in rows] == [chosen[r["case_id"]] for r in pool]
    contrasted = [r for r in rows if r["subject_specific_peak"] >= 0]  # a random model: some gaps are <= 0
    assert contrasted and all(r["impostor"] for r in contrasted)
    for row in contrasted:
        np.testing.assert_allclose(np.subtract(row["mlp_share"], row["impostor_share"]), row["subject_specific_share"])
    summary = report.summary(rows, 4)
    assert summary["n_with_impostor"] == sum(summary["subject_specific_peak_histogram"]) == len(contrasted)
    assert sum(summary["causal_peak_histogram"]) == sum(r["causal_peak"] >= 0 for r in rows)
    stored = {**summary, "n_known": 3000, "known_rate": 0.95, "layers": 4, "rome_success": 1.0, "rome_clamp_factor": 4,
              "rome_steps": 20, "last_token_recall": 1.0}
    table = report.target_table(stored)
    extra = table[table["target"] == "(not a target)"]
    assert set(extra["key"]) == set(report.IMPOSTOR_KEYS)
    assert not set(report.IMPOSTOR_KEYS) & {key for key, _, _ in report.TARGETS}
    assert report.impostor_verdict({"n_with_impostor": 0}) is None
    token_owned = {**stored, "impostor_share_at_peak_median": 1.0, "subject_specific_share_mean_per_layer": [0, 0.2, 0, 0]}
    assert "is at layer 1" in report.impostor_verdict(token_owned)
    assert "last token's, not the subject's" in report.impostor_verdict(token_owned)
    assert "subject's own" in report.impostor_verdict({**token_owned, "impostor_share_at_peak_median": 0.2})
