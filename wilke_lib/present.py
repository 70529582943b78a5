"""The book's pages: numbered figures and full tables, each with its data beside it, and the claims.

A *page* is one executed notebook, `<book>/<model slug>/<chapter>.ipynb` (scripts/run_notebooks.py
writes them); a notebook starts it with `page(model_name, "03_lifelong")`. Then

* `Page.figure(fig, name, caption, alt=..., data=...)` saves `<chapter>_files/<name>.png` beside the
  page, and the figure's data as `<name>.csv` (a DataFrame) or `<name>.json` (anything else), and
  displays a MyST `figure` directive: the figure, its caption under it (numbered "Fig. N.k" per
  chapter by book/_ext/wilke_site.py; `paper="Fig. 43"` names the paper's figure), its alt text and
  links to the full-size PNG and to the data;
* `Page.table(frame, name, caption)` saves the CSV and displays a MyST `table` ("Table N.k") with
  every cell in full (no "…"); an empty frame shows a sentence instead of an empty table;
* `Page.claim(...)` and `Page.claims_from_table(...)` record the verdicts of the paper's claims that
  the page tests (`wilke_lib.claims`), read by the book's "Results at a glance" page.

`table1(...)` lays out Table 1 as the paper prints it, this model's column beside the paper's.

The book folder is `WILKE_BOOK_DIR` (run_notebooks.py sets it to `book/`). Without it the files go to
`results/<model slug>/pages/`, so that a test or an ad-hoc papermill run never writes into the book.
Links in the Markdown are relative to the page (`<chapter>_files/<name>.png`), so they hold wherever
the book folder is.
"""

from __future__ import annotations

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
from wilke_lib.results import model_slug, plain, results_dir, write_text_atomic

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


def md_escape(text: object) -> str:
    """Plain text as Markdown that renders as the same text (one line)."""
    return _MD_SPECIAL.sub(r"\\\1", " ".join(str(text).split()))


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


def markdown_table(frame: pd.DataFrame, *, index: bool | None = None, digits: int = 4, escape: bool = True) -> str:
    """A GitHub-style Markdown table of every row and cell of `frame`, text in full; numeric columns
    right-aligned."""
    frame = frame.to_frame() if isinstance(frame, pd.Series) else frame
    if index if index is not None else _keeps_index(frame):
        frame = frame.reset_index()
    cell = md_escape if escape else (lambda t: " ".join(str(t).split()).replace("|", "\\|"))
    names = [" / ".join(map(str, c)) if isinstance(c, tuple) else str(c) for c in frame.columns]
    numeric = [pd.api.types.is_numeric_dtype(frame[c]) and not pd.api.types.is_bool_dtype(frame[c])
               for c in frame.columns]
    lines = ["| " + " | ".join(cell(n) for n in names) + " |",
             "|" + "|".join("---:" if num else "---" for num in numeric) + "|"]
    for row in frame.itertuples(index=False):
        lines.append("| " + " | ".join(cell(format_value(v, digits)) for v in row) + " |")
    return "\n".join(lines)


def show_markdown(text: str) -> None:
    """Display Markdown (MyST in the book) as the output of the cell; printed outside IPython."""
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
               legend: str | None = None, width: str | None = None) -> Path:
        """Save `fig` (PNG) and `data` beside the page and display it as a numbered figure.

        caption: Markdown, one paragraph, said from what the figure shows; paper: the paper's
        figure ("Fig. 43"), named in the caption; alt: what a reader who cannot see the image needs
        (required); legend: a second paragraph under the caption; width: CSS width (wide figures
        are shown at the column width and open at full size on a click)."""
        if not alt or not alt.strip():
            raise ValueError(f"figure {name!r}: alt text is required")
        folder = self.files()
        png = folder / f"{_check_name('figure', name)}.png"
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=DPI, bbox_inches="tight")
        _write_bytes_atomic(png, buffer.getvalue())
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
        show_markdown("\n".join(lines))
        _release(fig)
        return SavedFile(png)

    def table(self, frame: pd.DataFrame, name: str, caption: str, *, paper: str | None = None,
              index: bool | None = None, digits: int = 4, escape: bool = True, note: str | None = None,
              css_class: str | None = None, empty: str = "No rows.", data=None) -> Path | None:
        """Save `frame` (or `data`) as CSV beside the page and display it as a numbered table, every
        cell in full. An empty frame displays `empty` instead (and no file)."""
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
        lines += ["", markdown_table(frame, index=index, digits=digits, escape=escape), "::::", ""]
        if note:
            lines += [" ".join(note.split()), ""]
        lines.append(self._links(path))
        show_markdown("\n".join(lines))
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
def _mean_ci(mean: float, ci: float, with_ci: bool) -> str:
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "–"
    if not with_ci or ci is None or (isinstance(ci, float) and math.isnan(ci)):
        return f"{mean:.1f} (n/a)"
    return f"{mean:.1f} ({ci:.1f})"


