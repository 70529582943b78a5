"""The book's pages: numbered figures and full tables, each with its data beside it, and the claims.

A *page* is one executed notebook, `<book>/<model slug>/<chapter>.ipynb` (scripts/run_notebooks.py
writes them); a notebook starts it with `page(model_name, "03_lifelong")`. Then

* `Page.figure(fig, name, caption, alt=..., data=...)` saves `<chapter>_files/<name>.png` beside the
  page (and the same PNG as `figures/<model>/<NN>_<name>.png`, the repository's export of every figure,
  `WILKE_FIGURES_DIR`), the figure's data as `<name>.csv` (a DataFrame) or `<name>.json` (anything else), and
  displays a MyST `figure` directive: the figure, its caption under it (numbered "Fig. N.k" per
  chapter by book/_ext/wilke_site.py; `paper="Fig. 43"` names the paper's figure), its alt text and
  links to the full-size PNG and to the data;
* `Page.table(frame, name, caption)` saves the CSV and displays a MyST `table` ("Table N.k") with
  every cell in full (no "…"); an empty frame shows a sentence instead of an empty table;
* `dropdown="..."` (of either) folds a secondary figure or table behind a closed MyST `{dropdown}`
  with that title: still numbered, linked and searchable, but the page stays short; `with
  dropdown(title):` folds all that a block shows behind one;
* `Page.claim(...)` and `Page.claims_from_table(...)` record the verdicts of the paper's claims that
  the page tests (`wilke_lib.claims`), read by the book's "Results at a glance" page.

`table1(...)` lays out Table 1 as the paper prints it: editors as rows, the paper's block for the model
this organism stands in for, then this organism's block, six metric columns.

The book folder is `WILKE_BOOK_DIR` (run_notebooks.py sets it to `book/`). Without it the files go to
`results/<model slug>/pages/`, so that a test or an ad-hoc papermill run never writes into the book.
Links in the Markdown are relative to the page (`<chapter>_files/<name>.png`), so they hold wherever
the book folder is.

The module is longer than 400 lines: a page's figures, tables, Table 1 in the paper's layout and claim
records share the page's numbering and files, and read best together.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import re
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from wilke_lib import claims as claims_lib
from wilke_lib import registry as editor_registry
from wilke_lib.results import figures_dir, model_slug, plain, results_dir, write_text_atomic

BOOK_DIR_VARIABLE = "WILKE_BOOK_DIR"


class SavedFile(type(Path())):
    """The path of a file a page saved. A notebook cell that ends with `page.figure(...)` or
    `page.table(...)` shows nothing more than the figure or table: no `PosixPath(...)` line."""

    def _ipython_display_(self) -> None:
        pass
DPI = 150
WIDE_INCHES = 7.0  # figures wider than this are shown at the column width, a click opens the full size
TABLE1_METRICS = ("S", "ES", "PS", "NS", "ERS", "ORS")
EDITOR_ORDER: tuple[str, ...] = (tuple(s.label for s in editor_registry.SPECS if s.name != "wilke")
                                 + (editor_registry.spec("wilke").label,))
"""The rows of Table 1: the registry's labels in its order, WilKE as released last, as the paper prints it."""
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
VERDICT_BADGES = {"reproduced": "bdg-success", "partly": "bdg-warning", "not reproduced": "bdg-danger",
                  "not testable here": "bdg-secondary", claims_lib.NOT_RUN: "bdg-dark-line"}


def book_dir() -> Path | None:
    """The book folder given by `WILKE_BOOK_DIR`, or None."""
    value = os.environ.get(BOOK_DIR_VARIABLE)
    return Path(value) if value else None


def _check_name(kind: str, name: str) -> str:
    if not _NAME.match(name):
        raise ValueError(f"{kind} {name!r}: use letters, digits, '_', '-' and '.' only")
    return name


