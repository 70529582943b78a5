"""The paper's claims and the verdicts the book's pages give them (the "Results at a glance" page).

* The registry, `wilke_lib/data/claims.yaml`, lists each claim of Hu et al. (2024) that the book
  tests: the paper's words, section, figure or table, what the paper reports, the chapter (notebook)
  that tests it and how its verdict is decided (`registry`, `chapter_claims`).
* A chapter records each verdict with `record_claim` (`wilke_lib.present.Page.claim` does it for a
  page): `results/<model slug>/claims/<chapter>.json`, and a copy beside the page it comes from
  (`<book>/<model>/<chapter>_files/claims.json`), which is what the glance page reads, so that it
  always agrees with the pages that are built. Verdicts are computed by the notebooks from their
  numbers. Each claim's test is a function here that returns an `Outcome`: the verdict, the numbers
  behind it, the *precondition* it checked (computed from the same runs, with the value found) and
  what it rests on (records, edits, seeds). When the precondition fails the verdict is "not testable
  here", never a win or a loss; comparisons are decided per seed. Chapter 3: `wilke_beats_sota`,
  `editors_fail`, `degradation`, `collapses_later`, `declines_most` and `layer_per_fact` (against ROME
  fixed at WilKE's layers) on a `LifelongEvidence`; chapter 4: `ablation`; chapter 5: `toxicity_flash`
  (App. B's definition); chapter 9: `memit_verdicts`. `verdict_from_rows` maps a chapter's verdict table
  (`analysis.verdicts.verdict_table`) onto a claim for the chapters (5-8) that build one.
* `glance_rows` gathers the verdicts of every claim and model: "not run" where the page or the claim
  is missing, never a verdict that no page computed. scripts/make_glance.py writes the page.

The module is longer than the project's 420 lines on purpose: it is the one home of the paper's claims
(registry, tests, records), so that a claim's words, its precondition and its test are read side by side.
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
    precondition: str = ""


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
FLOOR_S = 5.0
"""S (in %) below which a comparison of editors says nothing: S is a harmonic mean in which a zero metric
counts as 1e-4, so once one metric of a run is 0 its S sits near 0 whatever the others are. The paper's
compared values (19.3 vs 13.2, 14.6 vs 8.7) are all above it."""


@dataclass(frozen=True)
class Outcome:
    """A claim's verdict on some runs: one of `VERDICTS`, the numbers behind it, the precondition the
    test checked (with the value it found) and what it rests on (`n`: records, edits, seeds)."""

    verdict: str
    number: str
    precondition: str = ""
    n: str = ""

    def __post_init__(self):
        if self.verdict not in VERDICTS:
            raise ValueError(f"verdict {self.verdict!r} is not one of {VERDICTS}")


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


def per_seed_verdict(wins: Sequence[bool]) -> str:
    """A comparison decided per seed: it holds in every seed -> reproduced, in some -> partly, in none ->
    not reproduced (a mean over seeds can hide a tie in every seed but one)."""
    return verdict_from_flags(wins) if wins else "not testable here"


def seed_series(finals: pd.DataFrame, editor: str, column: str = "S") -> pd.Series:
    """`column` of `editor`'s runs by seed (`finals`: one row per run with editor, seed, column)."""
    rows = finals[finals["editor"] == editor]
    return rows.set_index("seed")[column].astype(float).sort_index()


def _seeds_text(values: pd.Series, fmt: str = "{:.1f}") -> str:
    return " / ".join(fmt.format(v) for v in values)


def _n(n_edits: int, seeds: Sequence[int], records: int | None = None) -> str:
    parts = ([f"{records:,} records"] if records else []) + [f"{n_edits:,} edits",
                                                            f"{len(seeds)} seed{'s' if len(seeds) != 1 else ''}"
                                                            + (f" ({', '.join(map(str, seeds))})" if seeds else "")]
    return " x ".join(parts)


