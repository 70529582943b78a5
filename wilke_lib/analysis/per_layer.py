"""Single edits of a record at every layer (Hu et al. 2024, Sec. 4.3, Fig. 7-8, 39-42).

For each layer l, ROME's edit of the record at l alone: ||W_proj^l||_F originally (the red dashed
line of Fig. 7), after the edit (the blue solid line), and optionally after edit + rollback with the
norm of the toxicity (Eq. 7); also ROME's ||delta^l|| and ||k*^l|| (the delta and activation strength
of Appendix D). The flash records of the paper blow the norm up at the predefined layer only.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn
from tqdm.auto import tqdm

from wilke_lib.analysis.verdicts import empty_groups, verdict_table
from wilke_lib.arch import ModelAdapter
from wilke_lib.editing import EditCache, EditError, edit, rollback
from wilke_lib.editors.common import WeightJournal
from wilke_lib.hparams import to_dict
from wilke_lib.lifelong.monitor import toxicity
from wilke_lib.models import model_key
from wilke_lib.results import cache_key, cached_frame, results_dir
from wilke_lib.tokens import as_request

COLUMNS = ["group", "case_id", "layer", "norm_original", "norm_edited", "ratio", "delta_norm", "k_star_norm", "error"]


def _single_layer(model, tok, request, hparams, adapter, layer, with_rollback, cache) -> dict:
    """Edit (and roll back) `request` at `layer` only, measure norms, restore the layer exactly."""
    journal = WeightJournal(adapter)
    journal.snapshot(layer)
    original = journal.saved[layer]
    out = {"layer": layer, "norm_original": float(torch.linalg.norm(original.float())),
           "norm_edited": float("nan"), "norm_rolled_back": float("nan"), "toxicity_norm": float("nan"),
           "delta_norm": float("nan"), "k_star_norm": float("nan"), "error": None}
    try:
        result = edit(model, tok, request, hparams, layers=[layer], cache=cache, keep_deltas=False)
        out["norm_edited"] = float(torch.linalg.norm(adapter.out_weight(layer).float()))
        for key in ("delta_norm", "k_star_norm"):  # ROME's ||delta^l|| (Eq. 9) and ||k*^l|| (App. D)
            out[key] = float(result.info.get(key, float("nan")))
        if with_rollback:
            rollback(model, tok, request, hparams, result, cache=cache, keep_deltas=False)
            now = adapter.out_weight(layer).float()
            out["norm_rolled_back"] = float(torch.linalg.norm(now))
            out["toxicity_norm"] = float(torch.linalg.norm(toxicity(now, original.float())))
    except EditError as err:
        out["error"] = str(err)
    finally:
        journal.restore()
    return out


def per_layer_flash(model: nn.Module, tok, request: dict, hparams: Any, layers: Sequence[int] | None = None, *,
                    with_rollback: bool = True, cache: Any = None, progress: bool = False) -> pd.DataFrame:
    """Single edit of `request` at each layer (Fig. 7-8, 39-42), the model restored bit-exactly after
    each; `hparams` are ROME's (the layer is forced with `edit(..., layers=[l])`)."""
    adapter = ModelAdapter(model)
    cache = cache if cache is not None else EditCache.for_model(model)
    request = as_request(request)
    layers = range(adapter.n_layers) if layers is None else layers
    rows = [_single_layer(model, tok, request, hparams, adapter, int(l), with_rollback, cache)
            for l in tqdm(list(layers), desc="per-layer edits", disable=not progress)]
    return pd.DataFrame(rows)


def per_layer_norms(model: nn.Module, tok, groups: dict[str, Sequence[dict]], hparams: Any, *, model_name: str,
                    layers: Sequence[int] | None = None, cache: Any = None, progress: bool = True) -> pd.DataFrame:
    """`per_layer_flash` (no rollback) of every record of every group; long table of `COLUMNS`.
    Cached under `results/<model>/flash_per_layer/`."""
    layers = list(range(ModelAdapter(model).n_layers)) if layers is None else [int(l) for l in layers]
    key = cache_key(model_key(model_name), to_dict(hparams), layers,
                    {g: [r.get("case_id") for r in rs] for g, rs in groups.items()},
                    [[r["requested_rewrite"] for r in rs] for rs in groups.values()])
    path = results_dir(model_name, "flash_per_layer") / f"{key}.json"

    def compute() -> pd.DataFrame:
        frames = []
        items = [(g, r) for g, rs in groups.items() for r in rs]
        for group, record in tqdm(items, desc="single edits at every layer", disable=not progress):
            table = per_layer_flash(model, tok, record, hparams, layers, with_rollback=False, cache=cache)
            frames.append(table.assign(group=group, case_id=record.get("case_id")))
        out = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=COLUMNS)
        out["ratio"] = out["norm_edited"].astype(float) / out["norm_original"].astype(float)
        return out[COLUMNS]

    return cached_frame(path, compute)


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
        return empty_groups()
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


def per_layer_panels(table: pd.DataFrame, labels: dict[str, str] | None = None) -> dict[str, pd.DataFrame]:
    """{"<group label>: case <id>": that record's per-layer table} for `plots.layer_flash_figure`."""
    labels = labels or {}
    return {f"{labels.get(g, g)}: case {c}": rows.sort_values("layer")
            for (g, c), rows in table.groupby(["group", "case_id"], sort=False)}
