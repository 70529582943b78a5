"""Inputs that used to give silent wrong numbers or a folder that locks itself out (issue 34): records whose
targets cannot be told apart, or that are not what they look like; repeated seeds or editors; settings
that make an edit meaningless; result, config and step files that read as JSON but lack what the runner
needs. Each is refused with an error naming the file, record and field, or set aside with a warning and
the run carried on from its last good state (the same numbers as an undamaged run)."""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
from helpers import FakeEditor, Kill, fake_config, fake_run, make_records, same_numbers
from helpers import kill_at as stop_at
from tiny import tiny_model_for

from wilke_lib import hparams as hp_mod
from wilke_lib.counterfact import check_for_model, load_counterfact, validate_records
from wilke_lib.errors import RecordError
from wilke_lib.hparams import ROMEHParams, WilKEHParams, hparams_from_file
from wilke_lib.lifelong import LifelongConfig, load_run, read_back, run_dir, run_lifelong, run_many
from wilke_lib.profiles import Profile, get_profile
from wilke_lib.run_matrix import has_result
from wilke_lib.run_matrix import main as run_matrix_main

# ---------------------------------------------------------------- records

def _refused(tmp_path: Path, records: list[dict], *words: str, raw: str | None = None) -> str:
    """Write the records to a file, load it, and check the RecordError names the file and `words`."""
    path = tmp_path / "records.json"
    path.write_text(raw if raw is not None else json.dumps(records), encoding="utf-8")
    with pytest.raises(RecordError) as info:
        load_counterfact(path)
    message = str(info.value)
    for word in (str(path), *words):
        assert word in message, f"{word!r} not in {message!r}"
    return message


def _broken(change: Any) -> list[dict]:
    records = make_records(4)
    change(records[1]["requested_rewrite"])
    return records


def test_a_target_new_that_is_a_prefix_of_target_true_is_refused(tmp_path: Path):
    records = _broken(lambda rw: (rw["target_new"].update(str="G"), rw["target_true"].update(str="Gouththe")))
    message = _refused(tmp_path, records, "case_id 1", "requested_rewrite.target_new.str", "prefix")
    assert "'G'" in message and "'Gouththe'" in message


@pytest.mark.parametrize("new, true", [
    ("Span\u200bish", "Spanish"), ("Spanish\u200c", "Spanish"), ("\u200dSpanish", "Spanish"),
    ("Spa\u2060nish", "Spanish"), ("Span\ufeffish", "Spanish"),  # zero-width characters
    ("\uff33panish", "Spanish"), ("New\u00a0York", "New York"),  # NFKC: a full-width S, a no-break space
    ("New  York", "New York"),  # white space
])
def test_targets_equal_up_to_invisible_differences_are_refused(tmp_path: Path, new: str, true: str):
    records = _broken(lambda rw: (rw["target_new"].update(str=new), rw["target_true"].update(str=true)))
    _refused(tmp_path, records, "case_id 1", "requested_rewrite.target_new.str", "NFKC")


@pytest.mark.parametrize("subject, words", [
    ("\u200b\u200c\u2060", ("visible",)),
    (" Tobin Ash", ("white space",)), ("Tobin Ash  ", ("white space",)), ("\u200bTobin Ash", ("zero-width",)),
])
def test_a_subject_that_is_not_what_it_looks_like_is_refused(tmp_path: Path, subject: str, words: tuple[str, ...]):
    records = _broken(lambda rw: rw.update(subject=subject))
    _refused(tmp_path, records, "case_id 1", "requested_rewrite.subject", *words)


def test_a_lone_surrogate_in_a_subject_is_refused(tmp_path: Path):
    raw = json.dumps(make_records(4)).replace('"Mira Quell"', '"Mira \\ud800Quell"', 1)
    _refused(tmp_path, [], "case_id 1", "requested_rewrite.subject", "surrogate", raw=raw)


def test_a_lone_surrogate_in_a_paraphrase_is_refused():
    records = make_records(4)
    records[2]["paraphrase_prompts"][1] = "Ask \udcff, who speaks"
    with pytest.raises(RecordError, match=r"case_id 2.*paraphrase_prompts\[1\].*surrogate"):
        validate_records(records, "mine.json")


