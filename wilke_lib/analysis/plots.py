"""Matplotlib figures shared by the notebooks (Hu et al. 2024 and Meng et al. 2022a figure styles).

Every function returns a `matplotlib.figure.Figure` built without pyplot, so a
notebook shows it once (as the cell's value) and `book.save_figure` can save it.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

TRACE_CMAPS = {"hidden": "Purples", "mlp": "Greens", "attn": "Reds"}
TRACE_TITLES = {"hidden": "single restored layer", "mlp": "restored MLP window", "attn": "restored attention window"}
METRIC_ORDER = ("ES", "PS", "NS", "ERS", "ORS", "S")


def _grid(n: int, ncols: int, size: tuple[float, float] = (3.2, 2.6)) -> tuple[Figure, list]:
    """A figure with n axes in rows of `ncols` (unused cells hidden)."""
    ncols = max(1, min(ncols, n))
    nrows = math.ceil(n / ncols)
    fig = Figure(figsize=(size[0] * ncols, size[1] * nrows), layout="constrained")
    axes = np.atleast_1d(fig.subplots(nrows, ncols, squeeze=False)).ravel().tolist()
    for ax in axes[n:]:
        ax.set_visible(False)
    return fig, axes[:n]


# --------------------------------------------------------------------------- toxicity (Sec. 4)
def norm_trajectory_figure(traj: pd.DataFrame, *, snapshot_steps: Sequence[int] = (), logy: bool = False,
                           title: str | None = None) -> Figure:
    """Fig. 3a-6a: ||W_proj||_F of the predefined layer over steps (blue solid) vs original (red dashed).

    `traj` has columns step, norm, original_norm (`toxicity.norm_trajectory`,
    or a `ToxicityRecording.table` with an `original_norm` column added).
    """
    fig = Figure(figsize=(6, 3.2), layout="constrained")
    ax = fig.subplots()
    ax.plot(traj["step"], traj["norm"], "b-", label="actual")
    ax.plot(traj["step"], traj["original_norm"], "r--", label="original")
    for step in snapshot_steps:
        ax.axvline(step, color="0.8", lw=0.6, zorder=0)
    ax.set(xlabel="editing step", ylabel=r"$\|W_{proj}\|_2$ (Frobenius)", title=title or "")
    if logy:
        ax.set_yscale("log")
    ax.legend()
    return fig


def toxicity_heatmaps_figure(snapshots: Mapping[int, np.ndarray], *, ncols: int = 5, cmap: str = "RdBu_r",
                             title: str | None = None) -> Figure:
    """Fig. 3b-6b: accumulated toxicity W* - W at the given steps, one shared symmetric colour scale.

    `snapshots` maps step -> (downsampled) toxicity matrix of one layer.
    """
    steps = sorted(snapshots)
    fig, axes = _grid(len(steps), ncols, (2.4, 2.4))
    vmax = max(float(np.abs(snapshots[s]).max()) for s in steps) or 1.0
    for ax, step in zip(axes, steps):
        image = ax.imshow(snapshots[step], cmap=cmap, vmin=-vmax, vmax=vmax, aspect="auto")
        ax.set(title=f"step {step}", xticks=[], yticks=[])
    fig.colorbar(image, ax=axes, shrink=0.8, label="toxicity")
    if title:
        fig.suptitle(title)
    return fig


def layer_flash_figure(tables: pd.DataFrame | Mapping[str, pd.DataFrame], *, predefined_layer: int | None = None,
                       ncols: int = 4, show_rollback: bool = False, logy: bool = False) -> Figure:
    """Fig. 7-8, 39-42: ||W_proj^l|| originally (red dashed) and after a single edit at l (blue solid).

    `tables`: one `toxicity.per_layer_flash` table, or {case label: table}.
    """
    tables = {"": tables} if isinstance(tables, pd.DataFrame) else dict(tables)
    fig, axes = _grid(len(tables), ncols)
    for ax, (label, df) in zip(axes, tables.items()):
        ax.plot(df["layer"], df["norm_edited"], "b-", marker=".", label="after edit")
        ax.plot(df["layer"], df["norm_original"], "r--", label="original")
        if show_rollback:
            ax.plot(df["layer"], df["norm_rolled_back"], "g:", label="after edit + rollback")
        if predefined_layer is not None:
            ax.axvline(predefined_layer, color="0.6", lw=0.8, ls=":")
        ax.set(xlabel="layer", ylabel="L2 norm", title=str(label))
        if logy:
            ax.set_yscale("log")
    axes[0].legend(fontsize="small")
    return fig


# --------------------------------------------------------------------------- causal tracing
def _trace_axes(ax, result, fig: Figure) -> None:
    """One causal-trace heatmap (Meng et al. 2022a, Fig. 1 style): tokens x layers, subject tokens starred."""
    b, e = result.subject_range
    labels = [f"{t!r}*" if b <= i < e else repr(t) for i, t in enumerate(result.tokens)]
    image = ax.pcolor(result.scores, cmap=TRACE_CMAPS.get(result.kind, "viridis"), vmin=result.low_score)
    ax.invert_yaxis()
    ax.set_yticks(np.arange(len(labels)) + 0.5, labels, fontsize="small")
    ax.set_xticks(np.arange(0, result.scores.shape[1], max(1, result.scores.shape[1] // 8)) + 0.5,
                  np.arange(0, result.scores.shape[1], max(1, result.scores.shape[1] // 8)))
    ax.set(xlabel="layer", title=TRACE_TITLES.get(result.kind, result.kind))
    fig.colorbar(image, ax=ax, label=f"p({result.target.strip()})")


def causal_trace_figure(results: Mapping[str, object], *, title: str | None = None) -> Figure:
    """Three heatmaps (hidden / MLP / attention) of `causal_trace.trace_all_kinds` (Appendix A, Fig. 10-25)."""
    fig, axes = _grid(len(results), 3, (4.2, 3.2))
    for ax, result in zip(axes, results.values()):
        _trace_axes(ax, result, fig)
    if title:
        fig.suptitle(title)
    return fig


def aie_figure(aies: Mapping[str, object] | Sequence[object], *, title: str | None = None) -> Figure:
    """AIE per layer at the last subject token (Meng et al. 2022a, Fig. 2), one curve per kind."""
    items = list(aies.values()) if isinstance(aies, Mapping) else list(aies)
    fig = Figure(figsize=(6, 3.2), layout="constrained")
    ax = fig.subplots()
    colours = {"hidden": "purple", "mlp": "green", "attn": "red"}
    for res in items:
        ax.plot(np.arange(len(res.aie)), res.aie, color=colours.get(res.kind), marker=".",
                label=f"{res.kind} (peak {res.peak_layer})")
    ax.set(xlabel="layer", ylabel="average indirect effect", title=title or "")
    ax.legend()
    return fig


# --------------------------------------------------------------------------- strength (App. D)
def strength_figure(flash: Mapping[str, Sequence[float]], normal: Mapping[str, Sequence[float]] | None = None, *,
                    ylabel: str = r"$\|\sigma(x W_{fc}^l)\|_2$", log: bool = True,
                    predefined_layer: int | None = None, title: str | None = None) -> Figure:
    """Fig. 31-38: activation or delta strength per layer, flash records (red) vs normal ones (blue).

    The values of each record are a sequence over layers 0, 1, ... or a Series indexed by layer."""
    fig = Figure(figsize=(6, 3.4), layout="constrained")
    ax = fig.subplots()
    for group, colour, name in ((flash, "tab:red", "flash"), (normal or {}, "tab:blue", "normal")):
        for i, values in enumerate(group.values()):
            x = values.index if isinstance(values, pd.Series) else np.arange(len(values))  # Series: by layer
            ax.plot(x, np.asarray(values, dtype=float), color=colour, alpha=0.7, lw=1, marker=".", ms=3,
                    label=name if i == 0 else None)
    if predefined_layer is not None:
        ax.axvline(predefined_layer, color="0.5", ls=":", lw=0.8)
    if log:
        ax.set_yscale("log")
    ax.set(xlabel="layer", ylabel=ylabel, title=title or "")
    ax.legend()
    return fig


# --------------------------------------------------------------------------- lifelong curves
def _curves(ax, df: pd.DataFrame, y: str, group: str, x: str = "step") -> None:
    """Mean over seeds of `y` vs `x` per `group`, with a min-max band when there are several seeds."""
    for name, sub in df.groupby(group, sort=False):
        stats = sub.groupby(x)[y].agg(["mean", "min", "max"]).reset_index()
        line, = ax.plot(stats[x], stats["mean"], marker=".", label=str(name))
        if (stats["max"] > stats["min"]).any():
            ax.fill_between(stats[x], stats["min"], stats["max"], color=line.get_color(), alpha=0.15)


def lifelong_metrics_figure(df: pd.DataFrame, *, metrics: Sequence[str] = METRIC_ORDER, group: str = "editor",
                            ncols: int = 3, logx: bool = True, percent: bool = True,
                            title: str | None = None) -> Figure:
    """Fig. 43: each metric over editing steps (checkpoints), one curve per editor.

    `df`: a long table with columns step, `group` and the metrics (e.g. the
    runs' `checkpoints` tables concatenated with an `editor` column; several
    seeds are averaged, their range shaded).
    """
    fig, axes = _grid(len(metrics), ncols)
    scale = 100.0 if percent else 1.0
    data = df.assign(**{m: df[m] * scale for m in metrics})
    for ax, metric in zip(axes, metrics):
        _curves(ax, data, metric, group)
        ax.set(xlabel="editing step", ylabel=f"{metric}{' (%)' if percent else ''}", title=metric)
        if logx:
            ax.set_xscale("log", base=2)
    axes[0].legend(fontsize="small")
    if title:
        fig.suptitle(title)
    return fig


def ablation_figure(df: pd.DataFrame, *, metric: str = "S", group: str = "variant", logx: bool = True,
                    percent: bool = True, title: str | None = None) -> Figure:
    """Fig. 9: the score over editing steps for WilKE and its ablations (one curve per `group`)."""
    fig = Figure(figsize=(6, 3.4), layout="constrained")
    ax = fig.subplots()
    scale = 100.0 if percent else 1.0
    _curves(ax, df.assign(**{metric: df[metric] * scale}), metric, group)
    ax.set(xlabel="editing step", ylabel=f"{metric}{' (%)' if percent else ''}", title=title or "")
    if logx:
        ax.set_xscale("log", base=2)
    ax.legend()
    return fig


def recording_norms_figure(recording, layers: Sequence[int] | None = None, *, flash_steps: Sequence[int] = (),
                           ncols: int = 3, logy: bool = False, title: str | None = None) -> Figure:
    """Fig. 3a-6a (one layer) / 26a-30a (MEMIT, one panel per layer): ||W_proj^l||_F after each step of
    a `toxicity.ToxicityRecording` (blue solid) vs the original norm (red dashed); `flash_steps` are
    marked with red crosses."""
    layers = list(recording.layers) if layers is None else list(layers)
    fig, axes = _grid(len(layers), ncols, (4.2, 2.8) if len(layers) > 1 else (6, 3.2))
    table = recording.table.sort_values("step")
    marked = table[table["step"].isin(list(flash_steps))]
    for ax, layer in zip(axes, layers):
        original = recording.original_norms[layer]  # step 0: the unedited model
        ax.plot([0, *table["step"]], [original, *table[f"norm_{layer}"]], "b-", label="actual")
        ax.axhline(original, color="r", ls="--", label="original")
        if len(marked):
            ax.plot(marked["step"], marked[f"norm_{layer}"], "rx", ms=8, mew=2, label="flash")
        ax.set(xlabel="editing step", ylabel=r"$\|W_{proj}\|$ (Frobenius)",
               title=f"layer {layer}" if len(layers) > 1 else "")
        if logy:
            ax.set_yscale("log")
    axes[0].legend(fontsize="small")
    if title:
        fig.suptitle(title)
    return fig
