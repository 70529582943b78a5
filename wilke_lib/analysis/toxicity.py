"""Toxicity of lifelong editing (Hu et al. 2024, Sec. 4.1-4.3, Eq. 7).

Toxicity is what an edit followed by its rollback leaves behind (Eq. 7):
    Toxicity = theta* - theta,  f_theta* = KE(KE(f_theta, x_e, y_e), x_e, y_o).
Accumulated over a lifelong run (edit + rollback at every step, Appendix F) it
is W_proj^l(step) - W_proj^l(original) of the edited layer. The paper shows

* its size as ||W_proj^l||_F over steps against the original norm (Fig. 3a-6a,
  `norm_trajectory`, or the `norm` column of a `ToxicityRecorder`);
* the matrix itself at steps 2, 4, ..., 1024 (Fig. 3b-6b, `ToxicityRecorder`
  / `lifelong_rome_toxicity` snapshots, block-averaged for plotting);
* single ROME edits of a record at every layer, with the norms of W_proj^l
  before and after (Fig. 7-8, 39-42, `per_layer_flash`).

The lifelong runner (`wilke_lib.lifelong`) stores only the weights of the last
step, so matrices at earlier steps are recorded while the run goes: pass a
`ToxicityRecorder` as `run_lifelong(..., on_step=recorder)`, or run the
standalone loop `lifelong_rome_toxicity`.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from wilke_lib.arch import ModelAdapter

PAPER_SNAPSHOT_STEPS: tuple[int, ...] = (2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
"""The steps of Fig. 3b-6b."""

_MLP_OUT = r"mlp\.(c_proj|fc_out|dense_4h_to_h|down_proj)\.weight"


def toxicity(theta_star: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """Eq. 7: theta* - theta, the parameters after edit + rollback minus the original ones."""
    return theta_star - theta


def downsample(matrix: torch.Tensor | np.ndarray, size: int = 64) -> np.ndarray:
    """Block-average a matrix to at most size x size cells (for the heatmaps of Fig. 3b)."""
    m = torch.as_tensor(matrix, dtype=torch.float32)
    out = (min(size, m.shape[0]), min(size, m.shape[1]))
    return F.adaptive_avg_pool2d(m[None, None].cpu(), out)[0, 0].numpy()


# --------------------------------------------------------------------------- norm trajectories
def _steps_frame(steps: Any) -> pd.DataFrame:
    """A steps table from a DataFrame, a `RunResult`, a run directory or a steps.jsonl path."""
    if isinstance(steps, pd.DataFrame):
        return steps
    if hasattr(steps, "steps") and isinstance(steps.steps, pd.DataFrame):
        return steps.steps
    path = Path(steps)
    if path.is_dir():
        path = path / "steps.jsonl"
    return pd.read_json(path, lines=True)


def _param_pattern(layer: int, param_name: str | None) -> re.Pattern:
    if param_name is not None:
        return re.compile(re.escape(param_name) + r"(\.weight)?$")
    return re.compile(rf"(^|\.){layer}\.{_MLP_OUT}$")


def norm_trajectory(steps: Any, layer: int, *, original_norm: float | None = None,
                    model: nn.Module | None = None, param_name: str | None = None) -> pd.DataFrame:
    """||W_proj^layer||_F after each step of a lifelong run vs the original norm (Fig. 3a-6a).

    `steps`: the run's steps table (DataFrame, `RunResult`, run directory or
    steps.jsonl) with its `weight_norms_after_rollback` column. Steps that did
    not touch the layer keep the previous value (the original norm before the
    first touch). The original norm is `original_norm`, else that of `model`
    (which must be the unedited model). Columns: step, norm, original_norm, ratio.
    """
    table = _steps_frame(steps).sort_values("step")
    if model is not None:
        adapter = ModelAdapter(model)
        param_name = param_name or adapter.name_of("mlp_out", layer)
        if original_norm is None:
            original_norm = float(torch.linalg.norm(adapter.out_weight(layer).float()))
    pattern = _param_pattern(layer, param_name)
    current = float("nan") if original_norm is None else float(original_norm)
    rows = []
    for step, norms in zip(table["step"], table["weight_norms_after_rollback"]):
        hits = [v for k, v in (norms or {}).items() if pattern.search(k)]
        current = float(hits[0]) if hits else current
        rows.append({"step": int(step), "norm": current})
    out = pd.DataFrame(rows)
    out["original_norm"] = np.nan if original_norm is None else float(original_norm)
    out["ratio"] = out["norm"] / out["original_norm"]
    return out


# --------------------------------------------------------------------------- recording
@dataclass
class ToxicityRecording:
    """What a `ToxicityRecorder` gathered.

    table: one row per step: step, case_id, norm / toxicity_norm of the primary
    (first) layer, norm_<l> / toxicity_<l> per layer, edit_success,
    rollback_success, failed. snapshots[step][layer]: block-averaged toxicity
    matrix; full[step][layer]: the full one when requested.
    """

    layers: list[int]
    original_norms: dict[int, float]
    table: pd.DataFrame
    snapshots: dict[int, dict[int, np.ndarray]] = field(default_factory=dict)
    full: dict[int, dict[int, np.ndarray]] = field(default_factory=dict)

    def save(self, path: str | Path) -> Path:
        """torch.save the recording (the table as a list of row dicts)."""
        data = dataclasses.asdict(self) | {"table": self.table.to_dict("records")}
        torch.save(data, Path(path))
        return Path(path)

    @classmethod
    def load(cls, path: str | Path) -> "ToxicityRecording":
        data = torch.load(Path(path), weights_only=False)
        return cls(**(data | {"table": pd.DataFrame(data["table"])}))


def toxicity_snapshots(recording: ToxicityRecording, layer: int | None = None,
                       steps: Sequence[int] | None = None, full: bool = False) -> dict[int, np.ndarray]:
    """{step: toxicity matrix of `layer`} (default the primary layer) at the recorded snapshot steps
    (Fig. 3b-6b), optionally restricted to `steps`; `full` picks the full-size matrices."""
    layer = recording.layers[0] if layer is None else layer
    source = recording.full if full else recording.snapshots
    wanted = sorted(source) if steps is None else [s for s in steps if s in source]
    return {s: source[s][layer] for s in wanted}


def _fill(request: dict) -> str:
    """The request's prompt with the subject in place of "{}"."""
    return request["prompt"].replace("{}", request["subject"], 1)


