"""The batched WilKE layer search (`delta.optimize_deltas`, one row per layer) against the one-layer-at-a-time search.

`batched_layer_scores` must return what `wilke.layer_scores` returns: the same keys, and delta norms,
v*, losses and scores equal within rtol 1e-4 (float32; the batched run does the same arithmetic in
another order), the same number of optimisation steps per layer (early stopping freezes each row at
its own step) and the same chosen layer. Tiny random models (4 layers, d_model 32), fixed context
prefixes and an identity second moment keep every case well under a second.

The last layer is left out of the candidates unless the subject ends the prompt: when tokens follow
the fact token, a delta at the last layer cannot reach the target logits, its gradient is rounding
noise that Adam normalises (in both implementations), and its delta norm is meaningless in both.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib

import pytest
import torch

from tiny import make_tiny_model
from wilke_lib.editors import delta as dl
from wilke_lib.editors import runners as pc
from wilke_lib.editors import wilke as wk
from wilke_lib.arch import ModelAdapter, hooks
from wilke_lib.editing import EditCache, EditError, edit
from wilke_lib.editors.common import WeightJournal
from wilke_lib.hparams import MEMITHParams, ROMEHParams, WilKEHParams
from wilke_lib.editors.wilke import choose_layer, layer_scores, wilke_editor

RTOL = 1e-4
ARCHS = ("gpt2", "gptj", "llama", "gpt_neox")
PREFIXES = ["Hello there. ", "Tobin Ash was born in Oslo. ", "Music"]
REQUESTS = {
    # the subject ends the prompt: the fact token is the last prompt token
    "subject_last": {"prompt": "The capital city of {}", "subject": "Valo Durn",
                     "target_new": {"str": "Norway"}, "target_true": {"str": "Spain"}},
    # tokens after the subject (attention over the cached prefix) and a multi-token target
    "suffix": {"prompt": "{} was born in", "subject": "Tobin Ash",
               "target_new": {"str": "Oslo"}, "target_true": {"str": "Rome"}},
    # a one-token subject first: the bare prompt's prefix is empty (an all-pad cache row)
    "one_token_subject": {"prompt": "{} was born in", "subject": "Valo",
                          "target_new": {"str": "Spain"}, "target_true": {"str": "Paris"}},
}


def setup(arch: str, tok, full_depth: bool = False, **overrides) -> tuple:
    """A tiny model, WilKE settings with fixed prefixes and few steps, a cache with C = I.

    Candidates: every layer (full_depth) or all but the last (see the module docstring)."""
    model = make_tiny_model(arch, len(tok), eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    n_layers = ModelAdapter(model).n_layers
    settings = dict(context_prefixes=PREFIXES, v_num_grad_steps=8, delta_runner="full",  # the reference: no cache
                    candidate_layers=list(range(n_layers if full_depth else n_layers - 1)))
    settings.update(overrides)
    hparams = WilKEHParams(**settings)
    cache = EditCache(model_key=f"tiny-{arch}")
    adapter = ModelAdapter(model)
    for l in range(adapter.n_layers):
        cache.mom2[EditCache._stats_key(hparams, l)] = torch.eye(adapter.d_mlp)
    return model, hparams, cache


def assert_same(sequential: dict, batched: dict, rtol: float = RTOL) -> None:
    assert list(sequential) == list(batched)
    for l, s in sequential.items():
        b = batched[l]
        assert b.layer == l
        torch.testing.assert_close(b.k_star, s.k_star)  # the same compute_ks pass
        assert b.activation_norm == s.activation_norm
        assert b.spectral_norm == s.spectral_norm and b.weight_fro_norm == s.weight_fro_norm
        assert b.delta_norm == pytest.approx(s.delta_norm, rel=rtol), l
        assert b.score == pytest.approx(s.score, rel=rtol), l
        if s.update_rel_norm is None:
            assert b.update_rel_norm is None
        else:
            assert b.update_rel_norm == pytest.approx(s.update_rel_norm, rel=rtol)
        scale = float(s.v_star.norm())
        torch.testing.assert_close(b.v_star, s.v_star, rtol=rtol, atol=rtol * scale)
        assert b.info["steps"] == s.info["steps"], l
        assert set(dl.INFO_KEYS) <= set(b.info) and set(s.info) <= set(b.info)
        for key in ("loss", "nll", "kl", "weight_decay", "target_prob", "v0_norm", "nll_init"):
            assert b.info[key] == pytest.approx(s.info[key], rel=rtol, abs=1e-6), (l, key)
        assert b.info["loss_history"] == pytest.approx(s.info["loss_history"], rel=rtol, abs=1e-6)
        assert b.info["n_prompts"] == s.info["n_prompts"]
    assert choose_layer(batched) == choose_layer(sequential)


def digest(model) -> str:
    h = hashlib.sha256()
    for p in model.parameters():
        h.update(p.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("which", sorted(REQUESTS))
def test_matches_sequential_search(arch, which, tiny_tokenizer):
    model, hparams, cache = setup(arch, tiny_tokenizer, full_depth=(which == "subject_last"))
    before = digest(model)
    request = REQUESTS[which]
    sequential = layer_scores(model, tiny_tokenizer, request, hparams, cache)
    batched = wk.batched_layer_scores(model, tiny_tokenizer, request, hparams, cache, runner="prefix-cache")
    assert_same(sequential, batched)
    assert {c.info["delta_runner"] for c in batched.values()} == {"block"}  # the fast path ran
    assert not any("delta_runner_fallback" in c.info for c in batched.values())
    assert digest(model) == before  # the search changes no weight
    assert all(p.requires_grad for p in model.parameters())  # restored after the search


@pytest.mark.parametrize("arch", ARCHS)
def test_rome_and_memit_on_the_prefix_cache_make_the_same_edit(arch, tiny_tokenizer):
    """ROME's and MEMIT's delta optimisation on the prefix cache: the same weight change as the full
    optimisation (the released code's) within float rounding amplified by Adam (rtol 1e-4)."""
    model, wilke_hp, cache = setup(arch, tiny_tokenizer)
    shared = {f.name: getattr(wilke_hp, f.name) for f in dataclasses.fields(ROMEHParams)
              if f.name not in ("layer", "update_form")}
    request = REQUESTS["suffix"]
    for hparams in (ROMEHParams(**{**shared, "layer": 1}), MEMITHParams(**{**shared, "layers": [1, 2]},
                                                                        mom2_update_weight=10.0)):
        deltas = {}
        for runner in ("full", "prefix-cache"):
            result = edit(model, tiny_tokenizer, request, dataclasses.replace(hparams, delta_runner=runner), copy=True,
                          cache=cache)
            deltas[runner] = result.weight_deltas
            expected = "block" if runner == "prefix-cache" else "full"
            runners = {i.get("delta_runner") for i in [result.info] + list(result.info.get("per_request", []))}
            assert expected in runners or runners == {None}
        assert deltas["full"].keys() == deltas["prefix-cache"].keys()
        for name, full in deltas["full"].items():
            torch.testing.assert_close(deltas["prefix-cache"][name], full, rtol=RTOL, atol=RTOL * float(full.abs().max()))


@pytest.mark.parametrize("mode", ["prefix-kv", "full"])
def test_other_runners_match(mode, tiny_tokenizer):
    model, hparams, cache = setup("gpt2", tiny_tokenizer)
    request = REQUESTS["suffix"]
    sequential = layer_scores(model, tiny_tokenizer, request, hparams, cache)
    batched = wk.batched_layer_scores(model, tiny_tokenizer, request, hparams, cache, runner=mode)
    assert_same(sequential, batched)
    assert {c.info["delta_runner"] for c in batched.values()} == {mode}


@pytest.mark.parametrize("layers,chunk_size", [([2, 0], None), ([1], None), ([1, 0, 2], 1), (None, 2)])
def test_candidate_subsets_and_chunks(layers, chunk_size, tiny_tokenizer):
    model, hparams, cache = setup("gptj", tiny_tokenizer)
    request = REQUESTS["suffix"]
    sequential = layer_scores(model, tiny_tokenizer, request, hparams, cache, layers=layers)
    batched = wk.batched_layer_scores(model, tiny_tokenizer, request, hparams, cache, layers=layers,
                                      chunk_size=chunk_size, runner="prefix-cache")
    assert_same(sequential, batched)
    # the candidate layers of the settings are honoured
    model, hparams, cache = setup("gpt2", tiny_tokenizer, candidate_layers=[1, 2])
    batched = wk.batched_layer_scores(model, tiny_tokenizer, request, hparams, cache)
    assert sorted(batched) == [1, 2]


@pytest.mark.parametrize("overrides", [dict(score="update_norm"), dict(use_activation=False),
                                       dict(use_weight_norm=False), dict(use_delta=False),
                                       dict(v_weight_decay_form="squared", clamp_norm_factor=0.5)])
def test_score_kinds_and_ablations(overrides, tiny_tokenizer):
    model, hparams, cache = setup("gpt2", tiny_tokenizer, **overrides)
    request = REQUESTS["suffix"]
    sequential = layer_scores(model, tiny_tokenizer, request, hparams, cache)
    batched = wk.batched_layer_scores(model, tiny_tokenizer, request, hparams, cache, runner="prefix-cache")
    assert_same(sequential, batched)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_early_stopping_freezes_each_row_at_its_step(arch, tiny_tokenizer):
    model, hparams, cache = setup(arch, tiny_tokenizer, v_num_grad_steps=12, v_lr=0.3)
    request = REQUESTS["suffix"]
    histories = {l: c.info["loss_history"] for l, c in layer_scores(model, tiny_tokenizer, request, hparams,
                                                                     cache).items()}
    # a threshold that stops some layers early, at different steps, and others not at all
    threshold = None
    for candidate in sorted({round(v, 4) for h in histories.values() for v in h}):
        stops = [next((s for s, v in enumerate(h) if v < candidate), None) for h in histories.values()]
        early = {s for s in stops if s is not None and s < len(histories[0]) - 1}
        if len(early) >= 1 and None in stops and len(set(stops)) >= 2:
            threshold = candidate
            break
    assert threshold is not None, "no threshold splits the layers; the test would be vacuous"
    model, hparams, cache = setup(arch, tiny_tokenizer, v_num_grad_steps=12, v_lr=0.3, v_early_stop_loss=threshold)
    sequential = layer_scores(model, tiny_tokenizer, request, hparams, cache)
    steps = {l: c.info["steps"] for l, c in sequential.items()}
    assert len(set(steps.values())) >= 2 and min(steps.values()) < 12
    for mode in ("block", "prefix-kv"):
        batched = wk.batched_layer_scores(model, tiny_tokenizer, request, hparams, cache, runner=mode)
        assert_same(sequential, batched)


def test_editor_makes_the_same_edit(tiny_tokenizer):
    model, hparams, cache = setup("gpt2", tiny_tokenizer)
    request = REQUESTS["suffix"]
    sequential = hparams
    if "search" in {f.name for f in dataclasses.fields(hparams)}:  # once wilke_editor dispatches on it
        sequential = dataclasses.replace(hparams, search="sequential")
    reference = edit(model, tiny_tokenizer, request, sequential, copy=True, cache=cache)
    adapter = ModelAdapter(model)
    journal = WeightJournal(adapter)
    out = wilke_editor(model, tiny_tokenizer, request, dataclasses.replace(hparams, search="batched"), journal=journal,
                       layers=None, cache=cache)
    assert out.layers == reference.layers
    assert out.scores == pytest.approx(reference.scores, rel=RTOL)
    name = adapter.name_of("mlp_out", out.layers[0])
    applied = journal.deltas()[name]
    expected = reference.weight_deltas[name]
    torch.testing.assert_close(applied, expected, rtol=RTOL, atol=RTOL * float(expected.abs().max()))
    assert out.info["search"] == "batched"
    for key in ("delta_norms", "activation_norms", "spectral_norms", "target_probs"):
        assert out.info[key] == pytest.approx(reference.info[key], rel=RTOL)


def test_fallback_when_the_block_runner_is_unsupported(monkeypatch, caplog, tiny_tokenizer):
    def refuse(self, prompts, hidden):
        raise pc.Unsupported("refused by the test")

    monkeypatch.setattr(pc.BlockRunner, "check", refuse)
    model, hparams, cache = setup("llama", tiny_tokenizer)
    request = REQUESTS["suffix"]
    sequential = layer_scores(model, tiny_tokenizer, request, hparams, cache)
    with caplog.at_level("WARNING"):
        batched = wk.batched_layer_scores(model, tiny_tokenizer, request, hparams, cache, runner="prefix-cache")
    assert {c.info["delta_runner"] for c in batched.values()} == {"prefix-kv"}
    assert all("refused by the test" in c.info["delta_runner_fallback"] for c in batched.values())
    assert "refused by the test" in caplog.text  # a deliberate fallback is logged at WARNING
    assert_same(sequential, batched)
    with pytest.raises(pc.Unsupported, match="refused by the test"):  # asked for by name: no fallback
        wk.batched_layer_scores(model, tiny_tokenizer, request, hparams, cache, runner="block")


@pytest.mark.parametrize("site", dl.SITES)
def test_a_copy_joins_after_its_own_block(site, tiny_tokenizer):
    """The block that holds the delta runs in the unpatched passes only (prefix, recording, the
    runner's checked pass), as the block before it, never in an optimisation step: its output there
    is the recorded one plus the delta. Every later block runs once more per step."""
    model, hparams, cache = setup("gpt2", tiny_tokenizer)
    adapter = ModelAdapter(model)
    calls = collections.Counter()

    def count(j: int):
        return lambda _module, _inputs: calls.update([j])

    with hooks(pre=[(adapter.layer(j), count(j)) for j in range(adapter.n_layers)]):
        out = dl.optimize_deltas(model, tiny_tokenizer, REQUESTS["suffix"], [1], hparams, PREFIXES,
                                 runner="block", site=site)[1]
    assert out.info["delta_runner"] == "block"
    forwards = len(out.info["loss_history"])
    assert forwards > 1
    assert calls[1] == calls[0] == 3
    assert calls[2] == calls[3] == calls[1] + forwards


def test_profile_and_errors(tiny_tokenizer):
    model, hparams, cache = setup("gpt2", tiny_tokenizer)
    request = REQUESTS["suffix"]
    profile: dict[str, float] = {}
    wk.batched_layer_scores(model, tiny_tokenizer, request, hparams, cache, profile=profile)
    assert {"keys", "forward", "backward", "optimizer step"} <= set(profile)
    assert all(v >= 0 for v in profile.values())
    with pytest.raises(ValueError, match="repeated"):
        wk.batched_layer_scores(model, tiny_tokenizer, request, hparams, cache, layers=[1, 1])
    with pytest.raises(ValueError, match="runner"):
        wk.batched_layer_scores(model, tiny_tokenizer, request, hparams, cache, runner="fast")
    with pytest.raises(EditError):
        wk.batched_layer_scores(model, tiny_tokenizer, {**request, "target_new": {"str": " "}}, hparams, cache)


def _runner_pair(arch: str, tok) -> tuple:
    model, hparams, _ = setup(arch, tok)
    prompts = pc.build_prompts(tok, REQUESTS["suffix"], hparams, PREFIXES, torch.device("cpu"))
    cache = pc.prefix_cache(model, prompts)
    return model, prompts, cache


@pytest.mark.parametrize("arch", ARCHS)
def test_the_prefix_cache_passes_use_no_deprecated_argument(arch, tiny_tokenizer):
    """transformers renamed `past_key_values` to `cache` (the old name goes in 5.40): the prefix pass,
    its repetition and the suffix pass use the name this release takes (no deprecation warning), and
    the repeated cache gives every copy its prompt's states."""
    import warnings

    model, prompts, _ = _runner_pair(arch, tiny_tokenizer)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*past_key_values.*")
        cache = pc.prefix_cache(model, prompts)
        once = pc.model_suffix_pass(model, prompts, cache, 1)
        twice = pc.model_suffix_pass(model, prompts, pc.repeat_cache(model, prompts, cache, 2), 2)
    assert cache is not None
    torch.testing.assert_close(twice[0::2], once, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(twice[1::2], once, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
def test_fast_blocks_compute_what_the_modules_compute(arch, tiny_tokenizer):
    """GPT-2's and GPT-J's blocks run as `fast_blocks` forwards (other architectures as modules), with
    the same final states and the same gradient with respect to the deltas of two copies."""
    model, prompts, cache = _runner_pair(arch, tiny_tokenizer)
    with torch.no_grad():
        for p in model.parameters():
            p.requires_grad_(False)
    fast = pc.BlockRunner(model, prompts, cache, max_copies=2)
    plain = pc.BlockRunner(model, prompts, cache, max_copies=2, fast=False)
    modules = [ModelAdapter(model).layer(j) for j in range(ModelAdapter(model).n_layers)]
    assert all(plain.blocks[j] is m for j, m in enumerate(modules))
    assert all((fast.blocks[j] is not m) == (arch in ("gpt2", "gptj")) for j, m in enumerate(modules))
    torch.manual_seed(0)
    deltas = {1: torch.randn(1, 32, requires_grad=True), 2: torch.randn(1, 32, requires_grad=True)}
    outs, grads = [], []
    for runner in (fast, plain):
        out = runner.run(deltas)
        outs.append(out)
        grads.append(torch.autograd.grad(out.pow(2).sum(), list(deltas.values())))
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-5)
    for g_fast, g_plain in zip(*grads):
        torch.testing.assert_close(g_fast, g_plain, rtol=1e-4, atol=1e-5)
    fast.check(prompts, fast.run({0: fast.zero_delta()}))


def test_a_block_with_a_hook_runs_as_its_module(tiny_tokenizer):
    """An editor's hook inside a block (here on block 2's MLP) must run: that block is called as a module."""
    model, prompts, cache = _runner_pair("gptj", tiny_tokenizer)
    adapter = ModelAdapter(model)
    seen = []
    with hooks(forward=[(adapter.mlp(2), lambda _m, _i, _o: seen.append(1))]):
        runner = pc.BlockRunner(model, prompts, cache, max_copies=1)
        assert runner.blocks[2] is adapter.layer(2)
        assert all(runner.blocks[j] is not adapter.layer(j) for j in (0, 1, 3))
        before = len(seen)
        runner.run({1: runner.zero_delta()})
        assert len(seen) == before + 1
