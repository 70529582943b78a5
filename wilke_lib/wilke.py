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

`layer_scores` loops over the layers one at a time (one delta optimisation each); a batched
variant can replace it as long as it returns the same `LayerCandidate`s.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from wilke_lib.arch import ModelAdapter
from wilke_lib.editing import EditCache, EditorOutput, WeightJournal
from wilke_lib.hparams import WilKEHParams
from wilke_lib.rome import (RomeOutcome, apply_rank_one, compute_ks, compute_v, prepare_request, rank_one_update)


@dataclass
class LayerCandidate:
    """The quantities of Eq. 10 at one layer, and ROME's solution there (k*, v*, delta)."""

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


def eq10_score(delta_norm: float, activation_norm: float, spectral_norm: float, hparams: WilKEHParams) -> float:
    """Eq. 10 as a ratio of norms, with the factors switched off by the ablation replaced by 1."""
    numerator = delta_norm if hparams.use_delta else 1.0
    denominator = ((spectral_norm if hparams.use_weight_norm else 1.0)
                   * (activation_norm if hparams.use_activation else 1.0))
    return numerator / denominator if denominator > 0 else float("inf")


def update_norm_score(update_rel: float, delta_norm: float, fro_norm: float, hparams: WilKEHParams) -> float:
    """The released code's criterion ||dW^l||_F / ||W_proj^l||_F with the ablated factors replaced by 1.

    ROME's update is rank one, dW = delta (C^-1 k)^T / (k^T C^-1 k), so ||dW||_F = ||delta|| * g with
    the key term g = ||C^-1 k|| / (k^T C^-1 k); g is recovered here as update_rel * ||W||_F / ||delta||.
    """
    if hparams.use_delta and hparams.use_activation and hparams.use_weight_norm:
        return update_rel
    key_gain = update_rel * fro_norm / delta_norm if delta_norm > 0 else float("inf")
    return ((delta_norm if hparams.use_delta else 1.0) * (key_gain if hparams.use_activation else 1.0)
            / (fro_norm if hparams.use_weight_norm else 1.0))


def candidate_layers(model: nn.Module, hparams: WilKEHParams) -> list[int]:
    """hparams.candidate_layers, or every layer; checked against the model's depth."""
    n_layers = ModelAdapter(model).n_layers
    layers = hparams.candidate_layers if hparams.candidate_layers is not None else list(range(n_layers))
    bad = [l for l in layers if not 0 <= l < n_layers]
    if bad:
        raise ValueError(f"candidate layers {bad} out of range for a {n_layers}-layer model")
    return list(layers)


def layer_scores(model: nn.Module, tok: PreTrainedTokenizerBase, request: dict, hparams: WilKEHParams,
                 cache: EditCache, layers: list[int] | None = None) -> dict[int, LayerCandidate]:
    """Score every candidate layer (one ROME delta optimisation per layer), changing no weight."""
    prepare_request(tok, request)
    adapter = ModelAdapter(model)
    layers = layers if layers is not None else candidate_layers(model, hparams)
    prefixes = cache.get_prefixes(model, tok, hparams)
    if hparams.score == "update_norm":
        cache.get_mom2(model, tok, layers, hparams)  # one pass over the corpus for every missing layer
    keys = compute_ks(model, tok, request, layers, hparams, prefixes)
    out: dict[int, LayerCandidate] = {}
    for layer in layers:
        k_star = keys[layer]
        v_star, delta, info = compute_v(model, tok, request, layer, k_star, hparams, prefixes)
        weight = adapter.out_weight(layer).float()
        spectral = float(torch.linalg.matrix_norm(weight, ord=2))
        fro = float(torch.linalg.matrix_norm(weight, ord="fro"))
        delta_norm, activation_norm = float(delta.norm()), float(k_star.norm())
        update_rel = None
        if hparams.score == "update_norm":
            dW = rank_one_update(weight, cache.get_mom2_inv(model, tok, layer, hparams), k_star, v_star)
            update_rel = float(dW.norm()) / fro
            score = update_norm_score(update_rel, delta_norm, fro, hparams)
        else:
            score = eq10_score(delta_norm, activation_norm, spectral, hparams)
        out[layer] = LayerCandidate(layer, k_star, v_star, delta, delta_norm, activation_norm, spectral, fro,
                                    score, update_rel, info)
    return out


def choose_layer(candidates: dict[int, LayerCandidate]) -> int:
    """argmin of the scores (the lowest layer on ties)."""
    return min(sorted(candidates), key=lambda l: candidates[l].score)


def wilke_editor(model: nn.Module, tok: PreTrainedTokenizerBase, request: dict, hparams: WilKEHParams, *,
                 journal: WeightJournal, layers: list[int] | None, cache: EditCache,
                 profile: dict[str, float] | None = None) -> EditorOutput:
    """`editing.EDITORS["wilke"]`: search (unless layers=[l] is given) and apply ROME's update at l*.

    profile: with the batched search, a dict that accumulates seconds per phase (benchmarks)."""
    if layers is not None and len(layers) != 1:
        raise ValueError(f"WilKE edits one layer; layers={layers} (pass [l*] to skip the search)")
    if hparams.search == "batched":
        from functools import partial

        from wilke_lib.batched_search import batched_layer_scores
        search = partial(batched_layer_scores, profile=profile)
    else:
        search = layer_scores
    candidates = search(model, tok, request, hparams, cache, layers=layers)
    chosen = layers[0] if layers is not None else choose_layer(candidates)
    best = candidates[chosen]
    dW = rank_one_update(ModelAdapter(model).out_weight(chosen), cache.get_mom2_inv(model, tok, chosen, hparams),
                         best.k_star, best.v_star)
    outcome = RomeOutcome(chosen, best.k_star, best.v_star, best.delta, dW, dict(best.info))
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
