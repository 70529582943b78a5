"""Tests of wilke_lib.analysis: causal tracing, toxicity (Eq. 7), flash detection, strength, plots."""

from __future__ import annotations

import dataclasses
import io

import matplotlib

matplotlib.use("Agg")

import numpy as np
import pandas as pd
import pytest
import torch
from matplotlib.figure import Figure

from tiny import make_tiny_model
from wilke_lib.analysis import aie as aie_mod
from wilke_lib.analysis import causal_trace as ct
from wilke_lib.analysis import flash, per_layer, plots, strength, toxicity, verdicts
from wilke_lib.arch import ModelAdapter
from wilke_lib.editing import EditCache
from wilke_lib.hparams import ROMEHParams
from wilke_lib.lifelong import monitor
from wilke_lib.results import cache_key

TEMPLATE = "The mother tongue of {} is"
SUBJECT = "Valo Durn"


def _record(case_id: int, subject: str = SUBJECT, true: str = "Welsh", new: str = "French") -> dict:
    return {"case_id": case_id,
            "requested_rewrite": {"prompt": TEMPLATE, "subject": subject, "relation_id": "P103",
                                  "target_new": {"str": new, "id": "Q1"}, "target_true": {"str": true, "id": "Q2"}},
            "paraphrase_prompts": [f"Some text. {subject} speaks"],
            "neighborhood_prompts": ["The mother tongue of Nyra Cask is"]}


def _rome_setup(model):
    """ROME settings for tiny models: fixed prefixes, few steps, identity second moment (no corpus)."""
    hp = ROMEHParams(layer=1, v_num_grad_steps=4, context_prefixes=["Hello there. "])
    cache = EditCache(model_key="tiny-test")
    d_mlp = ModelAdapter(model).d_mlp
    for l in range(ModelAdapter(model).n_layers):
        cache.mom2[EditCache._stats_key(hp, l)] = torch.eye(d_mlp)
    return hp, cache


# --------------------------------------------------------------------------- causal tracing
def _prepared(model, tok, noise_multiplier=3.0):
    return ct._prepare(model, tok, TEMPLATE, SUBJECT, None, noise_multiplier, 10, 1, None)


def test_subject_token_range(tiny_tokenizer):
    ids, (b, e) = ct.subject_token_range(tiny_tokenizer, TEMPLATE, SUBJECT)
    assert tiny_tokenizer.decode(ids[b:e]).strip() == SUBJECT
    assert ct._decode_search(tiny_tokenizer, ids, SUBJECT) == (b, e)


def test_restore_all_last_layer_gives_clean_and_empty_gives_corrupted(tiny_model, tiny_tokenizer):
    prep = _prepared(tiny_model, tiny_tokenizer)
    n_layers, n_tokens = ModelAdapter(tiny_model).n_layers, prep.input_ids.shape[0]
    every_token_last_layer = [(t, n_layers - 1) for t in range(n_tokens)]
    high, probs = ct.patched_probs(tiny_model, prep.input_ids, prep.subject_range, prep.noise,
                                   [every_token_last_layer, []], "hidden", prep.target_id)
    assert high == pytest.approx(prep.high_score, abs=1e-6)
    assert probs[0] == pytest.approx(prep.high_score, abs=1e-6)
    assert probs[1] == pytest.approx(prep.low_score, abs=1e-6)
    assert abs(prep.high_score - prep.low_score) > 1e-6  # the noise does corrupt


def test_trace_shapes_and_clean_limits(tiny_model, tiny_tokenizer):
    results = ct.trace_all_kinds(tiny_model, tiny_tokenizer, TEMPLATE, SUBJECT, window=2)
    n_layers = ModelAdapter(tiny_model).n_layers
    for kind, res in results.items():
        assert res.kind == kind
        assert res.scores.shape == (len(res.tokens), n_layers)
        assert np.isfinite(res.scores).all() and (res.scores >= 0).all() and (res.scores <= 1).all()
        assert "".join(res.tokens[res.subject_range[0]:res.subject_range[1]]).strip() == SUBJECT
    hidden = results["hidden"]
    assert hidden.scores[-1, -1] == pytest.approx(hidden.high_score, abs=1e-6)