def files_dir(model_name: str, chapter: str) -> Path:
    """`<book>/<model slug>/<chapter>_files/` (or under `results/<model slug>/pages/`), created."""
    root = book_dir()
    base = root / model_slug(model_name) if root else results_dir(model_name, "pages")
    path = base / f"{_check_name('chapter', chapter)}_files"
    path.mkdir(parents=True, exist_ok=True)
    return path


def make_label(*parts: str) -> str:
    """A Sphinx label: lower case, words joined by '-'."""
    return re.sub(r"[^a-z0-9]+", "-", "-".join(parts).lower()).strip("-")


# ------------------------------------------------------------------------------------ Markdown
_MD_SPECIAL = re.compile(r"([\\`*_{}\[\]<>#|$~^])")
_PLACEHOLDER = re.compile(r"<([A-Za-z_][\w -]*)>")


_BREAKING_SPACE = re.compile(r"[ \t\r\n\f\v]+")


def one_line(text: object) -> str:
    """`text` on one line, runs of spaces and line breaks made one space; a no-break space stays."""
    return _BREAKING_SPACE.sub(" ", str(text)).strip()


def md_escape(text: object) -> str:
    """Plain text as Markdown that renders as the same text (one line)."""
    return _MD_SPECIAL.sub(r"\\\1", one_line(text))


def format_value(value: object, digits: int = 4) -> str:
    """A table cell: yes/no for booleans, "–" for missing, integers in full, floats with `digits`
    significant digits (scientific notation below 1e-3 and at 1e5 and above)."""
    if value is None or (isinstance(value, (float, np.floating)) and math.isnan(value)):
        return "–"
    if isinstance(value, (bool, np.bool_)):
        return "yes" if value else "no"
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        magnitude = abs(float(value))
        if magnitude == 0:
            return "0"
        if magnitude < 1e-3 or magnitude >= 1e5:
            return f"{value:.{max(1, digits - 1)}e}"
        return f"{value:.{digits}g}" if magnitude < 10 ** digits else f"{value:.0f}"
    if isinstance(value, (list, tuple)):
        return ", ".join(format_value(v, digits) for v in value)
    return str(value)


def _keeps_index(frame: pd.DataFrame) -> bool:
    return bool(any(frame.index.names)) or not isinstance(frame.index, pd.RangeIndex)


def markdown_table(frame: pd.DataFrame, *, index: bool | None = None, digits: int = 4, escape: bool = True,
                   right: Sequence[str] = ()) -> str:
    """A GitHub-style Markdown table of every row and cell of `frame`, text in full; numeric columns
    and the columns named in `right` (numbers written as text, "19.3 ± 5.6") right-aligned."""
    frame = frame.to_frame() if isinstance(frame, pd.Series) else frame
    if index if index is not None else _keeps_index(frame):
        frame = frame.reset_index()
    cell = md_escape if escape else (lambda t: one_line(t).replace("|", "\\|"))
    names = [" / ".join(map(str, c)) if isinstance(c, tuple) else str(c) for c in frame.columns]
    numeric = [(pd.api.types.is_numeric_dtype(frame[c]) and not pd.api.types.is_bool_dtype(frame[c])) or c in right
               for c in frame.columns]
    lines = ["| " + " | ".join(cell(n) for n in names) + " |",
             "|" + "|".join("---:" if num else "---" for num in numeric) + "|"]
    for row in frame.itertuples(index=False):
        lines.append("| " + " | ".join(cell(format_value(v, digits)) for v in row) + " |")
    return "\n".join(lines)


_FOLDED: list[list[str]] = []  # the Markdown shown inside the open `dropdown(...)` blocks, innermost last


@contextlib.contextmanager
def dropdown(title: str, fold: bool = True):
    """Show what the block displays (figures, tables, text) behind one closed dropdown titled `title`, e.g. the
    secondary runs of a chapter; with `fold` false the block is shown as it is."""
    if not fold:
        yield
        return
    _FOLDED.append([])
    try:
        yield
    finally:
        body = _FOLDED.pop()
    if body:
        show_markdown(in_dropdown(title, "\n\n".join(body) + "\n"))


