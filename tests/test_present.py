"""The book's presentation layer: figures and tables with their data, Table 1, the claims and the
"Results at a glance" page, the table of contents and the site extension's helpers (no browser)."""
from __future__ import annotations

import importlib
import importlib.util
import json
import os
import sys
from pathlib import Path

import pandas as pd
import pytest
from matplotlib.figure import Figure

from wilke_lib import claims, metrics, present

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def book(tmp_path, monkeypatch):
    """A book folder in WILKE_BOOK_DIR; what the page displays is collected in `shown`."""
    monkeypatch.setenv(present.BOOK_DIR_VARIABLE, str(tmp_path / "book"))
    shown: list[str] = []
    monkeypatch.setattr(present, "show_markdown", shown.append)
    return tmp_path / "book", shown


def _figure(width: float = 5.0) -> Figure:
    fig = Figure(figsize=(width, 3))
    fig.subplots().plot([1, 2, 3], [3, 1, 2])
    return fig


def test_figure_saves_png_and_data_beside_the_page_and_shows_a_captioned_figure(book):
    root, shown = book
    page = present.page("toy-gpt2", "03_lifelong", profile="quick")
    data = pd.DataFrame({"step": [1, 2, 3], "S": [0.3, 0.1, 0.2]})
    png = page.figure(_figure(9), "curves", "S over the steps.", alt="S falls then rises", data=data, paper="Fig. 43")
    folder = root / "toy-gpt2" / "03_lifelong_files"
    assert png == folder / "curves.png" and png.read_bytes().startswith(b"\x89PNG")
    exported = Path(os.environ["WILKE_FIGURES_DIR"]) / "toy-gpt2" / "03_curves.png"  # the repository's export
    assert page.export_path("curves") == exported and exported.read_bytes() == png.read_bytes()
    assert pd.read_csv(folder / "curves.csv").equals(data)
    md = shown[-1]
    assert md.startswith("````{figure} 03_lifelong_files/curves.png\n")
    assert ":name: toy-gpt2-03-lifelong-curves" in md and ":alt: S falls then rises" in md
    assert ":width: 100%" in md  # wide: shown at the column width, full size on a click
    assert "S over the steps. (Paper: Fig. 43.)" in md
    assert "[full-size PNG](03_lifelong_files/curves.png)" in md and "[data (CSV)](03_lifelong_files/curves.csv)" in md
    assert md.rstrip().endswith("````")
    page.figure(_figure(), "small", "A small one.", alt="a line", data={"a": [1, 2]})
    assert ":width:" not in shown[-1] and json.loads((folder / "small.json").read_text()) == {"a": [1, 2]}
    with pytest.raises(ValueError, match="alt text"):
        page.figure(_figure(), "no_alt", "No alt text.", alt=" ")


def test_table_shows_every_cell_in_full_and_offers_the_csv(book):
    root, shown = book
    page = present.page("toy-gptj", "05_toxicity")
    long_text = "the largest 10% of the steps make 97% of the growth " * 4
    frame = pd.DataFrame({"phenomenon": ["a | b", "x*y_z $3"], "this model": [long_text, "10^-0.5"],
                          "value": [1.23456, 2e-7], "observed": [True, False]})
    page.table(frame, "verdicts", "What the model shows.", paper="Sec. 4.1")
    md = shown[-1]
    assert md.startswith("::::{table} What the model shows. (Paper: Sec. 4.1.)\n:name: toy-gptj-05-toxicity-verdicts")
    # a caption with inline code or a placeholder still makes a table (a backtick fence would not)
    page.table(frame, "verdicts", "Runs of `make runs` under runs/<model>/.")
    assert shown[-1].startswith("::::{table} Runs of `make runs` under runs/\\<model\\>/.\n")
    assert " ".join(long_text.split()) in md and "…" not in md
    assert r"a \| b" in md and r"x\*y\_z \$3" in md
    assert "| 1.235 |" in md and "| 2.000e-07 |" in md and "| yes |" in md
    assert "[data (CSV)](05_toxicity_files/verdicts.csv)" in md
    assert len(pd.read_csv(root / "toy-gptj" / "05_toxicity_files" / "verdicts.csv")) == 2
    assert page.table(frame.iloc[:0], "empty", "Nothing.", empty="No record was flagged.") is None
    assert shown[-1] == "No record was flagged."


