#!/usr/bin/env python
"""Execute the source notebooks of ``notebooks/`` with papermill, once per model.

Every ``notebooks/NN_*.ipynb`` (sorted by name) is run with the parameters ``model_name``,
``profile`` and any ``-p key value`` extras; the executed copy goes to
``book/<model>/<notebook file name>``, where ``<model>`` is the last path component of the
model name (``EleutherAI/gpt-j-6b`` -> ``gpt-j-6b``). A failing notebook does not stop the
others; failures are listed at the end and the exit status is 1. A timing table is printed
and written to ``book/_timings.csv`` (merged with the rows of earlier runs).

Progress stays on the terminal: the kernels run with ``TQDM_DISABLE=1`` (no progress bar in the
notebooks; the book does not render stderr either) and this script prints a line per notebook.
The kernels get ``WILKE_BOOK_DIR=<book dir>``: ``wilke_lib.present`` writes each page's figures,
data and verdicts to ``<book dir>/<model>/<notebook stem>_files/``, which is emptied before the
notebook runs so that no file of an earlier run is left behind.

Examples::

    python scripts/run_notebooks.py                               # all notebooks, toy-gpt2 + toy-gptj
    python scripts/run_notebooks.py --profile quick --models toy-gpt2 --only 03 --only 05
    python scripts/run_notebooks.py --models gpt2-xl -p records /data/counterfact.json --profile paper
"""
from __future__ import annotations

import argparse
from concurrent.futures import ThreadPoolExecutor
import csv
import json
import os
import shutil
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import yaml

from wilke_lib.results import model_slug

REPO = Path(__file__).resolve().parents[1]
DEFAULT_MODELS = ["toy-gpt2", "toy-gptj"]
KERNEL = "wilke"
TIMING_FIELDS = ["notebook", "model", "profile", "seconds", "status", "finished"]


def parse_value(text: str):
    """Interpret a ``-p`` value like papermill's CLI (True/False/None, int, float, else str);
    a value starting with ``[`` or ``{`` is parsed as YAML (lists, dicts)."""
    special = {"True": True, "False": False, "None": None}
    if text in special:
        return special[text]
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    if text.strip().startswith(("[", "{")):
        try:
            return yaml.safe_load(text)
        except yaml.YAMLError:
            pass
    return text


def ensure_kernel(name: str = KERNEL) -> str:
    """Install (once) a kernelspec ``name`` into sys.prefix that runs *this* interpreter."""
    spec_dir = Path(sys.prefix) / "share" / "jupyter" / "kernels" / name
    spec_file = spec_dir / "kernel.json"
    if spec_file.exists():
        try:
            argv = json.loads(spec_file.read_text()).get("argv", [])
            if argv and Path(argv[0]).resolve() == Path(sys.executable).resolve():
                return name
        except (OSError, ValueError):
            pass
    print(f"installing Jupyter kernel {name!r} for {sys.executable}", flush=True)
    subprocess.run(
        [sys.executable, "-m", "ipykernel", "install", "--sys-prefix", "--name", name,
         "--display-name", f"Python ({name})"],
        check=True, stdout=subprocess.DEVNULL,
    )
    return name


def find_notebooks(nb_dir: Path, only: list[str] | None) -> list[Path]:
    """Source notebooks in ``nb_dir`` sorted by name, filtered by the ``--only`` substrings."""
    nbs = sorted(p for p in nb_dir.glob("*.ipynb") if not p.name.startswith(("_", ".")))
    if only:
        nbs = [p for p in nbs if any(s in p.name for s in only)]
    return nbs


KERNEL_ENVIRONMENT = {"TQDM_DISABLE": "1"}  # progress bars stay on the terminal, not in the pages


def kernel_environment(book_dir: Path) -> dict[str, str]:
    """What the kernels inherit: no progress bars, and where the pages' files go."""
    return {**KERNEL_ENVIRONMENT, "WILKE_BOOK_DIR": str(Path(book_dir).resolve())}


def page_files(out: Path) -> Path:
    """``<model dir>/<notebook stem>_files``: the figures, data and verdicts of an executed page."""
    return out.with_name(f"{out.stem}_files")


def fold_code(path: Path) -> None:
    """Fold every code cell's input of an executed page behind a toggle (myst-nb's `hide-input` tag): a
    chapter reads as text, figures and tables, and the code that computed them is one click away."""
    import nbformat

    nb = nbformat.read(path, as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code":
            tags = cell.metadata.setdefault("tags", [])
            if "hide-input" not in tags:
                tags.append("hide-input")
    nbformat.write(nb, path)


def run_one(nb: Path, out: Path, parameters: dict, kernel: str, cwd: Path, timeout: int | None) -> str:
    """Execute one notebook; return "ok" or a one-line failure description."""
    import papermill as pm

    out.parent.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(page_files(out), ignore_errors=True)
    try:
        pm.execute_notebook(
            str(nb), str(out), parameters=parameters, kernel_name=kernel, language="python", cwd=str(cwd),
            progress_bar=False, request_save_on_cell_execute=True, execution_timeout=timeout,
        )
        fold_code(out)
        return "ok"
    except pm.PapermillExecutionError as err:
        return f"failed: {err.ename}: {str(err.evalue).splitlines()[0] if err.evalue else ''}"[:200]
    except Exception as err:  # kernel death, timeout, missing file...
        return f"failed: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"[:200]


def write_timings(path: Path, rows: list[dict]) -> None:
    """Merge ``rows`` into the CSV at ``path`` (one row per notebook and model)."""
    old: dict[tuple[str, str], dict] = {}
    if path.exists():
        with path.open(newline="") as f:
            for r in csv.DictReader(f):
                old[(r.get("notebook", ""), r.get("model", ""))] = r
    for r in rows:
        old[(r["notebook"], r["model"])] = r
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=TIMING_FIELDS, extrasaction="ignore")
        w.writeheader()
        for key in sorted(old):
            w.writerow(old[key])


