"""FT-L: constrained fine-tuning (Zhu et al. 2020, "Modifying Memories in Transformer Models"),
in the form ROME (Meng et al. 2022a, Section 3) uses as a baseline.

Adam on the weight of `mlp_out(layer)` only, minimising the NLL of target_new after the bare
prompt; after each step the change is projected back into the L-inf ball
|W - W_0| <= norm_constraint (element-wise), Zhu et al.'s constraint.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from wilke_lib.arch import ModelAdapter, frozen, model_device
from wilke_lib.editors.cache import EditCache
from wilke_lib.editors.common import EditorOutput, EditorState, WeightJournal, single_layer
from wilke_lib.errors import EditError
from wilke_lib.hparams import FTHParams
from wilke_lib.tokens import encode_prompt, prepare_request


def ft_editor(model: nn.Module, tok: PreTrainedTokenizerBase, request: dict, hparams: FTHParams, *,
              journal: WeightJournal, layers: list[int] | None, cache: EditCache | None = None,
              state: EditorState | None = None) -> EditorOutput:
    """The "ft" editor of the registry: fine-tune W_proj of one layer in place (journal snapshots it first)."""
    layer = single_layer(layers, hparams.layer, "FT-L")
    prepared = prepare_request(tok, request)
    adapter = ModelAdapter(model)
    device = model_device(model)
    prompt_ids = encode_prompt(tok, prepared.prompt)
    target = prepared.target_new_ids
    ids = torch.tensor([prompt_ids + target[:-1]], device=device)
    positions = torch.arange(len(prompt_ids) - 1, len(prompt_ids) - 1 + len(target), device=device)
    target_t = torch.tensor(target, device=device)

    weight = adapter.mlp_out(layer).weight
    journal.snapshot(layer)
    original = weight.detach().clone()
    history: list[float] = []
    with frozen(model):
        weight.requires_grad_(True)
        try:
            optimizer = torch.optim.Adam([weight], lr=hparams.lr)
            for step in range(hparams.steps):
                optimizer.zero_grad()
                logits = model(input_ids=ids, use_cache=False).logits[0, positions].float()
                loss = torch.nn.functional.cross_entropy(logits, target_t)
                if not torch.isfinite(loss):
                    raise EditError(f"NaN/inf loss at step {step} of FT-L")
                history.append(loss.item())
                if loss.item() < hparams.early_stop_loss:
                    break
                loss.backward()
                try:
                    optimizer.step()
                except RuntimeError as exc:  # e.g. an lr that overflows float32 inside Adam's update
                    raise EditError(f"FT-L's Adam step {step} failed with lr={hparams.lr:g}: {exc}") from exc
                with torch.no_grad():
                    change = (weight - original).clamp_(-hparams.norm_constraint, hparams.norm_constraint)
                    weight.copy_(original + change)
        finally:
            weight.requires_grad_(False)
    if not torch.isfinite(weight).all():
        raise EditError("FT-L produced non-finite weights")
    info: dict[str, Any] = {"loss_history": history, "nll_init": history[0], "nll": history[-1],
                            "steps": len(history)}
    return EditorOutput(layers=[layer], info=info)
