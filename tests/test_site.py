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

import pandas as pd
import pytest

nbformat = pytest.importorskip("nbformat")
pytest.importorskip("yaml")

ROOT = Path(__file__).resolve().parents[1]
BOOK = ROOT / "book"


from helpers import papermill_notebook  # noqa: E402
from scripts import check_site, make_glance  # noqa: E402
from wilke_lib import claims, headline  # noqa: E402


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
            '<a href="https://example.org/">outside</a>'
            '<details><summary>Provenance of this page (commit 0123abc)</summary></details>')
    bad = ('<h1 id="faults">Faults</h1><p>Unrendered \\(x^2\\) and $\\|W\\|$ here.</p>'
           '<a href="missing.html">missing page</a> <a href="index.html#nowhere">missing anchor</a>'
           '<img src="_images/missing.png" alt="missing">'
           '<figure><img src="_images/ok.png" alt="x"></figure>'
           '<div class="cell_output"><div class="output traceback"><pre>Traceback (most recent call last)</pre></div>'
           '<pre>rome toy seed 9:  50%|█████     | 8/16 [00:34&lt;00:32,  4.03s/edit]</pre>'
           '<img src="_images/ok.png" alt="plain output image"></div>'
           '<script>console.error("planted console error")</script>'
           '<p>````{table} A caption with `code` :name: toy-gpt2-03-x</p><p>read from runs//</p>'
           # layout: a table wider than the column, a figure shown at a fifth of its width, a faint caption, a
           # glance-table cell of hundreds of lines at 600 px, and a page far taller than 6,000 px
           '<table id="wide"><tr><td><div style="width:3000px">wide</div></td></tr></table>'
           '<figure><img src="_images/wide.png" style="width:40px" alt="dense"><figcaption>Fig. 1.2 Dense.</figcaption>'
           '</figure><figure><img src="_images/ok.png" alt="y"><figcaption style="font-weight:300">Fig. 1.3 Faint.'
           '</figcaption></figure><table class="wilke-glance"><tr><td><p>' + "word " * 3000 + '</p></td></tr></table>'
           '<details><summary>Provenance of this page (commit a7f4082 (dirty))</summary></details>'
           # an interactive figure whose plotly.js never loaded
           '<details><div id="plot" class="wilke-interactive"></div></details>'
           '<div style="height:7000px"></div>')
    _png(html / "_images" / "wide.png", 200, 10)
    (html / "index.html").write_text(PAGE.format(title="Good", body=good))
    (html / "bad.html").write_text(PAGE.format(title="Faults", body=bad))
    return html


def _png(path: Path, width: int, height: int) -> None:
    from PIL import Image

    Image.new("RGB", (width, height), "white").save(path)


def test_checker_finds_each_planted_fault_and_passes_a_clean_page(tmp_path):
    browser = _browser()
    html = _static_site(tmp_path)
    report = check_site.check_site(html, browser)
    assert report.pages == 2 and report.images == 6 and report.figures == 4
    errors = {kind: [e for e in found if e.startswith("bad.html")] for kind, found in report.errors.items()}
    assert not any(e.startswith("index.html") for found in report.errors.values() for e in found), report.errors
    assert len(errors["broken link"]) == 2  # a missing page and a missing anchor
    assert len(errors["broken image"]) >= 1 and any("missing.png" in e for e in errors["broken image"])
    assert any("planted console error" in e for e in errors["console error"])
    assert len(errors["raw LaTeX"]) == 1  # one text node holds both formulas; code is not checked
    assert len(errors["traceback"]) == 1 and len(errors["progress bar"]) == 1
    assert len(errors["raw markup"]) == 2  # the fence of a table that did not render, a swallowed placeholder
    assert len(errors["uncaptioned figure"]) == 2  # a figure without caption, an output image outside a figure
    assert len(errors["overflowing table"]) == 1 and errors["overflowing table"][0].startswith("bad.html: wide: ")
    assert len(errors["small-text image"]) == 1 and "wide.png: 200 px shown 40 px wide (x5.0)" in errors["small-text image"][0]
    assert len(errors["faint caption"]) == 1 and "weight 300" in errors["faint caption"][0]
    assert len(errors["long cell"]) == 1 and "at 600 px, row 0, column 0" in errors["long cell"][0]
    assert errors["dirty provenance"] == ["bad.html: executed at a7f4082 (dirty)"]
    assert errors["interactive figure"] == ["bad.html: #plot: not drawn (no plotly.js)"] and report.interactive == 1
    assert [w.split(":")[0] for w in report.warnings["tall page"]] == ["bad.html"]
    assert report.heights["index.html"] < check_site.MAX_HEIGHT < report.heights["bad.html"]
    assert report.external_links == 1 and "pages: 2" in report.summary() and "tall pages (warning): 1" in report.summary()
    assert report.strict().n_errors == report.n_errors + 1 and report.strict().n_warnings == 0


