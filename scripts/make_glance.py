#!/usr/bin/env python
"""Write ``book/glance.md``, the "Results at a glance" page, from the verdicts the pages recorded.

The page answers "does it reproduce?" in half a minute, top to bottom:

1. **A verdict in one sentence and a tally per model** (reproduced / partly / not reproduced / not testable
   here, and why the untestable ones are), with ROME's collapse step here against the paper's.
2. **The headline figure** (``glance_files/headline.png``, ``wilke_lib.headline``): S over the lifelong edits
   for ROME, MEMIT and WilKE on both organisms, beside the authors' curves, read from the committed
   paper-scale runs (``runs/<model>/``) as chapter 3 reads them; its numbers in ``glance_files/headline.csv``.
   Below it, folded, the same curves in plotly with the values on hover (plotly.js copied into the book's
   ``_static/``: no network needed).
3. **The claims table**: one row per claim of the paper (``wilke_lib/data/claims.yaml``, with its section
   and figure or table), one column for the paper and one per model folder of the book. Each cell is the
   verdict that the chapter testing the claim computed on that model
   (``<book>/<model>/<chapter>_files/claims.json``, written by ``wilke_lib.present.Page.claim``) with what it
   rests on (n); the number behind it, its precondition and a link to the figure or table that shows it
   are behind a click, as are the paper's words and how the verdict is decided. "not run" where the page
   or its verdict is missing. The table is also written as ``glance_files/glance.csv``.

Nothing on the page is typed by hand. ``scripts/make_toc.py`` calls this script (``make book``,
``make book-only``); ``--no-headline`` (or ``WILKE_GLANCE_HEADLINE=off``) leaves the figure out (it reads the
runs: about half a minute).
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import os
import sys
from collections import Counter
from pathlib import Path
from typing import Any

from wilke_lib import claims as claims_lib
from wilke_lib.present import VERDICT_BADGES as BADGES, md_escape

REPO = Path(__file__).resolve().parents[1]
MODEL_ORDER = ["toy-gpt2", "toy-gptj"]
PAPER_MODELS = {"toy-gpt2": "GPT2-XL", "toy-gptj": "GPT-J", "gpt2-xl": "GPT2-XL", "gpt-j-6b": "GPT-J"}
FILES = "glance_files"
HEADLINE = "headline.png"
INTERACTIVE_ID = "glance-headline-plot"  # the interactive headline figure's div (make check-site hovers over it)
HEADLINE_VARIABLE = "WILKE_GLANCE_HEADLINE"  # "off": no headline figure (the tests' small books)
COLUMN_WIDTHS = ("28", "22", "25")  # claim, paper, each model (per cent of the table)


def find_models(book_dir: Path) -> list[str]:
    """Model folders of the book (folders with executed notebooks), in display order."""
    dirs = [d.name for d in book_dir.iterdir()
            if d.is_dir() and not d.name.startswith(("_", ".")) and any(d.glob("*.ipynb"))]
    return sorted(dirs, key=lambda m: (MODEL_ORDER.index(m) if m in MODEL_ORDER else len(MODEL_ORDER), m))


def chapter_number(chapter: str) -> str:
    return str(int(chapter.split("_")[0])) if chapter[:2].isdigit() else chapter


def label_exists(book_dir: Path, page: str | None, label: str | None) -> bool:
    """Whether the executed notebook of `page` defines `label` (a figure or table name)."""
    if not (page and label):
        return False
    path = book_dir / f"{page}.ipynb"
    return path.is_file() and f":name: {label}" in path.read_text(encoding="utf-8")


def link_markdown(book_dir: Path, cell: dict) -> str:
    """A link to the figure or table that shows the verdict, else to its page ("" without either)."""
    if label_exists(book_dir, cell.get("page"), cell.get("label")):
        return f"{{numref}}`{cell['label']}`"
    if cell.get("page") and (book_dir / f"{cell['page']}.ipynb").is_file():
        return f"{{doc}}`page </{cell['page']}>`"
    return ""


def cell_markdown(book_dir: Path, cell: dict) -> list[str]:
    """The paragraphs of one verdict cell (MyST): the badge, the number behind the verdict with the link to
    its figure or table, the precondition (unless reproduced) and n."""
    verdict = cell["verdict"]
    lines = [f"{{{BADGES.get(verdict, 'bdg-secondary')}}}`{verdict}`"]
    text = md_escape(cell.get("number", ""))
    if cell.get("note"):
        text += f" *({md_escape(cell['note'])})*"
    lines.append(" · ".join(t for t in (text, link_markdown(book_dir, cell)) if t))
    if cell.get("precondition") and verdict != "reproduced":
        lines.append(f"*Precondition:* {md_escape(cell['precondition'])}")
    if cell.get("n"):
        lines.append(f"*n:* {md_escape(cell['n'])}")
    return [line for line in lines if line]


def dropdown(title: str, paragraphs: list[str], indent: str = "    ") -> list[str]:
    """A closed sphinx-design dropdown holding `paragraphs`, as lines indented by `indent` (a list-table cell)."""
    out = [f"{indent}:::{{dropdown}} {title}", f"{indent}:class-container: wilke-details"]
    for paragraph in paragraphs:
        out += ["", f"{indent}{paragraph}"]
    return out + [f"{indent}:::"]


def compact_cell(book_dir: Path, cell: dict) -> list[str]:
    """One model's cell of the claims table: the badge and n in view, the rest behind a click."""
    badge, *rest = cell_markdown(book_dir, cell)
    n = next((p for p in rest if p.startswith("*n:*")), "")
    details = [p for p in rest if p != n]
    lines = [f"  - {badge}"]
    if n:
        lines += ["", f"    {n}"]
    if details:
        lines += [""] + dropdown("details", details)
    elif cell.get("page") and link_markdown(book_dir, cell):
        lines += ["", f"    {link_markdown(book_dir, cell)}"]
    return lines


