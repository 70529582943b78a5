"""The results layer: where runs, caches and figures live, their keys, and how files are written.

* `results_dir(model, ...)`: `<repo>/results/<model slug>/...`, cached analyses, not committed
  (`WILKE_RESULTS_DIR` replaces `<repo>/results`; the tests use it); `runs_dir(model)`:
  `<repo>/runs/<model slug>`, the lifelong runs, committed when finished (`WILKE_RUNS_DIR`);
  `figures_dir(model)`: `<repo>/figures/<model slug>` (`WILKE_FIGURES_DIR`); `cache_dir()`:
  `<repo>/.cache` (`WILKE_CACHE_DIR`).
* `model_slug(name)`: a folder name that cannot escape its parent (`EleutherAI/gpt-j-6b` -> `gpt-j-6b`,
  `..` -> an error).
* `bounded_name(name)`: a model's part of a file or folder name, kept under the file system's 255 bytes
  (a long name becomes its first characters and a hash of the whole; short names unchanged).
* `cache_key(...)`: 16 hex digits of the canonical JSON of what a result depends on.
* Writes are atomic (a temporary file renamed over the target): a run killed mid-write leaves the old
  file or the new one, never half of one. Loaders never execute code from a file: JSON, JSON lines
  and safetensors only, and `read_json` names the file and the command that rebuilds it when it is
  not readable.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd

log = logging.getLogger(__name__)

REPO_ROOT: Path = Path(__file__).resolve().parents[1]
CACHE_VERSION = 3
"""Bump to invalidate every cached analysis (part of every `cache_key`)."""


class CorruptFileError(RuntimeError):
    """A result or cache file cannot be read; the message names the file and what rebuilds it."""


def _root(variable: str, default: str) -> Path:
    value = os.environ.get(variable)
    return Path(value) if value else REPO_ROOT / default


def model_slug(model_name: str) -> str:
    """Folder name for a model: the last path component, restricted to [A-Za-z0-9._-].

    ValueError for a name with no usable component ("", ".", ".."), so that no model name can make a
    path escape the folder it is joined to."""
    name = Path(str(model_name).rstrip("/\\")).name
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-")
    if slug in ("", ".", ".."):
        raise ValueError(f"model name {model_name!r} gives no usable folder name")
    return slug


NAME_LIMIT = 120
"""Bytes of a model's part of a cache file or run folder name; longer names are shortened by `bounded_name`."""


def bounded_name(name: str, limit: int = NAME_LIMIT) -> str:
    """`name` unchanged when it has at most `limit` bytes (every name in use, so that no existing cache file or
    run folder moves), else its first bytes, "~" and 12 hex digits of its sha256. A file name may have at most
    255 bytes: a 240-character model folder name plus "__<editor>__n<n>__seed<seed>__<hash>" or ".tmp<pid>"
    would fail with ENAMETOOLONG. The hash keeps two long names that share their start apart."""
    data = name.encode("utf-8", errors="surrogatepass")
    if len(data) <= limit:
        return name
    head = data[: limit - 13].decode("utf-8", errors="ignore")
    return f"{head}~{hashlib.sha256(data).hexdigest()[:12]}"


def results_dir(model_name: str, *parts: str, create: bool = True) -> Path:
    """`<results root>/<model slug>/<parts...>` (created unless `create=False`)."""
    path = _root("WILKE_RESULTS_DIR", "results") / model_slug(model_name)
    for part in parts:
        path = path / part
    if create:
        path.mkdir(parents=True, exist_ok=True)
    return path


def runs_dir(model_name: str) -> Path:
    """`<runs root>/<model slug>`: the lifelong runs, committed when finished (`WILKE_RUNS_DIR`)."""
    path = _root("WILKE_RUNS_DIR", "runs") / model_slug(model_name)
    path.mkdir(parents=True, exist_ok=True)
    return path


