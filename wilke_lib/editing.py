"""The editing interface shared by every editor: `edit`, `rollback`, `EditResult`, `EditError`.

`edit(model, tok, request, hparams)` dispatches on the type of `hparams` (ROMEHParams -> ROME,
MEMITHParams -> MEMIT, WilKEHParams -> WilKE, FTHParams -> FT-L, KNHParams -> KN) through the
`EDITORS` registry. Every weight change goes through a `WeightJournal`, which snapshots a layer's
W_proj before its first change: an impossible edit raises `EditError` and leaves every weight
bit-identical; the deltas actually added are recorded as CPU tensors.

`rollback` is the paper's rollback step (Appendix F): the same editor with target_new and
target_true swapped, at the layer(s) the edit used (WilKE does not search again).

`EditCache` holds what is computed once per ORIGINAL model and reused across edits (ROME computes
its statistics and context templates once): the generated context prefixes and the second
moments C (and C^-1) per layer. It is explicit -- the caller creates it and passes it to every
edit -- and keyed by the original model's identity (`wilke_lib.models.model_identity`).
"""

from __future__ import annotations

import copy as copy_module
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from wilke_lib.arch import ModelAdapter
from wilke_lib.hparams import editor_of

log = logging.getLogger(__name__)


class EditError(ValueError):
    """An impossible edit (empty subject, subject not in the prompt, empty target, NaN loss,
    singular system, ...). When it is raised by `edit`, the weights are bit-identical to before."""


@dataclass
class EditResult:
    """What one edit did.

    weight_deltas: module name -> dW actually added, (d_model, d_mlp), float32 on CPU
    (empty when edit(..., keep_deltas=False)). scores: per-layer score (WilKE's Eq. 10 or
    update-norm criterion), None for the other editors.
    """

    editor: str
    layers: list[int]
    weight_deltas: dict[str, torch.Tensor]
    scores: dict[int, float] | None
    seconds: float
    model: nn.Module
    info: dict[str, Any] = field(default_factory=dict)


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
        return {self.adapter.name_of("mlp_out", layer):
                (self.adapter.out_weight(layer).float() - weight.float()).cpu()
                for layer, weight in sorted(self.saved.items())}


@dataclass
class EditCache:
    """Per-original-model cache of context prefixes and second moments (no global state).

    model_key: identity of the ORIGINAL (unedited) model; stats on disk are stored under it.
    stats_dir: root of the on-disk statistics cache (default `<repo>/.cache/stats`).
    Spectral norms are not cached: they change as the weights are edited.
    """

    model_key: str
    stats_dir: Path | None = None
    prefixes: dict[tuple, list[str]] = field(default_factory=dict)
    mom2: dict[tuple, torch.Tensor] = field(default_factory=dict)
    mom2_inv: dict[tuple, torch.Tensor] = field(default_factory=dict)
    progress: bool = False

    @classmethod
    def for_model(cls, model: nn.Module, stats_dir: str | Path | None = None) -> "EditCache":
        """A cache keyed by `model`'s identity; create it from the ORIGINAL model."""
        from wilke_lib.models import model_identity

        return cls(model_key=model_identity(model), stats_dir=Path(stats_dir) if stats_dir else None)

    # ---- context prefixes ----------------------------------------------------------------------

    def get_prefixes(self, model: nn.Module, tok: PreTrainedTokenizerBase, hparams: Any) -> list[str]:
        """The context prefixes c_j of ROME Eq. 4 / WilKE Eq. 9 ("" = the bare prompt first)."""
        from wilke_lib.rome import context_prefixes

        key = (tuple(map(tuple, hparams.context_lengths)), hparams.context_seed, hparams.context_top_k,
               tuple(hparams.context_prefixes) if hparams.context_prefixes is not None else None)
        if key not in self.prefixes:
            self.prefixes[key] = context_prefixes(model, tok, hparams)
        return self.prefixes[key]

    # ---- second moments ----------------------------------------------------------------------

    @staticmethod
    def _stats_key(hparams: Any, layer: int) -> tuple:
        return (hparams.mom2_corpus, hparams.mom2_n_samples, hparams.mom2_max_length, hparams.mom2_dtype, layer)

    def get_mom2(self, model: nn.Module, tok: PreTrainedTokenizerBase, layers: Sequence[int],
                 hparams: Any) -> dict[int, torch.Tensor]:
        """C^l = E[k k^T] for each layer (computed in one pass for all missing layers)."""
        from wilke_lib.stats import second_moments

        missing = [l for l in layers if self._stats_key(hparams, l) not in self.mom2]
        if missing:
            found = second_moments(model, tok, missing, hparams.mom2_corpus, hparams.mom2_n_samples,
                                   hparams.mom2_batch_size, hparams.mom2_dtype, model_key=self.model_key,
                                   max_length=hparams.mom2_max_length, cache_dir=self.stats_dir,
                                   progress=self.progress)
            for l, mom2 in found.items():
                self.mom2[self._stats_key(hparams, l)] = mom2
        return {l: self.mom2[self._stats_key(hparams, l)] for l in layers}

    def get_mom2_inv(self, model: nn.Module, tok: PreTrainedTokenizerBase, layer: int, hparams: Any) -> torch.Tensor:
        """(C + ridge * mean(diag C) * I)^-1 in mom2_dtype; EditError if C is not positive definite.

        Computed through an eigendecomposition in float64 (C is symmetric): C must have all
        eigenvalues > 0, otherwise the system of ROME Eq. 2 is singular.
        """
        key = self._stats_key(hparams, layer) + (hparams.mom2_ridge,)
        if key not in self.mom2_inv:
            mom2 = self.get_mom2(model, tok, [layer], hparams)[layer]
            self.mom2_inv[key] = invert_second_moment(mom2, hparams.mom2_ridge, layer)
        return self.mom2_inv[key]