def test_files_go_to_results_without_a_book_dir(tmp_path, monkeypatch):
    monkeypatch.delenv(present.BOOK_DIR_VARIABLE, raising=False)
    monkeypatch.setenv("WILKE_RESULTS_DIR", str(tmp_path / "results"))
    assert present.files_dir("EleutherAI/gpt-j-6b", "03_lifelong") == tmp_path / "results" / "gpt-j-6b" / "pages" / "03_lifelong_files"
    with pytest.raises(ValueError):
        present.files_dir("toy-gpt2", "../escape")


def test_format_value_and_markdown_table():
    assert [present.format_value(v) for v in (None, float("nan"), True, 3, 83.123, 0.0123, 2.5e-5, 123456.0)] == [
        "–", "–", "yes", "3", "83.12", "0.0123", "2.500e-05", "1.235e+05"]
    table = present.markdown_table(pd.DataFrame({"n": [1, 2]}, index=pd.Index(["a", "b"], name="editor")))
    assert table.splitlines()[:2] == ["| editor | n |", "|---|---:|"]


def test_table1_as_the_paper_prints_it_the_papers_block_then_ours_without_repeats():
    ours = pd.DataFrame([{"editor": e, "n_runs": 1, **{m: 50.0 + i for m in present.TABLE1_METRICS},
                          **{f"{m}_ci": 0.0 for m in present.TABLE1_METRICS},
                          **{f"{m}_std": 0.0 for m in present.TABLE1_METRICS}} for i, e in enumerate(["WilKE", "FT", "ROME"])])
    paper = pd.read_csv(ROOT / "wilke_lib" / "data" / "table1_reported.csv")
    paper = paper[paper["model"] == "gpt2-xl"]
    frame = present.table1(ours, paper, "toy-gpt2", "gpt2-xl")
    assert list(frame.columns) == ["model", "editor", "runs", *present.TABLE1_METRICS]
    # the paper's block in its order, then ours: one row per editor and source, the block named once
    assert frame["editor"].tolist() == ["KE", "KN", "MEND", "ROME", "MEMIT", "WilKE", "FT", "ROME", "WilKE"]
    assert frame["model"].tolist() == ["GPT2-XL (paper)"] + [""] * 5 + ["toy-gpt2", "", ""]
    assert frame.loc[5, "S"] == "19.3\u00a0±\u00a05.6" and frame.loc[5, "runs"] == 3
    assert frame.loc[8, "S"] == "50.0" and frame.loc[8, "runs"] == 1  # one seed: the mean alone, no "(n/a)"
    assert not frame.astype(str).apply(lambda c: c.str.contains("n/a")).any().any()
    # a "mean ± spread" cell keeps its no-break spaces in the Markdown: a narrow column does not split it
    assert "| 19.3\u00a0±\u00a05.6 |" in present.markdown_table(frame, right=present.TABLE1_METRICS)
    three = present.table1(ours.assign(n_runs=3, S_std=1.25, S_ci=5.4), paper, "toy-gpt2", "gpt2-xl")
    assert three.loc[8, "S"] == "50.0\u00a0±\u00a01.2"
    ci = present.table1(ours.assign(n_runs=[3, 1, 3], S_ci=5.4), paper.iloc[:0], "toy-gpt2", spread="ci", min_runs=2)
    assert ci["editor"].tolist() == ["ROME", "WilKE"] and ci.loc[1, "S"] == "50.0\u00a0±\u00a05.4"
    caption = present.table1_caption("toy-gpt2", "gpt2-xl", 16, [9])
    assert "16 lifelong edits" in caption and "seed(s) 9" in caption and "GPT2-XL" in caption and "1,024" in caption
    assert "GPT2-XL" not in present.table1_caption("toy-gpt2", "gpt2-xl", 16, [9], with_paper=False)


