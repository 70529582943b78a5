"""Toxicity of lifelong editing (Hu et al. 2024, Sec. 4.1-4.2, Appendix C), read from lifelong runs.

The runner (`wilke_lib.lifelong`) records at every step the norms ||W^l||_F and ||W^l - W_0^l||_F
of the editor's predefined layers (Eq. 7 accumulated) and the rollback's success, and at powers of
two the block-averaged toxicity matrix. The toxicity chapters therefore read the lifelong runs of
chapter 03 (the same configuration is the same run, read back) instead of running their own loop:

* `toxicity_run`: the lifelong run of an editor (ROME in Sec. 4, MEMIT in App. C) as a
  `ToxicityRecording`: its per-step table and snapshots;
* `norm_table` / `toxicity_summary` / `toxicity_verdicts`: the numbers behind Fig. 3-6;
* `memit_verdicts` / `memit_sentence`: Appendix C per MEMIT layer.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from torch import nn

from wilke_lib.analysis.verdicts import verdict_table
from wilke_lib.arch import ModelAdapter
from wilke_lib.editors.common import WeightJournal
from wilke_lib.hparams import editor_of
from wilke_lib.lifelong import (Backend, LifelongConfig, RunResult, default_backend, lifelong_dir, read_back,
                                records_fingerprint, run_lifelong)
from wilke_lib.lifelong import toxicity_snapshots as run_snapshots
from wilke_lib.lifelong.runner import known_cached, split_records

PAPER_SNAPSHOT_STEPS: tuple[int, ...] = (2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
"""The steps of Fig. 3b-6b."""


@contextmanager
def preserved_weights(model: nn.Module) -> Iterator[None]:
    """Every layer's W_proj (the only weights the editors change) restored bit-identically on exit."""
    adapter = ModelAdapter(model)
    journal = WeightJournal(adapter)
    for layer in range(adapter.n_layers):
        journal.snapshot(layer)
    try:
        yield
    finally:
        journal.restore()


@dataclass
class ToxicityRecording:
    """The toxicity of a lifelong run.

    table: one row per step: step, case_id, failed, edit_success (ES of the step), rollback_success,
    norm_<l> / toxicity_<l> per recorded layer, and norm / toxicity_norm of the first one;
    snapshots[step][layer]: the block-averaged toxicity matrix W - W_0 at powers of two.
    """

    layers: list[int]
    original_norms: dict[int, float]
    table: pd.DataFrame
    snapshots: dict[int, dict[int, np.ndarray]]
    run: RunResult | None = None


def recording_of(run: RunResult) -> ToxicityRecording:
    """The `ToxicityRecording` of a lifelong run (ValueError if the run recorded no layer)."""
    steps = run.steps.sort_values("step")
    first = steps.iloc[0]
    layers = sorted(int(l) for l in (first.get("toxicity_norms") or {}))
    if not layers:
        raise ValueError(f"{run.run_dir}: the run recorded the toxicity of no layer (WilKE chooses per edit; pass "
                         "LifelongConfig(toxicity_layers=...) to record some)")
    rows = []
    for _, s in steps.iterrows():
        row = {"step": int(s["step"]), "case_id": s["case_id"], "failed": bool(s["failed"]), "error": s["error"],
               "rollback_error": s["rollback_error"], "edit_success": float(s["ES"]),
               "rollback_success": float(s["rollback_success"])}
        for l in layers:
            row[f"norm_{l}"] = float(s["layer_norms"][str(l)])
            row[f"toxicity_{l}"] = float(s["toxicity_norms"][str(l)])
        rows.append(row)
    table = pd.DataFrame(rows)
    table["norm"], table["toxicity_norm"] = table[f"norm_{layers[0]}"], table[f"toxicity_{layers[0]}"]
    originals = {int(l): float(v) for l, v in first["original_norms"].items()}
    snapshots = {s: {l: m.numpy() for l, m in by_layer.items()} for s, by_layer in run_snapshots(run).items()}
    return ToxicityRecording(layers, originals, table, snapshots, run)


def toxicity_config(model_name: str, hparams: Any, n_steps: int, seed: int, eval_batch_size: int = 64
                    ) -> LifelongConfig:
    """The lifelong run the toxicity chapters read: the editor's run of chapter 03 for that size and seed."""
    return LifelongConfig(model_name=model_name, editor=editor_of(hparams), hparams=hparams, n_edits=int(n_steps),
                          seed=int(seed), out_dir=str(lifelong_dir(model_name)), eval_batch_size=eval_batch_size)


def _backend(known: Callable | None) -> Backend:
    """The library's backend, with another known-record filter when one is given (tests, subsets)."""
    backend = default_backend()
    if known is not None:
        backend.known = known
    return backend


