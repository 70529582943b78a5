"""The paper's lifelong experiments as data: Table 1, the curves of Fig. 43 and the ablation of
Fig. 9 (Hu et al. 2024, Sec. 6 and Appendix F), run with `wilke_lib.lifelong` and compared with the
numbers the paper reports (`wilke_lib/data/table1_reported.csv`, `curves_reported.csv`).

This module is longer than the project's 420 lines: every table the lifelong chapters read (runs to frames, collapse steps
beside the paper's, layer choices and their controls, the consecutive runs) is here, one function each, so
that the notebooks stay thin."""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from wilke_lib import counterfact, editing, generation, lifelong, metrics, models, registry
from wilke_lib import hparams as hparams_lib
from wilke_lib.editors import wilke
from wilke_lib.errors import EditError
from wilke_lib.lifelong import consecutive
from wilke_lib.profiles import Profile
from wilke_lib.reported import paper_curves as reported_curves, paper_table1 as reported_table1

# The paper's model each organism stands in for.
PAPER_MODEL = {"toy-gpt2": "gpt2-xl", "toy-gptj": "gpt-j-6b", "gpt2-xl": "gpt2-xl",
               "gpt-j-6b": "gpt-j-6b", "EleutherAI/gpt-j-6b": "gpt-j-6b"}
EDITOR_LABELS: dict[str, str] = {spec.name: spec.label for spec in registry.SPECS}
"""The tables' editor names -> their labels (`wilke_lib.registry`)."""
# editor names of the tables that are another editor with other settings: name -> (editor, overrides).
# "wilke" is WilKE as released, whose layer rule gave the paper's Table 1 and Fig. 43: the candidate layer
# with the smallest ||dW|| / ||W|| of ROME's update; "wilke-eq10" is the rule the paper's text writes (Eq. 10);
# "r-rome" is ROME with the update of Gupta et al. 2024, "Rebuilding ROME".
DERIVED_EDITORS: dict[str, tuple[str, dict]] = {spec.name: (spec.editor, spec.settings())
                                                for spec in registry.SPECS if spec.overrides}


def editor_label(editor: str, hparams=None) -> str:
    """The table label of a run of `editor` with `hparams` (`registry.table_name`): WilKE's Eq. 10 rule is
    "WilKE (Eq. 10)", the released rule "WilKE"."""
    name = registry.table_name(editor, hparams)
    return EDITOR_LABELS.get(name, name)


@dataclass(frozen=True)
class EditorVariant:
    """An editor with hyper-parameter overrides on top of its file for the model."""

    label: str
    editor: str
    overrides: dict = field(default_factory=dict)
    name: str = ""  # the table's editor name ("r-rome"), when the variant is one

    def hparams(self, model_name: str):
        base = hparams_lib.load_hparams(self.editor, model_name)
        return dataclasses.replace(base, **self.overrides) if self.overrides else base


def editor_variant(name: str) -> EditorVariant:
    """The variant of a table's editor name ("rome", "r-rome", ...)."""
    editor, overrides = DERIVED_EDITORS.get(name, (name, {}))
    return EditorVariant(EDITOR_LABELS.get(name, name), editor, dict(overrides), name)


def editor_variants(editors: tuple[str, ...]) -> list[EditorVariant]:
    return [editor_variant(e) for e in editors]


def ablation_variants(scores: tuple[str, ...] = ("eq10", "update_norm")) -> list[EditorVariant]:
    """Fig. 9: full WilKE and WilKE without delta, without sigma(x W_fc), without ||W_proj||_2,
    for each layer score."""
    dropped = {"full": {}, "w/o delta": {"use_delta": False},
               "w/o activation": {"use_activation": False},
               "w/o ||W_proj||": {"use_weight_norm": False}}
    return [EditorVariant(f"WilKE {score} {name}", "wilke", {"score": score, **switches})
            for score in scores for name, switches in dropped.items()]


def run_config(model_name: str, variant: EditorVariant, n_edits: int, seed: int, profile: Profile,
               out_dir: Path | None = None) -> lifelong.LifelongConfig:
    """The lifelong run of one variant and seed, as the book's chapters and `make runs` configure it
    (the same configuration is the same run: computed once, read back afterwards)."""
    return lifelong.LifelongConfig(
        model_name=model_name, editor=variant.editor, hparams=variant.hparams(model_name), n_edits=int(n_edits),
        seed=int(seed), checkpoints=profile.checkpoints, out_dir=str(out_dir or lifelong.lifelong_dir(model_name)),
        eval_batch_size=profile.eval_batch_size)