def show_markdown(text: str) -> None:
    """Display Markdown (MyST in the book) as the output of the cell; printed outside IPython. Inside a
    `dropdown(...)` block it is kept for the dropdown."""
    if _FOLDED:
        _FOLDED[-1].append(text)
        return
    _display_markdown(text)


def _display_markdown(text: str) -> None:
    try:
        from IPython import get_ipython
        from IPython.display import display
    except ImportError:
        print(text)
        return
    if get_ipython() is None:
        print(text)
        return
    display({"text/markdown": text, "text/plain": text}, raw=True)


def in_dropdown(title: str, body: str) -> str:
    """`body` (MyST) behind a closed `{dropdown}` titled `title` (one line): a colon fence of at least five, longer
    than any colon fence in `body`, so that the `::::{table}`, the backtick figure fence or a dropdown inside nests."""
    inner = max((len(run) for run in re.findall(r"^(:{3,})", body, flags=re.MULTILINE)), default=0)
    fence = ":" * max(5, inner + 1)
    return "\n".join([f"{fence}{{dropdown}} {' '.join(title.split())}", "", body, fence])


def _write_bytes_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _release(fig) -> None:
    """Close a pyplot figure, so that the inline backend does not show it a second time."""
    pyplot = sys.modules.get("matplotlib.pyplot")
    if pyplot is not None and getattr(fig, "number", None) is not None and pyplot.fignum_exists(fig.number):
        pyplot.close(fig)


def save_data(data, path_stem: Path) -> Path | None:
    """Write a figure's or table's data: a DataFrame / Series as CSV, anything else as JSON."""
    if data is None:
        return None
    if isinstance(data, pd.Series):
        data = data.to_frame()
    if isinstance(data, pd.DataFrame):
        path = path_stem.with_suffix(".csv")
        write_text_atomic(path, data.to_csv(index=_keeps_index(data), float_format="%.8g"))
    else:
        path = path_stem.with_suffix(".json")
        write_text_atomic(path, json.dumps(_jsonable(data), indent=1, allow_nan=True))
    return path


def _jsonable(obj):
    if isinstance(obj, pd.DataFrame):
        return json.loads(obj.to_json(orient="records", double_precision=10))
    if isinstance(obj, pd.Series):
        return _jsonable(obj.to_frame())
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, (np.integer, np.floating)):
        return obj.item()
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    return plain(obj)


