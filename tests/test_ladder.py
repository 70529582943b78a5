"""The width ladder's rule (`wilke_lib.ladder.choose`), fixed before any WilKE or MEMIT run on the chosen
organism: each of its outcomes on constructed rungs."""

import math

from wilke_lib import ladder


def rung(width, steps, met=True, relaxed=True):
    return {"name": f"toy-gpt2-w{width}", "d_mlp": width, "trained": True, "targets_met": met,
            "targets_met_relaxed": relaxed, "rome_collapse_steps": [s if s else None for s in steps],
            "rome_collapsed": [bool(s) for s in steps]}


def untrained(width):
    return {"name": f"toy-gpt2-w{width}", "d_mlp": width, "trained": False}


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


def test_tiers_two_and_three():
    rows = [rung(48, [8, 8, 4]), rung(96, [16, 10, 9]), rung(192, [20, 16, 16]), rung(384, [40, 64, 50], met=False)]
    assert "train toy-gpt2-w768" in ladder.choose(rows + [untrained(768)])["reason"]
    assert "tier 2" in ladder.choose(rows)["reason"] and ladder.choose(rows)["chosen"] is None
    decision = ladder.choose(rows, tier2_out_of_reach=True)
    assert decision["chosen"] == "toy-gpt2-w384" and decision["tier"] == 3
    none = [rung(48, [8, 8, 4], relaxed=False)]
    assert ladder.choose(none, tier2_out_of_reach=True)["chosen"] is None


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
    exact = ladder.power_law(widths, [0.1 * w for w in widths])
    assert abs(exact["slope"] - 1) < 1e-9 and exact["slope_1_inside"]
    noisy = ladder.power_law(widths, [w ** 2 * f for w, f in zip(widths, (1.1, 0.9, 1.2, 0.8, 1.0, 1.05, 0.95))])
    assert 1.8 < noisy["slope"] < 2.2 and noisy["ci_low"] < noisy["slope"] < noisy["ci_high"]
    assert noisy["slope_1_inside"] is False
    assert math.isnan(ladder.power_law([48, 48, 48], [4, 8, 8])["slope"])
    table = {"rungs": [rung(48, [8, 8, 4]), rung(96, [16, 0, 9]), untrained(192)]}
    points = ladder.collapse_points(table)
    assert [(p["d_mlp"], p["seed"], p["collapse step"]) for p in points] == [
        (48, 9, 8), (48, 10, 8), (48, 11, 4), (96, 9, 16), (96, 11, 9)]