@pytest.mark.parametrize("kind", ct.KINDS)
def test_zero_noise_scores_equal_clean(tiny_tokenizer, kind):
    model = make_tiny_model("gptj", len(tiny_tokenizer))
    res = ct.trace(model, tiny_tokenizer, TEMPLATE, SUBJECT, kind=kind, noise_multiplier=0.0, window=2)
    np.testing.assert_allclose(res.scores, res.high_score, atol=1e-6)
    assert res.low_score == pytest.approx(res.high_score, abs=1e-6)


def test_noise_level_is_romes_std_of_the_subjects_token_embeddings(tiny_model, tiny_tokenizer):
    subjects = [SUBJECT, "Mira Quell", SUBJECT]  # a repeated subject counts once, as each known subject in ROME
    ids = [i for s in (SUBJECT, "Mira Quell") for i in tiny_tokenizer(s, add_special_tokens=False)["input_ids"]]
    rows = ModelAdapter(tiny_model).embed.weight.detach()[torch.tensor(ids)]
    assert ct.subject_noise_std(tiny_model, tiny_tokenizer, subjects) == pytest.approx(3 * float(rows.std()), rel=1e-6)
    assert ct.subject_noise_std(tiny_model, tiny_tokenizer, subjects, multiplier=1.0) == pytest.approx(float(rows.std()))
    prep = _prepared(tiny_model, tiny_tokenizer)  # a lone trace: the traced subject's own tokens
    assert prep.noise_std == pytest.approx(ct.subject_noise_std(tiny_model, tiny_tokenizer, [SUBJECT]))
    with pytest.raises(ValueError, match="no subject tokens"):
        ct.subject_noise_std(tiny_model, tiny_tokenizer, [])


def test_impostor_restoration(tiny_model, tiny_tokenizer):
    """The subject as its own impostor gives ROME's MLP restoration; a real impostor ("Mira Durn", the
    same last token " Durn") restores the same MLP 0 output exactly where MLP 0 reads the token alone
    (GPT-J's and GPT-NeoX's parallel blocks) and a different one where attention feeds it first."""
    kw = dict(noise_std=0.5, n_samples=4)
    own = ct.trace(tiny_model, tiny_tokenizer, TEMPLATE, SUBJECT, "French", kind="mlp", window=1,
                   token_positions="last_subject", **kw)
    last = own.subject_range[1] - 1
    itself = ct.impostor_scores(tiny_model, tiny_tokenizer, TEMPLATE, SUBJECT, SUBJECT, "French", max_batch=9, **kw)
    np.testing.assert_allclose(itself, own.scores[last], atol=1e-6)
    other = ct.impostor_scores(tiny_model, tiny_tokenizer, TEMPLATE, SUBJECT, "Mira Durn", "French", **kw)
    cfg = tiny_model.config  # GPT-J's block and GPT-NeoX's parallel residual feed MLP 0 the embedding alone
    parallel = cfg.model_type == "gptj" or getattr(cfg, "use_parallel_residual", False)
    assert (abs(other[0] - own.scores[last, 0]) < 1e-6) == parallel
    assert not np.allclose(other[1:], own.scores[last, 1:], atol=1e-6)
    with pytest.raises(ValueError, match="does not end in the last token"):
        ct.impostor_scores(tiny_model, tiny_tokenizer, TEMPLATE, SUBJECT, "Mira Quell", **kw)


def test_trace_given_target_and_aie(tiny_tokenizer):
    model = make_tiny_model("gpt2", len(tiny_tokenizer))
    res = ct.trace(model, tiny_tokenizer, TEMPLATE, SUBJECT, "French", token_positions="last_subject")
    assert res.target_id == tiny_tokenizer(" French", add_special_tokens=False)["input_ids"][0]
    last = res.subject_range[1] - 1
    assert np.isfinite(res.scores[last]).all() and np.isnan(np.delete(res.scores, last, axis=0)).all()
    aie = aie_mod.average_indirect_effect(model, tiny_tokenizer, [_record(0), _record(1, "Mira Quell")],
                                     kind="mlp", window=2, progress=False)
    assert aie.aie.shape == (4,) and aie.per_record.shape == (2, 4)
    assert aie.peak_layer == int(np.argmax(aie.aie)) and aie.case_ids == [0, 1]


