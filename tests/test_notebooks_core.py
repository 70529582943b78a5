"""The chapters of the world, the editors and the lifelong table execute end to end with papermill
on the quick profile (results go to a temporary directory)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from wilke_lib.models import ORGANISMS_DIR

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = ["01_world_and_organism", "02_editors", "03_lifelong", "04_ablation", "13_collapse_point"]

pytestmark = [
    pytest.mark.slow,  # 33 s to 2 min per notebook, 7 min for the file (measured on a shared 2-core machine)
    pytest.mark.skipif(not (ORGANISMS_DIR / "toy-gpt2" / "model.safetensors").is_file(),
                       reason="organism toy-gpt2 not built (run `make organisms`)"),
]


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_executes_with_quick_profile(name, tmp_path, monkeypatch):
    papermill = pytest.importorskip("papermill")
    monkeypatch.setenv("WILKE_RESULTS_DIR", str(tmp_path / "results"))
    monkeypatch.setenv("WILKE_RUNS_DIR", str(tmp_path / "runs"))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.setenv("WILKE_FIGURES_DIR", str(tmp_path / "figures"))
    out = tmp_path / f"{name}.ipynb"
    parameters = {"model_name": "toy-gpt2", "profile": "quick"}
    if name == "04_ablation":
        # the quick profile's ablation runs are the ones the first part computes: the paper-scale section
        # then reads them back, finished
        parameters.update(n_edits=2, scores=["eq10"], scale_profile="quick")
    if name == "03_lifelong":
        # the same for Table 1: the "paper-scale" section reads the quick runs back, and they decide the claims
        parameters.update(scale_profile="quick")
    papermill.execute_notebook(str(REPO / "notebooks" / f"{name}.ipynb"), str(out),
                               parameters=parameters, cwd=str(REPO), progress_bar=False)
    executed = json.loads(out.read_text())
    errors = [o for c in executed["cells"] for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors
    if name == "03_lifelong":
        recorded = json.loads((tmp_path / "results" / "toy-gpt2" / "claims" / "03_lifelong.json").read_text())["claims"]
        assert recorded["editors_fail_lifelong"]["n"] == "4 edits x 1 seed (9), the finished 4-edit runs"
        assert recorded["layer_per_fact"]["label"].endswith("layer-choices-scale")
        for cell in recorded.values():  # every verdict says what it rests on; "not testable" says why
            assert cell["n"] and (cell["verdict"] != "not testable here" or cell["precondition"])


def test_consecutive_chapter_reads_the_runs_on_disk(tmp_path, monkeypatch):
    """Chapter 12 computes nothing: with one quick-profile run on disk (MEMIT, batches of 4) it shows that
    run's row and curves and lists the others as not started."""
    papermill = pytest.importorskip("papermill")
    monkeypatch.setenv("WILKE_RESULTS_DIR", str(tmp_path / "results"))
    monkeypatch.setenv("WILKE_RUNS_DIR", str(tmp_path / "runs"))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.setenv("WILKE_FIGURES_DIR", str(tmp_path / "figures"))
    from wilke_lib import counterfact, models
    from wilke_lib.lifelong.consecutive import ConsecutiveConfig, run_consecutive

    model, tok = models.load_model("toy-gpt2")
    run_consecutive(model, tok, counterfact.load_counterfact("toy-world"),
                    ConsecutiveConfig(model_name="toy-gpt2", editor="memit", n_edits=8, batch_size=4))
    out = tmp_path / "12.ipynb"
    papermill.execute_notebook(str(REPO / "notebooks" / "12_consecutive_batch.ipynb"), str(out),
                               parameters={"model_name": "toy-gpt2", "profile": "quick"}, cwd=str(REPO),
                               progress_bar=False)
    text = out.read_text()
    assert "| MEMIT | 4 | 2 | 2 | finished |" in text and "| COMEBA-HK | 1 | 0 | 8 | not started |" in text
    assert "consecutive_curves.png" in text and '"output_type": "error"' not in text
