"""Which code computed a run's numbers: a fingerprint of the library's sources.

A run's identity (its folder) names the model, the settings and the records, not the code, so that a
refactor does not orphan weeks of committed runs. The code is recorded beside it instead: the
fingerprint is the sha256 of the sorted relative paths and contents of `wilke_lib/**/*.py` and
`wilke_lib/hparams/**/*.yaml`, the files that compute the numbers (the git commit and a dirty flag
are added for information only: a clone without git, or a commit of unrelated files, must not change
it). `lifelong` stores it when a run starts or resumes, refuses to mix two codes in one run, and marks
a finished run whose code differs from the current one as stale.

Import-light on purpose (no torch, no pandas): `make runs --stale` lists stale runs without loading
anything heavy.
"""

from __future__ import annotations

import functools
import hashlib
import subprocess
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
FINGERPRINT_LENGTH = 16
"""Hex digits kept of the sha256 (64 bits: no two versions of the library collide in practice)."""


def source_files(package: Path = PACKAGE_DIR) -> list[Path]:
    """The files whose contents make the fingerprint, sorted by their path relative to `package`."""
    files = [p for p in package.rglob("*.py") if "__pycache__" not in p.parts]
    files += list((package / "hparams").rglob("*.yaml"))
    return sorted(set(files), key=lambda p: p.relative_to(package).as_posix())


def code_fingerprint(package: Path = PACKAGE_DIR) -> str:
    """16 hex digits of the sha256 over each source file's relative path and contents (`source_files`).

    Path and length are hashed before the contents, so that moving code from one file to another,
    or renaming a file, is a different fingerprint."""
    h = hashlib.sha256()
    for path in source_files(package):
        data = path.read_bytes()
        h.update(f"{path.relative_to(package).as_posix()}\0{len(data)}\0".encode())
        h.update(data)
    return h.hexdigest()[:FINGERPRINT_LENGTH]


def git_state(package: Path = PACKAGE_DIR) -> dict[str, object]:
    """{"git_commit": ..., "git_dirty": ...} of the repository holding `package` (dirty: a tracked file
    under the package differs from the commit); {} without git or outside a repository. Informational:
    the fingerprint alone decides whether two runs share their code."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=package, capture_output=True, text=True, timeout=10,
                              check=True).stdout.strip()
    try:
        commit = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no", "--", "."))
    except (OSError, subprocess.SubprocessError):
        return {}
    return {"git_commit": commit, "git_dirty": dirty}


@functools.lru_cache(maxsize=1)
def current_code() -> dict[str, object]:
    """The fingerprint of the code this process runs, with the git commit and dirty flag when known.

    Computed once per process: the modules a process imported are the code that computes its numbers,
    even if the files change on disk while it runs."""
    return {"fingerprint": code_fingerprint(), **git_state()}


def current_fingerprint() -> str:
    return str(current_code()["fingerprint"])


def code_status(recorded: str | None) -> str:
    """"current" when `recorded` is the current fingerprint, "differs" when it is another, "unknown" when
    none was recorded (runs written before fingerprints existed)."""
    if not recorded:
        return "unknown"
    return "current" if recorded == current_fingerprint() else "differs"
