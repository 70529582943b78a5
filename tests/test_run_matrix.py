"""`make runs`: the run matrix, recomputation of a deleted run to identical numbers, submitit's local executor."""

from __future__ import annotations

import json
import shutil

import pytest

from wilke_lib import models
from wilke_lib.run_matrix import RunSpec, paper_matrix, run_dir_of, run_matrix, steps_done
from wilke_lib.counterfact import load_counterfact

ORGANISM = "toy-gpt2"
pytestmark = pytest.mark.skipif(not (models.ORGANISMS_DIR / ORGANISM / "config.json").is_file(),
                                reason=f"organism {ORGANISM!r} not built")


def test_paper_matrix_has_three_seeds_for_the_closed_form_editors():
    specs = paper_matrix(["toy-gpt2", "toy-gptj"], "paper")
    seeds = {(s.model_name, s.editor): [] for s in specs}
    for s in specs:
        seeds[(s.model_name, s.editor)].append(s.seed)
    assert seeds[("toy-gpt2", "rome")] == [9, 10, 11] and seeds[("toy-gptj", "wilke")] == [9, 10, 11]
    assert seeds[("toy-gpt2", "ft")] == [9] and all(s.n_edits == 1024 for s in specs)
    # a partial matrix is most useful when Table 1's first seed comes first
    assert [(s.editor, s.seed) for s in specs[:3]] == [("rome", 9), ("memit", 9), ("wilke", 9)]
    assert {s.editor for s in specs[-16:]} <= {"ft", "ke", "kn", "mend", "r-rome", "alphaedit", "comeba_hk", "lemoe"}


def test_paper_matrix_keeps_the_seeds_asked_for_and_rejects_foreign_ones():
    specs = paper_matrix(["toy-gptj"], "paper", ["rome", "ft"], seeds=[9])
    assert [(s.editor, s.seed) for s in specs] == [("rome", 9), ("ft", 9)]
    assert {s.seed for s in paper_matrix(["toy-gptj"], "paper", ["rome", "ft"], seeds=[10])} == {10}
    with pytest.raises(ValueError, match="seeds \\[12\\] are not in profile 'paper'"):
        paper_matrix(["toy-gptj"], "paper", ["rome"], seeds=[12])


@pytest.mark.parametrize("executor", ["processes", "submitit-local"])
def test_a_deleted_run_is_recomputed_identically(executor, tmp_path, monkeypatch):
    monkeypatch.setenv("WILKE_RUNS_DIR", str(tmp_path / "runs"))
    spec = RunSpec(ORGANISM, "rome", seed=9, n_edits=2, profile="quick")
    first = run_matrix([spec], jobs=1, executor=executor, folder=tmp_path / "submitit", poll_seconds=0.2)
    assert first["status"].tolist() == ["computed"]
    rdir = run_dir_of(spec, load_counterfact("toy-world"))
    assert steps_done(rdir, 2) == 2 and (rdir / "steps.jsonl.gz").exists()
    result = json.loads((rdir / "result.json").read_text())
    again = run_matrix([spec], jobs=1, executor=executor, folder=tmp_path / "submitit")
    assert again["status"].tolist() == ["read back"]
    shutil.rmtree(rdir)  # a clone whose records were deleted
    recomputed = run_matrix([spec], jobs=1, executor=executor, folder=tmp_path / "submitit", poll_seconds=0.2)
    assert recomputed["status"].tolist() == ["computed"]
    assert json.loads((rdir / "result.json").read_text())["final"] == result["final"]