def test_a_key_twice_in_one_record_is_refused(tmp_path: Path):
    raw = json.dumps(make_records(3)).replace('"case_id": 1,', '"case_id": 1, "case_id": 5,', 1)
    _refused(tmp_path, [], "record #1", "`case_id`", "twice", "values 1 and 5", raw=raw)
    raw = json.dumps(make_records(3)).replace('"subject": "Tobin Ash"', '"subject": "Tobin Ash", "subject": "X"', 1)
    _refused(tmp_path, [], "record #2 (case_id 2)", "`requested_rewrite.subject`", "'Tobin Ash' and 'X'", raw=raw)


def test_the_same_fact_under_two_case_ids_is_refused(tmp_path: Path):
    records = make_records(4)
    twin = json.loads(json.dumps(records[1]))
    twin["case_id"] = 9
    twin["requested_rewrite"]["target_new"]["str"] = "Danish"  # another rewrite of the same fact
    message = _refused(tmp_path, records + [twin], "record #4", "case_id 9", "same fact", "#1")
    assert "Mira Quell" in message


def test_the_toy_world_passes_the_new_checks():
    assert len(load_counterfact("toy-world")) == 4800


def test_a_token_prefix_target_is_refused_against_the_tokenizer(tiny_tokenizer: Any):
    """Records a caller passes without loading them from a file are checked when a run starts."""
    records = make_records(4)
    rw = records[2]["requested_rewrite"]
    rw["target_new"]["str"], rw["target_true"]["str"] = "G", "Gouththe"
    with pytest.raises(RecordError, match=r"in mine record #2 \(case_id 2\): field `requested_rewrite.target_new.str` "
                                          r"is a token prefix"):
        check_for_model(records, tiny_tokenizer, 512, "mine")
    rw["target_new"]["str"], rw["target_true"]["str"] = "Gouththe", "G"
    with pytest.raises(RecordError, match="starts with the tokens of requested_rewrite.target_true.str"):
        check_for_model(records, tiny_tokenizer, 512, "mine")
    rw["target_new"]["str"], rw["target_true"]["str"] = "French", "Fr"  # not a prefix for this tokenizer
    assert check_for_model(records, tiny_tokenizer, 512, "mine") == records


def test_a_run_refuses_a_token_prefix_target_before_any_edit(tmp_path: Path, tiny_tokenizer: Any):
    records = make_records(8)
    rw = records[5]["requested_rewrite"]
    rw["target_new"]["str"], rw["target_true"]["str"] = "G", "Gouththe"
    editor = FakeEditor()
    with pytest.raises(RecordError, match=r"record #5 \(case_id 5\).*token prefix"):
        run_lifelong(tiny_model_for(tiny_tokenizer), tiny_tokenizer, records, config(tmp_path, n_edits=4),
                     backend=editor.backend())
    assert editor.calls == 0


# ---------------------------------------------------------------- repeated seeds and editors, notebook parameters

@pytest.mark.parametrize("field, value", [("seeds", (9, 9)), ("editors", ("rome", "rome")),
                                          ("seeds", [9, 10, 9]), ("editors", ["rome", "wilke", "rome"])])
def test_a_profile_refuses_repeated_seeds_or_editors(field: str, value: Any):
    with pytest.raises(ValueError, match=f"{field} must be free of repeats.*repeated"):
        dataclasses.replace(get_profile("quick"), **{field: value})


def test_notebook_parameters_given_as_lists_are_accepted():
    """papermill `-p seeds "[9, 10]"` gives a list."""
    prof = dataclasses.replace(get_profile("quick"), seeds=[9, 10], editors=["rome", "wilke"])
    assert prof.seeds == (9, 10) and prof.editors == ("rome", "wilke")
    assert Profile(name="x", n_edits=2, seeds=[9], editors=["rome"], consecutive_batch_sizes=[1, 4]).seeds == (9,)
    with pytest.raises(ValueError, match="seeds must be a non-empty tuple"):
        dataclasses.replace(prof, seeds=9)


