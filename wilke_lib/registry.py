"""The one registry of the editors: an `EditorSpec` for every editor of the library's tables.

Every list of editors derives from `SPECS`, in its order (the order of the lifelong matrix):

* `editors.EDITORS` / `editors.BATCH_EDITORS`: the functions (`EditorSpec.edit`, `EditorSpec.batch`);
* `hparams.HPARAMS_CLASSES`: the settings classes (`EditorSpec.hparams_class`);
* `experiments.EDITOR_LABELS` / `experiments.DERIVED_EDITORS`: the tables' names, labels and variants;
* `present.EDITOR_ORDER`: the rows of Table 1; `profiles.ALL_EDITORS`: the editors of the lifelong tables;
* `analysis.plots`: one colour per editor in every figure (`EditorSpec.colour`, `colour_of`);
* `lifelong.runner.predefined_layers`: the layers an editor edits unless told otherwise (`EditorSpec.layers`).

Ten editors are implemented (`implemented()`: name == editor); the tables add variants of them with other
settings (`EditorSpec.overrides`): "r-rome" is ROME with the update of Gupta et al. 2024, "wilke" is WilKE as
released (the layer with the smallest ||dW|| / ||W||, which gave the paper's Table 1 and Fig. 43) and
"wilke-eq10" WilKE with the rule the paper's text writes (Eq. 10).

Pure data at the bottom of the layers (docs/design.md): it imports nothing of the library and no torch, so
that the run-size profiles, the book's tables and the plots read it for nothing. The functions and settings
classes are named ("module:function", a class name of `wilke_lib.hparams`) and resolved by the layer that owns
them (`editors`, `hparams`); tests/test_registry.py checks that every name resolves and that the docs name
every editor.

The colours: the Okabe-Ito palette (Okabe & Ito 2008) and, for the editors beyond its seven usable
colours, Paul Tol's indigo and wine and matplotlib's tab10 brown, cyan and red. Pairs stay at least 14 CIELAB
units apart for normal vision and simulated deuteranopia and protanopia (tests/test_registry.py); FT is
black, WilKE vermillion, LEMoE magenta; ROME and r-ROME, and WilKE and WilKE (Eq. 10), are related shades
on purpose. Curves carry their own markers and line styles besides (`analysis.plots`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

LayerRule = Literal["layer", "layers", "chosen"]
Writes = Literal["weights", "hook layers", "experts"]


@dataclass(frozen=True)
class EditorSpec:
    """One editor of the tables.

    name: the tables' name ("rome", "r-rome", "wilke-eq10"); label: its name in tables and legends;
    colour: "#rrggbb" in every figure; editor: the implementation it runs (its settings' `editor`, the folder
    of its YAML files `wilke_lib/hparams/<editor>/`); hparams_class: the settings class in `wilke_lib.hparams`;
    edit: "module:function" of `(model, tok, request, hparams, *, journal, layers, cache, state) ->
    EditorOutput`; batch: "module:function" editing a batch of requests at once, or None (a batch is then
    edited one request after another, `editing.edit_batch`); layers: where it edits unless told otherwise:
    "layer" (one predefined layer, the setting `layer`), "layers" (the setting `layers`, a list) or "chosen"
    (per edit, among `candidate_layers`: WilKE); writes: what an edit changes: the base "weights" (W_proj,
    through the `WeightJournal`) or modules of its own kept in the `EditorState` and read by forward hooks
    (COMEBA-HK's "hook layers", LEMoE's "experts"); overrides: settings over its YAML file's for this
    table editor; reference: the paper it follows.
    """

    name: str
    label: str
    colour: str
    editor: str
    hparams_class: str
    edit: str
    batch: str | None
    layers: LayerRule
    writes: Writes
    reference: str
    overrides: tuple[tuple[str, Any], ...] = ()

    @property
    def implemented(self) -> bool:
        """Whether this is an implementation (not a variant of another editor with other settings)."""
        return self.name == self.editor

    @property
    def edits_weights(self) -> bool:
        """Whether an edit changes the base weights (False: modules of its own, kept in the `EditorState`)."""
        return self.writes == "weights"

    def settings(self) -> dict[str, Any]:
        """The overrides as a dict (a new one each call)."""
        return dict(self.overrides)


def _editor(name: str, label: str, colour: str, hparams_class: str, *, layers: LayerRule, reference: str,
            batch: bool = False, writes: Writes = "weights", **overrides: Any) -> EditorSpec:
    """An implementation: module `wilke_lib.editors.<name>` with `<name>_editor` (and `<name>_batch_editor`)."""
    module = f"wilke_lib.editors.{name}"
    return EditorSpec(name=name, label=label, colour=colour, editor=name, hparams_class=hparams_class,
                      edit=f"{module}:{name}_editor", batch=f"{module}:{name}_batch_editor" if batch else None,
                      layers=layers, writes=writes, reference=reference, overrides=tuple(overrides.items()))


def _variant(base: EditorSpec, name: str, label: str, colour: str, reference: str, **overrides: Any) -> EditorSpec:
    """`base` with other settings, under another name of the tables."""
    return dataclasses.replace(base, name=name, label=label, colour=colour, reference=reference,
                               overrides=tuple(overrides.items()))


_ROME = _editor("rome", "ROME", "#0072B2", "ROMEHParams", layers="layer", reference="Meng et al. 2022a")
_WILKE = _editor("wilke", "WilKE", "#D55E00", "WilKEHParams", layers="chosen",
                 reference="Hu et al. 2024, as released", score="update_norm")

SPECS: tuple[EditorSpec, ...] = (
    _editor("ft", "FT", "#000000", "FTHParams", layers="layer", reference="Zhu et al. 2020, as used by ROME"),
    _editor("ke", "KE", "#882255", "KEHParams", layers="layers", reference="De Cao et al. 2021"),
    _editor("kn", "KN", "#17BECF", "KNHParams", layers="layers", reference="Dai et al. 2021"),
    _editor("mend", "MEND", "#8C564B", "MENDHParams", layers="layers", reference="Mitchell et al. 2022"),
    _ROME,
    _variant(_ROME, "r-rome", "r-ROME", "#56B4E9", "Gupta et al. 2024, \"Rebuilding ROME\"", update_form="r-rome"),
    _editor("memit", "MEMIT", "#44AA99", "MEMITHParams", layers="layers", batch=True, reference="Meng et al. 2022b"),
    _editor("alphaedit", "AlphaEdit", "#CCBB44", "AlphaEditHParams", layers="layers", batch=True,
            reference="Fang et al. 2025"),
    _editor("comeba_hk", "COMEBA-HK", "#332288", "COMEBAHKHParams", layers="layers", batch=True,
            writes="hook layers", reference="Li et al. 2024"),
    _editor("lemoe", "LEMoE", "#EE3377", "LEMoEHParams", layers="layer", batch=True, writes="experts",
            reference="Wang & Li 2024"),
    _WILKE,
    _variant(_WILKE, "wilke-eq10", "WilKE (Eq. 10)", "#D62728", "Hu et al. 2024, Eq. 10", score="eq10"),
)
"""Every editor of the tables, in the order of the lifelong matrix (`profiles.ALL_EDITORS`)."""

_BY_NAME = {s.name: s for s in SPECS}
_MISSING = object()
_BY_LABEL = {s.label: s for s in SPECS}


def names() -> tuple[str, ...]:
    """The tables' editor names, in order."""
    return tuple(_BY_NAME)


