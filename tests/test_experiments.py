"""The computed verdicts of chapters 3 and 12 (`experiments`): collapse steps, the paper-scale sentences,
the consecutive-batch tables and sentences, from small hand-made tables whose answers are known."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pandas as pd

from wilke_lib import experiments


def curves(editor: str, s_by_step: dict[int, list[float]]) -> pd.DataFrame:
    return pd.DataFrame([{"editor": editor, "seed": seed, "step": step, "S": s}
                         for step, values in s_by_step.items() for seed, s in enumerate(values)])


def test_collapse_is_measured_against_the_running_peak_not_a_failed_first_step():
    # one failed rollback at step 1 gives S ~ 0 there; the run works until step 8 and collapses at 16
    frame = curves("AlphaEdit", {1: [0.0005], 2: [0.8], 4: [0.75], 8: [0.5], 16: [0.3], 32: [0.1]})
    row = experiments.collapse_steps(frame).set_index("editor").loc["AlphaEdit"]
    assert row["collapse step"] == 16 and math.isclose(row["S peak"], 80.0) and row["peak step"] == 2
    assert math.isclose(row["S first"], 0.05)


def test_collapse_step_is_the_first_checkpoint_below_half_the_start():
    frame = pd.concat([curves("ROME", {1: [0.9, 1.0], 2: [0.8, 0.8], 4: [0.5, 0.4], 8: [0.1, 0.1]}),
                       curves("WilKE", {1: [0.9, 0.9], 2: [0.8, 0.8], 4: [0.7, 0.7]})])
    table = experiments.collapse_steps(frame).set_index("editor")
    assert table.loc["ROME", "collapse step"] == 4 and math.isclose(table.loc["ROME", "S at collapse"], 45.0)
    assert math.isnan(table.loc["WilKE", "collapse step"]) and table.loc["WilKE", "last step"] == 4
    sentences = experiments.scale_verdicts(
        pd.DataFrame({"editor": ["ROME", "WilKE"], "S": [10.0, 5.0]}), experiments.collapse_steps(frame),
        pd.DataFrame({"editor": ["ROME", "WilKE"], "S": [9.3, 19.3]}), 1024)
    assert sentences[0] == ("After 1,024 edits WilKE (S 5.0) does not beat ROME (S 10.0): -50%; the paper: 19.3 vs "
                            "9.3 (+108%).")
    assert "ROME collapses at step 4" in sentences[1] and "WilKE does not collapse" in sentences[2]
    against_zero = experiments.scale_verdicts(
        pd.DataFrame({"editor": ["MEMIT", "WilKE"], "S": [3.9, 0.0]}), experiments.collapse_steps(frame.iloc[:0]),
        pd.DataFrame({"editor": ["MEMIT", "WilKE"], "S": [0.0, 14.6]}), 1024)
    assert against_zero == ["After 1,024 edits WilKE (S 0.0) does not beat MEMIT (S 3.9): -100%; the paper: 14.6 vs "
                            "0.0 (no ratio: the other's S is 0)."]


def run(editor: str, batch_size: int, final: dict, checkpoints: list[dict]) -> SimpleNamespace:
    steps = pd.DataFrame({"failed": [False, True], "seconds": [2.0, 2.0], "n_requests": [2, 2]})
    return SimpleNamespace(config=SimpleNamespace(editor=editor, batch_size=batch_size), final=final, steps=steps,
                           checkpoints=pd.DataFrame(checkpoints))


def test_consecutive_tables_repeat_a_one_at_a_time_editor_in_every_column():
    final = {"efficacy": 0.5, "generalization": 0.4, "locality": 0.3, "kept": 0.2}
    point = [{"edits": 4, "efficacy": 0.5, "locality": 0.3, "kept": 0.2}]
    runs = [run("rome", 1, final, point), run("comeba_hk", 8, {**final, "kept": 0.9}, point)]
    table, checkpoints = experiments.consecutive_tables(runs, (1, 8))
    assert sorted(zip(table["editor"], table["batch size"])) == [("COMEBA-HK", 8), ("ROME", 1), ("ROME", 8)]
    assert set(table["failed batches"]) == {1} and set(table["s per edit"]) == {1.0}
    assert len(checkpoints) == 3  # ROME drawn in both columns
    sentences = experiments.consecutive_verdicts(table)
    assert sentences[1].startswith("Batches of 8: the edits are best retained by") and "COMEBA-HK (90.0%)" in sentences[1]


def test_consecutive_verdicts_set_alphaedit_and_comeba_hk_against_memit():
    table = pd.DataFrame([{"editor": e, "batch size": 10, "efficacy": eff, "locality": loc, "kept": kept}
                          for e, eff, loc, kept in (("MEMIT", 2.0, 5.0, 5.0), ("AlphaEdit", 6.0, 20.0, 19.0),
                                                    ("COMEBA-HK", 1.0, 70.0, 71.0))])
    (sentence,) = experiments.consecutive_verdicts(table)
    assert "AlphaEdit vs MEMIT efficacy 6.0 vs 2.0, locality 20.0 vs 5.0, kept 19.0 vs 5.0 (ahead on all three)" in sentence
    assert "COMEBA-HK vs MEMIT efficacy 1.0 vs 2.0" in sentence and "(ahead on locality and kept only)" in sentence


def test_an_editor_keeps_its_colour_in_every_panel_of_the_consecutive_figure():
    from wilke_lib.analysis import plots

    rows = [{"editor": e, "batch size": b, "edits": n, "efficacy": v, "locality": v, "kept": v}
            for b, editors in ((1, ["ROME", "MEMIT", "WilKE"]), (8, ["WilKE", "MEMIT"]))
            for e in editors for n, v in ((1, 1.0), (8, {"ROME": 0.2, "MEMIT": 0.4, "WilKE": 0.6}[e]))]
    fig = plots.consecutive_figure(pd.DataFrame(rows))
    colours = {}
    for ax in fig.axes:
        for line in ax.get_lines():
            colours.setdefault(line.get_label(), set()).add(line.get_color())
    assert set(colours) == {"ROME", "MEMIT", "WilKE"} and all(len(c) == 1 for c in colours.values())
    assert len({next(iter(c)) for c in colours.values()}) == 3


def test_top_layers_unites_both_wilke_rules_and_collapse_beside_paper_is_per_seed():
    from types import SimpleNamespace

    def run(layers):
        return SimpleNamespace(steps=pd.DataFrame({"edit_layers": [[l] for l in layers]}))

    grouped = {"WilKE": [run([3, 3, 2, 5])], "WilKE (Eq. 10)": [run([2, 2, 5, 5, 5, 4])], "ROME": [run([2] * 9)]}
    assert experiments.top_layers(grouped) == [2, 3, 5]
    assert experiments.top_layers({"ROME": grouped["ROME"]}) == []
    curves = pd.DataFrame({"editor": "ROME", "seed": [9] * 4 + [10] * 4, "step": [1, 2, 4, 8] * 2,
                           "S": [0.9, 0.8, 0.3, 0.1, 0.9, 0.9, 0.8, 0.2]})
    table = experiments.collapse_beside_paper(curves, "toy-gpt2").set_index("editor")
    assert table.loc["ROME", "paper (gpt2-xl)"] == "64" and table.loc["ROME", "toy-gpt2, per seed"] == "4 / 8"
    assert table.loc["WilKE", "paper (gpt2-xl)"] == "512" and table.loc["WilKE", "toy-gpt2, per seed"] == "–"