def run_variants(model_name: str, records: list[dict], variants: list[EditorVariant],
                 profile: Profile, out_dir: Path | None = None) -> dict[str, list[lifelong.RunResult]]:
    """Every variant for its seeds in the profile; finished runs are read back."""
    configs, labels = [], []
    for v in variants:
        for seed in profile.seeds_for(v.name or v.editor):
            configs.append(run_config(model_name, v, profile.n_edits, seed, profile, out_dir))
            labels.append(v.label)
    runs = lifelong.run_many(models.load_model, records, configs)
    grouped: dict[str, list[lifelong.RunResult]] = {}
    for label, run in zip(labels, runs):
        grouped.setdefault(label, []).append(run)
    return grouped


def matrix_progress(model_name: str, records: list[dict], profile: Profile,
                    editors: tuple[str, ...] | None = None) -> tuple[dict[str, list[lifelong.RunResult]], pd.DataFrame]:
    """The runs of a profile's matrix (`make runs`: every editor with `Profile.seeds_for` its seeds) as far
    as they are on disk, computing nothing: ({label: runs, finished or unfinished}, one status row per
    run: editor, seed, steps written, n_edits, status). Runs not started are in the status table only."""
    cells = [(v, seed) for v in editor_variants(tuple(editors or profile.editors))
             for seed in profile.seeds_for(v.name or v.editor)]
    return _progress(model_name, records, profile, cells, profile.n_edits)


def ablation_progress(model_name: str, records: list[dict], profile: Profile,
                      scores: tuple[str, ...] = ("eq10", "update_norm")
                      ) -> tuple[dict[str, list[lifelong.RunResult]], pd.DataFrame]:
    """The ablation runs of a profile (`make runs RUNS_ARGS=--ablation`: every variant of
    `ablation_variants` with `profile.ablation_n_edits` edits and the first seed) as far as they are on
    disk, computing nothing; as `matrix_progress`."""
    cells = [(v, profile.seeds[0]) for v in ablation_variants(scores)]
    return _progress(model_name, records, profile, cells, profile.ablation_n_edits)


def _progress(model_name: str, records: list[dict], profile: Profile, cells: list[tuple[EditorVariant, int]],
              n_edits: int) -> tuple[dict[str, list[lifelong.RunResult]], pd.DataFrame]:
    grouped: dict[str, list[lifelong.RunResult]] = {}
    rows = []
    fp = lifelong.records_fingerprint(records)
    for v, seed in cells:
        run = lifelong.read_progress(fp, run_config(model_name, v, n_edits, seed, profile))
        done = 0 if run is None else len(run.steps)
        rows.append({"editor": v.label, "seed": seed, "steps": done, "n_edits": n_edits,
                     "status": "not started" if run is None else
                     ("finished" if run.final else f"unfinished ({done} of {n_edits} steps)")})
        if run is not None and len(run.checkpoints):
            grouped.setdefault(v.label, []).append(run)
    return grouped, pd.DataFrame(rows)


def consecutive_progress(model_name: str, records: list[dict], profile: Profile
                         ) -> tuple[list[lifelong.RunResult], pd.DataFrame]:
    """The consecutive-batch runs of a profile (chapter 12) as far as they are on disk, computing nothing:
    (the runs that have started, one status row per run: editor, batch size, batches done, status;
    an editor that edits one request at a time has one run, at the smallest batch size)."""
    fp = lifelong.records_fingerprint(records)
    found, rows = [], []
    for config in consecutive.matrix([model_name], profile.consecutive_editors, profile.consecutive_batch_sizes,
                                     profile.consecutive_n_edits, profile.seeds[0]):
        run = consecutive.read_progress(fp, config)
        n_batches = len(config.batch_ends())
        rows.append({"editor": editor_label(config.editor, config.hparams), "batch size": config.batch_size,
                     "batches": 0 if run is None else len(run.steps), "of": n_batches,
                     "status": "not started" if run is None else ("finished" if run.final else "unfinished")})
        if run is not None and len(run.steps):
            found.append(run)
    return found, pd.DataFrame(rows)


