"""KN: Knowledge Neurons (Dai et al. 2021, "Knowledge Neurons in Pretrained Transformers").

Attribution (Dai et al. Eq. 3-4, integrated gradients with a Riemann sum of m steps): for the
intermediate MLP neurons w_i^l at the last prompt token (the input of `mlp_out(l)`),
    Attr(w_i^l) = w_i^l / m * sum_{k=1..m} dP(y* | alpha_k w^l) / dw_i^l,   alpha_k = k / m,
with P the probability of the first token of target_true and the activation of layer l scaled
by alpha_k. Neurons with Attr >= threshold * max Attr (and > 0) are kept, at most max_neurons.

Edit (Dai et al. Section 5, "updating facts"): for each kept neuron i of layer l, its value
vector (column i of W_proj^l) becomes v_i - lambda E[target_true] + lambda E[target_new], with E
the unembedding rows of the first tokens of the targets.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from wilke_lib.arch import ModelAdapter, frozen, hooks, model_device
from wilke_lib.editors.cache import EditCache
from wilke_lib.editors.common import EditorOutput, EditorState, WeightJournal
from wilke_lib.errors import EditError
from wilke_lib.hparams import KNHParams
from wilke_lib.tokens import encode_prompt, prepare_request


def neuron_attributions(model: nn.Module, tok: PreTrainedTokenizerBase, prompt: str, target_id: int,
                        layers: list[int], steps: int) -> dict[int, torch.Tensor]:
    """Integrated-gradients attribution (d_mlp,) of every intermediate neuron of each layer at the
    last token of `prompt`, for the probability of `target_id` there."""
    adapter = ModelAdapter(model)
    device = model_device(model)
    ids = torch.tensor([encode_prompt(tok, prompt)], device=device)
    last = ids.shape[1] - 1
    activations: dict[int, torch.Tensor] = {}

    def capture(l: int):
        def hook(_module, inputs):
            activations[l] = inputs[0][0, last].detach().clone()
        return hook

    out: dict[int, torch.Tensor] = {}
    with frozen(model):
        with torch.no_grad(), hooks(pre=[(adapter.mlp_out(l), capture(l)) for l in layers]):
            model(input_ids=ids, use_cache=False)
        alphas = torch.arange(1, steps + 1, device=device, dtype=torch.float32) / steps
        batch = ids.expand(steps, -1)
        for l in layers:
            base = activations[l]
            scaled = (alphas.unsqueeze(1) * base.float().unsqueeze(0)).requires_grad_(True)

            def replace(_module, inputs, scaled=scaled):
                hidden = inputs[0]
                rows = torch.arange(hidden.shape[0], device=hidden.device)
                cols = torch.full_like(rows, last)
                return (hidden.index_put((rows, cols), scaled.to(hidden.dtype)),) + tuple(inputs[1:])

            with hooks(pre=[(adapter.mlp_out(l), replace)]):
                logits = model(input_ids=batch, use_cache=False).logits[:, last].float()
            prob = torch.softmax(logits, dim=-1)[:, target_id]
            (grads,) = torch.autograd.grad(prob.sum(), scaled)
            out[l] = (base.float() * grads.mean(dim=0)).detach()
    return out


def kn_editor(model: nn.Module, tok: PreTrainedTokenizerBase, request: dict, hparams: KNHParams, *,
              journal: WeightJournal, layers: list[int] | None, cache: EditCache | None = None,
              state: EditorState | None = None) -> EditorOutput:
    """The "kn" editor of the registry: find knowledge neurons of target_true and rewrite their value vectors."""
    prepared = prepare_request(tok, request)
    if prepared.target_true_ids is None:
        raise EditError("KN needs target_true (its neurons are attributed to the true object)")
    adapter = ModelAdapter(model)
    search = layers if layers is not None else (hparams.layers if hparams.layers is not None
                                                else list(range(adapter.n_layers)))
    true_id, new_id = prepared.target_true_ids[0], prepared.target_new_ids[0]
    attributions = neuron_attributions(model, tok, prepared.prompt, true_id, list(search), hparams.ig_steps)
    flat = torch.cat([attributions[l].cpu() for l in search])
    if not torch.isfinite(flat).all():
        raise EditError("NaN in the knowledge-neuron attributions")
    top = float(flat.max())
    if top <= 0:
        raise EditError("no neuron has a positive attribution to target_true")
    chosen = [(float(attributions[l][i]), l, int(i)) for l in search
              for i in torch.nonzero(attributions[l] >= hparams.threshold * top).flatten().tolist()]
    chosen = sorted(chosen, reverse=True)[:hparams.max_neurons]
    unembed = adapter.unembed.weight.detach()
    direction = hparams.edit_lambda * (unembed[new_id].float() - unembed[true_id].float())
    by_layer: dict[int, list[int]] = {}
    for _, l, i in chosen:
        by_layer.setdefault(l, []).append(i)
    for l, neurons in sorted(by_layer.items()):
        dW = torch.zeros(adapter.d_model, adapter.d_mlp, dtype=torch.float32, device=direction.device)
        dW[:, neurons] = direction.unsqueeze(1)
        journal.add(l, dW)
    info: dict[str, Any] = {"neurons": [(l, i, a) for a, l, i in chosen], "max_attribution": top}
    return EditorOutput(layers=sorted(by_layer), info=info)