def rule_markdown(claim) -> str:
    """How the claim's verdict is decided; for a claim decided from a chapter's verdict table, which rows of it."""
    rule = md_escape(claim.rule)
    if claim.rows and claim.rule.lower().startswith("from the verdict table"):
        rows = ", ".join(f"“{md_escape(r)}”" for r in claim.rows)
        rule += (f" The rows that decide it: {rows}; every row observed -> reproduced, none -> not reproduced, a mix "
                 "-> partly, no row that applies -> not testable here.")
    return rule


REASONS = (("runs missing or unfinished", ("missing", "finished runs", "runs of both", "was run")),
           ("no working model left (S below 5, or collapsed)", ("at least 5", ">= 5", "still works")),
           ("no flash record by App. B's definition", ("flash",)))


def untestable_reason(cell: dict) -> str:
    """Why a "not testable here" verdict is: the kind of precondition that failed, from its words."""
    text = f"{cell.get('precondition', '')} {cell.get('number', '')}".lower()
    for reason, words in REASONS:
        if any(w in text for w in words):
            return reason
    return "another precondition"


def tally_markdown(rows: list[dict], model: str) -> str:
    """`model`'s verdicts counted, as badges, with the reasons of the untestable ones."""
    counts = Counter(r["cells"][model]["verdict"] for r in rows)
    order = list(claims_lib.VERDICTS) + [claims_lib.NOT_RUN]
    text = " ".join(f"{{{BADGES.get(v, 'bdg-secondary')}}}`{counts[v]} {v}`" for v in order if counts[v])
    reasons = Counter(untestable_reason(r["cells"][model]) for r in rows
                      if r["cells"][model]["verdict"] == "not testable here")
    if reasons:
        text += " (why not testable: " + "; ".join(f"{n}× {why}" for why, n in reasons.most_common()) + ")"
    return f"- `{model}`: {text}"


def _steps(values: list[float]) -> str:
    return " / ".join("none" if v != v else f"{v:,.0f}" for v in values)


