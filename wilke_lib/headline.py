"""The book's headline figure (the first page, "Results at a glance"): S over the lifelong edits for ROME,
MEMIT and WilKE on each organism, beside the authors' curves for the paper's model it stands in for.

* `panel_data(model)` reads the paper-scale runs of `make runs` as chapter 3 does
  (`experiments.matrix_progress`: finished and unfinished runs as far as they are on disk, computing
  nothing) and the authors' curves (`experiments.paper_curves`, `wilke_lib/data/curves_reported.csv`).
  The organism's curve of an editor is the mean of S over the seeds whose run finished, at the checkpoints
  every one of them measured; an editor with no finished run is drawn from its unfinished run(s), up to the
  last checkpoint written, and says so.
* `headline_figure(panels)` draws one panel per organism (log-2 step axis, S in %), one colour per editor
  (the editor registry's), the organism solid, the paper dashed, an unfinished run dotted.
* `headline_frame(panels)` is the figure's data as one tidy table (the CSV beside it).
* `interactive_figure(panels)` is the same figure in plotly, with each point's value on hover;
  `interactive_html` embeds it in a page with plotly.js served from the book's _static/ (offline).

Only the plotting needs matplotlib (plotly for the interactive version); reading the runs imports `wilke_lib.experiments` (and torch) lazily.
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from wilke_lib import registry

EDITORS = ("ROME", "MEMIT", "WilKE", "WilKE (Eq. 10)")
"""The curves of the figure, by the tables' label: WilKE as released (the rule behind the paper's curves) and
WilKE with the paper's Eq. 10."""
PAPER_NAMES = {"gpt2-xl": "GPT2-XL", "gpt-j-6b": "GPT-J"}
MARKERS = {"ROME": "o", "MEMIT": "s", "WilKE": "^", "WilKE (Eq. 10)": "v"}
FIG_WIDTH = 9.0    # inches; shown at the book's column width (about 760 px at a 1,400 px window)
FIG_HEIGHT = 3.9
DPI = 150          # 1,350 px wide: less than twice the column, so 9-pt text reaches the reader at 10 px or more
STYLE = {"font.size": 10, "axes.titlesize": 11, "axes.labelsize": 10, "legend.fontsize": 9.5,
         "xtick.labelsize": 9.5, "ytick.labelsize": 9.5, "lines.linewidth": 1.6}


def colour(editor: str) -> str:
    """The editor's colour in every figure of the book (`registry.colour_of`; grey for anything unregistered)."""
    return registry.colour_of(editor) or "#7F7F7F"


@dataclass
class Panel:
    """One organism's curves.

    ours: editor, step, S (%), the mean over `seeds[editor]` (finished runs); per_seed: editor, seed, step,
    S (%) of those runs; unfinished: the same for the unfinished runs of the editors without a finished one;
    paper: editor, step, S (%) of the authors' mean curve; pending: editor -> its unfinished runs in words;
    sources: the run folders read."""

    model: str
    paper_model: str
    ours: pd.DataFrame
    unfinished: pd.DataFrame
    paper: pd.DataFrame
    per_seed: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=["editor", "seed", "step", "S"]))
    seeds: dict[str, list[int]] = field(default_factory=dict)
    pending: dict[str, str] = field(default_factory=dict)
    n_edits: int = 1024
    sources: list[str] = field(default_factory=list)

    @property
    def paper_name(self) -> str:
        return PAPER_NAMES.get(self.paper_model, self.paper_model)


def mean_over_seeds(curves: pd.DataFrame, metric: str = "S") -> pd.DataFrame:
    """Mean of `metric` (a fraction; returned in %) per editor and step over the seeds of `curves` (editor,
    seed, step, metric), at the steps that every seed of the editor measured; with the number of seeds."""
    rows = []
    for editor, frame in curves.groupby("editor", sort=False):
        n = frame["seed"].nunique()
        by_step = frame.groupby("step")[metric].agg(["mean", "count"])
        by_step = by_step[by_step["count"] == n]
        rows += [{"editor": editor, "step": int(step), metric: 100.0 * float(v), "seeds": n}
                 for step, v in by_step["mean"].items()]
    return pd.DataFrame(rows, columns=["editor", "step", metric, "seeds"])


