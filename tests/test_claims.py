"""The paper's claims as tests that can fail: each test of `wilke_lib.claims` on constructed runs that give
each of its outcomes (reproduced, partly, not reproduced, not testable here)."""

import math

import pandas as pd
import pytest

from wilke_lib import claims
from wilke_lib.analysis import flash


def curve(editor: str, seed: int, s_by_step: dict[int, float], es: float = 1.0) -> pd.DataFrame:
    """One run's checkpoints, S and ES as fractions."""
    return pd.DataFrame({"editor": editor, "seed": seed, "step": list(s_by_step), "S": list(s_by_step.values()),
                         "ES": es})


def evidence(final_s: dict[tuple[str, int], float], curves: list[pd.DataFrame] | None = None,
             controls: list[pd.DataFrame] | None = None) -> claims.LifelongEvidence:
    finals = pd.DataFrame([{"editor": e, "seed": s, "S": v} for (e, s), v in final_s.items()])
    if curves is None:  # a run that starts at 90 and ends at its final S
        curves = [curve(e, s, {1: 0.9, 1024: v / 100}) for (e, s), v in final_s.items()]
    return claims.LifelongEvidence(finals, pd.concat(curves, ignore_index=True), 1024, "test runs",
                                   pd.concat(controls, ignore_index=True) if controls else None)


SEEDS = (9, 10, 11)


def test_wilke_beats_sota_is_decided_per_seed_and_not_at_the_floor():
    def ev(wilke, memit):
        return evidence({**{("WilKE", s): w for s, w in zip(SEEDS, wilke)},
                         **{("MEMIT", s): m for s, m in zip(SEEDS, memit)}, ("ROME", 9): 1.0})

    assert claims.wilke_beats_sota(ev([20, 21, 22], [10, 11, 12])).verdict == "reproduced"
    # a mean win that is a tie in two seeds is not a win in every seed
    out = claims.wilke_beats_sota(ev([10, 10, 40], [10, 10, 12]))
    assert out.verdict == "partly" and "1 of 3 seeds" in out.number
    assert claims.wilke_beats_sota(ev([5, 6, 7], [10, 11, 12])).verdict == "not reproduced"
    floor = claims.wilke_beats_sota(ev([0.05, 0.05, 0.05], [0.05, 1.5, 3.0]))
    assert floor.verdict == "not testable here" and "at least 5" in floor.precondition and "1.5" in floor.precondition
    assert "3 seeds" in floor.n and "test runs" in floor.n
    missing = claims.wilke_beats_sota(evidence({("ROME", 9): 10.0}))
    assert missing.verdict == "not testable here" and "WilKE" in missing.precondition


def test_editors_fail_needs_single_edits_that_work():
    finals = {("ROME", 9): 9.0, ("MEMIT", 9): 13.0}
    assert claims.editors_fail(evidence(finals)).verdict == "reproduced"
    assert claims.editors_fail(evidence({("ROME", 9): 9.0, ("MEMIT", 9): 60.0})).verdict == "partly"
    assert claims.editors_fail(evidence({("ROME", 9): 70.0, ("MEMIT", 9): 60.0})).verdict == "not reproduced"
    broken = [curve(e, 9, {1: 0.0, 1024: 0.0}, es=0.0) for e in ("ROME", "MEMIT")]
    out = claims.editors_fail(evidence(finals, broken))
    assert out.verdict == "not testable here" and "ES at step 1 ROME 0%" in out.precondition


def test_degradation_needs_a_working_start_and_a_fall_by_half_in_every_seed():
    falls = [curve(e, s, {1: 0.9, 64: 0.8, 1024: 0.1}) for e in ("ROME", "MEMIT", "WilKE") for s in SEEDS]
    finals = {(e, s): 10.0 for e in ("ROME", "MEMIT", "WilKE") for s in SEEDS}
    assert claims.degradation(evidence(finals, falls)).verdict == "reproduced"
    holds = [curve("WilKE", s, {1: 0.9, 1024: 0.8}) for s in SEEDS]
    assert claims.degradation(evidence(finals, falls[:6] + holds)).verdict == "partly"
    assert claims.degradation(evidence(finals, [curve(e, s, {1: 0.9, 1024: 0.85}) for e in ("ROME", "MEMIT", "WilKE")
                                                 for s in SEEDS])).verdict == "not reproduced"
    dead = claims.degradation(evidence(finals, [curve(e, 9, {1: 0.01, 1024: 0.0}) for e in ("ROME", "MEMIT", "WilKE")]))
    assert dead.verdict == "not testable here" and "below: ROME 1.0" in dead.precondition