# ------------------------------------------------------------------------- the checker's rules, without a browser
def test_layout_rules_flag_wide_tables_dense_images_long_cells_and_tall_pages():
    tables = [{"name": "t1", "width": 900, "available": 772}, {"name": "t2", "width": 772, "available": 772},
              {"name": "t3", "width": 773, "available": 772}]  # one pixel of rounding is not an overflow
    assert check_site.overflowing_tables(tables) == ["t1: 900 px in a column of 772 px"]
    images = [{"src": "a.png", "natural": 1967, "shown": 600}, {"src": "b.png", "natural": 1350, "shown": 756},
              {"src": "c.png", "natural": 1512, "shown": 756}, {"src": "hidden.png", "natural": 900, "shown": 0}]
    assert check_site.small_text_images(images) == ["a.png: 1967 px shown 600 px wide (x3.3)"]  # ratio 2 passes
    cells = [{"row": 3, "col": 1, "height": 26.4 * 41, "line": 26.4, "text": "long"},
             {"row": 3, "col": 2, "height": 26.4 * 40, "line": 26.4, "text": "forty"},
             {"row": 0, "col": 0, "height": 500, "line": 0, "text": "no line height"}]
    assert check_site.long_cells(cells) == ["row 3, column 1: 41 lines ('long')"]
    assert check_site.is_tall("toy-gpt2/03_lifelong.html", 15423) and not check_site.is_tall("intro.html", 5085)
    assert not check_site.is_tall("genindex.html", 9000) and check_site.is_tall("intro.html", 5085, max_height=5000)


def test_provenance_must_name_a_clean_commit_whose_sources_are_heads():
    page = "<summary>Provenance of this page (commit {})</summary>"
    head_sources = {"abc1234": [], "0dd0dd0": ["wilke_lib/ladder.py"]}
    changed = head_sources.get  # a commit git does not know: None
    assert check_site.provenance_problems(page.format("abc1234"), changed) == []
    assert check_site.provenance_problems(page.format("abc1234"), None) == []  # --no-git
    assert check_site.provenance_problems(page.format("abc1234 (dirty)"), changed) == [
        ("dirty provenance", "executed at abc1234 (dirty)")]
    assert check_site.provenance_problems(page.format("unknown"), changed)[0][0] == "dirty provenance"
    stale = check_site.provenance_problems(page.format("0dd0dd0"), changed)
    assert stale[0][0] == "stale provenance" and "wilke_lib/ladder.py" in stale[0][1]
    assert "not in this repository" in check_site.provenance_problems(page.format("fedcba9"), changed)[0][1]
    assert check_site.provenance_problems("<p>a page without provenance</p>", changed) == []


def test_report_keeps_warnings_apart_and_strict_counts_them():
    report = check_site.Report()
    report.add("tall page", "a.html", "7,000 px")
    report.add("overflowing table", "a.html", "t: 900 px in a column of 772 px")
    report.heights.update({"a.html": 7000, "b.html": 3000})
    assert report.n_errors == 1 and report.n_warnings == 1
    summary = report.summary()
    assert "overflowing tables: 1" in summary and "tall pages (warning): 1" in summary
    assert "median 5,000 px, tallest 7,000 px (a.html)" in summary
    strict = report.strict()
    assert strict.n_errors == 2 and strict.n_warnings == 0 and strict.errors["tall page"] == ["a.html: 7,000 px"]
    assert report.n_warnings == 1  # the report itself is unchanged


# ------------------------------------------------------------------------- the glance page's headline
def _curve(editor: str, seed, steps, values) -> pd.DataFrame:
    return pd.DataFrame({"editor": editor, "seed": seed, "step": steps, "S": values})