# ------------------------------------------------------------------------------------ the page
@dataclass
class Page:
    """One page of the book: `<book>/<model slug>/<chapter>.ipynb` and its `<chapter>_files/`."""

    model_name: str
    chapter: str
    context: dict = field(default_factory=dict)

    @property
    def slug(self) -> str:
        return model_slug(self.model_name)

    @property
    def docname(self) -> str:
        """The page's name in the book, e.g. "toy-gpt2/03_lifelong"."""
        return f"{self.slug}/{self.chapter}"

    def files(self) -> Path:
        return files_dir(self.model_name, self.chapter)

    def link(self, filename: str) -> str:
        """The path of a file of the page, relative to the page."""
        return f"{self.chapter}_files/{filename}"

    def export_path(self, name: str) -> Path:
        """Where figure `name` is exported besides the page: `figures/<model>/<NN>_<name>.png` (NN: the chapter's
        number), so that the repository's figures are found by chapter."""
        prefix = self.chapter[:2] if self.chapter[:2].isdigit() else self.chapter
        return figures_dir(self.model_name) / f"{prefix}_{name}.png"

    def label(self, name: str) -> str:
        """The Sphinx label of figure or table `name` of this page (unique in the book)."""
        return make_label(self.slug, self.chapter, name)

    def _links(self, *paths: Path | None) -> str:
        kinds = {".png": "full-size PNG", ".csv": "data (CSV)", ".json": "data (JSON)"}
        return " · ".join(f"[{kinds.get(p.suffix, p.name)}]({self.link(p.name)})" for p in paths if p is not None)

    @staticmethod
    def _caption(caption: str, paper: str | None) -> str:
        """One line of Markdown; a placeholder such as `<model>` is escaped, else it is read as an HTML tag
        and vanishes."""
        caption = _PLACEHOLDER.sub(r"\\<\1\\>", " ".join(caption.split()))
        return f"{caption} (Paper: {paper}.)" if paper else caption

    def figure(self, fig, name: str, caption: str, *, alt: str, data=None, paper: str | None = None,
               legend: str | None = None, width: str | None = None, dropdown: str | None = None) -> Path:
        """Save `fig` (PNG) and `data` beside the page and display it as a numbered figure.

        caption: Markdown, one paragraph, said from what the figure shows; paper: the paper's
        figure ("Fig. 43"), named in the caption; alt: what a reader who cannot see the image needs
        (required); legend: a second paragraph under the caption; width: CSS width (wide figures
        are shown at the column width and open at full size on a click); dropdown: the title of a closed
        dropdown that holds the figure (a secondary figure: still numbered and linked)."""
        if not alt or not alt.strip():
            raise ValueError(f"figure {name!r}: alt text is required")
        folder = self.files()
        png = folder / f"{_check_name('figure', name)}.png"
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=DPI, bbox_inches="tight")
        _write_bytes_atomic(png, buffer.getvalue())
        _write_bytes_atomic(self.export_path(name), buffer.getvalue())
        data_path = save_data(data, folder / name)
        if width is None and fig.get_figwidth() > WIDE_INCHES:
            width = "100%"
        lines = [f"````{{figure}} {self.link(png.name)}", f":name: {self.label(name)}",
                 f":alt: {' '.join(alt.split())}"]
        if width:
            lines.append(f":width: {width}")
        lines += ["", self._caption(caption, paper), ""]
        if legend:
            lines += [" ".join(legend.split()), ""]
        lines += [self._links(png, data_path), "````"]
        text = "\n".join(lines)
        show_markdown(in_dropdown(dropdown, text) if dropdown else text)
        _release(fig)
        return SavedFile(png)

    def table(self, frame: pd.DataFrame, name: str, caption: str, *, paper: str | None = None,
              index: bool | None = None, digits: int = 4, escape: bool = True, note: str | None = None,
              css_class: str | None = None, empty: str = "No rows.", data=None, dropdown: str | None = None,
              right: Sequence[str] = ()) -> Path | None:
        """Save `frame` (or `data`) as CSV beside the page and display it as a numbered table, every
        cell in full. An empty frame displays `empty` instead (and no file). dropdown: the title of a
        closed dropdown that holds the table, its note and its link (a secondary table); right: text
        columns to right-align (numbers with their spread)."""
        frame = frame.to_frame() if isinstance(frame, pd.Series) else frame
        if frame.empty:
            show_markdown(empty)
            return None
        folder = self.files()
        path = save_data(frame if data is None else data, folder / _check_name("table", name))
        # a colon fence: a backtick fence's first line may not hold a backtick (CommonMark), and a caption
        # with inline code would turn the whole table into a paragraph of raw markup
        lines = [f"::::{{table}} {self._caption(caption, paper)}", f":name: {self.label(name)}"]
        if css_class:
            lines.append(f":class: {css_class}")
        lines += ["", markdown_table(frame, index=index, digits=digits, escape=escape, right=right), "::::", ""]
        if note:
            lines += [" ".join(note.split()), ""]
        lines.append(self._links(path))
        text = "\n".join(lines)
        show_markdown(in_dropdown(dropdown, text + "\n") if dropdown else text)
        return SavedFile(path)

    # ---------------------------------------------------------------------------------- claims
    def claim(self, claim_id: str, verdict: str, number: str, *, ref: str | None = None, note: str = "",
              precondition: str = "", n: str = "") -> None:
        """Record the verdict of one of the paper's claims that this page tests; `ref`: the name of
        the figure or table of this page that shows it; `precondition`, `n`: as `claims.Outcome`'s."""
        claims_lib.record_claim(self.model_name, self.chapter, claim_id, verdict, number, page=self.docname,
                                label=self.label(ref) if ref else None, note=note, copies=[self.files()],
                                context=self.context, precondition=precondition, n=n)

    def outcome(self, claim_id: str, outcome: claims_lib.Outcome, *, ref: str | None = None, note: str = "") -> None:
        """Record a claim's `claims.Outcome`."""
        self.claim(claim_id, outcome.verdict, outcome.number, ref=ref, note=note, precondition=outcome.precondition,
                   n=outcome.n)

    def claims_from_table(self, table: pd.DataFrame, *, ref: str | None = None, note: str = "",
                          precondition: str = "", failed: str = "", n: str = "") -> None:
        """Record every claim of this chapter that the registry maps onto rows of a verdict table
        (`analysis.verdicts.verdict_table`). `precondition`: what the table needs to test the claims;
        `failed`: why it does not hold here (then each claim is "not testable here", whatever the rows say)."""
        for claim in claims_lib.chapter_claims(self.chapter):
            if claim.rows:
                verdict, number = claims_lib.verdict_from_rows(table, claim)
                if failed:
                    verdict = "not testable here"
                self.claim(claim.id, verdict, number, ref=ref, note=note,
                           precondition=f"{precondition}: {failed}" if failed else precondition, n=n)

    def show_claims(self) -> None:
        """Display the verdicts this page recorded, as they appear on the "Results at a glance" page."""
        path = claims_lib.claims_path(self.model_name, self.chapter)
        recorded = claims_lib.read_json(path)["claims"] if path.exists() else {}
        registry = claims_lib.registry()
        lines = ["**The paper's claims tested on this page** (all of them: {doc}`/glance`)", ""]
        for claim_id, cell in recorded.items():
            claim = registry[claim_id]
            note = f" *({md_escape(cell['note'])})*" if cell.get("note") else ""
            pre = cell.get("precondition") or ""
            extra = "".join(f" {label} {md_escape(text)}." for label, text in
                            (("Precondition:", pre), ("n:", cell.get("n") or "")) if text)
            lines.append(f"- {{{VERDICT_BADGES[cell['verdict']]}}}`{cell['verdict']}` **{md_escape(claim.title)}** "
                         f"({md_escape(claim.section)}, {md_escape(claim.evidence)}): {md_escape(cell['number'])}{note}"
                         f"{extra}")
        if not recorded:
            lines.append("- (no verdict was recorded)")
        show_markdown("\n".join(lines))