def consecutive_tables(runs: list[lifelong.RunResult], batch_sizes: tuple[int, ...]
                       ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(final table: one row per finished run and batch size, editor x batch size, the four measures in
    % and the seconds per edit; long table of every checkpoint of every run, for the retention curves).
    The single run of an editor that edits one request at a time stands for every batch size."""
    finals, curves = [], []
    for run in runs:
        editor = run.config.editor
        label = editor_label(editor, getattr(run.config, "hparams", None))
        sizes = batch_sizes if consecutive.one_at_a_time(editor) else (run.config.batch_size,)
        for b in sizes:
            if run.final:
                steps = run.steps
                finals.append({"editor": label, "batch size": b, **{k: 100 * v for k, v in run.final.items()},
                               "failed batches": int(steps["failed"].sum()),
                               "s per edit": float(steps["seconds"].sum() / steps["n_requests"].sum())})
            if len(run.checkpoints):
                curves.append(run.checkpoints.assign(editor=label, **{"batch size": b}))
    columns = ["editor", "batch size", *consecutive.MEASURES, "kept", "failed batches", "s per edit"]
    return (pd.DataFrame(finals, columns=columns),
            pd.concat(curves, ignore_index=True) if curves else pd.DataFrame(columns=["editor", "batch size", "edits"]))


def consecutive_verdicts(final: pd.DataFrame) -> list[str]:
    """For each batch size: who retains the earlier edits best (efficacy over every edited record) and
    who keeps the unedited facts best, and how COMEBA-HK and AlphaEdit compare with MEMIT (the claim of
    each of their papers: better on every measure), from the numbers."""
    lines = []
    for b, rows in final.groupby("batch size"):
        rows = rows.set_index("editor")
        best, kept = rows["efficacy"].idxmax(), rows["kept"].idxmax()
        text = (f"Batches of {b}: the edits are best retained by {best} (efficacy {rows.loc[best, 'efficacy']:.1f}% "
                f"over all edited records), the unedited facts best kept by {kept} ({rows.loc[kept, 'kept']:.1f}%)")
        for rival in ("COMEBA-HK", "AlphaEdit"):
            if {rival, "MEMIT"} <= set(rows.index):
                text += "; " + _against_memit(rival, rows.loc[rival], rows.loc["MEMIT"])
        lines.append(text + ".")
    return lines


def _against_memit(rival: str, r: pd.Series, m: pd.Series) -> str:
    measures = ("efficacy", "locality", "kept")
    ahead = [k for k in measures if r[k] > m[k]]
    verdict = ("ahead on all three" if len(ahead) == len(measures) else "behind on all three" if not ahead
               else f"ahead on {' and '.join(ahead)} only")
    return f"{rival} vs MEMIT " + ", ".join(f"{k} {r[k]:.1f} vs {m[k]:.1f}" for k in measures) + f" ({verdict})"


def finished_only(grouped: dict[str, list[lifelong.RunResult]]) -> dict[str, list[lifelong.RunResult]]:
    """The finished runs of `grouped` (those with final metrics), editors without one dropped."""
    out = {label: [r for r in runs if r.final] for label, runs in grouped.items()}
    return {label: runs for label, runs in out.items() if runs}


def collapse_steps(curves_frame: pd.DataFrame, fraction_of_peak: float = 0.5) -> pd.DataFrame:
    """When each editor's lifelong run collapses: the first checkpoint at which its S (mean over the
    seeds measured there) falls below `fraction_of_peak` of the best S it had reached at an earlier
    checkpoint, with that peak (S and step), S there and at the last checkpoint measured (in %); NaN
    step: no collapse as far as measured.

    The reference is the running peak, not the first checkpoint: S is a harmonic mean, so a single
    record whose rollback fails at step 1 gives S about 0 there (ERS 0 of 1), and "half of the first
    value" would then never be crossed by a run that works for a hundred edits before it degrades."""
    rows = []
    for editor, frame in curves_frame.groupby("editor", sort=False):
        s = frame.groupby("step")["S"].mean().sort_index() * 100
        peak = s.cummax()
        below = s[s < fraction_of_peak * peak]
        step = below.index[0] if len(below) else None
        peak_s = peak[step] if step is not None else s.max()
        rows.append({"editor": editor, "S first": s.iloc[0], "S peak": peak_s,
                     "peak step": int(s[s == peak_s].index[0]),
                     "collapse step": step if step is not None else math.nan,
                     "S at collapse": below.iloc[0] if len(below) else math.nan,
                     "last step": int(s.index[-1]), "S last": s.iloc[-1]})
    return pd.DataFrame(rows)