def longest_finished(records: Sequence[dict], model_name: str, hparams: Any | Sequence[Any], seed: int,
                     sizes: Sequence[int]) -> int:
    """The largest of `sizes` (run lengths) at which the lifelong run of every editor in `hparams` with
    `seed` is finished on disk (the paper's 1,024 once `make runs` has computed it), else the smallest
    size (which the page then computes or reads back as before). Never computes."""
    editors = list(hparams) if isinstance(hparams, (list, tuple)) else [hparams]
    fp = records_fingerprint(records)
    for n in sorted(set(sizes), reverse=True):
        if all(read_back(fp, toxicity_config(model_name, h, n, seed)) is not None for h in editors):
            return n
    return min(sizes)


def toxicity_run(model: nn.Module, tok, records: Sequence[dict], model_name: str, hparams: Any, *, n_steps: int,
                 seed: int, cache: Any = None, exclude: Sequence[Any] = (), known: Callable | None = None,
                 compute: bool = True) -> ToxicityRecording | None:
    """The lifelong run (edit + rollback, Appendix F) of `hparams`' editor on `n_steps` known records,
    computed or read back, as a `ToxicityRecording`; records whose case_id is in `exclude` are left
    out before the split (the flash-free run of Sec. 4.2). `known` replaces the known-record filter.
    With `compute=False` a run that is not finished on disk is not computed: None.
    The model's weights are unchanged on return."""
    if exclude:
        dropped = set(exclude)
        records = [r for r in records if r.get("case_id") not in dropped]
    config = toxicity_config(model_name, hparams, n_steps, seed)
    if not compute:
        done = read_back(records, config)
        return None if done is None else recording_of(done)
    with preserved_weights(model):
        run = run_lifelong(model, tok, records, config, cache, backend=_backend(known))
    return recording_of(run)


def edited_records(model: nn.Module, tok, records: Sequence[dict], model_name: str, hparams: Any, *, n_steps: int,
                   seed: int, known: Callable | None = None) -> list[dict]:
    """The records the toxicity run of (n_steps, seed) edits, in order (P of Appendix F)."""
    config = toxicity_config(model_name, hparams, n_steps, seed)
    found = known_cached(model, tok, records, config, _backend(known), records_fingerprint(records))
    return split_records(found, config.n_edits, config.seed)[0]


def toxicity_snapshots(recording: ToxicityRecording, layer: int | None = None,
                       steps: Sequence[int] | None = None) -> dict[int, np.ndarray]:
    """{step: toxicity matrix of `layer`} (default the first recorded layer) at the snapshot steps
    (Fig. 3b-6b), optionally restricted to `steps`."""
    layer = recording.layers[0] if layer is None else layer
    wanted = sorted(recording.snapshots) if steps is None else [s for s in steps if s in recording.snapshots]
    return {s: recording.snapshots[s][layer] for s in wanted}


def norm_table(recording: ToxicityRecording, layer: int | None = None) -> pd.DataFrame:
    """step, norm, original_norm, ratio, toxicity_norm of one recorded layer (Fig. 3a-6a, 26a-30a)."""
    layer = recording.layers[0] if layer is None else int(layer)
    t = recording.table.sort_values("step")
    out = pd.DataFrame({"step": t["step"].to_numpy(), "norm": t[f"norm_{layer}"].to_numpy(),
                        "toxicity_norm": t[f"toxicity_{layer}"].to_numpy()})
    out["original_norm"] = recording.original_norms[layer]
    out["ratio"] = out["norm"] / out["original_norm"]
    return out


def toxicity_summary(recording: ToxicityRecording, layer: int | None = None,
                     top_fraction: float = 0.1) -> dict[str, float]:
    """Numbers behind the shape of Fig. 3a-6a for one recorded layer.

    final_ratio / max_ratio: ||W|| / ||W_0|| at the end / at most; top_share: the share of the
    total positive norm growth made by the largest `top_fraction` of the steps (a step-like
    curve has most of its growth in a few steps); buildup_rho: Spearman correlation of the
    accumulated toxicity ||W - W_0|| with the step (steady buildup: close to 1).
    """
    t = norm_table(recording, layer)
    jumps = np.diff(np.concatenate([[t["original_norm"].iloc[0]], t["norm"].to_numpy()]))
    positive = np.sort(np.clip(jumps, 0, None))[::-1]
    k = max(1, math.ceil(top_fraction * len(positive)))
    total = float(positive.sum())
    rho = float(pd.Series(t["toxicity_norm"]).rank().corr(pd.Series(t["step"]).rank())) if len(t) > 2 else math.nan
    return {"steps": int(len(t)), "original_norm": float(t["original_norm"].iloc[0]),
            "final_norm": float(t["norm"].iloc[-1]), "final_ratio": float(t["ratio"].iloc[-1]),
            "max_ratio": float(t["ratio"].max()), "final_toxicity": float(t["toxicity_norm"].iloc[-1]),
            "top_share": float(positive[:k].sum() / total) if total > 0 else math.nan,
            "buildup_rho": rho}


