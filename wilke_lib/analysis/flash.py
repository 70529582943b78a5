"""Automatic detection of records causing *toxicity flash* (Hu et al. 2024, Appendix B).

The paper filters the flash records of a lifelong ROME run by hand: first the
records whose rollback succeeds less than 10% of the time (high success during
editing, low during rollback), then, among them, those where the L2 norm of the
editing layer's W_proj jumps abnormally (the "spikes" of Fig. 3a / 4a). Tables
2 and 3 list the result.

`detect_flash` automates both criteria on the per-step table of a lifelong run
(`flash_analysis` runs it on the lifelong ROME run; `contrast_groups` gives the flash and normal
records the per-record chapters compare):

* rollback failure: `rollback_success` (an ERS-like fraction: does the
  rolled-back model answer target_true on the rewrite + paraphrase prompts)
  below `rollback_threshold` (0.1 as in the paper);
* norm jump: the step's increase of ||W_proj||_F is more than `jump_factor`
  times the median absolute step jump of the run (a robust scale, so steady
  toxicity buildup does not count as a flash).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
from torch import nn

from wilke_lib.analysis.toxicity import ToxicityRecording, edited_records, jump_ratios, step_jumps, toxicity_run
from wilke_lib.counterfact import load_counterfact
from wilke_lib.results import results_dir, write_json_atomic
from wilke_lib.tokens import fill, target_str


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
    out["jump_ratio"] = jump_ratios(out["norm_jump"])
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
    answers target_true), e.g. `toxicity.ToxicityRecording.table`. Returns the flagged rows (step, case_id, norm,
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


WORKING_WINDOW = 16
"""Steps before a step over which the model must still work for a flash there to count (App. B)."""
MIN_WORKING = 0.5
"""Mean edit success and mean rollback success over that window that count as a working model."""


def working_before(scored: pd.DataFrame, window: int = WORKING_WINDOW, min_working: float = MIN_WORKING) -> pd.Series:
    """Per step (rows sorted by step): whether the model still worked just before it, i.e. over the
    `window` steps before, the mean edit success and the mean rollback success were both at least
    `min_working`. The first step edits the unedited model, which knows every record: it works.

    Appendix B's flash records "exhibit a relatively high success rate during the editing phase, but
    during the rollback phase after editing, a lower success rate": a failed rollback only singles a
    record out while rollbacks otherwise succeed. In a collapsed model every rollback fails."""
    def before(column: str) -> pd.Series:
        return scored[column].astype(float).shift(1).rolling(window, min_periods=1).mean()

    works = (before("edit_success") >= min_working) & (before("rollback_success") >= min_working)
    works.iloc[:1] = True
    return works


def app_b_flash(scored: pd.DataFrame, window: int = WORKING_WINDOW, min_working: float = MIN_WORKING) -> pd.DataFrame:
    """The steps of a `score_flash` table that are toxicity flash by Appendix B's definition: the edit
    succeeded (ES = 1), its rollback failed (`rollback_failed`), the norm jumped (`norm_spike`) and the
    model still worked in the `window` steps before (`working_before`). Adds the column `working`."""
    out = scored.assign(working=working_before(scored, window, min_working).to_numpy())
    keep = out["rollback_failed"] & out["norm_spike"] & (out["edit_success"].astype(float) >= 1.0) & out["working"]
    return out[keep].reset_index(drop=True)


def scored_lifelong_run(run, rollback_threshold: float = 0.1, jump_factor: float = 10.0) -> pd.DataFrame:
    """The detector's table (`score_flash`) of a lifelong run of ROME (`lifelong.RunResult`), from what its
    steps record: ES, rollback success and ||W_proj||_F of the edited layer after each step. Lets every
    committed ROME run, whatever its seed or model, be screened for App. B's flash records."""
    steps = run.steps.sort_values("step")
    norms = [next(iter((row or {}).values()), float("nan")) for row in steps["weight_norms_after_rollback"]]
    table = pd.DataFrame({"step": steps["step"].to_numpy(), "case_id": steps["case_id"].to_numpy(),
                          "edit_success": steps["ES"].astype(float).to_numpy(),
                          "rollback_success": steps["rollback_success"].astype(float).to_numpy(), "norm": norms,
                          "failed": steps["failed"].astype(bool).to_numpy()})
    return score_flash(table, rollback_threshold=rollback_threshold, jump_factor=jump_factor)


def record_content(record: dict) -> str:
    """Table 2 / 3 content of a CounterFact record: "prompt [true] => [new]." with the subject filled in."""
    req = record.get("requested_rewrite", record)
    return f"{fill(req['prompt'], req['subject'])} [{target_str(req['target_true'])}] => [{target_str(req['target_new'])}]."


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