def test_table1_spread_in_the_authors_form_and_as_an_interval():
    finals = [dict(ES=0.8, PS=0.5, NS=0.1, ERS=0.2, ORS=0.1), dict(ES=0.6, PS=0.5, NS=0.1, ERS=0.2, ORS=0.3),
              dict(ES=0.7, PS=0.5, NS=0.1, ERS=0.2, ORS=0.2)]
    ours = pd.concat([metrics.summarise_runs(finals, editor="WilKE"), metrics.summarise_runs(finals[:1], editor="FT")])
    paper = pd.read_csv(ROOT / "wilke_lib" / "data" / "table1_reported.csv")
    frame = present.table1(ours, paper[paper["model"] == "gpt2-xl"], "toy-gpt2", "gpt2-xl").set_index(["model", "editor"])
    assert frame.loc[("GPT2-XL (paper)", "KE"), "ES"] == "0.1\u00a0±\u00a00.0"
    rows = present.table1(ours, paper.iloc[:0], "toy-gpt2").set_index("editor")
    assert rows.loc["WilKE", "ES"] == "70.0\u00a0±\u00a08.2"           # 10 * sqrt(2/3), np.std as the authors print it
    assert rows.loc["FT", "ES"] == "80.0" and rows.loc["FT", "runs"] == 1
    interval = present.table1(ours, paper.iloc[:0], "toy-gpt2", spread="ci", min_runs=2).set_index("editor")
    assert list(interval.index) == ["WilKE"] and interval.loc["WilKE", "ES"] == "70.0\u00a0±\u00a024.8"  # 4.303 * 10 / sqrt(3)
    with pytest.raises(ValueError):
        present.table1(ours, paper.iloc[:0], "toy-gpt2", spread="sem")


def test_secondary_tables_and_figures_fold_into_a_dropdown(book):
    root, shown = book
    page = present.page("toy-gpt2", "03_lifelong")
    page.table(pd.DataFrame({"editor": ["ROME"], "S": ["9.3 ± 2.4"]}), "runs", "The runs.", dropdown="The runs (1)",
               right=["S"])
    md = shown[-1]
    assert md.startswith(":::::{dropdown} The runs (1)\n") and md.rstrip().endswith(":::::")
    assert "::::{table} The runs.\n:name: toy-gpt2-03-lifelong-runs" in md and "|---|---:|" in md
    page.figure(_figure(), "curve", "A curve.", alt="a line", dropdown="The curve")
    assert shown[-1].startswith(":::::{dropdown} The curve\n") and "````{figure} 03_lifelong_files/curve.png" in shown[-1]


def test_a_block_of_figures_and_tables_folds_into_one_dropdown(tmp_path, monkeypatch):
    monkeypatch.setenv(present.BOOK_DIR_VARIABLE, str(tmp_path / "book"))
    shown: list[str] = []
    monkeypatch.setattr(present, "_display_markdown", shown.append)
    page = present.page("toy-gpt2", "07_causal_tracing")
    with present.dropdown("Causal traces of 2 records"):
        page.figure(_figure(), "trace_a", "Trace a.", alt="a heatmap")
        page.table(pd.DataFrame({"n": [1]}), "records", "The records.", dropdown="The records")
        present.show_markdown("A sentence.")
    assert len(shown) == 1
    outer = shown[0]
    assert outer.startswith("::::::{dropdown} Causal traces of 2 records\n") and outer.rstrip().endswith("\n::::::")
    assert "````{figure} 07_causal_tracing_files/trace_a.png" in outer and ":::::{dropdown} The records" in outer
    assert "A sentence." in outer
    with present.dropdown("Shown as it is", fold=False):
        present.show_markdown("Visible.")
    assert shown[-1] == "Visible."
    with present.dropdown("Nothing"):
        pass
    assert shown[-1] == "Visible."  # an empty block shows no dropdown


