"""Summaries of `make bench`'s tables (pure pandas, no timing): the readable table, the ratios between
variants, and the JSON summary `benchmarks/bench_editors.py` saves."""

from __future__ import annotations

import statistics
from typing import Any


def format_table(table) -> str:
    """A readable fixed-width rendering of a main table."""
    cols = ["variant", "layers_optimised", "median_ms", "min_ms", "max_ms", "edits_per_s", "time_vs_rome",
            "peak_mem_mib", "gflop_per_edit", "achieved_gflops"]
    view = table[[c for c in cols if c in table.columns]].copy()
    return view.to_string(index=False, float_format=lambda x: f"{x:,.2f}")


def summary_json(tables: dict[str, Any], steps: dict[str, dict[str, float]],
                 optimisation: dict[str, dict[str, float]] | None = None) -> dict[str, Any]:
    """`make bench`'s summary: per model and editor ms_per_edit, ms_per_lifelong_step and gflop_per_edit,
    and the ratios rome_speedup_vs_previous (a whole ROME edit without / with the prefix cache),
    rome_optimisation_speedup (the delta optimisation alone, `optimisation_ms`), wilke_over_rome (time
    per edit) and wilke_over_rome_flops (counted arithmetic per edit)."""
    out: dict[str, Any] = {}
    for model_name, table in tables.items():
        t = table.set_index("variant")
        editors = {v: {"ms_per_edit": float(t.loc[v, "median_ms"]), "gflop_per_edit": float(t.loc[v, "gflop_per_edit"]),
                       "ms_per_lifelong_step": steps.get(model_name, {}).get(v)} for v in t.index}

        def ratio(num: str, den: str, col: str) -> float | None:
            return float(t.loc[num, col] / t.loc[den, col]) if {num, den} <= set(t.index) else None

        out[model_name] = {"editors": editors,
                           "rome_speedup_vs_previous": ratio("rome-full", "rome", "median_ms"),
                           "optimisation_ms": (optimisation or {}).get(model_name, {}),
                           "rome_optimisation_speedup": _ratio_of((optimisation or {}).get(model_name, {}),
                                                                  "rome-full", "rome"),
                           "wilke_over_rome": ratio("wilke-batched", "rome", "median_ms"),
                           "wilke_over_rome_flops": ratio("wilke-batched", "rome", "gflop_per_edit"),
                           "device": str(t["device_name"].iloc[0]), "threads": int(t["threads"].iloc[0])}
    return out


def _ratio_of(values: dict[str, float], num: str, den: str) -> float | None:
    return float(values[num] / values[den]) if values.get(num) and values.get(den) else None


def summary_ratios(table) -> dict[str, float]:
    """Ratios of a main table: WilKE-batched / ROME time and the sequential / batched speed-up, as a
    ratio of medians and (`*_paired`, when per-edit times were saved) the median over records of the
    per-record ratio -- the edits of one record by the variants ran back to back, so the paired
    ratio is the less sensitive to load changes."""
    t = table.set_index("variant")
    out: dict[str, float] = {}

    def add(key: str, num: str, den: str) -> None:
        if num in t.index and den in t.index:
            out[key] = float(t.loc[num, "median_ms"] / t.loc[den, "median_ms"])
            if "times_ms" in t.columns and isinstance(t.loc[num, "times_ms"], str):
                a = [float(x) for x in t.loc[num, "times_ms"].split()]
                b = [float(x) for x in t.loc[den, "times_ms"].split()]
                if len(a) == len(b) and a:
                    out[key + "_paired"] = statistics.median(x / y for x, y in zip(a, b))

    add("wilke_batched_over_rome", "wilke-batched", "rome")
    add("sequential_over_batched", "wilke-sequential", "wilke-batched")
    return out
