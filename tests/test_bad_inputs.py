"""Every bad input of the catalogue `scripts/try_bad_inputs.py` (records files, hyper-parameter files,
lifelong configurations, notebook parameters, model names, cache and state files, runs) gets a clear
answer: an error of the library's own that names the file, record, field or choices, or, for a
damaged cache or state file, the numbers of an undamaged run and a warning naming the file.

The whole catalogue runs once (tiny random models and a fake editor: seconds); each case is one test,
so that a regression names the input it broke. A case listed in `KNOWN_DEFECTS` (its fix lies in a
file outside the catalogue's remit) is an expected failure, and an error once it is fixed, so that the
list is kept honest.
"""

from __future__ import annotations

import pytest

from scripts import try_bad_inputs as catalogue


@pytest.fixture(scope="module")
def outcomes() -> dict[str, catalogue.Outcome]:
    return {o.case: o for o in catalogue.run_catalogue()}


def test_the_catalogue_covers_every_group_of_bad_input():
    kinds = {c.kind for c in catalogue.CASES}
    assert kinds == {"records file", "records vs. the model", "hyper-parameters", "edit requests", "lifelong config",
                     "notebook parameters", "model names", "cache and state files", "runs"}
    assert sum(c.kind == "records file" for c in catalogue.CASES) >= 35
    assert set(catalogue.KNOWN_DEFECTS) <= {c.name for c in catalogue.CASES}


@pytest.mark.parametrize("case", catalogue.CASES, ids=lambda c: f"{c.kind}: {c.name}")
def test_a_bad_input_gets_a_clear_answer(case: catalogue.Case, outcomes: dict[str, catalogue.Outcome]):
    outcome = outcomes[case.name]
    described = f"{outcome.verdict}: {outcome.exception}: {outcome.message}"
    if case.name in catalogue.KNOWN_DEFECTS:
        assert not outcome.clear, f"fixed ({described}): remove {case.name!r} from KNOWN_DEFECTS"
        pytest.xfail(f"known defect, {catalogue.KNOWN_DEFECTS[case.name]}: {described}")
    assert outcome.clear, described


def test_the_rule_refuses_errors_passed_up_from_a_dependency():
    import json

    try:
        json.loads("{")
    except ValueError as err:
        assert not catalogue.is_clear(err, ())  # a JSONDecodeError from inside json
    try:
        [][0]
    except IndexError as err:
        assert not catalogue.is_clear(err, ())  # raised here, not by the library
    from wilke_lib.counterfact import validate_record

    with pytest.raises(ValueError) as info:
        validate_record({"case_id": 1}, 3, "records.json")
    assert catalogue.is_clear(info.value, ("records.json", "#3", "requested_rewrite"))
    assert not catalogue.is_clear(info.value, ("paraphrase_prompts",))