# --------------------------------------------------------------------------- toxicity
def test_toxicity_of_edit_and_exact_inverse_is_zero(tiny_model):
    adapter = ModelAdapter(tiny_model)
    layer = 1
    original = adapter.out_weight(layer).clone()
    d_w = torch.randn(adapter.d_model, adapter.d_mlp, generator=torch.Generator().manual_seed(0))
    adapter.add_to_out_weight(layer, d_w)
    assert monitor.toxicity(adapter.out_weight(layer), original).abs().max() > 0.1
    adapter.add_to_out_weight(layer, -d_w)
    tox = monitor.toxicity(adapter.out_weight(layer), original)
    eps = torch.finfo(original.dtype).eps * float(original.abs().max() + d_w.abs().max())
    assert tox.abs().max() <= eps


def test_monitor_norms_and_snapshots(tiny_tokenizer):
    model = make_tiny_model("gpt2", len(tiny_tokenizer))
    adapter = ModelAdapter(model)
    watch = monitor.ToxicityMonitor(model, [1, 2])
    d_w = torch.full((adapter.d_model, adapter.d_mlp), 0.01)
    adapter.add_to_out_weight(1, d_w)
    row = watch.row()
    assert row["toxicity_norms"]["1"] == pytest.approx(float(torch.linalg.norm(d_w)), rel=1e-4)
    assert row["toxicity_norms"]["2"] == 0 and row["original_norms"]["1"] < row["layer_norms"]["1"]
    snap = watch.snapshot(4)
    assert set(snap) == {"step4/layer1", "step4/layer2"} and snap["step4/layer1"].shape == (adapter.d_model, 64)
    assert monitor.downsample(torch.ones(32, 128), 64).shape == (32, 64)
    assert [s for s in range(1, 20) if monitor.is_snapshot_step(s)] == [2, 4, 8, 16]