def test_run_many_refuses_the_same_run_twice(tmp_path: Path):
    loaded = []
    configs = [config(tmp_path, seed=9), config(tmp_path, seed=10), config(tmp_path, seed=9)]
    with pytest.raises(ValueError, match=r"configs #0 and #2 are the same run \(editor 'fake', seed 9"):
        run_many(lambda name: loaded.append(name), make_records(12), configs, backend=FakeEditor().backend())
    assert loaded == [] and not (tmp_path / "runs").exists()


# ---------------------------------------------------------------- lifelong configuration

@pytest.mark.parametrize("seed", [2**70, 2**63, -1])
def test_a_seed_out_of_range_is_refused_before_any_folder(tmp_path: Path, seed: int):
    with pytest.raises(ValueError, match=r"seed must be between 0 and 2\*\*63 - 1"):
        config(tmp_path, seed=seed)
    assert not (tmp_path / "runs").exists()


def test_the_largest_seed_runs(tmp_path: Path, tiny_tokenizer: Any):
    result = run_lifelong(tiny_model_for(tiny_tokenizer), tiny_tokenizer, make_records(4),
                          config(tmp_path, seed=2**63 - 1, n_edits=1), backend=FakeEditor().backend())
    assert result.final and result.source == "computed"


@pytest.mark.parametrize("name", ["toy-gpt2 ", " toy-gpt2", "toy-gpt2\n", "  "])
def test_a_model_name_with_white_space_at_either_end_is_refused(name: str):
    with pytest.raises(ValueError, match="model_name must be a model name.*white space"):
        LifelongConfig(model_name=name, editor="rome")