def test_collapse_step_uses_the_running_peak():
    s = pd.Series({1: 0.0, 2: 80.0, 4: 70.0, 8: 30.0, 16: 20.0})
    assert claims.collapse_step(s) == 8  # the failed first step does not hide the collapse
    assert math.isnan(claims.collapse_step(pd.Series({1: 80.0, 1024: 60.0})))


def test_collapses_later_per_seed_and_only_when_rome_works_and_collapses():
    def run(editor, seed, collapse_at):
        steps = [1, 2, 4, 8, 16, 32, 64, 128]
        return curve(editor, seed, {t: (0.8 if t < collapse_at else 0.1) for t in steps})

    finals = {(e, s): 5.0 for e in ("ROME", "WilKE") for s in SEEDS}
    later = [run("ROME", s, 8) for s in SEEDS] + [run("WilKE", s, 32) for s in SEEDS]
    assert claims.collapses_later(evidence(finals, later)).verdict == "reproduced"
    # the case: equal steps in every seed is no delay, whatever an average over seeds shows
    tie = [run("ROME", s, c) for s, c in zip(SEEDS, (8, 8, 4))] + [run("WilKE", s, c) for s, c in zip(SEEDS, (8, 8, 4))]
    out = claims.collapses_later(evidence(finals, tie))
    assert out.verdict == "not reproduced" and "WilKE 8 / 8 / 4" in out.number
    mixed = [run("ROME", s, 8) for s in SEEDS] + [run("WilKE", s, c) for s, c in zip(SEEDS, (16, 8, 8))]
    assert claims.collapses_later(evidence(finals, mixed)).verdict == "partly"
    never = [curve("ROME", s, {1: 0.8, 1024: 0.7}) for s in SEEDS] + [run("WilKE", s, 8) for s in SEEDS]
    out = claims.collapses_later(evidence(finals, never))
    assert out.verdict == "not testable here" and "collapses within" in out.precondition


def test_declines_most_compares_drops_from_the_best():
    def run(editor, seed, last):
        return curve(editor, seed, {1: 0.8, 1024: last})

    finals = {(e, s): 5.0 for e in ("MEMIT", "ROME", "WilKE") for s in SEEDS}
    base = [run("ROME", s, 0.3) for s in SEEDS] + [run("WilKE", s, 0.4) for s in SEEDS]
    assert claims.declines_most(evidence(finals, base + [run("MEMIT", s, 0.1) for s in SEEDS])).verdict == "reproduced"
    assert claims.declines_most(evidence(finals, base + [run("MEMIT", s, v) for s, v in zip(SEEDS, (0.1, 0.5, 0.5))])
                                ).verdict == "partly"
    assert claims.declines_most(evidence(finals, base + [run("MEMIT", s, 0.6) for s in SEEDS])).verdict == "not reproduced"
    low = [curve(e, s, {1: 0.02, 1024: 0.0}) for e in ("MEMIT", "ROME", "WilKE") for s in SEEDS]
    assert claims.declines_most(evidence(finals, low)).verdict == "not testable here"


def test_layer_per_fact_is_tested_against_rome_at_wilkes_layers():
    finals = {("WilKE", s): 5.0 for s in SEEDS}
    wilke = [curve("WilKE", s, {1: 0.9, 64: 0.6, 1024: 0.2}) for s in SEEDS]
    choices = pd.Series({2: 600, 3: 50, 5: 374})

    def controls(value_at_64):
        return [curve(f"ROME @ layer {l}", s, {1: 0.9, 64: value_at_64, 1024: 0.1}) for l in (2, 5) for s in SEEDS]

    assert claims.layer_per_fact(evidence(finals, wilke, controls(0.3)), choices).verdict == "reproduced"
    assert claims.layer_per_fact(evidence(finals, wilke, controls(0.9)), choices).verdict == "not reproduced"
    mixed = controls(0.3)[:5] + [curve("ROME @ layer 5", 11, {1: 0.9, 64: 0.95, 1024: 0.3})]
    assert claims.layer_per_fact(evidence(finals, wilke, mixed), choices).verdict == "partly"
    out = claims.layer_per_fact(evidence(finals, wilke), choices)
    assert out.verdict == "not testable here" and "ROME @ layer 2 seed 9" in out.precondition
    assert "layer 2: 59%" in out.number
    one = claims.layer_per_fact(evidence(finals, wilke, controls(0.3)), pd.Series({4: 1024, 5: 0}))
    assert one.verdict == "not testable here" and "1 layer" in one.number