def _panels() -> list:
    """Two made-up panels: ROME with three finished seeds, WilKE unfinished on one model, the paper's curves."""
    steps = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024]
    panels = []
    for model, paper_model in (("toy-gpt2", "gpt2-xl"), ("toy-gptj", "gpt-j-6b")):
        per_seed = pd.concat([_curve("ROME", seed, steps, [90 - 8 * i - seed for i in range(11)]) for seed in (9, 10, 11)]
                             + [_curve("MEMIT", 9, steps, [95 - 5 * i for i in range(11)])], ignore_index=True)
        ours = headline.mean_over_seeds(per_seed.assign(S=per_seed["S"] / 100))
        unfinished = _curve("WilKE", 9, steps[:5], [97, 90, 80, 60, 30]) if model == "toy-gptj" else _curve("WilKE", 9, [], [])
        paper = pd.concat([_curve(e, "paper", steps, [88 - k * i for i in range(11)]).drop(columns="seed")
                           for e, k in (("ROME", 8), ("MEMIT", 4), ("WilKE", 3))], ignore_index=True)
        panels.append(headline.Panel(model=model, paper_model=paper_model, ours=ours, unfinished=unfinished,
                                     paper=paper, per_seed=per_seed, seeds={"ROME": [9, 10, 11], "MEMIT": [9]},
                                     pending={"WilKE": "seed 9 at 16 of 1,024 edits"} if model == "toy-gptj" else {},
                                     sources=[f"{model}/{model}__rome__n1024__seed9__x"]))
    return panels


def test_mean_over_seeds_keeps_the_steps_every_seed_measured():
    curves = pd.concat([_curve("ROME", 9, [1, 2, 4], [0.9, 0.5, 0.1]), _curve("ROME", 10, [1, 2], [0.7, 0.3])])
    mean = headline.mean_over_seeds(curves)
    assert mean["step"].tolist() == [1, 2] and mean["S"].round(6).tolist() == [80.0, 40.0]
    assert set(mean["seeds"]) == {2}


def test_headline_figure_is_legible_at_the_column_width_and_its_data_is_tidy(tmp_path):
    from PIL import Image

    panels = _panels()
    fig = headline.headline_figure(panels)
    assert len(fig.axes) == 2 and [ax.get_xscale() for ax in fig.axes] == ["log", "log"]
    labels = [t.get_text() for t in fig.legends[0].get_texts()]
    assert labels[:3] == ["ROME", "MEMIT", "WilKE"] and "organism: unfinished run" in labels
    assert "paper (authors' curves)" in labels
    fig.savefig(tmp_path / "h.png", dpi=headline.DPI, bbox_inches="tight")
    width = Image.open(tmp_path / "h.png").width
    column = 756  # px, the book's column at a 1,400 px window (make check-site)
    assert column <= width <= check_site.MAX_IMAGE_RATIO * column  # filled, and its 9.5-pt text shown >= 9 px
    assert 9.5 * headline.DPI / 72 / (width / column) >= 9
    frame = headline.headline_frame(panels)
    assert list(frame.columns) == ["model", "curve", "editor", "seeds", "step", "S"]
    assert set(frame["model"]) == {"toy-gpt2", "toy-gptj", "GPT2-XL", "GPT-J"}
    assert (frame.loc[frame["curve"].str.contains("unfinished"), "model"] == "toy-gptj").all()
    collapse = headline.collapse_summary(panels)
    assert set(collapse) == {"toy-gpt2", "toy-gptj"} and collapse["toy-gpt2"][1] == 64.0  # 88 - 8i: below 44 at the 7th checkpoint
    assert len(collapse["toy-gpt2"][0]) == 3  # one collapse step per finished seed
    assert headline.colour("ROME").startswith("#") and headline.colour("made-up editor") == "#7F7F7F"


# ------------------------------------------------------------------------- the glance page's text
def _rows(verdicts: dict[str, list[tuple[str, str]]]) -> list[dict]:
    """Glance rows with made-up cells: {model: [(verdict, precondition), ...]} over the registry's first claims."""
    registry = list(claims.registry().values())
    n = len(next(iter(verdicts.values())))
    return [{"claim": registry[i], "cells": {m: {"verdict": v[i][0], "precondition": v[i][1], "number": "", "n": ""}
                                             for m, v in verdicts.items()}} for i in range(n)]


