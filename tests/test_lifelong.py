"""The lifelong runner of Appendix F with a deterministic fake editor and evaluator on tiny models:
checkpoint schedule, record split, on-disk format, resume after a kill, read-back of finished runs."""

from __future__ import annotations

import json
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import torch
from safetensors import safe_open
from helpers import Kill, numbered_records
from helpers import kill_at as stop_at
from tiny import tiny_model_for

from wilke_lib.arch import ModelAdapter
from wilke_lib.lifelong import (
    Backend,
    CheckpointPolicy,
    LifelongConfig,
    checkpoint_steps,
    load_run,
    read_back,
    read_progress,
    run_dir,
    run_lifelong,
    run_many,
    split_records,
)
from wilke_lib.profiles import PROFILES, get_profile

# ---------------------------------------------------------------- fakes


class FakeEditError(ValueError):
    """Raised by the fake editor for subjects it refuses to edit."""


@dataclass
class FakeHparams:
    scale: float = 2.0
    fail_subjects: tuple[str, ...] = ()


@dataclass
class FakeResult:
    editor: str
    layers: list[int]
    weight_deltas: dict[str, torch.Tensor]
    scores: dict[int, float] | None
    seconds: float
    model: Any
    info: dict = field(default_factory=dict)


def _crc(text: str) -> int:
    return zlib.crc32(text.encode())


@dataclass
class FakeEditor:
    """Rank-one change of mlp_out at a subject-dependent layer; depends on the current weights, so
    that a run is only reproducible if the model state is carried exactly."""

    calls: int = 0

    def edit(self, model: torch.nn.Module, tok: Any, request: dict, hparams: FakeHparams) -> FakeResult:
        self.calls += 1
        if request["subject"] in hparams.fail_subjects:
            raise FakeEditError(f"cannot edit {request['subject']}")
        return self._apply(model, request, hparams.scale, request["target_new"]["str"])

    def rollback(self, model: torch.nn.Module, tok: Any, request: dict, hparams: FakeHparams,
                 previous: FakeResult) -> FakeResult:
        self.calls += 1
        return self._apply(model, request, -0.9 * hparams.scale, request["target_true"]["str"],
                           layer=previous.layers[0])

    @staticmethod
    def _apply(model: torch.nn.Module, request: dict, scale: float, target: str,
               layer: int | None = None) -> FakeResult:
        adapter = ModelAdapter(model)
        layer = _crc(request["subject"]) % adapter.n_layers if layer is None else layer
        gen = torch.Generator().manual_seed(_crc(request["subject"] + target))
        v = torch.randn(adapter.d_mlp, generator=gen)
        u = torch.tanh(adapter.out_weight(layer).float() @ v)  # state dependent
        delta = scale * torch.outer(u, v) / v.norm() ** 2
        adapter.add_to_out_weight(layer, delta)
        return FakeResult(editor="fake", layers=[layer], weight_deltas={adapter.name_of("mlp_out", layer): delta},
                          scores={layer: float(delta.norm())}, seconds=0.0, model=model)


@torch.no_grad()
def fake_matches(model: torch.nn.Module, tok: Any, prompts: list[str], targets: list[str],
                 batch_size: int = 64) -> list[bool]:
    """A deterministic stand-in for greedy matching that depends on the weights
    (prompts of equal token length share one forward pass, no padding)."""
    encoded = [tok(prompt)["input_ids"] for prompt in prompts]
    top: dict[int, int] = {}
    for length in sorted({len(ids) for ids in encoded}):
        batch = [i for i, ids in enumerate(encoded) if len(ids) == length]
        logits = model(input_ids=torch.tensor([encoded[i] for i in batch])).logits[:, -1]
        top.update(zip(batch, logits.argmax(-1).tolist()))
    return [(top[i] + _crc(target)) % 3 != 0 for i, target in enumerate(targets)]


