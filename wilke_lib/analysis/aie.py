"""The average indirect effect at the last subject token, ROME's layer, and per-record peaks.

Meng et al. 2022a, Fig. 2 and Sec. 2.3: the average over known records of the indirect effect of
the MLP states at the last subject token peaks at the layer ROME edits (GPT2-XL: 17, GPT-J: 5; the
WilKE paper's "predefined layer"). The WilKE paper (Appendix A) contrasts where flash records and
normal records peak.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
from torch import nn
from tqdm.auto import tqdm

from wilke_lib.analysis.causal_trace import subject_noise_std, trace
from wilke_lib.analysis.verdicts import empty_groups, verdict_table
from wilke_lib.arch import ModelAdapter
from wilke_lib.tokens import as_request


@dataclass
class AIEResult:
    """Average indirect effect per layer at the last subject token (Meng et al. 2022a, Fig. 2)."""

    kind: str
    aie: np.ndarray            # [n_layers], mean over records of score - low_score
    per_record: np.ndarray     # [n_records, n_layers]
    low_scores: np.ndarray     # [n_records]
    high_scores: np.ndarray    # [n_records]
    case_ids: list
    peak_layer: int


def average_indirect_effect(model: nn.Module, tok, records: Sequence[dict], kind: str = "mlp", *,
                            use_target_true: bool = False, progress: bool = True,
                            **trace_kwargs) -> AIEResult:
    """Average indirect effect (AIE) per layer at the last subject token over `records`.

    Meng et al. 2022a, Fig. 2 (AIE of hidden / MLP / attention states at the
    last subject token). For each record the rewrite prompt is traced at the
    subject's last token only; AIE[l] = mean over records of score[l] - low_score.
    The target is the clean greedy answer unless `use_target_true`. The noise is ROME's, one level
    for all records (`causal_trace.subject_noise_std` over their subjects) unless `noise_std` is given.
    Returns an `AIEResult` with the peak layer argmax_l AIE[l].
    """
    if trace_kwargs.get("noise_std") is None:
        trace_kwargs["noise_std"] = subject_noise_std(model, tok, (as_request(r)["subject"] for r in records),
                                                      trace_kwargs.pop("noise_multiplier", 3.0))
    rows, lows, highs, ids = [], [], [], []
    for record in tqdm(records, desc=f"AIE {kind}", disable=not progress):
        req = as_request(record)
        target = req["target_true"] if use_target_true else None
        res = trace(model, tok, req["prompt"], req["subject"], target, kind=kind,
                    token_positions="last_subject", **trace_kwargs)
        rows.append(res.scores[res.subject_range[1] - 1] - res.low_score)
        lows.append(res.low_score)
        highs.append(res.high_score)
        ids.append(record.get("case_id"))
    per_record = np.stack(rows)
    aie = per_record.mean(0)
    return AIEResult(kind=kind, aie=aie, per_record=per_record, low_scores=np.array(lows),
                     high_scores=np.array(highs), case_ids=ids, peak_layer=int(np.argmax(aie)))


def default_window(n_layers: int) -> int:
    """Window of restored MLP / attention layers: ROME's 10 for models of 24 layers or more
    (GPT2-XL: 48, GPT-J: 28), else an odd window of about a fifth of the depth (12 layers -> 3),
    so that the MLP curve of a small model is not flattened over almost all of its layers."""
    return 10 if n_layers >= 24 else max(1, (n_layers // 5) | 1)


def choose_rome_layer(model: nn.Module, tok, records: Sequence[dict], *, kind: str = "mlp",
                      window: int | None = None, n_samples: int = 10, noise_multiplier: float = 3.0,
                      seed: int = 1, progress: bool = False, aie: AIEResult | None = None) -> int:
    """ROME's editing layer: the peak of the average indirect effect of the MLP states at the last
    subject token over `records` (Meng et al. 2022a, Sec. 2.3: GPT2-XL's layer 17 is the centre
    of the MLP effect; Hu et al. 2024 Sec. 4.3 call it the predefined layer).

    `window` defaults to `default_window(n_layers)`; a precomputed `aie` of that kind is reused.
    """
    if aie is None:
        window = default_window(ModelAdapter(model).n_layers) if window is None else window
        aie = average_indirect_effect(model, tok, records, kind=kind, window=window, n_samples=n_samples,
                                      noise_multiplier=noise_multiplier, seed=seed, progress=progress)
    elif aie.kind != kind:
        raise ValueError(f"choose_rome_layer: the given AIE is of kind {aie.kind!r}, not {kind!r}")
    return int(aie.peak_layer)


def peak_layers(aie: AIEResult) -> pd.Series:
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
        return empty_groups()
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
