"""Matplotlib figures shared by the notebooks (Hu et al. 2024 and Meng et al. 2022a figure styles).

Every function returns a `matplotlib.figure.Figure` built without pyplot, so a notebook shows it
once (`wilke_lib.present.Page.figure` saves and captions it). Presentation rules of the book:
fonts legible at the page's width (`STYLE`), figures at most `MAX_WIDTH` inches wide (the book shows a
figure at its column's 756 px, 721 px in a dropdown: at 150 dpi a wider one would reach the reader at under half its
size, its 9-pt text below 9 px), integer ticks on layer axes, curves that cannot
hide one another (each curve its own marker and line style, hollow markers of decreasing size; a
curve equal to an earlier one on every panel of the figure says so in the legend), and one colour per editor in every figure, its
colour in the editor registry (`wilke_lib.registry`; other curves beside editors take `SPARE_COLOURS`). `*_data` functions return the numbers a
figure shows as a tidy table, for the CSV beside it.

This module is longer than the project's 420 lines: every figure of the book is drawn here, with one style (`_styled`)
and shared helpers (`_curves`, `_grid`), so that the chapters look alike.
"""

from __future__ import annotations

import functools
import math
import textwrap
from typing import Mapping, Sequence

import matplotlib as mpl
import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, MaxNLocator

from wilke_lib import registry

TRACE_CMAPS = {"hidden": "Purples", "mlp": "Greens", "attn": "Reds"}
TRACE_TITLES = {"hidden": "single restored layer", "mlp": "restored MLP window", "attn": "restored attention window"}
METRIC_ORDER = ("ES", "PS", "NS", "ERS", "ORS", "S")
STYLE = {"font.size": 10, "axes.titlesize": 11, "axes.labelsize": 10, "legend.fontsize": 9,
         "xtick.labelsize": 9, "ytick.labelsize": 9, "figure.titlesize": 12, "lines.linewidth": 1.4}
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "<", ">", "h")
LINESTYLES = ("-", "--", "-.", ":")
MAX_WIDTH = 9.3
"""Inches: the widest figure of the book (about 1,400 px at 150 dpi, less than twice the column it is shown in:
756 px, 721 px inside a dropdown)."""
SPARE_COLOURS = ("#7F7F7F", "#9467BD", "#BCBD22", "#E377C2", "#2CA02C")
"""Colours of curves that are not an editor of the registry (ROME fixed at a layer) drawn beside editors:
none of them is an editor's."""


def _styled(function):
    """Build the figure with the book's font sizes (rcParams are read when artists are created)."""
    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        with mpl.rc_context(STYLE):
            return function(*args, **kwargs)
    return wrapper


def _grid(n: int, ncols: int, size: tuple[float, float] = (3.4, 2.8)) -> tuple[Figure, list]:
    """A figure with n axes in rows of `ncols` (unused cells hidden), `size` inches each, the panels narrowed
    so that the figure is at most `MAX_WIDTH` wide."""
    ncols = max(1, min(ncols, n))
    nrows = math.ceil(n / ncols)
    fig = Figure(figsize=(min(size[0] * ncols, MAX_WIDTH), size[1] * nrows), layout="constrained")
    axes = np.atleast_1d(fig.subplots(nrows, ncols, squeeze=False)).ravel().tolist()
    for ax in axes[n:]:
        ax.set_visible(False)
    return fig, axes[:n]


def integer_layers(ax, axis: str = "x") -> None:
    """Layer numbers are integers: no tick at 2.5."""
    (ax.xaxis if axis == "x" else ax.yaxis).set_major_locator(MaxNLocator(integer=True))


def _log2_steps(ax) -> None:
    """Editing steps on a log-2 axis, labelled 1, 2, 4, ... rather than 2^0, 2^1, ..."""
    ax.set_xscale("log", base=2)
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))


def _series_style(i: int, n: int) -> dict:
    """Marker, line style and size of the i-th of n curves on one axes (hollow markers, the first
    largest, so that equal curves stay visible on top of one another)."""
    return {"marker": MARKERS[i % len(MARKERS)], "ls": LINESTYLES[i % len(LINESTYLES)],
            "ms": max(3.5, 8.5 - 1.2 * i) if n > 1 else 5, "mfc": "none", "mew": 1.2}


