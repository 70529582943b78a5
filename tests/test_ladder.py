"""The width ladder's rule (`wilke_lib.ladder.choose`), fixed before any WilKE or MEMIT run on the chosen
organism: each of its outcomes on constructed rungs."""

import math

import pytest

from wilke_lib import ladder
from wilke_lib.analysis import collapse


def rung(width, steps, met=True, relaxed=True, heavy=False):
    return {"name": f"toy-gpt2-{'x4-' if heavy else ''}w{width}", "d_mlp": width, "trained": True, "targets_met": met,
            "targets_met_relaxed": relaxed, "rome_collapse_steps": [s if s else None for s in steps],
            "rome_collapsed": [bool(s) for s in steps]}


def untrained(width, heavy=False):
    return {"name": f"toy-gpt2-{'x4-' if heavy else ''}w{width}", "d_mlp": width, "trained": False}


def test_the_rung_closest_to_64_on_a_log_scale_among_those_that_meet_the_targets():
    rows = [rung(48, [8, 8, 4]), rung(96, [16, 10, 9]), rung(192, [40, 48, 32]), rung(384, [128, 100, 160]),
            untrained(768)]
    decision = ladder.choose(rows)
    assert decision["chosen"] == "toy-gpt2-w192" and decision["tier"] == 1  # 40: log(64/40) < log(128/64)
    rows[2] = rung(192, [40, 48, 32], met=False)
    assert ladder.choose(rows)["chosen"] == "toy-gpt2-w384"  # the median 128 is still in range


def test_undecided_while_a_required_rung_is_missing_and_no_collapse_counts_as_beyond_the_run():
    rows = [rung(48, [8, 8, 4]), untrained(96), rung(192, [40, 48, 32]), rung(384, [64, 64, 64])]
    assert ladder.choose(rows)["chosen"] is None and "toy-gpt2-w96" in ladder.choose(rows)["reason"]
    unfinished = rung(96, [16, 10, 9]) | {"rome_collapsed": [True, None, True]}
    assert ladder.choose([rows[0], unfinished, *rows[2:]])["chosen"] is None
    assert ladder.median_collapse(rung(384, [0, 0, 64])) == ladder.N_EDITS + 1


def test_a_rung_that_misses_the_targets_is_not_waited_for_but_384_is_for_the_768_decision():
    unmeasured = {"rome_collapse_steps": [None] * 3, "rome_collapsed": [None] * 3}
    rows = [rung(48, [5, 6, 3]), rung(96, [9, 0, 0], met=False, relaxed=False) | unmeasured,
            rung(192, [64, 0, 0], met=False, relaxed=False) | unmeasured, rung(384, [64, 64, 64], met=False)]
    decision = ladder.choose(rows)  # no rung of tier 1 qualifies, whatever 96's and 192's later seeds show
    assert decision["chosen"] is None and "tier 2" in decision["reason"] and "toy-gpt2-w96" not in decision["reason"]
    rows[3] |= unmeasured
    assert "tier 1" in ladder.choose(rows)["reason"] and "toy-gpt2-w384" in ladder.choose(rows)["reason"]
    rows[3] = rung(384, [64, 64, 64], met=None)
    assert "toy-gpt2-w384" in ladder.choose(rows)["reason"]  # no report yet
    # tier 3 waits for a rung that the relaxed targets admit
    rows = [rows[0], rows[1], rung(192, [64, 0, 0], met=False, relaxed=True) | unmeasured,
            rung(384, [128, 100, 160], met=False, relaxed=False)]
    decision = ladder.choose(rows, tier2_out_of_reach=True)
    assert decision["chosen"] is None and "tier 3" in decision["reason"] and "toy-gpt2-w192" in decision["reason"]


def test_width_768_is_asked_for_only_when_384_collapses_before_64():
    rows = [rung(48, [8, 8, 4]), rung(96, [16, 10, 9]), rung(192, [20, 16, 16]), rung(384, [40, 64, 50], met=False)]
    assert "width 768" in ladder.choose(rows)["reason"]
    assert "toy-gpt2-w768" in ladder.choose(rows + [untrained(768)])["reason"]
    rows[3] = rung(384, [128, 64, 100], met=False)
    decision = ladder.choose(rows)
    assert decision["chosen"] is None and "tier 2" in decision["reason"] and "width 192" in decision["reason"]