def test_ablation_outcomes():
    s = {"WilKE eq10 full": 80.0, "WilKE eq10 w/o delta": 70.0, "WilKE eq10 w/o activation": 80.0,
         "WilKE eq10 w/o ||W_proj||": 79.0}
    assert claims.ablation(s).verdict == "partly"
    assert claims.ablation({**s, "WilKE eq10 w/o activation": 70.0}).verdict == "reproduced"
    assert claims.ablation({**s, "WilKE eq10 w/o delta": 80.0, "WilKE eq10 w/o ||W_proj||": 95.0}
                           ).verdict == "not reproduced"
    same = pd.DataFrame([[8, 0]] * 4, index=list(s), columns=[0, 3])
    assert claims.ablation(s, layer_choices=same).verdict == "not testable here"
    low = claims.ablation({k: v / 100 for k, v in s.items()})
    assert low.verdict == "not testable here" and "highest: 0.8" in low.precondition


def scored_run(edit, rollback, norms) -> pd.DataFrame:
    """A lifelong ROME run's per-step table, scored by the detector."""
    table = pd.DataFrame({"step": range(1, len(edit) + 1), "case_id": range(100, 100 + len(edit)),
                          "edit_success": edit, "rollback_success": rollback, "norm": norms, "failed": False})
    return flash.score_flash(table, original_norm=norms[0] - 0.01)


def flash_analysis(scored: pd.DataFrame) -> flash.FlashAnalysis:
    app_b = flash.app_b_flash(scored)
    return flash.FlashAnalysis(layer=2, sequence=[], recording=None, scored=scored,
                               flagged=scored[scored["flash"]], flash_records=[], normal_records=[], settings={},
                               app_b=app_b)


def test_toxicity_flash_needs_a_working_model_and_a_successful_edit():
    n = 128
    norms = [10 + 0.01 * i for i in range(n)]
    spike = norms[:40] + [norms[40] + 5] + [x + 5 for x in norms[41:]]
    working = [1.0] * n
    rollback = working[:40] + [0.0] + working[41:]
    found = claims.toxicity_flash(flash_analysis(scored_run(working, rollback, spike)))
    assert found.verdict == "reproduced" and "1 meet App. B's definition" in found.number
    # the same spike with a failed edit is not App. B's flash
    failed_edit = working[:40] + [0.0] + working[41:]
    assert claims.toxicity_flash(flash_analysis(scored_run(failed_edit, rollback, spike))).verdict == "not reproduced"
    # a model that collapsed at step 4: every rollback fails, nothing can be singled out
    collapsed = [1.0] * 3 + [0.0] * (n - 3)
    out = claims.toxicity_flash(flash_analysis(scored_run(working, collapsed, spike)))
    assert out.verdict == "not testable here" and "at least 94 steps" in out.precondition
    # a model that works for 38 steps: at the paper's rate no flash is expected there, so none says nothing
    short = [1.0] * 40 + [0.0] * (n - 40)
    assert claims.toxicity_flash(flash_analysis(scored_run(working, short, spike))).verdict == "not testable here"


def test_memit_outcomes_and_outcome_validation():
    per_layer = pd.DataFrame({"layer": [0, 1], "buildup rho": [0.9, 0.95], "max ||W||/||W_0||": [1.2, 1.5],
                              "steps with a jump > 10 x median": [0, 0]})
    out = claims.memit_verdicts(per_layer, 5.0, n="8 edits")
    assert out["memit_buildup"].verdict == "reproduced" and out["memit_conceals_flash"].verdict == "reproduced"
    assert claims.memit_verdicts(per_layer, float("nan"))["memit_conceals_flash"].verdict == "not testable here"
    with pytest.raises(ValueError, match="not one of"):
        claims.Outcome("maybe", "")


def test_not_testable_must_name_its_precondition(tmp_path, monkeypatch):
    monkeypatch.setattr(claims, "results_dir", lambda *a, **k: tmp_path)
    with pytest.raises(ValueError, match="precondition"):
        claims.record_claim("toy-gpt2", "03_lifelong", "wilke_beats_sota", "not testable here", "")
    record = claims.record_claim("toy-gpt2", "03_lifelong", "wilke_beats_sota", "not testable here", "S 0.1 vs 0.2",
                                 precondition="S at least 5", n="1,024 edits x 3 seeds")
    cell = record["claims"]["wilke_beats_sota"]
    assert cell["precondition"] == "S at least 5" and cell["n"] == "1,024 edits x 3 seeds"


def test_every_registered_claim_with_a_test_states_its_precondition():
    reg = claims.registry()
    for claim_id in [*claims.LIFELONG_TESTS, "layer_per_fact", "ablation", "toxicity_flash",
                     "predefined_layer_causes_flash", "flash_from_early_mlps", "pattern_unmatch"]:
        assert reg[claim_id].precondition, claim_id
    assert "normal records' peaks are dispersed" not in reg["flash_from_early_mlps"].rows  # a design target
    assert not reg["toxicity_flash"].rows  # decided by App. B's definition, not by the detector's count