def make_backend(editor: FakeEditor, known_calls: list[int] | None = None, known_mod: int = 0) -> Backend:
    def known(model: Any, tok: Any, records: list[dict], batch_size: int = 64) -> list[dict]:
        if known_calls is not None:
            known_calls.append(1)
        return [r for r in records if not known_mod or r["case_id"] % known_mod != 0]

    return Backend(edit=editor.edit, rollback=editor.rollback, matches=fake_matches, known=known,
                   edit_error=FakeEditError)


make_records = numbered_records


def new_model(tok: Any, arch: str = "gpt2") -> torch.nn.Module:
    return tiny_model_for(tok, arch)


def config(tmp_path: Path, **kw: Any) -> LifelongConfig:
    base = dict(model_name="tiny-gpt2", editor="fake", hparams=FakeHparams(), n_edits=6, seed=9,
                out_dir=str(tmp_path / "runs"), eval_batch_size=4, filter_known=True)
    base.update(kw)
    return LifelongConfig(**base)


NON_TIMING = lambda df: df.drop(columns=[c for c in df.columns if c.endswith("_seconds")])  # noqa: E731

# ---------------------------------------------------------------- schedule and split


def test_checkpoint_schedule() -> None:
    assert checkpoint_steps(7) == [1, 2, 4, 7]
    assert checkpoint_steps(100) == [1, 2, 4, 8, 16, 32, 50, 64, 100]
    steps = checkpoint_steps(1024)
    assert steps[:8] == [1, 2, 4, 8, 16, 32, 50, 64]
    assert {128, 150, 256, 500, 512, 1000, 1024} <= set(steps) and 1023 not in steps
    assert len(steps) == 11 + 20  # powers of two 1..1024 and multiples of 50 up to 1000
    assert checkpoint_steps(5, CheckpointPolicy(powers_of_two=False, multiple_of=None, extra=(3,))) == [3, 5]


def test_split_is_seeded_shuffle_of_all_known() -> None:
    records = make_records(30)
    P, Q = split_records(records, 4, seed=9)
    import random

    pool = list(records)
    random.Random(9).shuffle(pool)
    assert P == pool[:4] and Q == pool[4:8]
    assert split_records(records, 4, seed=10) != (P, Q)


def test_too_few_known_records_is_a_clear_error(tmp_path: Path, tiny_tokenizer: Any) -> None:
    editor = FakeEditor()
    records = make_records(12)  # case_id % 2 != 0 -> 6 known, 2n = 8
    with pytest.raises(ValueError, match=r"needs 2 \* n_edits = 8 known records.*only 6 known"):
        run_lifelong(new_model(tiny_tokenizer), tiny_tokenizer, records, config(tmp_path, n_edits=4),
                     backend=make_backend(editor, known_mod=2))
    assert editor.calls == 0


# ---------------------------------------------------------------- a whole run


def test_run_writes_documented_format(tmp_path: Path, tiny_tokenizer: Any) -> None:
    records = make_records(20)
    P, _ = split_records(records, 5, 9)
    failing = P[2]["requested_rewrite"]["subject"]  # step 3 fails
    cfg = config(tmp_path, hparams=FakeHparams(fail_subjects=(failing,)), n_edits=5)
    model = new_model(tiny_tokenizer)
    result = run_lifelong(model, tiny_tokenizer, records, cfg, backend=make_backend(FakeEditor()))
    rdir = run_dir(cfg.out_dir, cfg, records)
    assert result.run_dir == rdir
    for name in ("config.json", "steps.jsonl.gz", "checkpoints.jsonl", "result.json"):
        assert (rdir / name).exists(), name
    assert not (rdir / "state.safetensors").exists() and not (rdir / "steps.jsonl").exists()  # finished: archived
    assert list(result.steps["step"]) == [1, 2, 3, 4, 5]
    assert list(result.checkpoints["step"]) == [1, 2, 4, 5]
    row = result.steps.iloc[0]
    layer_name = next(iter(row["edit_delta_norms"]))
    assert set(row["weight_norms_after_rollback"]) == {layer_name + ".weight"}
    assert row["edit_layers"] == row["rollback_layers"]
    assert row["edit_delta_norms"][layer_name] > 0 and row["rollback_delta_norms"][layer_name] > 0
    for col in ("case_id", "edit_seconds", "rollback_seconds", "ES", "PS", "NS", "edit_scores"):
        assert col in result.steps.columns
    failed = result.steps.iloc[2]
    assert bool(failed["failed"]) and failed["ES"] == 0 and failed["PS"] == 0 and failed["edit_layers"] == []
    assert "FakeEditError" in failed["error"]
    last = result.checkpoints.iloc[-1]
    assert last["ES"] == pytest.approx(result.steps["ES"].mean())
    assert last["n_failed_edits"] == 1
    assert result.final["S"] == pytest.approx(last["S"])
    saved = json.loads((rdir / "config.json").read_text())
    assert saved["config"]["hparams"]["fail_subjects"] == [failing]
    assert load_run(rdir).final == result.final