def print_table(rows: list[dict], total: float) -> None:
    """Print the timing table of this run."""
    w_nb = max([len("notebook")] + [len(r["notebook"]) for r in rows])
    w_m = max([len("model")] + [len(r["model"]) for r in rows])
    print()
    print(f"{'notebook':<{w_nb}}  {'model':<{w_m}}  {'seconds':>8}  status")
    print(f"{'-' * w_nb}  {'-' * w_m}  {'-' * 8}  ------")
    for r in rows:
        print(f"{r['notebook']:<{w_nb}}  {r['model']:<{w_m}}  {float(r['seconds']):>8.1f}  {r['status']}")
    print(f"total: {total:.1f} s ({total / 60:.1f} min)")


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", default=DEFAULT_MODELS,
                    help="model names or paths (space- or comma-separated); default: %(default)s")
    ap.add_argument("--only", action="append", default=[], metavar="SUBSTRING",
                    help="run only notebooks whose file name contains SUBSTRING (repeatable)")
    ap.add_argument("--profile", default="default", choices=["quick", "default", "paper"])
    ap.add_argument("-p", "--parameter", nargs=2, action="append", default=[], metavar=("KEY", "VALUE"),
                    help="extra papermill parameter (repeatable); VALUE typed as by papermill's -p")
    ap.add_argument("--cwd", type=Path, default=REPO, help="working directory of the kernels (default: repo root)")
    ap.add_argument("--notebooks-dir", type=Path, default=REPO / "notebooks")
    ap.add_argument("--book-dir", type=Path, default=REPO / "book")
    ap.add_argument("--kernel", default=KERNEL, help="kernel name, installed into this interpreter's prefix")
    ap.add_argument("--jobs", type=int, default=1,
                    help="models executed in parallel (each model's notebooks stay in order)")
    ap.add_argument("--timeout", type=int, default=None, help="per-cell timeout in seconds (default: none)")
    ap.add_argument("--allow-dirty", action="store_true",
                    help="execute into the repository's book/ although the sources differ from the commit "
                         "(the pages then say \"dirty\" and `make check-site` fails)")
    return ap.parse_args(argv)


def refuse_dirty_book(book_dir: Path, allow_dirty: bool) -> str | None:
    """Why the repository's own book must not be executed now (None: it may): its pages name the commit they
    were computed at, so the sources (`wilke_lib.book.SOURCES`) must be that commit's. Scratch builds
    elsewhere (--book-dir) are not checked."""
    from wilke_lib.book import dirty_sources

    if allow_dirty or Path(book_dir).resolve() != (REPO / "book").resolve():
        return None
    try:
        changed = dirty_sources()
    except (OSError, subprocess.SubprocessError):
        return None
    if not changed:
        return None
    listed = ", ".join(line[3:] for line in changed[:8]) + (" ..." if len(changed) > 8 else "")
    return (f"the sources differ from the commit ({listed}): commit them first, so that every page names the "
            f"commit that computed it, or pass --allow-dirty (make book NB_ARGS=--allow-dirty) for a draft")


def main(argv=None) -> int:
    args = parse_args(argv)
    if (why := refuse_dirty_book(args.book_dir, args.allow_dirty)) is not None:
        print(f"run_notebooks: not executing into book/: {why}", file=sys.stderr)
        return 2
    models = [m for item in args.models for m in item.split(",") if m]
    notebooks = find_notebooks(args.notebooks_dir, args.only)
    if not notebooks:
        print(f"no notebooks found in {args.notebooks_dir} (only={args.only})", file=sys.stderr)
        return 1
    kernel = ensure_kernel(args.kernel)
    os.environ.update(kernel_environment(args.book_dir))  # set once, before any kernel starts
    extras = {k: parse_value(v) for k, v in args.parameter}
    jobs = [(nb, m) for m in models for nb in notebooks]
    t_all = time.perf_counter()

    def run_model(model: str) -> list[dict]:
        """One model's notebooks, in order: later chapters read what earlier ones saved."""
        model_rows = []
        for nb in notebooks:
            i = jobs.index((nb, model)) + 1
            out = args.book_dir / model_slug(model) / nb.name
            params = {"model_name": model, "profile": args.profile, **extras}
            print(f"[{i}/{len(jobs)}] {nb.name} model={model} profile={args.profile} -> "
                  f"{out.relative_to(REPO) if out.is_relative_to(REPO) else out}", flush=True)
            t0 = time.perf_counter()
            status = run_one(nb, out, params, kernel, args.cwd, args.timeout)
            dt = time.perf_counter() - t0
            print(f"[{i}/{len(jobs)}] {nb.name} model={model}: {status} ({dt:.1f} s)", flush=True)
            model_rows.append({"notebook": nb.name, "model": model, "profile": args.profile,
                               "seconds": f"{dt:.1f}", "status": status,
                               "finished": datetime.now(timezone.utc).isoformat(timespec="seconds")})
        return model_rows

    # Models are independent: with --jobs 2 the two organisms run side by side, one core each.
    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        rows = [row for model_rows in pool.map(run_model, models) for row in model_rows]
    total = time.perf_counter() - t_all
    print_table(rows, total)
    write_timings(args.book_dir / "_timings.csv", rows)
    failed = [r for r in rows if r["status"] != "ok"]
    if failed:
        print(f"\n{len(failed)} of {len(rows)} notebook runs failed:", file=sys.stderr)
        for r in failed:
            print(f"  {r['notebook']} [{r['model']}]: {r['status']}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
