"""Hook layers: edits kept beside the base weights (Li et al. 2024, "Consecutive Model Editing with Batch
alongside HooK Layers", COMEBA-HK, later CoachHooK; Sec. 3 of arXiv 2403.05330).

A hook layer of layer l is a copy W_h = W_0 + dW_h of its MLP output projection; W_0 never changes.
Its output replaces the original one token by token, where the edit applies:

* "validated" (the edited model): for the real tokens t of one sequence, with k_t the input of the
  projection, the z-score over the sequence
      z_t = (||dW_h k_t|| - mean_t ||dW_h k_t||) / std_t ||dW_h k_t||     (std with ddof 1, as their code)
  picks the tokens whose output moves unusually far; tokens with z_t >= alpha take W_h k_t, the others
  keep W_0 k_t bit for bit. A sequence of one real token has no z-score and keeps W_0 k_t.
* "temporary": every token takes W_h k_t (while an update is computed, as their code does);
* "record": nothing replaced; the largest z-score of each sequence is recorded (to lower alpha);
* "off": the base model.

W_h k_t is computed as W_0 k_t + dW_h k_t (the original output plus the hook's difference). dW_h and
alpha live in the editor's `EditorState` ("comeba_hk/layer<l>/delta", ".../alpha"), which the lifelong
runner saves, restores on resume and rolls back with a failed edit; the hooks read them at every forward
pass. The hooks stay on the model between edits, as the edited weights of the other editors do:
`HookLayers.attach` installs them once per model, `detach` removes them.

Padding: the z-score is taken over the tokens the root forward call's `attention_mask` marks as real
(captured by a pre-hook on the model), so the answer to a prompt does not depend on the batch it is
padded into; without a mask every position counts.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from wilke_lib.arch import ModelAdapter
from wilke_lib.editors.common import EditorState

PREFIX = "comeba_hk"
MODES = ("validated", "temporary", "record", "off")
_ATTRIBUTE = "_wilke_hook_layers"


def delta_key(layer: int) -> str:
    return f"{PREFIX}/layer{layer}/delta"


def alpha_key(layer: int) -> str:
    return f"{PREFIX}/layer{layer}/alpha"


def keys_key(layer: int) -> str:
    """The accumulated K K^T of every edit so far at `layer` (the sum in C_accu)."""
    return f"{PREFIX}/layer{layer}/kkt"


def z_scores(norms: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """z-score of `norms` (batch, tokens) over each row's real tokens (`real`, bool); NaN elsewhere and
    in rows with fewer than two real tokens (no spread)."""
    counts = real.sum(dim=1, keepdim=True).to(norms.dtype)
    masked = torch.where(real, norms, torch.zeros_like(norms))
    mean = masked.sum(dim=1, keepdim=True) / counts
    var = (torch.where(real, norms - mean, torch.zeros_like(norms)) ** 2).sum(dim=1, keepdim=True) / (counts - 1)
    z = (norms - mean) / var.sqrt()
    return torch.where(real, z, torch.full_like(z, float("nan")))


class HookLayers:
    """The hook layers of one model, reading their weights from an `EditorState`."""

    def __init__(self, state: EditorState) -> None:
        self.state = state
        self.mode = "validated"
        self.recorded: dict[int, list[torch.Tensor]] = {}
        self._handles: dict[Any, Any] = {}
        self._mask: torch.Tensor | None = None
        self._on_device: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    # ---- installing ---------------------------------------------------------------------------
    @classmethod
    def attach(cls, model: nn.Module, state: EditorState | None, layers: Sequence[int]) -> "HookLayers":
        """The model's hook layers (installed on first use), reading `state` from now on (the model's
        own state when None: edits made without a runner's state stay with the model, like weights)."""
        hooks = getattr(model, _ATTRIBUTE, None)
        if hooks is None:
            hooks = cls(state if state is not None else EditorState())
            setattr(model, _ATTRIBUTE, hooks)
            hooks._handles["mask"] = model.register_forward_pre_hook(hooks._capture_mask, with_kwargs=True)
            hooks._handles["unmask"] = model.register_forward_hook(hooks._release_mask)
        elif state is not None:
            hooks.state = state
        adapter = ModelAdapter(model)
        for layer in layers:
            if layer not in hooks._handles:
                hook = functools.partial(hooks._forward, layer)
                hooks._handles[layer] = adapter.mlp_out(layer).register_forward_hook(hook)
        return hooks

    @staticmethod
    def of(model: nn.Module) -> "HookLayers | None":
        return getattr(model, _ATTRIBUTE, None)

    @staticmethod
    def detach(model: nn.Module) -> None:
        """Remove the hook layers from the model (its outputs are the base model's again)."""
        hooks = getattr(model, _ATTRIBUTE, None)
        if hooks is not None:
            for handle in hooks._handles.values():
                handle.remove()
            delattr(model, _ATTRIBUTE)

    @contextmanager
    def using(self, mode: str) -> Iterator["HookLayers"]:
        """Run the block in `mode` (one of MODES), then go back to the previous mode."""
        if mode not in MODES:
            raise ValueError(f"hook layer mode must be one of {MODES}, got {mode!r}")
        previous, self.mode = self.mode, mode
        if mode == "record":
            self.recorded = {}
        try:
            yield self
        finally:
            self.mode = previous

    # ---- the forward pass -----------------------------------------------------------------------
    def _capture_mask(self, _module: nn.Module, args: tuple, kwargs: dict) -> None:
        mask = kwargs.get("attention_mask")
        self._mask = mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None

    def _release_mask(self, *_: Any) -> None:
        self._mask = None

    def _real_tokens(self, shape: torch.Size, device: torch.device) -> torch.Tensor:
        mask = self._mask
        if mask is None or mask.shape[0] != shape[0] or mask.shape[1] < shape[1]:
            return torch.ones(shape, dtype=torch.bool, device=device)
        return mask[:, -shape[1]:].to(device=device).bool()  # with a key-value cache: the newest tokens

    def _delta(self, layer: int, like: torch.Tensor) -> torch.Tensor | None:
        source = self.state.tensors.get(delta_key(layer))
        if source is None:
            return None
        cached = self._on_device.get(layer)
        if cached is None or cached[0] is not source or cached[1].device != like.device or cached[1].dtype != like.dtype:
            cached = (source, source.to(device=like.device, dtype=like.dtype))
            self._on_device[layer] = cached
        return cached[1]

    def _forward(self, layer: int, _module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor | None:
        if self.mode == "off":
            return None
        keys = inputs[0]
        delta = self._delta(layer, keys)
        if delta is None:
            return None
        diff = keys @ delta.T  # (batch, tokens, d_model) = dW_h k_t
        if self.mode == "temporary":
            return output + diff
        flat = diff.reshape(-1, diff.shape[-2], diff.shape[-1]) if diff.dim() == 3 else diff[None]
        norms = flat.float().norm(dim=-1)
        z = z_scores(norms, self._real_tokens(norms.shape, norms.device))
        if self.mode == "record":
            self.recorded.setdefault(layer, []).append(torch.nan_to_num(z, nan=-torch.inf).amax(dim=1).cpu())
            return None
        alpha = float(self.state.tensors[alpha_key(layer)])
        chosen = (z >= alpha).reshape(diff.shape[:-1])[..., None]
        return torch.where(chosen, output + diff, output)