@pytest.mark.parametrize("arch, save_every, kill_at", [("gpt2", 1, 3), ("llama", 2, 5)])
def test_resume_after_kill_is_identical(tmp_path: Path, tiny_tokenizer: Any, arch: str,
                                        save_every: int, kill_at: int) -> None:
    records = make_records(24)
    cfg_a = config(tmp_path / "a", n_edits=8, save_every=save_every)
    cfg_b = config(tmp_path / "b", n_edits=8, save_every=save_every)
    model_a = new_model(tiny_tokenizer, arch)
    full = run_lifelong(model_a, tiny_tokenizer, records, cfg_a, backend=make_backend(FakeEditor()))

    model_b = new_model(tiny_tokenizer, arch)
    with pytest.raises(Kill):
        run_lifelong(model_b, tiny_tokenizer, records, cfg_b, backend=make_backend(FakeEditor()),
                     on_step=stop_at(kill_at))
    rdir = run_dir(cfg_b.out_dir, cfg_b, records)
    with safe_open(str(rdir / "state.safetensors"), framework="pt") as fh:
        saved_step = int(fh.metadata()["step"])
    assert saved_step == (kill_at - 1) // save_every * save_every
    assert not (rdir / "result.json").exists()

    editor = FakeEditor()
    resumed_model = new_model(tiny_tokenizer, arch)  # a fresh original model, as after a real kill
    resumed = run_lifelong(resumed_model, tiny_tokenizer, records, cfg_b, backend=make_backend(editor))
    assert editor.calls == 2 * (8 - saved_step)
    pd.testing.assert_frame_equal(NON_TIMING(full.steps), NON_TIMING(resumed.steps))
    pd.testing.assert_frame_equal(full.checkpoints, resumed.checkpoints)
    assert full.final == resumed.final
    for (name, pa), pb in zip(model_a.named_parameters(), resumed_model.parameters()):
        assert torch.equal(pa, pb), name


def test_finished_run_is_read_back_not_recomputed(tmp_path: Path, tiny_tokenizer: Any) -> None:
    records = make_records(16)
    cfg = config(tmp_path, n_edits=4)
    known_calls: list[int] = []
    first = run_lifelong(new_model(tiny_tokenizer), tiny_tokenizer, records, cfg,
                         backend=make_backend(FakeEditor(), known_calls))
    assert known_calls == [1]

    editor = FakeEditor()
    untouched = new_model(tiny_tokenizer)
    before = {k: v.clone() for k, v in untouched.state_dict().items()}
    again = run_lifelong(untouched, tiny_tokenizer, records, cfg, backend=make_backend(editor, known_calls))
    assert editor.calls == 0 and known_calls == [1]
    assert all(torch.equal(before[k], v) for k, v in untouched.state_dict().items())
    assert again.final == first.final
    pd.testing.assert_frame_equal(again.steps, first.steps)

    # another seed is another run (same known-record cache, so no new filtering)
    other = run_lifelong(new_model(tiny_tokenizer), tiny_tokenizer, records, config(tmp_path, n_edits=4, seed=10),
                         backend=make_backend(editor, known_calls))
    assert editor.calls == 8 and known_calls == [1]
    assert other.run_dir != first.run_dir


