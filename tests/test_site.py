"""The built site, as a reader gets it: a small book built with the repository's configuration and
checked in headless Chromium (scripts/check_site.py), and the checker itself on pages with planted
faults. The browser tests are skipped, with the reason, where Chromium or its driver is missing
(Debian: `apt-get install chromium chromium-driver`; .ci/run installs them)."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
pytest.importorskip("yaml")

ROOT = Path(__file__).resolve().parents[1]
BOOK = ROOT / "book"


from scripts import check_site  # noqa: E402
from test_book import papermill_notebook  # noqa: E402


def _browser():
    """(chromium, chromedriver), or skip the test saying what is missing."""
    pytest.importorskip("selenium", reason="selenium is not installed (pip install -e '.[dev]')")
    found = check_site.find_browser()
    if found is None:
        pytest.skip("no chromium / chromedriver on this machine: apt-get install chromium chromium-driver "
                    "(the browser checks of the site are skipped)")
    return found


# ------------------------------------------------------------------------- the checker on planted faults
PAGE = """<!DOCTYPE html><html><head><meta charset="utf-8"><title>{title}</title></head>
<body><main>{body}</main></body></html>"""
PIXEL = (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\x00\x01\x00\x00\x00\x01\x08\x06\x00\x00\x00\x1f\x15\xc4\x89"
         b"\x00\x00\x00\rIDATx\x9cc\xf8\x0f\x00\x00\x01\x01\x00\x05\x18\xd8N\x00\x00\x00\x00IEND\xaeB`\x82")


def _static_site(root: Path) -> Path:
    html = root / "html"
    (html / "_images").mkdir(parents=True)
    (html / "_images" / "ok.png").write_bytes(PIXEL)
    good = ('<h1 id="top">Good</h1><p>Inline code <code>$\\alpha$</code> and <code>````{table}</code> are fine.</p>'
            '<figure id="f1"><img src="_images/ok.png" alt="a pixel"><figcaption><p>Fig. 1.1 A pixel.</p>'
            '</figcaption></figure><a href="bad.html#faults">faults</a> <a href="#top">top</a>'
            '<a href="https://example.org/">outside</a>')
    bad = ('<h1 id="faults">Faults</h1><p>Unrendered \\(x^2\\) and $\\|W\\|$ here.</p>'
           '<a href="missing.html">missing page</a> <a href="index.html#nowhere">missing anchor</a>'
           '<img src="_images/missing.png" alt="missing">'
           '<figure><img src="_images/ok.png" alt="x"></figure>'
           '<div class="cell_output"><div class="output traceback"><pre>Traceback (most recent call last)</pre></div>'
           '<pre>rome toy seed 9:  50%|█████     | 8/16 [00:34&lt;00:32,  4.03s/edit]</pre>'
           '<img src="_images/ok.png" alt="plain output image"></div>'
           '<script>console.error("planted console error")</script>'
           '<p>````{table} A caption with `code` :name: toy-gpt2-03-x</p><p>read from runs//</p>')
    (html / "index.html").write_text(PAGE.format(title="Good", body=good))
    (html / "bad.html").write_text(PAGE.format(title="Faults", body=bad))
    return html


def test_checker_finds_each_planted_fault_and_passes_a_clean_page(tmp_path):
    browser = _browser()
    html = _static_site(tmp_path)
    report = check_site.check_site(html, browser)
    assert report.pages == 2 and report.images == 4 and report.figures == 2
    errors = {kind: [e for e in found if e.startswith("bad.html")] for kind, found in report.errors.items()}
    assert not any(e.startswith("index.html") for found in report.errors.values() for e in found), report.errors
    assert len(errors["broken link"]) == 2  # a missing page and a missing anchor
    assert len(errors["broken image"]) >= 1 and any("missing.png" in e for e in errors["broken image"])
    assert any("planted console error" in e for e in errors["console error"])
    assert len(errors["raw LaTeX"]) == 1  # one text node holds both formulas; code is not checked
    assert len(errors["traceback"]) == 1 and len(errors["progress bar"]) == 1
    assert len(errors["raw markup"]) == 2  # the fence of a table that did not render, a swallowed placeholder
    assert len(errors["uncaptioned figure"]) == 2  # a figure without caption, an output image outside a figure
    assert report.external_links == 1 and "pages: 2" in report.summary()


# ------------------------------------------------------------------------- a small book with the real config
def _executed_page(path: Path, model: str, shown: list[str]) -> None:
    """An executed notebook like papermill's: source defaults, injected parameters, outputs of
    wilke_lib.present (figure and table as Markdown), and a stderr stream (a progress bar)."""
    out = nbformat.v4.new_code_cell("page.figure(...); page.table(...)", execution_count=3)
    out.outputs = [nbformat.v4.new_output("stream", name="stderr",
                                          text="\rrome toy seed 9:  50%|#####     | 8/16 [00:34<00:32,  4.03s/edit]"),
                   *[nbformat.v4.new_output("display_data", data={"text/markdown": md, "text/plain": "md"})
                     for md in shown]]
    nb = papermill_notebook(model, "# Lifelong editing\n\nThe norm $\\|W_{proj}\\|$ grows:\n\n"
                                   "$$\nl^* = \\operatorname{argmin}_l \\|\\delta^l\\|\n$$", out)
    nbformat.write(nb, path)


@pytest.fixture(scope="module")
def built_book(tmp_path_factory):
    """The repository's book configuration, extension and intro with one executed page per model
    (figure, table, verdicts) and the glance page, built by jupyter-book into _build/html."""
    import pandas as pd
    from matplotlib.figure import Figure

    from wilke_lib import present

    exe = Path(sys.executable).parent / "jupyter-book"
    if not exe.exists():
        pytest.skip("jupyter-book is not installed")
    root = tmp_path_factory.mktemp("site")
    book = root / "book"
    book.mkdir()
    for name in ["_config.yml", "intro.md", "references.bib", "references.md"]:
        shutil.copy(BOOK / name, book / name)
    for folder in ["_static", "_ext"]:
        shutil.copytree(BOOK / folder, book / folder, ignore=shutil.ignore_patterns("__pycache__"))
    env = pytest.MonkeyPatch()
    env.setenv(present.BOOK_DIR_VARIABLE, str(book))
    env.setenv("WILKE_RESULTS_DIR", str(root / "results"))
    try:
        for model in ("toy-gpt2", "toy-gptj"):
            shown: list[str] = []
            env.setattr(present, "show_markdown", shown.append)
            page = present.page(model, "03_lifelong", profile="quick", n_edits=4, seeds=[9])
            fig = Figure(figsize=(9, 3))
            fig.subplots().plot([1, 2, 4], [90, 80, 70], marker="o")
            page.figure(fig, "curves", "S falls from 90 to 70 over four edits; the norm $\\|W\\|$ grows.",
                        alt="S falling over the edits", data=pd.DataFrame({"step": [1, 2, 4], "S": [90, 80, 70]}),
                        paper="Fig. 43")
            page.table(pd.DataFrame({"editor": ["ROME", "WilKE"], "S": [70.0, 72.5]}), "table1",
                       "S after four edits of `make runs`, read from runs/<model>/.", paper="Table 1")
            page.claim("wilke_beats_sota", "reproduced", "S: WilKE 72.5 vs ROME 70.0 (+3.6%)", ref="table1")
            page.show_claims()
            _executed_page(book / model / "03_lifelong.ipynb", model, shown)
    finally:
        env.undo()
    subprocess.run([sys.executable, str(ROOT / "scripts" / "make_toc.py"), "--book-dir", str(book)], check=True,
                   capture_output=True, env={**os.environ, "WILKE_RESULTS_DIR": str(root / "results")})
    proc = subprocess.run([str(exe), "build", str(book)], cwd=root, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return book / "_build" / "html"


def test_built_pages_name_their_model_number_figures_and_serve_mathjax(built_book):
    html = built_book
    page = (html / "toy-gptj" / "03_lifelong.html").read_text()
    assert "<title>3. Lifelong editing — toy-gptj" in page and "<h1>3. Lifelong editing — toy-gptj" in page
    assert 'model_name = "toy-gpt2"' not in page.replace("&quot;", '"')  # the defaults cell is dropped
    assert "tag_injected-parameters" in page and "tag_parameters" not in page
    assert "Fig. 3.1 " in page and "Table 3.1 " in page and "(Paper: Fig. 43.)" in page
    assert "rome toy seed" not in page  # stderr (progress bars) is not rendered
    assert page.count("THEBE_JS_URL") == 1 and "cdn.jsdelivr" not in page
    assert (html / "_static" / "mathjax" / "tex-mml-chtml.js").is_file()
    assert list((html / "_downloads").rglob("curves.csv")) and list((html / "_downloads").rglob("table1.csv"))
    index = (html / "index.html").read_text()
    assert "glance.html" in index  # the glance page is the book's first page
    glance = (html / "glance.html").read_text()
    assert "Results at a glance" in glance and "reproduced" in glance and "not run" in glance
    assert 'href="toy-gpt2/03_lifelong.html#toy-gpt2-03-lifelong-table1"' in glance
    sidebar = (html / "intro.html").read_text()
    assert ">toy-gpt2</a>" in sidebar and ">toy-gptj</a>" in sidebar


def test_built_book_passes_the_browser_check(built_book, tmp_path):
    browser = _browser()
    report = check_site.check_site(built_book, browser, screenshots=["glance.html"], screenshot_dir=tmp_path)
    assert report.n_errors == 0, report.errors
    assert report.pages >= 5 and report.figures == 2 and report.formulas >= 4  # MathJax ran, offline
    assert (tmp_path / "glance.html.png").is_file()
