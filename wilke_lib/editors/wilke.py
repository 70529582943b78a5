"""WilKE: Wise-Layer Knowledge Editor (Hu et al. 2024, Section 5).

Where to edit (Section 5.1): for every candidate layer l, run ROME's delta optimisation at the
output of `mlp_out(l)` (Eq. 9, same prompts and context prefixes as ROME) and score the layer by

    Eq. 10:  l* = argmin_l || delta^l / (||W_proj^l||_2 * sigma(x W_fc^l)) ||_2

Since delta^l lives in d_model and the activation sigma(x W_fc^l) = k*^l in d_mlp, the quotient is
read as a ratio of norms: score "eq10" = ||delta^l|| / (||W_proj^l||_2 * ||k*^l||). The released
code instead ranks layers by the relative size of ROME's update, ||dW^l||_F / ||W_proj^l||_F
(score "update_norm", computed without applying it). The ablation of Section 6.3 drops one factor
of Eq. 10 (use_delta / use_activation / use_weight_norm = False replaces it by 1).

How to edit (Section 5.2, Eq. 11): ROME's rank-one update (ROME Eq. 2) at l*, with the k*, v*
found during the search. A rollback passes layers=[l*] and edits there without searching.

Two searches give the same candidates: `layer_scores` (one ROME optimisation per layer, as the
released code) and `batched_layer_scores` (every layer's delta optimised together, one row each, in
`delta.optimize_deltas`); `WilKEHParams.search` picks one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from wilke_lib.arch import ModelAdapter, model_device
from wilke_lib.editors.cache import EditCache
from wilke_lib.editors.common import EditorOutput, EditorState, WeightJournal
from wilke_lib.editors.delta import LayerKeys, compute_keys, optimize_deltas, timed
from wilke_lib.editors.rome import RomeOutcome, apply_rank_one, compute_v, rank_one_update, rome_target
from wilke_lib.hparams import WilKEHParams
from wilke_lib.tokens import prepare_request


@dataclass
class LayerCandidate:
    """The quantities of Eq. 10 at one layer, and ROME's solution there (k*, v*, delta, and k_target,
    the key ROME's update maps to v*: `editors.rome`)."""

    layer: int
    k_star: torch.Tensor
    v_star: torch.Tensor
    delta: torch.Tensor
    delta_norm: float          # ||delta^l||_2
    activation_norm: float     # ||sigma(x W_fc^l)||_2 = ||k*^l||_2
    spectral_norm: float       # ||W_proj^l||_2 (largest singular value)
    weight_fro_norm: float     # ||W_proj^l||_F
    score: float
    update_rel_norm: float | None = None  # ||dW^l||_F / ||W_proj^l||_F (score "update_norm" only)
    info: dict[str, Any] = field(default_factory=dict)
    k_target: torch.Tensor | None = None


def eq10_score(delta_norm: float, activation_norm: float, spectral_norm: float, hparams: WilKEHParams) -> float:
    """Eq. 10 as a ratio of norms, with the factors switched off by the ablation replaced by 1."""
    numerator = delta_norm if hparams.use_delta else 1.0
    denominator = ((spectral_norm if hparams.use_weight_norm else 1.0)
                   * (activation_norm if hparams.use_activation else 1.0))
    return numerator / denominator if denominator > 0 else float("inf")


def update_norm_score(update_rel: float, delta_norm: float, fro_norm: float, hparams: WilKEHParams) -> float:
    """The released code's criterion ||dW^l||_F / ||W_proj^l||_F with the ablated factors replaced by 1.

    ROME's released update is rank one, dW = delta (C^-1 k*)^T / (k_t^T C^-1 k*), so ||dW||_F = ||delta|| * g
    with the key term g = ||C^-1 k*|| / (k_t^T C^-1 k*); g is recovered as update_rel * ||W||_F / ||delta||.
    """
    if hparams.use_delta and hparams.use_activation and hparams.use_weight_norm:
        return update_rel
    key_gain = update_rel * fro_norm / delta_norm if delta_norm > 0 else float("inf")
    return ((delta_norm if hparams.use_delta else 1.0) * (key_gain if hparams.use_activation else 1.0)
            / (fro_norm if hparams.use_weight_norm else 1.0))