def test_progress_of_a_run_is_read_without_computing(tmp_path: Path, tiny_tokenizer: Any) -> None:
    records = make_records(16)
    cfg = config(tmp_path, n_edits=6)
    assert read_progress(records, cfg) is None and read_back(records, cfg) is None  # not started
    with pytest.raises(Kill):
        run_lifelong(new_model(tiny_tokenizer), tiny_tokenizer, records, cfg, backend=make_backend(FakeEditor()),
                     on_step=stop_at(5))
    partial = read_progress(records, cfg)
    assert read_back(records, cfg) is None
    assert partial.source == "unfinished at step 5" and not partial.final
    assert partial.checkpoints["step"].tolist() == [1, 2, 4]
    full = run_lifelong(new_model(tiny_tokenizer), tiny_tokenizer, records, cfg, backend=make_backend(FakeEditor()))
    assert read_progress(records, cfg).final == read_back(records, cfg).final == full.final
    assert read_progress(records, config(tmp_path, n_edits=6, seed=10)) is None  # another seed: not started


def test_run_many_loads_a_fresh_model_per_unfinished_run(tmp_path: Path, tiny_tokenizer: Any) -> None:
    records = make_records(16)
    configs = [config(tmp_path, n_edits=4, seed=s) for s in (9, 10)]
    loads: list[str] = []

    def loader(name: str) -> tuple[torch.nn.Module, Any]:
        loads.append(name)
        return new_model(tiny_tokenizer), tiny_tokenizer

    results = run_many(loader, records, configs, backend=make_backend(FakeEditor()))
    assert loads == ["tiny-gpt2", "tiny-gpt2"] and [r.config.seed for r in results] == [9, 10]
    # a single run of seed 10 on a fresh model gives the same numbers as inside run_many
    solo = run_lifelong(new_model(tiny_tokenizer), tiny_tokenizer, records,
                        config(tmp_path / "solo", n_edits=4, seed=10), backend=make_backend(FakeEditor()))
    assert solo.final == results[1].final
    again = run_many(loader, records, configs, backend=make_backend(FakeEditor()))
    assert len(loads) == 2 and [r.final for r in again] == [r.final for r in results]


def test_run_dir_depends_on_identity_only(tmp_path: Path) -> None:
    records = make_records(10)
    cfg = config(tmp_path)
    same = config(tmp_path, eval_batch_size=99, save_every=5, records_source="elsewhere")
    assert run_dir("x", cfg, records) == run_dir("x", same, records)
    for changed in (config(tmp_path, seed=10), config(tmp_path, n_edits=7), config(tmp_path, editor="rome"),
                    config(tmp_path, hparams=FakeHparams(scale=1.0)), config(tmp_path, model_name="m2")):
        assert run_dir("x", changed, records) != run_dir("x", cfg, records)
    assert run_dir("x", cfg, records[:-1]) != run_dir("x", cfg, records)


def test_profiles() -> None:
    assert get_profile("quick").n_edits == 4 and get_profile("paper").n_edits == 1024
    assert get_profile("paper").seeds == (9, 10, 11) and get_profile("quick").seeds == (9,)
    assert get_profile("quick").n_trace_records == 2 and get_profile("paper").n_trace_records == 200
    with pytest.raises(ValueError, match="quick, default, paper"):
        get_profile("huge")
    assert set(PROFILES) == {"quick", "default", "paper"}


# ---------------------------------------------------------------- robustness (kills, concurrent writers, bad results)