def table1(ours: pd.DataFrame, paper: pd.DataFrame, model_name: str,
           paper_model: str | None = None) -> pd.DataFrame:
    """Table 1 side by side: one row per editor; for each metric the paper's "mean (CI)" beside this
    model's, whose CI is "n/a" with fewer than two runs (`n_runs`). "–": editor not in that source."""
    paper_label = f"paper ({paper_model})" if paper_model else "paper"
    ours_rows = {str(r["editor"]): r for _, r in ours.iterrows()}
    paper_rows = {str(r["editor"]): r for _, r in paper.iterrows()}
    names = [e for e in EDITOR_ORDER if e in ours_rows or e in paper_rows]
    names += [e for e in list(paper_rows) + list(ours_rows) if e not in names]
    rows = []
    for editor in names:
        row = {"editor": editor}
        for m in TABLE1_METRICS:
            p, o = paper_rows.get(editor), ours_rows.get(editor)
            row[f"{m} {paper_label}"] = "–" if p is None else _mean_ci(float(p[m]), float(p[f"{m}_ci"]), True)
            row[f"{m} {model_slug(model_name)}"] = "–" if o is None else _mean_ci(
                float(o[m]), float(o[f"{m}_ci"]), int(o.get("n_runs", 1) or 1) >= 2)
        rows.append(row)
    return pd.DataFrame(rows)


def table1_both_forms(ours: pd.DataFrame, paper: pd.DataFrame, model_name: str,
                      paper_model: str | None = None) -> pd.DataFrame:
    """Table 1 with the spread in both forms, paper and ours alike: per editor a row "paper, mean +- printed
    spread" (the authors' notebook prints `np.std` over three runs; the paper calls it a 95% CI), a row
    "<model>, mean +- np.std" (the same form) and a row "<model>, mean +- 95% t-interval" (`n_runs`
    seeds; "n/a" with one). Columns: editor, source, seeds, then the metrics in %."""
    paper_label = f"paper ({paper_model})" if paper_model else "paper"
    ours_rows = {str(r["editor"]): r for _, r in ours.iterrows()}
    paper_rows = {str(r["editor"]): r for _, r in paper.iterrows()}
    names = [e for e in EDITOR_ORDER if e in ours_rows or e in paper_rows]
    names += [e for e in list(paper_rows) + list(ours_rows) if e not in names]

    def row(editor: str, source: str, seeds: str, r: pd.Series, spread: str, with_spread: bool) -> dict:
        cells = {m: "–" if r is None else (f"{float(r[m]):.1f} ± {float(r[f'{m}_{spread}']):.1f}" if with_spread
                                           else f"{float(r[m]):.1f} (n/a)") for m in TABLE1_METRICS}
        return {"editor": editor, "source": source, "seeds": seeds, **cells}

    rows = []
    for editor in names:
        p, o = paper_rows.get(editor), ours_rows.get(editor)
        if p is not None:
            rows.append(row(editor, f"{paper_label}: ± as printed (np.std)", "3", p, "ci", True))
        if o is not None:
            n = int(o.get("n_runs", 1) or 1)
            rows.append(row(editor, f"{model_slug(model_name)}: ± np.std", str(n), o, "std", n >= 2))
            rows.append(row(editor, f"{model_slug(model_name)}: ± 95% t-interval", str(n), o, "ci", n >= 2))
    return pd.DataFrame(rows)


def table1_caption(model_name: str, paper_model: str | None, n_edits: int, seeds: Sequence[int]) -> str:
    """The header of `table1`: what is compared, after how many edits, over which seeds."""
    seeds = list(seeds)
    ci = (f"95% CI over {len(seeds)} seeds" if len(seeds) >= 2
          else "one seed, so no confidence interval (n/a)")
    paper = f"the paper's Table 1 ({paper_model}, 1,024 edits, 95% CI as printed)" if paper_model else "the paper"
    return (f"S, ES, PS, NS, ERS and ORS in % after the last edit, mean (CI): {model_slug(model_name)} after "
            f"{n_edits} lifelong edits with rollback, seed(s) {', '.join(map(str, seeds))}, {ci}; beside "
            f"{paper}. –: editor not run in that source.")
