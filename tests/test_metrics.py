"""Metrics of Appendix F.2 on hand-made cases: S, confidence intervals, Table-1 summaries, ES/PS/NS."""

from __future__ import annotations

import math

import pytest

from wilke_lib.lifelong import Backend, evaluate_edit
from wilke_lib.metrics import (
    METRICS,
    harmonic_mean,
    mean_ci95,
    relative_improvement,
    score_S,
    summarise_runs,
    t_quantile_975,
)


def test_harmonic_mean_plain() -> None:
    assert harmonic_mean([1.0, 1.0, 1.0]) == pytest.approx(1.0)
    assert harmonic_mean([0.5, 0.25]) == pytest.approx(2 / (2 + 4))


def test_harmonic_mean_zero_counts_as_1e_4() -> None:
    assert harmonic_mean([0.0, 1.0]) == pytest.approx(2 / (1e4 + 1))
    assert harmonic_mean([0.0, 0.0]) == pytest.approx(1e-4)
    assert harmonic_mean([0.0, 0.5], zero=0.1) == pytest.approx(2 / (10 + 2))


@pytest.mark.parametrize("bad", [[], [1.5], [-0.1], [math.nan]])
def test_harmonic_mean_rejects_bad_input(bad: list[float]) -> None:
    with pytest.raises(ValueError):
        harmonic_mean(bad)


def test_score_S_is_harmonic_mean_of_five() -> None:
    expected = 5 / (1 / 0.8 + 1 / 0.5 + 1 / 0.4 + 1 / 0.1 + 1 / 0.2)
    assert score_S(0.8, 0.5, 0.4, 0.1, 0.2) == pytest.approx(expected)
    # MEMIT on GPT-J in Table 1: ERS = ORS = 0 drive S to ~0.
    assert score_S(0.321, 0.238, 0.093, 0.0, 0.0) < 3e-4


def test_mean_ci95_by_hand() -> None:
    # [1, 2, 3]: mean 2, s = 1, t(0.975, 2) = 4.302653 -> 4.302653 / sqrt(3).
    mean, half = mean_ci95([1.0, 2.0, 3.0])
    assert mean == pytest.approx(2.0)
    assert half == pytest.approx(4.302653 / math.sqrt(3), rel=1e-6)
    # [0.1, 0.2, 0.4, 0.3]: mean 0.25, s^2 = 0.05 / 3, t(0.975, 3) = 3.182446.
    mean, half = mean_ci95([0.1, 0.2, 0.4, 0.3])
    assert mean == pytest.approx(0.25)
    assert half == pytest.approx(3.182446 * math.sqrt(0.05 / 3) / 2, rel=1e-6)


def test_mean_ci95_single_sample_and_empty() -> None:
    assert mean_ci95([0.7]) == (0.7, 0.0)
    assert mean_ci95([0.3, 0.3, 0.3]) == (pytest.approx(0.3), pytest.approx(0.0))
    with pytest.raises(ValueError):
        mean_ci95([])


@pytest.mark.parametrize("dof, value", [(1, 12.706205), (10, 2.228139), (30, 2.042272),
                                        (40, 2.021075), (60, 2.000298), (120, 1.979930)])
def test_t_quantile(dof: int, value: float) -> None:
    assert t_quantile_975(dof) == pytest.approx(value, abs=2e-5)


def test_summarise_runs_in_table1_format() -> None:
    finals = [dict(ES=0.8, PS=0.5, NS=0.1, ERS=0.2, ORS=0.1),
              dict(ES=0.6, PS=0.5, NS=0.1, ERS=0.2, ORS=0.3),
              dict(ES=0.7, PS=0.5, NS=0.1, ERS=0.2, ORS=0.2)]
    table = summarise_runs(finals, model="toy-gpt2", editor="WilKE")
    assert list(table.columns) == (["model", "editor"] + [c for m in METRICS for c in (m, f"{m}_ci", f"{m}_std")]
                                   + ["n_runs"])
    row = table.iloc[0]
    assert row["ES"] == pytest.approx(70.0)
    assert row["ES_ci"] == pytest.approx(4.302653 * 10 / math.sqrt(3), rel=1e-6)
    assert row["PS_ci"] == pytest.approx(0.0)
    assert row["ES_std"] == pytest.approx(10 * math.sqrt(2 / 3))  # np.std: ddof 0, as the authors print it
    s_values = [100 * score_S(*(f[k] for k in ("ES", "PS", "NS", "ERS", "ORS"))) for f in finals]
    assert row["S"] == pytest.approx(sum(s_values) / 3)  # S per run, then averaged
    assert row["n_runs"] == 3


def test_relative_improvement_matches_paper_claims() -> None:
    # Abstract: +46.2% (GPT2-XL, WilKE 19.3 vs MEMIT 13.2) and +67.8% (GPT-J, 14.6 vs ROME 8.7).
    assert relative_improvement(19.3, 13.2) == pytest.approx(0.462, abs=5e-4)
    assert relative_improvement(14.6, 8.7) == pytest.approx(0.678, abs=5e-4)
    assert relative_improvement(1.0, 0.0) == math.inf
    assert math.isnan(relative_improvement(0.0, 0.0))


# ---- ES / PS / NS of one record with multi-token targets, through a fake greedy matcher ----
_CONTINUATIONS = {  # what greedy decoding "generates" after each prompt, word = token
    "The capital of Ardenia is": "New Paris and more",
    "Ardenia's capital city is": "New Paris",
    "Ardenia has its capital at": "New York",
    "The capital of Belmar is": "Old Town Road",
    "The capital of Corvia is": "Old Town",
    "The capital of Dunmere is": "Old",
}


def _word_matcher(model: object, tok: object, prompts: list[str], targets: list[str],
                  batch_size: int = 64) -> list[bool]:
    """Greedy exact match of every token of the target, tokens being words."""
    out = []
    for prompt, target in zip(prompts, targets):
        generated, wanted = _CONTINUATIONS[prompt].split(), target.split()
        out.append(generated[:len(wanted)] == wanted)
    return out


def test_es_ps_ns_with_multi_token_targets() -> None:
    record = {"case_id": 0,
              "requested_rewrite": {"prompt": "The capital of {} is", "subject": "Ardenia",
                                    "relation_id": "P36", "target_new": {"str": "New Paris", "id": "a"},
                                    "target_true": {"str": "Old Town", "id": "b"}},
              "paraphrase_prompts": ["Ardenia's capital city is", "Ardenia has its capital at"],
              "neighborhood_prompts": ["The capital of Belmar is", "The capital of Corvia is",
                                       "The capital of Dunmere is"]}
    backend = Backend(edit=None, rollback=None, matches=_word_matcher, known=None)
    scores = evaluate_edit(backend, None, None, record, batch_size=8)
    assert scores == {"ES": 1.0, "PS": 0.5, "NS": pytest.approx(2 / 3)}
    failed = evaluate_edit(backend, None, None, record, batch_size=8, edited=False)
    assert failed == {"ES": 0.0, "PS": 0.0, "NS": pytest.approx(2 / 3)}