def verdict_sentence(rows: list[dict], models: list[str], collapse: dict | None = None) -> str:
    """The page's verdict in one sentence, from the counts (and ROME's collapse steps, when the runs were read)."""
    counts = {m: Counter(r["cells"][m]["verdict"] for r in rows) for m in models}
    per_model = lambda v: " and ".join(f"{counts[m][v]}" + (f" (`{m}`)" if len(models) > 1 else "")  # noqa: E731
                                       for m in models)
    whole = all(counts[m]["reproduced"] == len(rows) for m in models)
    untestable = {m: [untestable_reason(r["cells"][m]) for r in rows if r["cells"][m]["verdict"] == "not testable here"]
                  for m in models}
    rest = {m: len(rows) - counts[m]["reproduced"] - counts[m]["not reproduced"] for m in models}
    most = all(len(untestable[m]) > rest[m] / 2 for m in models)
    text = (f"On these small organisms the paper is reproduced {'in full' if whole else 'only in part'}: of its "
            f"{len(rows)} claims, {per_model('reproduced')} are reproduced, {per_model('not reproduced')} contradicted, "
            f"and {'most of ' if most else ''}the rest are *not testable here* or only partly reproduced")
    collapsed = REASONS[1][0], REASONS[2][0]  # no working model, no flash record: both follow from the collapse
    mainly = all(sum(r in collapsed for r in untestable[m]) > len(untestable[m]) / 2 for m in models if untestable[m])
    if collapse:
        paper = {PAPER_MODELS.get(m, m): p for m, (_, p) in collapse.items() if p == p}
        if len(set(paper.values())) == 1:
            against = f"{_steps(list(paper.values())[:1])} on {' and '.join(paper)}"
        else:
            against = " and ".join(f"{_steps([v])} on {name}" for name, v in paper.items())
        here = " and ".join(f"{_steps(steps)} edits on `{m}`" for m, (steps, _) in collapse.items())
        text += (", mainly because" if mainly and any(untestable.values()) else ";") + (
            f" the editors collapse far sooner than on the paper's models (ROME's S falls below half its best after "
            f"{here}, one number per finished seed"
            + (f", against {against}" if paper else "") + ")")
    return f"**Verdict.** {text}."


def headline_markdown(panels: list, figure: str) -> list[str]:
    """The headline figure with its numbered caption."""
    from wilke_lib import headline

    def seeds(p) -> str:
        parts = []
        for editor in headline.EDITORS:
            got = p.seeds.get(editor, [])
            if got:
                parts.append(f"{editor} {len(got)} ({', '.join(map(str, got))})")
            elif editor in p.pending:
                parts.append(f"{editor} none finished")
        return ", ".join(parts)

    pending = "; ".join(f"{editor} on `{p.model}`, {text}" for p in panels for editor, text in p.pending.items())
    n_edits = max(p.n_edits for p in panels)
    caption = (
        f"S, the paper's harmonic mean of ES, PS, NS, ERS and ORS (in %), over {n_edits:,} lifelong edits with rollback, "
        "for ROME, MEMIT and WilKE on each organism (solid) and on the paper's model it stands in for (dashed: the "
        "authors' curves, the mean of their three runs; GPT2-XL beside `toy-gpt2`, GPT-J beside `toy-gptj`). An "
        "organism's curve is the mean over the seeds whose run finished, at every checkpoint they share; seeds: "
        + "; ".join(f"`{p.model}`: {seeds(p)}" for p in panels) + "."
        + (f" Dotted: an editor with no finished run, drawn from its unfinished run up to its last checkpoint ({pending})."
           if pending else "")
        + " WilKE is the layer rule as released, which gave the paper's curves; WilKE (Eq. 10) is the rule of the "
        "paper's text (organisms only). Log-2 step axis; the grey dotted line marks step 64, where ROME collapses on "
        "both paper models. Sources: the paper-scale runs of `make runs` ("
        + ", ".join(f"`runs/{p.model}/`" for p in panels)
        + ", read as chapter 3 reads them) and the authors' curves (`wilke_lib/data/curves_reported.csv`); the numbers "
        f"drawn: [headline.csv]({FILES}/headline.csv).")
    alt = ("Two panels of S in percent against the number of lifelong edits on a log scale, one line per editor: "
           "each organism's curves fall to near zero within tens of edits, the paper's curves later.")
    return [f"```{{figure}} {figure}", ":name: glance-headline", f":alt: {alt}", ":width: 100%", "",
            caption, "```"]


def interactive_markdown(panels: list) -> list[str]:
    """The headline figure again, interactive (plotly, offline), in a dropdown below the static one."""
    from wilke_lib import headline

    html = headline.interactive_html(panels, INTERACTIVE_ID, f"_static/{headline.PLOTLY_JS}")
    return ["````{dropdown} The same curves, interactive: hover over a point for its S and the seeds' values; "
            "click an editor in the legend to hide it", ":name: glance-headline-interactive", "", html, "````"]