# --------------------------------------------------------------------------- toxicity (Sec. 4)
@_styled
def norm_trajectory_figure(traj: pd.DataFrame, *, snapshot_steps: Sequence[int] = (), logy: bool = False,
                           title: str | None = None) -> Figure:
    """Fig. 3a-6a: ||W_proj||_F of the predefined layer over steps (blue solid) vs original (red dashed).

    `traj` has columns step, norm, original_norm (`toxicity.norm_trajectory`,
    or a `ToxicityRecording.table` with an `original_norm` column added).
    """
    fig = Figure(figsize=(6.4, 3.4), layout="constrained")
    ax = fig.subplots()
    ax.plot(traj["step"], traj["norm"], "b-", label="actual")
    ax.plot(traj["step"], traj["original_norm"], "r--", label="original")
    for step in snapshot_steps:
        ax.axvline(step, color="0.8", lw=0.6, zorder=0)
    ax.set(xlabel="editing step", ylabel=r"$\|W_{proj}\|_2$ (Frobenius)", title=title or "")
    integer_layers(ax)
    if logy:
        ax.set_yscale("log")
    ax.legend()
    return fig


def _magnitude(value: float) -> str:
    """A panel's largest |entry| in its title: three significant digits."""
    return f"{value:.3g}" if value >= 1e-3 else f"{value:.1e}"


@_styled
def toxicity_heatmaps_figure(snapshots: Mapping[int, np.ndarray], *, ncols: int = 5, cmap: str = "RdBu_r",
                             title: str | None = None, scale: str = "panel") -> Figure:
    """Fig. 3b-6b: accumulated toxicity W* - W at the given steps, on a symmetric red-blue scale.

    `snapshots` maps step -> (downsampled) toxicity matrix of one layer. scale "panel" (the default): each
    panel is divided by its own largest |entry|, written in its title ("step 64: ±2.31"), so that the pattern of
    every step shows; the toxicity grows by orders of magnitude over the steps, and on one shared scale the early
    panels are blank (their size is in the norm figure beside it). scale "shared": one scale for all panels, in
    the toxicity's units.
    """
    if scale not in ("panel", "shared"):
        raise ValueError(f"scale {scale!r}: 'panel' or 'shared'")
    steps = sorted(snapshots)
    fig, axes = _grid(len(steps), ncols, (1.9, 1.75))
    shared = max(float(np.abs(snapshots[s]).max()) for s in steps) or 1.0
    for ax, step in zip(axes, steps):
        matrix = np.asarray(snapshots[step], dtype=float)
        peak = float(np.abs(matrix).max())
        if scale == "panel":
            image = ax.imshow(matrix / (peak or 1.0), cmap=cmap, vmin=-1, vmax=1, aspect="auto")
            ax.set_title(f"step {step}: ±{_magnitude(peak)}" if peak else f"step {step}: no change", fontsize=10)
        else:
            image = ax.imshow(matrix, cmap=cmap, vmin=-shared, vmax=shared, aspect="auto")
            ax.set_title(f"step {step}", fontsize=10)
        ax.set(xticks=[], yticks=[])
    fig.colorbar(image, ax=axes, shrink=0.8,
                 label="toxicity / the panel's largest |entry|" if scale == "panel" else "toxicity")
    if title:
        fig.suptitle(title)
    return fig


def heatmaps_data(snapshots: Mapping[int, np.ndarray]) -> pd.DataFrame:
    """The matrices of `toxicity_heatmaps_figure`, one row per (step, matrix row), columns c0, c1, ..."""
    frames = []
    for step in sorted(snapshots):
        matrix = np.asarray(snapshots[step])
        frame = pd.DataFrame(matrix, columns=[f"c{j}" for j in range(matrix.shape[1])])
        frame.insert(0, "row", np.arange(matrix.shape[0]))
        frame.insert(0, "step", step)
        frames.append(frame)
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


@_styled
def layer_flash_figure(tables: pd.DataFrame | Mapping[str, pd.DataFrame], *, predefined_layer: int | None = None,
                       ncols: int = 4, show_rollback: bool = False, logy: bool = False) -> Figure:
    """Fig. 7-8, 39-42: ||W_proj^l|| originally (red dashed) and after a single edit at l (blue solid).

    `tables`: one `toxicity.per_layer_flash` table, or {case label: table}.
    """
    tables = {"": tables} if isinstance(tables, pd.DataFrame) else dict(tables)
    fig, axes = _grid(len(tables), ncols)
    for ax, (label, df) in zip(axes, tables.items()):
        ax.plot(df["layer"], df["norm_edited"], "b-", marker="o", ms=4, label="after edit")
        ax.plot(df["layer"], df["norm_original"], "r--", label="original")
        if show_rollback:
            ax.plot(df["layer"], df["norm_rolled_back"], "g:", marker="x", ms=4, label="after edit + rollback")
        if predefined_layer is not None:
            ax.axvline(predefined_layer, color="0.4", lw=0.9, ls=":", label=f"predefined layer {predefined_layer}")
        ax.set(xlabel="edited layer", ylabel=r"$\|W_{proj}^l\|$", title=str(label))
        integer_layers(ax)
        if logy:
            ax.set_yscale("log")
    axes[0].legend()
    return fig


