"""The experiments of the analysis chapters (notebooks 05-09), cached under ``results/<model>/``.

Each function runs one experiment of Hu et al. (2024), Sec. 4 and Appendices A-E, on the ORIGINAL
model and returns it with the model's weights unchanged; the result is saved under
``<repo>/results/<model slug>/`` and read back by the next call with the same inputs (the cache
key hashes the model's identity, the editor's settings, the records and the sizes). Notebooks 06-08
therefore reuse the lifelong ROME run of notebook 05 (its flash records) instead of repeating it.

* `edit_sequence`: the records a lifelong run edits, in order (Appendix F: known records, the first
  2n shuffled with the seed, the first n of them);
* `recorded_run`: a lifelong edit + rollback run with a `toxicity.ToxicityRecorder` (Fig. 3-6, 26-30);
* `flash_analysis`: that run for ROME at its predefined layer plus the automatic flash detector
  (Appendix B, Tables 2-3); `contrast_groups` gives flash vs normal records for Sec. 4.3-4.4;
* `per_layer_norms`: single edits at every layer (Fig. 7-8, 39-42);
* `strength_tables`: activation and delta strength per layer (Fig. 31-38);
* `*_summary` / `verdict_table`: the numbers each chapter compares with the paper.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import pandas as pd
import torch
from torch import nn

from wilke_lib.analysis import flash as flash_mod
from wilke_lib.analysis import toxicity as tox_mod
from wilke_lib.arch import ModelAdapter

log = logging.getLogger(__name__)

CACHE_VERSION = 2
"""Bump to invalidate every cached result of this module."""


# --------------------------------------------------------------------------- paths and keys
def results_dir(model_name: str, *parts: str, create: bool = True) -> Path:
    """``<repo>/results/<model slug>/<parts...>`` (created unless ``create=False``); the environment
    variable ``WILKE_RESULTS_DIR`` replaces ``<repo>/results`` (the tests use it)."""
    import os

    from wilke_lib.book import model_slug, repo_root

    root = os.environ.get("WILKE_RESULTS_DIR")
    path = (Path(root) if root else repo_root() / "results") / model_slug(model_name)
    for part in parts:
        path = path / part
    if create:
        path.mkdir(parents=True, exist_ok=True)
    return path


def cache_key(*objects: Any) -> str:
    """16 hex digits of the sha256 of the objects' canonical JSON (dataclasses as dicts)."""
    def plain(obj: Any) -> Any:
        if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
            return {"__type__": type(obj).__name__, **dataclasses.asdict(obj)}
        return obj

    text = json.dumps([CACHE_VERSION, *map(plain, objects)], sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _model_id(model: nn.Module) -> str:
    from wilke_lib.models import model_identity

    return model_identity(model)


def _case_ids(records: Sequence[dict]) -> list:
    return [r.get("case_id") for r in records]


def _cached_frame(path: Path, compute: Callable[[], pd.DataFrame]) -> pd.DataFrame:
    """Read the pickled DataFrame at `path`, or compute, save and return it."""
    if path.exists():
        return pd.read_pickle(path)
    frame = compute()
    tmp = path.with_name(path.name + ".tmp")
    frame.to_pickle(tmp)
    tmp.replace(path)
    return frame


@contextmanager
def preserved_weights(model: nn.Module) -> Iterator[None]:
    """Restore every layer's W_proj on exit: the editors change nothing else (`editing.WeightJournal`)."""
    adapter = ModelAdapter(model)
    saved = {l: adapter.out_weight(l).detach().clone() for l in range(adapter.n_layers)}
    try:
        yield
    finally:
        for l, weight in saved.items():
            adapter.set_out_weight(l, weight)


# --------------------------------------------------------------------------- records
def known_records_cached(model: nn.Module, tok, records: Sequence[dict], model_name: str,
                         batch_size: int = 64) -> list[dict]:
    """`counterfact.known_records` of the unedited model, cached as record indices (Appendix F.1)."""
    from wilke_lib.counterfact import known_records
    from wilke_lib.lifelong import records_fingerprint

    path = results_dir(model_name, "known") / f"{cache_key(_model_id(model), records_fingerprint(records))}.json"
    if path.exists():
        return [records[i] for i in json.loads(path.read_text())["indices"]]
    known = {id(r) for r in known_records(model, tok, list(records), batch_size=batch_size)}
    indices = [i for i, r in enumerate(records) if id(r) in known]
    path.write_text(json.dumps({"model_name": model_name, "n_records": len(records), "indices": indices}))
    return [records[i] for i in indices]


def edit_sequence(model: nn.Module, tok, records: Sequence[dict], model_name: str, n_steps: int,
                  seed: int) -> list[dict]:
    """`n_steps` known records drawn at random (`random.Random(seed).sample`), in editing order:
    Sec. 4.1 "we randomly sample these data and conduct 1024 edits". (All known records are
    sampled from, not only the first 2n as the lifelong protocol's `split_records` does: the
    synthetic world lists its records relation by relation.) Fewer if fewer records are known."""
    import random

    known = known_records_cached(model, tok, records, model_name)
    if not known:
        raise ValueError(f"{model_name} knows none of the {len(records)} records: nothing to edit")
    n = min(int(n_steps), len(known))
    if n < n_steps:
        log.warning("only %d known records: running %d steps instead of %d", len(known), n, n_steps)
    return random.Random(seed).sample(list(known), n)


def snapshot_steps_for(n_steps: int) -> tuple[int, ...]:
    """Steps 2, 4, 8, ... up to `n_steps`, and `n_steps` itself (Fig. 3b-6b: 2, 4, ..., 1024)."""
    steps = [2 ** k for k in range(1, max(1, int(math.log2(max(n_steps, 1)))) + 1) if 2 ** k <= n_steps]
    return tuple(sorted(set(steps + [int(n_steps)])))


# --------------------------------------------------------------------------- lifelong toxicity
def recorded_run(model: nn.Module, tok, sequence: Sequence[dict], hparams: Any, *, model_name: str,
                 name: str, layers: Sequence[int] | None = None,
                 snapshot_steps: Sequence[int] | None = None, size: int = 64, cache: Any = None,
                 compute: bool = True, progress: bool = True) -> tox_mod.ToxicityRecording | None:
    """Edit + rollback every record of `sequence` in turn (Sec. 4.1, Appendix F) with the editor of
    `hparams`, recording toxicity of W_proj at `layers` (default the editor's predefined layer(s))
    with `toxicity.lifelong_rome_toxicity`; saved as ``results/<model>/toxicity/<name>_<key>.pt``
    and read back when present. The model is restored afterwards. With ``compute=False`` a missing
    recording gives None instead of running."""
    from wilke_lib.hparams import to_dict
    from wilke_lib.lifelong import records_fingerprint

    steps = tuple(snapshot_steps) if snapshot_steps is not None else snapshot_steps_for(len(sequence))
    key = cache_key(_model_id(model), to_dict(hparams), records_fingerprint(sequence),
                    list(layers) if layers is not None else None, steps, size)
    path = results_dir(model_name, "toxicity") / f"{name}_{key}.pt"
    if path.exists():
        return tox_mod.ToxicityRecording.load(path)
    if not compute:
        return None
    with preserved_weights(model):
        recording = tox_mod.lifelong_rome_toxicity(model, tok, sequence, hparams, snapshot_steps=steps,
                                                   layers=layers, size=size, cache=cache, progress=progress)
    recording.save(path.with_name(path.name + ".tmp")).replace(path)
    return recording


def norm_table(recording: tox_mod.ToxicityRecording, layer: int | None = None) -> pd.DataFrame:
    """step, norm, original_norm, ratio, toxicity_norm of one recorded layer (Fig. 3a-6a, 26a-30a)."""
    layer = recording.layers[0] if layer is None else int(layer)
    t = recording.table.sort_values("step")
    out = pd.DataFrame({"step": t["step"].to_numpy(), "norm": t[f"norm_{layer}"].to_numpy(),
                        "toxicity_norm": t[f"toxicity_{layer}"].to_numpy()})
    out["original_norm"] = recording.original_norms[layer]
    out["ratio"] = out["norm"] / out["original_norm"]
    return out


@dataclass
class FlashAnalysis:
    """A lifelong ROME run at the predefined layer and the flash detector's verdict (Appendix B).

    sequence: the edited records in order; recording: the toxicity recording; scored: the per-step
    table with the detector's columns (`flash.score_flash`); flagged: the flash steps
    (`flash.detect_flash`); flash_records / normal_records: edited records flagged / neither
    flagged, nor with a failed rollback, nor with a norm spike.
    """

    layer: int
    sequence: list[dict]
    recording: tox_mod.ToxicityRecording
    scored: pd.DataFrame
    flagged: pd.DataFrame
    flash_records: list[dict]
    normal_records: list[dict]
    settings: dict

    def table(self) -> pd.DataFrame:
        """The flash records in the format of the paper's Tables 2-3 (Record, Content)."""
        return flash_mod.flash_table(self.sequence, self.flagged)

    def largest_jumps(self, k: int) -> list[dict]:
        """The `k` edited records with the largest norm jumps (stand-ins when nothing is flagged)."""
        order = self.scored.sort_values("jump_ratio", ascending=False)["case_id"].tolist()[:k]
        by_id = {r["case_id"]: r for r in self.sequence}
        return [by_id[i] for i in order]


def flash_analysis(model: nn.Module, tok, records: Sequence[dict], model_name: str, hparams: Any, *,
                   n_steps: int, seed: int, rollback_threshold: float = 0.1, jump_factor: float = 10.0,
                   min_edit_success: float | None = None, cache: Any = None,
                   progress: bool = True) -> FlashAnalysis:
    """Lifelong ROME (edit + rollback) of `n_steps` known records at ROME's predefined layer,
    recorded (`recorded_run`, cached) and screened by `flash.detect_flash` (Appendix B: rollback
    success < `rollback_threshold` and a norm jump > `jump_factor` x the median step jump).
    The flash records are also written to ``results/<model>/flash_records.json``."""
    sequence = edit_sequence(model, tok, records, model_name, n_steps, seed)
    recording = recorded_run(model, tok, sequence, hparams, model_name=model_name, name="rome_lifelong",
                             cache=cache, progress=progress)
    layer = recording.layers[0]
    settings = dict(rollback_threshold=rollback_threshold, jump_factor=jump_factor,
                    min_edit_success=min_edit_success)
    kwargs = dict(original_norm=recording.original_norms[layer], **settings)
    scored = flash_mod.score_flash(recording.table, **kwargs)
    flagged = flash_mod.detect_flash(recording.table, **kwargs)
    flash_ids = set(flagged["case_id"])
    bad = set(scored.loc[scored["rollback_failed"] | scored["norm_spike"] | scored["failed"], "case_id"])
    analysis = FlashAnalysis(layer=layer, sequence=sequence, recording=recording, scored=scored, flagged=flagged,
                             flash_records=[r for r in sequence if r["case_id"] in flash_ids],
                             normal_records=[r for r in sequence if r["case_id"] not in flash_ids | bad],
                             settings=settings)
    (results_dir(model_name) / "flash_records.json").write_text(json.dumps(
        {"model_name": model_name, "n_steps": len(sequence), "seed": seed, "layer": layer, "detector": settings,
         "case_ids": sorted(flash_ids), "records": analysis.flash_records}, indent=1, default=str))
    return analysis


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

    def as_dict(self) -> dict[str, list[dict]]:
        return {"flash": self.flash, "normal": self.normal}

    def labels(self) -> dict[str, str]:
        return {"flash": self.flash_label, "normal": "normal"}

    def table(self) -> pd.DataFrame:
        """group, Record, Content (the format of Tables 2-3) of every record of both groups."""
        return pd.DataFrame([{"group": self.labels()[g], "Record": r.get("case_id"),
                              "Content": flash_mod.record_content(r)}
                             for g, recs in self.as_dict().items() for r in recs],
                            columns=["group", "Record", "Content"])


def contrast_groups(model: nn.Module, tok, records: Sequence[dict], model_name: str, hparams: Any, *,
                    source: str = "detected", n_steps: int, seed: int, n_flash: int | None, n_normal: int,
                    cache: Any = None, progress: bool = True, **detector: Any) -> Groups:
    """Up to `n_flash` flash records (None: all) and `n_normal` normal ones.

    `source="detected"`: from `flash_analysis` (notebook 05's run, read back from the cache); when
    it flags nothing, the records with the largest norm jumps stand in (labelled so). Otherwise
    `source` is the path of a CounterFact JSON of flash records (e.g. ``../shared/data/
    counterfact_gpt2-xl_known_toxicity_flash.json``); the normal records are then other known ones.
    """
    from wilke_lib.counterfact import load_counterfact

    if source != "detected":
        flash = load_counterfact(source)[:n_flash]
        ids = set(_case_ids(flash))
        pool = edit_sequence(model, tok, records, model_name, n_steps, seed)
        normal = [r for r in pool if r.get("case_id") not in ids][:n_normal]
        return Groups(flash, normal, f"flash records of {Path(source).name}")
    analysis = flash_analysis(model, tok, records, model_name, hparams, n_steps=n_steps, seed=seed, cache=cache,
                              progress=progress, **detector)
    flash, label = analysis.flash_records[:n_flash], "flash (detected)"
    if not flash:  # stand-ins: the largest tenth of the steps by norm jump, at most n_flash
        k = max(1, math.ceil(0.1 * len(analysis.sequence)))
        k = k if n_flash is None else min(n_flash, k)
        flash, label = analysis.largest_jumps(k), "largest norm jumps (no flash detected)"
    ids = set(_case_ids(flash))
    normal = [r for r in analysis.normal_records if r["case_id"] not in ids][:n_normal]
    return Groups(flash, normal, label, analysis)


# --------------------------------------------------------------------------- summaries (Sec. 4.1-4.2)
def toxicity_summary(recording: tox_mod.ToxicityRecording, layer: int | None = None,
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


def verdict_table(rows: Sequence[tuple[str, str, str, bool | None]]) -> pd.DataFrame:
    """A comparison table: (phenomenon, what the paper reports, what the organism shows, observed?)."""
    def word(flag: bool | None) -> str:
        return "n/a" if flag is None else ("yes" if flag else "no")

    return pd.DataFrame([{"phenomenon": p, "paper": paper, "this model": ours, "observed": word(flag)}
                         for p, paper, ours, flag in rows])


def verdict_sentence(table: pd.DataFrame, subject: str = "This model") -> str:
    """One Markdown paragraph from a `verdict_table`: what is observed, what is not, what is n/a."""
    parts = []
    for word, label in (("yes", "shows"), ("no", "does not show"), ("n/a", "cannot be checked for")):
        items = table.loc[table["observed"] == word, "phenomenon"].tolist()
        if items:
            parts.append(f"{label} " + "; ".join(f"*{p}*" for p in items))
    return f"{subject} " + ", and ".join(parts) + "." if parts else ""


def flash_free_run(model: nn.Module, tok, analysis: FlashAnalysis, hparams: Any, *, model_name: str,
                   cache: Any = None, progress: bool = True) -> tox_mod.ToxicityRecording:
    """The same lifelong run with the flash records removed (Sec. 4.2, Fig. 5-6), same order
    otherwise; the run itself when nothing was flagged."""
    if not analysis.flash_records:
        return analysis.recording
    ids = set(_case_ids(analysis.flash_records))
    clean = [r for r in analysis.sequence if r["case_id"] not in ids]
    return recorded_run(model, tok, clean, hparams, model_name=model_name, name="rome_lifelong_no_flash",
                        cache=cache, progress=progress)


def toxicity_verdicts(full: dict, removed: dict | None, n_flash: int) -> pd.DataFrame:
    """Sec. 4.1-4.2 phenomena from `toxicity_summary` of the full run and of the flash-free run."""
    rows = [
        ("toxicity buildup", "||W - W_0|| grows steadily with the steps",
         f"Spearman rho(toxicity, step) = {full['buildup_rho']:.2f}",
         bool(full["buildup_rho"] > 0.8 and full["final_toxicity"] > 0)),
        ("toxicity flash", "a few records make the norm spike (11 of 1024 on GPT2-XL, 9 on GPT-J)",
         f"{n_flash} record(s) flagged in {full['steps']} steps", n_flash > 0),
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


# --------------------------------------------------------------------------- single edits per layer (Sec. 4.3)
def per_layer_norms(model: nn.Module, tok, groups: dict[str, Sequence[dict]], hparams: Any, *, model_name: str,
                    layers: Sequence[int] | None = None, cache: Any = None,
                    progress: bool = True) -> pd.DataFrame:
    """`toxicity.per_layer_flash` (single ROME edit at each layer, no rollback) of every record of
    every group; long table group, case_id, layer, norm_original, norm_edited, ratio, delta_norm
    (ROME's ||delta^l||, the delta strength of App. D.2), k_star_norm, error.
    Cached under ``results/<model>/flash_per_layer/``."""
    from tqdm.auto import tqdm

    from wilke_lib.hparams import to_dict

    layers = list(range(ModelAdapter(model).n_layers)) if layers is None else [int(l) for l in layers]
    ids = {g: _case_ids(rs) for g, rs in groups.items()}
    key = cache_key(_model_id(model), to_dict(hparams), ids, layers,
                    [[r["requested_rewrite"] for r in rs] for rs in groups.values()])
    path = results_dir(model_name, "flash_per_layer") / f"{key}.pkl"

    def compute() -> pd.DataFrame:
        frames = []
        items = [(g, r) for g, rs in groups.items() for r in rs]
        for group, record in tqdm(items, desc="single edits at every layer", disable=not progress):
            table = tox_mod.per_layer_flash(model, tok, record, hparams, layers, with_rollback=False, cache=cache)
            frames.append(table.assign(group=group, case_id=record.get("case_id")))
        columns = ["group", "case_id", "layer", "norm_original", "norm_edited", "delta_norm", "k_star_norm", "error"]
        out = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=columns)
        out["ratio"] = out["norm_edited"].astype(float) / out["norm_original"].astype(float)
        return out[columns[:5] + ["ratio"] + columns[5:]]

    return _cached_frame(path, compute)


def layers_to_edit(n_layers: int, stride: int = 1, predefined: int | None = None) -> list[int]:
    """Every `stride`-th layer from 0, plus the predefined one (stride 1: every layer, as the paper)."""
    layers = set(range(0, n_layers, max(1, int(stride))))
    if predefined is not None and 0 <= predefined < n_layers:
        layers.add(int(predefined))
    return sorted(layers)


def per_layer_summary(table: pd.DataFrame, predefined_layer: int) -> pd.DataFrame:
    """Per record: ||W'|| / ||W|| when editing at the predefined layer, the largest ratio and its
    layer, the smallest ratio and its layer (Fig. 7-8, 39-42)."""
    rows = []
    for (group, case), sub in table.groupby(["group", "case_id"], sort=False):
        sub = sub.set_index("layer")["ratio"]
        rows.append({"group": group, "case_id": case, "ratio_at_predefined": float(sub.get(predefined_layer, np.nan)),
                     "max_ratio": float(sub.max()), "layer_of_max": int(sub.idxmax()),
                     "min_ratio": float(sub.min()), "layer_of_min": int(sub.idxmin())})
    return pd.DataFrame(rows)


def per_layer_verdicts(summary: pd.DataFrame, predefined_layer: int, flash_label: str = "flash") -> pd.DataFrame:
    """Sec. 4.3 phenomena from `per_layer_summary`."""
    f, n = summary[summary.group == "flash"], summary[summary.group == "normal"]
    if f.empty or n.empty:
        return verdict_table([("flash vs normal", "-", "one of the groups is empty", None)])
    growth_f = float((f["ratio_at_predefined"] - 1).median())
    growth_n = float((n["ratio_at_predefined"] - 1).median())
    other_layer_better = float(((f["min_ratio"] - 1) < 0.1 * (f["ratio_at_predefined"] - 1)).mean())
    at_max = float((f["layer_of_max"] == predefined_layer).mean())
    return verdict_table([
        ("single edit at the predefined layer blows the norm up for flash records",
         "||W'|| >> ||W|| at the predefined layer (17 / 5), not at other layers",
         f"median growth ||W'||/||W|| - 1 at layer {predefined_layer}: {growth_f:.3g} ({flash_label}) vs "
         f"{growth_n:.3g} (normal)", bool(growth_f > 10 * max(growth_n, 1e-12))),
        ("another layer takes the flash records' edit gently",
         "editing a layer that does not match the predefined one avoids the flash",
         f"{100 * other_layer_better:.0f}% of the {flash_label} records have a layer with < 1/10 of the growth",
         bool(other_layer_better >= 0.5)),
        ("the predefined layer is the worst layer for flash records", "the peak of the blue curve sits at it",
         f"{100 * at_max:.0f}% of the {flash_label} records have their largest growth there", bool(at_max >= 0.5)),
    ])


# --------------------------------------------------------------------------- strength (Sec. 4.4, App. D)
def strength_tables(model: nn.Module, tok, groups: dict[str, Sequence[dict]], hparams: Any, *, model_name: str,
                    n_delta: int | None = None, delta_layers: Sequence[int] | None = None, cache: Any = None,
                    progress: bool = True) -> pd.DataFrame:
    """Activation strength ||sigma(x W_fc^l)|| (keys averaged over ROME's context prefixes) and
    ROME's update gain (`strength.update_gain`) of every record, and the delta strength ||delta^l||
    of the first `n_delta` records of each group (None = all), at every layer (Fig. 31-38).

    The delta strength is the ||delta^l|| of ROME's optimisation at layer l, which the single edits
    of `per_layer_norms` record: it is read from there (notebook 06's cache when the groups are the
    same, computed otherwise), at `delta_layers` (default every layer). Long table group, case_id,
    layer, activation_strength,
    delta_strength (NaN where not computed), update_gain. Cached under ``results/<model>/strength/``."""
    from wilke_lib.analysis import strength
    from wilke_lib.hparams import to_dict

    ids = {g: _case_ids(rs) for g, rs in groups.items()}
    key = cache_key(_model_id(model), to_dict(hparams), ids, n_delta,
                    [[r["requested_rewrite"] for r in rs] for rs in groups.values()],
                    list(delta_layers) if delta_layers is not None else None)
    path = results_dir(model_name, "strength") / f"{key}.pkl"

    def compute() -> pd.DataFrame:
        frames = [strength.strength_table(model, tok, recs, hparams, with_delta=False, with_gain=True, cache=cache,
                                          progress=progress).assign(group=group)
                  for group, recs in groups.items() if recs]
        out = pd.concat(frames, ignore_index=True)
        firsts = {g: list(rs) if n_delta is None else list(rs)[:n_delta] for g, rs in groups.items()}
        edits = per_layer_norms(model, tok, firsts, hparams, model_name=model_name, layers=delta_layers, cache=cache,
                                progress=progress)
        delta = edits[["group", "case_id", "layer", "delta_norm"]].rename(columns={"delta_norm": "delta_strength"})
        out = out.merge(delta, on=["group", "case_id", "layer"], how="left")
        return out[["group", "case_id", "layer", "activation_strength", "delta_strength", "update_gain"]]

    return _cached_frame(path, compute)


def strength_verdicts(table: pd.DataFrame, predefined_layer: int, flash_label: str = "flash") -> pd.DataFrame:
    """Appendix D phenomena: flash records' key at the predefined layer is orders of magnitude
    smaller than normal records'; delta strength varies across layers less than that."""
    at = table[table.layer == predefined_layer].groupby("group")["activation_strength"].median()
    if not {"flash", "normal"} <= set(at.index):
        return verdict_table([("flash vs normal", "-", "one of the groups is empty", None)])
    orders = float(np.log10(at["flash"] / at["normal"]))

    def spread(col: str, group: str) -> float:
        sub = table[(table.group == group)].dropna(subset=[col])
        if sub.empty:
            return math.nan
        per = sub.groupby("case_id")[col].agg(lambda v: np.log10(v.max() / v.min()))
        return float(per.median())

    act_f, delta_f = spread("activation_strength", "flash"), spread("delta_strength", "flash")
    flash_rows = table[table.group == "flash"]
    weakest = flash_rows.loc[flash_rows.groupby("case_id")["activation_strength"].idxmin(), "layer"]
    own_min = float((weakest == predefined_layer).mean()) if len(weakest) else math.nan
    rows = []
    if "update_gain" in table.columns and table["update_gain"].notna().any():
        gain = table[table.layer == predefined_layer].groupby("group")["update_gain"].median()
        gain_orders = float(np.log10(gain["flash"] / gain["normal"]))
        rows.append(("larger ROME update per unit of residual for flash records",
                     "(not measured in the paper: ||C^-1 k|| / k^T C^-1 k, the factor of Eq. 11 with ROME's C)",
                     f"median at layer {predefined_layer}: {flash_label} / normal = 10^{gain_orders:.2f}",
                     bool(gain_orders >= 0.5)))
    return verdict_table([
        ("tiny key at the predefined layer for flash records",
         "||sigma(x W_fc)|| several orders of magnitude smaller than for other records (Fig. 31-34)",
         f"median at layer {predefined_layer}: {flash_label} / normal = 10^{orders:.2f}", bool(orders <= -1)),
        ("flash records' key is weakest at the predefined layer", "the dip of the red curves sits at it",
         f"{100 * own_min:.0f}% of the {flash_label} records have their smallest key there",
         None if math.isnan(own_min) else bool(own_min >= 0.5)),
        ("delta strength varies less than activation strength",
         "||delta^l|| is not the dominant factor (Fig. 35-38)",
         f"median spread over layers (orders of magnitude): delta {delta_f:.2f} vs activation {act_f:.2f}",
         None if math.isnan(delta_f) else bool(delta_f < act_f)),
    ] + rows)


# --------------------------------------------------------------------------- causal tracing (App. A)
def peak_layers(aie: Any) -> pd.Series:
    """Layer of the largest indirect effect of each record of an `AIEResult` (indexed by case_id)."""
    return pd.Series(np.argmax(aie.per_record, axis=1), index=pd.Index(aie.case_ids, name="case_id"),
                     name="peak_layer")


def tracing_verdicts(peaks: dict[str, pd.Series], n_layers: int, predefined_layer: int,
                     flash_label: str = "flash") -> pd.DataFrame:
    """Appendix A: flash records' MLP effect peaks in the first layers, normal records' is dispersed.
    `peaks`: {"flash": per-record peak layers, "normal": ...} (`peak_layers`); a missing group is empty."""
    flash_peaks = peaks.get("flash", pd.Series(dtype=int))
    normal_peaks = peaks.get("normal", pd.Series(dtype=int))
    if flash_peaks.empty or normal_peaks.empty:
        return verdict_table([("flash vs normal", "-", "one of the groups is empty", None)])
    early = max(1, math.ceil(5 * n_layers / 48))  # "the first five layers" of GPT2-XL's 48
    share_early = float((flash_peaks < early).mean())
    share_early_normal = float((normal_peaks < early).mean())
    top_share = float(normal_peaks.value_counts(normalize=True).iloc[0])
    return verdict_table([
        ("flash records recalled from the first MLPs", f"MLP peak in the first 5 of 48 layers (here: < {early})",
         f"{100 * share_early:.0f}% of the {flash_label} records peak there (median layer "
         f"{flash_peaks.median():.0f})", bool(share_early >= 0.5)),
        ("... and more often than normal records", "normal records peak at dispersed layers",
         f"{100 * share_early:.0f}% vs {100 * share_early_normal:.0f}% of the normal records",
         bool(share_early > share_early_normal + 0.2)),
        ("flash records peak before the predefined layer", f"earlier than layer 17 (here {predefined_layer})",
         f"{100 * float((flash_peaks < predefined_layer).mean()):.0f}% of them",
         bool((flash_peaks < predefined_layer).mean() >= 0.5)),
        ("normal records' peaks are dispersed", "different records peak at different layers",
         f"{normal_peaks.nunique()} distinct peak layers among {len(normal_peaks)} normal records; the most "
         f"common one holds {100 * top_share:.0f}% of them", bool(normal_peaks.nunique() >= 3 and top_share < 0.5)),
    ])


# --------------------------------------------------------------------------- MEMIT (App. C)
def memit_verdicts(recording: tox_mod.ToxicityRecording, rome_summary: dict | None = None,
                   jump_factor: float = 10.0) -> pd.DataFrame:
    """Appendix C per MEMIT layer: buildup, spikes, final norm ratio (and ROME's for comparison)."""
    rows = []
    for layer in recording.layers:
        s = toxicity_summary(recording, layer)
        t = norm_table(recording, layer)
        scored = flash_mod.score_flash(t.assign(rollback_success=0.0), original_norm=s["original_norm"],
                                       jump_factor=jump_factor)
        spikes = int(scored["norm_spike"].sum())
        rows.append({"layer": layer, "final ||W||/||W_0||": s["final_ratio"], "max ||W||/||W_0||": s["max_ratio"],
                     "final toxicity": s["final_toxicity"], "buildup rho": s["buildup_rho"],
                     f"steps with a jump > {jump_factor:g} x median": spikes,
                     "top-10% share of growth": s["top_share"]})
    table = pd.DataFrame(rows)
    if rome_summary is not None:
        table.attrs["rome_max_ratio"] = rome_summary["max_ratio"]
    return table


def by_case(table: pd.DataFrame, group: str, column: str) -> dict:
    """{case_id: Series of `column` indexed by layer} for one group of a long per-layer table (the
    input of `plots.strength_figure`); rows with NaN are dropped."""
    sub = table[table.group == group].dropna(subset=[column])
    return {case: rows.sort_values("layer").set_index("layer")[column]
            for case, rows in sub.groupby("case_id", sort=False)}


def per_layer_panels(table: pd.DataFrame, labels: dict[str, str] | None = None) -> dict[str, pd.DataFrame]:
    """{"<group label> case <id>": that record's per-layer table} for `plots.layer_flash_figure`."""
    labels = labels or {}
    return {f"{labels.get(g, g)}: case {c}": rows.sort_values("layer")
            for (g, c), rows in table.groupby(["group", "case_id"], sort=False)}


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


def tune_threads(model: nn.Module, max_parameters: int = 50_000_000) -> int:
    """Use one CPU thread for a small model on the CPU (the organisms: their matrices are so small
    that extra threads only add overhead, and contend with other work on a shared machine);
    leave larger models and GPUs alone. Returns the number of threads in use."""
    device = next(model.parameters()).device
    if device.type == "cpu" and sum(p.numel() for p in model.parameters()) <= max_parameters:
        torch.set_num_threads(1)
    return torch.get_num_threads()