def candidate_layers(model: nn.Module, hparams: WilKEHParams) -> list[int]:
    """hparams.candidate_layers, or every layer whose MLP writes something; checked against the model.

    An MLP whose output projection is exactly zero (an attention-only layer, as in the organisms'
    `attention_only_layers`, or a pruned MLP) stores nothing, and both scores divide by its norm: the
    default search leaves such layers out, and naming one explicitly is an error."""
    adapter = ModelAdapter(model)
    n_layers = adapter.n_layers
    layers = hparams.candidate_layers if hparams.candidate_layers is not None else list(range(n_layers))
    bad = [l for l in layers if not 0 <= l < n_layers]
    if bad:
        raise ValueError(f"candidate layers {bad} out of range for a {n_layers}-layer model")
    silent = [l for l in layers if not adapter.out_weight(l).any()]
    if hparams.candidate_layers is not None and silent:
        raise ValueError(f"candidate layers {silent}: their MLP output projection is all zero (attention-only "
                         "layers), so Eq. 10 is undefined there; leave them out of candidate_layers")
    layers = [l for l in layers if l not in silent]
    if not layers:
        raise ValueError("no candidate layer: every MLP's output projection is all zero")
    return list(layers)


def score_candidate(model: nn.Module, tok: PreTrainedTokenizerBase, layer: int, keys: LayerKeys,
                    delta: torch.Tensor, info: dict[str, Any], hparams: WilKEHParams, cache: EditCache,
                    profile: dict[str, float] | None = None) -> LayerCandidate:
    """The norms of Eq. 10 at `layer` for an optimised delta, and the layer's score."""
    device = model_device(model)
    k_star = keys.star
    with timed(profile, "norms and scores", device):
        weight = ModelAdapter(model).out_weight(layer).float()
        v_star, k_target = rome_target(weight, keys, delta, hparams.update_form)
        spectral = float(torch.linalg.matrix_norm(weight, ord=2))
        fro = float(torch.linalg.matrix_norm(weight, ord="fro"))
        delta_norm, activation_norm = float(delta.norm()), float(k_star.norm())
    update_rel = None
    if hparams.score == "update_norm":
        with timed(profile, "second-moment solve", device):
            dW = rank_one_update(weight, cache.get_mom2_inv(model, tok, layer, hparams), k_star, v_star, k_target)
            update_rel = float(dW.norm()) / fro
        score = update_norm_score(update_rel, delta_norm, fro, hparams)
    else:
        score = eq10_score(delta_norm, activation_norm, spectral, hparams)
    return LayerCandidate(layer, k_star, v_star, delta, delta_norm, activation_norm, spectral, fro, score, update_rel,
                          dict(info), k_target)


def _search_inputs(model, tok, request, hparams, cache, layers, profile):
    """Validated request, the layers, the prefixes, the statistics (update_norm) and every layer's k*."""
    prepare_request(tok, request)
    layers = list(layers) if layers is not None else candidate_layers(model, hparams)
    if len(set(layers)) != len(layers):
        raise ValueError(f"repeated candidate layer in {layers}")
    device = model_device(model)
    with timed(profile, "prefixes and statistics", device):
        prefixes = cache.get_prefixes(model, tok, hparams)
        if hparams.score == "update_norm":
            cache.get_mom2(model, tok, layers, hparams)  # one pass over the corpus for every missing layer
    with timed(profile, "keys", device):
        keys = compute_keys(model, tok, request, layers, hparams, prefixes)
    return layers, prefixes, keys


def layer_scores(model: nn.Module, tok: PreTrainedTokenizerBase, request: dict, hparams: WilKEHParams,
                 cache: EditCache, layers: list[int] | None = None) -> dict[int, LayerCandidate]:
    """Score every candidate layer with one ROME delta optimisation per layer, changing no weight."""
    layers, prefixes, keys = _search_inputs(model, tok, request, hparams, cache, layers, None)
    out = {}
    for layer in layers:
        _, _, delta, info = compute_v(model, tok, request, layer, keys[layer], hparams, prefixes)
        out[layer] = score_candidate(model, tok, layer, keys[layer], delta, info, hparams, cache)
    return out