@dataclass(frozen=True)
class LifelongEvidence:
    """The lifelong runs that decide chapter 3's claims.

    finals: one row per finished run: editor (label), seed, and the metrics at the last step in %;
    curves: one row per checkpoint of every run: editor, seed, step and the metrics as fractions
        (`experiments.curves`);
    n_edits: the runs' length; source: which runs these are (named in each verdict's `n`);
    controls: the same for ROME at fixed layers ("ROME @ layer 3"), the control of `layer_per_fact`."""

    finals: pd.DataFrame
    curves: pd.DataFrame
    n_edits: int
    source: str
    controls: pd.DataFrame | None = None
    paper: pd.DataFrame | None = None  # the authors' curves (`experiments.paper_curves`), for `curve_shapes`

    def seeds(self, editor: str) -> list[int]:
        return sorted(set(self.finals.loc[self.finals["editor"] == editor, "seed"]))

    def n(self, *editors: str) -> str:
        """What a verdict on `editors` rests on: the edits, the seeds (each editor's when they differ), the runs."""
        per = {e: self.seeds(e) for e in editors}
        if len({tuple(v) for v in per.values()}) > 1:
            seeds = "; seeds: " + ", ".join(f"{e} {' / '.join(map(str, s)) or 'none'}" for e, s in per.items())
            return f"{self.n_edits:,} edits{seeds}, {self.source}"
        return f"{_n(self.n_edits, next(iter(per.values()), []))}, {self.source}"


def wilke_beats_sota(ev: LifelongEvidence, baselines: Sequence[str] = ("KN", "ROME", "MEMIT"),
                     wilke: str = "WilKE", floor: float = FLOOR_S) -> Outcome:
    """Sec. 6.2, Table 1: WilKE's S after the last edit above the best of the paper's baselines (by mean S),
    decided per seed on the seeds both were run with. Precondition: WilKE's or the baseline's mean S reaches
    `floor` (below it both sit at the floor of the harmonic mean and their order is noise)."""
    run = {b: seed_series(ev.finals, b).mean() for b in baselines if len(seed_series(ev.finals, b))}
    w = seed_series(ev.finals, wilke)
    if not len(w) or not run:
        return Outcome("not testable here", "", f"WilKE's and a paper baseline's finished runs "
                       f"(have: {', '.join(sorted(set(ev.finals['editor']))) or 'none'})", ev.n())
    best = max(run, key=run.get)
    b = seed_series(ev.finals, best)
    seeds = sorted(set(w.index) & set(b.index))
    number = f"S: WilKE {_seeds_text(w[seeds])} vs {best} {_seeds_text(b[seeds])} (seeds {', '.join(map(str, seeds))})"
    n = ev.n(wilke, best)
    if max(w.mean(), b.mean()) < floor:
        return Outcome("not testable here", number, f"S of WilKE or {best} at least {floor:g} (the paper's: 19.3 vs "
                       f"13.2, 14.6 vs 8.7): mean {w.mean():.1f} and {b.mean():.1f}", n)
    wins = [bool(w[s] > b[s]) for s in seeds]
    gain = w[seeds].mean() / b[seeds].mean() - 1 if b[seeds].mean() > 0 else math.nan
    return Outcome(per_seed_verdict(wins), number + f"; WilKE ahead in {sum(wins)} of {len(wins)} seeds"
                   + ("" if math.isnan(gain) else f", mean {gain:+.1%}"),
                   f"S of WilKE or {best} at least {floor:g}: mean {w.mean():.1f} and {b.mean():.1f}", n)


def editors_fail(ev: LifelongEvidence, editors: Sequence[str] = ("ROME", "MEMIT"), threshold: float = 50.0,
                 working: float = 50.0) -> Outcome:
    """Sec. 6.2: ROME's and MEMIT's S after the last edit below `threshold` in every seed, "far from the
    optimistic results reported in single editing". Precondition: single editing works here, i.e. the
    editor's ES at the first step (one edit on the unedited model, mean over seeds) reaches `working`."""
    present = [e for e in editors if len(seed_series(ev.finals, e))]
    if not present:
        return Outcome("not testable here", "", "finished runs of ROME or MEMIT (none)", ev.n())
    first_es = {e: 100 * ev.curves[(ev.curves["editor"] == e) & (ev.curves["step"] == ev.curves["step"].min())]["ES"].mean()
                for e in present}
    number = "; ".join(f"{e}: S {_seeds_text(seed_series(ev.finals, e))}" for e in present)
    pre = "single edits work: ES at step 1 " + ", ".join(f"{e} {v:.0f}%" for e, v in first_es.items()) + \
          f" (need >= {working:g}%)"
    if any(not v >= working for v in first_es.values()):
        return Outcome("not testable here", number, pre, ev.n(*present))
    flags = [bool((seed_series(ev.finals, e) < threshold).all()) for e in present]
    return Outcome(verdict_from_flags(flags), number + f" (below {threshold:g} in every seed: "
                   + ", ".join(f"{e} {'yes' if f else 'no'}" for e, f in zip(present, flags)) + ")", pre, ev.n(*present))


