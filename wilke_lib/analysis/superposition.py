"""Knowledge superposition (Hu et al. 2024b, "Knowledge in Superposition: Unveiling the Failures of
Lifelong Knowledge Editing for Large Language Models", arXiv 2408.07413).

In the closed-form (linear associative memory) solution that ROME and MEMIT share, after n edits
W_n = W_0 + sum_i r_i (C^-1 k_e_i)^T / (k_e_i^T C^-1 k_e_i), so the value of any other fact j moves by
the interference term

    W_n k_j - W_0 k_j = sum_i p(k_e_i, k_j) r_i,      p(k_i, k_j) = k_i^T C^-1 k_j / (k_i^T C^-1 k_i),

which vanishes when the keys do not overlap in the whitened space (no superposition). The paper
measures, per layer, the matrix P = [p(k_i, k_j)] of N = 128 known facts (keys at the last subject
token, at the input of the MLP's output projection, C from a text sample), its diagonal dropped, and
reports zero mean, heavy tails, high kurtosis (higher in early layers and larger models) and angles
near 90 degrees in the whitened space.

* `subject_keys`: the keys of N records at every layer (one forward pass per record);
* `p_matrix`, `whitened_angles`, `layer_statistics`: the paper's measurements per layer;
* `interference`: a ROME edit-and-rollback sequence replayed on a copy of the model, with the
  interference term of every retained fact after each step (computed from the edits' weight changes
  and the original keys), set against how much the retained fact's answer lost.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn
from tqdm.auto import tqdm

from wilke_lib import editing
from wilke_lib.arch import ModelAdapter
from wilke_lib.editors.cache import EditCache
from wilke_lib.editors.delta import compute_keys
from wilke_lib.generation import greedy_matches, target_logprob
from wilke_lib.tokens import rewrite_prompt, target_str


def subject_keys(model: nn.Module, tok, records: Sequence[dict], layers: Sequence[int], hparams: Any,
                 progress: bool = False) -> dict[int, torch.Tensor]:
    """{layer: (N, d_mlp)} keys at the last subject token of each record's bare rewrite prompt."""
    rows: dict[int, list[torch.Tensor]] = {l: [] for l in layers}
    for record in tqdm(records, desc="keys", disable=not progress, leave=False):
        keys = compute_keys(model, tok, record["requested_rewrite"], list(layers), hparams, [""])
        for l in layers:
            rows[l].append(keys[l].bare.double().cpu())
    return {l: torch.stack(v) for l, v in rows.items()}


def p_matrix(keys: torch.Tensor, c_inv: torch.Tensor) -> torch.Tensor:
    """P[i, j] = k_i^T C^-1 k_j / (k_i^T C^-1 k_i) (N, N), float64, the diagonal (all ones) set to NaN."""
    K = keys.double()
    gram = K @ c_inv.double().cpu() @ K.T
    P = gram / gram.diagonal().unsqueeze(1)
    P.fill_diagonal_(float("nan"))
    return P


