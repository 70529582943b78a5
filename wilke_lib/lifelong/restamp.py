"""Re-stamping a stale run: check its first steps against the current code instead of recomputing it.

A finished run whose code fingerprint differs from the current code (or is unknown) may still hold
exactly the numbers the current code computes: most changes to the library (a refactor, a new editor,
a docstring) leave a run's numbers alone. `restamp` recomputes the run's first `n_steps` steps with the
current code in a temporary folder and compares them bit for bit with the stored rows (step rows and the
checkpoint rows up to that step; timing fields, whose names end in "seconds", left out). Equal: the run
records the current fingerprint with the note "re-stamped after checking steps 1..N". Different: the
first step and field that differ are reported and the run stays stale. Weeks of runs are then checked
in minutes, and only the runs the change touched are recomputed.
"""

from __future__ import annotations

import dataclasses
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from wilke_lib import code_version
from wilke_lib.lifelong import provenance, store
from wilke_lib.lifelong.config import LifelongConfig, checkpoint_steps
from wilke_lib.lifelong.runner import Backend, run_lifelong
from wilke_lib.results import read_jsonl


@dataclass
class Restamp:
    """What `restamp` found: `status` "current" (nothing to do), "re-stamped" or "differs" (then `step`,
    `field`, `stored` and `recomputed` name the first difference; `table` is "steps" or "checkpoints")."""

    run_dir: Path
    status: str
    checked_steps: int = 0
    table: str = ""
    step: int | None = None
    field: str = ""
    stored: Any = None
    recomputed: Any = None

    def describe(self) -> str:
        if self.status == "differs":
            return (f"{self.run_dir.name}: differs at step {self.step}, {self.table} field {self.field!r} (stored "
                    f"{self.stored!r}, current code {self.recomputed!r}); left stale")
        if self.status == "re-stamped":
            return f"{self.run_dir.name}: re-stamped after checking steps 1..{self.checked_steps}"
        return f"{self.run_dir.name}: computed with the current code, nothing to do"


class _Stop(Exception):
    """Ends the recomputation after the steps to check (raised from `on_step`, like a kill)."""


def _is_timing(field: str) -> bool:
    return field.endswith("seconds")


def first_difference(stored: Sequence[dict], recomputed: Sequence[dict]) -> tuple[int, str, Any, Any] | None:
    """(step, field, stored value, recomputed value) of the first difference between two lists of rows, bit
    for bit (JSON values: floats as written, so equal only when identical), timing fields left out; None
    when they are equal."""
    for number, (old, new) in enumerate(zip(stored, recomputed), start=1):
        for field in sorted(set(old) | set(new)):
            if not _is_timing(field) and old.get(field, "<missing>") != new.get(field, "<missing>"):
                return old.get("step", number), field, old.get(field, "<missing>"), new.get(field, "<missing>")
    if len(stored) != len(recomputed):
        return min(len(stored), len(recomputed)) + 1, "<row>", len(stored), len(recomputed)
    return None


def recompute_first_steps(records: Sequence[dict], config: LifelongConfig,
                          model_loader: Callable[[str], tuple[nn.Module, Any]], n_steps: int,
                          backend: Backend | None = None) -> tuple[list[dict], list[dict]]:
    """(step rows, checkpoint rows) of the run's first `n_steps` steps computed now, in a temporary folder
    (the same run: same split, same seeds; the known-record filter computed again with the current code)."""
    with tempfile.TemporaryDirectory(prefix="wilke-restamp-") as tmp:
        scratch = dataclasses.replace(config, out_dir=tmp)
        model, tok = model_loader(config.model_name)

        def stop(step: int, _row: dict) -> None:
            if step >= n_steps:
                raise _Stop

        try:
            run_lifelong(model, tok, records, scratch, backend=backend, on_step=stop, copy_model=False)
        except _Stop:
            pass
        rdir = store.locate(records, scratch)[0]
        return store.read_steps(rdir)[:n_steps], read_jsonl(rdir / store.CHECKPOINTS_FILE)


def restamp(records: Sequence[dict], config: LifelongConfig, model_loader: Callable[[str], tuple[nn.Module, Any]],
            n_steps: int = 4, *, backend: Backend | None = None) -> Restamp:
    """Check the finished run `config` on `records` against the current code (see the module) and record
    the current code when its first `n_steps` steps agree. ValueError when the run is not finished."""
    if isinstance(n_steps, bool) or not isinstance(n_steps, int) or n_steps < 1:
        raise ValueError(f"restamp: n_steps must be a positive int, got {n_steps!r}")
    rdir, key = store.locate(records, config)
    if store.read_back(records, config) is None:
        raise ValueError(f"restamp: {rdir} is not a finished run of this configuration; only finished runs are "
                         "re-stamped (an unfinished one is resumed, see allow_code_change)")
    recorded = store.recorded_code(store.read_json(rdir / store.CONFIG_FILE))
    if code_version.code_status(recorded) == "current":
        return Restamp(rdir, "current")
    n = min(n_steps, config.n_edits)
    steps, checkpoints = recompute_first_steps(records, config, model_loader, n, backend)
    stored_checkpoints = [r for r in read_jsonl(rdir / store.CHECKPOINTS_FILE) if r.get("step", 0) <= n]
    wanted = [s for s in checkpoint_steps(config.n_edits, config.checkpoints) if s <= n]
    for table, old, new in (("steps", store.read_steps(rdir)[:n], steps),
                            ("checkpoints", stored_checkpoints, [r for r in checkpoints if r.get("step") in wanted])):
        diff = first_difference(old, new)
        if diff is not None:
            return Restamp(rdir, "differs", n, table, *diff)
    provenance.record_restamp(rdir, key, n)
    return Restamp(rdir, "re-stamped", n)