def invert_second_moment(mom2: torch.Tensor, ridge: float = 0.0, layer: int | None = None) -> torch.Tensor:
    """Inverse of the symmetric C (+ ridge * mean(diag C) * I), in C's dtype; EditError when singular."""
    where = f" at layer {layer}" if layer is not None else ""
    work_device = mom2.device if mom2.device.type != "mps" else torch.device("cpu")
    c64 = mom2.to(device=work_device, dtype=torch.float64)
    if not torch.isfinite(c64).all():
        raise EditError(f"singular system: second-moment matrix{where} has non-finite entries")
    c64 = (c64 + c64.T) / 2
    if ridge:
        c64 = c64 + ridge * c64.diagonal().mean() * torch.eye(c64.shape[0], dtype=c64.dtype, device=c64.device)
    eigvals, eigvecs = torch.linalg.eigh(c64)
    if eigvals.max() <= 0 or eigvals.min() <= 0:
        raise EditError(f"singular system: second-moment matrix{where} is not positive definite "
                        f"(eigenvalues in [{eigvals.min().item():.3g}, {eigvals.max().item():.3g}]); "
                        "use more statistics samples or set mom2_ridge > 0")
    inv = (eigvecs / eigvals) @ eigvecs.T
    return inv.to(device=mom2.device, dtype=mom2.dtype)


# ---- requests ----------------------------------------------------------------------------------

def as_request(request: dict) -> dict:
    """Accept a CounterFact record as well as its `requested_rewrite`."""
    if isinstance(request, dict) and "requested_rewrite" in request:
        return request["requested_rewrite"]
    return request


def swapped(request: dict) -> dict:
    """The rollback request: target_new and target_true exchanged."""
    request = as_request(request)
    return {**request, "target_new": request["target_true"], "target_true": request["target_new"]}


# ---- registry ----------------------------------------------------------------------------------

EditorFn = Callable[..., EditorOutput]


def _rome(model, tok, request, hparams, *, journal, layers, cache) -> EditorOutput:
    from wilke_lib.rome import rome_editor
    return rome_editor(model, tok, request, hparams, journal=journal, layers=layers, cache=cache)


def _memit(model, tok, request, hparams, *, journal, layers, cache) -> EditorOutput:
    from wilke_lib.memit import memit_editor
    return memit_editor(model, tok, request, hparams, journal=journal, layers=layers, cache=cache)


def _wilke(model, tok, request, hparams, *, journal, layers, cache) -> EditorOutput:
    from wilke_lib.wilke import wilke_editor
    return wilke_editor(model, tok, request, hparams, journal=journal, layers=layers, cache=cache)


def _ft(model, tok, request, hparams, *, journal, layers, cache) -> EditorOutput:
    from wilke_lib.ft import ft_editor
    return ft_editor(model, tok, request, hparams, journal=journal, layers=layers, cache=cache)


def _kn(model, tok, request, hparams, *, journal, layers, cache) -> EditorOutput:
    from wilke_lib.kn import kn_editor
    return kn_editor(model, tok, request, hparams, journal=journal, layers=layers, cache=cache)


# name -> implementation(model, tok, request, hparams, *, journal, layers, cache) -> EditorOutput
EDITORS: dict[str, EditorFn] = {"rome": _rome, "memit": _memit, "wilke": _wilke, "ft": _ft, "kn": _kn}


def edit(model: nn.Module, tok: PreTrainedTokenizerBase, request: dict, hparams: Any, *, copy: bool = False,
         layers: Sequence[int] | None = None, cache: EditCache | None = None,
         keep_deltas: bool = True) -> EditResult:
    """Apply one edit (target_true -> target_new) with the editor given by `hparams`' type.

    copy=True deep-copies the model first (the original is untouched). `layers` overrides the
    editor's layer choice (ROME/WilKE: one layer, no WilKE search; MEMIT: the layer range;
    FT: one layer; KN: the layers searched for neurons). `cache` should be created once from the
    original model (`EditCache.for_model`) and passed to every edit; without it a fresh one is
    made (statistics still come from disk). Raises EditError, weights untouched, when impossible.
    """
    editor = editor_of(hparams)
    request = as_request(request)
    if copy:
        model = copy_module.deepcopy(model)
    if cache is None:
        cache = EditCache.for_model(model)
    adapter = ModelAdapter(model)
    journal = WeightJournal(adapter)
    start = time.perf_counter()
    try:
        output = EDITORS[editor](model, tok, request, hparams, journal=journal,
                                 layers=list(layers) if layers is not None else None, cache=cache)
    except BaseException:
        journal.restore()
        raise
    device = next(model.parameters()).device
    if device.type == "cuda":  # asynchronous kernels: time the work, not its launch
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    deltas = journal.deltas() if keep_deltas else {}
    return EditResult(editor=editor, layers=list(output.layers), weight_deltas=deltas, scores=output.scores,
                      seconds=seconds, model=model, info=output.info)


def rollback(model: nn.Module, tok: PreTrainedTokenizerBase, request: dict, hparams: Any,
             previous: EditResult, cache: EditCache | None = None, keep_deltas: bool = True) -> EditResult:
    """Undo `previous` the paper's way: edit again with target_new / target_true swapped, same
    editor, at `previous.layers` (WilKE re-uses the layer it chose)."""
    if editor_of(hparams) != previous.editor:
        raise ValueError(f"rollback with editor {editor_of(hparams)!r} of an edit made by {previous.editor!r}")
    return edit(model, tok, swapped(request), hparams, layers=previous.layers, cache=cache, keep_deltas=keep_deltas)
