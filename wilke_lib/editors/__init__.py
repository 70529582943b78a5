"""The editors, one module each, and the registry `editing.edit` reads.

An editor is a function `(model, tok, request, hparams, *, journal, layers, cache, state) -> EditorOutput`
that changes W_proj weights only through the `WeightJournal` and keeps what it remembers between
edits in the `EditorState` (`editors.common`). To add one: write
`editors/<name>.py`, its hyper-parameter dataclass in `wilke_lib.hparams`, its YAML files in
`wilke_lib/hparams/<name>/`, and register it here. The hypernetwork editors (MEND, KE) also need a trained
network: `python -m wilke_lib.editors.hypernet --model <name> --editor mend|ke` (`editors.hypernet`).
"""

from collections.abc import Callable

from wilke_lib.editors.alphaedit import alphaedit_batch_editor, alphaedit_editor
from wilke_lib.editors.comeba_hk import comeba_hk_batch_editor, comeba_hk_editor
from wilke_lib.editors.common import EditorOutput
from wilke_lib.editors.ft import ft_editor
from wilke_lib.editors.ke import ke_editor
from wilke_lib.editors.kn import kn_editor
from wilke_lib.editors.lemoe import lemoe_batch_editor, lemoe_editor
from wilke_lib.editors.memit import memit_batch_editor, memit_editor
from wilke_lib.editors.mend import mend_editor
from wilke_lib.editors.rome import rome_editor
from wilke_lib.editors.wilke import wilke_editor

EditorFn = Callable[..., EditorOutput]

EDITORS: dict[str, EditorFn] = {"rome": rome_editor, "memit": memit_editor, "wilke": wilke_editor,
                                "ft": ft_editor, "kn": kn_editor, "alphaedit": alphaedit_editor,
                                "comeba_hk": comeba_hk_editor, "lemoe": lemoe_editor, "mend": mend_editor, "ke": ke_editor}
"""name -> implementation(model, tok, request, hparams, *, journal, layers, cache, state) -> EditorOutput."""

BATCH_EDITORS: dict[str, EditorFn] = {"memit": memit_batch_editor, "alphaedit": alphaedit_batch_editor,
                                      "comeba_hk": comeba_hk_batch_editor, "lemoe": lemoe_batch_editor}
"""Editors that write a batch of requests at once: name -> implementation(model, tok, requests, hparams, *,
journal, layers, cache, state); the others edit a batch one request after another (`editing.edit_batch`)."""
