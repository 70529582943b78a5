"""AlphaEdit: null-space constrained knowledge editing (Fang et al. 2025, ICLR; "AlphaEdit: Null-Space
Constrained Knowledge Editing for Language Models").

AlphaEdit is MEMIT (targets z at the last layer of the range, the residual spread over the layers)
with each layer's update projected so that it cannot move the values of the preserved keys K_0:
P = U U^T over the eigenvectors of C = K_0 K_0^T / n whose eigenvalue is below a threshold, and, with
K the keys of this edit, R its residual and C_p the accumulated K K^T of the earlier edits,

    dW = R K^T P (P (K K^T + C_p) + l2 I)^-T        (the authors' closed form, as their code solves it)

so that dW k_0 = 0 for every k_0 with P k_0 = 0: the preserved knowledge is untouched exactly (up to
the threshold). After the update, the edit's keys join C_p (`EditorState`, saved and restored with
the weights by the lifelong runner).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from wilke_lib.arch import ModelAdapter
from wilke_lib.editors.cache import EditCache
from wilke_lib.editors.common import EditorOutput, EditorState, WeightJournal
from wilke_lib.editors.delta import compute_ks
from wilke_lib.editors.memit import apply_memit
from wilke_lib.errors import EditError
from wilke_lib.hparams import AlphaEditHParams


def projected_update(resid: torch.Tensor, keys: torch.Tensor, projector: torch.Tensor, earlier: torch.Tensor,
                     l2: float, layer: int | None = None) -> torch.Tensor:
    """dW = R K^T P (P (K K^T + C_p) + l2 I)^-T; R (d_model, n), K (d_mlp, n), P and C_p (d_mlp, d_mlp)."""
    K = keys.to(device=projector.device, dtype=torch.float32)
    R = resid.to(device=projector.device, dtype=torch.float32)
    eye = torch.eye(K.shape[0], dtype=K.dtype, device=K.device)
    system = projector @ (K @ K.T + earlier.to(K)) + l2 * eye
    solution, info = torch.linalg.solve_ex(system, projector @ K @ R.T)  # (d_mlp, d_model)
    if int(info) != 0 or not torch.isfinite(solution).all():
        where = f" at layer {layer}" if layer is not None else ""
        raise EditError(f"singular system{where}: AlphaEdit's projected system cannot be solved")
    return solution.T


def alphaedit_batch_editor(model: nn.Module, tok: PreTrainedTokenizerBase, requests: list[dict],
                           hparams: AlphaEditHParams, *, journal: WeightJournal, layers: list[int] | None,
                           cache: EditCache, state: EditorState | None = None) -> EditorOutput:
    """AlphaEdit on a batch of requests at once (one system per layer over the batch's keys); the keys of
    earlier edits from `state`, the batch's keys added to them afterwards."""
    used = list(layers) if layers is not None else list(hparams.layers)
    state = state if state is not None else EditorState()
    d_mlp = ModelAdapter(model).d_mlp

    def earlier(layer: int) -> torch.Tensor:
        return state.tensors.get(f"alphaedit/layer{layer}", torch.zeros(d_mlp, d_mlp))

    def layer_update(layer: int, resid: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        projector = cache.get_projector(model, tok, layer, hparams)
        if float(projector.trace()) < 0.5:
            raise EditError(f"no null space at layer {layer}: every eigenvalue of C is above nullspace_threshold "
                            f"{hparams.nullspace_threshold:g}, so AlphaEdit can change nothing there")
        return projected_update(resid, keys, projector, earlier(layer), hparams.l2, layer)

    info: dict[str, Any] = apply_memit(model, tok, requests, hparams, cache=cache, layers=used, journal=journal,
                                       layer_update=layer_update)
    prefixes = cache.get_prefixes(model, tok, hparams)
    for layer in used:  # the keys of this batch, after the update, join those of the earlier edits
        keys = torch.stack([compute_ks(model, tok, r, [layer], hparams, prefixes)[layer].float().cpu()
                            for r in requests], dim=1)
        state.tensors[f"alphaedit/layer{layer}"] = earlier(layer) + keys @ keys.T
    info["null_space_dims"] = {l: int(round(float(cache.get_projector(model, tok, l, hparams).trace())))
                               for l in used}
    return EditorOutput(layers=used, info=info)


def alphaedit_editor(model: nn.Module, tok: PreTrainedTokenizerBase, request: dict, hparams: AlphaEditHParams, *,
                     journal: WeightJournal, layers: list[int] | None, cache: EditCache,
                     state: EditorState | None = None) -> EditorOutput:
    """The "alphaedit" editor of the registry: one request, the keys of earlier edits from `state`."""
    return alphaedit_batch_editor(model, tok, [request], hparams, journal=journal, layers=layers, cache=cache,
                                  state=state)