@dataclass
class FlashAnalysis:
    """A lifelong ROME run at the predefined layer and the flash detector's verdict (Appendix B).

    sequence: the edited records in order; recording: the run's toxicity; scored: the per-step
    table with the detector's columns (`score_flash`); flagged: the flash steps (`detect_flash`);
    flash_records / normal_records: edited records flagged / neither flagged, nor with a failed
    rollback, nor with a norm spike.
    """

    layer: int
    sequence: list[dict]
    recording: ToxicityRecording
    scored: pd.DataFrame
    flagged: pd.DataFrame
    flash_records: list[dict]
    normal_records: list[dict]
    settings: dict
    app_b: pd.DataFrame = field(default_factory=pd.DataFrame)
    app_b_records: list[dict] = field(default_factory=list)

    @property
    def working_steps(self) -> int:
        """Steps at which the model still worked just before (`working_before`)."""
        return int(working_before(self.scored).sum())

    def app_b_summary(self) -> str:
        """How the detector's flagged steps fare against each part of App. B's definition."""
        flagged = self.scored[self.scored["flash"]]
        succeeded = int((flagged["edit_success"].astype(float) >= 1.0).sum())
        working = int(working_before(self.scored)[self.scored["flash"]].sum())
        first = f", the first at step {int(flagged['step'].min()):,}" if len(flagged) else ""
        return (f"the detector flags {len(flagged)} of {len(self.scored):,} steps{first}; {succeeded} of them with ES = 1, "
                f"{working} in a working model (edit and rollback success >= {MIN_WORKING:g} over the "
                f"{WORKING_WINDOW} steps before, true before {self.working_steps:,} steps of the run); "
                f"{len(self.app_b)} meet App. B's definition")

    def table(self) -> pd.DataFrame:
        """The flash records in the format of the paper's Tables 2-3 (Record, Content)."""
        return flash_table(self.sequence, self.flagged)

    def largest_jumps(self, k: int) -> list[dict]:
        """The `k` edited records with the largest norm jumps (stand-ins when nothing is flagged)."""
        order = self.scored.sort_values("jump_ratio", ascending=False)["case_id"].tolist()[:k]
        by_id = {r["case_id"]: r for r in self.sequence}
        return [by_id[i] for i in order]


def flash_analysis(model: nn.Module, tok, records: Sequence[dict], model_name: str, hparams: Any, *,
                   n_steps: int, seed: int, rollback_threshold: float = 0.1, jump_factor: float = 10.0,
                   min_edit_success: float | None = None, cache: Any = None, known: Callable | None = None
                   ) -> FlashAnalysis:
    """The lifelong ROME run (edit + rollback) of `n_steps` known records at ROME's predefined layer
    (`toxicity.toxicity_run`: chapter 03's run when the size and seed agree), screened by
    `detect_flash` (Appendix B: rollback success < `rollback_threshold` and a norm jump >
    `jump_factor` x the median step jump). The flash records are also written to
    `results/<model>/flash_records.json`."""
    recording = toxicity_run(model, tok, records, model_name, hparams, n_steps=n_steps, seed=seed, cache=cache,
                             known=known)
    sequence = edited_records(model, tok, records, model_name, hparams, n_steps=n_steps, seed=seed, known=known)
    layer = recording.layers[0]
    settings = dict(rollback_threshold=rollback_threshold, jump_factor=jump_factor, min_edit_success=min_edit_success)
    kwargs = dict(original_norm=recording.original_norms[layer], **settings)
    scored = score_flash(recording.table, **kwargs)
    flagged = detect_flash(recording.table, **kwargs)
    flash_ids = set(flagged["case_id"])
    bad = set(scored.loc[scored["rollback_failed"] | scored["norm_spike"] | scored["failed"], "case_id"])
    app_b = app_b_flash(scored)
    app_b_ids = set(app_b["case_id"])
    analysis = FlashAnalysis(layer=layer, sequence=sequence, recording=recording, scored=scored, flagged=flagged,
                             flash_records=[r for r in sequence if r["case_id"] in flash_ids],
                             normal_records=[r for r in sequence if r["case_id"] not in flash_ids | bad],
                             settings=settings, app_b=app_b,
                             app_b_records=[r for r in sequence if r["case_id"] in app_b_ids])
    write_json_atomic(results_dir(model_name) / "flash_records.json",
                      {"model_name": model_name, "n_steps": len(sequence), "seed": seed, "layer": layer,
                       "detector": settings, "case_ids": sorted(flash_ids), "records": analysis.flash_records,
                       "app_b_case_ids": sorted(app_b_ids),
                       "app_b": {"window": WORKING_WINDOW, "min_working": MIN_WORKING,
                                 "working_steps": analysis.working_steps}})
    return analysis