def test_verdict_sentence_and_tally_say_what_the_counts_and_collapse_steps_say():
    gpt2 = [("reproduced", ""), ("not reproduced", ""), ("not testable here", "some variant's S at least 5: 1.1"),
            ("not testable here", "a flash record of one run edited in another: 0"),
            ("not testable here", "finished runs of WilKE (missing: WilKE)")]
    rows = _rows({"toy-gpt2": gpt2})
    text = make_glance.verdict_sentence(rows, ["toy-gpt2"], {"toy-gpt2": ([8.0, 8.0, 4.0], 64.0)})
    assert text.startswith("**Verdict.** On these small organisms the paper is reproduced only in part: of its 5 claims")
    assert "1 are reproduced, 1 contradicted, and most of the rest are *not testable here*" in text
    assert "mainly because the editors collapse far sooner" in text and "8 / 8 / 4 edits on `toy-gpt2`" in text
    assert "against 64 on GPT2-XL" in text
    tally = make_glance.tally_markdown(rows, "toy-gpt2")
    assert "{bdg-success}`1 reproduced`" in tally and "{bdg-secondary}`3 not testable here`" in tally
    assert "1× runs missing or unfinished" in tally and "1× no flash record" in tally and "1× no working model" in tally
    without_runs = make_glance.verdict_sentence(rows, ["toy-gpt2"], None)
    assert "collapse" not in without_runs


def test_claims_table_cells_show_the_badge_and_n_and_hide_the_rest(tmp_path):
    cell = {"verdict": "not testable here", "number": "S: WilKE 0.4 vs MEMIT 2.4", "note": "",
            "precondition": "S of WilKE or MEMIT at least 5", "n": "1,024 edits x 3 seeds", "page": None, "label": None}
    lines = make_glance.compact_cell(tmp_path, cell)
    assert lines[0] == "  - {bdg-secondary}`not testable here`" and "    *n:* 1,024 edits x 3 seeds" in lines
    body = "\n".join(lines)
    assert ":::{dropdown} details" in body and "*Precondition:* S of WilKE or MEMIT at least 5" in body
    assert body.index("*n:*") < body.index(":::{dropdown}") < body.index("S: WilKE 0.4")
    staircase = claims.registry()["staircase"]
    rule = make_glance.rule_markdown(staircase)
    assert "The rows that decide it: “step-like shape”, “norm hundreds of times the original”" in rule


def test_glance_page_embeds_the_headline_with_a_numbered_caption(tmp_path, monkeypatch):
    monkeypatch.setenv("WILKE_RESULTS_DIR", str(tmp_path / "results"))
    (tmp_path / "toy-gpt2").mkdir()
    (tmp_path / "toy-gpt2" / "03_lifelong.ipynb").write_text("{}")
    path = make_glance.write_glance(tmp_path, panels=_panels())
    text = path.read_text()
    assert (tmp_path / "glance_files" / "headline.png").is_file() and (tmp_path / "glance_files" / "headline.csv").is_file()
    head = text[: text.index("## The paper's claims")]
    assert head.index("**Verdict.**") < head.index("- `toy-gpt2`:") < head.index("```{figure} glance_files/headline.png")
    assert ":name: glance-headline" in head and ":alt: " in head
    assert "`toy-gpt2`: ROME 3 (9, 10, 11), MEMIT 1 (9)" in head  # the seeds behind each mean
    assert "Dotted: an editor with no finished run" in head and "WilKE on `toy-gptj`, seed 9 at 16 of 1,024 edits" in head
    assert "`runs/toy-gpt2/`" in head and "`wilke_lib/data/curves_reported.csv`" in head
    assert "[headline.csv](glance_files/headline.csv)" in head
    # the same curves, interactive, folded below the figure; plotly.js served from the book (offline)
    interactive = head[head.index("```{figure} glance_files/headline.png"):]
    assert "{dropdown} The same curves, interactive" in interactive and 'class="wilke-interactive"' in interactive
    assert '<script src="_static/plotly.min.js">' in interactive and "cdn" not in interactive.lower()
    assert (tmp_path / "_static" / "plotly.min.js").stat().st_size > 1_000_000