def collapse_step(s: pd.Series, fraction_of_peak: float = 0.5) -> float:
    """The first step at which S (indexed by step) falls below `fraction_of_peak` of its best so far; NaN when
    it never does (`wilke_lib.claims.collapse_step`, the chapters' definition)."""
    from wilke_lib import claims

    return claims.collapse_step(s.sort_index(), fraction_of_peak)


def panel_data(model: str, profile: str = "paper", records: str = "toy-world",
               editors: Sequence[str] = EDITORS) -> Panel:
    """Read the organism's paper-scale runs of `editors` (labels) as far as they are on disk, and the paper's
    curves, computing nothing."""
    from wilke_lib import counterfact, experiments, profiles

    scale = profiles.get_profile(profile)
    names = tuple(n for n, label in experiments.EDITOR_LABELS.items() if label in editors)
    runs, _status = experiments.matrix_progress(model, counterfact.load_counterfact(records), scale, editors=names)
    done = experiments.finished_only(runs)
    empty = pd.DataFrame(columns=["editor", "seed", "step", "S"])
    finished = experiments.curves(done)[["editor", "seed", "step", "S"]] if done else empty
    ours = mean_over_seeds(finished)
    per_seed = finished.assign(S=lambda f: 100.0 * f["S"].astype(float)).reset_index(drop=True)
    seeds = {label: sorted(r.config.seed for r in rs) for label, rs in done.items()}
    open_runs = {label: [r for r in rs if not r.final] for label, rs in runs.items() if label not in done}
    open_runs = {label: rs for label, rs in open_runs.items() if rs}
    unfinished = experiments.curves(open_runs) if open_runs else empty
    unfinished = unfinished[["editor", "seed", "step", "S"]].assign(S=lambda f: 100.0 * f["S"].astype(float))
    pending = {label: ", ".join(f"seed {r.config.seed} at {len(r.steps):,} of {r.config.n_edits:,} edits" for r in rs)
               for label, rs in open_runs.items()}
    paper = experiments.paper_curves(model)
    paper = paper[paper["editor"].isin(editors)].assign(S=lambda f: 100.0 * f["S"].astype(float))
    sources = sorted({str(r.run_dir.relative_to(r.run_dir.parents[1])) for rs in runs.values() for r in rs})
    return Panel(model=model, paper_model=experiments.PAPER_MODEL.get(model, model), ours=ours,
                 unfinished=unfinished.reset_index(drop=True), paper=paper[["editor", "step", "S"]].reset_index(drop=True),
                 per_seed=per_seed, seeds=seeds, pending=pending, n_edits=scale.n_edits, sources=sources)


def headline_frame(panels: Sequence[Panel]) -> pd.DataFrame:
    """The figure's numbers: model, curve (organism mean / unfinished run / paper), editor, seeds, step, S (%)."""
    frames = []
    for p in panels:
        frames.append(p.ours.assign(model=p.model, curve="organism, mean over finished seeds",
                                    seeds=[" ".join(map(str, p.seeds.get(e, []))) for e in p.ours["editor"]]))
        if len(p.unfinished):
            frames.append(p.unfinished.assign(model=p.model, curve="organism, unfinished run",
                                              seeds=p.unfinished["seed"].astype(str)))
        frames.append(p.paper.assign(model=p.paper_name, curve="paper (authors' mean of 3 runs)", seeds=""))
    columns = ["model", "curve", "editor", "seeds", "step", "S"]
    return pd.concat([f[columns] for f in frames if len(f)], ignore_index=True) if frames else pd.DataFrame(columns=columns)


def _log2_axis(ax, n_edits: int) -> None:
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator

    ax.set_xscale("log", base=2)
    ticks = [2 ** i for i in range(0, int(math.log2(max(2, n_edits))) + 1, 2)]
    ax.xaxis.set_major_locator(FixedLocator(ticks))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:,.0f}"))
    ax.set_xlim(0.8, n_edits * 1.25)


