"""Sphinx extension of the WilKE book (loaded through ``sphinx: local_extensions`` in _config.yml).

What it does, and why (docs/design.md, "The book"):

* **Pages that name their model.** A chapter page is ``<model>/<NN>_<topic>`` (an executed
  notebook); its first heading becomes ``"<N>. <heading> — <model>"``. Page titles, the H1, the
  previous / next links and the search results then say which model a page is about; the sidebar
  entries are the model names (``title:`` entries written by scripts/make_toc.py).
* **Only the parameters a page ran with.** When papermill injected a parameters cell, the source
  notebook's defaults cell (tag ``parameters``) is dropped from the page: its values are the
  defaults of the source notebook (``model_name="toy-gpt2"`` on every page), not those of the run.
  The injected cell and the provenance table show what the page ran with.
* **Figures and tables numbered per chapter.** With ``numfig`` on, Sphinx numbers the figures of an
  unnumbered book with one counter over all pages; here figure *k* of chapter *N* is "Fig. N.k"
  (and "Table N.k"), the same on every model's page.
* **MathJax served with the site.** MathJax 3 is copied from an installed package
  (``django-static-mathjax``, or the folder in ``WILKE_MATHJAX_DIR``) into ``_static/mathjax``:
  no CDN, so formulas render offline.
* **No script declared twice.** Extensions that add inline scripts when the builder starts
  (sphinx-thebe's ``THEBE_JS_URL``, sphinx-togglebutton's selector) can be registered twice; a
  ``const`` declared twice is a JavaScript error, so duplicates are dropped from each page.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
from pathlib import Path

from docutils import nodes
from sphinx.transforms import SphinxTransform
from sphinx.util import logging

logger = logging.getLogger(__name__)

CHAPTER_DOC = re.compile(r"^(?P<model>[^/]+)/(?P<number>\d+)_[^/]+$")
MATHJAX_SCRIPT = "tex-mml-chtml.js"
# Parts of MathJax's es5 build a page never loads with the CHTML output (SVG output, speech rules of
# other languages): left out of the copy.
MATHJAX_SKIP = re.compile(r"(^|/)(mml-svg|tex-svg|tex-mml-svg|tex-svg-full)\.js$|^output/svg|^sre/mathmaps/(?!en\.json)")


def chapter_of(docname: str) -> tuple[str, int] | None:
    """(model, chapter number) of a chapter page ``<model>/<NN>_<topic>``, else None."""
    match = CHAPTER_DOC.match(docname)
    return (match["model"], int(match["number"])) if match else None


def page_title(title: str, model: str, number: int) -> str:
    """``"3. Lifelong editing — toy-gpt2"`` from the notebook's heading (idempotent)."""
    title = re.sub(rf"\s+—\s+{re.escape(model)}$", "", title.strip())
    title = re.sub(r"^\d+\.\s+", "", title)
    return f"{number}. {title} — {model}"


class ModelInTitle(SphinxTransform):
    """Name the model (and the chapter number) in the first heading of a chapter page."""

    default_priority = 200

    def apply(self, **kwargs) -> None:
        found = chapter_of(self.env.docname)
        if not found:
            return
        section = next(iter(self.document.findall(nodes.section)), None)
        if section is None or not section.children or not isinstance(section[0], nodes.title):
            return
        title, (model, number) = section[0], found
        text = title.astext().strip()
        if not re.match(rf"{number}\.\s", text):
            title.insert(0, nodes.Text(f"{number}. "))
        if not text.endswith(f" — {model}"):
            title += nodes.Text(f" — {model}")


class DefaultsCellOnlyWithoutInjection(SphinxTransform):
    """Drop the source notebook's ``parameters`` cell from pages that papermill gave parameters."""

    default_priority = 210

    def apply(self, **kwargs) -> None:
        cells = [n for n in self.document.findall(nodes.container) if "cell" in n.get("classes", [])]
        if not any("tag_injected-parameters" in c["classes"] for c in cells):
            return
        for cell in cells:
            if "tag_parameters" in cell["classes"] and cell.parent is not None:
                cell.parent.remove(cell)