def _match_fraction(model, tok, prompts: list[str], target: str, batch_size: int) -> float:
    from wilke_lib.generation import greedy_matches

    flags = greedy_matches(model, tok, prompts, [target] * len(prompts), batch_size=batch_size)
    return float(np.mean(flags)) if flags else float("nan")


def rollback_success(model: nn.Module, tok, record: dict, batch_size: int = 64) -> float:
    """ERS-like success of one rollback (Appendix B): the fraction of the record's rewrite +
    paraphrase prompts on which the current (rolled-back) model greedily answers target_true."""
    req = record["requested_rewrite"]
    prompts = [_fill(req)] + list(record.get("paraphrase_prompts", []))
    return _match_fraction(model, tok, prompts, req["target_true"]["str"], batch_size)


class ToxicityRecorder:
    """`on_step` callback of `run_lifelong` recording toxicity (Eq. 7) of W_proj at `layers`.

    Create it on the *original* model before the run (it keeps a copy of the
    original W_proj^l; resumed runs are still measured against the original).
    At each step it stores ||W||_F and ||W - W_0||_F per layer, the record's
    rollback success when `records` are given (see `rollback_success`), the
    step row's ES as edit success, and at `snapshot_steps` the toxicity matrix
    W - W_0 block-averaged to `size` x `size` (plus the full matrix if `keep_full`).
    """

    def __init__(self, model: nn.Module, tok, layers: int | Sequence[int], *,
                 records: Sequence[dict] | None = None, snapshot_steps: Sequence[int] = PAPER_SNAPSHOT_STEPS,
                 size: int = 64, keep_full: bool = False, batch_size: int = 64) -> None:
        self.model, self.tok = model, tok
        self.adapter = ModelAdapter(model)
        self.layers = [int(layers)] if isinstance(layers, int) else [int(l) for l in layers]
        self.original = {l: self.adapter.out_weight(l).detach().float().clone() for l in self.layers}
        self.original_norms = {l: float(torch.linalg.norm(w)) for l, w in self.original.items()}
        self.records = {r.get("case_id"): r for r in records} if records is not None else None
        self.snapshot_steps, self.size, self.keep_full = set(snapshot_steps), size, keep_full
        self.batch_size = batch_size
        self.rows: list[dict] = []
        self.snapshots: dict[int, dict[int, np.ndarray]] = {}
        self.full: dict[int, dict[int, np.ndarray]] = {}

    def toxicity(self, layer: int) -> torch.Tensor:
        """Accumulated toxicity W_proj^layer(now) - W_proj^layer(original), (d_model, d_mlp), float32."""
        return toxicity(self.adapter.out_weight(layer).float(), self.original[layer])

    @torch.no_grad()
    def __call__(self, step: int, row: dict | None = None) -> None:
        row = row or {}
        out: dict[str, Any] = {"step": int(step), "case_id": row.get("case_id"),
                               "failed": bool(row.get("failed", False)), "edit_success": row.get("ES"),
                               "error": row.get("error"), "rollback_error": row.get("rollback_error")}
        for l in self.layers:
            tox = self.toxicity(l)
            out[f"norm_{l}"] = float(torch.linalg.norm(self.adapter.out_weight(l).float()))
            out[f"toxicity_{l}"] = float(torch.linalg.norm(tox))
            if step in self.snapshot_steps:
                self.snapshots.setdefault(step, {})[l] = downsample(tox, self.size)
                if self.keep_full:
                    self.full.setdefault(step, {})[l] = tox.cpu().numpy()
        first = self.layers[0]
        out["norm"], out["toxicity_norm"] = out[f"norm_{first}"], out[f"toxicity_{first}"]
        record = (self.records or {}).get(out["case_id"])
        out["rollback_success"] = (rollback_success(self.model, self.tok, record, self.batch_size)
                                   if record is not None else float("nan"))
        self.rows.append(out)

    def result(self) -> ToxicityRecording:
        return ToxicityRecording(layers=list(self.layers), original_norms=dict(self.original_norms),
                                 table=pd.DataFrame(self.rows), snapshots=dict(self.snapshots),
                                 full=dict(self.full))


