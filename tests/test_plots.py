"""The book's figures as a reader sees them: drawn for the column (at most `plots.MAX_WIDTH` inches, so that the
756-px column shows them at half their natural width or more), heatmaps whose every panel shows its pattern, and
legends that speak for every panel of a figure."""
from __future__ import annotations

import io

import numpy as np
import pandas as pd
from PIL import Image

from wilke_lib import present
from wilke_lib.analysis import plots, toxicity

COLUMN_PX = 756  # the book's column at 1,400 px (scripts/check_site.py)


def _png_width(fig) -> int:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=present.DPI, bbox_inches="tight")
    return Image.open(io.BytesIO(buffer.getvalue())).size[0]


def _metrics(editors, value=lambda editor, step, metric: 0.5 / step) -> pd.DataFrame:
    return pd.DataFrame([{"step": s, "editor": e, "seed": 9, **{m: value(e, s, m) for m in plots.METRIC_ORDER}}
                         for s in (1, 2, 4, 8, 16) for e in editors])


def _recording(layers=(2, 3, 4, 5), steps=20) -> toxicity.ToxicityRecording:
    table = pd.DataFrame({"step": np.arange(1, steps + 1), "case_id": np.arange(steps)})
    for layer in layers:
        table[f"norm_{layer}"] = 10.0 + 0.1 * table["step"]
    return toxicity.ToxicityRecording(layers=list(layers), original_norms={l: 10.0 for l in layers}, table=table,
                                      snapshots={})


def test_the_wide_figures_fit_the_column():
    editors = ["FT", "KE", "KN", "MEND", "ROME", "r-ROME", "MEMIT", "AlphaEdit", "COMEBA-HK", "LEMoE", "WilKE"]
    rng = np.random.default_rng(0)
    traced = pd.DataFrame({"kind": rng.choice(["person", "place", "product"], 60),
                           "subject_state_recovery": rng.uniform(0, 1, 60), "causal_peak": rng.integers(0, 12, 60),
                           "subject_specific_peak": rng.integers(-1, 12, 60)})
    consecutive = pd.DataFrame([{"editor": e, "batch size": b, "edits": n, "efficacy": 0.5, "locality": 0.5, "kept": 0.5}
                                for b in (1, 10, 100) for e in ("ROME", "MEMIT", "WilKE") for n in (100, 1000)])
    ablation = pd.DataFrame([{"step": s, "variant": v, "S": 0.5 / s} for s in (1, 2, 4) for v in ("full", "w/o delta")])
    figures = {
        "lifelong_metrics": plots.lifelong_metrics_figure(_metrics(editors)),
        "heatmaps": plots.toxicity_heatmaps_figure({2 ** k: rng.normal(size=(64, 64)) for k in range(1, 11)},
                                                   title="accumulated toxicity"),
        "storage_depth": plots.storage_depth_figure(traced, 12),
        "memit_norms": plots.recording_norms_figure(_recording()),
        "consecutive": plots.consecutive_figure(consecutive),
        "ablation_panels": plots.ablation_panels_figure({"score eq10": ablation, "score update_norm": ablation}),
        "layer_flash": plots.layer_flash_figure({f"case {i}": pd.DataFrame({"layer": [0, 1], "norm_original": [1, 1],
                                                                            "norm_edited": [1, 2]}) for i in range(4)}),
    }
    for name, fig in figures.items():
        assert fig.get_figwidth() <= plots.MAX_WIDTH + 1e-9, name
        width = _png_width(fig)
        assert width <= 2 * COLUMN_PX, (name, width)  # text drawn at 9 pt reaches the reader at 9 px or more


def test_every_heatmap_panel_has_its_own_scale_so_the_first_steps_are_not_blank():
    rng = np.random.default_rng(1)
    snapshots = {step: step * rng.normal(size=(8, 8)) for step in (2, 4, 512, 1024)}  # grows 500-fold
    fig = plots.toxicity_heatmaps_figure(snapshots)
    panels = [ax for ax in fig.axes if ax.images and ax.get_title().startswith("step")]
    assert len(panels) == 4
    for ax, step in zip(panels, sorted(snapshots)):
        shown = ax.images[0].get_array()
        assert np.isclose(np.abs(shown).max(), 1.0)  # the panel's largest entry at the end of the scale
        assert ax.get_title() == f"step {step}: ±{np.abs(snapshots[step]).max():.3g}"
    shared = plots.toxicity_heatmaps_figure(snapshots, scale="shared")
    first = [ax for ax in shared.axes if ax.images][0].images[0]
    assert first.get_clim()[1] == np.abs(snapshots[1024]).max()  # on one scale, step 2 is a hundredth of it
    zero = plots.toxicity_heatmaps_figure({1: np.zeros((4, 4)), 2: np.ones((4, 4))})
    assert [ax.get_title() for ax in zero.axes if ax.images][0] == "step 1: no change"


def test_a_legend_names_a_curve_equal_to_another_only_when_it_is_equal_on_every_panel():
    def value(editor, step, metric):  # LEMoE equals FT on ES only
        return 1.0 if metric == "ES" else {"FT": 0.8, "LEMoE": 0.9, "ROME": 0.5 / step}[editor]

    fig = plots.lifelong_metrics_figure(_metrics(["FT", "LEMoE", "ROME"], value))
    labels = [t.get_text() for t in fig.legends[0].get_texts()]
    assert labels == ["FT", "LEMoE", "ROME"]
    same = plots.lifelong_metrics_figure(_metrics(["FT", "LEMoE", "ROME"], lambda e, s, m: 0.5 if e != "ROME" else 0.1))
    assert [t.get_text() for t in same.legends[0].get_texts()] == ["FT", "LEMoE (= FT)", "ROME"]
