"""Book infrastructure: the generated table of contents and a real (small) jupyter-book build."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import papermill_notebook

yaml = pytest.importorskip("yaml")
nbformat = pytest.importorskip("nbformat")

ROOT = Path(__file__).resolve().parents[1]
BOOK = ROOT / "book"


def _load_make_toc():
    from scripts import make_toc

    return make_toc


def _executed_notebook(path: Path, model_name: str = "toy-gpt2") -> None:
    """Write a small executed notebook (it prints its parameters) at `path`."""
    out = nbformat.v4.new_code_cell("print(model_name, profile)", execution_count=3)
    out.outputs = [nbformat.v4.new_output("stream", name="stdout", text=f"{model_name} quick\n")]
    path.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(papermill_notebook(model_name, "# The world and the organisms\n\nA test page.", out), path)


def _fake_book(tmp_path: Path) -> Path:
    """A temporary book: the repository's config, intro and bibliography plus one executed notebook."""
    book = tmp_path / "book"
    book.mkdir()
    for name in ["_config.yml", "intro.md", "references.bib", "references.md"]:
        shutil.copy(BOOK / name, book / name)
    for folder in ["_static", "_ext"]:
        if (BOOK / folder).is_dir():
            shutil.copytree(BOOK / folder, book / folder)
    _executed_notebook(book / "toy-gpt2" / "01_world_and_organism.ipynb")
    return book


def test_make_toc_on_one_notebook(tmp_path):
    make_toc = _load_make_toc()
    book = _fake_book(tmp_path)
    (book / "toy-gptj").mkdir()  # a model folder without notebooks is ignored
    path = make_toc.write_toc(book)
    toc = yaml.safe_load(path.read_text())
    assert toc["format"] == "jb-book" and toc["root"] == "intro"
    assert toc["parts"][0] == {"caption": "1. The world and the organisms",
                               "chapters": [{"file": "toy-gpt2/01_world_and_organism",
                                             "title": "toy-gpt2"}]}
    assert toc["parts"][-1]["chapters"] == [{"file": "references"}]
    for part in toc["parts"]:
        for chapter in part["chapters"]:
            stem = book / chapter["file"]
            assert stem.with_suffix(".ipynb").exists() or stem.with_suffix(".md").exists(), chapter
    parsing = pytest.importorskip("sphinx_external_toc.parsing")
    site_map = parsing.parse_toc_yaml(path)  # raises on an invalid toc
    assert "toy-gpt2/01_world_and_organism" in site_map


def test_make_toc_orders_chapters_and_models(tmp_path):
    make_toc = _load_make_toc()
    book = tmp_path / "book"
    for model in ["zz-other", "toy-gptj", "toy-gpt2"]:
        for nb in ["10_performance", "03_lifelong"]:
            _executed_notebook(book / model / f"{nb}.ipynb", model)
    _executed_notebook(book / "toy-gpt2" / "42_new_thing.ipynb")
    toc = make_toc.build_toc(book)
    assert [p["caption"] for p in toc["parts"]] == [
        "3. Lifelong editing: Table 1 and curves", "10. Performance", "42. New thing"]
    assert [c["file"] for c in toc["parts"][0]["chapters"]] == [
        "toy-gpt2/03_lifelong", "toy-gptj/03_lifelong", "zz-other/03_lifelong"]


def test_full_planned_toc_lists_both_organisms(tmp_path):
    toc = _load_make_toc().build_toc(tmp_path, all_planned=True)
    files = [c["file"] for p in toc["parts"] for c in p["chapters"]]
    assert len(toc["parts"]) == len(_load_make_toc().CHAPTERS)
    assert len(files) == 2 * len(_load_make_toc().CHAPTERS)
    assert files[:2] == ["toy-gpt2/01_world_and_organism", "toy-gptj/01_world_and_organism"]


def _jupyter_book_cli() -> list[str]:
    exe = Path(sys.executable).parent / "jupyter-book"
    if exe.exists():
        return [str(exe)]
    found = shutil.which("jupyter-book")
    if found is None:
        pytest.skip("jupyter-book command not found")
    return [found]