def batched_layer_scores(model: nn.Module, tok: PreTrainedTokenizerBase, request: dict, hparams: WilKEHParams,
                         cache: EditCache, layers: list[int] | None = None, *, chunk_size: int | None = None,
                         runner: str | None = None, profile: dict[str, float] | None = None) -> dict[int, LayerCandidate]:
    """`layer_scores` with the deltas of all candidate layers optimised together (changes no weight).

    chunk_size: at most this many layers per batched optimisation (None = all at once), contiguous in
    layer order: bounds memory on large models; the results do not depend on it (beyond rounding).
    runner: `delta.optimize_deltas`' runner (default: `hparams.delta_runner`). profile: a dict that
    accumulates seconds per phase.
    """
    layers, prefixes, keys = _search_inputs(model, tok, request, hparams, cache, layers, profile)
    ordered = sorted(layers)
    size = len(ordered) if not chunk_size else max(1, int(chunk_size))
    deltas = {}
    for start in range(0, len(ordered), size):
        deltas.update(optimize_deltas(model, tok, request, ordered[start:start + size], hparams, prefixes,
                                      runner=runner or hparams.delta_runner, profile=profile))
    return {layer: score_candidate(model, tok, layer, keys[layer], deltas[layer].delta, deltas[layer].info, hparams,
                                   cache, profile)
            for layer in layers}


def choose_layer(candidates: dict[int, LayerCandidate]) -> int:
    """argmin of the scores (the lowest layer on ties)."""
    return min(sorted(candidates), key=lambda l: candidates[l].score)


def wilke_editor(model: nn.Module, tok: PreTrainedTokenizerBase, request: dict, hparams: WilKEHParams, *,
                 journal: WeightJournal, layers: list[int] | None, cache: EditCache,
                 state: EditorState | None = None, profile: dict[str, float] | None = None) -> EditorOutput:
    """The "wilke" editor of the registry: search (unless layers=[l] is given) and apply ROME's update at l*.

    profile: with the batched search, a dict that accumulates seconds per phase (benchmarks)."""
    if layers is not None and len(layers) != 1:
        raise ValueError(f"WilKE edits one layer; layers={layers} (pass [l*] to skip the search)")
    if hparams.search == "batched":
        candidates = batched_layer_scores(model, tok, request, hparams, cache, layers=layers, profile=profile)
    else:
        candidates = layer_scores(model, tok, request, hparams, cache, layers=layers)
    chosen = layers[0] if layers is not None else choose_layer(candidates)
    best = candidates[chosen]
    dW = rank_one_update(ModelAdapter(model).out_weight(chosen), cache.get_mom2_inv(model, tok, chosen, hparams),
                         best.k_star, best.v_star, best.k_target)
    outcome = RomeOutcome(chosen, best.k_star, best.v_star, best.delta, dW, dict(best.info), best.k_target)
    apply_rank_one(model, outcome, journal)
    searched = layers is None
    info: dict[str, Any] = dict(outcome.info)
    info.update(
        searched=searched, score_kind=hparams.score, search=hparams.search, dW_norm=float(dW.norm()),
        delta_norms={l: c.delta_norm for l, c in candidates.items()},
        activation_norms={l: c.activation_norm for l, c in candidates.items()},
        spectral_norms={l: c.spectral_norm for l, c in candidates.items()},
        weight_fro_norms={l: c.weight_fro_norm for l, c in candidates.items()},
        update_rel_norms={l: c.update_rel_norm for l, c in candidates.items()},
        target_probs={l: c.info.get("target_prob") for l, c in candidates.items()},
    )
    scores = {l: c.score for l, c in candidates.items()} if searched else None
    return EditorOutput(layers=[chosen], scores=scores, info=info)
