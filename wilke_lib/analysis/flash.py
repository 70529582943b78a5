"""Automatic detection of records causing *toxicity flash* (Hu et al. 2024, Appendix B).

The paper filters the flash records of a lifelong ROME run by hand: first the
records whose rollback succeeds less than 10% of the time (high success during
editing, low during rollback), then, among them, those where the L2 norm of the
editing layer's W_proj jumps abnormally (the "spikes" of Fig. 3a / 4a). Tables
2 and 3 list the result.

`detect_flash` automates both criteria on the per-step table of a lifelong run:

* rollback failure: `rollback_success` (an ERS-like fraction: does the
  rolled-back model answer target_true on the rewrite + paraphrase prompts)
  below `rollback_threshold` (0.1 as in the paper);
* norm jump: the step's increase of ||W_proj||_F is more than `jump_factor`
  times the median absolute step jump of the run (a robust scale, so steady
  toxicity buildup does not count as a flash).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd


def step_jumps(table: pd.DataFrame, norm_col: str = "norm", original_norm: float | None = None) -> pd.Series:
    """Change of the edited layer's norm at each step (rows sorted by step).

    The first step's jump is measured from `original_norm` when given (the
    unedited ||W_proj||_F), else from a `norm_before` column, else it is 0.
    """
    norms = table[norm_col].astype(float)
    jumps = norms.diff()
    first = table.index[0]
    if original_norm is not None:
        jumps.loc[first] = norms.loc[first] - float(original_norm)
    elif "norm_before" in table.columns:
        jumps.loc[first] = norms.loc[first] - float(table.loc[first, "norm_before"])
    else:
        jumps.loc[first] = 0.0
    return jumps


def score_flash(table: pd.DataFrame, *, norm_col: str = "norm", rollback_col: str = "rollback_success",
                rollback_threshold: float = 0.1, jump_factor: float = 10.0,
                original_norm: float | None = None, min_edit_success: float | None = None) -> pd.DataFrame:
    """The per-step table with the detector's columns added (Appendix B criteria).

    Adds `norm_jump` (increase of ||W|| at the step), `jump_ratio`
    (norm_jump / median |norm_jump| over the run), `rollback_failed`
    (rollback success < rollback_threshold), `norm_spike` (jump_ratio >
    jump_factor) and `flash` (both; and, if `min_edit_success` is given, an
    `edit_success` column >= it: "high success during editing").
    """
    out = table.sort_values("step").reset_index(drop=True).copy()
    out["norm_jump"] = step_jumps(out, norm_col, original_norm)
    scale = float(np.median(np.abs(out["norm_jump"].to_numpy())))
    scale = scale if scale > 0 else float(np.finfo(float).tiny)
    out["jump_ratio"] = out["norm_jump"] / scale
    out["rollback_failed"] = out[rollback_col].astype(float) < rollback_threshold
    out["norm_spike"] = out["jump_ratio"] > jump_factor
    out["flash"] = out["rollback_failed"] & out["norm_spike"]
    if min_edit_success is not None:
        out["flash"] &= out["edit_success"].astype(float) >= min_edit_success
    return out


def _reason(row: pd.Series, rollback_col: str, rollback_threshold: float, jump_factor: float) -> str:
    return (f"rollback success {row[rollback_col]:.2f} < {rollback_threshold:g}; "
            f"norm jump {row['norm_jump']:.4g} = {row['jump_ratio']:.1f} x median step jump (> {jump_factor:g})")


def detect_flash(table: pd.DataFrame, *, norm_col: str = "norm", rollback_col: str = "rollback_success",
                 rollback_threshold: float = 0.1, jump_factor: float = 10.0,
                 original_norm: float | None = None, min_edit_success: float | None = None) -> pd.DataFrame:
    """Records causing toxicity flash in a lifelong ROME run (Appendix B, automated).

    `table` has one row per step with columns `step`, `case_id`, `norm_col`
    (||W_proj||_F of the edited layer after the step) and `rollback_col`
    (fraction of rewrite + paraphrase prompts on which the rolled-back model
    answers target_true), e.g. `ToxicityRecorder.result().table`. Returns the flagged rows (step, case_id, norm,
    norm_jump, jump_ratio, rollback success, reason).
    """
    scored = score_flash(table, norm_col=norm_col, rollback_col=rollback_col,
                         rollback_threshold=rollback_threshold, jump_factor=jump_factor,
                         original_norm=original_norm, min_edit_success=min_edit_success)
    flagged = scored[scored["flash"]].copy()
    flagged["reason"] = [_reason(row, rollback_col, rollback_threshold, jump_factor)
                         for _, row in flagged.iterrows()]
    cols = ["step", "case_id", norm_col, "norm_jump", "jump_ratio", rollback_col, "reason"]
    return flagged[cols].reset_index(drop=True)


def record_content(record: dict) -> str:
    """Table 2 / 3 content of a CounterFact record: "prompt [true] => [new]." with the subject filled in."""
    req = record.get("requested_rewrite", record)
    prompt = req["prompt"].replace("{}", req["subject"], 1)
    return f"{prompt} [{req['target_true']['str']}] => [{req['target_new']['str']}]."


def flash_table(records: Sequence[dict], flagged: pd.DataFrame | Sequence[int]) -> pd.DataFrame:
    """The flagged records in the format of the paper's Tables 2-3: columns "Record" and "Content".

    `flagged` is the output of `detect_flash` (its `case_id` column) or a list of case ids.
    """
    ids = list(flagged["case_id"]) if isinstance(flagged, pd.DataFrame) else list(flagged)
    by_id = {rec["case_id"]: rec for rec in records}
    missing = [i for i in ids if i not in by_id]
    if missing:
        raise KeyError(f"case ids not among the records: {missing}")
    rows = [{"Record": i, "Content": record_content(by_id[i])} for i in dict.fromkeys(ids)]
    return pd.DataFrame(rows, columns=["Record", "Content"])
