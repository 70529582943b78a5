"""Helpers for the book's notebooks: the provenance cell, figures shown as PNG, the paper's Table 1 and curves (from
`wilke_lib.reported`). A page's figures are saved and exported by `wilke_lib.present.Page.figure`."""
from __future__ import annotations

import io
import platform
import subprocess
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

from wilke_lib.reported import paper_curves, paper_table1
from wilke_lib.results import REPO_ROOT

__all__ = ["git_commit", "dirty_sources", "sources_changed_since", "versions", "provenance", "show_provenance", "paper_table1", "paper_curves"]


def _git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=10, check=True).stdout.rstrip()  # a status line may start with a space


SOURCES = ("wilke_lib", "notebooks", "scripts", "pyproject.toml", "Makefile", "organisms",
           ":(exclude,glob)organisms/*/training-checkpoint.pt")
"""What computes the book's numbers, as a git pathspec: a change here makes a page "dirty". The build's own outputs
(the executed pages under book/, figures/, benchmark tables, runs/ it read back) do not: `make book` writes them
while it runs. Nor does a width-ladder rung's training checkpoint, which no page reads."""


def git_commit() -> str:
    """Short commit hash of the repository, with " (dirty)" when a tracked source (`SOURCES`) differs from it;
    "unknown" without git."""
    try:
        commit = _git("rev-parse", "--short", "HEAD")
        dirty = dirty_sources()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return f"{commit} (dirty)" if dirty else commit


def dirty_sources() -> list[str]:
    """The tracked sources (`SOURCES`) that differ from the commit checked out (git status lines)."""
    return _git("status", "--porcelain", "--untracked-files=no", "--", *SOURCES).splitlines()


def sources_changed_since(commit: str) -> list[str] | None:
    """The sources (`SOURCES`) that differ between `commit` and HEAD (file names); None when git does not know
    `commit`. An empty list: a page executed at `commit` was computed by the code of HEAD."""
    try:
        return _git("diff", "--name-only", commit, "HEAD", "--", *SOURCES).splitlines()
    except (OSError, subprocess.SubprocessError):
        return None


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


def versions() -> dict[str, str]:
    """Versions of python, torch, transformers and wilke_lib, and the sha256 (12 hex digits) of requirements.lock,
    the exact versions `make venv` installs: a page's provenance then names every locked package, not only these."""
    import hashlib

    lock = REPO_ROOT / "requirements.lock"
    locked = f"sha256 {hashlib.sha256(lock.read_bytes()).hexdigest()[:12]}" if lock.is_file() else "missing"
    return {"python": platform.python_version(), "torch": _version("torch"),
            "transformers": _version("transformers"), "wilke_lib": _version("wilke_lib"), "requirements.lock": locked}


def _cell(value) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")


def provenance(parameters: dict) -> dict:
    """The page's parameters, git commit, date (UTC) and versions as an ordered dict."""
    info = {f"parameter `{k}`": v for k, v in parameters.items()}
    info.update({"git commit": git_commit(),
                 "date (UTC)": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S")})
    info.update(versions())
    return info


def show_provenance(parameters: dict) -> None:
    """Display (Markdown table) the page's papermill parameters, git commit, date and versions."""
    info = provenance(parameters)
    table = "| item | value |\n|---|---|\n" + "\n".join(f"| {_cell(k)} | {_cell(v)} |" for k, v in info.items())
    try:
        from IPython.display import Markdown, display
        # folded: the reader opens it to check what produced the page, it does not stand before the content
        display(Markdown(f"```{{dropdown}} Provenance of this page (commit {info['git commit']})\n\n{table}\n```"))
    except ImportError:
        print(table)


def _figure_png(fig) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    return buffer.getvalue()


def enable_figure_display() -> None:
    """Show matplotlib figures built without pyplot (``wilke_lib.analysis.plots``) as PNG images in
    notebooks: IPython registers a PNG formatter for figures only once pyplot is imported."""
    try:
        from IPython import get_ipython
    except ImportError:
        return
    shell = get_ipython()
    if shell is None:
        return
    from matplotlib.figure import Figure

    shell.display_formatter.formatters["image/png"].for_type(Figure, _figure_png)


enable_figure_display()
