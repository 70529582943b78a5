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
  a captioned figure.

Prints the counts (pages, links, images, figures, tables, formulas, and the errors of each kind)
and exits 1 when there is any error. Needs Debian's ``chromium`` and ``chromium-driver`` (the
driver is used from its system path, nothing is downloaded) and the Python package ``selenium``.

    python scripts/check_site.py                        # book/_build/html
    python scripts/check_site.py --html-dir DIR --screenshot glance.html --screenshot-dir shots/
"""
from __future__ import annotations

import argparse
import functools
import http.server
import json
import shutil
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote, urldefrag, urljoin, urlparse

REPO = Path(__file__).resolve().parents[1]
KINDS = ("broken link", "broken image", "console error", "raw LaTeX", "raw markup", "traceback", "progress bar",
         "uncaptioned figure")
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
const rawMarkup = /```|\{(table|figure|list-table|note|admonition)\}|^\s*:(name|class|alt|width):|\]\(|runs\/\/|\/(work|home|tmp)\/[\w.-]+\//m;
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
return {
  title: document.title,
  links: Array.from(document.querySelectorAll('a[href]')).map(a => a.getAttribute('href')),
  images: Array.from(document.images).map(i => ({src: i.currentSrc || i.src, ok: i.complete && i.naturalWidth > 0})),
  ids: Array.from(document.querySelectorAll('[id], a[name]')).map(e => e.id || e.getAttribute('name')),
  figures: figures.length,
  tables: document.querySelectorAll('main table').length,
  math: document.querySelectorAll('mjx-container').length,
  rawLatex, rawMarkup: rawMarkup_, tracebacks, progress, uncaptioned,
};
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


@dataclass
class Report:
    pages: int = 0
    links: int = 0
    external_links: int = 0
    images: int = 0
    figures: int = 0
    tables: int = 0
    formulas: int = 0
    errors: dict[str, list[str]] = field(default_factory=lambda: {k: [] for k in KINDS})

    def add(self, kind: str, page: str, detail: str) -> None:
        self.errors[kind].append(f"{page}: {detail}")

    @property
    def n_errors(self) -> int:
        return sum(len(v) for v in self.errors.values())

    def summary(self) -> str:
        lines = [f"pages: {self.pages}", f"internal links: {self.links} (external, not followed: {self.external_links})",
                 f"images: {self.images}", f"figures: {self.figures}", f"tables: {self.tables}",
                 f"formulas typeset: {self.formulas}"]
        lines += [f"{kind}s: {len(self.errors[kind])}" for kind in KINDS]
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


def start_browser(chromium: str, driver: str, width: int = 1280, height: int = 900):
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


def check_site(html_dir: Path, browser_paths: tuple[str, str], *, screenshots: list[str] = (),
               screenshot_dir: Path | None = None, verbose: bool = False) -> Report:
    """Load every page of the site in headless Chromium and collect the counts and the errors."""
    html_dir = Path(html_dir)
    report = Report()
    server, base, failed_requests = serve(html_dir)
    driver = start_browser(*browser_paths)
    ids: dict[str, set[str]] = {}
    links: list[tuple[str, str, str]] = []
    try:
        for page in site_pages(html_dir):
            url = base + page
            before = len(failed_requests)
            state = load_page(driver, url)
            time.sleep(0.05)
            info = driver.execute_script(PAGE_SCRIPT)
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
                              ("progress bar", "progress"), ("uncaptioned figure", "uncaptioned")):
                for detail in info[key]:
                    report.add(kind, page, detail)
            if page in screenshots and screenshot_dir is not None:
                screenshot_dir.mkdir(parents=True, exist_ok=True)
                height = driver.execute_script("return document.body.scrollHeight")
                driver.set_window_size(1280, min(int(height) + 100, 6000))
                driver.save_screenshot(str(screenshot_dir / (page.replace("/", "__") + ".png")))
                driver.set_window_size(1280, 900)
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


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--html-dir", type=Path, default=REPO / "book" / "_build" / "html")
    ap.add_argument("--chromium", default=None, help="the browser (default: chromium on the PATH)")
    ap.add_argument("--chromedriver", default=None, help="the driver (default: chromedriver on the PATH)")
    ap.add_argument("--screenshot", action="append", default=[], metavar="PAGE",
                    help="save a full-page screenshot of PAGE (e.g. glance.html; repeatable)")
    ap.add_argument("--screenshot-dir", type=Path, default=REPO / "book" / "_build" / "screenshots")
    ap.add_argument("--max-listed", type=int, default=20, help="errors listed per kind (all are counted)")
    ap.add_argument("--json", type=Path, default=None, help="also write the counts and errors as JSON")
    ap.add_argument("-v", "--verbose", action="store_true", help="print each page as it is checked")
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
    report = check_site(args.html_dir, browser, screenshots=args.screenshot, screenshot_dir=args.screenshot_dir,
                        verbose=args.verbose)
    for kind in KINDS:
        for line in report.errors[kind][: args.max_listed]:
            print(f"{kind}: {line}")
        if len(report.errors[kind]) > args.max_listed:
            print(f"{kind}: ... and {len(report.errors[kind]) - args.max_listed} more")
    print(report.summary())
    print(f"check-site: {'FAILED' if report.n_errors else 'passed'} ({report.n_errors} errors, "
          f"{time.perf_counter() - t0:.0f} s)")
    if args.json:
        args.json.write_text(json.dumps({"counts": {k: v for k, v in vars(report).items() if k != "errors"},
                                         "errors": report.errors}, indent=1))
    return 1 if report.n_errors else 0


if __name__ == "__main__":
    sys.exit(main())