def _figtype(env, node) -> str | None:
    """The enumerable type of a captioned node ("figure", "table", "code-block"), as Sphinx decides it."""
    std = env.domains["std"]
    figtype = std.get_enumerable_node_type(node)
    if figtype and std.get_numfig_title(node):
        return figtype
    return None


def number_per_chapter(app, env) -> list[str]:
    """Renumber the figures and tables of each chapter page as (chapter, k), in document order."""
    if not app.config.numfig:
        return []
    changed = []
    for docname in sorted(env.found_docs):
        found = chapter_of(docname)
        if not found:
            continue
        try:
            doctree = env.get_doctree(docname)
        except FileNotFoundError:
            continue
        numbers: dict[str, dict[str, tuple[int, ...]]] = {}
        counters: dict[str, int] = {}
        for node in doctree.findall(nodes.Element):
            figtype = _figtype(env, node)
            if figtype and node["ids"]:
                counters[figtype] = counters.get(figtype, 0) + 1
                numbers.setdefault(figtype, {})[node["ids"][0]] = (found[1], counters[figtype])
        if env.toc_fignumbers.get(docname, {}) != numbers:
            env.toc_fignumbers[docname] = numbers
            changed.append(docname)
    return changed


def mathjax_source() -> Path | None:
    """MathJax 3's es5 folder: ``WILKE_MATHJAX_DIR``, else the copy in the django-static-mathjax package."""
    candidates = []
    if os.environ.get("WILKE_MATHJAX_DIR"):
        candidates.append(Path(os.environ["WILKE_MATHJAX_DIR"]))
    spec = importlib.util.find_spec("mathjax")
    if spec and spec.origin:
        candidates.append(Path(spec.origin).parent / "static" / "mathjax" / "es5")
    return next((c for c in candidates if (c / MATHJAX_SCRIPT).is_file()), None)


def use_local_mathjax(app, config) -> None:
    """Point Sphinx at the copy of MathJax served from ``_static/mathjax``."""
    if mathjax_source() is None:
        logger.warning("wilke_site: no local MathJax found (pip install django-static-mathjax, or set "
                       "WILKE_MATHJAX_DIR to MathJax 3's es5 folder); formulas will load MathJax from a CDN")
        return
    config.mathjax_path = f"mathjax/{MATHJAX_SCRIPT}"


def copy_mathjax(app, exception) -> None:
    """Copy MathJax (without the parts a page never loads) into the site's ``_static/mathjax``."""
    source = mathjax_source()
    if exception is not None or source is None or app.builder.format != "html":
        return
    target = Path(app.outdir) / "_static" / "mathjax"
    for path in sorted(source.rglob("*")):
        relative = path.relative_to(source).as_posix()
        if path.is_dir() or MATHJAX_SKIP.search(relative):
            continue
        destination = target / relative
        if destination.exists() and destination.stat().st_size == path.stat().st_size:
            continue
        destination.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, destination)


def drop_duplicate_scripts(app, pagename, templatename, context, doctree) -> None:
    """Keep the first of identical script entries of a page (same file or same inline body)."""
    scripts = context.get("script_files")
    if not scripts:
        return
    seen, kept = set(), []
    for script in scripts:
        attributes = getattr(script, "attributes", {}) or {}
        key = (str(getattr(script, "filename", script) or ""), tuple(sorted((k, str(v)) for k, v in attributes.items())))
        if key not in seen:
            seen.add(key)
            kept.append(script)
    scripts[:] = kept


def setup(app):
    app.add_transform(ModelInTitle)
    app.add_transform(DefaultsCellOnlyWithoutInjection)
    app.connect("config-inited", use_local_mathjax)
    app.connect("env-get-updated", number_per_chapter, priority=900)
    app.connect("html-page-context", drop_duplicate_scripts, priority=999)
    app.connect("build-finished", copy_mathjax)
    return {"version": "1.0", "parallel_read_safe": True, "parallel_write_safe": True}
