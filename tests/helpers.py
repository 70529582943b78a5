"""What several test modules share (a helper module, not a test module: pytest collects nothing here, and no
test module imports from another one).

* `make_records`: valid CounterFact records about invented people, and `numbered_records`, the lifelong
  tests' records (a numbered subject per record, so that no two records share a fact).
* A lifelong run with a fake editor on a tiny model: `FakeHParams`, `FakeEditor` (a rank-one change of
  mlp_out at layer 1 that depends on the current weights, so that only an exactly carried state
  reproduces a run), `fake_matches`, `fake_config`, `fake_run`, and `same_numbers`, which says whether
  two runs gave the same numbers. tests/conftest.py's `reference_run` computes the undamaged runs.
* `Kill` and `kill_at`: a simulated kill of a run from its `on_step` hook.
* `comeba_hparams` and `logits`: COMEBA-HK's settings on the tiny models, and a batch's logits.
* `papermill_notebook`: a notebook that looks like papermill's output.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from tiny import tiny_model_for
from wilke_lib.arch import ModelAdapter
from wilke_lib.errors import EditError

# ---- records -------------------------------------------------------------------------------------

SUBJECTS = ["Valo Durn", "Mira Quell", "Tobin Ash", "Sela Varn", "Orrin Pike", "Kesta Lum", "Danu Fell",
            "Ilsa Morrow", "Bram Tolle", "Nyra Cask", "Pell Orwin", "Ruan Veck"]
LANGUAGES = ["French", "Welsh", "Dutch", "English", "Spanish", "Norwegian", "Japanese", "Danish"]
MIXED_OBJECTS = ["French", "Welsh", "Paris", "Rome", "Oslo", "physics", "music", "guitar"]


def make_records(n: int) -> list[dict]:
    """n valid CounterFact records about invented people (12 subjects, then they repeat); case_id i is
    record #i, "Mira Quell" is record #1's subject and "Tobin Ash" record #2's."""
    out = []
    for i in range(n):
        subject, other = SUBJECTS[i % len(SUBJECTS)], SUBJECTS[(i + 5) % len(SUBJECTS)]
        out.append({
            "case_id": i,
            "requested_rewrite": {"prompt": "The mother tongue of {} is", "subject": subject, "relation_id": "P103",
                                  "target_new": {"str": LANGUAGES[i % 8], "id": f"Q{i}"},
                                  "target_true": {"str": LANGUAGES[(i + 3) % 8], "id": f"Q{100 + i}"}},
            "paraphrase_prompts": [f"{subject} grew up speaking", f"Ask {subject}, who speaks"],
            "neighborhood_prompts": [f"The mother tongue of {other} is", f"{other} speaks"],
        })
    return out


def numbered_records(n: int) -> list[dict]:
    """The lifelong tests' records: subject "<name> <i>" of 10 names, targets among cities, fields and
    languages, target_true the next object after target_new."""
    subjects = SUBJECTS[:10]
    records = []
    for i in range(n):
        subject = f"{subjects[i % len(subjects)]} {i}"
        other = subjects[(i + 3) % len(subjects)]
        records.append({
            "case_id": i,
            "requested_rewrite": {"prompt": "The mother tongue of {} is", "subject": subject,
                                  "relation_id": "P103",
                                  "target_new": {"str": MIXED_OBJECTS[i % 8], "id": f"n{i}"},
                                  "target_true": {"str": MIXED_OBJECTS[(i + 1) % 8], "id": f"t{i}"}},
            "paraphrase_prompts": [f"{subject} grew up speaking", f"Ask {subject}, who speaks"],
            "neighborhood_prompts": [f"The mother tongue of {other} is", f"{other} speaks"],
        })
    return records


# ---- a lifelong run with a fake editor ------------------------------------------------------------

@dataclass
class FakeHParams:
    """Settings of the fake editor: the size of its change, and subjects it refuses (EditError)."""

    scale: float = 0.5
    fail_subjects: tuple[str, ...] = ()


def _rank_one(model: torch.nn.Module, text: str, scale: float) -> SimpleNamespace:
    """A small rank-one change of mlp_out at layer 1 that depends on the current weights."""
    adapter = ModelAdapter(model)
    v = torch.randn(adapter.d_mlp, generator=torch.Generator().manual_seed(zlib.crc32(text.encode())))
    with torch.no_grad():
        u = torch.tanh(adapter.out_weight(1).float() @ v)
        delta = scale * torch.outer(u, v) / v.norm() ** 2
        adapter.add_to_out_weight(1, delta)
    return SimpleNamespace(layers=[1], weight_deltas={adapter.name_of("mlp_out", 1): delta}, scores=None)


def fake_matches(model: torch.nn.Module, tok: Any, prompts: list[str], targets: list[str],
                 batch_size: int = 64) -> list[bool]:
    """Greedy matching stood in for by a hash that depends on the prompts and on the weights."""
    weights = int(float(ModelAdapter(model).out_weight(1).double().sum()) * 1e6)
    return [(zlib.crc32(f"{p}|{t}".encode()) + weights) % 3 != 0 for p, t in zip(prompts, targets)]


