"""Every bad input a new user could give, and what the library answers to each (the catalogue that was
`scripts/try_bad_inputs.py`): records files, hyper-parameter files, edit requests, lifelong
configurations, notebook parameters, model names, cache and state files, runs.

Every case builds its bad input in its temporary folder, calls the public entry point a user would call
(`load_counterfact` then `run_lifelong`, `hparams_from_file`, `editing.edit`, `experiments.run_variants`,
`models.load_model`, `stats.second_moment`, `run_lifelong` resuming or reading back a run, ...) and
judges the answer; each case is one test, named by its group and case, so that a regression names the
input it broke. Tiny random models, the tiny tokenizer and, for the runs, the fake editor of
tests/helpers.py keep the whole catalogue within a minute or two; no organism is loaded.

An answer is *clear* when

* the input is refused with an exception that
  1. was raised by the library's own code, not passed up from inside json, yaml, torch, pandas,
     safetensors or transformers;
  2. is of one of the library's classes (`RecordError`, `EditError`, `CorruptFileError`,
     `RunLockedError`, ...) or exactly `ValueError`, `TypeError`, `FileNotFoundError`, `IndexError` or
     `RuntimeError` (not `KeyError`, whose message is a bare key, nor a parser's subclass such as
     `JSONDecodeError` or `UnicodeDecodeError`);
  3. names what is wrong: its message contains every word the case lists (the file, the record,
     the field or key, the value, the valid choices);
* or, for a damaged cache or state file (which is not the user's mistake), the file is set aside
  or rebuilt: the result equals that of a clean run, and a warning names the file ("recovered");
* or, for a model name, the name is turned into a folder inside its parent ("sanitised").

An input that is neither refused nor recovered from is "accepted!": a defect. A case listed in
`KNOWN_DEFECTS` (its fix lies outside the tests' remit) is an expected failure, and an error once it is
fixed, so that the list is kept honest.

The table of docs/bad_inputs.md (every case's answer) is written by running this whole file with
WILKE_BAD_INPUTS_DOC=1:

    WILKE_BAD_INPUTS_DOC=1 nice -n 19 .venv/bin/python -m pytest -q tests/test_bad_inputs.py
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import random
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from unittest import mock

import pandas as pd
import pytest
import torch
from helpers import SUBJECTS, FakeEditor, FakeHParams, fake_config, fake_run, kill_at, make_records, numbers_differ
from helpers import Kill
from safetensors.torch import save_file
from tiny import tiny_model_for

from wilke_lib import code_version, editing, experiments, lifelong, models, profiles, results, second_moments as stats
from wilke_lib.arch import ModelAdapter
from wilke_lib.counterfact import load_counterfact
from wilke_lib.hparams import FTHParams, MEMITHParams, WilKEHParams, ROMEHParams, hparams_from_file, load_hparams
from wilke_lib.lifelong import CheckpointPolicy, LifelongConfig, load_run, run_dir, run_lifelong
from wilke_lib.lifelong.store import writer_lock

REPO_ROOT = Path(__file__).resolve().parents[1]
PACKAGE = REPO_ROOT / "wilke_lib"
DOC = REPO_ROOT / "docs" / "bad_inputs.md"
DOC_COMMAND = "WILKE_BAD_INPUTS_DOC=1 nice -n 19 .venv/bin/python -m pytest -q tests/test_bad_inputs.py"
HAND_WRITTEN = "<!-- Everything below this line is written by hand: the table above is generated. -->"

KNOWN_DEFECTS: dict[str, str] = {}
"""Cases that are not clear today, with where the fix belongs (files outside the tests' remit)."""

ALLOWED = (ValueError, TypeError, FileNotFoundError, IndexError, RuntimeError)


class Accepted(Exception):
    """Raised by a case when the library went on with the bad input (or used a bad file)."""


# ---------------------------------------------------------------------------------------- catalogue
@dataclass(frozen=True)
class Case:
    kind: str
    name: str
    run: Callable[["Fixtures", Path], str | None]
    words: tuple[str, ...] = ()
    expect: str = "error"  # "error", "recover" (a damaged file) or "sanitise" (a model name)


@dataclass
class Outcome:
    kind: str
    case: str
    verdict: str  # "clear error", "unclear error", "recovered", "recovered silently", "sanitised", "accepted!"
    exception: str
    message: str
    clear: bool
    seconds: float
    known_defect: str | None = None


CASES: list[Case] = []


def case(kind: str, name: str, *words: str, expect: str = "error"):
    def register(fn: Callable[["Fixtures", Path], str | None]) -> Callable[["Fixtures", Path], str | None]:
        add(kind, name, fn, *words, expect=expect)
        return fn
    return register


def add(kind: str, name: str, fn: Callable[["Fixtures", Path], str | None], *words: str, expect: str = "error") -> None:
    if any(c.name == name for c in CASES):
        raise ValueError(f"two cases called {name!r}")
    CASES.append(Case(kind, name, fn, tuple(words), expect))


# ---------------------------------------------------------------------------------------- fixtures
def _refuse_to_start(model: Any, tok: Any, hparams: Any, cache: Any) -> Any:
    raise Accepted("the run started with this input (its first edit was about to be made)")


def garbage(n: int) -> bytes:
    """n bytes of noise, the same on every run (so that the table's messages are too)."""
    return random.Random(n).randbytes(n)


RUN = dict(toxicity_layers=(1,))
"""The fake runs of the catalogue: `helpers.fake_config`'s settings, toxicity snapshots of layer 1."""


@dataclass
class Fixtures:
    """What the cases share: the tiny tokenizer, tiny models, the corpus, the fake runs and the
    undamaged runs they are compared with (tests/conftest.py's `reference_run`)."""

    tok: Any
    corpus: Path
    root: Path
    reference_run: Callable[..., Any]
    records: list[dict] = dataclasses.field(default_factory=lambda: make_records(12))

    def model(self, seed: int = 0) -> torch.nn.Module:
        """A fresh 4-layer GPT-2 (d_model 32, a context of 128 tokens) with random weights."""
        return tiny_model_for(self.tok, seed=seed)

    def model_dir(self) -> Path:
        """A tiny model saved with save_pretrained (tokenizer included)."""
        path = self.root / "tiny-model"
        if not path.exists():
            self.model().save_pretrained(path)
            self.tok.save_pretrained(path)
        return path

    def rome(self, **kw: Any) -> ROMEHParams:
        return ROMEHParams(**{"layer": 1, "context_lengths": [[3, 1]], "v_num_grad_steps": 2,
                              "mom2_corpus": str(self.corpus), "mom2_n_samples": 40, **kw})

    # ---- runs with the fake editor
    def run_config(self, out: Path, **kw: Any) -> LifelongConfig:
        return fake_config(out, **{**RUN, **kw})

    def run(self, out: Path, on_step: Callable[[int, dict], None] | None = None, **kw: Any) -> lifelong.RunResult:
        return fake_run(out, self.tok, self.records, on_step=on_step, **{**RUN, **kw})

    def killed_run(self, out: Path, step: int, **kw: Any) -> Path:
        """The folder of a run killed after `step` (its state saved at step - 1)."""
        try:
            self.run(out, on_step=kill_at(step), **kw)
        except Kill:
            pass
        return run_dir(out, self.run_config(out, **kw), self.records)

    def same_as_reference(self, result: lifelong.RunResult, **kw: Any) -> str:
        """Accepted unless `result` has the reference's rows, checkpoints, final metrics and snapshots."""
        problems = numbers_differ(result, self.reference_run(self.records, **{**RUN, **kw}))
        if problems:
            raise Accepted("; ".join(problems))
        return "same numbers as an undamaged run"


# ---------------------------------------------------------------------------------------- records files
def _start_run(fx: Fixtures, tmp: Path, records: list[dict], n_edits: int = 2) -> None:
    """What a user does with loaded records: a lifelong run (ROME, default backend), stopped before
    its first edit if nothing refused the records. (Seed 10 shuffles 4 records in reverse: an error
    must give a record's number in the file, not in the shuffled list.)"""
    backend = dataclasses.replace(lifelong.default_backend(), prepare=_refuse_to_start)
    config = LifelongConfig(model_name="tiny-gpt2", editor="rome", hparams=fx.rome(), n_edits=n_edits, seed=10,
                            out_dir=str(tmp / "runs"), filter_known=False)
    run_lifelong(fx.model(), fx.tok, records, config, backend=backend)


def _load_and_run(content: bytes | str | list | dict, name: str = "records.json"):
    def run(fx: Fixtures, tmp: Path) -> None:
        path = tmp / name
        if isinstance(content, bytes):
            path.write_bytes(content)
        elif isinstance(content, str):
            path.write_text(content, encoding="utf-8")
        else:
            path.write_text(json.dumps(content), encoding="utf-8")
        _start_run(fx, tmp, load_counterfact(path))
    return run


def _with_broken(mutate: Callable[[dict], Any], n: int = 4) -> list[dict]:
    """n valid records, record #1 (case_id 1) changed by `mutate`."""
    records = make_records(n)
    mutate(records[1])
    return records


def _rw(**changes: Any) -> Callable[[dict], None]:
    return lambda rec: rec["requested_rewrite"].update(changes)


def _target(which: str, **changes: Any) -> Callable[[dict], None]:
    return lambda rec: rec["requested_rewrite"][which].update(changes)


def _pop(*path: str) -> Callable[[dict], None]:
    def mutate(rec: dict) -> None:
        container = rec
        for key in path[:-1]:
            container = container[key]
        container.pop(path[-1])
    return mutate


def _set(key: str, value: Any) -> Callable[[dict], None]:
    return lambda rec: rec.update({key: value})


RW, NEW, TRUE = "requested_rewrite", "requested_rewrite.target_new", "requested_rewrite.target_true"
LONG = " ".join(["very"] * 140)  # longer than the tiny models' 128 positions
MALFORMED_RECORDS: list[tuple[str, Callable[[dict], Any], str]] = [
    ("case_id missing", _pop("case_id"), "case_id"),
    ("case_id a string", _set("case_id", "1"), "case_id"),
    ("case_id true", _set("case_id", True), "case_id"),
    ("case_id NaN", _set("case_id", float("nan")), "case_id"),
    ("case_id duplicated", _set("case_id", 0), "case_id"),
    ("requested_rewrite missing", _pop("requested_rewrite"), RW),
    ("requested_rewrite a list", _set("requested_rewrite", ["The mother tongue of {} is"]), RW),
    ("prompt missing", _pop("requested_rewrite", "prompt"), f"{RW}.prompt"),
    ("prompt a number", _rw(prompt=12), f"{RW}.prompt"),
    ("subject not in the prompt (no {})", _rw(prompt="The mother tongue of Pell Orwin is"), f"{RW}.prompt"),
    ("prompt with two {}", _rw(prompt="{} and {} speak"), f"{RW}.prompt"),
    ("prompt with stray braces", _rw(prompt="The {lang} of {} is"), f"{RW}.prompt"),
    ("prompt empty", _rw(prompt=""), f"{RW}.prompt"),
    ("subject missing", _pop("requested_rewrite", "subject"), f"{RW}.subject"),
    ("subject empty", _rw(subject=""), f"{RW}.subject"),
    ("subject white space only", _rw(subject="  \t"), f"{RW}.subject"),
    ("subject null", _rw(subject=None), f"{RW}.subject"),
    ("relation_id missing", _pop("requested_rewrite", "relation_id"), f"{RW}.relation_id"),
    ("relation_id a number", _rw(relation_id=103), f"{RW}.relation_id"),
    ("target_new missing", _pop("requested_rewrite", "target_new"), NEW),
    ("target_new a plain string", _rw(target_new="French"), NEW),
    ("target_new.str missing", _pop("requested_rewrite", "target_new", "str"), f"{NEW}.str"),
    ("target_new.str empty", _target("target_new", str=""), f"{NEW}.str"),
    ("target_new.str with a leading space", _target("target_new", str=" French"), f"{NEW}.str"),
    ("target_true.str with a trailing newline", _target("target_true", str="Spanish\n"), f"{TRUE}.str"),
    ("target_new.str a list", _target("target_new", str=["French"]), f"{NEW}.str"),
    ("target_new.id missing", _pop("requested_rewrite", "target_new", "id"), f"{NEW}.id"),
    ("target_true.id null", _target("target_true", id=None), f"{TRUE}.id"),
    ("target_new equal to target_true", _target("target_new", str="Spanish"), f"{NEW}.str"),
    ("targets differ only in white space", lambda r: (_target("target_new", str="New  York")(r),
                                                      _target("target_true", str="New York")(r)), f"{NEW}.str"),
    ("paraphrase_prompts missing", _pop("paraphrase_prompts"), "paraphrase_prompts"),
    ("paraphrase_prompts a string", _set("paraphrase_prompts", "Tobin Ash speaks"), "paraphrase_prompts"),
    ("paraphrase_prompts with an empty string", lambda r: r["paraphrase_prompts"].append(""), "paraphrase_prompts[2]"),
    ("paraphrase_prompts with a blank string", lambda r: r["paraphrase_prompts"].insert(0, "   "),
     "paraphrase_prompts[0]"),
    ("paraphrase_prompts with a number", lambda r: r["paraphrase_prompts"].append(7), "paraphrase_prompts[2]"),
    ("neighborhood_prompts null", _set("neighborhood_prompts", None), "neighborhood_prompts"),
    ("neighborhood_prompts with an empty string", lambda r: r["neighborhood_prompts"].append(""),
     "neighborhood_prompts[2]"),
    ("attribute_prompts an object", _set("attribute_prompts", {"0": "x"}), "attribute_prompts"),
    ("generation_prompts with null", _set("generation_prompts", ["Tobin Ash says", None]), "generation_prompts[1]"),
]
for _name, _mutate, _field in MALFORMED_RECORDS:
    add("records file", _name, _load_and_run(_with_broken(_mutate)), "records.json", "#1", f"`{_field}`")

_VALID_TEXT = json.dumps(make_records(4), indent=1)
add("records file", "not JSON at all", _load_and_run("case_id,prompt\n1,The mother tongue of {} is\n"), "records.json",
    "JSON")
add("records file", "truncated JSON", _load_and_run(_VALID_TEXT[: len(_VALID_TEXT) // 2]), "records.json", "JSON")
add("records file", "empty file", _load_and_run(""), "records.json", "JSON")
add("records file", "latin-1 file", _load_and_run(
    json.dumps(_with_broken(_rw(subject="Genève Durn")), ensure_ascii=False).encode("latin-1")),
    "records.json", "UTF-8", "latin")
add("records file", "UTF-16 file", _load_and_run(_VALID_TEXT.encode("utf-16")), "records.json", "UTF-8", "UTF-16")
add("records file", "UTF-8 with a byte-order mark", _load_and_run(b"\xef\xbb\xbf" + _VALID_TEXT.encode()),
    "records.json", "BOM")
add("records file", "one record, not a list", _load_and_run(make_records(1)[0]), "records.json", "list")
add("records file", "a record that is a string", _load_and_run(["The mother tongue of {} is", *make_records(3)]),
    "records.json", "#0", "JSON object")
add("records file", "an empty list", _load_and_run([]), "n_edits", "known records")
add("records file", "fewer records than 2 * n_edits", _load_and_run(make_records(3)), "n_edits", "known records")


@case("records file", "file does not exist", "absent.json", "toy-world")
def _(fx: Fixtures, tmp: Path) -> None:
    load_counterfact(tmp / "absent.json")


@case("records file", "a folder instead of a file", "records.json")
def _(fx: Fixtures, tmp: Path) -> None:
    (tmp / "records.json").mkdir()
    load_counterfact(tmp / "records.json")


DEEP = "[" * 100_000 + "]" * 100_000
"""JSON nested 100,000 deep: json's parser raises RecursionError after about 1,000 levels."""
add("records file", "JSON nested 100,000 deep", _load_and_run(DEEP), "records.json", "nested too deeply")


@case("records file", "a named pipe (FIFO) as the records file", "records.json", "not a regular file", "JSON file")
def _(fx: Fixtures, tmp: Path) -> None:
    os.mkfifo(tmp / "records.json")  # nobody writes to it: a loader that opened it would wait for ever
    load_counterfact(tmp / "records.json")


add("records file", "a character device (/dev/null, like /dev/stdin on a terminal) as the records file",
    lambda fx, tmp: load_counterfact("/dev/null"), "/dev/null", "not a regular file", "JSON file")


# ---------------------------------------------------------------------------------------- records vs. the model
MODEL_LEVEL: list[tuple[str, Callable[[dict], Any], str]] = [
    ("prompt longer than the context", _rw(prompt=f"The {LONG} mother tongue of {{}} is"), f"{RW}.prompt"),
    ("subject longer than the context", _rw(subject=f"Tobin {LONG} Ash"), f"{RW}.prompt"),
    ("target longer than the context", _target("target_new", str=f"French {LONG}"), f"{RW}.prompt"),
    ("a paraphrase longer than the context", lambda r: r["paraphrase_prompts"].append(f"Tobin Ash {LONG} speaks"),
     "paraphrase_prompts[2]"),
    ("a neighbourhood prompt longer than the context",
     lambda r: r["neighborhood_prompts"].insert(0, f"{LONG} Mira speaks"), "neighborhood_prompts[0]"),
]
for _name, _mutate, _field in MODEL_LEVEL:
    add("records vs. the model", _name, _load_and_run(_with_broken(_mutate)), "#1", "case_id 1", f"`{_field}`",
        "context")


def _all(key: str) -> list[dict]:
    records = make_records(4)
    for rec in records:
        rec[key] = []
    return records


add("records vs. the model", "every paraphrase list empty", _load_and_run(_all("paraphrase_prompts")),
    "paraphrase_prompts", "every record")
add("records vs. the model", "every neighbourhood list empty", _load_and_run(_all("neighborhood_prompts")),
    "neighborhood_prompts", "every record")


# ---------------------------------------------------------------------------------------- hyper-parameters
_ROME_YAML = "layer: 1\nv_num_grad_steps: 20\nv_lr: 0.5\nkl_factor: 0.0625\nclamp_norm_factor: 4.0\n" \
             "mom2_n_samples: 100\n"


def _yaml_case(text: str | bytes, editor_folder: str = "rome", name: str = "tiny.yaml", editor: str | None = None):
    def run(fx: Fixtures, tmp: Path) -> None:
        path = tmp / editor_folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(text, bytes):
            path.write_bytes(text)
        else:
            path.write_text(text, encoding="utf-8")
        hparams_from_file(path, editor)
    return run


def _rome_with(line: str) -> str:
    """The base ROME YAML with one key replaced (or added)."""
    key = line.split(":")[0]
    kept = [l for l in _ROME_YAML.splitlines() if not l.startswith(key + ":")]
    return "\n".join(kept + [line]) + "\n"


HPARAM_VALUES = [
    ("mom2_n_samples negative", "mom2_n_samples: -5", "mom2_n_samples", "-5"),
    ("kl_factor negative", "kl_factor: -0.1", "kl_factor", "-0.1"),
    ("v_lr NaN", "v_lr: .nan", "v_lr", "nan"),
    ("v_lr a word", "v_lr: fast", "v_lr", "fast"),
    ("clamp_norm_factor null", "clamp_norm_factor: null", "clamp_norm_factor", "None"),
    ("v_num_grad_steps a quoted number", 'v_num_grad_steps: "40"', "v_num_grad_steps", "'40'"),
    ("v_num_grad_steps true", "v_num_grad_steps: true", "v_num_grad_steps", "True"),
    ("v_num_grad_steps zero", "v_num_grad_steps: 0", "v_num_grad_steps", "0"),
    ("mom2_ridge infinite", "mom2_ridge: .inf", "mom2_ridge", "inf"),
    ("layer negative", "layer: -1", "layer", "-1"),
    ("layer a string", 'layer: "5"', "layer", "'5'"),
    ("unknown key (a typo)", "v_lrr: 0.5", "v_lrr", "valid keys"),
    ("fact_token not a choice", "fact_token: first", "fact_token", "subject_last"),
    ("update_form not a choice", "update_form: rrome", "update_form", "r-rome"),
    ("context_lengths not pairs", "context_lengths: [5, 10]", "context_lengths", "[length, count]"),
    ("essence_template without {}", "essence_template: is a", "essence_template", "{}"),
    ("mom2_dtype not a choice", "mom2_dtype: float8", "mom2_dtype", "float32"),
]
for _name, _line, *_words in HPARAM_VALUES:
    add("hyper-parameters", _name, _yaml_case(_rome_with(_line)), "tiny.yaml", *_words)

add("hyper-parameters", "required key missing (ROME without layer)",
    _yaml_case("\n".join(l for l in _ROME_YAML.splitlines() if not l.startswith("layer:"))), "tiny.yaml", "layer")
add("hyper-parameters", "MEMIT layers decreasing", _yaml_case("layers: [3, 1]\n", "memit"), "tiny.yaml", "layers")
add("hyper-parameters", "MEMIT layers an unparsable range", _yaml_case("layers: 1..x\n", "memit"), "tiny.yaml",
    "layers", "1..x")
add("hyper-parameters", "WilKE candidate_layers an empty range", _yaml_case("candidate_layers: 5..2\n", "wilke"),
    "tiny.yaml", "candidate_layers")
add("hyper-parameters", "KN threshold above 1", _yaml_case("threshold: 1.5\n", "kn"), "tiny.yaml", "threshold")
add("hyper-parameters", "FT lr zero", _yaml_case("layer: 1\nlr: 0\n", "ft"), "tiny.yaml", "lr")
add("hyper-parameters", "file's editor is not the one asked for", _yaml_case("editor: rome\n" + _ROME_YAML, editor="memit"),
    "tiny.yaml", "rome", "memit")
add("hyper-parameters", "editor cannot be told", _yaml_case(_ROME_YAML, "settings"), "tiny.yaml", "editor", "rome")
add("hyper-parameters", "a list, not a mapping", _yaml_case("- layer: 1\n"), "tiny.yaml", "mapping")
add("hyper-parameters", "YAML syntax error", _yaml_case("layer: [1, 2\nv_lr: 0.5\n"), "tiny.yaml", "YAML")
add("hyper-parameters", "JSON file that is not JSON", _yaml_case("{'layer': 1,}", name="tiny.json"), "tiny.json",
    "JSON")
add("hyper-parameters", "latin-1 YAML", _yaml_case("layer: 1\nessence_template: \"{} est né à\"\n".encode("latin-1")),
    "tiny.yaml", "UTF-8")
add("hyper-parameters", "hyper-parameter file does not exist", lambda fx, tmp: hparams_from_file(tmp / "absent.yaml"),
    "absent.yaml")
add("hyper-parameters", "load_hparams: unknown editor", lambda fx, tmp: load_hparams("romeo", "toy-gpt2"),
    "romeo", "rome", "memit")
add("hyper-parameters", "load_hparams: no file for the model", lambda fx, tmp: load_hparams("rome", "gpt3"),
    "gpt3", "toy-gpt2")


@case("hyper-parameters", "lifelong config: editor memit with ROME's hyper-parameters", "memit", "rome")
def _(fx: Fixtures, tmp: Path) -> None:
    config = LifelongConfig(model_name="tiny-gpt2", editor="memit", hparams=fx.rome(), n_edits=2,
                            out_dir=str(tmp / "runs"), filter_known=False)
    backend = dataclasses.replace(lifelong.default_backend(), prepare=_refuse_to_start)
    run_lifelong(fx.model(), fx.tok, make_records(4), config, backend=backend)


# ---------------------------------------------------------------------------------------- edit requests
def _empty_file(path: Path) -> Path:
    path.write_text("\n\n")
    return path


_FAST_DELTA = {"context_lengths": [[3, 1]], "v_num_grad_steps": 2}
REQUEST = {"prompt": "The mother tongue of {} is", "subject": "Mira Quell", "relation_id": "P103",
           "target_new": {"str": "French", "id": "Q1"}, "target_true": {"str": "Welsh", "id": "Q2"}}


def _edit_case(request: dict, hparams: Callable[[Fixtures], Any] | None = None):
    def run(fx: Fixtures, tmp: Path) -> None:
        model = fx.model()
        cache = editing.EditCache.for_model(model, stats_dir=tmp / "stats")
        editing.edit(model, fx.tok, request, hparams(fx) if hparams else fx.rome(), cache=cache)
        raise Accepted("the edit was made")
    return run


add("edit requests", "subject not in the prompt", _edit_case({**REQUEST, "prompt": "The mother tongue of Tobin Ash is"}),
    "Mira Quell", "prompt")
add("edit requests", "empty target_new", _edit_case({**REQUEST, "target_new": {"str": " ", "id": "Q1"}}), "target_new")
add("edit requests", "request without a prompt", _edit_case({k: v for k, v in REQUEST.items() if k != "prompt"}),
    "prompt")
add("edit requests", "ROME layer beyond the model", _edit_case(REQUEST, lambda fx: fx.rome(layer=9)), "layer 9",
    "4-layer")
add("edit requests", "MEMIT layers beyond the model",
    _edit_case(REQUEST, lambda fx: MEMITHParams(layers=[2, 7], **_FAST_DELTA, mom2_corpus=str(fx.corpus),
                                                mom2_n_samples=40)),
    "layer 7", "4-layer")
add("edit requests", "WilKE candidate layers beyond the model",
    _edit_case(REQUEST, lambda fx: WilKEHParams(candidate_layers=[0, 9], **_FAST_DELTA, mom2_corpus=str(fx.corpus),
                                                mom2_n_samples=40)),
    "candidate layers", "[9]", "4-layer")
add("edit requests", "statistics corpus that does not exist",
    _edit_case(REQUEST, lambda fx: fx.rome(mom2_corpus=str(fx.root / "absent.txt"))), "absent.txt")
add("edit requests", "statistics corpus that is empty",
    _edit_case(REQUEST, lambda fx: fx.rome(mom2_corpus=str(_empty_file(fx.root / "empty.txt")))), "empty.txt", "no texts")
add("edit requests", "FT with a learning rate that overflows",
    _edit_case(REQUEST, lambda fx: FTHParams(layer=1, lr=1e38, norm_constraint=1e38, steps=3)), "FT")


# ---------------------------------------------------------------------------------------- lifelong configurations
@dataclass(frozen=True)
class Later:
    """A setting built when the case runs (building it may be what fails)."""

    build: Callable[[], Any]


def _config_case(records: Callable[[Path], Any] = lambda tmp: make_records(8), **kw: Any):
    def run(fx: Fixtures, tmp: Path) -> None:
        settings = {"model_name": "tiny-gpt2", "editor": "rome", "hparams": fx.rome(), "n_edits": 2,
                    "out_dir": str(tmp / "runs"), "filter_known": False, **kw}
        if settings["hparams"] == "none":
            settings["hparams"] = None
        settings = {k: v.build() if isinstance(v, Later) else v for k, v in settings.items()}
        config = LifelongConfig(**settings)
        backend = dataclasses.replace(lifelong.default_backend(), prepare=_refuse_to_start)
        run_lifelong(fx.model(), fx.tok, records(tmp), config, backend=backend)
    return run


def _records_file(tmp: Path) -> str:
    path = tmp / "records.json"
    path.write_text(json.dumps(make_records(8)), encoding="utf-8")
    return str(path)


add("lifelong config", 'n_edits "four"', _config_case(n_edits="four"), "n_edits", "'four'")
add("lifelong config", 'seed "9"', _config_case(seed="9"), "seed", "'9'")
add("lifelong config", "seed 9.0", _config_case(seed=9.0), "seed", "9.0")
add("lifelong config", "n_edits 2.5", _config_case(n_edits=2.5), "n_edits", "2.5")
add("lifelong config", "n_edits 0", _config_case(n_edits=0), "n_edits")
add("lifelong config", "n_edits negative", _config_case(n_edits=-3), "n_edits", "-3")
add("lifelong config", "save_every 0", _config_case(save_every=0), "save_every")
add("lifelong config", 'eval_batch_size "64"', _config_case(eval_batch_size="64"), "eval_batch_size")
add("lifelong config", "n_edits above half the records", _config_case(n_edits=5), "n_edits", "known records")
add("lifelong config", "unknown editor, shipped hyper-parameters", _config_case(editor="romeo", hparams="none"),
    "romeo", "rome")
add("lifelong config", "unknown editor, ROME's hyper-parameters", _config_case(editor="romeo"), "romeo", "rome")
add("lifelong config", "hyper-parameters of a model with no file", _config_case(hparams="gpt3"), "gpt3", "toy-gpt2")
add("lifelong config", "checkpoints every 0 steps", _config_case(checkpoints=Later(lambda: CheckpointPolicy(multiple_of=0))),
    "multiple_of", "0")
add("lifelong config", "toxicity layer beyond the model", _config_case(toxicity_layers=(9,)), "toxicity", "[9]",
    "4-layer")
add("lifelong config", "toxicity_layers 1 (not a tuple)", _config_case(toxicity_layers=1), "toxicity_layers", "1")
add("lifelong config", "records given as a file name, not loaded", _config_case(records=_records_file), "records",
    "load_counterfact")
add("lifelong config", 'model name ".."', _config_case(model_name=".."), "'..'")


# ---------------------------------------------------------------------------------------- notebook parameters
def _notebook_03(**params: Any):
    """The parameters cell and the first cell of notebooks/03_lifelong.ipynb, run until the runs would
    start (`lifelong.run_many` is replaced by a stop, so that no organism is loaded)."""
    def run(fx: Fixtures, tmp: Path) -> None:
        p = {"model_name": "toy-gpt2", "profile": "quick", "records": _records_file(tmp), "n_edits": None,
             "seeds": None, "editors": None, **params}
        prof = profiles.get_profile(p["profile"])
        prof = dataclasses.replace(prof, **{k: v for k, v in dict(n_edits=p["n_edits"], seeds=p["seeds"],
                                                                  editors=p["editors"]).items() if v is not None})
        records = load_counterfact(p["records"])
        with mock.patch.object(lifelong, "run_many", side_effect=Accepted("the runs started with these parameters")):
            experiments.run_variants(p["model_name"], records, experiments.editor_variants(tuple(prof.editors)), prof,
                                     out_dir=tmp / "runs")
    return run


add("notebook parameters", 'n_edits = "four"', _notebook_03(n_edits="four"), "n_edits", "four")
add("notebook parameters", "n_edits = 0", _notebook_03(n_edits=0), "n_edits")
add("notebook parameters", "seeds = 9", _notebook_03(seeds=9), "seeds", "9")
add("notebook parameters", 'editors = ("rome", "romeo")', _notebook_03(editors=("rome", "romeo")), "romeo", "wilke")
add("notebook parameters", 'editors = "rome" (a string)', _notebook_03(editors="rome"), "editors", "tuple")
add("notebook parameters", 'profile = "quik"', _notebook_03(profile="quik"), "quik", "quick", "default")
add("notebook parameters", 'model_name = "toy-gpt3"', _notebook_03(model_name="toy-gpt3"), "toy-gpt3", "toy-gpt2")
add("notebook parameters", 'records = "toy_world"', _notebook_03(records="toy_world"), "toy_world", "toy-world")


@case("notebook parameters", "editors without wilke, then notebook 03's improvement", "WilKE")
def _(fx: Fixtures, tmp: Path) -> None:
    ours = pd.DataFrame({"editor": ["ROME", "MEMIT"], "S": [12.0, 20.0]})  # experiments.table of a run without WilKE
    experiments.wilke_improvement(ours)


# ---------------------------------------------------------------------------------------- model names
def _offline(name: str):
    def run(fx: Fixtures, tmp: Path) -> None:
        start = time.perf_counter()
        try:
            with mock.patch.dict(os.environ, {"HF_HUB_OFFLINE": "1"}):
                models.load_model(name, device="cpu")
        finally:
            if time.perf_counter() - start > 5:
                raise Accepted(f"it took {time.perf_counter() - start:.0f} s to fail")
    return run


add("model names", "mistyped hub name, offline", _offline("gtp2-xl"), "gtp2-xl", "toy-gpt2", "HF_HUB_OFFLINE")
add("model names", "mistyped organism name, offline", _offline("toy-gtp2"), "toy-gtp2", "toy-gpt2")
add("model names", 'load_model("..")', lambda fx, tmp: models.load_model("..", device="cpu"), "'..'", "config.json")


@case("model names", "an empty folder as the model", "empty-model", "config.json")
def _(fx: Fixtures, tmp: Path) -> None:
    (tmp / "empty-model").mkdir()
    models.load_model(tmp / "empty-model", device="cpu")


@case("model names", "a model folder whose config.json is truncated", "config.json")
def _(fx: Fixtures, tmp: Path) -> None:
    folder = tmp / "model"
    fx.model().save_pretrained(folder)
    text = (folder / "config.json").read_text()
    (folder / "config.json").write_text(text[: len(text) // 2])
    models.load_model(folder, device="cpu")


@case("model names", "a model folder whose weights are truncated", "/model", "save_pretrained")
def _(fx: Fixtures, tmp: Path) -> None:
    folder = tmp / "model"
    fx.model().save_pretrained(folder)
    fx.tok.save_pretrained(folder)
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])
    models.load_model(folder, device="cpu")


@case("model names", "a model folder without its tokenizer", "/model", "tokenizer")
def _(fx: Fixtures, tmp: Path) -> None:
    fx.model().save_pretrained(tmp / "model")
    models.load_model(tmp / "model", device="cpu")


add("model names", 'dtype "fp8"', lambda fx, tmp: models.load_model(fx.model_dir(), device="cpu", dtype="fp8"),
    "fp8", "float32")
add("model names", 'results_dir("..")', lambda fx, tmp: results.results_dir(".."), "'..'")
add("model names", 'lifelong_dir("../..")', lambda fx, tmp: lifelong.lifelong_dir("../.."), "'../..'")
add("model names", "empty model name", lambda fx, tmp: results.figures_dir(""), "model name")


def _inside(where: Callable[[str], Path], name: str, root_variable: str):
    def run(fx: Fixtures, tmp: Path) -> str:
        path, root = where(name).resolve(), Path(os.environ[root_variable]).resolve()
        if not path.is_relative_to(root):
            raise Accepted(f"{name!r} escaped to {path}")
        return f"-> {path.relative_to(root)}"
    return run


add("model names", 'path traversal "../../outside" (results)', _inside(results.results_dir, "../../outside",
                                                                       "WILKE_RESULTS_DIR"), expect="sanitise")
add("model names", 'absolute path "/etc" (runs)', _inside(results.runs_dir, "/etc", "WILKE_RUNS_DIR"), expect="sanitise")
add("model names", 'backslashes "..\\..\\x" (figures)', _inside(results.figures_dir, "..\\..\\x", "WILKE_FIGURES_DIR"),
    expect="sanitise")


@case("model names", 'run folder of model "../../x"', expect="sanitise")
def _(fx: Fixtures, tmp: Path) -> str:
    base = tmp / "runs"
    path = run_dir(base, fx.run_config(base, model_name="../../x"), fx.records).resolve()
    if not path.is_relative_to(base.resolve()):
        raise Accepted(f"the run folder escaped to {path}")
    return f"-> {path.relative_to(base.resolve())}"


@case("model names", "a model folder with a 240-character name (run with the known-records filter)", expect="sanitise")
def _(fx: Fixtures, tmp: Path) -> str:
    folder = tmp / ("m" * 240)
    fx.model().save_pretrained(folder)
    fx.tok.save_pretrained(folder)
    config = fx.run_config(tmp / "runs", model_name=str(folder), filter_known=True)
    result = run_lifelong(fx.model(), fx.tok, fx.records, config, backend=FakeEditor().backend())
    names = [p.name for p in tmp.rglob("*") if p != folder]
    longest = max(names, key=lambda n: len(n.encode()))
    return f"ran; run folder {result.run_dir.name[:24]}… ({len(result.run_dir.name)} bytes), longest file name " \
           f"{len(longest.encode())} bytes (`bounded_name`: a prefix and a hash)"


# ---------------------------------------------------------------------------------------- cache and state files
STATS_FILE = "layer1_n40.safetensors"


def _stats_case(damage: Callable[[Fixtures, Path, Path], None]):
    """Damage the cached statistics of layer 1, then ask for them: they must equal a clean computation."""
    def run(fx: Fixtures, tmp: Path) -> str:
        model = fx.model()
        path = stats.stats_path(models.model_identity(model), str(fx.corpus), 1, 40, tmp / "stats")
        path.parent.mkdir(parents=True, exist_ok=True)
        damage(fx, tmp, path)
        got = stats.second_moment(model, fx.tok, 1, str(fx.corpus), 40, cache_dir=tmp / "stats", progress=False)
        clean = stats.second_moment(model, fx.tok, 1, str(fx.corpus), 40, cache_dir=tmp / "clean", progress=False)
        if (tmp / "ran").exists():
            raise Accepted("loading the file ran code from it")
        if not torch.equal(got, clean):
            raise Accepted("the damaged statistics were used")
        return "recomputed"
    return run


def _clean_stats(fx: Fixtures, tmp: Path, layer: int = 1, seed: int = 0) -> Path:
    model = fx.model(seed)
    stats.second_moment(model, fx.tok, layer, str(fx.corpus), 40, cache_dir=tmp / f"other{seed}", progress=False)
    return stats.stats_path(models.model_identity(model), str(fx.corpus), layer, 40, tmp / f"other{seed}")


def _resave(source: Path, target: Path, change: Callable[[torch.Tensor], torch.Tensor]) -> None:
    """Write `source`'s tensors, changed, with its metadata, to `target`."""
    from safetensors import safe_open

    with safe_open(str(source), framework="pt") as fh:
        meta, tensors = fh.metadata(), {name: change(fh.get_tensor(name)) for name in fh.keys()}
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(target), metadata=meta)


class _RunsCode:
    """Unpickling this touches a marker file: the proof that a loader ran code from a file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return Path.touch, (self.marker,)


def _nan_first(t: torch.Tensor) -> torch.Tensor:
    t = t.clone()
    if t.is_floating_point():
        t.view(-1)[0] = float("nan")
    return t


add("cache and state files", "statistics truncated",
    _stats_case(lambda fx, tmp, p: p.write_bytes(_clean_stats(fx, tmp).read_bytes()[:200])), STATS_FILE,
    expect="recover")
add("cache and state files", "statistics garbage", _stats_case(lambda fx, tmp, p: p.write_bytes(garbage(4000))),
    STATS_FILE, expect="recover")
add("cache and state files", "statistics of another layer copied over",
    _stats_case(lambda fx, tmp, p: p.write_bytes(_clean_stats(fx, tmp, layer=2).read_bytes())), STATS_FILE, "layer",
    expect="recover")
add("cache and state files", "statistics of another model copied over",
    _stats_case(lambda fx, tmp, p: p.write_bytes(_clean_stats(fx, tmp, seed=1).read_bytes())), STATS_FILE, "model_key",
    expect="recover")
add("cache and state files", "statistics with a NaN inside",
    _stats_case(lambda fx, tmp, p: _resave(_clean_stats(fx, tmp), p, _nan_first)), STATS_FILE, "finite",
    expect="recover")
add("cache and state files", "statistics of another shape, right metadata",
    _stats_case(lambda fx, tmp, p: _resave(_clean_stats(fx, tmp), p, lambda t: torch.eye(5))), STATS_FILE, "shape",
    expect="recover")
add("cache and state files", "statistics file is a pickle that runs code",
    _stats_case(lambda fx, tmp, p: torch.save(_RunsCode(tmp / "ran"), p)), STATS_FILE, expect="recover")


def _resumed(damage: Callable[[Fixtures, Path, Path], None], kill: int = 4, **config: Any):
    """A run killed after step `kill` (state at kill - 1), damaged, resumed: it must give the numbers
    of an undamaged run."""
    def run(fx: Fixtures, tmp: Path) -> str:
        rdir = fx.killed_run(tmp / "runs", kill, **config)
        damage(fx, tmp, rdir)
        return fx.same_as_reference(fx.run(tmp / "runs", **config), **config)
    return run


def _finished(damage: Callable[[Fixtures, Path, Path], None]):
    """A finished run, damaged, asked for again: read back, recomputed or refused clearly."""
    def run(fx: Fixtures, tmp: Path) -> str:
        fx.run(tmp / "runs")
        damage(fx, tmp, run_dir(tmp / "runs", fx.run_config(tmp / "runs"), fx.records))
        return fx.same_as_reference(fx.run(tmp / "runs"))
    return run


def _other_run_file(name: str):
    def damage(fx: Fixtures, tmp: Path, rdir: Path) -> None:
        other = fx.killed_run(tmp / "other", 4, seed=10)
        (rdir / name).write_bytes((other / name).read_bytes())
    return damage


def _truncate(name: str, keep: float = 0.5):
    def damage(fx: Fixtures, tmp: Path, rdir: Path) -> None:
        data = (rdir / name).read_bytes()
        (rdir / name).write_bytes(data[: int(len(data) * keep)])
    return damage


def _garbage(name: str):
    return lambda fx, tmp, rdir: (rdir / name).write_bytes(garbage(300))


def _drop_row(name: str, step: int):
    def damage(fx: Fixtures, tmp: Path, rdir: Path) -> None:
        lines = (rdir / name).read_text().splitlines()
        (rdir / name).write_text("".join(l + "\n" for l in lines if json.loads(l)["step"] != step))
    return damage


def _garble_row(name: str, step: int):
    def damage(fx: Fixtures, tmp: Path, rdir: Path) -> None:
        lines = (rdir / name).read_text().splitlines()
        (rdir / name).write_text("".join(("{\"step\": 2, \"ES\"" if json.loads(l)["step"] == step else l) + "\n"
                                         for l in lines))
    return damage


add("cache and state files", "state file truncated", _resumed(_truncate("state.safetensors")), "state.safetensors",
    expect="recover")
add("cache and state files", "state file garbage", _resumed(_garbage("state.safetensors")), "state.safetensors",
    expect="recover")
add("cache and state files", "state file of another run", _resumed(_other_run_file("state.safetensors")),
    "state.safetensors", "another run", expect="recover")
add("cache and state files", "state file with a NaN inside",
    _resumed(lambda fx, tmp, rdir: _resave(rdir / "state.safetensors", rdir / "state.safetensors", _nan_first)),
    "state.safetensors", "finite", expect="recover")
add("cache and state files", "toxicity snapshots garbage", _resumed(_garbage("toxicity.safetensors")),
    "toxicity.safetensors", expect="recover")
add("cache and state files", "steps.jsonl with a half-written last line",
    _resumed(lambda fx, tmp, rdir: (rdir / "steps.jsonl").open("a").write('{"step": 5, "ES": 0.')), "steps.jsonl",
    expect="recover")
add("cache and state files", "steps.jsonl with a garbled row", _resumed(_garble_row("steps.jsonl", 2)), "steps.jsonl",
    expect="recover")
add("cache and state files", "a checkpoint row deleted (unfinished run)", _resumed(_drop_row("checkpoints.jsonl", 2)),
    "checkpoints.jsonl", expect="recover")
add("cache and state files", "config.json garbage (unfinished run)", _resumed(_garbage("config.json")), "config.json",
    expect="recover")
add("cache and state files", "config.json of another run (unfinished run)", _resumed(_other_run_file("config.json")),
    expect="recover")
add("cache and state files", "result.json garbage (finished run)", _finished(_garbage("result.json")), "result.json",
    expect="recover")
add("cache and state files", "a checkpoint row deleted (finished run)", _finished(_drop_row("checkpoints.jsonl", 2)),
    "checkpoints.jsonl", expect="recover")
add("cache and state files", "steps.jsonl.gz truncated (finished run)", _finished(_truncate("steps.jsonl.gz")),
    "steps.jsonl.gz", "delete")
add("cache and state files", "config.json garbage (finished run)", _finished(_garbage("config.json")), "config.json",
    "delete")

add("cache and state files", "result.json nested 100,000 deep (finished run)",
    _finished(lambda fx, tmp, rdir: (rdir / "result.json").write_text(DEEP)), "result.json", "nested too deeply",
    expect="recover")
add("cache and state files", "config.json nested 100,000 deep (unfinished run)",
    _resumed(lambda fx, tmp, rdir: (rdir / "config.json").write_text(DEEP)), "config.json", "nested too deeply",
    expect="recover")
add("cache and state files", "steps.jsonl with a row nested 100,000 deep",
    _resumed(lambda fx, tmp, rdir: (rdir / "steps.jsonl").open("a").write(DEEP + "\n")), "steps.jsonl",
    expect="recover")


def _known_case(content: str):
    """The known-record cache of a run's records, damaged, then a run of another seed that reads it."""
    def run(fx: Fixtures, tmp: Path) -> str:
        fx.run(tmp / "runs", filter_known=True)
        (known,) = (tmp / "runs" / "known").glob("*.json")
        known.write_text(content)
        return fx.same_as_reference(fx.run(tmp / "runs", filter_known=True, seed=10), filter_known=True, seed=10)
    return run


add("cache and state files", "known-records cache garbage", _known_case("{\"indices\": [0, 1"), "known", expect="recover")
add("cache and state files", "known-records cache without its list", _known_case('{"indices": 5}'), "known",
    expect="recover")
add("cache and state files", "known-records cache empty (0 bytes)", _known_case(""), "known", expect="recover")
add("cache and state files", "known-records cache with an empty list", _known_case('{"indices": []}'), "known",
    "filtering again", expect="recover")
add("cache and state files", "known-records cache of fewer records", _known_case('{"indices": [0], "n_records": 3}'),
    "known", "other records", expect="recover")


@case("cache and state files", "cached analysis table garbage", "table.json", expect="recover")
def _(fx: Fixtures, tmp: Path) -> str:
    path = tmp / "table.json"
    path.write_bytes(garbage(200))
    frame = results.cached_frame(path, lambda: pd.DataFrame({"layer": [0, 1], "score": [0.5, 0.25]}))
    if list(frame["layer"]) != [0, 1]:
        raise Accepted("the damaged table was used")
    return "recomputed"


# ---------------------------------------------------------------------------------------- runs
@case("runs", "second writer of a run that is being written", "tiny-gpt2__fake", "another process")
def _(fx: Fixtures, tmp: Path) -> None:
    config = fx.run_config(tmp / "runs")
    with writer_lock(run_dir(config.out_dir, config, fx.records)):  # held as another process would
        fx.run(tmp / "runs")


add("runs", "state file ahead of the step rows", _resumed(_drop_row("steps.jsonl", 3)), "state.safetensors",
    expect="recover")
add("runs", "lock file left behind by a killed run", _resumed(lambda fx, tmp, rdir: (rdir / ".lock").touch()),
    expect="recover")


@case("runs", "every edit fails", "tiny-gpt2__fake", "edits failed")
def _(fx: Fixtures, tmp: Path) -> None:
    fx.run(tmp / "runs", hparams=FakeHParams(fail_subjects=tuple(SUBJECTS)))


@case("runs", "load_run of a folder that is not a run", "config.json", "not-a-run")
def _(fx: Fixtures, tmp: Path) -> None:
    (tmp / "not-a-run").mkdir()
    load_run(tmp / "not-a-run")


@case("runs", "a killed run resumed after the library's code changed", "computed up to step", "allow_code_change",
      "0123456789abcdef")
def _(fx: Fixtures, tmp: Path) -> None:
    def code(fingerprint: str) -> Any:  # fixed fingerprints: the table does not change with every edit of the library
        info = {"fingerprint": fingerprint, "git_commit": "x", "git_dirty": False}
        return mock.patch.object(code_version, "current_code", return_value=info)

    with code("fedcba9876543210"):
        fx.killed_run(tmp / "runs", 3)
    with code("0123456789abcdef"):
        fx.run(tmp / "runs")


@case("runs", "a model object edited before its run (weights not those of its files)", "tiny-model", "freshly loaded")
def _(fx: Fixtures, tmp: Path) -> None:
    model, tok = models.load_model(fx.model_dir(), device="cpu")
    with torch.no_grad():
        ModelAdapter(model).out_weight(1)[0, 0] += 1e-3
    run_lifelong(model, tok, fx.records, fx.run_config(tmp / "runs", model_name=str(fx.model_dir())),
                 backend=FakeEditor().backend())


# ---------------------------------------------------------------------------------------- judging
def _raise_site(exc: BaseException) -> Path | None:
    """The file of the innermost Python frame the exception went through (where it was raised)."""
    tb, last = exc.__traceback__, None
    while tb is not None:
        last, tb = tb, tb.tb_next
    return Path(last.tb_frame.f_code.co_filename).resolve() if last is not None else None


def is_clear(exc: BaseException, words: tuple[str, ...]) -> bool:
    """The rule of the module docstring: raised by the library, of an allowed class, naming the words."""
    site = _raise_site(exc)
    own_class = type(exc).__module__.split(".")[0] == "wilke_lib"
    return (site is not None and site.is_relative_to(PACKAGE)
            and (own_class or type(exc) in ALLOWED)
            and all(word in str(exc) for word in words))


class _Warnings(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def _first_line(text: str, tmp: Path) -> str:
    line = next((l for l in str(text).splitlines() if l.strip()), "")
    for folder, name in ((tmp, "<tmp>"), (tmp.parent, "<root>"), (REPO_ROOT, "<repo>"), (REPO_ROOT.parent, "<repo>/..")):
        line = line.replace(str(folder.resolve()), name).replace(str(folder), name)
    return line


def judge(c: Case, fx: Fixtures, tmp: Path) -> Outcome:
    """Run case `c` in the folder `tmp` and judge its answer by the rule of the module docstring."""
    tmp.mkdir(parents=True, exist_ok=True)
    handler = _Warnings()
    library_log = logging.getLogger("wilke_lib")
    library_log.addHandler(handler)
    start = time.perf_counter()
    exc: BaseException | None = None
    note = None
    try:
        note = c.run(fx, tmp)
    except Exception as err:  # noqa: BLE001 - every answer is recorded
        exc = err
    finally:
        library_log.removeHandler(handler)
    seconds = time.perf_counter() - start
    defect = KNOWN_DEFECTS.get(c.name)
    if exc is not None and _raise_site(exc) in TEST_FILES and not isinstance(exc, Accepted):
        raise RuntimeError(f"case {c.name!r} of the catalogue itself failed") from exc
    if isinstance(exc, Accepted):
        return Outcome(c.kind, c.name, "accepted!", "-", _first_line(str(exc), tmp), False, seconds, defect)
    if exc is not None:
        clear = is_clear(exc, c.words)
        return Outcome(c.kind, c.name, "clear error" if clear else "unclear error", type(exc).__name__,
                       _first_line(str(exc), tmp), clear, seconds, defect)
    if c.expect == "error":
        return Outcome(c.kind, c.name, "accepted!", "-", "no error", False, seconds, defect)
    if c.expect == "sanitise":
        return Outcome(c.kind, c.name, "sanitised", "-", _first_line(note or "", tmp), True, seconds, defect)
    named = [m for m in handler.messages if all(word in m for word in c.words)]
    if c.words and not named:
        shown = handler.messages[0] if handler.messages else f"{note} (no warning)"
        return Outcome(c.kind, c.name, "recovered silently", "-", _first_line(shown, tmp), False, seconds, defect)
    shown = named[0] if named else (handler.messages[0] if handler.messages else note or "")
    return Outcome(c.kind, c.name, "recovered", "-", _first_line(shown, tmp), True, seconds, defect)


TEST_FILES = {Path(__file__).resolve(), (Path(__file__).parent / "helpers.py").resolve()}
"""Where an exception means that a case itself is broken, not that the library answered."""

OUTCOMES: dict[str, Outcome] = {}
"""The outcome of every case run in this session, for docs/bad_inputs.md."""


# ---------------------------------------------------------------------------------------- the tests
@pytest.fixture
def fx(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tiny_tokenizer: Any, corpus_file: Path,
       reference_run: Callable[..., Any]) -> Fixtures:
    """The case's fixtures, with every results, runs, figures and cache folder inside its temporary folder;
    the library's warnings only collected (not printed), and no warnings of transformers."""
    for name in ("results", "runs", "figures", "cache"):
        monkeypatch.setenv(f"WILKE_{name.upper()}_DIR", str(tmp_path / "env" / name))
    monkeypatch.setattr(logging.getLogger("wilke_lib"), "propagate", False)
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        yield Fixtures(tiny_tokenizer, corpus_file, tmp_path, reference_run)
    hf_logging.set_verbosity(verbosity)


def test_the_catalogue_covers_every_group_of_bad_input():
    kinds = {c.kind for c in CASES}
    assert kinds == {"records file", "records vs. the model", "hyper-parameters", "edit requests", "lifelong config",
                     "notebook parameters", "model names", "cache and state files", "runs"}
    assert sum(c.kind == "records file" for c in CASES) >= 35
    assert set(KNOWN_DEFECTS) <= {c.name for c in CASES}


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c.kind}: {c.name}")
def test_a_bad_input_gets_a_clear_answer(case: Case, fx: Fixtures, tmp_path: Path):
    outcome = OUTCOMES[case.name] = judge(case, fx, tmp_path / "case")
    described = f"{outcome.verdict}: {outcome.exception}: {outcome.message}"
    if case.name in KNOWN_DEFECTS:
        assert not outcome.clear, f"fixed ({described}): remove {case.name!r} from KNOWN_DEFECTS"
        pytest.xfail(f"known defect, {KNOWN_DEFECTS[case.name]}: {described}")
    assert outcome.clear, described


def test_the_rule_refuses_errors_passed_up_from_a_dependency():
    try:
        json.loads("{")
    except ValueError as err:
        assert not is_clear(err, ())  # a JSONDecodeError from inside json
    try:
        [][0]
    except IndexError as err:
        assert not is_clear(err, ())  # raised here, not by the library
    from wilke_lib.counterfact import validate_record

    with pytest.raises(ValueError) as info:
        validate_record({"case_id": 1}, 3, "records.json")
    assert is_clear(info.value, ("records.json", "#3", "requested_rewrite"))
    assert not is_clear(info.value, ("paraphrase_prompts",))


def test_the_table_of_docs_bad_inputs_md_is_written_on_demand():
    """Runs last (pytest keeps the file's order): with WILKE_BAD_INPUTS_DOC=1 and every case run in this
    session, writes the table of docs/bad_inputs.md above its hand-written part."""
    if not os.environ.get("WILKE_BAD_INPUTS_DOC"):
        pytest.skip("set WILKE_BAD_INPUTS_DOC=1 to write docs/bad_inputs.md")
    missing = [c.name for c in CASES if c.name not in OUTCOMES]
    assert not missing, f"run every case to write the table; missing: {missing[:5]}"
    previous = DOC.read_text(encoding="utf-8") if DOC.is_file() else ""
    kept = previous[previous.index(HAND_WRITTEN):] if HAND_WRITTEN in previous else HAND_WRITTEN + "\n"
    DOC.write_text(markdown([OUTCOMES[c.name] for c in CASES]) + "\n" + kept, encoding="utf-8")


# ---------------------------------------------------------------------------------------- the table
def _cell(text: str, limit: int = 240) -> str:
    text = text if len(text) <= limit else text[: limit - 1] + "…"
    return text.replace("|", "\\|").replace("`", "'")


def summary(outcomes: list[Outcome]) -> str:
    n_clear = sum(o.clear for o in outcomes)
    kinds = list(dict.fromkeys(o.kind for o in outcomes))
    lines = [f"**{n_clear} of {len(outcomes)} kinds of bad input get a clear answer** "
             f"({sum(o.verdict == 'clear error' for o in outcomes)} clear errors, "
             f"{sum(o.verdict == 'recovered' for o in outcomes)} recoveries naming the file, "
             f"{sum(o.verdict == 'sanitised' for o in outcomes)} sanitised names); "
             f"{sum(o.verdict == 'accepted!' for o in outcomes)} accepted, "
             f"{sum(o.verdict in ('unclear error', 'recovered silently') for o in outcomes)} unclear.", "",
             "| group | cases | clear |", "|---|---:|---:|"]
    lines += [f"| {k} | {sum(o.kind == k for o in outcomes)} | {sum(o.clear for o in outcomes if o.kind == k)} |"
              for k in kinds]
    return "\n".join(lines)


def markdown(outcomes: list[Outcome]) -> str:
    header = [
        "# Bad inputs and what the library answers",
        "",
        f"The table is generated by `{DOC_COMMAND}` (the catalogue is `tests/test_bad_inputs.py`, one test per "
        "case, which fails when a case stops being clear). Do not edit it by hand; the part after the table is "
        "hand-written.",
        "",
        "A case is **clear** when the input is refused by an exception raised by the library itself (not "
        "passed up from json, yaml, torch, pandas or transformers), of one of the library's classes or exactly "
        "`ValueError` / `TypeError` / `FileNotFoundError` / `IndexError` / `RuntimeError`, whose message names "
        "what is wrong (the file, the record and field, the key, the value, the choices); or, for a damaged "
        "cache or state file, when the run gives the numbers of an undamaged one and a warning names the file "
        "(*recovered*); or, for a model name, when it becomes a folder inside its parent (*sanitised*). "
        "*accepted!* means the library went on with the bad input. `<tmp>` is the case's temporary folder, "
        "`<root>` the test's.",
        "",
        summary(outcomes),
        "",
    ]
    rows = ["| group | case | answer | exception | message (first line) or warning |", "|---|---|---|---|---|"]
    for o in outcomes:
        verdict = f"**{o.verdict}**" if not o.clear else o.verdict
        if o.known_defect:
            verdict += " (known defect)"
        rows.append(f"| {o.kind} | {_cell(o.case)} | {verdict} | {o.exception} | {_cell(o.message)} |")
    defects = [o for o in outcomes if not o.clear]
    tail = ["", "## Not clear", ""]
    tail += [f"* {o.kind} / {o.case}: {o.verdict}" + (f" — fix belongs in {o.known_defect}" if o.known_defect else "")
             for o in defects] or ["None."]
    return "\n".join(header + rows + tail) + "\n"