def save_headline(book_dir: Path, panels: list) -> None:
    """Draw the headline figure of `panels` (`wilke_lib.headline.Panel`) into `<book_dir>/glance_files/` with
    its numbers as CSV."""
    from wilke_lib import headline

    fig = headline.headline_figure(panels)
    (book_dir / FILES).mkdir(parents=True, exist_ok=True)
    fig.savefig(book_dir / FILES / HEADLINE, dpi=headline.DPI, bbox_inches="tight", metadata={"Software": None})
    headline.headline_frame(panels).to_csv(book_dir / FILES / "headline.csv", index=False, float_format="%.4g")
    headline.copy_plotly_js(book_dir / "_static")


def draw_headline(book_dir: Path, models: list[str]) -> tuple[list, str]:
    """Read the organisms' runs and draw the headline figure (`save_headline`); (panels, "") or ([], why it
    was not drawn)."""
    organisms = [m for m in models if m in MODEL_ORDER]
    if not organisms:
        return [], "no organism among the book's models"
    try:
        from wilke_lib import headline

        panels = [headline.panel_data(m) for m in organisms]
        panels = [p for p in panels if len(p.ours) or len(p.unfinished)]
        if not panels:
            return [], "no paper-scale run on disk (make runs)"
        save_headline(book_dir, panels)
        return panels, ""
    except Exception as error:  # noqa: BLE001 - the page must be written even when the runs cannot be read
        return [], f"{type(error).__name__}: {error}"


def run_sizes(rows: list[dict], models: list[str]) -> str:
    """What the verdicts of each model were computed with (the pages' profile and sizes)."""
    parts = []
    for model in models:
        contexts = [r["cells"][model].get("context") or {} for r in rows]
        profiles = Counter(c.get("profile") for c in contexts if c.get("profile"))
        edits = Counter(c.get("n_edits") for c in contexts if c.get("n_edits"))
        seeds = Counter(json.dumps(c.get("seeds")) for c in contexts if c.get("seeds"))
        if not profiles:
            parts.append(f"`{model}`: no verdict recorded yet")
            continue
        text = f"`{model}`: profile `{profiles.most_common(1)[0][0]}`"
        if edits:
            text += f", {edits.most_common(1)[0][0]} lifelong edits"
        if seeds:
            text += f", seed(s) {', '.join(map(str, json.loads(seeds.most_common(1)[0][0])))}"
        parts.append(text)
    return "; ".join(parts) + "."


