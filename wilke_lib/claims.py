"""The paper's claims and the verdicts the book's pages give them (the "Results at a glance" page).

* The registry, `wilke_lib/data/claims.yaml`, lists each claim of Hu et al. (2024) that the book
  tests: the paper's words, section, figure or table, what the paper reports, the chapter (notebook)
  that tests it and how its verdict is decided (`registry`, `chapter_claims`).
* A chapter records each verdict with `record_claim` (`wilke_lib.present.Page.claim` does it for a
  page): `results/<model slug>/claims/<chapter>.json`, and a copy beside the page it comes from
  (`<book>/<model>/<chapter>_files/claims.json`), which is what the glance page reads, so that it
  always agrees with the pages that are built. Verdicts are computed by the notebooks from their
  numbers: `verdict_from_rows` maps a chapter's verdict table (`analysis.verdicts.verdict_table`)
  onto a claim, `verdict_from_flags` turns a list of checks into a verdict; `wilke_vs_baselines`,
  `editors_fail`, `s_decline` and `layer_spread` decide the lifelong claims of chapter 3,
  `ablation_verdict` that of chapter 4 and `memit_verdicts` those of chapter 9.
* `glance_rows` gathers the verdicts of every claim and model: "not run" where the page or the claim
  is missing, never a verdict that no page computed. scripts/make_glance.py writes the page.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd
import yaml

from wilke_lib.results import read_json, results_dir, write_json_atomic

REGISTRY = Path(__file__).parent / "data" / "claims.yaml"
VERDICTS = ("reproduced", "partly", "not reproduced", "not testable here")
NOT_RUN = "not run"
PAGE_COPY = "claims.json"


@dataclass(frozen=True)
class Claim:
    """One claim of the paper (an entry of `wilke_lib/data/claims.yaml`)."""

    id: str
    title: str
    chapter: str
    section: str
    evidence: str
    words: str
    paper: str
    rule: str
    rows: tuple[str, ...] = ()
    if_missing: str = ""


@functools.lru_cache(maxsize=4)
def _load(path: str) -> tuple[Claim, ...]:
    entries = yaml.safe_load(Path(path).read_text(encoding="utf-8"))["claims"]
    claims = tuple(Claim(**{**e, "rows": tuple(e.get("rows", ()))}) for e in entries)
    ids = [c.id for c in claims]
    if len(set(ids)) != len(ids):
        raise ValueError(f"{path}: duplicate claim ids")
    return claims


def registry(path: Path | None = None) -> dict[str, Claim]:
    """The claims, in the order of the glance page, by id."""
    return {c.id: c for c in _load(str(path or REGISTRY))}


def chapter_claims(chapter: str, path: Path | None = None) -> list[Claim]:
    """The claims a chapter (notebook stem, e.g. "05_toxicity") tests."""
    return [c for c in registry(path).values() if c.chapter == chapter]


# --------------------------------------------------------------------------------------- verdicts
def verdict_from_flags(flags: Iterable[bool | None]) -> str:
    """Every check True -> reproduced, every one False -> not reproduced, a mix -> partly; no
    check that could be made (only None) -> not testable here."""
    known = [bool(f) for f in flags if f is not None]
    if not known:
        return "not testable here"
    if all(known):
        return "reproduced"
    return "not reproduced" if not any(known) else "partly"


def verdict_from_rows(table: pd.DataFrame, claim: Claim) -> tuple[str, str]:
    """(verdict, the numbers behind it) of a claim from a verdict table (columns phenomenon,
    paper, this model, observed = yes / no / n/a) and the claim's `rows`."""
    rows = table[table["phenomenon"].isin(claim.rows)] if len(table) else table
    if rows.empty:
        na = table[table["observed"] == "n/a"]["this model"].tolist() if len(table) else []
        return "not testable here", "; ".join(na) or claim.if_missing or "no row of the verdict table applies"
    words = {"yes": True, "no": False}
    verdict = verdict_from_flags(words.get(str(o)) for o in rows["observed"])
    number = "; ".join(f"{p}: {t}" if len(rows) > 1 else str(t)
                       for p, t in zip(rows["phenomenon"], rows["this model"]))
    return verdict, number


def _relative(a: float, b: float) -> float:
    return math.nan if b == 0 else a / b - 1.0