def _s_by_step(curves: pd.DataFrame, editor: str, seed: int) -> pd.Series:
    rows = curves[(curves["editor"] == editor) & (curves["seed"] == seed)]
    return rows.groupby("step")["S"].mean().sort_index() * 100.0


def degradation(ev: LifelongEvidence, editors: Sequence[str] = ("ROME", "MEMIT", "WilKE"),
                floor: float = FLOOR_S) -> Outcome:
    """App. F.3, Fig. 43: S at the last checkpoint below its best, by more than half, for each editor in
    every seed. Precondition: the editor's best S reaches `floor` (a model that never worked cannot degrade)."""
    flags, parts, low = [], [], []
    missing = [e for e in editors if e not in set(ev.curves["editor"])]
    if missing:
        return Outcome("not testable here", "", f"finished runs of {', '.join(editors)} (missing: {', '.join(missing)})",
                       ev.n(*editors))
    for editor in editors:
        seeds = sorted(set(ev.curves.loc[ev.curves["editor"] == editor, "seed"]))
        series = [_s_by_step(ev.curves, editor, s) for s in seeds]
        if min(s.max() for s in series) < floor:
            low.append(f"{editor} {min(s.max() for s in series):.1f}")
            continue
        flags.append(all(s.iloc[-1] < 0.5 * s.max() for s in series))
        parts.append(f"{editor} " + " / ".join(f"{s.max():.1f} → {s.iloc[-1]:.1f}" for s in series))
    pre = f"each editor's best S at least {floor:g}" + (f" (below: {', '.join(low)})" if low else "")
    if not flags:
        return Outcome("not testable here", "", pre, ev.n(*editors))
    return Outcome(verdict_from_flags(flags), "best S → last S per seed: " + "; ".join(parts), pre, ev.n(*editors))


def collapse_step(s: pd.Series, fraction_of_peak: float = 0.5) -> float:
    """The first step (index of `s`, S by step) at which S falls below `fraction_of_peak` of the best S
    reached so far; NaN when it never does. The running peak, not the first value, is the reference: a
    failed rollback at step 1 puts the harmonic mean near 0 there."""
    below = s[s < fraction_of_peak * s.cummax()]
    return float(below.index[0]) if len(below) else math.nan


def collapse_table(curves: pd.DataFrame, fraction_of_peak: float = 0.5) -> pd.DataFrame:
    """One row per editor and seed: the collapse step (`collapse_step`), the best S before it and the
    last step measured (S in %)."""
    rows = []
    for (editor, seed), frame in curves.groupby(["editor", "seed"], sort=False):
        s = frame.groupby("step")["S"].mean().sort_index() * 100.0
        rows.append({"editor": editor, "seed": seed, "collapse step": collapse_step(s, fraction_of_peak),
                     "S peak": float(s.max()), "last step": int(s.index[-1]), "S last": float(s.iloc[-1])})
    return pd.DataFrame(rows, columns=["editor", "seed", "collapse step", "S peak", "last step", "S last"])


def _later(a: float, b: float) -> bool:
    """Whether collapse step a comes after b (NaN: no collapse within the run, later than any step)."""
    a, b = (math.inf if math.isnan(a) else a), (math.inf if math.isnan(b) else b)
    return a > b


