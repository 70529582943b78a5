"""ROME: Rank-One Model Editing (Meng et al. 2022a, "Locating and Editing Factual Associations in GPT").

One edit rewrites W_proj of one MLP layer l with a rank-one update that makes a key map to a new
value (ROME Eq. 2, with C = E[k k^T] of the original model, `editors.cache.EditCache`):

    dW = (v* - W k_t) (C^-1 k*)^T / ((C^-1 k*)^T k_t),   so that (W + dW) k_t = v* exactly,

where k* is the key at the subject's last token averaged over the context-prefixed prompts (ROME
Eq. 3, `delta.compute_keys`), delta minimises ROME Eq. 4 (`delta.optimize_delta`) at the output of
`mlp_out(l)`, and `ROMEHParams.update_form` says which key k_t is mapped and to what:

* "released" (default): ROME's released code (kmeng01/rome, compute_v: the current input and output
  read at the bare rewrite prompt): k_t = k_bare, the key of the bare prompt, v* = W k_bare + delta.
  It is what the paper's ROME baseline and WilKE's Eq. 11 (the key of the edited prompt) compute.
* "r-rome": Gupta et al. 2024, "Rebuilding ROME": the same key in the numerator and the denominator,
  k_t = k*, with the bare prompt's target v* = W k_bare + delta (as their code, which averages the
  current input and output over the prefixes); the asymmetry of "released" is what they blame for
  ROME's disabling edits.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from wilke_lib.arch import ModelAdapter
from wilke_lib.editors.cache import EditCache
from wilke_lib.editors.common import EditorOutput, EditorState, WeightJournal, single_layer
from wilke_lib.editors.delta import LayerKeys, compute_keys, optimize_delta
from wilke_lib.errors import EditError
from wilke_lib.hparams import UPDATE_FORMS, ROMEHParams
from wilke_lib.tokens import prepare_request


def rome_target(W: torch.Tensor, keys: LayerKeys, delta: torch.Tensor, form: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(v*, k_t) of an update form (module docstring): the value v* and the key k_t mapped to it."""
    if form not in UPDATE_FORMS:
        raise ValueError(f"update_form must be one of {UPDATE_FORMS}, got {form!r}")
    W = W.float()
    v_star = W @ keys.bare.to(W.device, torch.float32) + delta.to(W.device)
    return v_star, keys.bare if form == "released" else keys.star


def compute_v(model: nn.Module, tok: PreTrainedTokenizerBase, request: dict, layer: int, keys: LayerKeys,
              hparams: Any, prefixes: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict[str, Any]]:
    """(v*, k_t, delta, info) at layer `layer`: delta optimised at the output of `mlp_out(layer)`
    (ROME Eq. 4 / WilKE Eq. 9) and the target of `hparams.update_form` (`rome_target`)."""
    adapter = ModelAdapter(model)
    result = optimize_delta(model, tok, request, layer, hparams, prefixes)
    v_star, k_target = rome_target(adapter.out_weight(layer), keys, result.delta, hparams.update_form)
    return v_star, k_target, result.delta, result.info


def rank_one_update(W: torch.Tensor, C_inv: torch.Tensor, k_star: torch.Tensor, v_star: torch.Tensor,
                    k_target: torch.Tensor | None = None) -> torch.Tensor:
    """dW = (v* - W k_t)(C^-1 k*)^T / ((C^-1 k*)^T k_t)   (ROME Eq. 2), in C_inv's dtype; k_t = k* when
    not given. W is (d_model, d_mlp); then (W + dW) k_t = v*. EditError if (C^-1 k*)^T k_t is not a
    positive finite number (singular system, or a key the update cannot reach).
    """
    dtype, device = C_inv.dtype, C_inv.device
    W = W.to(device=device, dtype=dtype)
    k = k_star.to(device=device, dtype=dtype)
    k_t = k if k_target is None else k_target.to(device=device, dtype=dtype)
    v = v_star.to(device=device, dtype=dtype)
    u = C_inv @ k
    denom = u @ k_t
    if not torch.isfinite(denom) or denom <= 0:
        raise EditError(f"singular system: (C^-1 k*)^T k_t = {denom.item():.3g}")
    dW = torch.outer(v - W @ k_t, u) / denom
    if not torch.isfinite(dW).all():
        raise EditError("singular system: rank-one update is not finite")
    return dW


@dataclass
class RomeOutcome:
    """Everything computed for one ROME edit at one layer (k_target: the key mapped to v*)."""

    layer: int
    k_star: torch.Tensor
    v_star: torch.Tensor
    delta: torch.Tensor
    dW: torch.Tensor
    info: dict[str, Any]
    k_target: torch.Tensor | None = None


def compute_rome_update(model: nn.Module, tok: PreTrainedTokenizerBase, request: dict, layer: int,
                        hparams: Any, cache: EditCache) -> RomeOutcome:
    """k*, v*, delta and dW of ROME at `layer`, without changing any weight."""
    prepare_request(tok, request)
    prefixes = cache.get_prefixes(model, tok, hparams)
    keys = compute_keys(model, tok, request, [layer], hparams, prefixes)[layer]
    v_star, k_target, delta, info = compute_v(model, tok, request, layer, keys, hparams, prefixes)
    c_inv = cache.get_mom2_inv(model, tok, layer, hparams)
    dW = rank_one_update(ModelAdapter(model).out_weight(layer), c_inv, keys.star, v_star, k_target)
    return RomeOutcome(layer, keys.star, v_star, delta, dW, info, k_target)


def apply_rank_one(model: nn.Module, outcome: RomeOutcome, journal: WeightJournal) -> None:
    """Add outcome.dW to W_proj and record how well (W + dW) k_t = v* holds in outcome.info."""
    adapter = ModelAdapter(model)
    journal.add(outcome.layer, outcome.dW)
    key = outcome.k_star if outcome.k_target is None else outcome.k_target
    with torch.no_grad():
        new_w = adapter.out_weight(outcome.layer).double()
        v = outcome.v_star.double().to(new_w.device)
        residual = (new_w @ key.double().to(new_w.device) - v).norm() / v.norm()
    outcome.info["rank_one_residual"] = float(residual)


def rome_editor(model: nn.Module, tok: PreTrainedTokenizerBase, request: dict, hparams: ROMEHParams, *,
                journal: WeightJournal, layers: list[int] | None, cache: EditCache,
                state: EditorState | None = None) -> EditorOutput:
    """The "rome" editor of the registry: ROME's update at `layers=[l]` or at hparams.layer."""
    layer = single_layer(layers, hparams.layer, "ROME")
    outcome = compute_rome_update(model, tok, request, layer, hparams, cache)
    apply_rank_one(model, outcome, journal)
    info = dict(outcome.info)
    info.update(k_star_norm=float(outcome.k_star.norm()), v_star_norm=float(outcome.v_star.norm()),
                dW_norm=float(outcome.dW.norm()))
    return EditorOutput(layers=[layer], info=info)