STANDARD_MISSES = [rung(48, [8, 8, 4]), rung(96, [16, 10, 9], met=False), rung(192, [64, 40, 60], met=False),
                   rung(384, [128, 100, 160], met=False, relaxed=False)]


def test_tier_two_starts_at_192_and_asks_for_the_next_width_by_the_first_result():
    assert "toy-gpt2-x4-w192" in ladder.choose(STANDARD_MISSES + [untrained(192, heavy=True)])["reason"]
    decision = ladder.choose(STANDARD_MISSES + [rung(192, [64, 80, 50], heavy=True)])
    assert decision["chosen"] == "toy-gpt2-x4-w192" and decision["tier"] == 2
    spread_missed = rung(192, [64, 80, 50], met=False, heavy=True)
    assert "width 96" in ladder.choose(STANDARD_MISSES + [spread_missed])["reason"]  # more load per parameter
    assert "width 96" in ladder.choose(STANDARD_MISSES + [rung(192, [300, 500, 0], heavy=True)])["reason"]
    assert "width 384" in ladder.choose(STANDARD_MISSES + [rung(192, [8, 16, 16], heavy=True)])["reason"]
    decision = ladder.choose(STANDARD_MISSES + [spread_missed, rung(96, [32, 40, 30], heavy=True)])
    assert decision["chosen"] == "toy-gpt2-x4-w96" and decision["tier"] == 2


def test_tier_three_relaxes_the_spread_over_every_rung_once_tier_two_is_measured_or_out_of_reach():
    heavy_misses = [rung(192, [300, 500, 0], heavy=True), rung(96, [200, 300, 0], heavy=True)]
    decision = ladder.choose(STANDARD_MISSES + heavy_misses)
    assert decision["chosen"] == "toy-gpt2-w192" and decision["tier"] == 3  # median 60, relaxed targets met
    decision = ladder.choose(STANDARD_MISSES, tier2_out_of_reach=True)
    assert decision["chosen"] == "toy-gpt2-w192" and decision["tier"] == 3
    none = [rung(48, [8, 8, 4], relaxed=False)]
    assert ladder.choose(none, tier2_out_of_reach=True)["chosen"] is None


def test_the_heavy_world_is_its_own_source_of_records_and_statistics():
    from wilke_lib import counterfact
    from wilke_lib.organisms import world
    from wilke_lib.organisms.train import ORGANISMS, world_name

    assert world_name("toy-gpt2") == world_name("gpt2-xl") == "toy-world"
    assert world_name("toy-gpt2-x4-w192") == "toy-world-x4"
    assert ORGANISMS["toy-gpt2-x4-w192"].world == world.HEAVY_SPEC and ORGANISMS["toy-gpt2-w192"].world == world.DEFAULT_SPEC
    assert ladder.rung_hparams("rome", "toy-gpt2-x4-w192").mom2_corpus == "toy-world-x4"
    assert ladder.rung_hparams("rome", "toy-gpt2-w192").mom2_corpus == "toy-world"
    heavy = counterfact.load_counterfact("toy-world-x4")
    assert len(heavy) == 4 * len(counterfact.load_counterfact("toy-world")) == 19200
    assert len({r["requested_rewrite"]["subject"] for r in heavy}) == 4 * 1320


def test_relaxed_targets_only_relax_the_spread():
    report = {"known_rate": 0.95, "n_known": 3000, "subject_state_recovery_median": 0.7, "causal_peak_median": 3,
              "layers": 12, "causal_peak_distinct": 4, "causal_peak_top_share": 0.8, "rome_success": 0.95,
              "rome_clamp_factor": 4, "rome_steps": 20, "last_token_recall": 0.95}
    assert not ladder.targets_met(report) and ladder.targets_met(report, relaxed=True)
    assert not ladder.targets_met({**report, "causal_peak_top_share": 0.9}, relaxed=True)
    assert not ladder.targets_met({**report, "known_rate": 0.5}, relaxed=True)
    assert math.isclose(ladder.TARGET_STEP, 64)


