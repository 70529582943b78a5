"""The editor registry (`wilke_lib.registry`): every editor complete (settings class, YAML files for both
organisms, function, label, a colour of its own), every list of editors derived from it, and the docs naming
every editor."""

from __future__ import annotations

import dataclasses
import importlib
import itertools
import re
from pathlib import Path

import numpy as np
import pytest

from wilke_lib import experiments, hparams, models, present, profiles, registry
from wilke_lib.analysis import plots
from wilke_lib.editors import BATCH_EDITORS, EDITORS
from wilke_lib.lifelong.runner import predefined_layers

ROOT = Path(__file__).resolve().parents[1]
SPECS = registry.SPECS
IMPLEMENTED = registry.implemented()


def _resolve(path: str):
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


def unnamed(text: str, specs=SPECS) -> list[str]:
    """The labels of `specs` that `text` does not name as a word ("ROME" inside "r-ROME" does not count)."""
    return [s.label for s in specs if not re.search(rf"(?<![\w-]){re.escape(s.label)}(?!\w)", text)]


# ------------------------------------------------------------------------------------- the registry
def test_names_and_labels_are_unique_and_the_implementations_are_the_ten_editors():
    assert len({s.name for s in SPECS}) == len({s.label for s in SPECS}) == len(SPECS) >= 12
    assert {s.name for s in IMPLEMENTED} == {"ft", "ke", "kn", "mend", "rome", "memit", "alphaedit", "comeba_hk",
                                             "lemoe", "wilke"}
    assert all(s.label.strip() and s.reference.strip() for s in SPECS)
    with pytest.raises(ValueError, match="registered editors"):
        registry.spec("romee")


@pytest.mark.parametrize("spec", IMPLEMENTED, ids=lambda s: s.name)
def test_every_editor_has_its_settings_class_yaml_files_and_functions(spec):
    cls = hparams.HPARAMS_CLASSES[spec.name]
    assert cls.__name__ == spec.hparams_class and cls.editor == spec.name
    for organism in models.ORGANISMS:  # both organisms
        path = hparams.HPARAMS_DIR / spec.name / f"{organism}.yaml"
        assert path.is_file(), f"no {path}"
        assert isinstance(hparams.load_hparams(spec.name, organism), cls)
    assert EDITORS[spec.name] is _resolve(spec.edit)
    assert spec.edit.startswith(f"wilke_lib.editors.{spec.name}:")
    assert (spec.name in BATCH_EDITORS) == (spec.batch is not None)
    if spec.batch:
        assert BATCH_EDITORS[spec.name] is _resolve(spec.batch)
    fields = {f.name for f in dataclasses.fields(cls)}
    assert {"layer": "layer", "layers": "layers", "chosen": "candidate_layers"}[spec.layers] in fields
    assert spec.writes in ("weights", "hook layers", "experts")


def test_only_comeba_hk_and_lemoe_keep_modules_of_their_own():
    assert {s.name: s.writes for s in IMPLEMENTED if not s.edits_weights} == {"comeba_hk": "hook layers",
                                                                              "lemoe": "experts"}


@pytest.mark.parametrize("spec", [s for s in SPECS if s.overrides], ids=lambda s: s.name)
def test_every_variant_is_an_implementation_with_valid_settings(spec):
    base = registry.spec(spec.editor)
    assert base.implemented and spec.hparams_class == base.hparams_class and spec.edit == base.edit
    for organism in models.ORGANISMS:
        variant = experiments.editor_variant(spec.name)
        assert (variant.editor, variant.overrides, variant.label) == (spec.editor, spec.settings(), spec.label)
        settings = variant.hparams(organism)  # the overrides are fields with valid values
        assert all(getattr(settings, k) == v for k, v in spec.overrides)
        assert experiments.editor_label(spec.editor, settings) == spec.label


# ------------------------------------------------------------------------------------- colours
_DEFICIENCIES = {  # Machado, Oliveira & Fernandes 2009, severity 1, on linear RGB
    "normal vision": np.eye(3),
    "deuteranopia": np.array([[0.367322, 0.860646, -0.227968], [0.280085, 0.672501, 0.047413],
                              [-0.011820, 0.042940, 0.968881]]),
    "protanopia": np.array([[0.152286, 1.052583, -0.204868], [0.114503, 0.786281, 0.099216],
                            [-0.003882, -0.048116, 1.051998]]),
}
MIN_DELTA_E = 14.0  # CIE76, in CIELAB units


def _lab(colour: str, matrix: np.ndarray) -> np.ndarray:
    srgb = np.array([int(colour[i:i + 2], 16) / 255 for i in (1, 3, 5)])
    linear = np.where(srgb <= 0.04045, srgb / 12.92, ((srgb + 0.055) / 1.055) ** 2.4)
    xyz = np.array([[0.4124, 0.3576, 0.1805], [0.2126, 0.7152, 0.0722], [0.0193, 0.1192, 0.9505]]) @ np.clip(
        matrix @ linear, 0, 1)
    t = xyz / np.array([0.95047, 1.0, 1.08883])
    f = np.where(t > (6 / 29) ** 3, np.cbrt(t), t / (3 * (6 / 29) ** 2) + 4 / 29)
    return np.array([116 * f[1] - 16, 500 * (f[0] - f[1]), 200 * (f[1] - f[2])])