def figures_dir(model_name: str) -> Path:
    """`<figures root>/<model slug>`, created."""
    path = _root("WILKE_FIGURES_DIR", "figures") / model_slug(model_name)
    path.mkdir(parents=True, exist_ok=True)
    return path


def cache_dir(*parts: str) -> Path:
    """`<repo>/.cache/<parts...>` (`WILKE_CACHE_DIR` replaces `<repo>/.cache`), not created."""
    path = _root("WILKE_CACHE_DIR", ".cache")
    for part in parts:
        path = path / part
    return path


def plain(obj: Any) -> Any:
    """A JSON-ready form of `obj`: dataclasses as dicts with their type, tuples as lists."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {"__type__": type(obj).__name__, **{k: plain(v) for k, v in dataclasses.asdict(obj).items()}}
    if isinstance(obj, dict):
        return {str(k): plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [plain(v) for v in obj]
    return obj


def digest(obj: Any) -> str:
    """sha256 (hex) of the canonical JSON of `obj`."""
    return hashlib.sha256(json.dumps(plain(obj), sort_keys=True, default=str).encode()).hexdigest()


def cache_key(*objects: Any) -> str:
    """16 hex digits identifying the objects (and `CACHE_VERSION`)."""
    return digest([CACHE_VERSION, *objects])[:16]


# ---- files -----------------------------------------------------------------------------------------

def write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def write_json_atomic(path: Path, obj: Any) -> None:
    write_text_atomic(Path(path), json.dumps(obj, indent=1, sort_keys=True, default=str))


def read_json(path: Path, rebuild: str = "delete it to recompute") -> Any:
    """The JSON content of `path`; CorruptFileError naming the file and how to rebuild it otherwise."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CorruptFileError(f"{path} is not readable JSON ({err}); {rebuild}") from err
    except RecursionError as err:
        raise CorruptFileError(f"{path} {TOO_DEEP}; {rebuild}") from err


TOO_DEEP = ("is JSON nested too deeply to be a run, cache or result file (Python's parser gives up after about "
            "1,000 levels of [ or {; the library's files nest a few)")
"""Why `read_json` refuses a file like `[[[[...]]]]` 100,000 deep (json raises RecursionError, which would
otherwise pass up raw, and a run folder holding one would fail on every call instead of being recomputed)."""


def append_jsonl(path: Path, row: dict[str, Any]) -> None:
    """Append one JSON line and flush it to disk."""
    with Path(path).open("a", encoding="utf-8") as fh:
        fh.write(json.dumps(row, sort_keys=True) + "\n")
        fh.flush()
        os.fsync(fh.fileno())


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Rows of a JSON-lines file; an unreadable line (a write killed half-way) is dropped with a warning."""
    return [row for _, row in read_jsonl_numbered(path)]


def read_jsonl_numbered(path: Path) -> list[tuple[int, Any]]:
    """(line number from 1, row) of each readable line of a JSON-lines file, so that a row that reads but
    is not what it should be can be named by its line; unreadable lines are dropped as by `read_jsonl`."""
    path = Path(path)
    if not path.exists():
        return []
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        try:
            rows.append((number, json.loads(line)))
        except (json.JSONDecodeError, RecursionError):  # a line nested too deeply is no row either
            log.warning("dropping unreadable line %d in %s", number, path)
    return rows


def write_jsonl_atomic(path: Path, rows: list[dict[str, Any]]) -> None:
    write_text_atomic(Path(path), "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))


def cached_frame(path: Path, compute: Callable[[], pd.DataFrame]) -> pd.DataFrame:
    """The DataFrame stored at `path` (JSON, "split" orientation), or compute, store and return it."""
    path = Path(path)
    if path.exists():
        try:
            return pd.read_json(path, orient="split")
        except ValueError as err:
            log.warning("%s is unreadable (%s): recomputing", path, err)
    frame = compute()
    write_text_atomic(path, frame.to_json(orient="split", index=False, double_precision=15))
    return frame