def test_power_law_recovers_a_slope_and_tests_slope_one():
    widths = [48, 48, 96, 96, 192, 192, 384]
    exact = collapse.power_law(widths, [0.1 * w for w in widths])
    assert abs(exact["slope"] - 1) < 1e-9 and exact["slope_1_inside"]
    noisy = collapse.power_law(widths, [w ** 2 * f for w, f in zip(widths, (1.1, 0.9, 1.2, 0.8, 1.0, 1.05, 0.95))])
    assert 1.8 < noisy["slope"] < 2.2 and noisy["ci_low"] < noisy["slope"] < noisy["ci_high"]
    assert noisy["slope_1_inside"] is False
    assert math.isnan(collapse.power_law([48, 48, 48], [4, 8, 8])["slope"])
    table = {"rungs": [rung(48, [8, 8, 4]), rung(96, [16, 0, 9]), untrained(192), rung(192, [0, 64, 0], heavy=True)]}
    points = collapse.collapse_points(table)
    assert [(p["d_mlp"], p["seed"], p["collapse step"]) for p in points] == [
        (48, 9, 8), (48, 10, 8), (48, 11, 4), (96, 9, 16), (96, 11, 9), (192, 10, 64)]
    assert [p["world"] for p in points] == [collapse.STANDARD_LABEL] * 5 + [collapse.HEAVY_LABEL]


def test_spread_and_lifespan_rows_and_the_ladder_figures_from_constructed_rungs():
    import pandas as pd

    from wilke_lib.analysis import plots

    reported = {"causal_peak_top_share": 0.875, "causal_peak_distinct": 7}
    table = {"rungs": [rung(96, [9, 8, 0]) | reported, rung(192, [64, 40, 48]) | reported,
                       rung(192, [64, None, None], heavy=True) | {"rome_collapsed": [True, None, None]} | reported,
                       rung(384, [32, 32, 16])]}  # no report yet: no spread to place
    spread = collapse.spread_and_lifespan(table)
    assert list(spread["name"].unique()) == ["toy-gpt2-w96", "toy-gpt2-w192", "toy-gpt2-x4-w192"]
    assert spread.groupby("name", sort=False)["collapse step"].apply(list).tolist() == [[9, 8], [64, 40, 48], [64]]
    medians = spread.groupby("name", sort=False)["median collapse"].first()
    assert medians["toy-gpt2-w96"] == 9 and medians["toy-gpt2-w192"] == 48 and pd.isna(medians["toy-gpt2-x4-w192"])
    assert set(spread["world"]) == {collapse.STANDARD_LABEL, collapse.HEAVY_LABEL}
    assert collapse.rome_curves({"rungs": [untrained(96)]}).empty
    fig = plots.spread_lifespan_figure(spread)
    assert len(fig.axes) == 1 and fig.axes[0].get_xscale() == "log"
    curves = pd.DataFrame([{"name": n, "d_mlp": w, "world": world, "seed": 9, "step": step, "S": s}
                           for n, w, world in [("toy-gpt2-w96", 96, collapse.STANDARD_LABEL),
                                               ("toy-gpt2-x4-w192", 192, collapse.HEAVY_LABEL)]
                           for step, s in [(1, 90.0), (2, 80.0), (4, 40.0)]])
    paper = pd.DataFrame({"model": ["gpt2-xl"] * 3, "step": [1, 32, 64], "mean": [0.9, 0.64, 0.14]})
    lines = plots.ladder_curves_figure(curves, paper).axes[0].get_lines()
    drawn = {line.get_label(): line for line in lines}
    assert drawn["toy-gpt2-x4-w192 (1 seed)"].get_marker() == "D" and drawn["toy-gpt2-x4-w192 (1 seed)"].get_color() == "C2"
    assert drawn["toy-gpt2-w96 (1 seed)"].get_color() == "C1" and "gpt2-xl, authors' ROME" in drawn