def _gain(gain: float) -> str:
    """A relative gain as a signed percentage; against an S of 0 there is no ratio to give."""
    return f"{gain:+.0%}" if math.isfinite(gain) else "no ratio: the other's S is 0"


def scale_verdicts(ours: pd.DataFrame, collapse: pd.DataFrame, paper: pd.DataFrame, n_edits: int) -> list[str]:
    """The paper-scale comparisons in sentences, from the numbers: WilKE against ROME and MEMIT (S and
    the relative gain, beside the paper's), and when each editor collapses (`collapse_steps`)."""
    lines = []
    s = ours.set_index("editor")["S"] if len(ours) else pd.Series(dtype=float)
    paper_s = paper.set_index("editor")["S"] if len(paper) else pd.Series(dtype=float)
    for other in ("ROME", "MEMIT"):
        if "WilKE" in s and other in s:
            gain = metrics.relative_improvement(float(s["WilKE"]), float(s[other]))
            text = (f"After {n_edits:,} edits WilKE (S {s['WilKE']:.1f}) {'beats' if gain > 0 else 'does not beat'} "
                    f"{other} (S {s[other]:.1f}): {_gain(gain)}")
            if "WilKE" in paper_s and other in paper_s:
                text += (f"; the paper: {paper_s['WilKE']:.1f} vs {paper_s[other]:.1f} "
                         f"({_gain(metrics.relative_improvement(paper_s['WilKE'], paper_s[other]))})")
            lines.append(text + ".")
    for _, row in collapse.iterrows():
        if math.isnan(row["collapse step"]):
            lines.append(f"{row['editor']} does not collapse as far as measured: S {row['S peak']:.1f} at its best "
                         f"(step {row['peak step']:,}), {row['S last']:.1f} at step {row['last step']:,}.")
        else:
            lines.append(f"{row['editor']} collapses at step {int(row['collapse step']):,} (S {row['S peak']:.1f} at its "
                         f"best before, step {row['peak step']:,}; {row['S at collapse']:.1f} there, "
                         f"{row['S last']:.1f} at step {row['last step']:,}).")
    return lines


def finals(grouped: dict[str, list[lifelong.RunResult]]) -> pd.DataFrame:
    """One row per finished run: editor (label), seed and the metrics after its last step, in %."""
    rows = [{"editor": label, "seed": run.config.seed, **{m: 100 * float(run.final.get(m, math.nan))
                                                          for m in metrics.METRICS}}
            for label, runs in grouped.items() for run in runs if run.final]
    return pd.DataFrame(rows, columns=["editor", "seed", *metrics.METRICS])


def paper_curves(model_name: str, metric: str = "S") -> pd.DataFrame:
    """The authors' curve of `metric` for the paper's model that `model_name` stands in for, in the long
    format of `curves` (editor, seed, step, metric as a fraction; seed "paper": the mean of their runs)."""
    reported = reported_curves()
    rows = reported[(reported["model"] == PAPER_MODEL.get(model_name, model_name)) & (reported["metric"] == metric)]
    return pd.DataFrame({"editor": rows["editor"].to_numpy(), "seed": "paper", "step": rows["step"].to_numpy(),
                         metric: rows["mean"].to_numpy()})


def collapse_beside_paper(curves_frame: pd.DataFrame, model_name: str,
                          editors: tuple[str, ...] = ("ROME", "MEMIT", "WilKE")) -> pd.DataFrame:
    """The collapse step (`claims.collapse_step`, one definition for both) of each editor: the paper's
    model (its authors' mean curve) and this model seed by seed, with the best S before it."""
    from wilke_lib import claims

    ours = claims.collapse_table(curves_frame[curves_frame["editor"].isin(editors)])
    paper = claims.collapse_table(paper_curves(model_name).query("editor in @editors"))
    fmt = lambda v: "none" if math.isnan(v) else f"{v:,.0f}"  # noqa: E731
    rows = []
    for editor in editors:
        p, o = paper[paper["editor"] == editor], ours[ours["editor"] == editor].sort_values("seed")
        rows.append({"editor": editor,
                     f"paper ({PAPER_MODEL.get(model_name, model_name)})": fmt(p["collapse step"].iloc[0]) if len(p) else "–",
                     f"{model_name}, per seed": " / ".join(fmt(v) for v in o["collapse step"]) or "–",
                     "seeds": ", ".join(map(str, o["seed"])) or "–",
                     "best S before (per seed)": " / ".join(f"{v:.1f}" for v in o["S peak"]) or "–"})
    return pd.DataFrame(rows)