# --------------------------------------------------------------------------- causal tracing
def _trace_axes(ax, result, fig: Figure, show_tokens: bool = True) -> None:
    """One causal-trace heatmap (Meng et al. 2022a, Fig. 1 style): tokens x layers, subject tokens starred."""
    b, e = result.subject_range
    labels = [f"{t!r}*" if b <= i < e else repr(t) for i, t in enumerate(result.tokens)]
    image = ax.pcolor(result.scores, cmap=TRACE_CMAPS.get(result.kind, "viridis"), vmin=result.low_score)
    ax.invert_yaxis()
    ax.set_yticks(np.arange(len(labels)) + 0.5, labels if show_tokens else [])
    n_layers = result.scores.shape[1]
    step = max(1, math.ceil(n_layers / 8))
    ax.set_xticks(np.arange(0, n_layers, step) + 0.5, np.arange(0, n_layers, step))
    ax.set(xlabel="layer", title=TRACE_TITLES.get(result.kind, result.kind))
    fig.colorbar(image, ax=ax, label=f"p({result.target.strip()})", shrink=0.9)


@_styled
def causal_trace_figure(results: Mapping[str, object], *, title: str | None = None) -> Figure:
    """Three heatmaps (hidden / MLP / attention) of `causal_trace.trace_all_kinds` (Appendix A, Fig. 10-25),
    the tokens named once, on the left."""
    items = list(results.values())
    n_tokens = max((len(r.tokens) for r in items), default=1)
    fig, axes = _grid(len(items), 3, (MAX_WIDTH / 3, 0.3 * n_tokens + 1.6))
    for i, (ax, result) in enumerate(zip(axes, items)):
        _trace_axes(ax, result, fig, show_tokens=(i % 3 == 0))
    if title:  # wrapped: a title wider than the panels would widen the saved figure past the column
        fig.suptitle(textwrap.fill(title, 90))
    return fig


def causal_trace_data(results: Mapping[str, object]) -> pd.DataFrame:
    """The scores of `causal_trace_figure`: kind, token position, token, subject?, layer, p(target)."""
    rows = []
    for result in results.values():
        b, e = result.subject_range
        for t, token in enumerate(result.tokens):
            for layer, score in enumerate(np.asarray(result.scores)[t]):
                rows.append({"kind": result.kind, "position": t, "token": token, "subject_token": b <= t < e,
                             "layer": layer, "p_target": float(score), "p_corrupted": float(result.low_score),
                             "p_clean": float(result.high_score)})
    return pd.DataFrame(rows)


@_styled
def aie_figure(aies: Mapping[str, object] | Sequence[object], *, title: str | None = None) -> Figure:
    """AIE per layer at the last subject token (Meng et al. 2022a, Fig. 2), one curve per kind."""
    items = list(aies.values()) if isinstance(aies, Mapping) else list(aies)
    fig = Figure(figsize=(6.4, 3.4), layout="constrained")
    ax = fig.subplots()
    colours = {"hidden": "purple", "mlp": "green", "attn": "red"}
    for i, res in enumerate(items):
        ax.plot(np.arange(len(res.aie)), res.aie, color=colours.get(res.kind), **_series_style(i, len(items)),
                label=f"{res.kind} (peak at layer {res.peak_layer})")
    ax.set(xlabel="layer", ylabel="average indirect effect", title=title or "")
    integer_layers(ax)
    ax.legend()
    return fig


def aie_data(aies: Mapping[str, object] | Sequence[object]) -> pd.DataFrame:
    """The curves of `aie_figure`: layer, kind, average indirect effect."""
    items = list(aies.values()) if isinstance(aies, Mapping) else list(aies)
    return pd.DataFrame([{"kind": r.kind, "layer": layer, "aie": float(v)}
                         for r in items for layer, v in enumerate(np.asarray(r.aie))])