@pytest.mark.slow  # about 1 min (measured 58 s on a shared 2-core machine)
def test_killed_at_random_points_resumes_to_identical_numbers(tmp_path: Path, tiny_tokenizer: Any) -> None:
    """20 kills at random steps of short runs (save_every 1 or 2): the resumed run equals the uninterrupted one."""
    import random

    records = make_records(20)
    reference = run_lifelong(new_model(tiny_tokenizer), tiny_tokenizer, records, config(tmp_path / "ref", n_edits=5),
                             backend=make_backend(FakeEditor()))
    rng = random.Random(0)
    for trial in range(20):
        cfg = config(tmp_path / f"t{trial}", n_edits=5, save_every=rng.choice([1, 2]))
        with pytest.raises(Kill):
            run_lifelong(new_model(tiny_tokenizer), tiny_tokenizer, records, cfg, backend=make_backend(FakeEditor()),
                         on_step=stop_at(rng.randint(1, 5)))
        if rng.random() < 0.5:  # sometimes a second kill during the resumed run
            with pytest.raises(Kill):
                run_lifelong(new_model(tiny_tokenizer), tiny_tokenizer, records, cfg,
                             backend=make_backend(FakeEditor()), on_step=stop_at(5))
        resumed = run_lifelong(new_model(tiny_tokenizer), tiny_tokenizer, records, cfg,
                               backend=make_backend(FakeEditor()))
        pd.testing.assert_frame_equal(NON_TIMING(resumed.steps), NON_TIMING(reference.steps))
        assert resumed.final == reference.final, trial


def test_a_second_writer_of_the_same_run_is_refused(tmp_path: Path, tiny_tokenizer: Any) -> None:
    from wilke_lib.lifelong import RunLockedError
    from wilke_lib.lifelong.store import writer_lock

    records = make_records(16)
    cfg = config(tmp_path, n_edits=4)
    rdir = run_dir(cfg.out_dir, cfg, records)
    with writer_lock(rdir):  # another process holds the run (flock locks are per open file)
        with pytest.raises(RunLockedError, match="being written by another process"):
            run_lifelong(new_model(tiny_tokenizer), tiny_tokenizer, records, cfg, backend=make_backend(FakeEditor()))
    result = run_lifelong(new_model(tiny_tokenizer), tiny_tokenizer, records, cfg, backend=make_backend(FakeEditor()))
    assert list(result.steps["step"]) == [1, 2, 3, 4]  # each step once


def test_a_run_in_which_every_edit_failed_is_not_stored_as_finished(tmp_path: Path, tiny_tokenizer: Any) -> None:
    records = make_records(16)
    everyone = tuple(r["requested_rewrite"]["subject"] for r in records)
    cfg = config(tmp_path, n_edits=4, hparams=FakeHparams(fail_subjects=everyone))
    with pytest.raises(RuntimeError, match="every one of the 4 edits failed"):
        run_lifelong(new_model(tiny_tokenizer), tiny_tokenizer, records, cfg, backend=make_backend(FakeEditor()))
    assert not (run_dir(cfg.out_dir, cfg, records) / "result.json").exists()


def test_a_state_file_that_disagrees_with_the_rows_restarts_the_run(tmp_path: Path, tiny_tokenizer: Any) -> None:
    records = make_records(20)
    cfg = config(tmp_path, n_edits=5)
    with pytest.raises(Kill):
        run_lifelong(new_model(tiny_tokenizer), tiny_tokenizer, records, cfg, backend=make_backend(FakeEditor()),
                     on_step=stop_at(4))
    rdir = run_dir(cfg.out_dir, cfg, records)
    lines = (rdir / "steps.jsonl").read_text().splitlines()
    (rdir / "steps.jsonl").write_text("\n".join(lines[:1]) + "\n")  # rows lost, state still at step 3
    resumed = run_lifelong(new_model(tiny_tokenizer), tiny_tokenizer, records, cfg, backend=make_backend(FakeEditor()))
    reference = run_lifelong(new_model(tiny_tokenizer), tiny_tokenizer, records, config(tmp_path / "ref", n_edits=5),
                             backend=make_backend(FakeEditor()))
    pd.testing.assert_frame_equal(NON_TIMING(resumed.steps), NON_TIMING(reference.steps))
    assert (rdir / "state.safetensors.bad").exists()