@pytest.mark.parametrize("jobs", ["-3", "0", "two"])
def test_run_matrix_jobs_must_be_a_positive_int(jobs: str, capsys: pytest.CaptureFixture):
    with pytest.raises(SystemExit) as info:
        run_matrix_main(["--jobs", jobs, "--dry-run"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "--jobs" in err and "positive whole number" in err and jobs in err


# ---------------------------------------------------------------- hyper-parameters

def _yaml(tmp_path: Path, editor: str, text: str) -> Path:
    path = tmp_path / editor / "bad.yaml"
    path.parent.mkdir(exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


@pytest.mark.parametrize("editor, text, words", [
    ("rome", "layer: 1\nv_lr: 1.0e+30\n", ("v_lr", "<= 10")),
    ("rome", "layer: 1\nv_lr: 0\n", ("v_lr", "> 0")),
    ("wilke", "v_lr: 11\n", ("v_lr", "<= 10")),
    ("memit", "layers: [1, 2]\nv_lr: -0.5\n", ("v_lr", "> 0")),
    ("ft", "layer: 1\nlr: 1.0e+30\n", ("lr", "<= 10")),
    ("lemoe", "layer: 1\nlr: 100\n", ("lr", "<= 10")),
    ("mend", "layers: [1]\nedit_lr: 1.0e+3\n", ("edit_lr", "<= 10")),
    ("ke", "layers: [1]\nmultiplier_lr: 50\n", ("multiplier_lr", "<= 10")),
    ("kn", "edit_lambda: -1.0e+30\n", ("edit_lambda", "<= 1000")),
    ("kn", "edit_lambda: 0\n", ("edit_lambda", "non-zero")),
    ("kn", "edit_lambda: .inf\n", ("edit_lambda", "finite")),
    ("memit", "layers: [1, 2]\nmom2_update_weight: 0\n", ("mom2_update_weight", "> 0")),
    ("comeba_hk", "layers: [1, 2]\nmom2_update_weight: 0\n", ("mom2_update_weight", "> 0")),
    ("lemoe", "layer: 1\nscale: 0\n", ("scale", "> 0")),
    ("lemoe", "layer: 1\nscale: -1\n", ("scale", "> 0")),
    ("rome", "layer: 1\ncontext_lengths: [[-5, 10]]\n", ("context_lengths", "[-5, 10]", "below 1")),
    ("rome", "layer: 1\ncontext_lengths: [[0, 10]]\n", ("context_lengths", "[0, 10]", "below 1")),
    ("wilke", "context_lengths: [[5, -3]]\n", ("context_lengths", "[5, -3]", "below 1")),
    ("memit", "layers: [1]\ncontext_lengths: [[5, 10], [10, 0]]\n", ("context_lengths", "[10, 0]")),
    ("rome", "layer: 1\ncontext_lengths: [[true, 3]]\n", ("context_lengths", "[length, count]")),
    ("rome", "layer: 1\nessence_template: \"{} and {} are\"\n", ("essence_template", "exactly once")),
    ("wilke", "essence_template: \"{} is a {}\"\n", ("essence_template", "exactly once")),
])
def test_settings_that_make_an_edit_meaningless_are_refused(tmp_path: Path, editor: str, text: str,
                                                            words: tuple[str, ...]):
    path = _yaml(tmp_path, editor, text)
    with pytest.raises(ValueError) as info:
        hparams_from_file(path)
    for word in (str(path), *words):
        assert word in str(info.value), f"{word!r} not in {info.value}"


def test_the_limits_keep_the_usual_values():
    assert ROMEHParams(layer=1, v_lr=10.0, context_lengths=[]).context_lengths == []
    assert hp_mod.KNHParams(edit_lambda=-2.0).edit_lambda == -2.0
    for editor, names in hp_mod.available().items():
        for name in names:
            hp_mod.load_hparams(editor, name)


def test_wilke_runs_its_parents_checks():
    calls = []
    original = ROMEHParams.__post_init__

    def spy(self: Any) -> None:
        calls.append(type(self).__name__)
        original(self)

    with mock.patch.object(ROMEHParams, "__post_init__", spy):
        WilKEHParams()
    assert calls == ["WilKEHParams"]
    assert WilKEHParams(layer=None).layer is None and WilKEHParams(layer=3).layer == 3
    with pytest.raises(ValueError, match="layer must be a non-negative int, got -1"):
        WilKEHParams(layer=-1)
    with pytest.raises(ValueError, match="update_form"):
        WilKEHParams(update_form="rrome")


# ---------------------------------------------------------------- run folders: a fake editor on a tiny model

def config(tmp_path: Path, **kw: Any) -> LifelongConfig:
    return fake_config(tmp_path / "runs", **kw)


RECORDS = make_records(12)


def _run(tmp_path: Path, tok: Any, editor: FakeEditor | None = None, kill_at: int | None = None):
    return fake_run(tmp_path / "runs", tok, RECORDS, editor=editor, on_step=stop_at(kill_at) if kill_at else None)


def _folder(tmp_path: Path) -> Path:
    return run_dir(str(tmp_path / "runs"), config(tmp_path), RECORDS)


@pytest.fixture
def reference(reference_run: Any):
    return reference_run(RECORDS)


@pytest.mark.parametrize("final", ["oops", {}, {"ES": 1.0}, {"ES": 1.0, "PS": 1.0, "NS": 1.0, "ERS": 1.0, "ORS": 1.0,
                                                             "S": float("nan")}, None])
def test_a_result_without_final_metrics_is_set_aside_and_the_run_finished_again(
        tmp_path: Path, tiny_tokenizer: Any, reference: Any, final: Any, caplog: pytest.LogCaptureFixture):
    _run(tmp_path, tiny_tokenizer)
    rdir = _folder(tmp_path)
    result = json.loads((rdir / "result.json").read_text())
    (rdir / "result.json").write_text(json.dumps({**result, "final": final}))
    assert not has_result(rdir)  # `make runs` runs it again instead of reading "oops" back
    with caplog.at_level(logging.WARNING, logger="wilke_lib"):
        again = _run(tmp_path, tiny_tokenizer)
    assert again.source == "computed"
    same_numbers(again, reference)
    assert json.dumps(json.loads((rdir / "result.json.corrupt").read_text())["final"]) == json.dumps(final)
    assert any(str(rdir / "result.json") in m and "result.json.corrupt" in m for m in caplog.messages)
    assert has_result(rdir)


def test_load_run_does_not_read_a_result_without_final_metrics_as_finished(tmp_path: Path, tiny_tokenizer: Any):
    _run(tmp_path, tiny_tokenizer)
    rdir = _folder(tmp_path)
    (rdir / "result.json").write_text(json.dumps({"key": "x", "final": "oops"}))
    assert load_run(rdir).final == {}
    assert (rdir / "result.json.corrupt").exists() and not (rdir / "result.json").exists()


def test_a_finished_run_whose_config_lost_its_config_is_read_back(tmp_path: Path, tiny_tokenizer: Any,
                                                                  reference: Any, caplog: pytest.LogCaptureFixture):
    _run(tmp_path, tiny_tokenizer)
    rdir = _folder(tmp_path)
    saved = json.loads((rdir / "config.json").read_text())
    (rdir / "config.json").write_text(json.dumps({k: v for k, v in saved.items() if k != "config"}))
    with caplog.at_level(logging.WARNING, logger="wilke_lib"):
        back = read_back(RECORDS, config(tmp_path))
    assert back is not None
    same_numbers(back, reference)
    assert json.loads((rdir / "config.json").read_text()) == saved  # written again, the same bytes' content
    assert (rdir / "config.json.corrupt").exists()
    assert any(str(rdir / "config.json") in m and "'config'" in m for m in caplog.messages)
    (rdir / "config.json").write_text(json.dumps({k: v for k, v in saved.items() if k != "config"}))
    editor = FakeEditor()
    again = _run(tmp_path, tiny_tokenizer, editor)  # run_lifelong repairs it too, and recomputes nothing
    assert editor.calls == 0 and again.source == "read back"
    same_numbers(again, reference)


def test_an_unfinished_run_whose_config_lost_its_config_resumes(tmp_path: Path, tiny_tokenizer: Any, reference: Any):
    with pytest.raises(Kill):
        _run(tmp_path, tiny_tokenizer, kill_at=3)
    rdir = _folder(tmp_path)
    saved = json.loads((rdir / "config.json").read_text())
    (rdir / "config.json").write_text(json.dumps({k: v for k, v in saved.items() if k != "config"}))
    editor = FakeEditor()
    resumed = _run(tmp_path, tiny_tokenizer, editor)
    assert editor.calls == 2 * (5 - 2)  # from the state saved after step 2: nothing thrown away
    same_numbers(resumed, reference)
    assert load_run(rdir).final == reference.final  # and it reads back, not KeyError forever


@pytest.mark.parametrize("name, line, bad", [
    ("steps.jsonl", 2, {"step": 2}),
    ("steps.jsonl", 1, {"step": 1, "case_id": 0, "failed": False, "error": None, "ES": "1.0", "PS": 1.0, "NS": 1.0}),
    ("steps.jsonl", 2, [2]),
    ("checkpoints.jsonl", 2, {"step": 2, "ES": 1.0}),
])
def test_a_row_that_lacks_fields_is_set_aside_and_the_run_recomputed(
        tmp_path: Path, tiny_tokenizer: Any, reference: Any, caplog: pytest.LogCaptureFixture,
        name: str, line: int, bad: Any):
    with pytest.raises(Kill):
        _run(tmp_path, tiny_tokenizer, kill_at=4)
    rdir = _folder(tmp_path)
    lines = (rdir / name).read_text().splitlines()
    lines[line - 1] = json.dumps(bad)
    (rdir / name).write_text("".join(l + "\n" for l in lines))
    with caplog.at_level(logging.WARNING, logger="wilke_lib"):
        resumed = _run(tmp_path, tiny_tokenizer)
    same_numbers(resumed, reference)
    assert (rdir / f"{name}.corrupt").exists()
    assert any(f"{rdir / name} line {line}" in m and f"{name}.corrupt" in m for m in caplog.messages), caplog.messages
    assert load_run(rdir).final == reference.final