@_styled
def storage_depth_figure(traced: pd.DataFrame, n_layers: int, *, title: str | None = None) -> Figure:
    """Where an organism keeps its facts (`analysis.organism_report.traced_frame`): left, the share of the
    clean-vs-corrupted gap recovered by restoring the last subject token's hidden state at its best
    layer; middle, the layer whose MLP at that token recovers most, per subject kind; right (when the
    frame has it), the layer where the subject's own MLP value recovers most beyond a same-token
    impostor's."""
    specific = "subject_specific_peak" in traced and bool((traced["subject_specific_peak"] >= 0).any())
    fig = Figure(figsize=(MAX_WIDTH if specific else 8.0, 3.3), layout="constrained")
    axes = fig.subplots(1, 3 if specific else 2)
    left = axes[0]
    kinds = sorted(traced["kind"].unique())
    left.hist([traced.loc[traced["kind"] == k, "subject_state_recovery"].clip(-0.2, 1.2) for k in kinds],
              bins=np.linspace(-0.2, 1.2, 15), stacked=True, label=kinds)
    left.axvline(float(traced["subject_state_recovery"].median()), color="k", ls="--", lw=1,
                 label=f"median {traced['subject_state_recovery'].median():.2f}")
    left.set(xlabel="share of the gap recovered\nat the last subject token", ylabel="records")
    left.legend()
    panels = [("causal_peak", "layer of the largest MLP effect\n(per record)")]
    if specific:
        panels.append(("subject_specific_peak", "layer of the largest effect\nbeyond an impostor's"))
    colours = {k: f"C{i}" for i, k in enumerate(kinds)}
    for ax, (column, label) in zip(axes[1:], panels):
        shown = traced[traced[column] >= 0]
        counts = (shown.groupby([column, "kind"]).size().unstack(fill_value=0).reindex(range(n_layers), fill_value=0))
        bottom = np.zeros(n_layers)
        for kind in counts.columns:
            ax.bar(counts.index, counts[kind], bottom=bottom, label=kind, color=colours[kind])
            bottom += counts[kind].to_numpy()
        ax.set(xlabel=label, ylabel="records")
        integer_layers(ax)
    if title:
        fig.suptitle(title)
    return fig


# --------------------------------------------------------------------------- strength (App. D)
@_styled
def strength_figure(flash: Mapping[str, Sequence[float]], normal: Mapping[str, Sequence[float]] | None = None, *,
                    ylabel: str = r"$\|\sigma(x W_{fc}^l)\|_2$", log: bool = True,
                    predefined_layer: int | None = None, title: str | None = None,
                    flash_label: str = "flash", normal_label: str = "normal") -> Figure:
    """Fig. 31-38: activation or delta strength per layer, the flash group (red) vs normal records (blue).

    The values of each record are a sequence over layers 0, 1, ... or a Series indexed by layer.
    `flash_label` names the red group in the legend (e.g. "largest jumps" when no record was flagged)."""
    fig = Figure(figsize=(6.4, 3.6), layout="constrained")
    ax = fig.subplots()
    for group, colour, name, marker in ((flash, "tab:red", flash_label, "o"),
                                        (normal or {}, "tab:blue", normal_label, "s")):
        for i, values in enumerate(group.values()):
            x = values.index if isinstance(values, pd.Series) else np.arange(len(values))  # Series: by layer
            ax.plot(x, np.asarray(values, dtype=float), color=colour, alpha=0.75, lw=1, marker=marker, ms=3.5,
                    mfc="none", label=name if i == 0 else None)
    if predefined_layer is not None:
        ax.axvline(predefined_layer, color="0.4", ls=":", lw=0.9, label=f"predefined layer {predefined_layer}")
    if log:
        ax.set_yscale("log")
    ax.set(xlabel="layer", ylabel=ylabel, title=title or "")
    integer_layers(ax)
    ax.legend()
    return fig


def strength_data(flash: Mapping, normal: Mapping | None = None, *, value: str = "value",
                  flash_label: str = "flash", normal_label: str = "normal") -> pd.DataFrame:
    """The curves of `strength_figure`: group, record, layer, value."""
    rows = []
    for group, label in ((flash, flash_label), (normal or {}, normal_label)):
        for record, values in group.items():
            x = values.index if isinstance(values, pd.Series) else np.arange(len(values))
            rows += [{"group": label, "record": record, "layer": int(layer), value: float(v)}
                     for layer, v in zip(x, np.asarray(values, dtype=float))]
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------- lifelong curves
def _curve_colours(names: Sequence, order: Sequence[str] | None) -> dict:
    """{group: colour} of the curves of one axes: an editor of the registry (by its label) has its colour;
    beside editors, the other groups take `SPARE_COLOURS` in turn; with no editor among them, `C<i>` of
    their place in `order` (None without `order`: matplotlib's cycle)."""
    everyone = list(order) if order is not None else list(names)
    if not any(registry.colour_of(str(name)) for name in everyone):
        return {name: f"C{everyone.index(name) % 10}" if order is not None else None for name in names}
    others = [name for name in everyone if not registry.colour_of(str(name))]
    return {name: registry.colour_of(str(name)) or SPARE_COLOURS[others.index(name) % len(SPARE_COLOURS)]
            for name in names}