@dataclass
class FakeEditor:
    """The fake editor and known-record filter of a run, counting their calls: `calls` (edits and
    rollbacks), `edits` (edits made), `filters` (known-record filterings). The filter keeps the first
    `known_limit` records (all of them when None)."""

    known_limit: int | None = None
    calls: int = 0
    edits: int = 0
    filters: int = 0

    def edit(self, model: torch.nn.Module, tok: Any, request: dict, hparams: FakeHParams) -> SimpleNamespace:
        if request["subject"] in hparams.fail_subjects:
            raise EditError(f"the fake editor refuses {request['subject']!r}")
        self.calls += 1
        self.edits += 1
        return _rank_one(model, request["subject"] + request["target_new"]["str"], hparams.scale)

    def rollback(self, model: torch.nn.Module, tok: Any, request: dict, hparams: FakeHParams,
                 previous: Any) -> SimpleNamespace:
        self.calls += 1
        return _rank_one(model, request["subject"] + request["target_new"]["str"], -0.9 * hparams.scale)

    def known(self, model: Any, tok: Any, records: list[dict], batch_size: int = 64) -> list[dict]:
        self.filters += 1
        return list(records if self.known_limit is None else records[:self.known_limit])

    def backend(self):
        from wilke_lib.lifelong import Backend

        return Backend(edit=self.edit, rollback=self.rollback, matches=fake_matches, known=self.known,
                       edit_error=EditError)


def fake_config(out_dir: str | Path, **changes: Any):
    """The LifelongConfig of a fake run: 5 edits, seed 9, no known-record filter, unless `changes` say otherwise."""
    from wilke_lib.lifelong import LifelongConfig

    settings = dict(model_name="tiny-gpt2", editor="fake", hparams=FakeHParams(), n_edits=5, seed=9,
                    out_dir=str(out_dir), eval_batch_size=8, filter_known=False)
    return LifelongConfig(**{**settings, **changes})


def fake_run(out_dir: str | Path, tok: Any, records: list[dict], *, editor: FakeEditor | None = None,
             model: torch.nn.Module | None = None, on_step: Any = None, **changes: Any):
    """A lifelong run of the fake editor on a fresh tiny GPT-2 (or `model`); `changes` go to `fake_config`."""
    from wilke_lib.lifelong import run_lifelong

    model = model if model is not None else tiny_model_for(tok)
    return run_lifelong(model, tok, records, fake_config(out_dir, **changes), backend=(editor or FakeEditor()).backend(),
                        on_step=on_step)


def numbers_differ(result: Any, reference: Any) -> list[str]:
    """What differs between two runs' numbers: step rows (timings aside), checkpoints, final metrics,
    toxicity snapshots. Empty when they agree."""
    from wilke_lib.lifelong import toxicity_snapshots

    clean = lambda df: df.drop(columns=[c for c in df.columns if c.endswith("_seconds")])  # noqa: E731
    problems = []
    if not clean(result.steps).equals(clean(reference.steps)):
        problems.append(f"step rows differ ({list(result.steps.get('step', []))})")
    if not result.checkpoints.equals(reference.checkpoints):
        problems.append(f"checkpoints differ (steps {list(result.checkpoints.get('step', []))} instead of "
                        f"{list(reference.checkpoints['step'])})")
    if result.final != reference.final:
        problems.append(f"final metrics differ ({result.final} vs {reference.final})")
    mine, theirs = toxicity_snapshots(result), toxicity_snapshots(reference)
    if sorted(mine) != sorted(theirs) or any(not torch.equal(mine[s][l], theirs[s][l])
                                             for s in theirs for l in theirs[s] if s in mine and l in mine[s]):
        problems.append(f"toxicity snapshots differ (steps {sorted(mine)} instead of {sorted(theirs)})")
    return problems


def same_numbers(result: Any, reference: Any) -> None:
    """Assert that two runs gave the same numbers (`numbers_differ`)."""
    problems = numbers_differ(result, reference)
    assert not problems, "; ".join(problems)


class Kill(RuntimeError):
    """A simulated kill of a run, from its `on_step` hook."""


def kill_at(step: int):
    """An `on_step` hook that kills the run after `step` (its state saved at step - 1)."""
    def hook(s: int, row: dict) -> None:
        if s == step:
            raise Kill(f"killed after step {s}")
    return hook


# ---- COMEBA-HK on the tiny models ---------------------------------------------------------------------

def comeba_hparams(corpus_file: Path, **kw: Any):
    """COMEBA-HK at layers 1 and 2 of a tiny model, C from tests/conftest.py's corpus."""
    from wilke_lib.hparams import COMEBAHKHParams

    return COMEBAHKHParams(layers=[1, 2], mom2_update_weight=50.0, context_lengths=[[5, 3]],
                           mom2_corpus=str(corpus_file), mom2_n_samples=800, mom2_batch_size=128, **kw)


def logits(model: torch.nn.Module, tok: Any, texts: list[str]) -> torch.Tensor:
    """The logits of `texts`, right-padded into one batch."""
    batch = tok(texts, return_tensors="pt", padding=True)
    with torch.no_grad():
        return model(**batch).logits


# ---- notebooks -----------------------------------------------------------------------------------

def papermill_notebook(model_name: str, heading: str, executed_cell):
    """A notebook that looks like papermill's output: a heading, the source's defaults cell, the
    injected parameters (profile "quick") and one executed cell."""
    import nbformat

    nb = nbformat.v4.new_notebook()
    params = nbformat.v4.new_code_cell('model_name = "toy-gpt2"\nprofile = "default"')
    params.metadata["tags"] = ["parameters"]
    injected = nbformat.v4.new_code_cell(f'# Parameters\nmodel_name = "{model_name}"\nprofile = "quick"\n')
    injected.metadata["tags"] = ["injected-parameters"]
    nb.cells = [nbformat.v4.new_markdown_cell(heading), params, injected, executed_cell]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    return nb