def glance_markdown(book_dir: Path, models: list[str], panels: list | None = None,
                    headline_note: str = "") -> tuple[str, list[dict]]:
    """The page (MyST Markdown) and its rows as flat records (for the CSV). `panels`: the headline figure's data
    (`wilke_lib.headline.Panel`, drawn into glance_files/ by `draw_headline`); none: no figure."""
    rows = claims_lib.glance_rows(book_dir, models)
    paper_names = " / ".join(dict.fromkeys(PAPER_MODELS.get(m, m) for m in models)) or "GPT2-XL / GPT-J"
    collapse = None
    if panels:
        from wilke_lib import headline

        collapse = headline.collapse_summary(panels) or None
    out = ["# Results at a glance", ""]
    if models:
        out += [verdict_sentence(rows, models, collapse), ""]
        out += [tally_markdown(rows, m) for m in models] + [""]
    else:
        out += ["No model's pages have been executed yet.", ""]
    if panels:
        out += headline_markdown(panels, f"{FILES}/{HEADLINE}") + [""]
        out += interactive_markdown(panels) + [""]
        if len(models) > 1 and (book_dir / "side_by_side.md").exists():
            out += ["Every chapter's main figure on both organisms, in tabs: {doc}`side_by_side`.", ""]
    elif headline_note:
        out += [f"*The headline figure was not drawn: {md_escape(headline_note)}.*", ""]
    out += [
        "## The paper's claims",
        "",
        "Each claim of the paper {cite}`hu2024wilke` with the verdict that its chapter computed on each model",
        "and what it rests on (*n*: records, edits, seeds). *details*: the number behind the verdict, the",
        "precondition the test checked and a link to the figure or table; *words, test*: the paper's words and",
        "how the verdict is decided. {bdg-secondary}`not testable here`: the precondition failed (never a win",
        f"or a loss); {{bdg-dark-line}}`{claims_lib.NOT_RUN}`: no executed page recorded a verdict. A verdict says what",
        "these small organisms show, not what GPT2-XL and GPT-J would (see {doc}`intro`).",
        "",
        "````{list-table} The paper's claims and what each model shows.",
        ":header-rows: 1",
        ":name: glance-table",
        ":class: wilke-glance",
        f":widths: {' '.join(COLUMN_WIDTHS[:2] + (COLUMN_WIDTHS[2],) * len(models))}",
        "",
        "* - Claim",
        f"  - Paper ({paper_names})",
    ]
    out += [f"  - `{m}`" for m in models]
    flat = []
    for row in rows:
        claim = row["claim"]
        out += [f"* - **{md_escape(claim.title)}**", "",
                f"    *{md_escape(claim.section)}, {md_escape(claim.evidence)}; chapter {chapter_number(claim.chapter)}*",
                ""]
        test = [f"{md_escape(claim.words)}", f"*How it is decided:* {rule_markdown(claim)}"]
        if claim.precondition:
            test.append(f"*Precondition:* {md_escape(claim.precondition)}")
        out += dropdown("words, test", test)
        out.append(f"  - {md_escape(claim.paper)}")
        record: dict[str, Any] = {"claim": claim.id, "title": claim.title, "words": claim.words,
                                  "section": claim.section, "evidence": claim.evidence, "chapter": claim.chapter,
                                  "paper": claim.paper, "rule": claim.rule, "precondition": claim.precondition}
        for model in models:
            cell = row["cells"][model]
            out += compact_cell(book_dir, cell)
            record.update({f"{model} verdict": cell["verdict"], f"{model} number": cell.get("number", ""),
                           f"{model} note": cell.get("note", ""), f"{model} precondition": cell.get("precondition", ""),
                           f"{model} n": cell.get("n", ""), f"{model} page": cell.get("page") or ""})
        flat.append(record)
    out += ["````", "",
            f"Run sizes of the pages' own computations: {run_sizes(rows, models)} The build's own runs are far shorter "
            "than the paper's 1,024 edits; where a chapter reads the committed paper-scale runs instead (`make runs`), "
            "the verdict's *n* says so." if models else "",
            "", f"The table as data: [glance.csv]({FILES}/glance.csv).", ""]
    return "\n".join(out), flat


def write_glance(book_dir: Path, models: list[str] | None = None, headline: bool = False,
                 panels: list | None = None) -> Path:
    """Write `<book_dir>/glance.md` and `<book_dir>/glance_files/glance.csv`; return the page's path. With
    `headline`, the headline figure is drawn from the runs on disk first (`draw_headline`); with `panels`, from
    those (`wilke_lib.headline.Panel`, e.g. a test's)."""
    book_dir = Path(book_dir)
    models = find_models(book_dir) if models is None else models
    if panels:
        save_headline(book_dir, panels)
        why = ""
    else:
        panels, why = draw_headline(book_dir, models) if headline else ([], "")
    if why:
        print(f"make_glance: the headline figure was not drawn: {why}", file=sys.stderr)
    text, flat = glance_markdown(book_dir, models, panels, why)
    (book_dir / FILES).mkdir(exist_ok=True)
    buffer = io.StringIO()
    if flat:
        writer = csv.DictWriter(buffer, fieldnames=list(flat[0]))
        writer.writeheader()
        writer.writerows(flat)
    (book_dir / FILES / "glance.csv").write_text(buffer.getvalue(), encoding="utf-8")
    path = book_dir / "glance.md"
    path.write_text(text + "\n", encoding="utf-8")
    return path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--book-dir", type=Path, default=REPO / "book")
    ap.add_argument("--models", nargs="*", default=None, help="model folders (default: every one of the book)")
    ap.add_argument("--no-headline", action="store_true",
                    help=f"leave the headline figure out (it reads the runs; also {HEADLINE_VARIABLE}=off)")
    args = ap.parse_args(argv)
    headline = not args.no_headline and os.environ.get(HEADLINE_VARIABLE, "on").lower() != "off"
    path = write_glance(args.book_dir, args.models, headline=headline)
    rows = claims_lib.glance_rows(args.book_dir, args.models or find_models(args.book_dir))
    counts = Counter(c["verdict"] for r in rows for c in r["cells"].values())
    print(f"wrote {path}: {len(rows)} claims; " + ", ".join(f"{k}: {v}" for k, v in counts.most_common()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
