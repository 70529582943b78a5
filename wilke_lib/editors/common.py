"""What every editor shares: the output it hands back and the journal through which it changes weights.

Every weight change goes through a `WeightJournal`, which snapshots a layer's W_proj before its first
change: an impossible edit raises `EditError` and `editing.edit` restores the snapshots, so the weights
are bit-identical to before; the deltas actually added are read back from it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from wilke_lib.arch import ModelAdapter
from wilke_lib.errors import EditError


@dataclass
class EditorOutput:
    """What an editor implementation returns to `edit` (weights already changed via the journal)."""

    layers: list[int]
    scores: dict[int, float] | None = None
    info: dict[str, Any] = field(default_factory=dict)


class WeightJournal:
    """Applies changes to W_proj of some layers and can undo them bit-identically.

    The first change to a layer snapshots its weight; `restore()` copies the snapshots back;
    `deltas()` gives W_now - W_before for each touched layer.
    """

    def __init__(self, adapter: ModelAdapter) -> None:
        self.adapter = adapter
        self.saved: dict[int, torch.Tensor] = {}

    def snapshot(self, layer: int) -> None:
        if layer not in self.saved:
            self.saved[layer] = self.adapter.out_weight(layer).clone()

    def add(self, layer: int, delta: torch.Tensor) -> None:
        """W_proj^layer += delta (d_model, d_mlp); EditError if delta is not finite."""
        if not torch.isfinite(delta).all():
            raise EditError(f"non-finite weight update at layer {layer}")
        self.snapshot(layer)
        self.adapter.add_to_out_weight(layer, delta)

    def restore(self) -> None:
        for layer, weight in self.saved.items():
            self.adapter.set_out_weight(layer, weight)

    def deltas(self) -> dict[str, torch.Tensor]:
        return {self.adapter.name_of("mlp_out", layer): (self.adapter.out_weight(layer).float() - weight.float()).cpu()
                for layer, weight in sorted(self.saved.items())}


class EditorState:
    """What an editor remembers from one edit to the next within a run (AlphaEdit: the keys of the
    earlier edits), as named tensors. The lifelong runner creates one per run, saves it with the
    weights and restores it on resume; `editing.edit` restores it, like the weights, when an edit
    fails. Editors without memory ignore it.

    Editors replace a state's tensors, they never change one in place (`state.tensors[k] = old + new`,
    not `+=`): the snapshot taken before every edit is then a shallow copy, which costs nothing however
    large the state grows (LEMoE's experts)."""

    def __init__(self, tensors: dict[str, torch.Tensor] | None = None) -> None:
        self.tensors: dict[str, torch.Tensor] = dict(tensors or {})
        self._saved: dict[str, torch.Tensor] | None = None

    def snapshot(self) -> None:
        self._saved = dict(self.tensors)

    def restore(self) -> None:
        if self._saved is not None:
            self.tensors = self._saved
            self._saved = None


def single_layer(layers: list[int] | None, default: int | None, editor: str) -> int:
    """The one layer an editor edits: `layers=[l]` if given, else its default; ValueError otherwise."""
    if layers is not None and len(layers) != 1:
        raise ValueError(f"{editor} edits one layer; got layers={layers}")
    layer = layers[0] if layers is not None else default
    if layer is None:
        raise ValueError(f"no layer given for {editor}")
    return layer
