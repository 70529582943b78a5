"""MEMIT: Mass-Editing Memory in a Transformer (Meng et al. 2022b), for one request or a list.

1. For each request i, the target hidden state z_i at the last layer L of the range (MEMIT Eq. 16):
   the same delta optimisation as ROME (`rome.optimize_delta`), but with delta added to the
   residual stream, i.e. the output of block L, at the subject's last token; z_i = h_i^L + delta_i.
2. Spread the residuals over the layers, in order (MEMIT Alg. 1): for layer l (the i-th of n),
   K = keys at l of every request (averaged over the context prefixes, on the model as already
   updated at the earlier layers), R = (z - h^L) / (n - i) with h^L recomputed on the bare
   prompts, and
       dW^l = R K^T (mom2_update_weight * C^l + K K^T)^-1          (MEMIT Eq. 14)
   applied to W_proj^l before moving to the next layer.

Any failure restores every touched layer bit-identically (through the `WeightJournal`) and raises
EditError.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from wilke_lib.arch import ModelAdapter, frozen, hidden_of, hooks, model_device
from wilke_lib.editors.cache import EditCache
from wilke_lib.editors.common import EditorOutput, EditorState, WeightJournal
from wilke_lib.editors.delta import compute_ks, optimize_delta
from wilke_lib.errors import EditError
from wilke_lib.hparams import MEMITHParams
from wilke_lib.tokens import encode_prompt, fact_token_index, pad_id_of, prepare_request, right_pad


def compute_z(model: nn.Module, tok: PreTrainedTokenizerBase, request: dict, layer: int, hparams: MEMITHParams,
              prefixes: Sequence[str]) -> tuple[torch.Tensor, dict[str, Any]]:
    """Target hidden state z = h^L + delta at the output of block `layer` (MEMIT Eq. 16), float32."""
    result = optimize_delta(model, tok, request, layer, hparams, prefixes, site="block")
    return result.v0 + result.delta, result.info


@torch.no_grad()
def hidden_at_fact_token(model: nn.Module, tok: PreTrainedTokenizerBase, requests: Sequence[dict], layer: int,
                         fact_token: str) -> torch.Tensor:
    """Output of block `layer` at the fact token of each request's bare prompt, (d_model, n) float32."""
    adapter = ModelAdapter(model)
    device = model_device(model)
    seqs, cols = [], []
    for request in requests:
        prepared = prepare_request(tok, request)
        seqs.append(encode_prompt(tok, prepared.prompt))
        cols.append(fact_token_index(tok, prepared.template, prepared.subject, "", fact_token))
    ids, mask = right_pad(seqs, pad_id_of(tok), device)
    rows_t = torch.arange(len(seqs), device=device)
    cols_t = torch.tensor(cols, device=device)
    captured: dict[str, torch.Tensor] = {}

    def hook(_module, _inputs, output):
        captured["h"] = hidden_of(output)[rows_t, cols_t].float()

    with frozen(model), hooks(forward=[(adapter.layer(layer), hook)]):
        model(input_ids=ids, attention_mask=mask, use_cache=False)
    return captured["h"].T


def memit_update(resid: torch.Tensor, keys: torch.Tensor, mom2: torch.Tensor, mom2_update_weight: float,
                 layer: int | None = None) -> torch.Tensor:
    """dW = R K^T (lambda C + K K^T)^-1 (MEMIT Eq. 14); R (d_model, n), K (d_mlp, n), C (d_mlp, d_mlp).

    Computed in C's dtype by solving (lambda C + K K^T) X = K (the system is symmetric), then
    dW = R X^T. EditError if the system is singular or the result not finite.
    """
    where = f" at layer {layer}" if layer is not None else ""
    dtype, device = mom2.dtype, mom2.device
    K = keys.to(device=device, dtype=dtype)
    R = resid.to(device=device, dtype=dtype)
    system = mom2_update_weight * mom2 + K @ K.T
    solution, info = torch.linalg.solve_ex(system, K)
    if int(info.max() if info.dim() else info) != 0 or not torch.isfinite(solution).all():
        raise EditError(f"singular system{where}: mom2_update_weight * C + K K^T cannot be inverted")
    dW = R @ solution.T
    if not torch.isfinite(dW).all():
        raise EditError(f"singular system{where}: update is not finite")
    return dW


