"""What the files of a lifelong run must hold to be read back (a schema of each, checked by hand).

A file that reads as JSON can still lack what the runner needs: a result.json whose `final` is "oops",
a config.json without its "config", a steps row `{"step": 2}`. Each check returns why a content is not
usable ("" when it is), so that `store` can name the file and line, move it aside and carry on from the
last good state instead of failing with a KeyError on every later call.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from wilke_lib.lifelong.config import config_from_dict

FINAL_METRICS = ("ES", "PS", "NS", "ERS", "ORS", "S")
"""The metrics of a lifelong run's `final` (result.json); the runner stores them only when finite."""


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_step(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


_NUMBER = (_is_number, "a number")
_STEP = (_is_step, "a step (an int >= 1)")
_ANY = (lambda value: True, "anything")

STEP_ROW = {"step": _STEP, "case_id": _ANY, "failed": (lambda v: isinstance(v, bool), "true or false"),
            "error": _ANY, "ES": _NUMBER, "PS": _NUMBER, "NS": _NUMBER}
"""The fields of a steps.jsonl row that the runner reads back on resume (`runner.step_row` writes more)."""

CHECKPOINT_ROW = {"step": _STEP, **{k: _NUMBER for k in FINAL_METRICS},
                  "n_failed_edits": (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0,
                                     "a count (an int >= 0)")}
"""The fields of a checkpoints.jsonl row that the runner reads back (`runner.checkpoint_row`)."""


def row_problem(row: Any, schema: dict[str, tuple[Any, str]]) -> str:
    """Why a JSON-lines row lacks what `schema` asks for ("" when it is fine)."""
    if not isinstance(row, dict):
        return f"is {type(row).__name__}, not a JSON object"
    missing = [name for name in schema if name not in row]
    if missing:
        return f"lacks the field(s) {missing}"
    for name, (check, what) in schema.items():
        if not check(row[name]):
            return f"has {name} = {row[name]!r}, not {what}"
    return ""


def final_problem(result: Any, metrics: Sequence[str] = FINAL_METRICS, allow_nan: bool = False) -> str:
    """Why a result.json's content is not a finished run's result ("" when it is): its `final` must be an
    object of numbers (finite unless `allow_nan`) with every one of `metrics`."""
    if not isinstance(result, dict):
        return f"holds {type(result).__name__}, not a JSON object"
    final = result.get("final")
    if not isinstance(final, dict):
        return f"has 'final' = {final!r}, not an object of metrics"
    missing = [k for k in metrics if k not in final]
    if missing:
        return f"has a 'final' without the metric(s) {missing}"
    for name, value in final.items():
        if not _is_number(value) or not (allow_nan or math.isfinite(value)):
            return f"has 'final'.{name} = {value!r}, not a {'number' if allow_nan else 'finite number'}"
    return ""


def config_problem(data: Any) -> str:
    """Why a lifelong run's config.json cannot be read back ("" when it can): an object with the run's
    `key`, its `identity` and its `config`, which `config_from_dict` accepts."""
    if not isinstance(data, dict):
        return f"holds {type(data).__name__}, not a JSON object"
    missing = [k for k in ("key", "identity", "config") if k not in data]
    if missing:
        return f"lacks the key(s) {missing}"
    if not isinstance(data["config"], dict):
        return f"has 'config' = {data['config']!r}, not an object"
    try:
        config_from_dict(data["config"])
    except (TypeError, ValueError, KeyError, AttributeError) as err:
        return f"has a 'config' that is not a lifelong configuration ({err})"
    return ""