def headline_figure(panels: Sequence[Panel], editors: Sequence[str] = EDITORS):
    """Two panels (one per organism) of S (%) against the editing step: the organism solid (mean over its
    finished seeds), an unfinished run dotted, the paper's model dashed; one colour per editor."""
    import matplotlib as mpl
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    with mpl.rc_context(STYLE):
        fig = Figure(figsize=(FIG_WIDTH, FIG_HEIGHT), layout="constrained")
        axes = fig.subplots(1, max(1, len(panels)), sharey=True, squeeze=False)[0]
        shown: list[str] = []
        for ax, p in zip(axes, panels):
            for editor in editors:
                c, m = colour(editor), MARKERS.get(editor, "o")
                mine = p.ours[p.ours["editor"] == editor].sort_values("step")
                if len(mine):
                    ax.plot(mine["step"], mine["S"], "-", color=c, marker=m, ms=4, mfc="none", mew=1.1)
                for _seed, run in p.unfinished[p.unfinished["editor"] == editor].groupby("seed"):
                    run = run.sort_values("step")
                    ax.plot(run["step"], run["S"], ":", color=c, marker=m, ms=4, mfc="none", mew=1.1)
                theirs = p.paper[p.paper["editor"] == editor].sort_values("step")
                if len(theirs):
                    ax.plot(theirs["step"], theirs["S"], "--", color=c, lw=1.4)
                if (len(mine) or len(theirs) or (p.unfinished["editor"] == editor).any()) and editor not in shown:
                    shown.append(editor)
            ax.axvline(64, color="0.55", ls=(0, (1, 3)), lw=0.9)
            ax.set_title(f"{p.model} (solid) beside {p.paper_name} (dashed)")
            ax.set_xlabel("lifelong edits (log scale)")
            ax.set_ylim(0, 100)
            _log2_axis(ax, p.n_edits)
            ax.grid(True, color="0.9", lw=0.6)
        axes[0].set_ylabel("S (%)")
        handles = [Line2D([], [], color=colour(e), marker=MARKERS.get(e, "o"), mfc="none", lw=2, label=e)
                   for e in shown]
        handles += [Line2D([], [], color="0.3", ls="-", label="organism: mean of finished seeds"),
                    Line2D([], [], color="0.3", ls="--", label="paper (authors' curves)")]
        if any(len(p.unfinished) for p in panels):
            handles.append(Line2D([], [], color="0.3", ls=":", label="organism: unfinished run"))
        fig.legend(handles=handles, loc="outside lower center", ncols=min(len(handles), 4), frameon=False)
    return fig


def collapse_summary(panels: Sequence[Panel], editor: str = "ROME") -> dict[str, tuple[list[float], float]]:
    """{model: (the collapse step of `editor` in each finished seed, the collapse step of the paper's curve)}
    (`collapse_step`), for the models where `editor` has a finished run."""
    out = {}
    for p in panels:
        runs = p.per_seed[p.per_seed["editor"] == editor]
        if runs.empty:
            continue
        mine = [collapse_step(run.groupby("step")["S"].mean()) for _seed, run in runs.groupby("seed")]
        theirs = p.paper[p.paper["editor"] == editor].set_index("step")["S"]
        out[p.model] = (mine, collapse_step(theirs) if len(theirs) else math.nan)
    return out


PLOTLY_JS = "plotly.min.js"
"""plotly.js, copied from the installed plotly package into the book's _static/ (`copy_plotly_js`): the
interactive figure needs no network."""
PLOTLY_SYMBOLS = {"o": "circle-open", "s": "square-open", "^": "triangle-up-open", "v": "triangle-down-open"}


def _hover(editor: str, where: str, step, s, extra: str = "") -> str:
    return f"<b>{editor}</b> on {where}<br>step {int(step):,}: S {s:.1f}%{extra}"


