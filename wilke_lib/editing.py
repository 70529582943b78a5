"""The editing interface shared by every editor: `edit`, `rollback`, `EditResult`.

`edit(model, tok, request, hparams)` dispatches on the type of `hparams` (`hparams.editor_of`) through
`wilke_lib.editors.EDITORS`, built from the registry `wilke_lib.registry`: FTHParams -> FT (FT-L),
KEHParams -> KE, KNHParams -> KN, MENDHParams -> MEND, ROMEHParams -> ROME (and r-ROME, its `update_form`),
MEMITHParams -> MEMIT, AlphaEditHParams -> AlphaEdit, COMEBAHKHParams -> COMEBA-HK, LEMoEHParams -> LEMoE,
WilKEHParams -> WilKE (as released, and WilKE (Eq. 10), its `score`). Every weight change goes through
a `WeightJournal`: an impossible edit raises `EditError` and leaves every weight bit-identical; the deltas
actually added are recorded as CPU tensors.

`rollback` is the paper's rollback step (Appendix F): the same editor with target_new and
target_true swapped, at the layer(s) the edit used (WilKE does not search again).

Pass an `EditCache` (`wilke_lib.editors.cache`), created once from the ORIGINAL model, to every edit
and rollback: it holds ROME's context prefixes and the second moments C of the unedited model.
"""

from __future__ import annotations

import copy as copy_module
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from wilke_lib.arch import ModelAdapter, model_device
from wilke_lib.editors import BATCH_EDITORS, EDITORS
from wilke_lib.editors.cache import EditCache
from wilke_lib.editors.common import EditorOutput, EditorState, WeightJournal
from wilke_lib.errors import EditError
from wilke_lib.hparams import editor_of
from wilke_lib.tokens import as_request, swapped

__all__ = ["BATCH_EDITORS", "EDITORS", "EditCache", "EditError", "EditResult", "edit", "edit_batch", "rollback"]


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


def edit(model: nn.Module, tok: PreTrainedTokenizerBase, request: dict, hparams: Any, *, copy: bool = False,
         layers: Sequence[int] | None = None, cache: EditCache | None = None, keep_deltas: bool = True,
         state: EditorState | None = None) -> EditResult:
    """Apply one edit (target_true -> target_new) with the editor given by `hparams`' type.

    copy=True deep-copies the model first (the original is untouched). `layers` overrides the
    editor's layer choice (ROME/WilKE: one layer, no WilKE search; MEMIT: the layer range;
    FT: one layer; KN: the layers searched for neurons). `cache` should be created once from the
    original model (`EditCache.for_model`) and passed to every edit; without it a fresh one is
    made (statistics still come from disk). `state`: what the editor remembers between the edits of
    a run (AlphaEdit); restored with the weights when the edit fails. Raises EditError, weights
    untouched, when impossible.
    """
    request = as_request(request)
    chosen = list(layers) if layers is not None else None

    def apply(editor: str, model: nn.Module, journal: WeightJournal, cache: EditCache) -> EditorOutput:
        return EDITORS[editor](model, tok, request, hparams, journal=journal, layers=chosen, cache=cache, state=state)

    return _journaled(model, hparams, copy, cache, keep_deltas, state, apply)


def edit_batch(model: nn.Module, tok: PreTrainedTokenizerBase, requests: Sequence[dict], hparams: Any, *,
               cache: EditCache | None = None, keep_deltas: bool = True, state: EditorState | None = None) -> EditResult:
    """Apply a batch of edits as one: at once for the batch editors (`editors.BATCH_EDITORS`: MEMIT,
    AlphaEdit, COMEBA-HK, LEMoE), one request after another for the others (FT, KE, KN, MEND, ROME, WilKE). Either the
    whole batch lands or, on EditError, nothing does (weights and `state` bit-identical)."""
    requests = [as_request(r) for r in requests]
    if not requests:
        raise ValueError("edit_batch: no requests")

    def apply(editor: str, model: nn.Module, journal: WeightJournal, cache: EditCache) -> EditorOutput:
        if editor in BATCH_EDITORS:
            return BATCH_EDITORS[editor](model, tok, requests, hparams, journal=journal, layers=None, cache=cache,
                                         state=state)
        outputs = [EDITORS[editor](model, tok, r, hparams, journal=journal, layers=None, cache=cache, state=state)
                   for r in requests]
        layers = sorted({l for o in outputs for l in o.layers})
        return EditorOutput(layers=layers, info={"per_request": [o.info for o in outputs],
                                                 "request_layers": [o.layers for o in outputs]})

    return _journaled(model, hparams, False, cache, keep_deltas, state, apply)


def _journaled(model: nn.Module, hparams: Any, copy: bool, cache: EditCache | None, keep_deltas: bool,
               state: EditorState | None, apply: Any) -> EditResult:
    """Run `apply(editor, model, journal, cache) -> EditorOutput` with every weight change journaled:
    on any exception the weights and `state` are restored and the exception re-raised; timed."""
    editor = editor_of(hparams)
    if copy:
        model = copy_module.deepcopy(model)
    if cache is None:
        cache = EditCache.for_model(model)
    journal = WeightJournal(ModelAdapter(model))
    if state is not None:
        state.snapshot()
    start = time.perf_counter()
    try:
        output = apply(editor, model, journal, cache)
    except BaseException:
        journal.restore()
        if state is not None:
            state.restore()
        raise
    device = model_device(model)
    if device.type == "cuda":  # asynchronous kernels: time the work, not its launch
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    deltas = journal.deltas() if keep_deltas else {}
    return EditResult(editor=editor, layers=list(output.layers), weight_deltas=deltas, scores=output.scores,
                      seconds=seconds, model=model, info=output.info)


def rollback(model: nn.Module, tok: PreTrainedTokenizerBase, request: dict, hparams: Any,
             previous: EditResult, cache: EditCache | None = None, keep_deltas: bool = True,
             state: EditorState | None = None) -> EditResult:
    """Undo `previous` the paper's way: edit again with target_new / target_true swapped, same
    editor, at `previous.layers` (WilKE re-uses the layer it chose)."""
    if editor_of(hparams) != previous.editor:
        raise ValueError(f"rollback with editor {editor_of(hparams)!r} of an edit made by {previous.editor!r}")
    return edit(model, tok, swapped(request), hparams, layers=previous.layers, cache=cache, keep_deltas=keep_deltas,
                state=state)