def collapses_later(ev: LifelongEvidence, later: str = "WilKE", earlier: str = "ROME",
                    floor: float = FLOOR_S) -> Outcome:
    """Fig. 43: `later`'s S collapses (`collapse_step`) after `earlier`'s in every seed (the paper: ROME at
    step 64 on both models, WilKE at 512 / 256). Precondition: `earlier` works and then collapses within
    the run, in every seed (its best S at least `floor`)."""
    table = collapse_table(ev.curves[ev.curves["editor"].isin([later, earlier])])
    a, b = (table[table["editor"] == e].set_index("seed") for e in (later, earlier))
    seeds = sorted(set(a.index) & set(b.index))
    if not seeds:
        return Outcome("not testable here", "", f"runs of both {later} and {earlier}", ev.n(later, earlier))
    fmt = lambda v: "none" if math.isnan(v) else f"{v:.0f}"  # noqa: E731
    number = (f"collapse step per seed ({', '.join(map(str, seeds))}): {later} {' / '.join(fmt(a.loc[s, 'collapse step']) for s in seeds)}, "
              f"{earlier} {' / '.join(fmt(b.loc[s, 'collapse step']) for s in seeds)}")
    pre = (f"{earlier} works (best S >= {floor:g}) and collapses within {ev.n_edits:,} edits in every seed: best S "
           + " / ".join(f"{b.loc[s, 'S peak']:.1f}" for s in seeds))
    if any(b.loc[s, "S peak"] < floor or math.isnan(b.loc[s, "collapse step"]) for s in seeds):
        return Outcome("not testable here", number, pre, ev.n(later, earlier))
    wins = [_later(a.loc[s, "collapse step"], b.loc[s, "collapse step"]) for s in seeds]
    return Outcome(per_seed_verdict(wins), number + f"; later in {sum(wins)} of {len(wins)} seeds", pre,
                   ev.n(later, earlier))


def declines_most(ev: LifelongEvidence, editor: str = "MEMIT", others: Sequence[str] = ("ROME", "WilKE"),
                  floor: float = FLOOR_S) -> Outcome:
    """App. C: "MEMIT exhibits a larger performance decline compared to ROME and WilKE as editing progresses
    further": its drop of S from its best to the last step (points) larger than each other's, in every seed.
    Precondition: every editor's best S at least `floor`."""
    table = collapse_table(ev.curves[ev.curves["editor"].isin([editor, *others])]).set_index(["editor", "seed"])
    table["drop"] = table["S peak"] - table["S last"]
    names = [e for e in (editor, *others) if e in table.index.get_level_values(0)]
    if len(names) < 1 + len(others):
        missing = [e for e in (editor, *others) if e not in names]
        return Outcome("not testable here", "", f"finished runs of {editor}, {', '.join(others)} (missing: "
                       f"{', '.join(missing)})", ev.n(editor, *others))
    seeds = sorted(set.intersection(*(set(table.loc[e].index) for e in names)))
    number = "; ".join(f"{e} " + " / ".join(f"{table.loc[(e, s), 'drop']:.1f}" for s in seeds) for e in names)
    number = f"drop of S from its best to step {ev.n_edits:,}, points, seeds {', '.join(map(str, seeds))}: " + number
    peaks = {e: min(table.loc[(e, s), "S peak"] for s in seeds) for e in names}
    pre = f"every editor's best S at least {floor:g}: " + ", ".join(f"{e} {v:.1f}" for e, v in peaks.items())
    if not seeds or min(peaks.values()) < floor:
        return Outcome("not testable here", number, pre, ev.n(*names))
    wins = [all(table.loc[(editor, s), "drop"] > table.loc[(o, s), "drop"] for o in names[1:]) for s in seeds]
    return Outcome(per_seed_verdict(wins), number, pre, ev.n(*names))


def mean_s(curves: pd.DataFrame, editor: str, seed: int) -> float:
    """S (in %) averaged over the checkpoints of one run: the area under its curve on the log-2 step axis
    (the checkpoints are powers of two and multiples of 50), one number for a whole run."""
    return float(_s_by_step(curves, editor, seed).mean())


