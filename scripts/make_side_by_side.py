#!/usr/bin/env python
"""Write ``book/side_by_side.md``, "The organisms side by side": each chapter's main figure for every model of
the book in tabs, one click apart, so that a reader compares the organisms without flipping between pages; each
chapter in a dropdown (chapter 3, the paper's central result, open).

The figures are those the executed pages already show (``book/<model>/<chapter>.ipynb``): a chapter's main figure
is the first numbered figure of its page that is not folded into a dropdown. Each tab shows it at the column's
width with the first sentence of its caption and a numbered link to it on its page, where the caption, the
data and the text around it are. Nothing is computed or typed here; the papermill page per model stays the
source. ``scripts/make_toc.py`` calls this script after the glance page (``make book``, ``make book-only``).
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PAGE = "side_by_side.md"
OPEN = ("03_",)
"""The chapters shown open (the paper's central result); the others one click away, so that the page stays short."""
TITLE = "The organisms side by side"
FIGURE = re.compile(r"^````\{figure\} (?P<src>\S+)\n:name: (?P<name>\S+)\n:alt: (?P<alt>[^\n]*)\n(?::[^\n]*\n)*\n"
                    r"(?P<caption>[^\n]+)", re.M)


def find_models(book_dir: Path) -> list[str]:
    sys.path.insert(0, str(REPO))
    from scripts.make_glance import find_models as glance_models

    return glance_models(book_dir)


def main_figure(notebook: Path) -> dict | None:
    """{"src", "name", "alt", "caption"} of the first figure of an executed page outside a dropdown (None: none)."""
    cells = json.loads(notebook.read_text(encoding="utf-8"))["cells"]
    for cell in cells:
        for output in cell.get("outputs", []):
            text = "".join(output.get("data", {}).get("text/markdown", ""))
            if text.lstrip().startswith("````{figure}") and (found := FIGURE.search(text.lstrip())):
                return found.groupdict()
    return None


ABBREVIATIONS = ("e.g.", "i.e.", "vs.", "Fig.", "Eq.", "Sec.", "et al.")


def first_sentence(caption: str, at_least: int = 40) -> str:
    """The caption up to its first full stop outside a formula and past `at_least` characters (a figure's caption
    starts by saying what it shows)."""
    inside_math = False
    for i, ch in enumerate(caption):
        inside_math ^= ch == "$"
        if (ch == "." and not inside_math and i >= at_least and caption[i + 1:i + 2] in ("", " ")
                and not caption[:i + 1].endswith(ABBREVIATIONS)):
            return caption[:i + 1]
    return caption


def chapter_title(notebook: Path) -> str:
    """The chapter's title: its first Markdown heading without the model's name."""
    for cell in json.loads(notebook.read_text(encoding="utf-8"))["cells"]:
        if cell["cell_type"] == "markdown":
            for line in "".join(cell["source"]).splitlines():
                if line.startswith("# "):
                    return line[2:].split(" — ")[0].strip()
    return notebook.stem


def side_by_side_markdown(book_dir: Path, models: list[str]) -> str:
    lines = [f"# {TITLE}", "",
             "Each chapter's main figure on every organism, in tabs: the same axes and the same editors, so that "
             "what differs between the organisms is seen in one place. Open a chapter, then switch organisms with "
             "the tabs (the choice carries over to the other chapters). The caption's first sentence is repeated "
             "under each figure; the full caption, the data and the discussion are on the chapter's page (the "
             "link under the figure).", ""]
    stems = sorted({p.stem for m in models for p in (book_dir / m).glob("[0-9][0-9]_*.ipynb")})
    for stem in stems:
        figures = {m: main_figure(book_dir / m / f"{stem}.ipynb") for m in models if (book_dir / m / f"{stem}.ipynb").is_file()}
        figures = {m: f for m, f in figures.items() if f is not None}
        if not figures:
            continue
        first = next(iter(figures))
        lines += [f":::::{{dropdown}} {int(stem[:2])}. {chapter_title(book_dir / first / f'{stem}.ipynb')}"]
        lines += [":open:"] if stem.startswith(OPEN) else []
        lines += ["", "::::{tab-set}"]
        for model, fig in figures.items():
            lines += [f":::{{tab-item}} {model}", f":sync: {model}", "",
                      f"```{{image}} {model}/{fig['src']}", f":alt: {fig['alt']}", ":width: 100%", "```", "",
                      f"{first_sentence(fig['caption'])} {{numref}}`On its page: Fig. %s <{fig['name']}>` of "
                      f"[{model}'s chapter {int(stem[:2])}]({model}/{stem}.ipynb).", "", ":::"]
        lines += ["::::", ":::::", ""]
    return "\n".join(lines)


def write_side_by_side(book_dir: Path) -> Path | None:
    """Write the page when the book has two models or more (None otherwise: nothing to set side by side)."""
    models = find_models(book_dir)
    path = book_dir / PAGE
    if len(models) < 2:
        path.unlink(missing_ok=True)
        return None
    path.write_text(side_by_side_markdown(book_dir, models), encoding="utf-8")
    return path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--book-dir", type=Path, default=REPO / "book")
    args = ap.parse_args(argv)
    path = write_side_by_side(args.book_dir)
    print(f"wrote {path}" if path else "side by side: fewer than two models in the book, no page")
    return 0


if __name__ == "__main__":
    sys.exit(main())
