"""`make runs`: the run matrix, recomputation of a deleted run to identical numbers, submitit's local executor."""

from __future__ import annotations

import json
import shutil

import pytest

from wilke_lib import experiments, models
from wilke_lib.profiles import get_profile
from wilke_lib.run_matrix import RunSpec, ablation_matrix, paper_matrix, run_dir_of, run_matrix, steps_done
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


@pytest.mark.slow  # 49 s (processes) and 148 s (submitit-local), measured on a shared 2-core machine
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
    assert again["S"].tolist() == pytest.approx([100 * result["final"]["S"]]) == first["S"].tolist()
    shutil.rmtree(rdir)  # a clone whose records were deleted
    recomputed = run_matrix([spec], jobs=1, executor=executor, folder=tmp_path / "submitit", poll_seconds=0.2)
    assert recomputed["status"].tolist() == ["computed"]
    assert json.loads((rdir / "result.json").read_text())["final"] == result["final"]


@pytest.mark.slow  # 40 s, measured on a shared 2-core machine
def test_the_ablation_runs_are_the_ones_chapter_04_reads_back(tmp_path, monkeypatch):
    monkeypatch.setenv("WILKE_RUNS_DIR", str(tmp_path / "runs"))
    specs = ablation_matrix([ORGANISM], "quick", scores=["eq10"])
    assert [s.variant().label for s in specs] == ["WilKE eq10 full", "WilKE eq10 w/o delta",
                                                   "WilKE eq10 w/o activation", "WilKE eq10 w/o ||W_proj||"]
    assert {(s.n_edits, s.seed) for s in specs} == {(get_profile("quick").ablation_n_edits, 9)}
    assert specs[1].variant().hparams(ORGANISM).use_delta is False
    run_matrix(specs[:2], jobs=1, poll_seconds=0.2)
    grouped, status = experiments.ablation_progress(ORGANISM, load_counterfact("toy-world"), get_profile("quick"),
                                                    ("eq10",))
    assert status["status"].tolist() == ["finished", "finished", "not started", "not started"]
    assert sorted(grouped) == ["WilKE eq10 full", "WilKE eq10 w/o delta"]
    changes = experiments.ablation_changes(experiments.table(grouped, ORGANISM).set_index("editor")["S"], ("eq10",))
    assert changes["variant"].tolist() == ["w/o delta"]  # only the variants that finished are compared