def _edit_layers(hparams: Any) -> list[int]:
    """The predefined editing layer(s) of ROME (`layer`) or MEMIT (`layers`)."""
    layers = getattr(hparams, "layers", None) or [getattr(hparams, "layer", None)]
    if layers[0] is None:
        raise ValueError("hparams have no predefined editing layer; pass layers=")
    return [int(l) for l in layers]


def _edit_success(model, tok, record: dict, batch_size: int) -> float:
    req = record["requested_rewrite"]
    return _match_fraction(model, tok, [_fill(req)], req["target_new"]["str"], batch_size)


def lifelong_rome_toxicity(model: nn.Module, tok, records: Sequence[dict], hparams: Any, *,
                           n_steps: int | None = None, snapshot_steps: Sequence[int] = PAPER_SNAPSHOT_STEPS,
                           layers: Sequence[int] | None = None, size: int = 64, keep_full: bool = False,
                           cache: Any = None, batch_size: int = 64, progress: bool = True) -> ToxicityRecording:
    """Sec. 4.1 experiment: edit + rollback each record in turn (Appendix F), recording toxicity.

    Edits `records[:n_steps]` (already filtered for known facts and shuffled by
    the caller) with the editor of `hparams` (ROME in the paper) at its
    predefined layer(s), rolling back after each edit, and records with a
    `ToxicityRecorder` (norms, rollback success, snapshots). A failed edit
    (`EditError`) leaves the weights unchanged and is marked `failed`.
    """
    from wilke_lib.editing import EditCache, EditError, edit, rollback

    layers = list(layers) if layers is not None else _edit_layers(hparams)
    cache = cache if cache is not None else EditCache.for_model(model)
    recorder = ToxicityRecorder(model, tok, layers, records=records, snapshot_steps=snapshot_steps,
                                size=size, keep_full=keep_full, batch_size=batch_size)
    chosen = list(records)[: n_steps or len(records)]
    for step, record in enumerate(tqdm(chosen, desc="edit + rollback", disable=not progress), start=1):
        request, row = record["requested_rewrite"], {"case_id": record.get("case_id")}
        try:
            result = edit(model, tok, request, hparams, cache=cache, keep_deltas=False)
        except EditError as err:  # weights unchanged by contract
            recorder(step, row | {"failed": True, "error": str(err)})
            continue
        row["ES"] = _edit_success(model, tok, record, batch_size)
        try:
            rollback(model, tok, request, hparams, result, cache=cache, keep_deltas=False)
        except EditError as err:  # the edited model carries on, as in `lifelong`
            row["rollback_error"] = str(err)
        recorder(step, row)
    return recorder.result()


# --------------------------------------------------------------------------- single edits per layer
def _single_layer_flash(model, tok, request, hparams, adapter, layer, with_rollback, cache) -> dict:
    """Edit (and roll back) `request` at `layer` only, measure norms, restore the layer exactly."""
    from wilke_lib.editing import EditError, edit, rollback

    original = adapter.out_weight(layer).clone()
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
        adapter.set_out_weight(layer, original)
    return out


def per_layer_flash(model: nn.Module, tok, request: dict, hparams: Any,
                    layers: Sequence[int] | None = None, *, with_rollback: bool = True,
                    cache: Any = None, progress: bool = False) -> pd.DataFrame:
    """Single ROME edit of `request` at each layer (Sec. 4.3, Fig. 7-8, 39-42).

    For each layer l: ||W_proj^l||_F originally (the red dashed line), after
    the edit at l (the blue solid line), after edit + rollback, and the norm of
    the toxicity (Eq. 7); also the editor's ||delta^l|| and ||k*^l|| when it
    reports them (ROME: the delta and activation strength of Appendix D). The layer is restored bit-exactly afterwards, so the
    model is unchanged on return. `hparams` are ROME's; the layer is forced with
    `editing.edit(..., layers=[l])`. Pass an `EditCache` to reuse statistics.
    """
    from wilke_lib.editing import EditCache

    adapter = ModelAdapter(model)
    cache = cache if cache is not None else EditCache.for_model(model)
    request = request.get("requested_rewrite", request)
    layers = range(adapter.n_layers) if layers is None else layers
    rows = [_single_layer_flash(model, tok, request, hparams, adapter, int(l), with_rollback, cache)
            for l in tqdm(list(layers), desc="per-layer edits", disable=not progress)]
    return pd.DataFrame(rows)
