"""The code a run was computed with: recorded in its config.json, checked on resume, re-stamped after a check.

A run's folder is keyed by what its numbers depend on except the code (`config.run_identity`), so that
a refactor keeps every committed run readable. The code is recorded beside it, in config.json:

    "code": {"fingerprint": <code_version fingerprint>, "git_commit": ..., "git_dirty": ...,
             "history": [{"event": "started" | "resumed" | "continued after a code change" | "re-stamped",
                          "step": k, "fingerprint": ..., "from": <earlier fingerprint>, "note": ..., "at": UTC}]}

`fingerprint` is the code the run's rows now stand for. Resuming an unfinished run under another code
would mix two codes in one curve without a word: `stamp` refuses it unless the caller allows it, and
then records the continuation. Runs written before fingerprints existed have no "code": "unknown",
readable and resumable (the resume is recorded), and listed by `make runs RUNS_ARGS=--stale`.
"""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from wilke_lib import code_version
from wilke_lib.lifelong.store import CONFIG_FILE, STATE_FILE, STEPS_FILE, recorded_code
from wilke_lib.results import CorruptFileError, read_json, write_json_atomic

CODE_FIELD = "code"


class CodeChangedError(RuntimeError):
    """An unfinished run was computed with other code than the code running now."""


def _config(rdir: Path, key: str) -> dict[str, Any] | None:
    """The run's config.json when it is this run's (`key`), else None."""
    try:
        data = read_json(rdir / CONFIG_FILE, rebuild="the run starts again")
    except (FileNotFoundError, CorruptFileError):
        return None
    return data if isinstance(data, dict) and data.get("key") == key else None


def rows_written(rdir: Path, rows_file: str = STEPS_FILE) -> int:
    """How many rows an unfinished run has written (lines of its steps / batches file)."""
    path = rdir / rows_file
    return sum(1 for line in path.open("rb") if line.strip()) if path.exists() else 0


def _refusal(rdir: Path, recorded: str, current: str, rows: int) -> CodeChangedError:
    return CodeChangedError(
        f"{rdir} was computed up to step {rows} with code {recorded}, and the code is now {current} "
        f"(`code_version.code_fingerprint` of wilke_lib's sources): resuming would mix two codes in one run. "
        "Delete the folder to compute the run again with the current code, or continue it deliberately with "
        "allow_code_change=True (`python -m wilke_lib.run_matrix --allow-code-change`), which records the "
        "continuation in its config.json")


def refuse_code_change(rdir: Path, key: str, allow: bool = False, rows_file: str = STEPS_FILE) -> None:
    """CodeChangedError when this unfinished run (rows or a state file written) recorded another code
    fingerprint than the current one and `allow` is False. Cheap (reads config.json only), so that the run
    is refused before any model is prepared."""
    data = _config(rdir, key)
    recorded, current = recorded_code(data), code_version.current_fingerprint()
    if allow or recorded is None or recorded == current:
        return
    rows = rows_written(rdir, rows_file)
    if rows or (rdir / STATE_FILE).exists():
        raise _refusal(rdir, recorded, current, rows)


def _entry(event: str, **fields: Any) -> dict[str, Any]:
    return {"event": event, **fields, "at": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")}


def _write(rdir: Path, data: dict[str, Any], entry: dict[str, Any]) -> None:
    old = data.get(CODE_FIELD) if isinstance(data.get(CODE_FIELD), dict) else {}
    history = [e for e in old.get("history", []) if isinstance(e, dict)] if isinstance(old.get("history"), list) else []
    data[CODE_FIELD] = {**code_version.current_code(), "history": history + [entry]}
    write_json_atomic(rdir / CONFIG_FILE, data)


def stamp(rdir: Path, key: str, step: int, allow: bool = False) -> None:
    """Record in config.json that the run (re)starts after `step` with the current code.

    Step 0: "started". Otherwise the code of the earlier steps is compared: the same, "resumed"; none
    recorded (an old run), "resumed" with `from` null; another, CodeChangedError unless `allow`, and then
    "continued after a code change" with both fingerprints and the step."""
    data = _config(rdir, key)
    if data is None:
        return
    recorded, current = recorded_code(data), code_version.current_fingerprint()
    if step == 0:
        entry = _entry("started", step=0, fingerprint=current)
    elif recorded is not None and recorded != current:
        if not allow:
            raise _refusal(rdir, recorded, current, step)
        entry = _entry("continued after a code change", step=step, fingerprint=current, **{"from": recorded})
    else:
        entry = _entry("resumed", step=step, fingerprint=current, **{"from": recorded})
    _write(rdir, data, entry)


def record_restamp(rdir: Path, key: str, checked_steps: int) -> None:
    """Record that a finished run's first `checked_steps` steps, recomputed with the current code, equal
    its stored rows bit for bit: the run now stands for the current code, with a note saying why."""
    data = _config(rdir, key)
    if data is None:
        raise CorruptFileError(f"{rdir / CONFIG_FILE} is missing or belongs to another run: nothing to re-stamp")
    _write(rdir, data, _entry("re-stamped", fingerprint=code_version.current_fingerprint(),
                              note=f"re-stamped after checking steps 1..{checked_steps}",
                              **{"from": recorded_code(data)}))