def test_flash_recurs_over_orders_and_models():
    edited = {"seed 9": {1, 2, 3, 4}, "seed 10": {1, 2, 3, 5}}
    assert claims.flash_recurs({"seed 9": {1, 2}, "seed 10": {1, 2}}, edited, "").verdict == "reproduced"
    assert claims.flash_recurs({"seed 9": {1, 2}, "seed 10": {1, 5}}, edited, "").verdict == "reproduced"  # 2 of 3
    assert claims.flash_recurs({"seed 9": {1, 2}, "seed 10": {1, 5}}, edited, "", majority=0.9).verdict == "partly"
    assert claims.flash_recurs({"seed 9": {1}, "seed 10": {5}}, edited, "").verdict == "not reproduced"
    out = claims.flash_recurs({"seed 9": {4}, "seed 10": set()}, edited, "")
    assert out.verdict == "not testable here" and out.precondition.endswith(": 0")


def test_a_lifelong_rome_run_is_screened_by_app_b():
    n = 40
    steps = pd.DataFrame({"step": range(1, n + 1), "case_id": range(n), "ES": 1.0,
                          "rollback_success": [1.0] * 30 + [0.0] + [1.0] * 9, "failed": False,
                          "weight_norms_after_rollback": [{"h.2.w": 10 + 0.01 * i + (5 if i >= 30 else 0)}
                                                          for i in range(n)]})
    scored = flash.scored_lifelong_run(type("Run", (), {"steps": steps})())
    assert list(flash.app_b_flash(scored)["case_id"]) == [30]


def test_n_names_each_editors_seeds_when_they_differ():
    ev = evidence({("ROME", 9): 1.0, ("ROME", 10): 1.0, ("WilKE", 9): 1.0})
    assert ev.n("ROME", "WilKE") == "1,024 edits; seeds: ROME 9 / 10, WilKE 9, test runs"
    assert ev.n("ROME") == "1,024 edits x 2 seeds (9, 10), test runs"


def test_curve_shapes_compare_each_row_with_the_paper_per_seed():
    steps = claims.SHAPE_STEPS
    plateau_cliff = {s: (0.8 if s < 64 else 0.1) for s in steps}     # the paper's ROME
    early_cliff = {s: (0.8 if s < 8 else 0.1) for s in steps}        # an organism that collapses at 8
    paper = pd.concat([curve(e, "paper", plateau_cliff) for e in ("ROME", "MEMIT", "WilKE")], ignore_index=True)

    def ev(shapes: dict[str, list[dict]]):
        curves = [curve(e, seed, c) for e, per_seed in shapes.items() for seed, c in zip(SEEDS, per_seed)]
        finals = {(e, seed): 10.0 for e, per_seed in shapes.items() for seed in SEEDS[:len(per_seed)]}
        base = evidence(finals, curves)
        return claims.LifelongEvidence(base.finals, base.curves, 1024, "test runs", paper=paper)

    # the same shape at half the level is the same shape
    half = {s: v / 2 for s, v in plateau_cliff.items()}
    same = claims.curve_shapes(ev({e: [half] * 3 for e in ("ROME", "MEMIT", "WilKE")}))
    assert same.verdict == "reproduced" and "ROME 0.00 / 0.00 / 0.00" in same.number
    out = claims.curve_shapes(ev({e: [early_cliff] * 3 for e in ("ROME", "MEMIT", "WilKE")}))
    assert out.verdict == "not reproduced" and "(not reproduced)" in out.number
    # one row in every seed, another in one seed only
    mixed = claims.curve_shapes(ev({"ROME": [half] * 3, "MEMIT": [half, early_cliff, early_cliff],
                                    "WilKE": [early_cliff] * 3}))
    assert mixed.verdict == "partly" and "MEMIT 0.00 / 0.24 / 0.24 (partly)" in mixed.number
    # a row whose curve never works is left out and named in the precondition
    dead = {s: 0.01 for s in steps}
    partial = claims.curve_shapes(ev({"ROME": [half] * 3, "MEMIT": [dead] * 3, "WilKE": [half] * 3}))
    assert partial.verdict == "reproduced" and "MEMIT: best S paper 80.0, ours 1.0" in partial.precondition
    none = claims.curve_shapes(ev({e: [dead] * 3 for e in ("ROME", "MEMIT", "WilKE")}))
    assert none.verdict == "not testable here"
    no_paper = claims.curve_shapes(evidence({("ROME", 9): 10.0}))
    assert no_paper.verdict == "not testable here" and "authors' curves" in no_paper.precondition