def _same_curve(a: pd.Series, b: pd.Series) -> bool:
    """Two mean curves (indexed by step) with the same steps and values (to 1e-9)."""
    return len(a) == len(b) and bool((a.index.to_numpy() == b.index.to_numpy()).all()) and bool(
        np.allclose(a.to_numpy(), b.to_numpy(), rtol=0, atol=1e-9))


def _identical_curves(panels: Sequence[tuple[pd.DataFrame, str]], group: str, x: str = "step",
                      order: Sequence[str] | None = None) -> dict[str, str]:
    """{group: the earlier group it equals} over the panels of one figure (`panels`: (frame, y column) each): a
    group is named equal to another only when both are drawn on the same panels and their mean curves agree on
    every one of them. A figure's legend speaks for all its panels, so two editors that agree on ES but not on
    S are not "equal"."""
    names = list(order) if order is not None else list(dict.fromkeys(n for df, _ in panels for n in df[group]))
    means = [{name: sub.groupby(x)[y].mean().sort_index() for name, sub in df.groupby(group, sort=False)}
             for df, y in panels]
    same: dict[str, str] = {}
    for i, name in enumerate(names):
        for other in names[:i]:
            if other in same or not any(name in m for m in means):
                continue
            if all((name in m) == (other in m) for m in means) and all(
                    _same_curve(m[name], m[other]) for m in means if name in m):
                same[name] = other
                break
    return same


def _curves(ax, df: pd.DataFrame, y: str, group: str, x: str = "step", order: Sequence[str] | None = None,
            same_as: Mapping[str, str] | None = None) -> None:
    """Mean over seeds of `y` vs `x` per `group`, with a min-max band when there are several seeds.
    Each group has its own marker and line style; a curve equal to an earlier one is named so (on this
    axes, or, with `same_as` from `_identical_curves`, on every panel of the figure); an editor
    has its colour of the registry (`_curve_colours`). With `order` (every group of the figure), a group
    keeps its colour and marker on every axes that shows it, whichever groups an axes lacks."""
    groups = list(df.groupby(group, sort=False))
    if order is not None:
        groups.sort(key=lambda item: list(order).index(item[0]))
    colours = _curve_colours([name for name, _ in groups], order)
    drawn: list[tuple[str, pd.DataFrame]] = []
    for k, (name, sub) in enumerate(groups):
        i, n = (list(order).index(name), len(order)) if order is not None else (k, len(groups))
        stats = sub.groupby(x)[y].agg(["mean", "min", "max"]).reset_index()
        if same_as is not None:
            same = same_as.get(str(name))
        else:
            same = next((other for other, s in drawn if _same_curve(s.set_index(x)["mean"], stats.set_index(x)["mean"])),
                        None)
        label = f"{name} (= {same})" if same else str(name)
        colour = {"color": colours[name]} if colours[name] is not None else {}
        line, = ax.plot(stats[x], stats["mean"], label=label, **_series_style(i, n), **colour)
        if (stats["max"] > stats["min"]).any():
            ax.fill_between(stats[x], stats["min"], stats["max"], color=line.get_color(), alpha=0.15)
        drawn.append((str(name), stats))


@_styled
def lifelong_metrics_figure(df: pd.DataFrame, *, metrics: Sequence[str] = METRIC_ORDER, group: str = "editor",
                            ncols: int = 3, logx: bool = True, percent: bool = True,
                            title: str | None = None) -> Figure:
    """Fig. 43: each metric over editing steps (checkpoints), one curve per editor.

    `df`: a long table with columns step, `group` and the metrics (e.g. the
    runs' `checkpoints` tables concatenated with an `editor` column; several
    seeds are averaged, their range shaded). The legend is drawn once, under the panels; it names a curve
    equal to another only when they agree on every panel.
    """
    fig, axes = _grid(len(metrics), ncols, (3.25, 2.6))
    scale = 100.0 if percent else 1.0
    data = df.assign(**{m: df[m] * scale for m in metrics})
    same = _identical_curves([(data, m) for m in metrics], group)
    for ax, metric in zip(axes, metrics):
        _curves(ax, data, metric, group, same_as=same)
        ax.set(xlabel="editing step", ylabel=f"{metric}{' (%)' if percent else ''}", title=metric)
        if logx:
            _log2_steps(ax)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncols=min(len(labels), 4))
    if title:
        fig.suptitle(title)
    return fig


