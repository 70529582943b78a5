"""The analysis chapters (notebooks 05-09) run end to end on toy-gpt2 with the quick profile.

Each notebook is executed with papermill into a temporary folder; results go to a temporary
``WILKE_RESULTS_DIR`` so that the book's cached runs under ``results/`` are neither read nor
written, and the figures the notebooks save under ``figures/`` are put back afterwards. Skipped
when the organism has not been trained (``make organisms``).
"""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MODEL = "toy-gpt2"
pytestmark = pytest.mark.slow  # 33 s to 66 s per notebook, 4 min for the file (measured on a shared 2-core machine)

NOTEBOOKS = ["05_toxicity.ipynb", "06_flash_per_layer.ipynb", "07_causal_tracing.ipynb",
             "08_pattern_unmatch.ipynb", "09_memit_toxicity.ipynb"]


def _kernel() -> str:
    """The runner's kernel (this interpreter), installed once into the venv."""
    from scripts.run_notebooks import ensure_kernel

    return ensure_kernel()


@pytest.fixture(scope="module")
def results_dir(tmp_path_factory) -> Path:
    """One results folder for the module, so that 06-09 read notebook 05's run as in the book."""
    return tmp_path_factory.mktemp("results")


@pytest.fixture
def keep_figures(tmp_path, monkeypatch):
    """The book's figures under <repo>/figures/ are tracked: a quick run writes elsewhere."""
    monkeypatch.setenv("WILKE_FIGURES_DIR", str(tmp_path / "figures"))


@pytest.mark.parametrize("notebook", NOTEBOOKS)
def test_analysis_notebook_runs_quick(notebook, tmp_path, results_dir, keep_figures, monkeypatch):
    organism = ROOT / "organisms" / MODEL
    if not ((organism / "model.safetensors").is_file() and (organism / "config.json").is_file()):
        pytest.skip(f"organism {MODEL} not trained yet (no {organism}/model.safetensors): run `make organisms`")
    pm = pytest.importorskip("papermill")
    pytest.importorskip("ipykernel")
    monkeypatch.setenv("WILKE_RESULTS_DIR", str(results_dir))
    monkeypatch.setenv("WILKE_RUNS_DIR", str(results_dir / "runs"))
    out = tmp_path / notebook
    pm.execute_notebook(str(ROOT / "notebooks" / notebook), str(out), kernel_name=_kernel(), language="python",
                        parameters={"model_name": MODEL, "profile": "quick"}, cwd=str(ROOT), progress_bar=False)
    import nbformat

    executed = nbformat.read(out, as_version=4)
    errors = [o for c in executed.cells if c.cell_type == "code" for o in c.get("outputs", [])
              if o.get("output_type") == "error"]
    assert not errors, errors
    assert (results_dir / MODEL).is_dir()
