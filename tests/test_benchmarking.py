"""wilke_lib.bench: the measuring helpers, and one tiny benchmark run on the organism."""

from __future__ import annotations

import copy
from pathlib import Path

import pandas as pd
import pytest
import torch

from wilke_lib.bench import editors as bm
from wilke_lib.bench.measure import PeakMemory
from wilke_lib.models import resolve_model_path
from wilke_lib.editors.hook_layers import HookLayers


def test_peak_memory_sees_a_large_allocation():
    with PeakMemory(torch.device("cpu")) as peak:
        x = torch.ones(64 * 2 ** 20 // 4)  # 64 MiB
        del x
    assert peak.method
    if peak.method.startswith("peak RSS"):
        assert 60 <= peak.mib <= 200


def test_variant_settings_select_the_search():
    variants = {v.name: v for v in bm.make_variants("toy-gpt2")}
    assert bm.variant_hparams(variants["wilke-batched"]).search == "batched"
    assert bm.variant_hparams(variants["wilke-sequential"]).search == "sequential"
    assert bm.variant_hparams(variants["rome"]) is variants["rome"].hparams


def test_variants_share_romes_optimisation_settings():
    hps = bm.aligned_hparams("toy-gpt2")
    for name in ("memit", "wilke"):
        for f in bm.SHARED_FIELDS:
            assert getattr(hps[name], f) == getattr(hps["rome"], f), (name, f)
    variants = {v.name: v for v in bm.make_variants("toy-gpt2", candidate_layers=[0, 1, 2])}
    assert list(variants) == list(bm.VARIANTS)
    assert variants["wilke-batched"].search == "batched" and variants["wilke-sequential"].search == "sequential"
    assert variants["wilke-batched"].candidate_layers(12) == [0, 1, 2]
    assert variants["rome-full"].hparams.delta_runner == "full" and variants["rome"].hparams.delta_runner == "prefix-cache"
    with pytest.raises(ValueError, match="variant"):
        bm.make_variants("toy-gpt2", ["rome-fast"])


def test_summary_ratios_and_format():
    table = pd.DataFrame({"variant": ["rome", "wilke-batched", "wilke-sequential"], "median_ms": [100.0, 120.0, 600.0],
                          "layers_optimised": [1, 6, 6]})
    ratios = bm.summary_ratios(table)
    assert ratios == pytest.approx({"wilke_batched_over_rome": 1.2, "sequential_over_batched": 5.0})
    assert "wilke-sequential" in bm.format_table(table)


def _organism_available() -> bool:
    try:
        resolve_model_path("toy-gpt2")
        return True
    except Exception:
        return False


@pytest.fixture(scope="module")
def first_200_known(toy_gpt2) -> list[dict]:
    """The records `bm.load_organism` benchmarks: those of the first 200 toy-world records toy-gpt2 knows."""
    from wilke_lib import counterfact

    model, tok = toy_gpt2
    return counterfact.known_records(model, tok, counterfact.load_counterfact("toy-world")[:200])


@pytest.fixture
def loaded(toy_gpt2, first_200_known) -> tuple:
    """What `bm.load_organism("toy-gpt2")` gives, on a copy of the session's organism (a benchmark edits its
    model in place and undoes every edit; a failure half-way must not leave the shared one edited)."""
    model, tok = toy_gpt2
    return copy.deepcopy(model), tok, first_200_known


@pytest.mark.slow  # about 3 min (measured 169 s on a shared 2-core machine)
@pytest.mark.skipif(not _organism_available(), reason="organism toy-gpt2 not trained")
def test_small_benchmark_on_the_organism(tmp_path, loaded):
    model = loaded[0]
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    table = bm.benchmark_editors("toy-gpt2", n_edits=1, warmup=0, variants=("rome", "wilke-batched", "comeba-hk", "lemoe", "mend"),
                                 loaded=loaded, log=None)
    assert list(table["variant"]) == ["rome", "wilke-batched", "comeba-hk", "lemoe", "mend"]
    assert HookLayers.of(model) is None and not hasattr(model, "_wilke_lemoe")  # the added modules removed too
    assert (table["median_ms"] > 0).all() and (table["gflop_per_edit"] > 0).all()
    assert table.loc[0, "time_vs_rome"] == 1.0
    for name, p in model.named_parameters():  # every edit was undone
        assert torch.equal(p.detach(), before[name]), name
    scaling = bm.benchmark_scaling("toy-gpt2", ks=(1, 2), n_edits=1, warmup=0, loaded=loaded, log=None,
                                   searches=("batched",))
    assert list(scaling["n_candidates"]) == [1, 2]
    fig = bm.plot_scaling(scaling, rome_ms=float(table.loc[0, "median_ms"]))
    fig.savefig(tmp_path / "scaling.png")
    phases = bm.time_breakdown(model, loaded[1], loaded[2][0]["requested_rewrite"], "toy-gpt2",
                               candidate_layers=[2, 3])
    assert {"forward", "backward", "keys", "other"} <= set(phases.index)
    assert (phases >= 0).all()


@pytest.mark.slow  # about 2.5 min (measured 150 s on a shared 2-core machine)
@pytest.mark.skipif(not _organism_available(), reason="organism toy-gpt2 not trained")
def test_summary_json_has_the_issue_keys(loaded):
    table = bm.benchmark_editors("toy-gpt2", n_edits=1, warmup=0, variants=("rome", "rome-full", "wilke-batched"),
                                 loaded=loaded, log=None, memory=False)
    model, tok, records = loaded
    cache, originals = bm.EditCache.for_model(model), bm.original_weights(model)
    steps = {"toy-gpt2": {"rome": bm.lifelong_step_ms(model, tok, records[:1], table.attrs.get("hp_rome") or
                                                      bm.variant_hparams(bm.make_variants("toy-gpt2", ["rome"])[0]),
                                                      cache, originals)}}
    optimisation = bm.optimisation_ms(model, tok, [r["requested_rewrite"] for r in records[:2]],
                                      bm.make_variants("toy-gpt2", ["rome", "rome-full", "memit"]), cache, warmup=1)
    assert set(optimisation) == {"rome", "rome-full"} and all(ms > 0 for ms in optimisation.values())
    summary = bm.summary_json({"toy-gpt2": table}, steps, {"toy-gpt2": optimisation})["toy-gpt2"]
    assert {"rome_speedup_vs_previous", "wilke_over_rome", "wilke_over_rome_flops",
            "rome_optimisation_speedup"} <= set(summary)
    assert summary["rome_optimisation_speedup"] == optimisation["rome-full"] / optimisation["rome"]
    # timings only exist and are positive here: their order is a benchmark's business (a loaded machine reverses it)
    assert summary["editors"]["rome"]["ms_per_lifelong_step"] > 0 and summary["editors"]["rome"]["ms_per_edit"] > 0
    assert summary["editors"]["rome-full"]["gflop_per_edit"] > summary["editors"]["rome"]["gflop_per_edit"]


def test_a_partial_benchmark_keeps_the_saved_rows_of_the_other_variants(tmp_path):
    import json

    import pandas as pd

    import importlib.util

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_editors.py"
    spec = importlib.util.spec_from_file_location("bench_editors_script", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    merge_saved = module.merge_saved

    saved = pd.DataFrame({"variant": ["rome", "memit", "lemoe"], "median_ms": [100.0, 200.0, 50.0],
                          "date_utc": ["old"] * 3, "time_vs_rome": [1.0, 2.0, 0.5]})
    saved.to_csv(tmp_path / "bench.csv", index=False)
    (tmp_path / "summary.json").write_text(json.dumps({"m": {"editors": {
        "rome": {"ms_per_lifelong_step": 300.0}, "memit": {"ms_per_lifelong_step": 400.0},
        "lemoe": {"ms_per_lifelong_step": 90.0}}}}))
    new = pd.DataFrame({"variant": ["lemoe", "mend"], "median_ms": [25.0, 10.0], "date_utc": ["new"] * 2,
                        "time_vs_rome": [float("nan")] * 2})
    table, steps = merge_saved(new, {"lemoe": 60.0, "mend": 20.0}, tmp_path / "bench.csv", tmp_path / "summary.json", "m")
    assert table["variant"].tolist() == ["rome", "memit", "lemoe", "mend"]  # the registry's order
    assert table.set_index("variant")["date_utc"].to_dict() == {"rome": "old", "memit": "old", "lemoe": "new",
                                                                "mend": "new"}
    assert table.set_index("variant")["time_vs_rome"].to_dict() == {"rome": 1.0, "memit": 2.0, "lemoe": 0.25,
                                                                    "mend": 0.1}
    assert steps == {"rome": 300.0, "memit": 400.0, "lemoe": 60.0, "mend": 20.0}
    same, _ = merge_saved(new, {}, tmp_path / "missing.csv", tmp_path / "summary.json", "m")
    assert same is new


@pytest.mark.slow
@pytest.mark.skipif(not _organism_available(), reason="organism toy-gpt2 not trained")
def test_single_edit_success_resumes_only_rows_of_the_same_weights_and_settings(tmp_path):
    """`make bench-success` reuses a finished (editor, record) row only when it was measured on the same
    weights with the same settings: a row of a retrained organism is measured again, not reported."""
    import importlib.util
    import json

    spec = importlib.util.spec_from_file_location("single_edit_success", Path(__file__).parents[1]
                                                  / "benchmarks" / "single_edit_success.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    path = tmp_path / "single_edit_toy-gpt2.jsonl"
    first = bench.run_model("toy-gpt2", ["ft"], 1, path)
    assert len(first) == 1 and first[0]["weights"] and first[0]["settings"]
    stale = {**first[0], "weights": "00000000", "success": not first[0]["success"]}
    path.write_text(json.dumps(stale) + "\n")
    again = bench.run_model("toy-gpt2", ["ft"], 1, path)
    assert [r["success"] for r in again] == [first[0]["success"]]
    assert [json.loads(line)["weights"] for line in path.read_text().splitlines()] == [first[0]["weights"]]
    resumed = bench.run_model("toy-gpt2", ["ft"], 1, path)  # nothing left to measure: the same row
    assert resumed == again