@_styled
def beside_paper_figure(ours: pd.DataFrame, paper: pd.DataFrame, *, model_name: str, paper_model: str,
                        editors: Sequence[str] = ("ROME", "MEMIT", "WilKE", "WilKE (Eq. 10)"),
                        metric: str = "S") -> Figure:
    """Fig. 43 side by side: `metric` (in %) over the editing steps for each editor, the paper's model
    (its authors' mean curve, `paper`) on the left and this model (mean over its seeds, range shaded,
    `ours`) on the right, on the same axes; a dotted line at step 64, where ROME collapses on both
    paper models."""
    fig, axes = _grid(2, 2, (4.2, 3.0))
    order = [e for e in editors if e in set(ours["editor"]) | set(paper["editor"])]
    parts = [df[df["editor"].isin(order)] for df in (paper, ours)]
    parts = [part.assign(**{metric: part[metric] * 100.0}) for part in parts]
    same = _identical_curves([(part, metric) for part in parts], "editor", order=order)
    for ax, part, title in ((axes[0], parts[0], f"paper: {paper_model}"), (axes[1], parts[1], model_name)):
        _curves(ax, part, metric, "editor", order=order, same_as=same)
        ax.axvline(64, color="0.6", ls=":", lw=0.9)
        ax.set(xlabel="editing step", ylabel=f"{metric} (%)", title=title, ylim=(0, 100))
        _log2_steps(ax)
    legend = {}
    for ax in axes:  # every editor drawn in either panel, once
        for handle, label in zip(*ax.get_legend_handles_labels()):
            legend.setdefault(label, handle)
    fig.legend(list(legend.values()), list(legend), loc="outside lower center", ncols=min(len(legend), 4))
    return fig


@_styled
def score_norm_figure(df: pd.DataFrame) -> Figure:
    """WilKE's score of the layer it edited against that layer's ||W_proj|| after the step, one panel per
    rule (`experiments.score_against_norm`), log-log, coloured by the step."""
    editors = list(dict.fromkeys(df["editor"]))
    fig, axes = _grid(max(1, len(editors)), max(1, len(editors)), (4.0, 3.2))
    for ax, editor in zip(axes, editors):
        part = df[(df["editor"] == editor) & (df["score"] > 0) & (df["weight norm"] > 0)]
        points = ax.scatter(part["weight norm"], part["score"], c=part["step"], s=6, cmap="viridis",
                            norm=mpl.colors.LogNorm(vmin=1, vmax=max(2, int(df["step"].max()))))
        ax.set(xscale="log", yscale="log", xlabel="||W_proj|| of the edited layer", ylabel="its layer score",
               title=editor)
        ax.xaxis.set_minor_formatter(mpl.ticker.NullFormatter())  # minor labels collide on a short log range
    if editors:
        fig.colorbar(points, ax=axes, label="editing step", shrink=0.85)
    return fig


@_styled
def ladder_figure(points: pd.DataFrame, fit: Mapping[str, float], paper_widths: Mapping[str, int],
                  target: int = 64) -> Figure:
    """Collapse step against MLP width on log-log axes: one point per rung and seed (`points`: d_mlp,
    collapse step and, optionally, the rung's world: one marker per world), the fitted power law when there is
    one, and the paper's models at their widths with ROME's collapse there (`target`)."""
    fig, axes = _grid(1, 1, (5.2, 3.6))
    ax = axes[0]
    worlds = list(dict.fromkeys(points["world"])) if "world" in points else [None]
    for world, marker in zip(worlds, "oDv^"):
        sub = points if world is None else points[points["world"] == world]
        if len(sub):
            ax.plot(sub["d_mlp"], sub["collapse step"], marker, color="C0", alpha=0.7, mfc="none" if marker != "o" else None,
                    label=f"organisms{', ' + world if world else ''} (one per seed)")
    if math.isfinite(fit.get("slope", math.nan)):
        xs = np.geomspace(min(points["d_mlp"]), max(paper_widths.values()), 50)
        ax.plot(xs, np.exp(fit["intercept"]) * xs ** fit["slope"], "-", color="C0", lw=1,
                label=f"fit: slope {fit['slope']:.2f} [{fit['ci_low']:.2f}, {fit['ci_high']:.2f}]")
    for i, (name, width) in enumerate(paper_widths.items()):
        ax.plot([width], [target], "s", color=f"C{i + 1}", label=f"{name} (authors' curves)")
    ax.axhline(target, color="0.6", ls=":", lw=0.9)
    ax.set(xscale="log", yscale="log", xlabel="MLP width d_mlp", ylabel="ROME's collapse step")
    ax.legend()
    return fig


def _width_colour(d_mlp: int) -> str:
    """One colour per MLP width of the ladder (48: C0, 96: C1, 192: C2, ...), the same in every figure."""
    return f"C{max(0, round(math.log2(d_mlp / 48))) % 10}"