def score_against_norm(grouped: dict[str, list[lifelong.RunResult]], labels: tuple[str, ...] = ("WilKE", "WilKE (Eq. 10)")
                       ) -> pd.DataFrame:
    """WilKE's layer score of the layer it edited at each step against that layer's ||W_proj||_F after the
    step (edit and rollback), over the runs of `labels`: one row per step (editor, seed, step, layer,
    score, weight norm). A rule whose score falls as earlier edits inflate a layer's norm is drawn to the
    layers it has damaged."""
    rows = []
    for label in labels:
        for run in grouped.get(label, []):
            for _, step in run.steps.iterrows():
                scores, norms = step.get("edit_scores") or {}, step.get("weight_norms_after_rollback") or {}
                for layer in step.get("edit_layers") or []:
                    norm = next((v for k, v in norms.items() if f".{layer}." in k), math.nan)
                    rows.append({"editor": label, "seed": run.config.seed, "step": int(step["step"]), "layer": int(layer),
                                 "score": float(scores.get(str(layer), math.nan)), "weight norm": float(norm)})
    return pd.DataFrame(rows, columns=["editor", "seed", "step", "layer", "score", "weight norm"])


COUNTERPART = {"toy-gpt2": "toy-gptj", "toy-gptj": "toy-gpt2", "gpt2-xl": "EleutherAI/gpt-j-6b",
               "EleutherAI/gpt-j-6b": "gpt2-xl"}
"""The other model of the paper's pair (App. B compares their flash records)."""


def rome_flash_sets(model_name: str, records: list[dict], profile: Profile, seeds: tuple[int, ...] | None = None
                    ) -> tuple[dict[str, set], dict[str, set]]:
    """({run: case ids of its flash records by App. B's definition}, {run: case ids it edited}) over the
    finished lifelong ROME runs of `profile` (read back, computing nothing), one per seed in `seeds`."""
    from wilke_lib.analysis import flash

    runs, _ = matrix_progress(model_name, records, profile, ("rome",))
    flagged, edited = {}, {}
    for run in finished_only(runs).get("ROME", []):
        if seeds is None or run.config.seed in seeds:
            name = f"{Path(model_name).name} seed {run.config.seed}"
            flagged[name] = set(flash.app_b_flash(flash.scored_lifelong_run(run))["case_id"])
            edited[name] = set(run.steps["case_id"])
    return flagged, edited


def layer_controls(layers: list[int]) -> list[EditorVariant]:
    """ROME fixed at each of `layers`: the control of the claim that choosing the layer per fact helps
    (`claims.layer_per_fact`)."""
    return [EditorVariant(f"ROME @ layer {l}", "rome", {"layer": int(l)}) for l in layers]


def top_layers(grouped: dict[str, list[lifelong.RunResult]], labels: tuple[str, ...] = ("WilKE", "WilKE (Eq. 10)"),
               k: int = 2) -> list[int]:
    """The `k` layers each of `labels`' runs (finished or not) edited most, together (ROME fixed at each is the
    control of both of WilKE's layer rules; ROME at its own layer is the ROME run itself)."""
    layers: list[int] = []
    for label in labels:
        if label in grouped:
            counts = layer_choices({label: grouped[label]}).loc[label]
            layers += [int(l) for l in counts[counts > 0].sort_values(ascending=False).index[:k]]
    return sorted(set(layers))


def layer_control_progress(model_name: str, records: list[dict], profile: Profile, layers: list[int]
                           ) -> tuple[dict[str, list[lifelong.RunResult]], pd.DataFrame]:
    """The fixed-layer ROME runs at `layers` with every seed of the profile, as far as they are on disk
    (computing nothing; `make runs RUNS_ARGS=--layer-controls` computes them); as `matrix_progress`."""
    cells = [(v, seed) for v in layer_controls(layers) for seed in profile.seeds]
    return _progress(model_name, records, profile, cells, profile.n_edits)