# ------------------------------------------------------------------------------------- claims
def test_registry_is_complete_and_names_the_chapters():
    reg = claims.registry()
    assert len(reg) >= 10 and all(c.words and c.section and c.evidence and c.rule and c.title for c in reg.values())
    notebooks = {p.stem for p in (ROOT / "notebooks").glob("*.ipynb")}
    assert {c.chapter for c in reg.values()} <= notebooks
    import nbformat

    for claim in reg.values():  # every chapter that tests a claim records it
        nb = nbformat.read(ROOT / "notebooks" / f"{claim.chapter}.ipynb", as_version=4)
        source = "\n".join(c.source for c in nb.cells if c.cell_type == "code")
        assert f'"{claim.id}"' in source or (claim.rows and "claims_from_table" in source) or \
            ("memit_verdicts" in source and claim.id.startswith("memit")) or \
            ("claims.lifelong_claims" in source and claim.id in LIFELONG_CLAIM_IDS), claim.id


def test_verdicts_from_flags_and_from_a_verdict_table():
    assert claims.verdict_from_flags([True, True]) == "reproduced"
    assert claims.verdict_from_flags([True, False, None]) == "partly"
    assert claims.verdict_from_flags([False]) == "not reproduced"
    assert claims.verdict_from_flags([None]) == "not testable here"
    from wilke_lib.analysis.verdicts import empty_groups, verdict_table

    table = verdict_table([("step-like shape", "p", "60% of the growth", True),
                           ("norm hundreds of times the original", "p", "max 5.2", False)])
    reg = claims.registry()
    assert claims.verdict_from_rows(table, reg["staircase"]) == (
        "partly", "step-like shape: 60% of the growth; norm hundreds of times the original: max 5.2")
    verdict, number = claims.verdict_from_rows(table, reg["buildup_without_flash"])
    assert verdict == "not testable here" and "no flash record" in number
    assert claims.verdict_from_rows(empty_groups(), reg["predefined_layer_causes_flash"]) == (
        "not testable here", "one of the groups is empty")


def test_record_claim_validates_and_writes_the_record_and_its_page_copy(tmp_path, monkeypatch):
    monkeypatch.setenv("WILKE_RESULTS_DIR", str(tmp_path / "results"))
    with pytest.raises(KeyError):
        claims.record_claim("toy-gpt2", "05_toxicity", "no_such_claim", "reproduced", "1")
    with pytest.raises(ValueError, match="belongs to chapter"):
        claims.record_claim("toy-gpt2", "03_lifelong", "toxicity_flash", "reproduced", "1")
    with pytest.raises(ValueError, match="verdict"):
        claims.record_claim("toy-gpt2", "05_toxicity", "toxicity_flash", "maybe", "1")
    copy = tmp_path / "page_files"
    claims.record_claim("toy-gpt2", "05_toxicity", "toxicity_flash", "not reproduced", "0 flagged", copies=[copy],
                        page="toy-gpt2/05_toxicity", label="toy-gpt2-05-toxicity-verdicts", context={"profile": "quick"})
    claims.record_claim("toy-gpt2", "05_toxicity", "toxicity_buildup", "reproduced", "rho 0.99", copies=[copy])
    record = json.loads(claims.claims_path("toy-gpt2", "05_toxicity").read_text())
    assert set(record["claims"]) == {"toxicity_flash", "toxicity_buildup"} and record["context"] == {"profile": "quick"}
    assert json.loads((copy / "claims.json").read_text()) == record
    claims.reset_chapter("toy-gpt2", "05_toxicity", copies=[copy])
    assert not claims.claims_path("toy-gpt2", "05_toxicity").exists() and not (copy / "claims.json").exists()


def _load_script(name: str):
    return importlib.import_module(f"scripts.{name}")