def spec(name: str) -> EditorSpec:
    """The editor called `name` ("rome", "r-rome", ...); ValueError listing the names otherwise."""
    try:
        return _BY_NAME[name]
    except KeyError:
        raise ValueError(f"unknown editor {name!r}; registered editors: {', '.join(_BY_NAME)}") from None


def implemented() -> tuple[EditorSpec, ...]:
    """The implementations (one per module of `wilke_lib.editors`, settings class and YAML folder), in order."""
    return tuple(s for s in SPECS if s.implemented)


def by_label(label: str) -> EditorSpec | None:
    """The editor whose label is `label` ("WilKE (Eq. 10)"), or None."""
    return _BY_LABEL.get(label)


def colour_of(label_or_name: str) -> str | None:
    """The colour of an editor given by its label or its name; None for anything else (an ablation variant)."""
    found = _BY_LABEL.get(label_or_name) or _BY_NAME.get(label_or_name)
    return found.colour if found else None


def table_name(editor: str, settings: Any) -> str:
    """The tables' name of a run of implementation `editor` with the settings object `settings`: the most
    specific registered editor running `editor` whose overrides `settings` all have ("wilke" with score "eq10"
    -> "wilke-eq10"); `editor` itself when none does or `settings` is None."""
    if settings is None:
        return editor
    matching = [s for s in SPECS if s.editor == editor
                and all(getattr(settings, key, _MISSING) == value for key, value in s.overrides)]
    return max(matching, key=lambda s: len(s.overrides)).name if matching else editor
