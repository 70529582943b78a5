"""`make bench-scale` (benchmarks/bench_scale.py, wilke_lib.bench.scale) on a tiny shape: the whole code
path in a few seconds, its outputs, and its answers to bad input."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pandas as pd
import pytest
import torch

from wilke_lib.bench import scale as sc

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_scale.py"


def _script():
    spec = importlib.util.spec_from_file_location("bench_scale_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_benchmark_runs_on_a_tiny_shape_and_writes_its_table_and_figure(tmp_path, capsys):
    import matplotlib

    matplotlib.use("Agg")
    code = _script().main(["--shape", "tiny", "--device", "cpu", "--out", str(tmp_path), "--steps", "2",
                           "--n-edits", "1", "--no-progress", "--variants", "rome", "rome-full", "wilke-batched",
                           "rome-released"])
    out = capsys.readouterr().out
    assert code == 0
    assert "no --released-rome PATH given, so the released code's column is skipped" in out
    table = pd.read_csv(tmp_path / "scale-cpu.csv")
    assert table["variant"].tolist() == ["rome", "rome-full", "wilke-batched"]
    assert (table["shape"] == "tiny").all() and (table["n_edits"] == 1).all() and (table["steps"] == 2).all()
    assert (table["median_s"] > 0).all() and (table["peak_above_before_mib"] >= 0).all()
    assert table.set_index("variant").loc["rome", "time_vs_rome"] == 1.0
    assert table.set_index("variant").loc["wilke-batched", "layers_optimised"] == 2  # 0..23 rescaled to 2 layers
    assert (tmp_path / "scale-cpu.png").stat().st_size > 0
    assert "Figure (" in out and "rome-full" in out
    # the rows of another shape or step count are kept beside the new ones, those of the same are replaced
    pd.concat([table.assign(shape="other"), table.assign(steps=5), table]).to_csv(tmp_path / "scale-cpu.csv",
                                                                                  index=False)
    merged = _script().save_csv(table.to_dict("records"), tmp_path / "scale-cpu.csv", "tiny", 2)
    assert sorted(zip(merged["shape"], merged["steps"])) == sorted([("other", 2)] * 3 + [("tiny", 5)] * 3
                                                                   + [("tiny", 2)] * 3)


def test_every_edit_starts_from_the_unedited_weights_with_a_fixed_number_of_steps(tmp_path):
    shape = sc.get_shape("tiny")
    corpus = sc.synthetic_corpus(tmp_path / "corpus.txt", shape.vocab_size, 64, 16)
    settings = sc.Settings(steps=3, corpus=corpus, n_texts=64, max_length=24, ridge=1e-2)
    model = sc.build_model(shape, torch.device("cpu"))
    tok = sc.build_tokenizer(shape.vocab_size, shape.n_positions)
    assert len(tok) == shape.vocab_size == model.config.vocab_size
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cache = sc.EditCache.for_model(model, stats_dir=tmp_path / "stats")
    plan = sc.Plan(shape=shape, device=torch.device("cpu"), variants=[sc.VARIANTS["rome"], sc.VARIANTS["memit-full"]],
                   settings=settings, n_edits=1, warmup=0)
    rows = sc.run(plan, model, tok, cache, progress=False, log=None)
    assert [r["variant"] for r in rows] == ["rome", "memit-full"]
    assert all(r["steps"] == 3 for r in rows)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    hp = sc.variant_hparams(sc.VARIANTS["wilke-sequential-full"], shape, settings)
    assert (hp.v_num_grad_steps, hp.v_early_stop_loss, hp.delta_runner, hp.search) == (3, 0.0, "full", "sequential")
    assert hp.mom2_corpus == str(corpus) and hp.mom2_ridge == 1e-2


def test_gpt_j_shape_with_rotary_embeddings_runs_too(tmp_path):
    shape = sc.get_shape("tiny-gptj")
    corpus = sc.synthetic_corpus(tmp_path / "corpus.txt", shape.vocab_size, 64, 16)
    settings = sc.Settings(steps=2, corpus=corpus, n_texts=64, max_length=24, ridge=1e-2)
    model = sc.build_model(shape, torch.device("cpu"))
    assert model.config.model_type == "gptj" and model.config.rotary_dim == 4
    tok = sc.build_tokenizer(shape.vocab_size, shape.n_positions)
    cache = sc.EditCache.for_model(model, stats_dir=tmp_path / "stats")
    plan = sc.Plan(shape=shape, device=torch.device("cpu"), variants=[sc.VARIANTS["rome-full"],
                   sc.VARIANTS["wilke-batched"]], settings=settings, n_edits=1, warmup=0)
    rows = sc.run(plan, model, tok, cache, progress=False, log=None)
    assert [r["variant"] for r in rows] == ["rome-full", "wilke-batched"] and all(r["seconds"] > 0 for r in rows)


def test_gpt2_xl_shape_is_the_real_one():
    shape = sc.get_shape("gpt2-xl")
    assert (shape.n_layers, shape.d_model, shape.d_mlp, shape.vocab_size) == (48, 1600, 6400, 50257)
    assert shape.n_parameters() == 1_557_611_200  # GPT2-XL's parameter count, counted without allocating
    gptj = sc.get_shape("gptj")
    assert (gptj.n_layers, gptj.d_model, gptj.d_mlp, gptj.rotary_dim) == (28, 4096, 16384, 64)


def test_a_shape_that_does_not_fit_is_refused_before_anything_is_allocated(tmp_path, capsys):
    code = _script().main(["--shape", "gptj", "--device", "cpu", "--out", str(tmp_path), "--memory-limit-gib", "8",
                           "--no-progress"])
    err = capsys.readouterr().err
    assert code == 3
    assert "shape 'gptj'" in err and "does not fit" in err and "Nothing was allocated" in err
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("argv, message", [
    (["--shape", "gpt3"], "unknown shape 'gpt3'"),
    (["--released-rome", "/no/such/rome"], "no such directory"),
    (["--variants", "rome", "serac"], "unknown variant(s) ['serac']"),
    (["--steps", "0"], "--steps must be >= 1"),
    (["--wilke-layers", "5..2"], "empty range"),
])
def test_bad_input_gives_a_clear_error(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        _script().parse_args(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_a_folder_that_is_not_the_released_code_is_named(tmp_path):
    (tmp_path / "rome").mkdir()
    with pytest.raises(FileNotFoundError, match="not a checkout of kmeng01/rome, missing rome/compute_v.py"):
        sc.load_released_rome(tmp_path, torch.device("cpu"))


@pytest.mark.skipif(not os.environ.get("ROME_CHECKOUT"), reason="set ROME_CHECKOUT to a checkout of kmeng01/rome")
def test_the_released_column_runs_from_a_checkout(tmp_path):
    shape = sc.get_shape("tiny")
    released = sc.load_released_rome(os.environ["ROME_CHECKOUT"], torch.device("cpu"))
    import sys

    assert "rome" not in sys.modules or not hasattr(sys.modules["rome"], "compute_v")
    corpus = sc.synthetic_corpus(tmp_path / "corpus.txt", shape.vocab_size, 64, 16)
    settings = sc.Settings(steps=2, corpus=corpus, n_texts=64, max_length=24, ridge=1e-2)
    model = sc.build_model(shape, torch.device("cpu"))
    tok = sc.build_tokenizer(shape.vocab_size, shape.n_positions)
    cache = sc.EditCache.for_model(model, stats_dir=tmp_path / "stats")
    plan = sc.Plan(shape=shape, device=torch.device("cpu"), variants=[sc.VARIANTS["rome-released"]],
                   settings=settings, n_edits=1, warmup=0, released=released)
    rows = sc.run(plan, model, tok, cache, progress=False, log=None)
    assert rows[0]["steps_run"] <= 2 and rows[0]["compute_v_s"] > 0