def layer_per_fact(ev: LifelongEvidence, choices: pd.Series, wilke: str = "WilKE", top: int = 2,
                   floor: float = FLOOR_S) -> Outcome:
    """Sec. 1, 5.1: choosing the layer per fact beats any fixed layer. WilKE's mean S over the run
    (`mean_s`) against ROME fixed at each of the `top` layers WilKE chose most (`choices`: edits by
    layer), on the same records and seeds (`ev.controls`, labels "ROME @ layer L"), decided per seed.
    Preconditions: WilKE used at least two layers; the control runs exist for every seed; some run's
    mean S reaches `floor`."""
    counts = choices[choices > 0].sort_values(ascending=False)
    seeds = sorted(set(ev.curves.loc[ev.curves["editor"] == wilke, "seed"]))
    n = ev.n(wilke)
    if len(counts) < 2:
        return Outcome("not testable here", f"WilKE used {len(counts)} layer(s)", "WilKE chooses two or more layers", n)
    layers = [int(l) for l in counts.index[:top]]
    share = ", ".join(f"layer {l}: {counts[l] / counts.sum():.0%}" for l in layers)
    controls = ev.controls if ev.controls is not None else pd.DataFrame(columns=["editor", "seed", "step", "S"])
    missing = [f"ROME @ layer {l} seed {s}" for l in layers for s in seeds
               if controls[(controls["editor"] == f"ROME @ layer {l}") & (controls["seed"] == s)].empty]
    pre = f"ROME fixed at WilKE's most chosen layers ({share}), run on the same records and seeds"
    if missing:
        return Outcome("not testable here", f"WilKE's layers: {share}", pre + f"; missing: {', '.join(missing)} "
                       "(`make runs RUNS_ARGS=--layer-controls`)", n)
    both = pd.concat([ev.curves[ev.curves["editor"] == wilke], controls], ignore_index=True)
    w = {s: mean_s(both, wilke, s) for s in seeds}
    c = {(l, s): mean_s(both, f"ROME @ layer {l}", s) for l in layers for s in seeds}
    number = (f"mean S over the run per seed: WilKE {' / '.join(f'{w[s]:.1f}' for s in seeds)}; "
              + "; ".join(f"ROME @ layer {l} {' / '.join(f'{c[(l, s)]:.1f}' for s in seeds)}" for l in layers))
    if max([*w.values(), *c.values()]) < floor:
        return Outcome("not testable here", number, pre + f"; some mean S at least {floor:g}", n)
    wins = [all(w[s] > c[(l, s)] for l in layers) for s in seeds]
    return Outcome(per_seed_verdict(wins), number + f"; WilKE ahead of both in {sum(wins)} of {len(wins)} seeds", pre, n)


ABLATIONS = (("w/o delta", "δ"), ("w/o activation", "σ(x·W_fc)"), ("w/o ||W_proj||", "||W_proj||_2"))


def ablation(s: Mapping[str, float], score: str = "eq10", layer_choices: pd.DataFrame | None = None,
             threshold: float = 1.0, n: str = "", floor: float = FLOOR_S) -> Outcome:
    """Sec. 6.3, Fig. 9: S of full WilKE (`"WilKE <score> full"`) against its ablations (`"WilKE <score>
    w/o ..."`); a drop of more than `threshold` points counts for delta and the activation, and S may not
    rise by more than `threshold` without ||W_proj|| (the paper: a slight decrease). Preconditions: some
    variant edited another layer than the full score (else dropping a factor changed nothing), and some
    variant's S reaches `floor`."""
    full_label = f"WilKE {score} full"
    if full_label not in s:
        return Outcome("not testable here", "", f"the ablation with score {score} was run", n)
    full = float(s[full_label])
    drops = {name: full - float(s[f"WilKE {score} {name}"]) for name, _ in ABLATIONS if f"WilKE {score} {name}" in s}
    text = f"S full {full:.1f}; " + ", ".join(f"{symbol}: {full - drops[name]:.1f} ({-drops[name]:+.1f})"
                                              for name, symbol in ABLATIONS if name in drops)
    labels = [full_label] + [f"WilKE {score} {name}" for name in drops]
    if layer_choices is not None and set(labels) <= set(layer_choices.index):
        if (layer_choices.loc[labels].nunique(axis=0) == 1).all():
            return Outcome("not testable here", text, "a dropped factor changes some edit's layer (every variant "
                           "edited the same layers)", n)
    values = [full, *(full - d for d in drops.values())]
    pre = f"some variant's S at least {floor:g} (highest: {max(values):.1f})"
    if max(values) < floor:
        return Outcome("not testable here", text, pre, n)
    flags = [drops[name] > threshold for name in ("w/o delta", "w/o activation") if name in drops]
    if "w/o ||W_proj||" in drops:  # the paper: a slight decrease; a clear gain without the factor contradicts it
        flags.append(drops["w/o ||W_proj||"] >= -threshold)
    return Outcome(verdict_from_flags(flags), text, pre, n)


