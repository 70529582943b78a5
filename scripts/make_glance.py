#!/usr/bin/env python
"""Write ``book/glance.md``, the "Results at a glance" page, from the verdicts the pages recorded.

One row per claim of the paper (``wilke_lib/data/claims.yaml``, in the paper's words, with its
section and figure or table), one column for the paper and one per model folder of the book. Each
cell is the verdict that the chapter testing the claim computed on that model
(``<book>/<model>/<chapter>_files/claims.json``, written by ``wilke_lib.present.Page.claim``), the
number behind it and a link to the figure or table that shows it; "not run" where the page or its
verdict is missing. Nothing on the page is typed by hand. The table is also written as
``glance_files/glance.csv``. ``scripts/make_toc.py`` calls this script.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import sys
from collections import Counter
from pathlib import Path

from wilke_lib import claims as claims_lib
from wilke_lib.present import VERDICT_BADGES as BADGES, md_escape

REPO = Path(__file__).resolve().parents[1]
MODEL_ORDER = ["toy-gpt2", "toy-gptj"]
PAPER_MODELS = {"toy-gpt2": "GPT2-XL", "toy-gptj": "GPT-J", "gpt2-xl": "GPT2-XL", "gpt-j-6b": "GPT-J"}
FILES = "glance_files"


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


def cell_markdown(book_dir: Path, cell: dict) -> list[str]:
    """The paragraphs of one verdict cell (MyST)."""
    verdict = cell["verdict"]
    lines = [f"{{{BADGES.get(verdict, 'bdg-secondary')}}}`{verdict}`"]
    text = md_escape(cell.get("number", ""))
    if cell.get("note"):
        text += f" *({md_escape(cell['note'])})*"
    if label_exists(book_dir, cell.get("page"), cell.get("label")):
        link = f"{{numref}}`{cell['label']}`"
    elif cell.get("page") and (book_dir / f"{cell['page']}.ipynb").is_file():
        link = f"{{doc}}`page </{cell['page']}>`"
    else:
        link = ""
    lines.append(" · ".join(t for t in (text, link) if t))
    if cell.get("precondition") and verdict != "reproduced":
        lines.append(f"*Precondition:* {md_escape(cell['precondition'])}")
    if cell.get("n"):
        lines.append(f"*n:* {md_escape(cell['n'])}")
    return [line for line in lines if line]


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


def glance_markdown(book_dir: Path, models: list[str]) -> tuple[str, list[dict]]:
    """The page (MyST Markdown) and its rows as flat records (for the CSV)."""
    rows = claims_lib.glance_rows(book_dir, models)
    paper_names = " / ".join(dict.fromkeys(PAPER_MODELS.get(m, m) for m in models)) or "GPT2-XL / GPT-J"
    tally = {m: Counter(r["cells"][m]["verdict"] for r in rows) for m in models}
    order = list(claims_lib.VERDICTS) + [claims_lib.NOT_RUN]
    out = [
        "# Results at a glance",
        "",
        *([f"**{len(rows)} claims of the paper, tested on each organism:** " + "; ".join(
            f"`{m}`: " + ", ".join(f"{tally[m][v]} {v}" for v in order if tally[m][v]) for m in models) + ".", ""]
          if models else []),
        "Each row is a claim of the paper {cite}`hu2024wilke`, in its own words, with the section and the",
        "figure or table where the paper shows it. Each model's cell holds the verdict that the chapter",
        "testing the claim computed on that model, the number behind the verdict and a link to the figure",
        "or table that shows it, with what it rests on (n: records, edits, seeds, and the runs it read). Each",
        "claim's test states a precondition computed from the same runs; the verdicts are",
        "{bdg-success}`reproduced`, {bdg-warning}`partly`, {bdg-danger}`not reproduced` and",
        "{bdg-secondary}`not testable here` (the precondition failed: the cell names it and the value found);",
        f"{{bdg-dark-line}}`{claims_lib.NOT_RUN}` means that no executed page recorded one. The organisms",
        "are far smaller than GPT2-XL and GPT-J, so a verdict says what these runs show, not what the",
        "paper's models would (see {doc}`intro`, and the last section of each chapter). The build's own",
        "runs are far shorter than the paper's 1,024 edits; where a chapter reads the committed",
        "paper-scale runs instead (`make runs`), the verdict's note says so. How each verdict is decided",
        "is listed under the table.",
        "",
        f"Run sizes of the pages' own computations: {run_sizes(rows, models)}" if models
        else "No model's pages have been executed yet.",
        "",
        "````{list-table} The paper's claims and what each model shows.",
        ":header-rows: 1",
        ":name: glance-table",
        ":class: wilke-glance",
        f":widths: {' '.join(['34', '22'] + ['22'] * len(models))}",
        "",
        "* - Claim (section, evidence)",
        f"  - Paper ({paper_names})",
    ]
    out += [f"  - `{m}`" for m in models]
    flat = []
    for row in rows:
        claim = row["claim"]
        out.append(f"* - **{md_escape(claim.title)}**")
        out.append("")
        out.append(f"    {md_escape(claim.words)}")
        out.append("")
        out.append(f"    *{md_escape(claim.section)}, {md_escape(claim.evidence)}; chapter "
                   f"{chapter_number(claim.chapter)}*")
        out.append(f"  - {md_escape(claim.paper)}")
        record = {"claim": claim.id, "title": claim.title, "words": claim.words, "section": claim.section, "evidence": claim.evidence,
                  "chapter": claim.chapter, "paper": claim.paper}
        for model in models:
            cell = row["cells"][model]
            paragraphs = cell_markdown(book_dir, cell)
            out.append(f"  - {paragraphs[0]}")
            for extra in paragraphs[1:]:
                out += ["", f"    {extra}"]
            record.update({f"{model} verdict": cell["verdict"], f"{model} number": cell.get("number", ""),
                           f"{model} note": cell.get("note", ""), f"{model} precondition": cell.get("precondition", ""),
                           f"{model} n": cell.get("n", ""), f"{model} page": cell.get("page") or ""})
        flat.append(record)
    out += ["````", "", f"[data (CSV)]({FILES}/glance.csv)", "", "## How the verdicts are decided", ""]
    for row in rows:
        claim = row["claim"]
        rule = md_escape(claim.rule) + (f" *Precondition:* {md_escape(claim.precondition)}" if claim.precondition else "")
        out += [f"{md_escape(claim.title)} (chapter {chapter_number(claim.chapter)})", f": {rule}", ""]
    return "\n".join(out), flat


def write_glance(book_dir: Path, models: list[str] | None = None) -> Path:
    """Write `<book_dir>/glance.md` and `<book_dir>/glance_files/glance.csv`; return the page's path."""
    book_dir = Path(book_dir)
    models = find_models(book_dir) if models is None else models
    text, flat = glance_markdown(book_dir, models)
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
    args = ap.parse_args(argv)
    path = write_glance(args.book_dir, args.models)
    rows = claims_lib.glance_rows(args.book_dir, args.models or find_models(args.book_dir))
    counts = Counter(c["verdict"] for r in rows for c in r["cells"].values())
    print(f"wrote {path}: {len(rows)} claims; " + ", ".join(f"{k}: {v}" for k, v in counts.most_common()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
