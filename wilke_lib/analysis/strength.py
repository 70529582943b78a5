"""Activation strength and delta strength per layer (Hu et al. 2024, Sec. 4.4 and Appendix D).

Pattern unmatch (Sec. 4.4, Appendix D): for records causing toxicity flash the
key sigma(x W_fc^l) at ROME's predefined layer is orders of magnitude smaller
than elsewhere (activation strength, Appendix D.1, Fig. 31-34), while the
residual delta^l that the edit must write (Eq. 9) varies less across layers
(delta strength, Appendix D.2, Fig. 35-38). Through Eq. 11, dividing by a tiny
key makes the update, hence the toxicity, explode.

* activation strength of layer l: ||k^l||_2, the key (input of mlp_out(l),
  sigma(x W_fc^l); act(gate) * up for LLaMA) at the subject's last token,
  averaged over the context prefixes as ROME's k* (`delta.compute_ks`), or at
  the bare prompt only (`prefixes=None`);
* delta strength of layer l: ||delta^l||_2 with delta^l optimised at the
  output of mlp_out(l) (Eq. 9, `rome.compute_v`).

`strength_tables` gathers them for the flash and normal records of chapter 08 (the delta strength
read from chapter 06's single edits at every layer) and `strength_verdicts` compares them with the
paper.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from types import SimpleNamespace
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn
from tqdm.auto import tqdm

from wilke_lib.analysis.per_layer import per_layer_norms
from wilke_lib.analysis.verdicts import empty_groups, verdict_table
from wilke_lib.arch import ModelAdapter
from wilke_lib.editors.cache import EditCache
from wilke_lib.editors.delta import compute_keys, compute_ks
from wilke_lib.editors.rome import compute_v
from wilke_lib.hparams import to_dict
from wilke_lib.models import model_key
from wilke_lib.results import cache_key, cached_frame, results_dir


def _layers(model: nn.Module, layers: Sequence[int] | None) -> list[int]:
    return list(range(ModelAdapter(model).n_layers)) if layers is None else [int(l) for l in layers]


def _prefixes(model: nn.Module, tok, hparams: Any, prefixes: Sequence[str] | str | None, cache: Any) -> list[str]:
    """None -> the bare prompt; "rome" -> ROME's context prefixes (Eq. 9's c_j); else the given list."""
    if prefixes is None:
        return [""]
    if isinstance(prefixes, str) and prefixes == "rome":
        cache = cache if cache is not None else EditCache.for_model(model)
        return cache.get_prefixes(model, tok, hparams)
    return list(prefixes)


def activation_strength(model: nn.Module, tok, request: dict, layers: Sequence[int] | None = None, *,
                        hparams: Any = None, prefixes: Sequence[str] | str | None = None,
                        cache: Any = None) -> pd.Series:
    """||sigma(x W_fc^l)||_2 at the subject's last token for each layer (Appendix D.1, Fig. 31-34).

    The key is averaged over `prefixes` before the norm, as ROME's k*:
    None = the bare prompt only, "rome" = ROME's context prefixes (needs
    `hparams`), or a list of prefix strings. Returns a Series indexed by layer.
    """
    layers = _layers(model, layers)
    settings = hparams if hparams is not None else SimpleNamespace(fact_token="subject_last")
    keys = compute_ks(model, tok, request, layers, settings, _prefixes(model, tok, hparams, prefixes, cache))
    values = [float(torch.linalg.norm(keys[l])) for l in layers]
    return pd.Series(values, index=pd.Index(layers, name="layer"), name="activation_strength")


def delta_strength(model: nn.Module, tok, request: dict, hparams: Any, layers: Sequence[int] | None = None, *,
                   cache: Any = None, progress: bool = False) -> pd.Series:
    """||delta^l||_2 of Eq. 9 for each layer (Appendix D.2, Fig. 35-38).

    delta^l is optimised at the output of mlp_out(l) with ROME's loss and
    settings (`hparams`, e.g. ROME's or WilKE's) and context prefixes from
    `cache` (an `editing.EditCache`; a fresh one if None). The model is not
    changed. Returns a Series indexed by layer.
    """
    layers = _layers(model, layers)
    prefixes = _prefixes(model, tok, hparams, "rome", cache)
    keys = compute_keys(model, tok, request, layers, hparams, prefixes)
    values = []
    for l in tqdm(layers, desc="delta per layer", disable=not progress):
        _, _, delta, _ = compute_v(model, tok, request, l, keys[l], hparams, prefixes)
        values.append(float(torch.linalg.norm(delta)))
    return pd.Series(values, index=pd.Index(layers, name="layer"), name="delta_strength")


def strength_table(model: nn.Module, tok, records: Sequence[dict], hparams: Any,
                   layers: Sequence[int] | None = None, *, prefixes: Sequence[str] | str | None = "rome",
                   with_delta: bool = True, with_gain: bool = False, cache: Any = None,
                   progress: bool = True) -> pd.DataFrame:
    """Long table (case_id, layer, activation_strength[, delta_strength][, update_gain]) over `records`
    (Fig. 31-38; `update_gain` is not in the paper, see that function)."""
    cache = cache if cache is not None else EditCache.for_model(model)
    frames = []
    for record in tqdm(records, desc="strength", disable=not progress):
        act = activation_strength(model, tok, record, layers, hparams=hparams, prefixes=prefixes, cache=cache)
        frame = act.to_frame()
        if with_delta:
            frame["delta_strength"] = delta_strength(model, tok, record, hparams, layers, cache=cache)
        if with_gain:
            frame["update_gain"] = update_gain(model, tok, record, hparams, layers, cache=cache)
        frames.append(frame.reset_index().assign(case_id=record.get("case_id")))
    return pd.concat(frames, ignore_index=True)[
        ["case_id", "layer", "activation_strength"] + (["delta_strength"] if with_delta else [])
        + (["update_gain"] if with_gain else [])]


def update_gain(model: nn.Module, tok, request: dict, hparams: Any, layers: Sequence[int] | None = None, *,
                cache: Any = None) -> pd.Series:
    """||C^-1 k*|| / (k_t^T C^-1 k*) for each layer: the size of ROME's update per unit of residual
    (k_t = the bare prompt's key under ROME's released update form, k* otherwise).

    ROME's rank-one update (Eq. 2 of Meng et al. 2022a, Eq. 11 of Hu et al.) is
    dW = r u^T with r = v* - W k* and u = C^-1 k* / (k*^T C^-1 k*), so ||dW||_F = ||r|| * ||u||.
    With C = I the gain is 1 / ||k*||, the inverse activation strength of Appendix D.1; a key that
    points into directions the layer's keys rarely take (small eigenvalues of C) makes it larger
    still. k* is averaged over ROME's context prefixes; C^-1 comes from `cache` (an
    `EditCache` of the original model, a fresh one if None). Returns a Series by layer.
    """
    layers = _layers(model, layers)
    cache = cache if cache is not None else EditCache.for_model(model)
    cache.get_mom2(model, tok, layers, hparams)  # one pass over the corpus for every missing layer
    keys = compute_keys(model, tok, request, layers, hparams, _prefixes(model, tok, hparams, "rome", cache))
    bare_denominator = getattr(hparams, "update_form", None) == "released"
    values = []
    for l in layers:
        c_inv = cache.get_mom2_inv(model, tok, l, hparams).double()
        k = keys[l].star.double().to(c_inv.device)
        k_t = keys[l].bare.double().to(c_inv.device) if bare_denominator else k
        u = c_inv @ k
        values.append(float(torch.linalg.norm(u) / (u @ k_t)))
    return pd.Series(values, index=pd.Index(layers, name="layer"), name="update_gain")


def strength_tables(model: nn.Module, tok, groups: dict[str, Sequence[dict]], hparams: Any, *, model_name: str,
                    n_delta: int | None = None, delta_layers: Sequence[int] | None = None, cache: Any = None,
                    progress: bool = True) -> pd.DataFrame:
    """Activation strength ||sigma(x W_fc^l)|| (keys averaged over ROME's context prefixes) and ROME's
    update gain of every record, and the delta strength ||delta^l|| of the first `n_delta` records of
    each group (None = all), at every layer (Fig. 31-38).

    The delta strength is the ||delta^l|| of ROME's optimisation at layer l, which the single edits of
    `per_layer.per_layer_norms` record: it is read from there (chapter 06's cache when the groups are
    the same, computed otherwise), at `delta_layers` (default every layer). Long table group, case_id,
    layer, activation_strength, delta_strength (NaN where not computed), update_gain. Cached under
    `results/<model>/strength/`."""
    key = cache_key(model_key(model_name), to_dict(hparams), {g: [r.get("case_id") for r in rs] for g, rs in groups.items()},
                    n_delta, [[r["requested_rewrite"] for r in rs] for rs in groups.values()],
                    list(delta_layers) if delta_layers is not None else None)
    path = results_dir(model_name, "strength") / f"{key}.json"

    def compute() -> pd.DataFrame:
        frames = [strength_table(model, tok, recs, hparams, with_delta=False, with_gain=True, cache=cache,
                                 progress=progress).assign(group=group)
                  for group, recs in groups.items() if recs]
        out = pd.concat(frames, ignore_index=True)
        firsts = {g: list(rs) if n_delta is None else list(rs)[:n_delta] for g, rs in groups.items()}
        edits = per_layer_norms(model, tok, firsts, hparams, model_name=model_name, layers=delta_layers, cache=cache,
                                progress=progress)
        delta = edits[["group", "case_id", "layer", "delta_norm"]].rename(columns={"delta_norm": "delta_strength"})
        out = out.merge(delta, on=["group", "case_id", "layer"], how="left")
        return out[["group", "case_id", "layer", "activation_strength", "delta_strength", "update_gain"]]

    return cached_frame(path, compute)


def strength_verdicts(table: pd.DataFrame, predefined_layer: int, flash_label: str = "flash") -> pd.DataFrame:
    """Appendix D phenomena: flash records' key at the predefined layer is orders of magnitude
    smaller than normal records'; delta strength varies across layers less than that."""
    at = table[table.layer == predefined_layer].groupby("group")["activation_strength"].median()
    if not {"flash", "normal"} <= set(at.index):
        return empty_groups()
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


def by_case(table: pd.DataFrame, group: str, column: str) -> dict:
    """{case_id: Series of `column` indexed by layer} for one group of a long per-layer table (the
    input of `plots.strength_figure`); rows with NaN are dropped."""
    sub = table[table.group == group].dropna(subset=[column])
    return {case: rows.sort_values("layer").set_index("layer")[column] for case, rows in sub.groupby("case_id", sort=False)}