def test_glance_page_shows_recorded_verdicts_and_not_run_for_the_rest(book, monkeypatch, tmp_path):
    root, shown = book
    monkeypatch.setenv("WILKE_RESULTS_DIR", str(tmp_path / "results"))
    for model in ("toy-gpt2", "toy-gptj"):
        (root / model).mkdir(parents=True, exist_ok=True)
    (root / "toy-gpt2" / "05_toxicity.ipynb").write_text(
        '{"cells": [{"outputs": [{"data": {"text/markdown": ":name: toy-gpt2-05-toxicity-verdicts"}}]}]}')
    page = present.page("toy-gpt2", "05_toxicity", profile="default", n_edits=16, seeds=[9])
    page.claim("toxicity_buildup", "reproduced", "rho 0.99", ref="verdicts")
    page.claim("toxicity_flash", "not reproduced", "0 records | flagged", ref="missing_label")
    glance = _load_script("make_glance")
    path = glance.write_glance(root)
    text = path.read_text()
    assert text.startswith("# Results at a glance") and "{list-table}" in text
    assert "`toy-gpt2`" in text and "`toy-gptj`" not in text  # toy-gptj has no executed page
    assert "{bdg-success}`reproduced`" in text and "{numref}`toy-gpt2-05-toxicity-verdicts`" in text
    assert r"0 records \| flagged · {doc}`page </toy-gpt2/05_toxicity>`" in text  # label not on the page: link the page
    rows = claims.glance_rows(root, ["toy-gpt2"])
    verdicts = {r["claim"].id: r["cells"]["toy-gpt2"]["verdict"] for r in rows}
    assert verdicts["toxicity_buildup"] == "reproduced" and verdicts["wilke_beats_sota"] == claims.NOT_RUN
    assert text.count(f"`{claims.NOT_RUN}`") >= len(rows) - 2
    assert "profile `default`, 16 lifelong edits, seed(s) 9" in text
    csv = pd.read_csv(root / "glance_files" / "glance.csv")
    assert len(csv) == len(claims.registry()) and "toy-gpt2 verdict" in csv.columns


def test_make_toc_names_models_in_the_sidebar_and_puts_the_glance_first(tmp_path):
    make_toc = _load_script("make_toc")
    book_dir = tmp_path / "book"
    for model in ("toy-gptj", "toy-gpt2"):
        (book_dir / model).mkdir(parents=True)
        (book_dir / model / "03_lifelong.ipynb").write_text("{}")
    (book_dir / "references.md").write_text("# References")
    toc = make_toc.build_toc(book_dir)
    assert toc["root"] == "intro"
    assert toc["parts"][0] == {"caption": "3. Lifelong editing: Table 1 and curves",
                               "chapters": [{"file": "toy-gpt2/03_lifelong", "title": "toy-gpt2"},
                                            {"file": "toy-gptj/03_lifelong", "title": "toy-gptj"}]}
    (book_dir / "glance.md").write_text("# Results at a glance")
    toc = make_toc.build_toc(book_dir)
    assert toc["root"] == "glance" and toc["parts"][0]["chapters"] == [{"file": "intro"}]


def test_site_extension_helpers():
    spec = importlib.util.spec_from_file_location("wilke_site", ROOT / "book" / "_ext" / "wilke_site.py")
    site = importlib.util.module_from_spec(spec)
    sys.modules["wilke_site"] = site
    spec.loader.exec_module(site)
    assert site.chapter_of("toy-gpt2/03_lifelong") == ("toy-gpt2", 3)
    assert site.chapter_of("intro") is None and site.chapter_of("toy-gpt2/notes") is None
    assert site.page_title("Lifelong editing", "toy-gpt2", 3) == "3. Lifelong editing — toy-gpt2"
    assert site.page_title("3. Lifelong editing — toy-gpt2", "toy-gpt2", 3) == "3. Lifelong editing — toy-gpt2"
    source = site.mathjax_source()
    assert source is None or (source / site.MATHJAX_SCRIPT).is_file()
    assert site.MATHJAX_SKIP.search("tex-svg.js") and site.MATHJAX_SKIP.search("sre/mathmaps/de.json")
    assert not site.MATHJAX_SKIP.search("tex-mml-chtml.js") and not site.MATHJAX_SKIP.search("sre/mathmaps/en.json")


LIFELONG_CLAIM_IDS = {"wilke_beats_sota", "editors_fail_lifelong", "degradation_over_steps", "layer_per_fact",
                      "wilke_delays_collapse", "memit_declines_most", "fig43_shapes"}


def test_chapter_3_records_every_lifelong_claim_it_tests():
    assert set(claims.LIFELONG_TESTS) | {"layer_per_fact"} == LIFELONG_CLAIM_IDS
    assert {c.id for c in claims.chapter_claims("03_lifelong")} == LIFELONG_CLAIM_IDS
