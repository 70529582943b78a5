"""Where an organism keeps its facts: the measurements of `make organism-report`
(`python -m wilke_lib.organisms report`).

An analysis of the organisms (it traces, edits and reads the experiments' helpers), so it sits in the analysis
layer above `organisms` (docs/design.md).

For known records spread over the subject kinds (and the famous subjects), causal tracing at the
subject's last token (Meng et al. 2022a, Sec. 2.1; window 1, the clean true object as the target):

* `subject_state_recovery`: the largest share of the gap between the clean and the corrupted
  probability that restoring the hidden state (block output) at the last subject token recovers,
  over layers. ROME presumes the fact is read from that state (subject enrichment, Geva et al. 2023);
  near 0 means the model recalls the fact elsewhere (the first organisms: 0.08).
* `causal_peak_per_record`: the layer whose MLP output at the last subject token, restored alone,
  recovers the most (window 1): where each fact is written into the subject's representation.
* `subject_specific_peak_per_record` (not a target; -1 where no impostor exists): the same MLP
  restorations once more with the clean value of an *impostor*, another subject ending in the same
  token, in the same prompt (`causal_trace.impostor_scores`); the layer where the subject's own value
  recovers most beyond the impostor's. Where the impostor recovers as much, the effect belongs to the
  last token, not to the subject (GPT-J's MLP 0 reads the token alone).

The noise is ROME's: 3 x the std of the token embeddings of the known facts' subjects
(`causal_trace.subject_noise_std`), one level for all records (`noise_std` in the report).
* `last_token_recall`: whether ROME's delta (WilKE Eq. 9) at the output of the editing layer's MLP,
  at the last subject token of the bare prompt and within ROME's norm clamp, makes the greedy answer
  the new object: whether the fact can be changed where ROME changes it.

`summary` turns the per-record rows into the report's keys.
"""

from __future__ import annotations

import math
import statistics
from collections import Counter
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn
from tqdm.auto import tqdm

from wilke_lib.analysis.causal_trace import impostor_scores, subject_noise_std, subject_token_range, trace
from wilke_lib.arch import ModelAdapter, hooks
from wilke_lib.counterfact import known_records, load_counterfact
from wilke_lib.editors.cache import EditCache
from wilke_lib.editors.delta import add_delta_hook, optimize_delta
from wilke_lib.experiments import edit_and_rollback, evenly_spaced
from wilke_lib.generation import greedy_matches
from wilke_lib.hparams import load_hparams
from wilke_lib.models import LADDER_NAME, ORGANISMS_DIR, load_model
from wilke_lib.organisms.train import training_summary, world_name
from wilke_lib.organisms.world import build_world, world_named
from wilke_lib.results import read_json
from wilke_lib.tokens import fact_token_index, prepare_request


def subject_kind(record: dict, world: Any | None = None) -> str:
    """"famous" for the single-token famous subjects, else the world's kind of the subject (or "?")."""
    if record.get("famous"):
        return "famous"
    if world is None:
        return "?"
    try:
        return world.kind_of(record["requested_rewrite"]["subject"])
    except KeyError:
        return "?"