PAPER_FLASH_RATE = 11 / 1024
"""Flash records per edit in the paper (11 among GPT2-XL's 1,024 edits; 9 on GPT-J)."""


def toxicity_flash(analysis, min_working_steps: int = math.ceil(1 / PAPER_FLASH_RATE)) -> Outcome:
    """Sec. 4.1, App. B: ROME's lifelong run has flash records by App. B's definition
    (`analysis.flash.app_b_flash`: the edit succeeded, its rollback failed, the norm jumped, and the model
    still worked in the window before). `analysis`: chapter 5's `flash.FlashAnalysis`. Precondition: the
    model still works before at least `min_working_steps` steps, enough for one flash at the paper's rate
    (a collapsed model fails every rollback, so a failed rollback there singles nothing out, and over fewer
    working steps finding none says nothing)."""
    steps = len(analysis.scored)
    n = f"{steps:,} edits x 1 seed, chapter 5's ROME run at layer {analysis.layer}"
    pre = (f"the model still works before at least {min_working_steps} steps (one flash at the paper's rate, 11 in "
           f"1,024): {analysis.working_steps:,}")
    number = analysis.app_b_summary()
    if analysis.working_steps < min_working_steps:
        return Outcome("not testable here", number, pre, n)
    return Outcome("reproduced" if len(analysis.app_b) else "not reproduced", number, pre, n)


def _recurrence(flagged: Mapping[str, set], edited: Mapping[str, set]) -> tuple[int, int, list[str]]:
    """Over every ordered pair of runs (a, b): records flagged in a and edited in b, and how many of those b
    flags too; with one line per pair."""
    shared = again = 0
    lines = []
    for a in flagged:
        for b in flagged:
            if a == b:
                continue
            both = flagged[a] & edited[b]
            shared, again = shared + len(both), again + len(both & flagged[b])
            if both:
                lines.append(f"{a} -> {b}: {len(both & flagged[b])} of {len(both)}")
    return shared, again, lines


def flash_recurs(flagged: Mapping[str, set], edited: Mapping[str, set], what: str, n: str = "",
                 majority: float = 0.5) -> Outcome:
    """A flash record flagged in one run (App. B's definition) is flagged again in another run that edits it:
    Sec. 4.1 "toxicity flash is independent of editing order" (runs: the seeds' orders of one model) and
    App. B "the majority of the data causing toxicity flash when editing GPT2-XL and GPT-J overlap" (runs:
    the two models). `flagged` / `edited`: case ids by run name. At least `majority` of them flagged again ->
    reproduced; some -> partly; none -> not reproduced. Precondition: some flash record of one run is edited
    by another."""
    shared, again, lines = _recurrence(flagged, edited)
    counts = ", ".join(f"{k} {len(v)}" for k, v in flagged.items())
    number = f"App. B flash records: {counts}; flagged again where edited {what}: " + ("; ".join(lines) or "none")
    pre = f"a flash record of one run edited in another: {shared}"
    if shared == 0:
        return Outcome("not testable here", number, pre, n)
    share = again / shared
    verdict = "reproduced" if share >= majority else ("partly" if again else "not reproduced")
    return Outcome(verdict, number + f" ({share:.0%})", pre, n)


def memit_verdicts(per_layer: pd.DataFrame, rome_max_ratio: float, n: str = "") -> dict[str, Outcome]:
    """App. C from `analysis.toxicity.memit_verdicts` (one row per MEMIT layer) and ROME's largest
    norm ratio on the same records (NaN when unknown): {"memit_buildup": ..., "memit_conceals_flash": ...}."""
    rho = per_layer["buildup rho"]
    buildup = Outcome(verdict_from_flags(rho > 0.8),
                      "Spearman rho(toxicity, step): " + ", ".join(f"layer {int(l)} {r:.2f}"
                                                                   for l, r in zip(per_layer["layer"], rho)), "", n)
    spike_col = next(c for c in per_layer.columns if c.startswith("steps with a jump"))
    spikes = int(per_layer[spike_col].sum())
    memit_max = float(per_layer["max ||W||/||W_0||"].max())
    text = f"largest ||W||/||W_0||: MEMIT {memit_max:.3g}"
    if rome_max_ratio is None or math.isnan(rome_max_ratio):
        conceals = Outcome("not testable here", text, "ROME's run on the same records", n)
    else:
        conceals = Outcome(verdict_from_flags([memit_max < rome_max_ratio, spikes == 0]),
                           text + f" vs ROME {rome_max_ratio:.3g}; spike steps in MEMIT's layers: {spikes}", "", n)
    return {"memit_buildup": buildup, "memit_conceals_flash": conceals}