def wilke_vs_baselines(s: Mapping[str, float], baselines: Sequence[str] = ("KN", "ROME", "MEMIT"),
                       wilke: str = "WilKE") -> tuple[str, str]:
    """Sec. 6.2: WilKE's S against the paper's baselines that were run (S in %, by editor label)."""
    run = {b: float(s[b]) for b in baselines if b in s}
    if wilke not in s or not run:
        return "not testable here", "WilKE or the paper's baselines were not run"
    w = float(s[wilke])
    best = max(run, key=run.get)
    gain = _relative(w, run[best])
    verdict = "reproduced" if w > run[best] else ("partly" if w == run[best] else "not reproduced")
    gain_text = "n/a" if math.isnan(gain) else f"{gain:+.1%}"
    return verdict, f"S: WilKE {w:.1f} vs {best} {run[best]:.1f} ({gain_text})"


def editors_fail(s: Mapping[str, float], editors: Sequence[str] = ("ROME", "MEMIT"),
                 threshold: float = 50.0) -> tuple[str, str]:
    """Sec. 6.2: whether the editors' S after the last edit is low (below `threshold` %)."""
    run = {e: float(s[e]) for e in editors if e in s}
    if not run:
        return "not testable here", "ROME and MEMIT were not run"
    verdict = verdict_from_flags(v < threshold for v in run.values())
    return verdict, "S: " + ", ".join(f"{e} {v:.1f}" for e, v in run.items())


def s_decline(curves: pd.DataFrame, editors: Sequence[str] = ("ROME", "MEMIT", "WilKE"),
              metric: str = "S", group: str = "editor") -> tuple[str, str]:
    """App. F.3: S (mean over seeds) at the last checkpoint against the first, per editor."""
    flags, parts = [], []
    for editor in editors:
        sub = curves[curves[group] == editor]
        if sub.empty:
            continue
        by_step = sub.groupby("step")[metric].mean().sort_index() * 100.0
        first, last = float(by_step.iloc[0]), float(by_step.iloc[-1])
        flags.append(last < first)
        parts.append(f"{editor} {first:.1f} → {last:.1f}")
    if not flags:
        return "not testable here", "no curve of ROME, MEMIT or WilKE"
    return verdict_from_flags(flags), "S from the first to the last checkpoint: " + ", ".join(parts)


def layer_spread(layer_counts: pd.Series, reference_layers: Sequence[int] = ()) -> tuple[str, str]:
    """Sec. 5.1: how many layers WilKE used (a Series layer -> edits)."""
    counts = layer_counts[layer_counts > 0]
    if counts.empty:
        return "not testable here", "WilKE made no edit"
    share = float(counts.max() / counts.sum())
    top = int(counts.idxmax())
    if len(counts) == 1:
        verdict = "not reproduced"
    else:
        verdict = "reproduced" if share <= 0.9 else "partly"
    text = f"{len(counts)} layer(s) over {int(counts.sum()):,} edits; layer {top} took {share:.0%}"
    if len(reference_layers):
        text += f" (ROME's layer: {', '.join(map(str, reference_layers))})"
    return verdict, text


TABLE1_LABELS = ("ROME", "MEMIT", "WilKE")


@dataclass(frozen=True)
class ClaimEvidence:
    """The runs that decide chapter 3's claims: S after the last edit (by editor), the S curves, the
    layer choices, the names of the page's table / figure / table showing them, and the notes."""
    s: pd.Series
    curves: pd.DataFrame
    choices: pd.DataFrame
    refs: tuple[str, str, str]
    note: str
    order_note: str

    @property
    def at_scale(self) -> bool:
        return self.refs[0] == "table1_scale"