def table(grouped: dict[str, list[lifelong.RunResult]], model_name: str) -> pd.DataFrame:
    """Table 1's format: mean and 95% CI (in %) over seeds of the metrics at the last step."""
    rows = [metrics.summarise_runs([r.final for r in runs], model=model_name, editor=label)
            for label, runs in grouped.items()]
    return pd.concat(rows, ignore_index=True)


def run_sources(grouped: dict[str, list[lifelong.RunResult]]) -> pd.DataFrame:
    """Which runs this page read back from `runs/` and which it computed, with their folders."""
    rows = [{"editor": label, "seed": run.config.seed, "edits": run.config.n_edits, "source": run.source,
             "code": getattr(run, "code_status", "unknown"),
             "run": str(run.run_dir.relative_to(run.run_dir.parents[1]))}
            for label, runs in grouped.items() for run in runs]
    return pd.DataFrame(rows)


def curves(grouped: dict[str, list[lifelong.RunResult]]) -> pd.DataFrame:
    """Long table of every checkpoint of every run (Fig. 43 / Fig. 9), metrics as fractions."""
    frames = []
    for label, runs in grouped.items():
        for run in runs:
            frame = run.checkpoints[["step", *metrics.METRICS]].copy()
            frame["editor"], frame["seed"] = label, run.config.seed
            frames.append(frame)
    return pd.concat(frames, ignore_index=True)


def paper_rows(model_name: str) -> pd.DataFrame:
    """The paper's Table 1 rows for the model this one stands in for (empty if none)."""
    reported = reported_table1()
    return reported[reported["model"] == PAPER_MODEL.get(model_name, model_name)]


def side_by_side(ours: pd.DataFrame, model_name: str) -> pd.DataFrame:
    """Our table and the paper's, as 'mean (ci)' strings, one row per editor and source."""
    def fmt(frame: pd.DataFrame, source: str) -> pd.DataFrame:
        out = pd.DataFrame({"editor": frame["editor"].values, "source": source})
        for m in metrics.METRICS:
            out[m] = [f"{v:.1f} ({c:.1f})" for v, c in zip(frame[m], frame[f"{m}_ci"])]
        return out
    paper = paper_rows(model_name)
    parts = [fmt(ours, f"this companion ({model_name})")]
    if len(paper):
        parts.append(fmt(paper, f"paper ({PAPER_MODEL.get(model_name, model_name)})"))
    return pd.concat(parts, ignore_index=True)


def wilke_improvement(frame: pd.DataFrame, wilke_label: str = "WilKE") -> tuple[float, str]:
    """Relative improvement of WilKE's S over the best other editor's S (the paper's 46.2% and
    67.8%), and the name of that editor."""
    if wilke_label not in set(frame["editor"]):
        raise ValueError(f"wilke_improvement: no {wilke_label!r} row among the editors "
                         f"{sorted(frame['editor'])}; add 'wilke' to the profile's editors")
    others = frame[frame["editor"] != wilke_label]
    if others.empty:
        raise ValueError(f"wilke_improvement: no editor besides {wilke_label!r} to compare with")
    best = others.loc[others["S"].idxmax()]
    wilke_s = float(frame.loc[frame["editor"] == wilke_label, "S"].iloc[0])
    return metrics.relative_improvement(wilke_s, float(best["S"])), str(best["editor"])


def known_records_for(model, tok, records_source: str) -> list[dict]:
    """The records the model already knows (Appendix F.1), in dataset order."""
    return counterfact.known_records(model, tok, counterfact.load_counterfact(records_source))


def single_edit_report(model, tok, record: dict, variants: list[EditorVariant], model_name: str,
                       cache=None) -> pd.DataFrame:
    """One edit of `record` with each variant on a copy of the model: the greedy answers to the
    rewrite prompt, a paraphrase and a neighbour before and after, the layer(s) and the time."""
    rewrite = record["requested_rewrite"]
    probes = {"rewrite": counterfact.rewrite_prompt(record),
              "paraphrase": record["paraphrase_prompts"][0],
              "neighbour": record["neighborhood_prompts"][0]}

    def answers(m) -> dict[str, str]:
        said = generation.predict_greedy(m, tok, list(probes.values()), max_new_tokens=3)
        return {name: text.strip() for name, text in zip(probes, said)}

    rows = [{"editor": "(unedited)", **answers(model), "layers": "", "seconds": 0.0}]
    for v in variants:
        result = editing.edit(model, tok, rewrite, v.hparams(model_name), copy=True, cache=cache)
        rows.append({"editor": v.label, **answers(result.model),
                     "layers": ",".join(map(str, result.layers)), "seconds": round(result.seconds, 2)})
        del result
    return pd.DataFrame(rows)