SHAPE_STEPS = tuple(2 ** k for k in range(11))
"""The steps at which `curve_shapes` compares curves: every power of two up to 1,024, one per octave of Fig. 43's
log axis."""


def normalised_curve(s: pd.Series) -> pd.Series:
    """S by step divided by its best value over the run (1 = the curve's peak), at the `SHAPE_STEPS` it has."""
    at = s[s.index.isin(SHAPE_STEPS)]
    return at / float(s.max())


def shape_distance(ours: pd.Series, paper: pd.Series) -> float:
    """Mean |ours - paper| of the two normalised curves (`normalised_curve`) over their shared steps: 0 for the
    same shape whatever the level, about 0.5 for a curve that collapses where the other holds."""
    a, b = normalised_curve(ours), normalised_curve(paper)
    shared = a.index.intersection(b.index)
    return float((a[shared] - b[shared]).abs().mean())


def curve_shapes(ev: LifelongEvidence, editors: Sequence[str] = ("ROME", "MEMIT", "WilKE"),
                 same: float = 0.10, different: float = 0.20, floor: float = FLOOR_S, min_steps: int = 6) -> Outcome:
    """Fig. 43, row by row: each editor's curve has the paper's shape. Each curve is divided by its own best S
    and compared with the authors' at the powers of two (`shape_distance`); a row matches in a seed when the
    distance is at most `same`, differs when above `different` (a full cliff one octave of steps from the
    paper's adds about 0.08: matching is within about one octave, differing more than two). A row is
    reproduced when it matches in every
    seed, not reproduced when it differs in every seed, partly otherwise; the claim is every row's verdict
    combined (all reproduced -> reproduced, none reproduced or partly -> not reproduced). Precondition per
    row: both curves reach `floor` (below it the shape is noise) and share `min_steps` steps."""
    if ev.paper is None or not len(ev.paper):
        return Outcome("not testable here", "", "the authors' curves", ev.n(*editors))
    rows, texts, failed = [], [], []
    for editor in editors:
        authors = "WilKE" if editor.startswith("WilKE") else editor  # their one WilKE curve (the released rule)
        paper = ev.paper[ev.paper["editor"] == authors].groupby("step")["S"].mean().sort_index() * 100.0
        ours = ev.curves[ev.curves["editor"] == editor]
        if not len(paper) or not len(ours):
            failed.append(f"{editor}: {'no paper curve' if not len(paper) else 'no runs'}")
            continue
        per_seed = {seed: f.groupby("step")["S"].mean().sort_index() * 100.0 for seed, f in ours.groupby("seed")}
        shared = {seed: len(normalised_curve(s).index.intersection(normalised_curve(paper).index))
                  for seed, s in per_seed.items()}
        if paper.max() < floor or any(s.max() < floor for s in per_seed.values()) or min(shared.values()) < min_steps:
            failed.append(f"{editor}: best S paper {paper.max():.1f}, ours "
                          + " / ".join(f"{s.max():.1f}" for s in per_seed.values())
                          + f", shared steps {min(shared.values())}")
            continue
        distances = {seed: shape_distance(s, paper) for seed, s in sorted(per_seed.items())}
        flags = [d <= same if d <= same or d > different else None for d in distances.values()]
        row = ("reproduced" if all(f is True for f in flags) else
               "not reproduced" if all(f is False for f in flags) else "partly")
        rows.append(row)
        texts.append(f"{editor} {' / '.join(f'{d:.2f}' for d in distances.values())} ({row})")
    pre = (f"each row's curves reach S {floor:g} and share {min_steps} power-of-two steps"
           + (f"; failed: {'; '.join(failed)}" if failed else ""))
    number = ("distance of the normalised curves to the paper's, per seed: " + ", ".join(texts)) if texts else ""
    if not rows:
        return Outcome("not testable here", number, pre, ev.n(*editors))
    verdict = ("reproduced" if all(r == "reproduced" for r in rows) else
               "not reproduced" if not any(r in ("reproduced", "partly") for r in rows) else "partly")
    return Outcome(verdict, number, pre, ev.n(*[e for e in editors if e not in {f.split(':')[0] for f in failed}]))