def whitened_angles(keys: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """Angles (degrees) between the whitened keys C^-1/2 k_i, off the diagonal (a flat tensor)."""
    eigvals, eigvecs = torch.linalg.eigh(c.double().cpu())
    whitening = eigvecs @ torch.diag(eigvals.clamp_min(1e-12).rsqrt()) @ eigvecs.T
    Z = keys.double() @ whitening
    Z = Z / Z.norm(dim=1, keepdim=True)
    cos = (Z @ Z.T).clamp(-1, 1)
    off = ~torch.eye(len(Z), dtype=torch.bool)
    return torch.rad2deg(torch.arccos(cos[off]))


def excess_kurtosis(values: np.ndarray) -> float:
    """Fisher's excess kurtosis m4 / m2^2 - 3 (0 for a normal distribution)."""
    x = np.asarray(values, dtype=np.float64)
    x = x[np.isfinite(x)]
    d = x - x.mean()
    m2 = float((d ** 2).mean())
    return float((d ** 4).mean() / m2 ** 2 - 3) if m2 > 0 else math.nan


def layer_statistics(model: nn.Module, tok, records: Sequence[dict], hparams: Any, cache: EditCache,
                     layers: Sequence[int] | None = None, progress: bool = True) -> tuple[pd.DataFrame, dict]:
    """Per layer: mean, std and excess kurtosis of the off-diagonal entries of P, the share of them
    above 0.1 in absolute value, and the mean and spread of the whitened angles; plus the raw values
    ({layer: {"p": ..., "angles": ...}}) for the histograms."""
    layers = list(range(ModelAdapter(model).n_layers)) if layers is None else list(layers)
    cache.get_mom2(model, tok, layers, hparams)
    keys = subject_keys(model, tok, records, layers, hparams, progress)
    rows, raw = [], {}
    for l in layers:
        P = p_matrix(keys[l], cache.get_mom2_inv(model, tok, l, hparams))
        values = P[torch.isfinite(P)].numpy()
        angles = whitened_angles(keys[l], cache.get_mom2(model, tok, [l], hparams)[l]).numpy()
        raw[l] = {"p": values, "angles": angles}
        rows.append({"layer": l, "n_facts": len(keys[l]), "mean": float(values.mean()), "std": float(values.std()),
                     "excess_kurtosis": excess_kurtosis(values), "share_abs_above_0.1": float((abs(values) > 0.1).mean()),
                     "angle_mean": float(angles.mean()), "angle_std": float(angles.std())})
    return pd.DataFrame(rows), raw


def interference(model: nn.Module, tok, edited: Sequence[dict], retained: Sequence[dict], hparams: Any,
                 cache: EditCache, progress: bool = True) -> pd.DataFrame:
    """Replay ROME edits and rollbacks of `edited` (in order) on a copy of `model`; after each step, for
    every retained record j: the interference term ||(W_n - W_0) k_j|| (the sum over the edits of
    p(k_e_i, k_j) times their residuals, at ROME's layer, with k_j the original key) and the loss of
    the log-probability of its true answer, and whether the greedy answer is still the true one (ORS).
    Long table step, case_id, predicted, logprob_drop, answer_kept."""
    layer = hparams.layer
    keys = subject_keys(model, tok, retained, [layer], hparams)[layer].float()
    prompts = [rewrite_prompt(r) for r in retained]
    answers = [target_str(r["requested_rewrite"]["target_true"]) for r in retained]
    base = target_logprob(model, tok, prompts, answers)
    work = copy.deepcopy(model)
    adapter = ModelAdapter(work)
    original = adapter.out_weight(layer).detach().float().clone()
    rows = []
    for step, record in enumerate(tqdm(edited, desc="edit + rollback", disable=not progress), start=1):
        request = record["requested_rewrite"]
        try:
            result = editing.edit(work, tok, request, hparams, cache=cache, keep_deltas=False)
            editing.rollback(work, tok, request, hparams, result, cache=cache, keep_deltas=False)
        except editing.EditError:
            continue
        change = adapter.out_weight(layer).float() - original  # sum of the steps' rank-one updates
        predicted = (change @ keys.T).norm(dim=0)
        now = target_logprob(work, tok, prompts, answers)
        kept = greedy_matches(work, tok, prompts, answers)
        for j, record_j in enumerate(retained):
            rows.append({"step": step, "case_id": record_j.get("case_id"), "predicted": float(predicted[j]),
                         "logprob_drop": float(base[j] - now[j]), "answer_kept": bool(kept[j])})
    return pd.DataFrame(rows)


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    """Spearman rank correlation (no scipy)."""
    ra, rb = pd.Series(a).rank(), pd.Series(b).rank()
    return float(ra.corr(rb))


def auc(scores: Sequence[float], positive: Sequence[bool]) -> float:
    """Area under the ROC curve of `scores` for the `positive` labels (NaN without both classes)."""
    s, y = np.asarray(scores, dtype=float), np.asarray(positive, dtype=bool)
    if y.all() or not y.any():
        return math.nan
    ranks = pd.Series(s).rank().to_numpy()
    return float((ranks[y].sum() - y.sum() * (y.sum() + 1) / 2) / (y.sum() * (~y).sum()))
