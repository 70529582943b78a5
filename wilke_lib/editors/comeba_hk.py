"""COMEBA-HK: consecutive batch editing into hook layers (Li et al. 2024, arXiv 2403.05330, Sec. 3;
later named CoachHooK).

The base weights never change; every edit goes into the hook layers (`editors.hook_layers`) of MEMIT's
layers. For a batch of requests (one request in the lifelong protocol of Hu et al.):

1. Targets z at the last layer of the range, as MEMIT (Eq. 16 of Meng et al. 2022b), on the model
   with its validated hook layers (the edits so far, applied where their z-score test routes them).
2. With the hooks temporary (every token through W_h), for layer l, the i-th of n: the keys K of the
   batch, the residual R = (z - h^L) / (n - i) against the hooked model, and
       dW_h^l = R K^T C_accu^-1,   C_accu = lambda C_0 + sum over earlier batches K_j K_j^T + K K^T
   (their Eq. 4-8: the update of a memory that already holds the earlier edits, so earlier edits
   are preserved in the least-squares sense without storing them); W_h^l += dW_h^l and K K^T joins
   the accumulated sum.
3. alpha^l <- min(alpha^l, min over the batch's prompts of the largest z-score of the prompt's
   tokens at l), measured on the base model (their `apply_CoachHooK_to_model`); alpha starts at
   `alpha_init` (2.2 in the paper). Each edit's own prompt therefore passes the validated hook.

Everything the editor adds (dW_h, sum K K^T, alpha per layer) is in the `EditorState`; a failed edit
leaves it, and the base weights, bit-identical. The paper's settings on GPT2-XL: MEMIT's layers 13-17,
lambda (`mom2_update_weight`) 15000, batches of 30.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from wilke_lib.arch import ModelAdapter, model_device
from wilke_lib.editors.cache import EditCache
from wilke_lib.editors.common import EditorOutput, EditorState, WeightJournal
from wilke_lib.editors.hook_layers import HookLayers, alpha_key, delta_key, keys_key
from wilke_lib.editors.memit import apply_memit, memit_update
from wilke_lib.errors import EditError
from wilke_lib.hparams import COMEBAHKHParams
from wilke_lib.tokens import encode_prompt, pad_id_of, prepare_request, right_pad


class HookJournal:
    """What `apply_memit` writes through: dW goes into the hook layer's weights (the state), not W_proj."""

    def __init__(self, state: EditorState, d_model: int, d_mlp: int) -> None:
        self.state, self.shape = state, (d_model, d_mlp)

    def add(self, layer: int, delta: torch.Tensor) -> None:
        if not torch.isfinite(delta).all():
            raise EditError(f"non-finite hook-layer update at layer {layer}")
        current = self.state.tensors.get(delta_key(layer), torch.zeros(self.shape))
        self.state.tensors[delta_key(layer)] = current + delta.float().cpu()


@torch.no_grad()
def largest_z_scores(model: nn.Module, tok: PreTrainedTokenizerBase, hooks: HookLayers, requests: list[dict]
                     ) -> dict[int, torch.Tensor]:
    """Per hooked layer, the largest z-score of each request's rewrite prompt, on the base model."""
    seqs = [encode_prompt(tok, prepare_request(tok, r).prompt) for r in requests]
    ids, mask = right_pad(seqs, pad_id_of(tok), model_device(model))
    with hooks.using("record"):
        model(input_ids=ids, attention_mask=mask, use_cache=False)
        return {layer: torch.cat(found) for layer, found in hooks.recorded.items()}


def edit_batch(model: nn.Module, tok: PreTrainedTokenizerBase, requests: list[dict], hparams: COMEBAHKHParams, *,
               cache: EditCache, state: EditorState | None, layers: list[int] | None = None) -> dict[str, Any]:
    """Steps 1-3 for a batch of requests, in place (hook layers only); EditError leaves everything as it was."""
    used = list(layers) if layers is not None else list(hparams.layers)
    hooks = HookLayers.attach(model, state, used)
    state = hooks.state
    before = dict(state.tensors)  # tensors are replaced, never changed in place: a shallow copy restores
    adapter = ModelAdapter(model)
    d_mlp = adapter.d_mlp
    for layer in used:
        state.tensors.setdefault(alpha_key(layer), torch.tensor(float(hparams.alpha_init), dtype=torch.float64))
    mom2s = cache.get_mom2(model, tok, used, hparams)
    new_keys: dict[int, torch.Tensor] = {}

    def layer_update(layer: int, resid: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        earlier = state.tensors.get(keys_key(layer), torch.zeros(d_mlp, d_mlp)).to(mom2s[layer])
        new_keys[layer] = keys
        return memit_update(resid, keys, hparams.mom2_update_weight * mom2s[layer] + earlier, 1.0, layer)

    def through_every_token() -> None:  # once the targets are computed: keys and residuals through W_h
        hooks.mode = "temporary"

    try:
        info = apply_memit(model, tok, requests, hparams, cache=cache, layers=used, layer_update=layer_update,
                           journal=HookJournal(state, adapter.d_model, d_mlp), on_targets=through_every_token)
    except BaseException:
        state.tensors = before
        raise
    finally:
        hooks.mode = "validated"
    for layer, keys in new_keys.items():
        k = keys.float().cpu()
        state.tensors[keys_key(layer)] = state.tensors.get(keys_key(layer), torch.zeros(d_mlp, d_mlp)) + k @ k.T
    measured = largest_z_scores(model, tok, hooks, requests)
    for layer in used:
        lowest = float(measured[layer].min()) if layer in measured else float("inf")
        state.tensors[alpha_key(layer)] = torch.tensor(min(float(state.tensors[alpha_key(layer)]), lowest),
                                                     dtype=torch.float64)
    info["alpha"] = {l: float(state.tensors[alpha_key(l)]) for l in used}
    return info


def comeba_hk_editor(model: nn.Module, tok: PreTrainedTokenizerBase, request: dict, hparams: COMEBAHKHParams, *,
                     journal: WeightJournal, layers: list[int] | None, cache: EditCache,
                     state: EditorState | None = None) -> EditorOutput:
    """The "comeba_hk" editor of the registry: one request into the hook layers (the journal, i.e. the
    base weights, is never touched)."""
    used = list(layers) if layers is not None else list(hparams.layers)
    info = edit_batch(model, tok, [request], hparams, cache=cache, state=state, layers=used)
    return EditorOutput(layers=used, info=info)


def comeba_hk_batch_editor(model: nn.Module, tok: PreTrainedTokenizerBase, requests: list[dict],
                           hparams: COMEBAHKHParams, *, journal: WeightJournal, layers: list[int] | None,
                           cache: EditCache, state: EditorState | None = None) -> EditorOutput:
    """COMEBA-HK on a batch of requests at once (the setting the method is made for)."""
    used = list(layers) if layers is not None else list(hparams.layers)
    info = edit_batch(model, tok, list(requests), hparams, cache=cache, state=state, layers=used)
    return EditorOutput(layers=used, info=info)