@_styled
def ladder_curves_figure(curves: pd.DataFrame, paper: pd.DataFrame, target: int = 64) -> Figure:
    """The shape of ROME's decline on each rung: S (in %) over the lifelong edits (log-2 axis), one line per rung
    (the mean over the seeds measured at each checkpoint; `curves`: name, d_mlp, step, S), beside the authors' ROME
    curves (`paper`: model, step, mean S in [0, 1], thick grey) with ROME's collapse step there (`target`)."""
    fig, axes = _grid(1, 1, (7.4, 3.4))
    ax = axes[0]
    for i, (model, sub) in enumerate(paper.groupby("model", sort=False)):
        sub = sub.sort_values("step")
        ax.plot(sub["step"], 100 * sub["mean"], color="0.55", lw=2.4, ls=LINESTYLES[i % len(LINESTYLES)],
                label=f"{model}, authors' ROME")
    names = list(dict.fromkeys(curves.sort_values(["world", "d_mlp"])["name"]))
    for i, name in enumerate(names):
        sub = curves[curves["name"] == name].groupby("step", as_index=False)["S"].mean()
        rung = curves[curves["name"] == name]
        seeds = rung["seed"].nunique()
        style = _series_style(i, len(names)) | ({"marker": "D"} if "heavy" in rung["world"].iloc[0] else {})
        ax.plot(sub["step"], sub["S"], color=_width_colour(rung["d_mlp"].iloc[0]),
                label=f"{name} ({seeds} seed{'s' if seeds > 1 else ''})", **style)
    ax.axvline(target, color="0.6", ls=":", lw=0.9)
    ax.set(xlabel="editing step", ylabel="ROME's S (%)", ylim=(0, 100))
    _log2_steps(ax)
    ax.legend(fontsize="small", ncols=2)
    return fig


@_styled
def spread_lifespan_figure(rows: pd.DataFrame, *, top_share_target: float = 0.6, relaxed: float = 0.85,
                           window: tuple[int, int] = (32, 128)) -> Figure:
    """Spread against lifespan: each rung's share of causal peaks at its most common layer against ROME's collapse
    step (log axis; `rows`: one per rung and collapsed seed, `ladder.spread_and_lifespan`), small markers per seed and
    a large one at the median once every seed has finished, with the spread target, tier 3's relaxed one and the
    window of collapse steps the rule accepts."""
    fig, axes = _grid(1, 1, (5.6, 3.4))
    ax = axes[0]
    ax.axvspan(*window, color="0.92", label=f"collapse steps the rule accepts ({window[0]}-{window[1]})")
    ax.axhline(top_share_target, color="0.2", ls="--", lw=1, label=f"spread target (share <= {top_share_target:g})")
    ax.axhline(relaxed, color="0.2", ls=":", lw=1, label=f"tier 3's relaxed target (<= {relaxed:g})")
    for name, sub in rows.groupby("name", sort=False):
        marker = "D" if "heavy" in sub["world"].iloc[0] else "o"
        share, colour = sub["top peak share"].iloc[0], _width_colour(sub["d_mlp"].iloc[0])
        ax.plot(sub["collapse step"], [share] * len(sub), marker, color=colour, ms=5, mfc="none", alpha=0.8)
        median = sub["median collapse"].iloc[0]
        if np.isfinite(median):
            ax.plot([median], [share], marker, color=colour, ms=10)
        ax.annotate(name.removeprefix("toy-gpt2-"), (sub["collapse step"].max(), share), textcoords="offset points",
                    xytext=(6, 3), fontsize=8)
    ax.set(xscale="log", xlabel="ROME's collapse step (small: a seed; large: the median)",
           ylabel="share of causal peaks at one layer", ylim=(0, 1.05))
    ax.legend(fontsize="small", loc="lower right")
    return fig


@_styled
def consecutive_figure(curves: pd.DataFrame, *, metrics: Sequence[str] = ("efficacy", "locality", "kept"),
                       percent: bool = True) -> Figure:
    """Consecutive batch editing: each measure over the number of edits so far (log-2 axis), one row of
    panels per measure and one column per batch size, one curve per editor."""
    sizes = sorted(curves["batch size"].unique())
    editors = list(dict.fromkeys(curves["editor"]))
    fig, axes = _grid(len(metrics) * len(sizes), len(sizes), (3.2, 2.5))
    scale = 100.0 if percent else 1.0
    panels = [(curves[curves["batch size"] == b].assign(**{metric: curves.loc[curves["batch size"] == b, metric] * scale}),
               metric) for metric in metrics for b in sizes]
    same = _identical_curves(panels, "editor", x="edits", order=editors)
    for r, metric in enumerate(metrics):
        for c, b in enumerate(sizes):
            ax = axes[r * len(sizes) + c]
            sub, _ = panels[r * len(sizes) + c]
            _curves(ax, sub, metric, "editor", x="edits", order=editors, same_as=same)
            ax.set(xlabel="edits so far", ylabel=f"{metric}{' (%)' if percent else ''}", title=f"{metric}, batches of {b}")
            _log2_steps(ax)
    legend = {label: handle for ax in axes for handle, label in zip(*ax.get_legend_handles_labels())}
    labels = sorted(legend, key=lambda label: editors.index(label.split(" (= ")[0]))
    fig.legend([legend[label] for label in labels], labels, loc="outside lower center", ncols=min(len(labels), 6))
    return fig