def page(model_name: str, chapter: str, **context) -> Page:
    """Start the page of `chapter` (the notebook's stem) for a model: its files folder is created
    and the verdicts it recorded in an earlier run are forgotten. `context`: what the page ran
    with (profile, n_edits...), kept with its verdicts."""
    started = Page(model_name, _check_name("chapter", chapter), {k: plain(v) for k, v in context.items()})
    claims_lib.reset_chapter(model_name, chapter, copies=[started.files()])
    return started


# ------------------------------------------------------------------------------------ Table 1
PAPER_MODEL_NAMES = {"gpt2-xl": "GPT2-XL", "gpt-j-6b": "GPT-J", "EleutherAI/gpt-j-6b": "GPT-J"}
"""How the paper names its models (Table 1's blocks)."""
SPREADS = {"std": "np.std", "ci": "95% t-interval"}


def paper_model_name(paper_model: str | None) -> str:
    """The paper's name of a model id ("gpt2-xl" -> "GPT2-XL"); the id itself when it has none."""
    return PAPER_MODEL_NAMES.get(paper_model or "", paper_model or "paper")


def _is_missing(value) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


NBSP = "\u00a0"


def _cell(mean, spread, with_spread: bool) -> str:
    """A metric cell of Table 1: "mean ± spread" (one decimal, as the paper prints; no-break spaces, so that a
    narrow column does not split it over two lines), the mean alone without a spread."""
    if _is_missing(mean):
        return "–"
    if not with_spread or _is_missing(spread):
        return f"{float(mean):.1f}"
    return f"{float(mean):.1f}{NBSP}±{NBSP}{float(spread):.1f}"