def claim_evidence(build: tuple[pd.Series, pd.DataFrame, pd.DataFrame], n_edits: int, same_layer: str = "",
                   scale: tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame] | None = None, scale_n_edits: int = 0,
                   scale_n_seeds: int = 0) -> ClaimEvidence:
    """The paper's claims are about 1,024 edits: the paper-scale runs (`scale`: their Table 1, curves and
    layer choices, `experiments.layer_choices`) decide them when ROME's, MEMIT's and WilKE's have all finished, else the build's runs
    (`build`: S by editor, curves, layer choices), with a note saying after how many edits."""
    if scale is not None and set(TABLE1_LABELS) <= set(scale[0]["editor"]):
        s = scale[0].set_index("editor")["S"]
        note = f"after {scale_n_edits:,} edits, {scale_n_seeds} seed{'s' if scale_n_seeds > 1 else ''}"
        top = max(float(s[e]) for e in TABLE1_LABELS)
        order_note = note + (f"; ROME, MEMIT and WilKE all at S {top:.1f} or less, so their order says little: "
                             "the collapse steps compare them" if top < 5 else "")
        return ClaimEvidence(s, scale[1], scale[2],
                             ("table1_scale", "lifelong_curves_scale", "layer_choices_scale"), note, order_note)
    note = f"after {n_edits} edits, not 1,024" if n_edits < 1024 else ""
    return ClaimEvidence(build[0], build[1], build[2], ("table1", "lifelong_curves", "layer_choices"), note,
                         "; ".join(filter(None, [note, same_layer])))


def lifelong_claims(evidence: ClaimEvidence, rome_layers: list[int]) -> list[tuple[str, str, str, str, str]]:
    """(claim id, verdict, number, ref, note) of chapter 3's claims from `evidence`."""
    e = evidence
    out = [("wilke_beats_sota", *wilke_vs_baselines(e.s), e.refs[0], e.order_note),
           ("editors_fail_lifelong", *editors_fail(e.s), e.refs[0], e.note),
           ("degradation_over_steps", *s_decline(e.curves), e.refs[1], e.note)]
    if "WilKE" in e.choices.index:
        out.append(("layer_per_fact", *layer_spread(e.choices.loc["WilKE"], rome_layers), e.refs[2], e.note))
    return out


ABLATIONS = (("w/o delta", "δ"), ("w/o activation", "σ(x·W_fc)"), ("w/o ||W_proj||", "||W_proj||_2"))


def ablation_verdict(s: Mapping[str, float], score: str = "eq10",
                     layer_choices: pd.DataFrame | None = None, threshold: float = 1.0) -> tuple[str, str]:
    """Sec. 6.3: S of full WilKE (`"WilKE <score> full"`) against its ablations (`"WilKE <score> w/o
    ..."`); a drop of more than `threshold` points counts for delta and the activation, and S may not rise
    by more than `threshold` without ||W_proj|| (the paper: a slight decrease). `layer_choices` (variants x layers):
    identical rows mean that no ablation changed an edit."""
    full_label = f"WilKE {score} full"
    if full_label not in s:
        return "not testable here", f"the ablation with score {score} was not run"
    full = float(s[full_label])
    drops = {name: full - float(s[f"WilKE {score} {name}"]) for name, _ in ABLATIONS if f"WilKE {score} {name}" in s}
    text = f"S full {full:.1f}; " + ", ".join(f"{symbol}: {full - drops[name]:.1f} ({-drops[name]:+.1f})"
                                              for name, symbol in ABLATIONS if name in drops)
    labels = [full_label] + [f"WilKE {score} {name}" for name in drops]
    if layer_choices is not None and set(labels) <= set(layer_choices.index):
        chosen = layer_choices.loc[labels]
        if (chosen.nunique(axis=0) == 1).all():
            return "not testable here", text + " (every variant edited the same layers)"
    flags = [drops[name] > threshold for name in ("w/o delta", "w/o activation") if name in drops]
    if "w/o ||W_proj||" in drops:  # the paper: a slight decrease; a clear gain without the factor contradicts it
        flags.append(drops["w/o ||W_proj||"] >= -threshold)
    return verdict_from_flags(flags), text