def stratified(records: Sequence[dict], n: int, key) -> list[dict]:
    """About n records, the same number from each group of `key(record)`, evenly spaced within it."""
    groups: dict[str, list[dict]] = {}
    for rec in records:
        groups.setdefault(key(rec), []).append(rec)
    per = max(1, math.ceil(n / len(groups)))
    out = []
    for name in sorted(groups):
        members = groups[name]
        step = max(1, len(members) // per)
        out.extend(members[::step][:per])
    return out


def trace_record(model: nn.Module, tok, record: dict, *, noise_std: float | None = None, impostor: str | None = None,
                 n_samples: int = 10, noise_multiplier: float = 3.0) -> dict[str, Any]:
    """Hidden-state and MLP (window 1) causal traces at the last subject token of one record, and, with
    an `impostor`, the MLP restorations with its values (`impostor_scores`)."""
    rw = record["requested_rewrite"]
    out: dict[str, Any] = {"case_id": record.get("case_id"), "subject": rw["subject"],
                           "relation_id": rw["relation_id"], "impostor": impostor}
    kw = dict(n_samples=n_samples, noise_multiplier=noise_multiplier, noise_std=noise_std)
    for kind in ("hidden", "mlp"):
        res = trace(model, tok, rw["prompt"], rw["subject"], rw["target_true"], kind=kind, window=1,
                    token_positions="last_subject", **kw)
        gap = res.high_score - res.low_score
        row = res.scores[res.subject_range[1] - 1]
        share = (row - res.low_score) / gap if gap > 1e-6 else np.full_like(row, np.nan)
        out[f"{kind}_share"] = [float(x) for x in share]
        out["clean_prob"], out["corrupted_prob"] = float(res.high_score), float(res.low_score)
        out["n_subject_tokens"] = res.subject_range[1] - res.subject_range[0]
    hidden = np.asarray(out["hidden_share"])
    mlp = np.asarray(out["mlp_share"])
    out["subject_state_recovery"] = float(np.nanmax(hidden)) if np.isfinite(hidden).any() else math.nan
    out["causal_peak"] = int(np.nanargmax(mlp)) if np.isfinite(mlp).any() else -1
    out["peak_mlp_share"] = float(np.nanmax(mlp)) if np.isfinite(mlp).any() else math.nan
    out["subject_specific_peak"] = -1
    if impostor is not None and gap > 1e-6:
        scores = impostor_scores(model, tok, rw["prompt"], rw["subject"], impostor, rw["target_true"], kind="mlp", **kw)
        out["impostor_share"] = [float(x) for x in (scores - res.low_score) / gap]
        specific = mlp - np.asarray(out["impostor_share"])
        out["subject_specific_share"] = [float(x) for x in specific]
        out["subject_specific_peak"] = int(np.nanargmax(specific))
    return out


def impostors(tok, records: Sequence[dict], pool: Sequence[dict]) -> dict[Any, str | None]:
    """For each record (by case_id), a subject of `pool` whose name ends in the same token in the
    record's prompt, preferring one whose answer to the record's relation differs (its values then
    point elsewhere); None where no subject shares the token (the famous single-token subjects)."""
    answers = {(r["requested_rewrite"]["subject"], r["requested_rewrite"]["relation_id"]):
               r["requested_rewrite"]["target_true"]["str"] for r in pool}
    subjects = sorted({s for s, _ in answers})
    by_last: dict[tuple[bool, int], list[str]] = {}
    for subject in subjects:
        for spaced in (False, True):
            ids = tok((" " if spaced else "") + subject, add_special_tokens=False)["input_ids"]
            by_last.setdefault((spaced, ids[-1]), []).append(subject)
    out: dict[Any, str | None] = {}
    for rec in records:
        rw = rec["requested_rewrite"]
        ids, (_, end) = subject_token_range(tok, rw["prompt"], rw["subject"])
        spaced = not rw["prompt"].startswith("{}")
        others = [s for s in by_last.get((spaced, ids[end - 1]), []) if s != rw["subject"]]
        own = rw["target_true"]["str"]
        ranked = ([s for s in others if answers.get((s, rw["relation_id"])) != own]
                  + [s for s in others if answers.get((s, rw["relation_id"])) == own])
        out[rec.get("case_id")] = next((s for s in ranked if _ends_alike(tok, rw["prompt"], s, ids[end - 1])), None)
    return out


def _ends_alike(tok, prompt: str, subject: str, token: int) -> bool:
    ids, (_, end) = subject_token_range(tok, prompt, subject)
    return ids[end - 1] == token


def trace_records(model: nn.Module, tok, records: Sequence[dict], pool: Sequence[dict] | None = None,
                  progress: bool = True, **kwargs) -> list[dict]:
    """`trace_record` for each record, with ROME's noise level over the subjects of `pool` (default:
    the records; ROME: the known facts) and impostors drawn from `pool` (none without a pool)."""
    noise_std = kwargs.pop("noise_std", None) or subject_noise_std(
        model, tok, (r["requested_rewrite"]["subject"] for r in (pool or records)), kwargs.pop("noise_multiplier", 3.0))
    chosen = impostors(tok, records, pool) if pool else {}
    return [trace_record(model, tok, rec, noise_std=noise_std, impostor=chosen.get(rec.get("case_id")), **kwargs)
            for rec in tqdm(records, desc="causal traces", disable=not progress, leave=False)]


def last_token_flip(model: nn.Module, tok, record: dict, layer: int, hparams: Any) -> bool:
    """Whether ROME's delta at the output of `mlp_out(layer)` at the last subject token of the bare
    prompt (no context prefixes, ROME's clamp and steps) makes the greedy answer target_new."""
    rw = record["requested_rewrite"]
    module = ModelAdapter(model).mlp_out(layer)
    result = optimize_delta(model, tok, rw, layer, hparams, [""], runner="full")
    prepared = prepare_request(tok, rw)
    col = fact_token_index(tok, prepared.template, prepared.subject, "", "subject_last")
    device = next(model.parameters()).device
    hook = add_delta_hook(torch.tensor([0], device=device), torch.tensor([col], device=device), result.delta)
    with torch.no_grad(), hooks(forward=[(module, hook)]):
        return greedy_matches(model, tok, [prepared.prompt], [prepared.target_new])[0]


def summary(rows: Sequence[dict], n_layers: int) -> dict[str, Any]:
    """Medians and distributions of the traced rows (the report's keys that come from tracing)."""
    recovery = [r["subject_state_recovery"] for r in rows if math.isfinite(r["subject_state_recovery"])]
    out = {"n_traced": len(rows), "subject_state_recovery_median": statistics.median(recovery) if recovery else math.nan,
           **_peak_summary("causal_peak", [r["causal_peak"] for r in rows], n_layers),
           "mlp_share_mean_per_layer": np.nanmean([r["mlp_share"] for r in rows], axis=0).tolist(),
           "hidden_share_mean_per_layer": np.nanmean([r["hidden_share"] for r in rows], axis=0).tolist()}
    with_impostor = [r for r in rows if r.get("subject_specific_share") is not None]
    out["n_with_impostor"] = len(with_impostor)
    if with_impostor:
        out.update(_peak_summary("subject_specific_peak", [r["subject_specific_peak"] for r in with_impostor], n_layers))
        out["subject_specific_share_mean_per_layer"] = np.nanmean(
            [r["subject_specific_share"] for r in with_impostor], axis=0).tolist()
        # how much of each record's raw peak an impostor recovers as well (1: the peak is the token's)
        at_peak = [r["impostor_share"][r["causal_peak"]] / r["mlp_share"][r["causal_peak"]] for r in with_impostor
                   if r["causal_peak"] >= 0 and r["mlp_share"][r["causal_peak"]] > 1e-6]
        out["impostor_share_at_peak_median"] = statistics.median(at_peak) if at_peak else math.nan
    return out


def _peak_summary(key: str, peaks: Sequence[int], n_layers: int) -> dict[str, Any]:
    peaks = [p for p in peaks if p >= 0]
    counts = Counter(peaks)
    return {f"{key}_median": statistics.median(peaks) if peaks else math.nan,
            f"{key}_distinct": len(counts),
            f"{key}_top_share": max(counts.values()) / len(peaks) if peaks else math.nan,
            f"{key}_histogram": [counts.get(l, 0) for l in range(n_layers)]}


def organism_report(model_name: str, *, n_traced: int = 120, n_edits: int = 100, n_recall: int = 100,
                    progress: bool = True) -> dict[str, Any]:
    """The measurements of `make organism-report` for one organism (module docstring), as a dict.

    Known records are those the organism answers (greedy exact match); the traced records are
    `n_traced` of them spread over the subject kinds; `rome_success` edits `n_edits` of them at ROME's
    layer, each on a fresh copy; `last_token_recall` tries a delta on `n_recall` of them.
    """
    model, tok = load_model(model_name, device="cpu")
    training = training_summary(model_name) or {}
    world_source = world_name(model_name)
    world = build_world(world_named(world_source))
    records = load_counterfact(world_source)
    known = known_records(model, tok, records)
    kind = {r["case_id"]: subject_kind(r, world) for r in records}
    noise_std = subject_noise_std(model, tok, (r["requested_rewrite"]["subject"] for r in known))
    rows = trace_records(model, tok, stratified(known, n_traced, lambda r: kind[r["case_id"]]), pool=known,
                         noise_std=noise_std, progress=progress)
    rome = replace(load_hparams("rome", recipe_name(model_name)), mom2_corpus=world_source)
    cache = EditCache.for_model(model)
    edits = [edit_and_rollback(model, tok, r, rome, cache)
             for r in tqdm(evenly_spaced(known, n_edits), desc="ROME single edits", disable=not progress)]
    flips = [last_token_flip(model, tok, r, rome.layer, rome)
             for r in tqdm(evenly_spaced(known, n_recall), desc="last-token recall", disable=not progress)]
    adapter = ModelAdapter(model)
    traced = summary(rows, adapter.n_layers)
    return {
        "model": model_name, "n_facts": len(records), "n_known": len(known), "known_rate": len(known) / len(records),
        "known_rate_by_kind": {k: sum(kind[r["case_id"]] == k for r in known) / max(1, sum(v == k for v in kind.values()))
                               for k in sorted(set(kind.values()))},
        "known_rate_held_out": (sum(not r.get("prompted", True) for r in known)
                                / max(1, sum(not r.get("prompted", True) for r in records))),
        "layers": adapter.n_layers, "d_model": adapter.d_model, "d_mlp": adapter.d_mlp,
        "n_parameters": sum(p.numel() for p in model.parameters()), "train_seconds": training.get("train_seconds"),
        "train_tokens": training.get("train_tokens"),
        **traced,
        "subject_state_recovery": [r["subject_state_recovery"] for r in rows],
        "causal_peak_per_record": [r["causal_peak"] for r in rows],
        "subject_specific_peak_per_record": [r["subject_specific_peak"] for r in rows],
        "noise_std": noise_std,
        "traced_kinds": [kind[r["case_id"]] for r in rows],
        "traced_case_ids": [r["case_id"] for r in rows],
        "rome_layer": rome.layer, "rome_clamp_factor": rome.clamp_norm_factor, "rome_steps": rome.v_num_grad_steps,
        "rome_update_form": rome.update_form,
        "rome_success": sum(e["success"] for e in edits) / len(edits),
        "rome_rollback_restored": sum(e["rollback_restored"] for e in edits) / len(edits),
        "last_token_recall": sum(flips) / len(flips),
    }


def recipe_name(model_name: str) -> str:
    """The organism whose editor settings a model uses: a rung of the width ladder ("toy-gpt2-w192") shares
    its architecture's organism's ("toy-gpt2"), as it shares its recipe; any other model its own."""
    found = LADDER_NAME.fullmatch(str(model_name))
    return f"toy-{found.group(1)}" if found else model_name


REPORT_FILE = "report.json"
TARGETS = (  # the targets of the organisms issue: (key, what is asked, test)
    ("known_rate", ">= 0.90", lambda r: r["known_rate"] >= 0.9),
    ("n_known", ">= 2560", lambda r: r["n_known"] >= 2560),
    ("subject_state_recovery_median", ">= 0.5", lambda r: r["subject_state_recovery_median"] >= 0.5),
    ("causal_peak_median", "in layers 2-8 of 12",
     lambda r: 2 * r["layers"] / 12 <= r["causal_peak_median"] <= 8 * r["layers"] / 12),
    ("causal_peak_distinct", ">= 4", lambda r: r["causal_peak_distinct"] >= 4),
    ("causal_peak_top_share", "<= 0.60", lambda r: r["causal_peak_top_share"] <= 0.6),
    ("rome_success", ">= 0.90", lambda r: r["rome_success"] >= 0.9),
    ("rome_clamp_factor", "<= 8", lambda r: r["rome_clamp_factor"] <= 8),
    ("rome_steps", "<= 40", lambda r: r["rome_steps"] <= 40),
    ("last_token_recall", ">= 0.90", lambda r: r["last_token_recall"] >= 0.9),
)
DESCRIPTIVE = ("n_facts", "layers", "d_model", "d_mlp", "n_parameters", "train_seconds", "train_tokens", "n_traced",
               "noise_std", "rome_layer", "rome_update_form")
# not targets: the MLP peaks once a same-token impostor's restoration is subtracted (module docstring)
IMPOSTOR_KEYS = ("n_with_impostor", "impostor_share_at_peak_median", "subject_specific_peak_median",
                 "subject_specific_peak_distinct", "subject_specific_peak_top_share")


def target_table(report: dict[str, Any]) -> pd.DataFrame:
    """key, target, value (with "met" / "MISSED") of one organism's report."""
    rows = [{"key": k, "target": "", "value": _shown(report.get(k))} for k in DESCRIPTIVE]
    for key, target, test in TARGETS:
        rows.append({"key": key, "target": target,
                     "value": f"{_shown(report.get(key))} ({'met' if test(report) else 'MISSED'})"})
    rows += [{"key": k, "target": "(not a target)", "value": _shown(report[k])} for k in IMPOSTOR_KEYS if k in report]
    return pd.DataFrame(rows)


def _shown(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) and math.isfinite(value) else str(value)


def impostor_verdict(report: dict[str, Any]) -> str | None:
    """Chapter 07's sentences on the impostor contrast of a report (None when it has none): how much of
    the raw MLP peak a same-token impostor recovers, and where the subject's own values help most."""
    if not report.get("n_with_impostor"):
        return None
    specific = report["subject_specific_share_mean_per_layer"]
    token_owned = report["impostor_share_at_peak_median"] > 0.5
    return (f"For the {report['n_with_impostor']} traced records whose last subject token other subjects share, "
            f"an impostor's MLP value recovers a median {report['impostor_share_at_peak_median']:.0%} of the "
            f"record's largest single-MLP effect. Beyond the impostor, the subject's own MLP values help most "
            f"at layer {report['subject_specific_peak_median']:g} (median over records; "
            f"{report['subject_specific_peak_distinct']} distinct layers, "
            f"{report['subject_specific_peak_top_share']:.0%} at the most common; the largest mean share beyond the "
            f"impostor, {max(specific):.3f} of the gap, is at layer {int(np.argmax(specific))}), against layer "
            f"{report['causal_peak_median']:g} for the raw peak the target is set on. "
            + ("The raw peak is mostly the last token's, not the subject's: the measure the organisms were "
               "built for cannot see where these records are told apart." if token_owned
               else "The raw peak is mostly the subject's own: where the organism writes its facts and where "
                    "tracing finds them agree."))


def traced_frame(report: dict[str, Any]) -> pd.DataFrame:
    """One row per traced record of a report: case_id, subject kind, subject_state_recovery and the
    MLP causal peak layer, and the subject-specific peak (-1: no impostor) where the report has it
    (the distributions chapter 07 draws)."""
    frame = pd.DataFrame({"case_id": report["traced_case_ids"], "kind": report["traced_kinds"],
                          "subject_state_recovery": report["subject_state_recovery"],
                          "causal_peak": report["causal_peak_per_record"]})
    if "subject_specific_peak_per_record" in report:
        frame["subject_specific_peak"] = report["subject_specific_peak_per_record"]
    return frame


def load_report(model_name: str) -> dict[str, Any] | None:
    """The committed `organisms/<name>/report.json` of an organism, or None when it has none."""
    path = ORGANISMS_DIR / model_name / REPORT_FILE
    return read_json(path) if path.is_file() else None