LIFELONG_TESTS = {
    "wilke_beats_sota": (lambda ev, w: wilke_beats_sota(ev, wilke=w), "table1"),
    "editors_fail_lifelong": (lambda ev, w: editors_fail(ev), "table1"),
    "degradation_over_steps": (lambda ev, w: degradation(ev, editors=("ROME", "MEMIT", w)), "lifelong_curves"),
    "wilke_delays_collapse": (lambda ev, w: collapses_later(ev, later=w), "collapse_steps"),
    "memit_declines_most": (lambda ev, w: declines_most(ev, others=("ROME", w)), "collapse_steps"),
    "fig43_shapes": (lambda ev, w: curve_shapes(ev, editors=("ROME", "MEMIT", w)), "beside_paper")}
"""Chapter 3's claims decided from the lifelong runs alone: id -> (test of (evidence, WilKE's label), the
table or figure showing it)."""


def lifelong_claims(ev: LifelongEvidence, choices: pd.Series | None, wilke: str = "WilKE"
                    ) -> list[tuple[str, Outcome, str]]:
    """(claim id, outcome, name of the table or figure) of chapter 3's claims on `ev`, with `wilke` the label
    of WilKE's runs ("WilKE": as released; "WilKE (Eq. 10)": the paper's text); `choices`: its edits by
    layer over the same runs (None: it was not run)."""
    out = [(claim_id, test(ev, wilke), ref) for claim_id, (test, ref) in LIFELONG_TESTS.items()]
    out.append(("layer_per_fact", layer_per_fact(ev, choices, wilke=wilke) if choices is not None else
                Outcome("not testable here", "", f"finished runs of {wilke}", ev.n()), "layer_choices"))
    return out


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
                 copies: Sequence[Path] = (), context: Mapping | None = None, precondition: str = "",
                 n: str = "") -> dict:
    """Record the verdict of claim `claim_id` on a model; returns the chapter's record.

    `page`: the book document that shows it ("toy-gpt2/03_lifelong"); `label`: the figure or table
    on it; `note`: a caveat shown with the number; `copies`: folders that get a copy of the record
    (the page's files); `context`: what the run depended on (profile, n_edits...); `precondition`: what
    the test needed, with the value found (an `Outcome`'s); `n`: what the verdict rests on (records,
    edits, seeds, runs). A "not testable here" verdict must name its precondition."""
    claims = registry()
    if claim_id not in claims:
        raise KeyError(f"unknown claim {claim_id!r}; the claims are in {REGISTRY}")
    if claims[claim_id].chapter != chapter:
        raise ValueError(f"claim {claim_id!r} belongs to chapter {claims[claim_id].chapter}, not {chapter}")
    if verdict not in VERDICTS:
        raise ValueError(f"verdict {verdict!r} is not one of {VERDICTS}")
    if verdict == "not testable here" and not (precondition or number):
        raise ValueError(f"claim {claim_id!r}: 'not testable here' must say which precondition failed")
    path = claims_path(model_name, chapter)
    record = read_json(path) if path.exists() else {"model": model_name, "chapter": chapter, "claims": {}}
    if context:
        record["context"] = dict(context)
    record["claims"][claim_id] = {"verdict": verdict, "number": str(number), "note": note, "page": page,
                                  "label": label, "precondition": precondition, "n": n,
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
                "verdict": NOT_RUN, "number": "", "note": "", "label": None, "precondition": "", "n": "",
                "page": f"{model}/{claim.chapter}" if page_exists else None}
            cells[model]["context"] = (records[key] or {}).get("context", {})
        rows.append({"claim": claim, "cells": cells})
    return rows
