"""What sets the collapse point (chapter 13): the width ladder's results read back for the book, computing nothing.

`wilke_lib.ladder` trains nothing either; it measures the rungs and applies the rule. This module turns its table
(`ladder.ladder_table`) and the rungs' committed runs into the chapter's data: ROME's collapse step against the MLP
width with a power law (`collapse_points`, `power_law`), the shape of ROME's decline on each rung (`rome_curves`),
spread against lifespan (`spread_and_lifespan`), and the dimensionless sizes at the collapse (`norm_at_collapse`,
`committed_proxies`).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from wilke_lib.ladder import LADDER_FILE, PROXY_KEYS, SEEDS, is_heavy, median_collapse, run_rung
from wilke_lib.results import read_json

STANDARD_LABEL, HEAVY_LABEL = "standard world", "heavy world (x4 facts)"
"""How the ladder's figures name the two worlds of its rungs."""


PAPER_WIDTHS = {"gpt2-xl": 6400, "gpt-j-6b": 16384}
"""The MLP widths of the paper's models, to set beside the ladder on the same axes."""


def collapse_points(table: dict[str, Any]) -> list[dict[str, Any]]:
    """One point per rung and seed whose ROME run collapsed: width, world and collapse step (ladder.json's rows)."""
    return [{"name": row["name"], "d_mlp": row["d_mlp"], "world": HEAVY_LABEL if is_heavy(row) else STANDARD_LABEL,
             "seed": seed, "collapse step": step}
            for row in table["rungs"] if row.get("trained")
            for seed, step, collapsed in zip(SEEDS, row.get("rome_collapse_steps", []), row.get("rome_collapsed", []))
            if collapsed]


def norm_at_collapse(table: dict[str, Any]) -> pd.DataFrame:
    """At each collapsed seed's collapse step: ||W|| / ||W_0|| of the layer ROME edits, after the step's rollback (the
    dimensionless size other lifelong-editing papers report at collapse), and the same after the run's last step."""
    rows = []
    for row in table["rungs"]:
        if not row.get("trained"):
            continue
        runs = run_rung(row["name"], compute=False)[:len(SEEDS)]
        for seed, run, step, collapsed in zip(SEEDS, runs, row.get("rome_collapse_steps") or [],
                                              row.get("rome_collapsed") or []):
            if run is None or not collapsed or run.steps.empty:
                continue
            steps = run.steps.set_index("step")
            rows.append({"name": row["name"], "d_mlp": row["d_mlp"], "seed": seed, "collapse step": step,
                         "norm ratio at collapse": _norm_ratio(steps.loc[step]),
                         "last step": int(steps.index.max()), "norm ratio at the last step": _norm_ratio(steps.iloc[-1])})
    return pd.DataFrame(rows, columns=["name", "d_mlp", "seed", "collapse step", "norm ratio at collapse", "last step",
                                       "norm ratio at the last step"])


def committed_proxies(path: Path | None = None) -> pd.DataFrame:
    """The single-edit proxies as organisms/ladder.json holds them (`make ladder LADDER_ARGS=--proxies` measures
    them): one row per rung that has them."""
    path = path or LADDER_FILE
    rungs = read_json(path)["rungs"] if path.is_file() else []
    return pd.DataFrame([{"name": r["name"], **{k: r.get(k) for k in PROXY_KEYS}} for r in rungs
                         if any(r.get(k) is not None for k in PROXY_KEYS)], columns=["name", *PROXY_KEYS])


def _norm_ratio(step_row: pd.Series) -> float:
    """||W|| / ||W_0|| of the (one) edited layer in a lifelong step row."""
    after, original = step_row["layer_norms"], step_row["original_norms"]
    layer = next(iter(original))
    return float(after[layer]) / float(original[layer])


def rome_curves(table: dict[str, Any]) -> pd.DataFrame:
    """ROME's S (in %) at every checkpoint of every trained rung's runs as far as they have got: name, d_mlp,
    world, seed, step, S, finished (the run reached its last edit)."""
    rows = []
    for row in table["rungs"]:
        if not row.get("trained"):
            continue
        for seed, run in zip(SEEDS, run_rung(row["name"], compute=False)[:len(SEEDS)]):
            if run is None or run.checkpoints.empty:
                continue
            for step, s in run.checkpoints.sort_values("step")[["step", "S"]].itertuples(index=False):
                rows.append({"name": row["name"], "d_mlp": row["d_mlp"],
                             "world": HEAVY_LABEL if is_heavy(row) else STANDARD_LABEL, "seed": seed,
                             "step": int(step), "S": 100.0 * s, "finished": bool(run.final)})
    return pd.DataFrame(rows, columns=["name", "d_mlp", "world", "seed", "step", "S", "finished"])


def spread_and_lifespan(table: dict[str, Any]) -> pd.DataFrame:
    """One row per rung with a report and seed whose ROME run collapsed: the rung's share of causal peaks at one
    layer and its distinct peak layers (the spread targets), the seed's collapse step and the rung's median over
    the seeds (NaN until every seed's run has finished)."""
    rows = []
    for row in table["rungs"]:
        if row.get("causal_peak_top_share") is None:
            continue
        median = median_collapse(row)
        for seed, step, collapsed in zip(SEEDS, row.get("rome_collapse_steps") or [], row.get("rome_collapsed") or []):
            if collapsed:
                rows.append({"name": row["name"], "d_mlp": row["d_mlp"],
                             "world": HEAVY_LABEL if is_heavy(row) else STANDARD_LABEL,
                             "top peak share": row["causal_peak_top_share"], "peak layers": row["causal_peak_distinct"],
                             "seed": seed, "collapse step": step, "median collapse": math.nan if median is None else median})
    return pd.DataFrame(rows, columns=["name", "d_mlp", "world", "top peak share", "peak layers", "seed",
                                       "collapse step", "median collapse"])


def power_law(widths: Sequence[float], steps: Sequence[float]) -> dict[str, float]:
    """Least squares of log(step) on log(width): the slope (collapse step ~ width^slope), its 95% t-interval,
    and whether slope 1 (lifespan proportional to width) lies inside it. NaN with fewer than three points
    or a single width."""
    from wilke_lib.metrics import t_quantile_975

    x, y = [math.log(w) for w in widths], [math.log(s) for s in steps]
    n = len(x)
    if n < 3 or len(set(x)) < 2:
        return {"slope": math.nan, "ci_low": math.nan, "ci_high": math.nan, "n": n, "slope_1_inside": None}
    mx, my = statistics.fmean(x), statistics.fmean(y)
    sxx = sum((a - mx) ** 2 for a in x)
    slope = sum((a - mx) * (b - my) for a, b in zip(x, y)) / sxx
    residual = sum((b - my - slope * (a - mx)) ** 2 for a, b in zip(x, y)) / (n - 2)
    half = t_quantile_975(n - 2) * math.sqrt(residual / sxx)
    return {"slope": slope, "intercept": my - slope * mx, "ci_low": slope - half, "ci_high": slope + half, "n": n,
            "slope_1_inside": slope - half <= 1.0 <= slope + half}