def memit_verdicts(per_layer: pd.DataFrame, rome_max_ratio: float) -> dict[str, tuple[str, str]]:
    """App. C from `analysis.toxicity.memit_verdicts` (one row per MEMIT layer) and ROME's largest
    norm ratio on the same records (NaN when unknown): {"memit_buildup": ..., "memit_conceals_flash": ...}."""
    rho = per_layer["buildup rho"]
    buildup = (verdict_from_flags(rho > 0.8),
               "Spearman rho(toxicity, step): " + ", ".join(f"layer {int(l)} {r:.2f}"
                                                            for l, r in zip(per_layer["layer"], rho)))
    spike_col = next(c for c in per_layer.columns if c.startswith("steps with a jump"))
    spikes = int(per_layer[spike_col].sum())
    memit_max = float(per_layer["max ||W||/||W_0||"].max())
    text = f"largest ||W||/||W_0||: MEMIT {memit_max:.3g}"
    if rome_max_ratio is None or math.isnan(rome_max_ratio):
        conceals = ("not testable here", text + "; ROME's run is missing")
    else:
        conceals = (verdict_from_flags([memit_max < rome_max_ratio, spikes == 0]),
                    text + f" vs ROME {rome_max_ratio:.3g}; spike steps in MEMIT's layers: {spikes}")
    return {"memit_buildup": buildup, "memit_conceals_flash": conceals}


# --------------------------------------------------------------------------------------- records
def claims_path(model_name: str, chapter: str) -> Path:
    """`results/<model slug>/claims/<chapter>.json`."""
    return results_dir(model_name, "claims") / f"{chapter}.json"


def reset_chapter(model_name: str, chapter: str, copies: Sequence[Path] = ()) -> None:
    """Forget the verdicts a chapter recorded before (a new run of the page starts empty)."""
    for path in [claims_path(model_name, chapter), *(Path(c) / PAGE_COPY for c in copies)]:
        if path.exists():
            path.unlink()


def record_claim(model_name: str, chapter: str, claim_id: str, verdict: str, number: str, *,
                 page: str | None = None, label: str | None = None, note: str = "",
                 copies: Sequence[Path] = (), context: Mapping | None = None) -> dict:
    """Record the verdict of claim `claim_id` on a model; returns the chapter's record.

    `page`: the book document that shows it ("toy-gpt2/03_lifelong"); `label`: the figure or table
    on it; `note`: a caveat shown with the number; `copies`: folders that get a copy of the record
    (the page's files); `context`: what the run depended on (profile, n_edits...)."""
    claims = registry()
    if claim_id not in claims:
        raise KeyError(f"unknown claim {claim_id!r}; the claims are in {REGISTRY}")
    if claims[claim_id].chapter != chapter:
        raise ValueError(f"claim {claim_id!r} belongs to chapter {claims[claim_id].chapter}, not {chapter}")
    if verdict not in VERDICTS:
        raise ValueError(f"verdict {verdict!r} is not one of {VERDICTS}")
    path = claims_path(model_name, chapter)
    record = read_json(path) if path.exists() else {"model": model_name, "chapter": chapter, "claims": {}}
    if context:
        record["context"] = dict(context)
    record["claims"][claim_id] = {"verdict": verdict, "number": str(number), "note": note, "page": page,
                                  "label": label,
                                  "recorded": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    write_json_atomic(path, record)
    for folder in copies:
        Path(folder).mkdir(parents=True, exist_ok=True)
        write_json_atomic(Path(folder) / PAGE_COPY, record)
    return record


def page_claims(book_dir: Path, model: str, chapter: str) -> dict | None:
    """The record beside the page `<book_dir>/<model>/<chapter>.ipynb` (None without page or record)."""
    if not (book_dir / model / f"{chapter}.ipynb").is_file():
        return None
    path = book_dir / model / f"{chapter}_files" / PAGE_COPY
    return read_json(path) if path.is_file() else None


def glance_rows(book_dir: Path, models: Sequence[str], path: Path | None = None) -> list[dict]:
    """One row per claim: the claim and, per model, its verdict cell (verdict "not run" when the
    page or its record of the claim is missing)."""
    book_dir = Path(book_dir)
    records: dict[tuple[str, str], dict | None] = {}
    rows = []
    for claim in registry(path).values():
        cells = {}
        for model in models:
            key = (model, claim.chapter)
            if key not in records:
                records[key] = page_claims(book_dir, model, claim.chapter)
            found = (records[key] or {}).get("claims", {}).get(claim.id)
            page_exists = (book_dir / model / f"{claim.chapter}.ipynb").is_file()
            cells[model] = dict(found) if found else {
                "verdict": NOT_RUN, "number": "", "note": "", "label": None,
                "page": f"{model}/{claim.chapter}" if page_exists else None}
            cells[model]["context"] = (records[key] or {}).get("context", {})
        rows.append({"claim": claim, "cells": cells})
    return rows