def test_every_editor_has_a_colour_of_its_own_also_for_colour_blind_readers():
    colours = [s.colour for s in SPECS]
    assert all(re.fullmatch(r"#[0-9A-Fa-f]{6}", c) for c in colours)
    assert len({c.lower() for c in colours}) == len(colours)
    close = []
    for name, matrix in _DEFICIENCIES.items():
        for a, b in itertools.combinations(SPECS, 2):
            distance = float(np.linalg.norm(_lab(a.colour, matrix) - _lab(b.colour, matrix)))
            if distance < MIN_DELTA_E:
                close.append(f"{a.label} / {b.label}: {distance:.1f} ({name})")
    assert not close, close
    blue = lambda c: _lab(c, np.eye(3))[2] < -20  # noqa: E731  (b* well below 0)
    assert not all(blue(registry.spec(n).colour) for n in ("ft", "wilke", "lemoe"))


def test_the_plots_take_the_editors_colours_from_the_registry():
    colours = plots._curve_colours(["ROME", "WilKE", "ROME @ layer 3"], None)
    assert colours["ROME"] == registry.spec("rome").colour and colours["WilKE"] == registry.spec("wilke").colour
    assert colours["ROME @ layer 3"] == plots.SPARE_COLOURS[0]
    assert set(plots.SPARE_COLOURS).isdisjoint(s.colour for s in SPECS)
    assert plots._curve_colours(["WilKE eq10 full", "WilKE eq10 w/o delta"], None) == {
        "WilKE eq10 full": None, "WilKE eq10 w/o delta": None}  # no editor: matplotlib's cycle, as before


# ------------------------------------------------------------------------------------- derived lists
def test_every_list_of_editors_derives_from_the_registry():
    names = registry.names()
    assert profiles.ALL_EDITORS == names
    assert set(hparams.HPARAMS_CLASSES) == set(EDITORS) == {s.name for s in IMPLEMENTED}
    assert set(BATCH_EDITORS) == {"memit", "alphaedit", "comeba_hk", "lemoe"}
    assert experiments.EDITOR_LABELS == {s.name: s.label for s in SPECS}
    assert experiments.DERIVED_EDITORS == {"r-rome": ("rome", {"update_form": "r-rome"}),
                                           "wilke": ("wilke", {"score": "update_norm"}),
                                           "wilke-eq10": ("wilke", {"score": "eq10"})}
    assert present.EDITOR_ORDER == ("FT", "KE", "KN", "MEND", "ROME", "r-ROME", "MEMIT", "AlphaEdit", "COMEBA-HK",
                                    "LEMoE", "WilKE (Eq. 10)", "WilKE")
    for profile in profiles.PROFILES.values():
        for editors in (profile.editors, profile.consecutive_editors, profile.multi_seed_editors or ()):
            assert set(editors) <= set(names), (profile.name, editors)


def _duck_typed_layers(settings) -> list[int]:
    """`lifelong.runner.predefined_layers` as it was before the registry: by the settings' attributes."""
    if getattr(settings, "editor", "") == "wilke":
        return []
    layers = getattr(settings, "layers", None)
    if layers:
        return [int(l) for l in layers]
    layer = getattr(settings, "layer", None)
    return [int(layer)] if isinstance(layer, int) else []


@pytest.mark.parametrize("name", registry.names())
def test_the_predefined_layers_are_those_of_before(name):
    for organism in models.ORGANISMS:
        settings = experiments.editor_variant(name).hparams(organism)
        assert predefined_layers(settings) == _duck_typed_layers(settings)

    @dataclasses.dataclass
    class Custom:  # a custom backend's settings, outside the registry
        layer: int = 3

    assert predefined_layers(Custom()) == [3]


# ------------------------------------------------------------------------------------- the docs
def test_the_docs_name_every_registered_editor():
    design = (ROOT / "docs" / "design.md").read_text(encoding="utf-8")
    assert not unnamed(design), f"docs/design.md does not name {unnamed(design)}"
    assert not [s.name for s in SPECS if f"`{s.name}`" not in design], "docs/design.md: an editor's name is missing"
    for module in ("wilke_lib.editing", "wilke_lib.editors"):
        doc = importlib.import_module(module).__doc__
        assert not unnamed(doc), f"the docstring of {module} does not name {unnamed(doc)}"


def test_the_docs_check_sees_a_missing_editor():
    assert "FT" in unnamed("ROME and r-ROME") and "ROME" not in unnamed("ROME and r-ROME")
    assert "ROME" in unnamed("only r-ROME") and "KE" in unnamed("WilKE")
