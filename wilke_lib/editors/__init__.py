"""The editors, one module each, and the functions `editing.edit` dispatches to.

The ten editors: FT (FT-L, `ft`), KN (`kn`), ROME (`rome`), MEMIT (`memit`), AlphaEdit (`alphaedit`),
COMEBA-HK (`comeba_hk`), LEMoE (`lemoe`), MEND (`mend`), KE (`ke`) and WilKE (`wilke`); the tables add
r-ROME and WilKE (Eq. 10), variants of ROME and WilKE with other settings (`wilke_lib.registry`).

An editor is a function `(model, tok, request, hparams, *, journal, layers, cache, state) -> EditorOutput`
that changes W_proj weights only through the `WeightJournal` and keeps what it remembers between
edits in the `EditorState` (`editors.common`); COMEBA-HK and LEMoE keep their hook layers and experts there
instead of changing the weights. `EDITORS` and `BATCH_EDITORS` are built from the registry
(`wilke_lib.registry.SPECS`): to add an editor, write `editors/<name>.py`, its hyper-parameter dataclass in
`wilke_lib.hparams`, its YAML files in `wilke_lib/hparams/<name>/`, and add its `EditorSpec` to the registry.
The hypernetwork editors (MEND, KE) also need a trained network:
`python -m wilke_lib.editors.hypernet --model <name> --editor mend|ke` (`editors.hypernet`).
"""

import importlib
from collections.abc import Callable

from wilke_lib.editors.common import EditorOutput
from wilke_lib.registry import implemented

EditorFn = Callable[..., EditorOutput]


def _resolve(path: str) -> EditorFn:
    """The function named "module:function"."""
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


EDITORS: dict[str, EditorFn] = {spec.name: _resolve(spec.edit) for spec in implemented()}
"""name -> implementation(model, tok, request, hparams, *, journal, layers, cache, state) -> EditorOutput."""

BATCH_EDITORS: dict[str, EditorFn] = {spec.name: _resolve(spec.batch) for spec in implemented() if spec.batch}
"""Editors that write a batch of requests at once (MEMIT, AlphaEdit, COMEBA-HK, LEMoE): name ->
implementation(model, tok, requests, hparams, *, journal, layers, cache, state); the others edit a batch one
request after another (`editing.edit_batch`)."""