def test_norm_at_collapse_and_the_committed_proxies(tmp_path, monkeypatch):
    import json
    from types import SimpleNamespace

    import pandas as pd

    steps = pd.DataFrame({"step": [1, 2, 3, 4], "original_norms": [{"2": 20.0}] * 4,
                          "layer_norms": [{"2": v} for v in (21.0, 40.0, 80.0, 100.0)]})
    fake = SimpleNamespace(steps=steps)
    monkeypatch.setattr(collapse, "run_rung", lambda name, compute=False: [fake, fake, None, None])
    table = {"rungs": [rung(192, [2, 0, 3]), untrained(384)]}  # seed 10: no collapse; seed 11: no run
    rows = collapse.norm_at_collapse(table)
    assert rows[["seed", "collapse step", "norm ratio at collapse", "last step", "norm ratio at the last step"]
                ].values.tolist() == [[9, 2, 2.0, 4, 5.0]]
    monkeypatch.setattr(collapse, "LADDER_FILE", tmp_path / "ladder.json")
    assert collapse.committed_proxies().empty  # no file yet
    (tmp_path / "ladder.json").write_text(json.dumps({"rungs": [
        {"name": "toy-gpt2-w48", "rome_update_rel_norm": 0.7, "alphaedit_null_share": 0.25}, {"name": "toy-gpt2-w96"}]}))
    proxies = collapse.committed_proxies()
    assert proxies["name"].tolist() == ["toy-gpt2-w48"] and proxies.loc[0, "alphaedit_null_share"] == 0.25


@pytest.mark.slow
def test_single_edit_proxies_on_the_narrow_rung():
    """ROME's single-edit proxies and AlphaEdit's null-space share on width 48 (the book's toy-gpt2), two records."""
    found = ladder.proxies("toy-gpt2-w48", n_records=2, n_probes=4)
    assert set(found) == set(ladder.PROXY_KEYS)
    assert 0 < found["rome_update_rel_norm"] and 0 <= found["rome_residue_after_rollback"]
    assert 0 <= found["retention_lost_after_one_edit"] <= 1 and 0 < found["alphaedit_null_share"] < 1


def test_ladder_json_lists_every_rung_and_keeps_the_proxies_it_does_not_measure_again(tmp_path, monkeypatch):
    import json

    monkeypatch.setattr(ladder, "LADDER_FILE", tmp_path / "ladder.json")
    (tmp_path / "ladder.json").write_text(json.dumps({"rungs": [
        {"name": "toy-gpt2-w48", "rome_update_rel_norm": 0.75}, {"name": "toy-gpt2-w96", "rome_update_rel_norm": 0.53}]}))
    monkeypatch.setattr(ladder, "rung_row", lambda name, proxies=False: {
        **rung(ladder.LADDER[name].d_mlp, [5, 6, 3]), "name": name, **({"rome_update_rel_norm": 0.1} if proxies else {})})
    written = {}
    monkeypatch.setattr(ladder, "write_json_atomic", lambda path, table: written.update(table))
    ladder.main(["--proxies", "--names", "toy-gpt2-w96"])
    rows = {r["name"]: r for r in written["rungs"]}
    assert set(rows) == {n for n in ladder.LADDER if n.startswith("toy-gpt2-")}  # every rung, not only --names
    assert rows["toy-gpt2-w96"]["rome_update_rel_norm"] == 0.1 and rows["toy-gpt2-w48"]["rome_update_rel_norm"] == 0.75


def test_run_rung_runs_only_the_seeds_asked_for(monkeypatch):
    ran = []
    monkeypatch.setattr(ladder.lifelong, "run_many", lambda loader, records, configs, **kw: ran.extend(configs) or [])
    monkeypatch.setattr(ladder.counterfact, "load_counterfact", lambda name: [])
    ladder.run_rung("toy-gpt2-w48", seeds=[9])
    assert [(c.editor, c.seed) for c in ran] == [("rome", 9), ("ft", 9)]
    ran.clear()
    ladder.run_rung("toy-gpt2-w48", seeds=[10, 11])
    assert [(c.editor, c.seed) for c in ran] == [("rome", 10), ("rome", 11)]