def layer_score_table(model, tok, record: dict, hparams, cache) -> pd.DataFrame:
    """WilKE's per-layer quantities for one record (Eq. 10): ||delta||, ||sigma(x W_fc)||,
    ||W_proj||_2, the eq10 score, and the target probability the delta reached."""
    candidates = wilke.layer_scores(model, tok, record["requested_rewrite"], hparams, cache)
    return pd.DataFrame([{"layer": l, "delta_norm": c.delta_norm,
                          "activation_norm": c.activation_norm, "spectral_norm": c.spectral_norm,
                          "eq10": wilke.eq10_score(c.delta_norm, c.activation_norm,
                                                   c.spectral_norm, hparams),
                          "update_norm": c.update_rel_norm,
                          "target_prob": c.info.get("target_prob")}
                         for l, c in sorted(candidates.items())])


def ablation_changes(s: pd.Series, scores: tuple[str, ...]) -> pd.DataFrame:
    """Fig. 9 as numbers: for each score, S of each ablation (`s`: S by variant label) against S of the
    full score, and the change in points (negative: the dropped factor helps)."""
    rows = [{"score": score, "variant": name, "S": s[f"WilKE {score} {name}"], "S full": s[f"WilKE {score} full"],
             "change (points)": s[f"WilKE {score} {name}"] - s[f"WilKE {score} full"]}
            for score in scores for name in ("w/o delta", "w/o activation", "w/o ||W_proj||")
            if f"WilKE {score} {name}" in s and f"WilKE {score} full" in s]
    return pd.DataFrame(rows, columns=["score", "variant", "S", "S full", "change (points)"])


def layer_choices(grouped: dict[str, list[lifelong.RunResult]]) -> pd.DataFrame:
    """How often each variant edited each layer (rows: variants, columns: layers), over all steps
    and seeds: when every variant picks the same layer, an ablation cannot change the outcome."""
    counts = {label: pd.Series([layer for run in runs for layers in run.steps["edit_layers"]
                                for layer in (layers or [])]).value_counts()
              for label, runs in grouped.items()}
    return pd.DataFrame(counts).T.fillna(0).astype(int).sort_index(axis=1)


def evenly_spaced(records: list[dict], n: int) -> list[dict]:
    """n records spread over the list (every k-th), the sample the editor tests and benchmarks use."""
    return records[:: max(1, len(records) // n)][:n]


def edit_and_rollback(model, tok, record: dict, hparams, cache) -> dict:
    """One edit of `record` on a copy of the model, then its rollback on the edited copy (the
    protocol of Appendix F). Success means the greedy answer to the rewrite prompt is target_new
    after the edit and target_true again after the rollback. An edit the editor cannot make
    (`EditError`: the model is left unchanged) is a failure, with the reason in "error"."""
    rewrite = record["requested_rewrite"]
    prompt = [counterfact.rewrite_prompt(record)]
    start = time.perf_counter()
    try:
        result = editing.edit(model, tok, rewrite, hparams, copy=True, cache=cache, keep_deltas=False)
    except EditError as err:
        kept = generation.greedy_matches(model, tok, prompt, [rewrite["target_true"]["str"]])[0]
        return {"case_id": record["case_id"], "editor": hparams.editor, "layers": [], "success": False,
                "rollback_restored": bool(kept), "seconds": time.perf_counter() - start, "rollback_seconds": 0.0,
                "error": str(err)}
    edited = generation.greedy_matches(result.model, tok, prompt, [rewrite["target_new"]["str"]])[0]
    undo = editing.rollback(result.model, tok, rewrite, hparams, result, cache=cache, keep_deltas=False)
    restored = generation.greedy_matches(undo.model, tok, prompt, [rewrite["target_true"]["str"]])[0]
    return {"case_id": record["case_id"], "editor": result.editor, "layers": result.layers,
            "success": bool(edited), "rollback_restored": bool(restored),
            "seconds": result.seconds, "rollback_seconds": undo.seconds}
