#!/usr/bin/env python
"""Check the built book in a real browser: serve it on 127.0.0.1, load every page in headless
Chromium and fail on what a reader would trip over.

Failures, counted per kind:

* ``broken link``: an internal link to a file that is not in the site or to an anchor that is not
  on its page;
* ``broken image``: an image that did not load (or any request of a page answered 404);
* ``console error``: a JavaScript error, or an error logged to the console, while the page loads;
* ``raw markup``: MyST or Markdown shown as text (a fence, ``{table}``, ``:name:``, ``](``), a placeholder
  swallowed as HTML (``runs//``) or an absolute local path in the text;
* ``raw LaTeX``: LaTeX left in the text after MathJax ran (``\\(``, ``\\[``, ``\\begin``, ``$...\\...$``,
  outside code) or a formula MathJax could not typeset;
* ``traceback``: an output cell that shows a Python traceback (an error output);
* ``progress bar``: a progress bar (tqdm) or a "Warning:" line with a local path in an output cell;
* ``uncaptioned figure``: a figure without a caption, or an image in an output cell that is not in
  a captioned figure;
* ``faint caption``: a figure or table caption set in a font weight below 400 (the theme's default is 300);
* ``overflowing table``: a table wider than the column that holds it at the checked width (1,400 px:
  the reader scrolls it sideways);
* ``small-text image``: a figure's image shown at less than half its natural width (a PNG of 1,967 px
  shown 600 px wide): text drawn at 10 pt and 150 dpi then reaches the reader below 9 px;
* ``long cell``: a cell of the glance table (``table.wilke-glance``) that runs to more than 40 lines
  when the page is 600 px wide (details belong behind a dropdown or a link);
* ``interactive figure``: an interactive (plotly) figure, ``.wilke-interactive``, that is not drawn once its
  dropdown opens, has no curves, or shows no value when the pointer is on its first point;
* ``dirty provenance``: a page whose provenance says it was executed from sources that differ from its
  commit ("(dirty)") or from no known commit;
* ``stale provenance``: a page executed at a commit whose sources (``wilke_lib.book.SOURCES``) differ from
  HEAD's: the code that holds the page did not compute it (``--no-git`` skips this check).

Warnings, counted and listed but not failing the check (``--strict`` makes them errors):

* ``tall page``: a page taller than ``--max-height`` (6,000 px) at 1,400 px wide as it loads, with its
  code cells folded (the book folds them behind a toggle).

Prints the counts (pages, links, images, figures, tables, formulas, and the errors of each kind)
and exits 1 when there is any error. Each page's height is printed with ``--heights``. Needs Debian's ``chromium`` and ``chromium-driver`` (the
driver is used from its system path, nothing is downloaded) and the Python package ``selenium``.

    python scripts/check_site.py                        # book/_build/html, screenshots in book/_build/screenshots
    python scripts/check_site.py --html-dir DIR --screenshot glance.html --screenshot-dir shots/
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import http.server
import json
import re
import shutil
import statistics
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote, urldefrag, urljoin, urlparse

REPO = Path(__file__).resolve().parents[1]
KINDS = ("broken link", "broken image", "console error", "raw LaTeX", "raw markup", "traceback", "progress bar",
         "uncaptioned figure", "faint caption", "overflowing table", "small-text image", "long cell",
         "interactive figure", "dirty provenance", "stale provenance")
WARNING_KINDS = ("tall page",)
WIDTH = 1400           # px, the window the pages are checked at
NARROW_WIDTH = 600     # px, the window the glance table's cells are measured at
MAX_HEIGHT = 6000      # px, the height above which a page is "tall" (with its code folded)
TOP_HEIGHT = 1000      # px, the first screen of a page, saved as <page>-top.png beside its full screenshot
SCREENSHOTS = ("glance.html", "toy-gpt2/03_lifelong.html", "toy-gptj/03_lifelong.html")  # saved by default
MAX_IMAGE_RATIO = 2.0  # natural / displayed width above which a figure's text is too small to read
MAX_CELL_LINES = 40    # lines of a glance-table cell at NARROW_WIDTH
NO_HEIGHT_PAGES = ("genindex.html", "search.html")  # generated lists, long by nature
SKIPPED_DIRS = ("_static", "_sources", "_images", "_downloads", "glance_files")
CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
DRIVER_NAMES = ("chromedriver",)

# Runs in the page once it has loaded (and MathJax has typeset it); returns what the checks need.
PAGE_SCRIPT = r"""
const skip = 'pre, code, script, style, textarea, mjx-container, .MathJax, .highlight, .cell_input, .headerlink';
const latex = /\\\(|\\\[|\\begin\{|\\end\{|\$[^$\n]{0,200}\\[A-Za-z|{][^$\n]{0,200}\$|\$\$/;
const article = document.querySelector('main') || document.body;
const rawLatex = [];
// MyST or Markdown that reached the reader as text: a fence, a directive, its options, a link, a lost placeholder
const rawMarkup = /```|\{(table|figure|list-table|note|admonition|dropdown)\}|\{(numref|doc|ref|cite|bdg-[a-z-]+)\}`|^\s*:(name|class|alt|width|open):|\]\(|runs\/\/|\/(work|home|tmp)\/[\w.-]+\//m;
const rawMarkup_ = [];
const walker = document.createTreeWalker(article, NodeFilter.SHOW_TEXT);
while (walker.nextNode()) {
  const node = walker.currentNode;
  if (!node.parentElement || node.parentElement.closest(skip)) continue;
  const text = node.textContent;
  if (latex.test(text)) rawLatex.push(text.trim().slice(0, 120));
  const markup = text.match(rawMarkup);
  if (markup) rawMarkup_.push(markup[0].slice(0, 120));
}
for (const el of document.querySelectorAll('mjx-merror, .MathJax_Error')) rawLatex.push('MathJax error: ' + el.textContent.slice(0, 120));
const outputs = Array.from(document.querySelectorAll('.cell_output'));
const tracebacks = [];
const progress = [];
const bar = /\d+%\|[^|\n]*\|\s*\d+\/\d+|\d+(\.\d+)?(it|edit|step)s?\/s\]|TqdmWarning|\w+Warning: .*\/(work|home|tmp|usr)\//;
for (const out of outputs) {
  for (const tb of out.querySelectorAll('.traceback, .output.error')) tracebacks.push(tb.textContent.trim().slice(0, 160));
  if (/Traceback \(most recent call last\)/.test(out.textContent) && !out.querySelector('.traceback, .output.error'))
    tracebacks.push(out.textContent.trim().slice(0, 160));
  const m = out.textContent.match(bar);
  if (m) progress.push(m[0].slice(0, 120));
}
const figures = Array.from(document.querySelectorAll('figure'));
const uncaptioned = figures.filter(f => { const c = f.querySelector('figcaption'); return !c || !c.textContent.trim(); })
  .map(f => (f.querySelector('img') || {}).src || f.id || 'figure');
for (const img of document.querySelectorAll('.cell_output img')) {
  if (!img.closest('figure')) uncaptioned.push(img.getAttribute('src').slice(0, 120));
}
// Layout at the window's width: tables wider than their column, figures shown far below their natural width,
// the page's height as it loads (code cells folded behind their toggles).
const column = document.querySelector('main .bd-article, main article, main') || document.body;
const columnWidth = column.clientWidth;
const tableWidths = [];
for (const table of document.querySelectorAll('main table')) {
  const width = table.getBoundingClientRect().width;
  if (!width) continue;  // inside a closed dropdown
  const holder = table.closest('.pst-scrollable-table-container, .table-wrapper') || table.parentElement;
  const available = Math.min(holder.clientWidth || columnWidth, columnWidth);
  const caption = table.querySelector('caption');
  tableWidths.push({name: table.id || (caption ? caption.textContent.trim().slice(0, 60) : 'table'),
                    width: Math.round(width), available: available});
}
const imageWidths = [];
for (const img of document.querySelectorAll('main img')) {
  const shown = img.getBoundingClientRect().width;
  if (!shown || !img.naturalWidth || /\.svg($|\?)/.test(img.currentSrc || img.src)) continue;
  imageWidths.push({src: (img.getAttribute('src') || '').slice(0, 120), natural: img.naturalWidth, shown: Math.round(shown)});
}
const faint = [];
for (const caption of document.querySelectorAll('main figcaption, main table > caption')) {
  const weight = parseInt(getComputedStyle(caption).fontWeight, 10);
  const text = caption.querySelector('.caption-text') || caption;
  const textWeight = parseInt(getComputedStyle(text).fontWeight, 10);
  if (Math.min(weight, textWeight) < 400 && caption.textContent.trim())
    faint.push(`weight ${Math.min(weight, textWeight)}: ${caption.textContent.trim().slice(0, 60)}`);
}
return {
  title: document.title,
  height: Math.max(document.documentElement.scrollHeight, document.body.scrollHeight),
  tableWidths, imageWidths, glanceTable: !!document.querySelector('table.wilke-glance'),
  links: Array.from(document.querySelectorAll('a[href]')).map(a => a.getAttribute('href')),
  images: Array.from(document.images).map(i => ({src: i.currentSrc || i.src, ok: i.complete && i.naturalWidth > 0})),
  ids: Array.from(document.querySelectorAll('[id], a[name]')).map(e => e.id || e.getAttribute('name')),
  figures: figures.length,
  tables: document.querySelectorAll('main table').length,
  math: document.querySelectorAll('mjx-container').length,
  rawLatex, rawMarkup: rawMarkup_, tracebacks, progress, uncaptioned, faint,
  interactive: Array.from(document.querySelectorAll('.wilke-interactive')).map(el => el.id),
};
"""

# An interactive (plotly) figure as a reader meets it: its dropdown opened, the pointer on the first point of
# its first curve; what the figure drew and what the hover label says.
HOVER_SCRIPT = r"""
const [id, done] = [arguments[0], arguments[arguments.length - 1]];
const el = document.getElementById(id);
if (!el || typeof Plotly === 'undefined') { done({drawn: false, traces: 0, hover: '', why: el ? 'no plotly.js' : 'no element'}); return; }
const box = el.closest('details');
if (box) box.open = true;
Promise.resolve(Plotly.Plots.resize(el)).then(() => {
  Plotly.Fx.hover(el, [{curveNumber: 0, pointNumber: 0}]);
  setTimeout(() => {
    const label = el.querySelector('.hoverlayer');
    done({drawn: !!el.querySelector('.main-svg') && el.getBoundingClientRect().width > 0,
          traces: (el.data || []).length, hover: label ? label.textContent : '', why: ''});
    if (box) box.open = false;
  }, 200);
}).catch(e => done({drawn: false, traces: 0, hover: '', why: String(e)}));
"""

# The lines of each cell of the glance table (run at NARROW_WIDTH).
CELL_SCRIPT = r"""
const out = [];
for (const table of document.querySelectorAll('table.wilke-glance')) {
  table.querySelectorAll('tr').forEach((tr, row) => tr.querySelectorAll('td, th').forEach((cell, col) => {
    const style = getComputedStyle(cell);
    let line = parseFloat(style.lineHeight);
    if (!line) line = 1.5 * parseFloat(style.fontSize);
    // the cell's content as shown (not the row's height it is stretched to, nor a closed dropdown's body)
    let top = Infinity, bottom = -Infinity;
    for (const child of cell.children) {
      const box = child.getBoundingClientRect();
      if (box.height > 0) { top = Math.min(top, box.top); bottom = Math.max(bottom, box.bottom); }
    }
    if (!cell.children.length) {
      const range = document.createRange();
      range.selectNodeContents(cell);
      const box = range.getBoundingClientRect();
      top = box.top; bottom = box.bottom;
    }
    const height = bottom > top ? bottom - top : 0;
    out.push({row: row, col: col, height: Math.round(height), line: line,
              text: cell.textContent.trim().replace(/\s+/g, ' ').slice(0, 60)});
  }));
}
return out;
"""

# Waits for MathJax 3 (when the page loads it) to finish typesetting.
MATHJAX_WAIT = r"""
const done = arguments[arguments.length - 1];
const start = Date.now();
(function poll() {
  const mj = window.MathJax;
  const hasScript = !!document.querySelector('script[src*="mathjax"], script[src*="MathJax"]');
  if (mj && mj.startup && mj.startup.promise) { mj.startup.promise.then(() => done('typeset'), e => done('error: ' + e)); return; }
  if (!hasScript || Date.now() - start > 15000) { done(hasScript ? 'timeout' : 'none'); return; }
  setTimeout(poll, 50);
})();
"""


def overflowing_tables(widths: list[dict], tolerance: float = 1.0) -> list[str]:
    """The tables wider than the column that holds them (`widths`: name, width, available, in px)."""
    return [f"{t['name']}: {t['width']} px in a column of {t['available']} px" for t in widths
            if t["width"] > t["available"] + tolerance]


def small_text_images(widths: list[dict], max_ratio: float = MAX_IMAGE_RATIO) -> list[str]:
    """The images shown at less than 1/`max_ratio` of their natural width (`widths`: src, natural, shown, px):
    their text reaches the reader that many times smaller than it was drawn."""
    return [f"{i['src']}: {i['natural']} px shown {i['shown']} px wide (x{i['natural'] / i['shown']:.1f})"
            for i in widths if i["shown"] > 0 and i["natural"] / i["shown"] > max_ratio]


def long_cells(cells: list[dict], max_lines: int = MAX_CELL_LINES) -> list[str]:
    """The table cells that run to more than `max_lines` lines (`cells`: row, col, height and line height in
    px, the start of the text)."""
    return [f"row {c['row']}, column {c['col']}: {c['height'] / c['line']:.0f} lines ({c['text']!r})" for c in cells
            if c["line"] > 0 and c["height"] / c["line"] > max_lines]


PROVENANCE = re.compile(r"Provenance of this page \(commit ([^()<]*?)( \(dirty\))?\)")


def provenance_problems(html: str, changed_since=None) -> list[tuple[str, str]]:
    """(kind, detail) for the page's provenance line (a page without one has none): "dirty provenance" when it
    says "(dirty)" or names no commit, "stale provenance" when `changed_since(commit)` (the sources changed
    between that commit and HEAD, None for a commit git does not know) is not empty."""
    found = PROVENANCE.search(html)
    if found is None:
        return []
    commit, dirty = found.group(1).strip(), bool(found.group(2))
    if dirty or not re.fullmatch(r"[0-9a-f]{7,40}", commit):
        return [("dirty provenance", f"executed at {commit}{' (dirty)' if dirty else ''}")]
    if changed_since is None:
        return []
    changed = changed_since(commit)
    if changed is None:
        return [("stale provenance", f"commit {commit} is not in this repository")]
    if changed:
        return [("stale provenance", f"executed at {commit}; the sources changed since: "
                                     f"{', '.join(changed[:3])}{' ...' if len(changed) > 3 else ''}")]
    return []


def interactive_problems(state: dict) -> list[str]:
    """What is wrong with an interactive figure after HOVER_SCRIPT: not drawn, no curves, no value on hover."""
    if not state.get("drawn"):
        return [f"not drawn ({state.get('why') or 'no plot in the element'})"]
    if not state.get("traces"):
        return ["drawn without curves"]
    if not any(ch.isdigit() for ch in state.get("hover", "")):
        return ["no value shown on hover"]
    return []


def is_tall(page: str, height: float, max_height: float = MAX_HEIGHT) -> bool:
    """Whether `page` (site-relative) is taller than `max_height` px; the generated lists (index, search) are not
    held to it."""
    return page not in NO_HEIGHT_PAGES and height > max_height


@dataclass
class Report:
    pages: int = 0
    links: int = 0
    external_links: int = 0
    images: int = 0
    figures: int = 0
    tables: int = 0
    formulas: int = 0
    interactive: int = 0
    heights: dict[str, int] = field(default_factory=dict)
    errors: dict[str, list[str]] = field(default_factory=lambda: {k: [] for k in KINDS})
    warnings: dict[str, list[str]] = field(default_factory=lambda: {k: [] for k in WARNING_KINDS})

    def add(self, kind: str, page: str, detail: str) -> None:
        (self.warnings if kind in WARNING_KINDS else self.errors)[kind].append(f"{page}: {detail}")

    @property
    def n_errors(self) -> int:
        return sum(len(v) for v in self.errors.values())

    @property
    def n_warnings(self) -> int:
        return sum(len(v) for v in self.warnings.values())

    def strict(self) -> "Report":
        """The same report with every warning counted as an error."""
        errors = {**{k: list(v) for k, v in self.errors.items()}, **{k: list(v) for k, v in self.warnings.items()}}
        return dataclasses.replace(self, errors=errors, warnings={k: [] for k in WARNING_KINDS})

    def summary(self) -> str:
        lines = [f"pages: {self.pages}", f"internal links: {self.links} (external, not followed: {self.external_links})",
                 f"images: {self.images}", f"figures: {self.figures}", f"tables: {self.tables}",
                 f"formulas typeset: {self.formulas}", f"interactive figures (drawn, hovered): {self.interactive}"]
        if self.heights:
            tallest = max(self.heights, key=self.heights.get)
            lines.append(f"page height at {WIDTH} px, code folded: median {statistics.median(self.heights.values()):,.0f} px, "
                         f"tallest {self.heights[tallest]:,} px ({tallest})")
        lines += [f"{kind}s: {len(self.errors[kind])}" for kind in self.errors]
        lines += [f"{kind}s (warning): {len(self.warnings[kind])}" for kind in self.warnings]
        return "\n".join(lines)


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    """Serves the site; remembers every request answered with an error status."""

    failures: list[str]

    def log_message(self, format, *args):  # noqa: A002 - the base class's name
        pass

    def send_error(self, code, message=None, explain=None):
        self.failures.append(f"{code} {unquote(self.path)}")
        super().send_error(code, message, explain)


def serve(directory: Path) -> tuple[http.server.ThreadingHTTPServer, str, list[str]]:
    """Serve `directory` on 127.0.0.1 (a free port) in a thread; (server, base URL, failed requests)."""
    failures: list[str] = []
    handler = functools.partial(type("Handler", (QuietHandler,), {"failures": failures}), directory=str(directory))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}/", failures


def find_browser(chromium: str | None = None, driver: str | None = None) -> tuple[str, str] | None:
    """(chromium, chromedriver) paths, or None when either is missing."""
    chromium = chromium or next((p for p in map(shutil.which, CHROMIUM_NAMES) if p), None)
    driver = driver or next((p for p in map(shutil.which, DRIVER_NAMES) if p), None)
    return (chromium, driver) if chromium and driver else None


def start_browser(chromium: str, driver: str, width: int = WIDTH, height: int = 900):
    """Headless Chromium driven through the system chromedriver (no driver download)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                f"--window-size={width},{height}", "--disable-extensions", "--no-first-run"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(service=Service(executable_path=driver), options=options)


def site_pages(html_dir: Path) -> list[str]:
    """The site's HTML pages, relative to `html_dir` (assets folders left out)."""
    return sorted(p.relative_to(html_dir).as_posix() for p in html_dir.rglob("*.html")
                  if not any(part in SKIPPED_DIRS for part in p.relative_to(html_dir).parts[:-1]))


def _target(html_dir: Path, base: str, page_url: str, href: str) -> tuple[str, str] | None:
    """(site-relative file, fragment) of an internal link, None for an external one."""
    url, fragment = urldefrag(urljoin(page_url, href))
    parsed = urlparse(url)
    if parsed.scheme not in ("http", "https") or not url.startswith(base):
        return None
    path = unquote(parsed.path)[len(urlparse(base).path):]
    if path == "" or path.endswith("/"):
        path += "index.html"
    return path, fragment


def load_page(driver, url: str, attempts: int = 2) -> str:
    """Load `url` and wait for MathJax: its state ("typeset", "none", "error: ...", "timeout"). A page
    whose MathJax start-up never settles (seen once in headless Chromium on a loaded machine, a
    browser-side stall) is loaded again before it counts as "timeout"."""
    from selenium.common.exceptions import TimeoutException

    for _ in range(attempts):
        driver.get(url)
        try:
            return driver.execute_async_script(MATHJAX_WAIT)
        except TimeoutException:
            continue
    return "timeout (the browser's script timeout, page loaded twice)"


def page_info(driver, attempts: int = 5) -> dict:
    """PAGE_SCRIPT's result on the loaded page. A page that is still being replaced (a redirect such as index.html
    -> glance.html, caught between the two documents: no body yet) is read again a moment later."""
    from selenium.common.exceptions import JavascriptException

    for attempt in range(attempts):
        try:
            return driver.execute_script(PAGE_SCRIPT)
        except JavascriptException:
            if attempt == attempts - 1:
                raise
            time.sleep(0.3)
    raise AssertionError("unreachable")


def check_site(html_dir: Path, browser_paths: tuple[str, str], *, screenshots: list[str] = (),
               screenshot_dir: Path | None = None, verbose: bool = False, max_height: float = MAX_HEIGHT,
               changed_since=None) -> Report:
    """Load every page of the site in headless Chromium (WIDTH px wide) and collect the counts, the errors and
    the warnings; the pages with a glance table are measured again NARROW_WIDTH px wide. `changed_since`
    (commit -> changed sources, `wilke_lib.book.sources_changed_since`) enables the stale-provenance check."""
    html_dir = Path(html_dir)
    report = Report()
    server, base, failed_requests = serve(html_dir)
    driver = start_browser(*browser_paths)
    ids: dict[str, set[str]] = {}
    links: list[tuple[str, str, str]] = []
    narrow: list[str] = []
    try:
        for page in site_pages(html_dir):
            url = base + page
            before = len(failed_requests)
            state = load_page(driver, url)
            time.sleep(0.05)
            info = page_info(driver)
            report.pages += 1
            if verbose:
                print(f"{page}: {info['title']} (MathJax: {state})", flush=True)
            if state.startswith(("error", "timeout")):
                report.add("raw LaTeX", page, f"MathJax did not finish: {state}")
            for entry in driver.get_log("browser"):
                message = entry.get("message", "")
                # a failed request is reported below, from the server's side, as a broken resource
                if entry.get("level") == "SEVERE" and "Failed to load resource" not in message:
                    report.add("console error", page, message[:200])
            for request in failed_requests[before:]:
                if not request.endswith("/favicon.ico"):  # asked by the browser, not by the page
                    report.add("broken image", page, f"request failed: {request}")
            ids[page] = set(info["ids"])
            if driver.current_url.split("#")[0] != url:
                continue  # a redirect (index.html -> the root page): its target is checked, and counted, as itself
            for href in info["links"]:
                target = _target(html_dir, base, url, href)
                if target is None:
                    report.external_links += 0 if href.startswith(("#", "javascript:", "mailto:")) else 1
                    continue
                report.links += 1
                links.append((page, href, *target))
            for image in info["images"]:
                report.images += 1
                if not image["ok"]:
                    report.add("broken image", page, image["src"])
            report.figures += info["figures"]
            report.tables += info["tables"]
            report.formulas += info["math"]
            for kind, key in (("raw LaTeX", "rawLatex"), ("raw markup", "rawMarkup"), ("traceback", "tracebacks"),
                              ("progress bar", "progress"), ("uncaptioned figure", "uncaptioned"),
                              ("faint caption", "faint")):
                for detail in info[key]:
                    report.add(kind, page, detail)
            for detail in overflowing_tables(info["tableWidths"]):
                report.add("overflowing table", page, detail)
            for detail in small_text_images(info["imageWidths"]):
                report.add("small-text image", page, detail)
            for kind, detail in provenance_problems((html_dir / page).read_text(encoding="utf-8", errors="replace"),
                                                    changed_since):
                report.add(kind, page, detail)
            for plot in info["interactive"]:
                report.interactive += 1
                for detail in interactive_problems(driver.execute_async_script(HOVER_SCRIPT, plot)):
                    report.add("interactive figure", page, f"#{plot}: {detail}")
            report.heights[page] = int(info["height"])
            if is_tall(page, info["height"], max_height):
                report.add("tall page", page, f"{int(info['height']):,} px")
            if info["glanceTable"]:
                narrow.append(page)
            if page in screenshots and screenshot_dir is not None:
                screenshot_dir.mkdir(parents=True, exist_ok=True)
                stem = page.replace("/", "__")
                driver.set_window_size(WIDTH, TOP_HEIGHT)  # what a reader sees first
                driver.execute_script("window.scrollTo(0, 0)")
                driver.save_screenshot(str(screenshot_dir / f"{stem}-top.png"))
                height = driver.execute_script("return document.body.scrollHeight")
                driver.set_window_size(WIDTH, min(int(height) + 100, 6000))
                driver.save_screenshot(str(screenshot_dir / f"{stem}.png"))
                driver.set_window_size(WIDTH, 900)
        if narrow:
            driver.set_window_size(NARROW_WIDTH, 900)
            for page in narrow:
                load_page(driver, base + page)
                for detail in long_cells(driver.execute_script(CELL_SCRIPT)):
                    report.add("long cell", page, f"at {NARROW_WIDTH} px, {detail}")
            driver.set_window_size(WIDTH, 900)
    finally:
        driver.quit()
        server.shutdown()
    for page, href, path, fragment in links:
        file = html_dir / path
        if not file.is_file():
            report.add("broken link", page, f"{href} (no file {path})")
        elif fragment and path.endswith(".html") and path in ids and fragment not in ids[path]:
            report.add("broken link", page, f"{href} (no anchor #{fragment} on {path})")
    return report


def _sources_changed_since(commit: str) -> list[str] | None:
    sys.path.insert(0, str(REPO))
    from wilke_lib.book import sources_changed_since

    return sources_changed_since(commit)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--html-dir", type=Path, default=REPO / "book" / "_build" / "html")
    ap.add_argument("--chromium", default=None, help="the browser (default: chromium on the PATH)")
    ap.add_argument("--chromedriver", default=None, help="the driver (default: chromedriver on the PATH)")
    ap.add_argument("--screenshot", action="append", default=None, metavar="PAGE",
                    help="save screenshots of PAGE, its first 1,400 x 1,000 px and all of it (repeatable; "
                         f"default: {', '.join(SCREENSHOTS)})")
    ap.add_argument("--screenshot-dir", type=Path, default=REPO / "book" / "_build" / "screenshots")
    ap.add_argument("--max-listed", type=int, default=20, help="errors listed per kind (all are counted)")
    ap.add_argument("--json", type=Path, default=None, help="also write the counts and errors as JSON")
    ap.add_argument("--max-height", type=float, default=MAX_HEIGHT,
                    help=f"px above which a page is tall at {WIDTH} px wide (default {MAX_HEIGHT})")
    ap.add_argument("--strict", action="store_true", help="count the warnings (tall pages) as errors")
    ap.add_argument("--heights", action="store_true", help="print every page's height, tallest first")
    ap.add_argument("-v", "--verbose", action="store_true", help="print each page as it is checked")
    ap.add_argument("--no-git", action="store_true",
                    help="skip the stale-provenance check (a site checked outside the repository that built it)")
    args = ap.parse_args(argv)
    if not (args.html_dir / "index.html").is_file():
        print(f"check-site: no built site in {args.html_dir} (run `make book` or `make book-only`)", file=sys.stderr)
        return 2
    browser = find_browser(args.chromium, args.chromedriver)
    if browser is None:
        print("check-site: chromium and chromedriver are needed: apt-get install chromium chromium-driver",
              file=sys.stderr)
        return 2
    try:
        import selenium  # noqa: F401
    except ImportError:
        print("check-site: the Python package selenium is needed: pip install -e '.[dev]'", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    report = check_site(args.html_dir, browser, screenshots=args.screenshot or list(SCREENSHOTS), screenshot_dir=args.screenshot_dir,
                        verbose=args.verbose, max_height=args.max_height,
                        changed_since=None if args.no_git else _sources_changed_since)
    if args.strict:
        report = report.strict()
    if args.heights:
        for page, height in sorted(report.heights.items(), key=lambda kv: -kv[1]):
            print(f"height: {height:>7,} px  {page}")
    for found, label in ((report.warnings, "warning: "), (report.errors, "")):
        for kind, lines in found.items():
            for line in lines[: args.max_listed]:
                print(f"{label}{kind}: {line}")
            if len(lines) > args.max_listed:
                print(f"{label}{kind}: ... and {len(lines) - args.max_listed} more")
    print(report.summary())
    print(f"check-site: {'FAILED' if report.n_errors else 'passed'} ({report.n_errors} errors, "
          f"{report.n_warnings} warnings, {time.perf_counter() - t0:.0f} s)")
    if args.json:
        args.json.write_text(json.dumps({"counts": {k: v for k, v in vars(report).items()
                                                    if k not in ("errors", "warnings")},
                                         "errors": report.errors, "warnings": report.warnings}, indent=1))
    return 1 if report.n_errors else 0


if __name__ == "__main__":
    sys.exit(main())