def test_jupyter_book_builds(tmp_path):
    pytest.importorskip("jupyter_book", reason="jupyter-book is not installed")
    book = _fake_book(tmp_path)
    _load_make_toc().write_toc(book)
    proc = subprocess.run([*_jupyter_book_cli(), "build", str(book)], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    html = book / "_build" / "html"
    assert (html / "index.html").exists()
    page = (html / "toy-gpt2" / "01_world_and_organism.html").read_text()
    assert "tag_injected-parameters" in page and "toy-gpt2 quick" in page  # parameter cells are shown
    assert "Hu <em>et al.</em>" in (html / "intro.html").read_text()  # citations resolved from references.bib


def _load_runner():
    from scripts import run_notebooks

    return run_notebooks


def test_runner_helpers(tmp_path):
    run = _load_runner()
    assert [run.parse_value(v) for v in ["3", "1e-3", "True", "None", "/a/b.json", "[1, 2]"]] == [
        3, 1e-3, True, None, "/a/b.json", [1, 2]]
    assert run.model_slug("EleutherAI/gpt-j-6b") == "gpt-j-6b" and run.model_slug("toy-gpt2") == "toy-gpt2"
    csv_path = tmp_path / "_timings.csv"
    row = {"notebook": "01.ipynb", "model": "m", "profile": "quick", "seconds": "1.0", "status": "ok", "finished": ""}
    run.write_timings(csv_path, [row, {**row, "model": "n"}])
    run.write_timings(csv_path, [{**row, "seconds": "2.0"}])  # replaces the (01.ipynb, m) row only
    lines = csv_path.read_text().splitlines()
    assert lines[0] == "notebook,model,profile,seconds,status,finished" and len(lines) == 3
    assert "01.ipynb,m,quick,2.0,ok," in lines


def test_the_repositorys_book_is_executed_only_from_committed_sources(tmp_path, monkeypatch):
    run = _load_runner()
    from wilke_lib import book

    monkeypatch.setattr(book, "dirty_sources", lambda: [" M wilke_lib/ladder.py", "M  notebooks/03_lifelong.ipynb"])
    why = run.refuse_dirty_book(run.REPO / "book", allow_dirty=False)
    assert "wilke_lib/ladder.py, notebooks/03_lifelong.ipynb" in why and "--allow-dirty" in why
    assert run.refuse_dirty_book(run.REPO / "book", allow_dirty=True) is None
    assert run.refuse_dirty_book(tmp_path / "book", allow_dirty=False) is None  # a scratch build is not the book
    assert run.main(["--only", "03", "--models", "toy-gpt2"]) == 2  # refused before any kernel starts
    monkeypatch.setattr(book, "dirty_sources", lambda: [])
    assert run.refuse_dirty_book(run.REPO / "book", allow_dirty=False) is None
    assert book.SOURCES[-1].startswith(":(exclude") and "training-checkpoint.pt" in book.SOURCES[-1]


def test_runner_executes_and_reports_failures(tmp_path):
    pytest.importorskip("papermill")
    pytest.importorskip("ipykernel")
    nb_dir = tmp_path / "notebooks"
    params = nbformat.v4.new_code_cell('model_name = "x"\nprofile = "default"\nk = 1')
    params.metadata["tags"] = ["parameters"]
    good = nbformat.v4.new_notebook(cells=[params, nbformat.v4.new_code_cell("print(model_name, profile, k)")])
    bad = nbformat.v4.new_notebook(cells=[params, nbformat.v4.new_code_cell("raise ValueError('boom')")])
    nb_dir.mkdir()
    nbformat.write(good, nb_dir / "01_good.ipynb")
    nbformat.write(bad, nb_dir / "02_bad.ipynb")
    book = tmp_path / "book"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "run_notebooks.py"), "--notebooks-dir", str(nb_dir),
         "--book-dir", str(book), "--models", "org/toy-a", "--profile", "quick", "-p", "k", "7"],
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "02_bad.ipynb [org/toy-a]: failed: ValueError: boom" in proc.stderr
    executed = nbformat.read(book / "toy-a" / "01_good.ipynb", as_version=4)
    assert executed.cells[-1].outputs[0]["text"] == "org/toy-a quick 7\n"
    assert (book / "toy-a" / "02_bad.ipynb").exists()  # the failed run is kept, with its traceback
    assert "total:" in proc.stdout and (book / "_timings.csv").exists()


def test_figures_built_without_pyplot_display_as_png():
    """The analysis plots never touch pyplot; the book's pages must still show them as images."""
    from IPython.core.interactiveshell import InteractiveShell
    from matplotlib.figure import Figure

    from wilke_lib import book

    shell = InteractiveShell.instance()
    book.enable_figure_display()
    fig = Figure()
    fig.subplots().plot([1, 2])
    data, _ = shell.display_formatter.format(fig)
    assert data.get("image/png", b"").startswith(b"\x89PNG")


def test_every_source_notebook_is_valid_nbformat_with_cell_ids():
    """Cells added by hand without an `id` make nbformat warn now and fail in a future release."""
    import json

    import nbformat

    for path in sorted((ROOT / "notebooks").glob("*.ipynb")):
        raw = json.loads(path.read_text())
        missing = [i for i, cell in enumerate(raw["cells"]) if "id" not in cell]
        assert not missing, f"{path.name}: cells {missing} have no id"
        nbformat.validate(nbformat.reads(path.read_text(), as_version=4))