@_styled
def ablation_figure(df: pd.DataFrame, *, metric: str = "S", group: str = "variant", logx: bool = True,
                    percent: bool = True, title: str | None = None) -> Figure:
    """Fig. 9: the score over editing steps for WilKE and its ablations (one curve per `group`)."""
    fig = Figure(figsize=(6.4, 3.8), layout="constrained")
    ax = fig.subplots()
    scale = 100.0 if percent else 1.0
    _curves(ax, df.assign(**{metric: df[metric] * scale}), metric, group)
    ax.set(xlabel="editing step", ylabel=f"{metric}{' (%)' if percent else ''}", title=title or "")
    if logx:
        _log2_steps(ax)
    ax.legend()
    return fig


@_styled
def ablation_panels_figure(parts: Mapping[str, pd.DataFrame], *, metric: str = "S", group: str = "variant",
                           logx: bool = True, percent: bool = True, title: str | None = None) -> Figure:
    """Fig. 9 for several layer scores side by side: one panel per entry of `parts` ({panel title: the
    `ablation_figure` frame of one score}), the same axes, a variant in the same colour and marker on every
    panel. Each panel has its own legend, which names a curve equal to another on that panel."""
    parts = {name: df for name, df in parts.items() if len(df)}
    order = list(dict.fromkeys(v for df in parts.values() for v in df[group]))
    fig, axes = _grid(max(1, len(parts)), max(1, len(parts)), (4.8, 3.5))
    scale = 100.0 if percent else 1.0
    for ax, (name, df) in zip(axes, parts.items()):
        _curves(ax, df.assign(**{metric: df[metric] * scale}), metric, group, order=order)
        ax.set(xlabel="editing step", ylabel=f"{metric}{' (%)' if percent else ''}", title=name)
        if logx:
            _log2_steps(ax)
        ax.legend()
    if title:
        fig.suptitle(title)
    return fig


@_styled
def recording_norms_figure(recording, layers: Sequence[int] | None = None, *, flash_steps: Sequence[int] = (),
                           ncols: int = 3, logy: bool = False, title: str | None = None,
                           flash_label: str = "flagged as flash") -> Figure:
    """Fig. 3a-6a (one layer) / 26a-30a (MEMIT, one panel per layer): ||W_proj^l||_F after each step of
    a `toxicity.ToxicityRecording` (blue solid) vs the original norm (red dashed); `flash_steps` are
    marked with red crosses (and named `flash_label` in the legend only when there are some)."""
    layers = list(recording.layers) if layers is None else list(layers)
    fig, axes = _grid(len(layers), ncols, (4.4, 3.0) if len(layers) > 1 else (7.6, 3.1))
    table = recording.table.sort_values("step")
    marked = table[table["step"].isin(list(flash_steps))]
    for ax, layer in zip(axes, layers):
        original = recording.original_norms[layer]  # step 0: the unedited model
        ax.plot([0, *table["step"]], [original, *table[f"norm_{layer}"]], "b-", marker="o", ms=3, label="actual")
        ax.axhline(original, color="r", ls="--", label="original")
        if len(marked):
            ax.plot(marked["step"], marked[f"norm_{layer}"], "rx", ms=8, mew=2, label=flash_label)
        ax.set(xlabel="editing step", ylabel=r"$\|W_{proj}\|$ (Frobenius)",
               title=f"layer {layer}" if len(layers) > 1 else "")
        integer_layers(ax)
        if logy:
            ax.set_yscale("log")
    axes[0].legend()
    if title:
        fig.suptitle(title)
    return fig


def recording_norms_data(recording, layers: Sequence[int] | None = None) -> pd.DataFrame:
    """The curves of `recording_norms_figure`: step (0: unedited), then per layer its norm and the
    original norm."""
    layers = list(recording.layers) if layers is None else list(layers)
    table = recording.table.sort_values("step")
    out = pd.DataFrame({"step": [0, *table["step"].astype(int)]})
    if "case_id" in table:
        out["case_id"] = [None, *table["case_id"]]
    for layer in layers:
        out[f"norm_layer{layer}"] = [recording.original_norms[layer], *table[f"norm_{layer}"]]
        out[f"original_norm_layer{layer}"] = recording.original_norms[layer]
    return out