def test_interactive_headline_has_the_static_figures_curves_and_hover_values():
    panels = _panels()
    fig = headline.interactive_figure(panels)
    static = headline.headline_figure(panels)
    n_static = sum(len(ax.get_lines()) - 1 for ax in static.axes)  # less the step-64 line of each panel
    assert len(fig.data) == n_static
    rome = next(t for t in fig.data if t.name == "ROME" and t.line.dash is None)
    first = panels[0].ours.query("editor == 'ROME'").sort_values("step").iloc[0]
    assert rome.x[0] == first["step"] and rome.y[0] == first["S"]
    assert f"S {first['S']:.1f}%" in rome.text[0] and "seed 9" in rome.text[0]
    assert sum(t.showlegend for t in fig.data) == len({t.name for t in fig.data})  # one legend entry per editor
    assert "\n\n" not in headline.interactive_html(panels, "p", "_static/plotly.min.js")  # one raw-HTML block


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
                   capture_output=True, env={**os.environ, "WILKE_RESULTS_DIR": str(root / "results"),
                                             make_glance.HEADLINE_VARIABLE: "off"})
    env.setenv(present.BOOK_DIR_VARIABLE, str(book))
    env.setenv("WILKE_RESULTS_DIR", str(root / "results"))
    try:  # the glance page again, with a headline figure drawn from made-up curves (not the committed runs)
        make_glance.write_glance(book, panels=_panels())
    finally:
        env.undo()
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
    assert 'id="glance-headline"' in glance and "Fig. 1 " in glance and "headline.png" in glance
    assert glance.count("wilke-details") >= len(claims.registry())  # words and test of each claim behind a click
    sidebar = (html / "intro.html").read_text()
    assert ">toy-gpt2</a>" in sidebar and ">toy-gptj</a>" in sidebar
    side = (html / "side_by_side.html").read_text()
    assert side.count("sd-tab-item") >= 2 and "toy-gptj/03_lifelong_files/curves.png" in side.replace("_images/", "")\
        or side.count("sd-tab-label") >= 2, side[:2000]
    assert "On its page: Fig. 3.1" in side and 'href="toy-gptj/03_lifelong.html#toy-gptj-03-lifelong-curves"' in side
    assert 'href="side_by_side.html"' in glance  # the glance page points to it


def test_side_by_side_takes_each_pages_first_unfolded_figure_and_its_first_sentence(tmp_path):
    from scripts import make_side_by_side as side

    figure = ("````{{figure}} 03_lifelong_files/{name}.png\n:name: {model}-03-lifelong-{name}\n:alt: S falling\n"
              ":width: 100%\n\nS (in %) over the steps, e.g. ROME's $\\|W. x\\|$ grows. Second sentence.\n\n"
              "[full-size PNG](x)\n````")
    for model in ("toy-gpt2", "toy-gptj"):
        folded = ":::::{dropdown} More\n\n" + figure.format(name="folded", model=model) + "\n:::::"
        (tmp_path / model).mkdir()
        _executed_page(tmp_path / model / "03_lifelong.ipynb", model, [folded, figure.format(name="curves", model=model)])
    found = side.main_figure(tmp_path / "toy-gpt2" / "03_lifelong.ipynb")
    assert found["name"] == "toy-gpt2-03-lifelong-curves" and found["src"] == "03_lifelong_files/curves.png"
    assert side.first_sentence(found["caption"]) == "S (in %) over the steps, e.g. ROME's $\\|W. x\\|$ grows."
    page = side.side_by_side_markdown(tmp_path, ["toy-gpt2", "toy-gptj"])
    assert page.count(":::{tab-item}") == 2 and ":::::{dropdown} 3. Lifelong editing\n:open:" in page
    assert "```{image} toy-gptj/03_lifelong_files/curves.png" in page and "folded" not in page
    assert "<toy-gptj-03-lifelong-curves>" in page and "[toy-gptj's chapter 3](toy-gptj/03_lifelong.ipynb)" in page
    assert side.write_side_by_side(tmp_path) == tmp_path / side.PAGE


def test_built_book_passes_the_browser_check(built_book, tmp_path):
    browser = _browser()
    report = check_site.check_site(built_book, browser, screenshots=["glance.html"], screenshot_dir=tmp_path)
    # "(dirty)" when these tests run on a working tree with changes (never in CI's fresh clone): the rule is
    # tested on planted pages above
    errors = {kind: found for kind, found in report.errors.items() if found and kind != "dirty provenance"}
    assert not errors, errors
    assert report.pages >= 5 and report.figures == 3 and report.formulas >= 4  # MathJax ran, offline
    assert report.interactive == 1  # the glance page's plotly figure drew and showed a value on hover
    assert report.n_warnings == 0  # no page taller than 6,000 px
    assert (tmp_path / "glance.html.png").is_file() and (tmp_path / "glance.html-top.png").is_file()