def flash_free_run(model: nn.Module, tok, records: Sequence[dict], analysis: FlashAnalysis, hparams: Any, *,
                   model_name: str, seed: int, cache: Any = None, known: Callable | None = None,
                   compute: bool = True) -> ToxicityRecording | None:
    """The same experiment with the flash records left out of the known records (Sec. 4.2, Fig. 5-6);
    the run itself when nothing was flagged. With `compute=False` a run not finished on disk is not
    computed (a 1,024-step run costs about an hour of a CPU core): None."""
    if not analysis.flash_records:
        return analysis.recording
    return toxicity_run(model, tok, records, model_name, hparams, n_steps=len(analysis.sequence), seed=seed,
                        cache=cache, exclude=[r["case_id"] for r in analysis.flash_records], known=known,
                        compute=compute)


@dataclass
class Groups:
    """Flash and normal records for the per-record analyses (Sec. 4.3-4.4, App. A, D, E).

    flash_label says what the flash group is: the detected flash records, records from a file
    (e.g. the paper's Tables 2-3 for GPT2-XL / GPT-J), or, when the detector found none, the
    records with the largest norm jumps of the run (the largest tenth of the steps).
    """

    flash: list[dict]
    normal: list[dict]
    flash_label: str
    analysis: FlashAnalysis | None = None
    stand_in_reason: str = ""  # why the flash group holds stand-ins, not flash records ("" when it holds flash records)

    def precondition(self) -> str:
        """"" when the flash group holds flash records (App. B's definition, or a file of them), else why
        not: then a comparison of the groups cannot test a claim about flash records."""
        return self.stand_in_reason

    def as_dict(self) -> dict[str, list[dict]]:
        return {"flash": self.flash, "normal": self.normal}

    def labels(self) -> dict[str, str]:
        return {"flash": self.flash_label, "normal": "normal"}

    def table(self) -> pd.DataFrame:
        """group, Record, Content (the format of Tables 2-3) of every record of both groups."""
        return pd.DataFrame([{"group": self.labels()[g], "Record": r.get("case_id"), "Content": record_content(r)}
                             for g, recs in self.as_dict().items() for r in recs],
                            columns=["group", "Record", "Content"])


def contrast_groups(model: nn.Module, tok, records: Sequence[dict], model_name: str, hparams: Any, *,
                    source: str = "detected", n_steps: int, seed: int, n_flash: int | None, n_normal: int,
                    cache: Any = None, known: Callable | None = None, **detector: Any) -> Groups:
    """Up to `n_flash` flash records (None: all) and `n_normal` normal ones.

    `source="detected"`: from `flash_analysis` (chapter 05's run, read back); when it flags nothing,
    the records with the largest norm jumps stand in (labelled so). Otherwise `source` is the path
    of a CounterFact JSON of flash records (e.g. `../shared/data/counterfact_gpt2-xl_known_toxicity_flash.json`);
    the normal records are then other records the run edits.
    """
    if source != "detected":
        flash = load_counterfact(source)[:n_flash]
        ids = {r.get("case_id") for r in flash}
        pool = edited_records(model, tok, records, model_name, hparams, n_steps=n_steps, seed=seed, known=known)
        normal = [r for r in pool if r.get("case_id") not in ids][:n_normal]
        return Groups(flash, normal, f"flash records of {Path(source).name}")
    analysis = flash_analysis(model, tok, records, model_name, hparams, n_steps=n_steps, seed=seed, cache=cache,
                              known=known, **detector)
    flash, label, reason = analysis.app_b_records[:n_flash], "flash (App. B)", ""
    if not flash:  # stand-ins: the largest tenth of the steps by norm jump, at most n_flash
        k = max(1, math.ceil(0.1 * len(analysis.sequence)))
        k = k if n_flash is None else min(n_flash, k)
        flash, label = analysis.largest_jumps(k), "largest norm jumps (no App. B flash record)"
        reason = (f"no flash record by App. B's definition in chapter 5's {len(analysis.sequence):,}-step ROME run "
                  f"({analysis.app_b_summary()}): the flash group holds stand-ins, the {len(flash)} largest norm jumps")
    ids = {r["case_id"] for r in flash}
    normal = [r for r in analysis.normal_records if r["case_id"] not in ids][:n_normal]
    return Groups(flash, normal, label, analysis, reason)
