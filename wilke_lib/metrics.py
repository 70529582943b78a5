"""Metrics of the lifelong protocol (Hu et al. 2024, Appendix F.2, Eq. 12-16) and their summaries.

All scores are fractions in [0, 1] inside the library; `summarise_runs` reports them in %, the
unit of the paper's Table 1.

* ES, PS (the paper's GS), NS (the paper's LS): Eq. 12-14, averaged over the edit steps.
* ERS, ORS: Eq. 15-16, measured on the rolled-back model at a checkpoint.
* S: harmonic mean of the five, where a score of exactly zero counts as 1e-4 (released code).

`evaluate_edit` and `answers_true` measure one record on the current model through a backend's
`matches` (greedy exact match of every target token, `generation.greedy_matches`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from typing import Any

import numpy as np
import pandas as pd
from torch import nn

from wilke_lib.tokens import rewrite_prompt, target_str

METRICS: tuple[str, ...] = ("S", "ES", "PS", "NS", "ERS", "ORS")
"""Order of the columns of Table 1."""

COMPONENTS: tuple[str, ...] = ("ES", "PS", "NS", "ERS", "ORS")
"""The five scores whose harmonic mean is S."""

ZERO_AS = 1e-4
"""Value that a score of exactly zero takes in the harmonic mean."""

# Two-sided 95% quantiles of Student's t (0.975 quantile) for 1..30 degrees of freedom.
_T975 = (
    12.7062047, 4.30265273, 3.18244631, 2.77644511, 2.57058184, 2.44691185, 2.36462425,
    2.30600414, 2.26215716, 2.22813885, 2.20098516, 2.17881283, 2.16036866, 2.14478669,
    2.13144955, 2.11990530, 2.10981558, 2.10092204, 2.09302405, 2.08596345, 2.07961384,
    2.07387307, 2.06865761, 2.06389856, 2.05953855, 2.05552944, 2.05183052, 2.04840714,
    2.04522964, 2.04227246,
)
_Z975 = 1.959963984540054


def harmonic_mean(values: Sequence[float], zero: float = ZERO_AS) -> float:
    """Harmonic mean of fractions in [0, 1]; a value of exactly 0 counts as `zero` (S of App. F.2).

    Raises ValueError on an empty sequence, NaN, or a value outside [0, 1].
    """
    vals = [float(v) for v in values]
    if not vals:
        raise ValueError("harmonic_mean of an empty sequence")
    for v in vals:
        if math.isnan(v) or not 0.0 <= v <= 1.0:
            raise ValueError(f"harmonic_mean expects fractions in [0, 1], got {v!r}")
    vals = [zero if v == 0.0 else v for v in vals]
    return len(vals) / sum(1.0 / v for v in vals)


def score_S(es: float, ps: float, ns: float, ers: float, ors: float) -> float:
    """Composite score S = harmonic mean of ES, PS, NS, ERS, ORS (App. F.2), zeros as 1e-4."""
    return harmonic_mean([es, ps, ns, ers, ors])


def t_quantile_975(dof: int) -> float:
    """0.975 quantile of Student's t with `dof` degrees of freedom.

    Uses scipy when importable; otherwise a table for dof 1..30 and the Cornish-Fisher expansion
    around the normal quantile beyond (error < 1e-5 for dof > 30).
    """
    if dof < 1:
        raise ValueError(f"degrees of freedom must be >= 1, got {dof}")
    try:
        from scipy import stats  # type: ignore[import-not-found]

        return float(stats.t.ppf(0.975, dof))
    except ImportError:
        pass
    if dof <= len(_T975):
        return _T975[dof - 1]
    z, n = _Z975, float(dof)
    return (z + (z**3 + z) / (4 * n) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * n**2)
            + (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / (384 * n**3))


def mean_ci95(samples: Sequence[float]) -> tuple[float, float]:
    """Mean and half width of the 95% t confidence interval (n-1 dof): t * s / sqrt(n).

    With a single sample the half width is reported as 0.0 (no spread can be estimated; the
    paper's runs always have three seeds). Raises ValueError on an empty sequence.
    """
    x = np.asarray([float(s) for s in samples], dtype=np.float64)
    if x.size == 0:
        raise ValueError("mean_ci95 of an empty sequence")
    mean = float(x.mean())
    if x.size == 1:
        return mean, 0.0
    sem = float(x.std(ddof=1)) / math.sqrt(x.size)
    return mean, t_quantile_975(x.size - 1) * sem


def _with_s(final: Mapping[str, float]) -> dict[str, float]:
    """A final-metrics dict with S filled in from the five components when missing."""
    out = {k: float(final[k]) for k in COMPONENTS}
    out["S"] = float(final["S"]) if "S" in final else score_S(*(out[k] for k in COMPONENTS))
    return out


def summarise_runs(finals: Sequence[Mapping[str, float]], **labels: str) -> pd.DataFrame:
    """One-row table in the format of Table 1 (`wilke_lib/data/table1_reported.csv`).

    `finals` holds one final-metrics dict (fractions) per seed. Columns: the `labels` given
    (e.g. model=..., editor=...), then for each of S, ES, PS, NS, ERS, ORS the mean in %,
    `<metric>_ci` the 95% t-interval half width in % and `<metric>_std` the standard deviation over
    the runs in % as `np.std` computes it (ddof 0: the spread the authors' notebook prints after
    "+-" and the paper's Table 1 calls a 95% CI), then `n_runs`. S is computed per run, then averaged.
    """
    if not finals:
        raise ValueError("summarise_runs needs at least one run")
    runs = [_with_s(f) for f in finals]
    row: dict[str, object] = dict(labels)
    for m in METRICS:
        values = [100.0 * r[m] for r in runs]
        mean, half = mean_ci95(values)
        row[m], row[f"{m}_ci"], row[f"{m}_std"] = mean, half, float(np.std(values))
    row["n_runs"] = len(runs)
    return pd.DataFrame([row])


def relative_improvement(a: float, b: float) -> float:
    """Relative improvement of `a` over `b`: a / b - 1 (e.g. 19.3 vs 13.2 -> 0.462, Sec. 5.2).

    Returns +inf when b == 0 < a and NaN when both are zero.
    """
    if b == 0:
        return math.nan if a == 0 else math.copysign(math.inf, a)
    return a / b - 1.0


# ---- one record on the current model (Eq. 12-16) ----------------------------------------------

def fraction(flags: Sequence[bool]) -> float:
    return float(np.mean(flags)) if len(flags) else math.nan


def evaluate_edit(backend: Any, model: nn.Module, tok: Any, rec: dict, batch_size: int,
                  edited: bool = True) -> dict[str, float]:
    """ES (Eq. 12), PS (Eq. 13, fraction of paraphrases) and NS (Eq. 14, fraction of neighbourhood
    prompts keeping target_true) of one record on the current model, in one matcher call.
    With `edited=False` (failed edit) ES = PS = 0 and only NS is measured."""
    rw = rec["requested_rewrite"]
    new, true = target_str(rw["target_new"]), target_str(rw["target_true"])
    para = list(rec.get("paraphrase_prompts", [])) if edited else []
    neigh = list(rec.get("neighborhood_prompts", []))
    rewrite = [rewrite_prompt(rec)] if edited else []
    prompts = rewrite + para + neigh
    targets = [new] * (len(rewrite) + len(para)) + [true] * len(neigh)
    flags = list(backend.matches(model, tok, prompts, targets, batch_size=batch_size)) if prompts else []
    k = len(rewrite)
    return {"ES": fraction(flags[:k]) if edited else 0.0, "PS": fraction(flags[k:k + len(para)]) if edited else 0.0,
            "NS": fraction(flags[k + len(para):])}


def answers_true(backend: Any, model: nn.Module, tok: Any, recs: Sequence[dict], batch_size: int,
                 with_paraphrases: bool = False) -> list[bool]:
    """Whether each record's rewrite prompt (and paraphrases) answers its target_true (Eq. 15-16, App. B)."""
    prompts, targets = [], []
    for rec in recs:
        extra = list(rec.get("paraphrase_prompts", [])) if with_paraphrases else []
        for prompt in [rewrite_prompt(rec)] + extra:
            prompts.append(prompt)
            targets.append(target_str(rec["requested_rewrite"]["target_true"]))
    return [bool(m) for m in backend.matches(model, tok, prompts, targets, batch_size=batch_size)] if prompts else []