def _editor_rows(frame: pd.DataFrame) -> list[pd.Series]:
    """The rows of `frame` (one per editor) in the paper's order (`EDITOR_ORDER`), then any other editor."""
    rows = {str(r["editor"]): r for _, r in frame.iterrows()}
    names = [e for e in EDITOR_ORDER if e in rows] + [e for e in rows if e not in EDITOR_ORDER]
    return [rows[e] for e in names]


def table1(ours: pd.DataFrame, paper: pd.DataFrame, model_name: str, paper_model: str | None = None, *,
           spread: str = "std", min_runs: int = 1) -> pd.DataFrame:
    """Table 1 as the paper prints it: editors as rows, metrics S, ES, PS, NS, ERS, ORS (in %) as columns, one
    block per source. First the paper's block for `paper_model` (its rows, "mean ± spread" as printed: the
    authors' `np.std` over three runs, which the paper calls a 95% CI), then this model's block (`ours`: one
    row per editor from `metrics.summarise_runs`), "mean ± spread" over its `n_runs` seeds with `spread` "std"
    (np.std, the paper's form) or "ci" (the 95% t-interval's half width), the mean alone from a single seed.
    Columns: model (named on the first row of its block only, as the paper's multirow), editor, runs, metrics.
    `min_runs`: leave out this model's editors with fewer runs (e.g. 2 for a table of intervals). An empty
    `paper` gives this model's block alone."""
    if spread not in SPREADS:
        raise ValueError(f"spread {spread!r}: one of {sorted(SPREADS)}")
    blocks = []
    if len(paper):
        blocks.append((f"{paper_model_name(paper_model)} (paper)",
                       [(r, 3, True, "ci") for r in _editor_rows(paper)]))
    mine = [(r, int(r.get("n_runs", 1) or 1)) for r in _editor_rows(ours)]
    blocks.append((model_slug(model_name), [(r, n, n >= 2, spread) for r, n in mine if n >= min_runs]))
    rows = []
    for label, entries in blocks:
        for k, (r, n, with_spread, column) in enumerate(entries):
            rows.append({"model": label if k == 0 else "", "editor": str(r["editor"]), "runs": n,
                         **{m: _cell(r[m], r.get(f"{m}_{column}"), with_spread) for m in TABLE1_METRICS}})
    return pd.DataFrame(rows, columns=["model", "editor", "runs", *TABLE1_METRICS])


def table1_caption(model_name: str, paper_model: str | None, n_edits: int, seeds: Sequence[int],
                   spread: str = "std", with_paper: bool = True) -> str:
    """The caption of `table1`: what is compared, after how many edits, over which seeds, and which spread."""
    seeds = list(seeds)
    form = ("the standard deviation over the seeds as `np.std` computes it, the form the paper prints" if spread == "std"
            else "the half width of the 95% t-interval over the seeds")
    text = (f"S, ES, PS, NS, ERS and ORS in % after the last of {n_edits:,} lifelong edits with rollback, one row per "
            f"editor. {model_slug(model_name)}: seed(s) {', '.join(map(str, seeds))}, the runs column says how many "
            f"finished; mean ± {form}, the mean alone where one seed ran.")
    if with_paper and paper_model:
        text = (f"{text} Above it the paper's Table 1 block for {paper_model_name(paper_model)} (1,024 edits, "
                "mean ± the spread it prints over three runs), for the editors the paper ran.")
    return text
