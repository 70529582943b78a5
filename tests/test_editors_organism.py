"""Effectiveness on a trained model organism: ROME, MEMIT, FT, COMEBA-HK and LEMoE make target_new the greedy answer of
the rewrite prompt for >= 90% of 20 records the model knows (single edits, each on a fresh copy of
the model), with the organism's hyper-parameters (wilke_lib/hparams/README.md). WilKE too, and on the
third-generation organisms its Eq. 10 chooses different layers for different facts (toy-gpt2: layers
2 / 3 / 5 for 12 / 5 / 3 of these 20 records, all edited; hparams README).
Skipped until `organisms/toy-gpt2` has been built (`make organisms`)."""

from __future__ import annotations

import pytest

from wilke_lib.models import ORGANISMS_DIR

ORGANISM = "toy-gpt2"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not (ORGANISMS_DIR / ORGANISM / "config.json").is_file(),
                       reason=f"organism {ORGANISM!r} not built yet (run `make organisms`)"),
]


@pytest.fixture(scope="module")
def setup(toy_gpt2_known20):
    """The organism, 20 records it knows (tests/conftest.py, shared with other modules) and an EditCache."""
    from wilke_lib.editing import EditCache

    model, tok, records = toy_gpt2_known20
    return model, tok, records, EditCache.for_model(model)


@pytest.mark.parametrize("editor", ["rome", "memit", "ft", "comeba_hk", "lemoe"])
def test_edit_success_rate(editor, setup):
    from wilke_lib.counterfact import rewrite_prompt
    from wilke_lib.editing import edit
    from wilke_lib.generation import greedy_matches
    from wilke_lib.hparams import load_hparams

    model, tok, records, cache = setup
    hparams = load_hparams(editor, ORGANISM)
    successes, seconds = 0, []
    for record in records:
        result = edit(model, tok, record, hparams, copy=True, cache=cache)
        target = record["requested_rewrite"]["target_new"]["str"]
        successes += greedy_matches(result.model, tok, [rewrite_prompt(record)], [target])[0]
        seconds.append(result.seconds)
    rate = successes / len(records)
    print(f"{editor}: success {rate:.0%}, {sum(seconds) / len(seconds):.2f} s per edit")
    assert rate >= 0.9, f"{editor} made target_new the answer for {successes} of {len(records)} records"


def test_wilke_chooses_layers_per_fact_and_edits_them(setup):
    from wilke_lib.counterfact import rewrite_prompt
    from wilke_lib.editing import edit
    from wilke_lib.generation import greedy_matches
    from wilke_lib.hparams import load_hparams

    model, tok, records, cache = setup
    wilke = load_hparams("wilke", ORGANISM)
    outcomes = []
    for record in records:
        result = edit(model, tok, record, wilke, copy=True, cache=cache)
        target = record["requested_rewrite"]["target_new"]["str"]
        outcomes.append((result.layers[0], greedy_matches(result.model, tok, [rewrite_prompt(record)], [target])[0]))
    layers = [layer for layer, _ in outcomes]
    print(f"wilke: layers {layers}, success {sum(ok for _, ok in outcomes)}/{len(outcomes)}")
    assert len(set(layers)) >= 2, f"WilKE chose layer {layers[0]} for every edit: the organism does not vary storage depth"
    assert sum(ok for _, ok in outcomes) >= 0.9 * len(outcomes), f"WilKE edited {sum(ok for _, ok in outcomes)}/{len(outcomes)}"