def toxicity_verdicts(full: dict, removed: dict | None, n_flash: int) -> pd.DataFrame:
    """Sec. 4.1-4.2 phenomena from `toxicity_summary` of the full run and of the flash-free run; `n_flash`:
    the run's flash records by App. B's definition (`flash.app_b_flash`)."""
    rows = [
        ("toxicity buildup", "||W - W_0|| grows steadily with the steps",
         f"Spearman rho(toxicity, step) = {full['buildup_rho']:.2f}",
         bool(full["buildup_rho"] > 0.8 and full["final_toxicity"] > 0)),
        ("toxicity flash", "a few records make the norm spike (11 of 1024 on GPT2-XL, 9 on GPT-J)",
         f"{n_flash} record(s) meet App. B's definition in {full['steps']} steps", n_flash > 0),
        ("step-like shape", "most of the growth happens in a few steps",
         f"the largest 10% of the steps make {100 * full['top_share']:.0f}% of the growth",
         bool(full["top_share"] > 0.5)),
        ("norm hundreds of times the original", "||W|| / ||W_0|| reaches several hundred after 1024 edits",
         f"max ||W|| / ||W_0|| = {full['max_ratio']:.3g} after {full['steps']} steps", bool(full["max_ratio"] >= 100)),
    ]
    if removed is not None and n_flash > 0:
        rows.append(("smaller, smoother buildup without the flash records",
                     "toxicity much smaller and uniform once flash records are removed (Fig. 5-6)",
                     f"final toxicity {removed['final_toxicity']:.3g} vs {full['final_toxicity']:.3g} with them",
                     bool(removed["final_toxicity"] < 0.5 * full["final_toxicity"])))
    return verdict_table(rows)


def step_jumps(table: pd.DataFrame, norm_col: str = "norm", original_norm: float | None = None) -> pd.Series:
    """Change of the recorded layer's norm at each step (rows sorted by step).

    The first step's jump is measured from `original_norm` when given (the unedited ||W_proj||_F),
    else it is 0.
    """
    norms = table[norm_col].astype(float)
    jumps = norms.diff()
    first = table.index[0]
    jumps.loc[first] = norms.loc[first] - float(original_norm) if original_norm is not None else 0.0
    return jumps


def jump_ratios(jumps: pd.Series) -> pd.Series:
    """Each step's norm jump over the median absolute jump of the run (a robust scale, so that steady
    toxicity buildup does not count as a spike)."""
    scale = float(np.median(np.abs(jumps.to_numpy())))
    return jumps / (scale if scale > 0 else float(np.finfo(float).tiny))


def memit_verdicts(recording: ToxicityRecording, jump_factor: float = 10.0) -> pd.DataFrame:
    """Appendix C per MEMIT layer: buildup, spikes, final norm ratio."""
    rows = []
    for layer in recording.layers:
        s = toxicity_summary(recording, layer)
        ratios = jump_ratios(step_jumps(norm_table(recording, layer), original_norm=s["original_norm"]))
        rows.append({"layer": layer, "final ||W||/||W_0||": s["final_ratio"], "max ||W||/||W_0||": s["max_ratio"],
                     "final toxicity": s["final_toxicity"], "buildup rho": s["buildup_rho"],
                     f"steps with a jump > {jump_factor:g} x median": int((ratios > jump_factor).sum()),
                     "top-10% share of growth": s["top_share"]})
    return pd.DataFrame(rows)


def memit_sentence(per_layer: pd.DataFrame, rome_max_ratio: float, model_name: str) -> str:
    """One Markdown paragraph from `memit_verdicts` (and ROME's largest norm ratio, NaN if unknown)."""
    spike_col = next(c for c in per_layer.columns if c.startswith("steps with a jump"))
    build = per_layer.loc[per_layer["buildup rho"] > 0.8, "layer"].tolist()
    spiky = per_layer.loc[per_layer[spike_col] > 0, "layer"].tolist()
    worst = float(per_layer["max ||W||/||W_0||"].max())
    text = (f"On {model_name}, {len(build)} of MEMIT's {len(per_layer)} layers build toxicity up steadily "
            f"(rho > 0.8){' (layers ' + ', '.join(map(str, build)) + ')' if build else ''}; ")
    text += (f"spike steps appear in layer(s) {', '.join(map(str, spiky))}; " if spiky
             else "no layer has a spike step; ")
    text += f"the largest norm ratio over the range is {worst:.3g}"
    if not math.isnan(rome_max_ratio):
        text += f", against {rome_max_ratio:.3g} for ROME at its single layer on the same records"
    return text + "."