LayerUpdate = Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor]
"""(layer, residual R (d_model, n), keys K (d_mlp, n)) -> dW (d_model, d_mlp)."""


def apply_memit(model: nn.Module, tok: PreTrainedTokenizerBase, requests: Sequence[dict], hparams: MEMITHParams, *,
                cache: EditCache | None = None, layers: Sequence[int] | None = None,
                journal: WeightJournal | None = None, layer_update: LayerUpdate | None = None,
                on_targets: Callable[[], None] | None = None) -> dict[str, Any]:
    """Edit all `requests` at once with MEMIT, in place; returns an info dict.

    Without a journal, one is made and used to restore the weights if anything fails. Prefer
    `editing.edit` for a single request (it records the deltas and the time). `layer_update` replaces
    MEMIT's Eq. 14 for each layer (AlphaEdit's projected update); the targets z and the spreading of
    the residual over the layers stay MEMIT's. `on_targets` is called once the targets z are computed,
    before the first layer's keys (COMEBA-HK switches its hook layers there). `journal` is anything with
    `add(layer, dW)` (COMEBA-HK writes into its hook layers instead of the weights).
    """
    if not requests:
        raise ValueError("no requests")
    cache = cache if cache is not None else EditCache.for_model(model)
    layers = list(layers) if layers is not None else list(hparams.layers)
    if not layers or layers != sorted(set(layers)):
        raise ValueError(f"MEMIT needs increasing layers, got {layers}")
    own_journal = journal is None
    journal = journal if journal is not None else WeightJournal(ModelAdapter(model))
    try:
        for request in requests:
            prepare_request(tok, request)
        prefixes = cache.get_prefixes(model, tok, hparams)
        last = layers[-1]
        zs, z_infos = [], []
        for request in requests:
            z, info = compute_z(model, tok, request, last, hparams, prefixes)
            zs.append(z)
            z_infos.append(info)
        Z = torch.stack(zs, dim=1)  # (d_model, n)
        if on_targets is not None:
            on_targets()
        mom2s = cache.get_mom2(model, tok, layers, hparams)
        per_layer = []
        for i, layer in enumerate(layers):
            keys = torch.stack([compute_ks(model, tok, r, [layer], hparams, prefixes)[layer] for r in requests], dim=1)
            current = hidden_at_fact_token(model, tok, requests, last, hparams.fact_token)
            resid = (Z - current) / (len(layers) - i)
            if layer_update is None:
                dW = memit_update(resid, keys, mom2s[layer], hparams.mom2_update_weight, layer)
            else:
                dW = layer_update(layer, resid, keys)
            journal.add(layer, dW)
            per_layer.append({"layer": layer, "resid_norm": float(resid.norm()), "dW_norm": float(dW.norm())})
        final = hidden_at_fact_token(model, tok, requests, last, hparams.fact_token)
    except BaseException:
        if own_journal:
            journal.restore()
        raise
    info: dict[str, Any] = {"per_layer": per_layer, "z_residual_after": float((Z - final).norm() / Z.norm())}
    if len(requests) == 1:
        info.update(z_infos[0])
    else:
        info["z_infos"] = z_infos
    return info


def memit_editor(model: nn.Module, tok: PreTrainedTokenizerBase, request: dict, hparams: MEMITHParams, *,
                 journal: WeightJournal, layers: list[int] | None, cache: EditCache,
                 state: EditorState | None = None) -> EditorOutput:
    """The "memit" editor of the registry: MEMIT on one request."""
    used = list(layers) if layers is not None else list(hparams.layers)
    info = apply_memit(model, tok, [request], hparams, cache=cache, layers=used, journal=journal)
    return EditorOutput(layers=used, info=info)


def memit_batch_editor(model: nn.Module, tok: PreTrainedTokenizerBase, requests: list[dict], hparams: MEMITHParams, *,
                       journal: WeightJournal, layers: list[int] | None, cache: EditCache,
                       state: EditorState | None = None) -> EditorOutput:
    """MEMIT on a batch of requests at once (Eq. 14 over the batch's keys)."""
    used = list(layers) if layers is not None else list(hparams.layers)
    info = apply_memit(model, tok, requests, hparams, cache=cache, layers=used, journal=journal)
    return EditorOutput(layers=used, info=info)