def test_per_layer_flash_and_the_lifelong_toxicity_run_on_rome(tiny_tokenizer, results_in_tmp):
    model = make_tiny_model("gpt2", len(tiny_tokenizer))
    hp, cache = _rome_setup(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    table = per_layer.per_layer_flash(model, tiny_tokenizer, _record(0), hp, layers=[0, 2], cache=cache)
    assert table["layer"].tolist() == [0, 2] and table["error"].isna().all()
    assert np.isfinite(table[["norm_original", "norm_edited", "norm_rolled_back", "toxicity_norm"]]).all().all()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    recs = [_record(i, s) for i, s in enumerate(["Valo Durn", "Mira Quell", "Tobin Ash", "Sela Varn"])]
    run = toxicity.toxicity_run(model, tiny_tokenizer, recs, "tiny", hp, n_steps=2, seed=0, cache=cache,
                                known=lambda *a, **k: list(recs))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert run.layers == [1] and run.table["step"].tolist() == [1, 2]
    assert (run.table["toxicity_norm"] > 0).all() and run.snapshots[2][1].shape == (ModelAdapter(model).d_model, 64)
    assert list(toxicity.toxicity_snapshots(run)) == [2]
    assert run.table["rollback_success"].between(0, 1).all()
    assert isinstance(flash.detect_flash(run.table, original_norm=run.original_norms[1]), pd.DataFrame)


# --------------------------------------------------------------------------- flash detector
def _steps_table(flash_step: int | None, fail_step: int | None) -> pd.DataFrame:
    rng = np.random.default_rng(0)
    jumps = 0.01 + 0.002 * rng.standard_normal(20)
    if flash_step is not None:
        jumps[flash_step - 1] = 5.0
    success = np.ones(20)
    if fail_step is not None:
        success[fail_step - 1] = 0.0
    return pd.DataFrame({"step": np.arange(1, 21), "case_id": np.arange(100, 120),
                         "norm": 10.0 + np.cumsum(jumps), "rollback_success": success})


def test_flash_detector_flags_constructed_case():
    flagged = flash.detect_flash(_steps_table(12, 12), original_norm=10.0)
    assert flagged["case_id"].tolist() == [111]
    assert "rollback success" in flagged["reason"].iloc[0]
    table = _steps_table(12, 12).assign(edit_success=1.0)
    assert flash.detect_flash(table, original_norm=10.0, min_edit_success=0.5)["case_id"].tolist() == [111]
    table.loc[11, "edit_success"] = 0.0
    assert flash.detect_flash(table, original_norm=10.0, min_edit_success=0.5).empty


@pytest.mark.parametrize("flash_step,fail_step", [(None, None), (12, None), (None, 12), (12, 5)])
def test_flash_detector_passes_normal_runs(flash_step, fail_step):
    assert flash.detect_flash(_steps_table(flash_step, fail_step), original_norm=10.0).empty


def test_flash_table_format():
    records = [_record(3561, "Muslim", "Islam", "Christianity")]
    records[0]["requested_rewrite"]["prompt"] = "{} follows the religion of"
    table = flash.flash_table(records, pd.DataFrame({"case_id": [3561]}))
    assert list(table.columns) == ["Record", "Content"]
    assert table["Content"].iloc[0] == "Muslim follows the religion of [Islam] => [Christianity]."


# --------------------------------------------------------------------------- strength
def test_activation_strength_per_layer(tiny_model, tiny_tokenizer):
    values = strength.activation_strength(tiny_model, tiny_tokenizer, _record(0))
    assert values.index.tolist() == list(range(ModelAdapter(tiny_model).n_layers))
    assert np.isfinite(values).all() and (values > 0).all()
    with_prefix = strength.activation_strength(tiny_model, tiny_tokenizer, _record(0), [1],
                                               prefixes=["", "Hello there. "])
    assert len(with_prefix) == 1 and with_prefix.iloc[0] > 0


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_delta_strength_per_layer(tiny_tokenizer, arch):
    model = make_tiny_model(arch, len(tiny_tokenizer))
    hp, cache = _rome_setup(model)
    values = strength.delta_strength(model, tiny_tokenizer, _record(0), hp, cache=cache)
    assert len(values) == 4 and np.isfinite(values).all() and (values > 0).all()


# --------------------------------------------------------------------------- plots
def _renders(fig) -> bool:
    fig.savefig(io.BytesIO(), format="png")
    return isinstance(fig, Figure)


def test_plot_functions_return_figures(tiny_tokenizer):
    model = make_tiny_model("gpt2", len(tiny_tokenizer))
    traces = ct.trace_all_kinds(model, tiny_tokenizer, TEMPLATE, SUBJECT, n_samples=2, window=2)
    aie = aie_mod.average_indirect_effect(model, tiny_tokenizer, [_record(0)], kind="mlp", n_samples=2, progress=False)
    traj = pd.DataFrame({"step": [1, 2, 3], "norm": [1.0, 1.5, 3.0], "original_norm": 1.0})
    layer_table = pd.DataFrame({"layer": [0, 1], "norm_original": [1.0, 1.0], "norm_edited": [1.2, 9.0],
                                "norm_rolled_back": [1.0, 2.0]})
    metrics = pd.DataFrame([{"step": s, "editor": e, "seed": seed, **{m: 0.5 / s + 0.01 * seed
                                                                      for m in plots.METRIC_ORDER}}
                            for s in (1, 2, 4) for e in ("ROME", "WilKE") for seed in (0, 1)])
    figures = [
        plots.norm_trajectory_figure(traj, snapshot_steps=[2], logy=True),
        plots.toxicity_heatmaps_figure({2: np.random.randn(8, 8), 4: np.random.randn(8, 8)}),
        plots.layer_flash_figure({"case 1": layer_table, "case 2": layer_table}, predefined_layer=1,
                                 show_rollback=True),
        plots.causal_trace_figure(traces, title="trace"),
        plots.aie_figure({"mlp": aie}),
        plots.strength_figure({"a": [1e-3, 1.0]}, {"b": [1.0, 2.0]}, predefined_layer=1),
        plots.lifelong_metrics_figure(metrics),
        plots.ablation_figure(metrics.rename(columns={"editor": "variant"})),
    ]
    assert all(_renders(fig) for fig in figures)


# --------------------------------------------------------------------------- chapter experiments (notebooks 05-09)
@pytest.fixture
def results_in_tmp(tmp_path, monkeypatch):
    """Results (runs, caches) under a temporary folder."""
    monkeypatch.setenv("WILKE_RESULTS_DIR", str(tmp_path / "results"))
    monkeypatch.setenv("WILKE_RUNS_DIR", str(tmp_path / "runs"))
    return tmp_path


def _recording(norms: dict[int, list[float]], original: dict[int, float]) -> toxicity.ToxicityRecording:
    steps = len(next(iter(norms.values())))
    table = pd.DataFrame({"step": np.arange(1, steps + 1), "case_id": np.arange(100, 100 + steps)})
    for layer, values in norms.items():
        table[f"norm_{layer}"] = values
        table[f"toxicity_{layer}"] = np.abs(np.asarray(values) - original[layer]) + 1e-3 * table["step"]
    first = next(iter(norms))
    table["norm"], table["toxicity_norm"] = table[f"norm_{first}"], table[f"toxicity_{first}"]
    table["rollback_success"], table["edit_success"], table["failed"] = 1.0, 1.0, False
    return toxicity.ToxicityRecording(layers=list(norms), original_norms=original, table=table, snapshots={})


def test_cache_key_and_small_helpers():
    assert cache_key({"a": 1}, [1, 2]) == cache_key({"a": 1}, [1, 2])
    assert cache_key({"a": 1}) != cache_key({"a": 2})
    assert aie_mod.default_window(48) == 10 and aie_mod.default_window(28) == 10 and aie_mod.default_window(12) == 3
    assert per_layer.layers_to_edit(12, 4, 3) == [0, 3, 4, 8] and per_layer.layers_to_edit(3) == [0, 1, 2]
    assert _renders(plots.strength_figure({1: pd.Series([1.0, 2.0], index=[0, 4])}, {2: [1.0, 2.0, 3.0]}))


def test_toxicity_summary_and_verdicts():
    staircase = [10.0 + 0.01 * s + (5.0 if s >= 10 else 0.0) for s in range(1, 21)]
    rec = _recording({3: staircase}, {3: 10.0})
    summary = toxicity.toxicity_summary(rec)
    assert summary["steps"] == 20 and summary["top_share"] > 0.5 and summary["buildup_rho"] > 0.8
    assert summary["final_ratio"] == pytest.approx(staircase[-1] / 10.0)
    smooth = toxicity.toxicity_summary(_recording({3: [10.0 + 0.01 * s for s in range(1, 20)]}, {3: 10.0}))
    table = toxicity.toxicity_verdicts(summary, smooth, n_flash=1)
    assert list(table.columns) == ["phenomenon", "paper", "this model", "observed"]
    assert table["observed"].tolist() == ["yes", "yes", "yes", "no", "yes"]
    sentence = verdicts.verdict_sentence(table, "The model")
    assert sentence.startswith("The model shows *toxicity buildup*") and "does not show" in sentence
    assert len(toxicity.toxicity_verdicts(summary, None, n_flash=0)) == 4


def test_memit_verdicts_and_sentence():
    rec = _recording({0: [10.0 + 0.01 * s for s in range(1, 21)],
                      1: [10.0 + 0.01 * s + (3.0 if s >= 5 else 0.0) for s in range(1, 21)]}, {0: 10.0, 1: 10.0})
    table = toxicity.memit_verdicts(rec)
    spikes = table.filter(like="steps with a jump").iloc[:, 0].tolist()
    assert table["layer"].tolist() == [0, 1] and spikes == [0, 1]
    text = toxicity.memit_sentence(table, 2.5, "toy")
    assert "2 of MEMIT's 2 layers" in text and "layer(s) 1" in text and "2.5" in text
    assert _renders(plots.recording_norms_figure(rec, flash_steps=[5]))
    assert _renders(plots.recording_norms_figure(rec, layers=[1]))


def test_per_layer_strength_and_tracing_verdicts():
    rows = []
    for group, case, peak in (("flash", 1, 30.0), ("flash", 2, 25.0), ("normal", 3, 1.01), ("normal", 4, 1.02)):
        for layer in range(4):
            ratio = peak if (layer == 2 and group == "flash") else 1.0 + 0.001 * layer
            rows.append({"group": group, "case_id": case, "layer": layer, "norm_original": 1.0,
                         "norm_edited": ratio, "ratio": ratio, "error": None,
                         "activation_strength": 1e-3 if (layer == 2 and group == "flash") else 1.0 + layer,
                         "delta_strength": 2.0 + 0.1 * layer})
    table = pd.DataFrame(rows)
    summary = per_layer.per_layer_summary(table, 2)
    assert summary.loc[summary.case_id == 1, "layer_of_max"].item() == 2
    assert per_layer.per_layer_verdicts(summary, 2)["observed"].tolist() == ["yes", "yes", "yes"]
    assert strength.strength_verdicts(table, 2)["observed"].tolist() == ["yes", "yes", "yes"]
    with_gain = table.assign(update_gain=1 / table["activation_strength"])
    assert strength.strength_verdicts(with_gain, 2)["observed"].tolist() == ["yes", "yes", "yes", "yes"]
    assert set(strength.by_case(table, "flash", "activation_strength")) == {1, 2}
    assert list(per_layer.per_layer_panels(table, {"flash": "F"}))[0] == "F: case 1"
    peaks = {"flash": pd.Series([0, 1, 0]), "normal": pd.Series([3, 5, 8, 10])}
    assert aie_mod.tracing_verdicts(peaks, 12, 6)["observed"].tolist() == ["yes", "yes", "yes", "yes"]
    same = {"flash": pd.Series([0, 1]), "normal": pd.Series([0, 0, 0, 1, 8])}
    assert aie_mod.tracing_verdicts(same, 12, 6)["observed"].tolist() == ["yes", "no", "yes", "no"]
    assert aie_mod.tracing_verdicts({"flash": pd.Series([0])}, 12, 6)["observed"].tolist() == ["n/a"]


def test_flash_analysis_groups_and_flash_free_run(tiny_tokenizer, results_in_tmp):
    model = make_tiny_model("gpt2", len(tiny_tokenizer))
    hp, cache = _rome_setup(model)
    recs = [_record(i, s) for i, s in enumerate(["Valo Durn", "Mira Quell", "Tobin Ash", "Sela Varn", "Orrin Pike",
                                                 "Kesta Lum", "Danu Fell", "Ilsa Morrow"])]
    everything = lambda *args, **kwargs: list(recs)  # noqa: E731 -- every record counts as known
    before = {k: v.clone() for k, v in model.state_dict().items()}
    run = flash.flash_analysis(model, tiny_tokenizer, recs, "tiny", hp, n_steps=3, seed=0, cache=cache,
                               known=everything)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert len(run.sequence) == 3 and run.recording.table["step"].tolist() == [1, 2, 3]
    assert [r["case_id"] for r in run.sequence] == run.recording.table["case_id"].tolist()
    assert (results_in_tmp / "results" / "tiny" / "flash_records.json").exists()
    flash_ids = {r["case_id"] for r in run.flash_records}
    assert not flash_ids & {r["case_id"] for r in run.normal_records}
    assert list(run.table().columns) == ["Record", "Content"]
    again = flash.flash_analysis(model, tiny_tokenizer, recs, "tiny", hp, n_steps=3, seed=0, known=everything)
    assert again.recording.table.equals(run.recording.table)  # read back, not recomputed
    groups = flash.contrast_groups(model, tiny_tokenizer, recs, "tiny", hp, n_steps=3, seed=0, n_flash=1,
                                   n_normal=2, cache=cache, known=everything)
    assert len(groups.flash) == 1 and groups.analysis is not None
    app_b_ids = {r["case_id"] for r in run.app_b_records}
    assert app_b_ids <= flash_ids  # App. B's flash records are among the detector's
    assert groups.flash_label == ("flash (App. B)" if app_b_ids else "largest norm jumps (no App. B flash record)")
    assert (groups.precondition() == "") == bool(app_b_ids)
    assert list(groups.table().columns) == ["group", "Record", "Content"]
    free = flash.flash_free_run(model, tiny_tokenizer, recs, run, hp, model_name="tiny", seed=0, cache=cache,
                                known=everything)
    assert len(free.table) == 3 and (not flash_ids or not flash_ids & set(free.table["case_id"]))


def test_per_layer_norms_and_strength_tables_are_cached(tiny_tokenizer, results_in_tmp):
    model = make_tiny_model("gpt2", len(tiny_tokenizer))
    hp, cache = _rome_setup(model)
    hp = dataclasses.replace(hp, update_form="r-rome")  # the update's key is k*: the gain below is 1 / ||k*||
    groups = {"flash": [_record(1)], "normal": [_record(2, "Mira Quell"), _record(3, "Tobin Ash")]}
    before = {k: v.clone() for k, v in model.state_dict().items()}
    norms = per_layer.per_layer_norms(model, tiny_tokenizer, groups, hp, model_name="tiny", layers=[0, 2],
                                      cache=cache, progress=False)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert len(norms) == 6 and (norms["ratio"] > 0).all()
    # the single edits record ROME's ||delta^l||: the delta strength of Appendix D.2
    direct = strength.delta_strength(model, tiny_tokenizer, _record(1), hp, [0, 2], cache=cache)
    from_edits = norms[norms.case_id == 1].set_index("layer")["delta_norm"]
    assert np.allclose(from_edits.loc[[0, 2]].to_numpy(), direct.to_numpy(), rtol=1e-5)
    assert len(list((results_in_tmp / "results" / "tiny" / "flash_per_layer").glob("*.json"))) == 1
    table = strength.strength_tables(model, tiny_tokenizer, groups, hp, model_name="tiny", n_delta=1, cache=cache,
                                     progress=False)
    assert len(table) == 3 * 4 and table["activation_strength"].gt(0).all()
    assert table["delta_strength"].notna().sum() == 2 * 4  # first record of each group
    # the tiny setup has C = I: ROME's update gain is then 1 / ||k*||, the inverse activation strength
    assert np.allclose(table["update_gain"], 1 / table["activation_strength"], rtol=1e-4)
    again = strength.strength_tables(model, tiny_tokenizer, groups, hp, model_name="tiny", n_delta=1, progress=False)
    pd.testing.assert_frame_equal(again, table)


def test_choose_rome_layer(tiny_tokenizer):
    model = make_tiny_model("gpt2", len(tiny_tokenizer))
    aie = aie_mod.average_indirect_effect(model, tiny_tokenizer, [_record(0)], kind="mlp", window=3, n_samples=2,
                                          progress=False)
    assert aie_mod.choose_rome_layer(model, tiny_tokenizer, [_record(0)], aie=aie) == aie.peak_layer
    layer = aie_mod.choose_rome_layer(model, tiny_tokenizer, [_record(0)], n_samples=2)
    assert 0 <= layer < ModelAdapter(model).n_layers
    with pytest.raises(ValueError):
        aie_mod.choose_rome_layer(model, tiny_tokenizer, [_record(0)],
                                  aie=aie_mod.average_indirect_effect(model, tiny_tokenizer, [_record(0)], kind="attn",
                                                                      n_samples=2, progress=False))