def interactive_figure(panels: Sequence[Panel], editors: Sequence[str] = EDITORS):
    """`headline_figure` with plotly: the same panels, colours, markers and line styles, each point's value on
    hover (an organism's mean lists its seeds' values), editors switched on and off from the legend."""
    from plotly.subplots import make_subplots
    import plotly.graph_objects as go

    fig = make_subplots(rows=1, cols=max(1, len(panels)), shared_yaxes=True, horizontal_spacing=0.04,
                        subplot_titles=[f"{p.model} (solid) beside {p.paper_name} (dashed)" for p in panels])
    for col, p in enumerate(panels, start=1):
        for editor in editors:
            line = {"color": colour(editor), "width": 2}
            marker = {"symbol": PLOTLY_SYMBOLS[MARKERS.get(editor, "o")], "size": 7}
            common = {"legendgroup": editor, "showlegend": False, "hoverinfo": "text"}
            mine = p.ours[p.ours["editor"] == editor].sort_values("step")
            if len(mine):
                seeds = p.per_seed[p.per_seed["editor"] == editor]
                text = []
                for step, s in zip(mine["step"], mine["S"]):
                    at = seeds[seeds["step"] == step].sort_values("seed")
                    values = ", ".join(f"{v:.1f} (seed {k})" for k, v in zip(at["seed"], at["S"]))
                    text.append(_hover(editor, p.model, step, s, f"<br>mean of {len(at)} seed(s): {values}"))
                fig.add_trace(go.Scatter(x=mine["step"], y=mine["S"], mode="lines+markers", name=editor, line=line,
                                         marker=marker, text=text, **common), row=1, col=col)
            for seed, run in p.unfinished[p.unfinished["editor"] == editor].groupby("seed"):
                run = run.sort_values("step")
                fig.add_trace(go.Scatter(x=run["step"], y=run["S"], mode="lines+markers", name=editor,
                                         line={**line, "dash": "dot"}, marker=marker, **common,
                                         text=[_hover(editor, p.model, a, b, f"<br>unfinished run, seed {seed}")
                                               for a, b in zip(run["step"], run["S"])]), row=1, col=col)
            theirs = p.paper[p.paper["editor"] == editor].sort_values("step")
            if len(theirs):
                fig.add_trace(go.Scatter(x=theirs["step"], y=theirs["S"], mode="lines", name=editor,
                                         line={**line, "dash": "dash", "width": 1.6}, **common,
                                         text=[_hover(editor, p.paper_name, a, b, "<br>the authors' curve")
                                               for a, b in zip(theirs["step"], theirs["S"])]), row=1, col=col)
        ticks = [2 ** i for i in range(0, int(math.log2(max(2, p.n_edits))) + 1, 2)]
        fig.update_xaxes(type="log", tickvals=ticks, ticktext=[f"{t:,}" for t in ticks], title="lifelong edits (log scale)",
                         range=[math.log10(0.8), math.log10(p.n_edits * 1.25)], row=1, col=col)
        fig.add_vline(x=64, line={"color": "#8C8C8C", "dash": "dot", "width": 1}, row=1, col=col)
    shown = [t.name for t in fig.data]
    for editor in dict.fromkeys(shown):  # one legend entry per editor, which toggles all its curves
        first = next(t for t in fig.data if t.name == editor)
        first.showlegend = True
    fig.update_yaxes(range=[0, 100], title="S (%)", row=1, col=1)
    fig.update_layout(template="simple_white", height=440, margin={"l": 60, "r": 10, "t": 60, "b": 40},
                      hovermode="closest", font={"size": 13},
                      legend={"orientation": "h", "y": -0.22, "x": 0.5, "xanchor": "center"})
    return fig


def interactive_html(panels: Sequence[Panel], div_id: str, plotly_js: str) -> str:
    """The interactive figure as one raw-HTML block for a MyST page (no blank line, so Markdown leaves it
    alone): a div of class "wilke-interactive", plotly.js from `plotly_js` (a path relative to the page) and
    the figure as JSON. A figure drawn in a closed dropdown is resized when the dropdown opens."""
    spec = interactive_figure(panels).to_json()
    config = json.dumps({"displaylogo": False, "responsive": True,
                         "modeBarButtonsToRemove": ["select2d", "lasso2d"]})
    return (f'<div id="{div_id}" class="wilke-interactive" style="width:100%;height:440px"></div>\n'
            f'<script src="{plotly_js}"></script>\n'
            f"<script>(function () {{ const el = document.getElementById('{div_id}'); const fig = {spec};\n"
            f"Plotly.newPlot(el, fig.data, fig.layout, {config});\n"
            "const box = el.closest('details'); if (box) box.addEventListener('toggle', () => Plotly.Plots.resize(el));\n"
            "})();</script>")


def copy_plotly_js(static_dir) -> None:
    """Copy the installed plotly's plotly.min.js into `static_dir` (a book's _static/) unless it is there."""
    import plotly

    target = Path(static_dir) / PLOTLY_JS
    if not target.is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(Path(plotly.__file__).parent / "package_data" / PLOTLY_JS, target)
