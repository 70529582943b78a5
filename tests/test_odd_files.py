"""Files that are not what the library expects, and that used to give a raw error or a wrong count (issue 34):
JSON nested too deeply to parse (RecursionError), a model folder whose name makes cache and run file names
pass 255 bytes (ENAMETOOLONG), a records "file" that is a pipe, a device or a folder ("not found"), and a
known-records cache emptied or written for other records ("only 0 known records"). Each is refused with an
error naming the file, or, for a run's or a cache's own file, set aside or recomputed with a warning naming it."""

from __future__ import annotations

import gzip
import json
import logging
import os
from pathlib import Path
from typing import Any

import pytest
from helpers import FakeEditor, Kill, fake_config, fake_run, kill_at, make_records, same_numbers
from tiny import tiny_model_for

from wilke_lib import second_moments as stats
from wilke_lib.counterfact import load_counterfact
from wilke_lib.errors import RecordError
from wilke_lib.lifelong import LifelongConfig, load_run, run_dir
from wilke_lib.lifelong.store import read_progress
from wilke_lib.results import NAME_LIMIT, CorruptFileError, bounded_name, read_json, read_jsonl

DEEP = "[" * 100_000 + "]" * 100_000
DEEP_OBJECT = '{"a": ' * 100_000 + "1" + "}" * 100_000


RECORDS = make_records(12)


# ---------------------------------------------------------------- records files and read_json

@pytest.mark.parametrize("text", [DEEP, DEEP_OBJECT], ids=["lists", "objects"])
def test_a_records_file_nested_too_deeply_is_refused(tmp_path: Path, text: str):
    path = tmp_path / "records.json"
    path.write_text(text)
    with pytest.raises(RecordError, match="nested too deeply to be a records file") as info:
        load_counterfact(path)
    assert str(path) in str(info.value)


def test_read_json_names_a_file_nested_too_deeply(tmp_path: Path):
    path = tmp_path / "result.json"
    path.write_text(DEEP)
    with pytest.raises(CorruptFileError, match="nested too deeply") as info:
        read_json(path, rebuild="recompute it")
    assert str(path) in str(info.value) and "recompute it" in str(info.value)


def test_a_json_line_nested_too_deeply_is_dropped(tmp_path: Path, caplog: pytest.LogCaptureFixture):
    path = tmp_path / "steps.jsonl"
    path.write_text('{"step": 1}\n' + DEEP + '\n{"step": 3}\n')
    with caplog.at_level(logging.WARNING, logger="wilke_lib"):
        assert read_jsonl(path) == [{"step": 1}, {"step": 3}]
    assert any(f"line 2 in {path}" in m for m in caplog.messages)


def test_a_fifo_as_the_records_file_is_named_not_read(tmp_path: Path):
    fifo = tmp_path / "records.json"
    os.mkfifo(fifo)  # nobody writes to it: reading it would block, so refusing it must not open it
    with pytest.raises(RecordError, match="not a regular file: give the path of a JSON file") as info:
        load_counterfact(fifo)
    assert str(fifo) in str(info.value) and "pipe" in str(info.value)


@pytest.mark.parametrize("path, kind", [("/dev/null", "a character device"), (None, "a folder")])
def test_a_device_or_folder_as_the_records_file_says_what_it_is(tmp_path: Path, path: str | None, kind: str):
    with pytest.raises(RecordError, match=f"is {kind}, not a regular file") as info:
        load_counterfact(path or tmp_path)
    assert str(path or tmp_path) in str(info.value)


def test_a_missing_records_file_is_still_not_found(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match="not found"):
        load_counterfact(tmp_path / "absent.json")


# ---------------------------------------------------------------- runs: a fake editor on a tiny model

SETTINGS = dict(n_edits=4, filter_known=True)  # the known-record filter keeps the first 10 of the 12 records


def config(tmp_path: Path, **kw: Any) -> LifelongConfig:
    return fake_config(tmp_path / "runs", **{**SETTINGS, **kw})


def run(tmp_path: Path, tok: Any, fake: FakeEditor | None = None, model: Any = None, **kw: Any):
    return fake_run(tmp_path / "runs", tok, RECORDS, editor=fake or FakeEditor(known_limit=10), model=model,
                    **{**SETTINGS, **kw})


@pytest.fixture
def reference(reference_run: Any):
    return reference_run(RECORDS, known_limit=10, **SETTINGS)


def test_a_nested_result_json_is_set_aside_and_the_run_finished_again(
        tmp_path: Path, tiny_tokenizer: Any, reference: Any, caplog: pytest.LogCaptureFixture):
    folder = run(tmp_path, tiny_tokenizer).run_dir
    (folder / "result.json").write_text(DEEP)
    assert read_progress(RECORDS, config(tmp_path)) is not None  # read back as unfinished, no RecursionError
    (folder / "result.json").write_text(DEEP)
    with caplog.at_level(logging.WARNING, logger="wilke_lib"):
        again = run(tmp_path, tiny_tokenizer)
    same_numbers(again, reference)
    assert (folder / "result.json.corrupt").read_text() == DEEP
    assert any(str(folder / "result.json") in m and "nested too deeply" in m for m in caplog.messages)


def test_a_nested_config_json_starts_the_run_again(tmp_path: Path, tiny_tokenizer: Any, reference: Any,
                                                   caplog: pytest.LogCaptureFixture):
    folder = run_dir(str(tmp_path / "runs"), config(tmp_path), RECORDS)
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(DEEP)
    with caplog.at_level(logging.WARNING, logger="wilke_lib"):
        again = run(tmp_path, tiny_tokenizer)
    same_numbers(again, reference)
    assert any(str(folder / "config.json") in m and "nested too deeply" in m for m in caplog.messages)


def test_a_nested_row_is_dropped_and_the_run_resumed(tmp_path: Path, tiny_tokenizer: Any, reference: Any):
    with pytest.raises(Kill):
        fake_run(tmp_path / "runs", tiny_tokenizer, RECORDS, editor=FakeEditor(known_limit=10), on_step=kill_at(3),
                 **SETTINGS)
    folder = run_dir(str(tmp_path / "runs"), config(tmp_path), RECORDS)
    lines = (folder / "steps.jsonl").read_text().splitlines()
    (folder / "steps.jsonl").write_text("\n".join([lines[0], DEEP, *lines[2:]]) + "\n")
    same_numbers(run(tmp_path, tiny_tokenizer), reference)


def test_a_nested_line_in_the_archived_steps_is_named(tmp_path: Path, tiny_tokenizer: Any):
    folder = run(tmp_path, tiny_tokenizer).run_dir
    (folder / "steps.jsonl.gz").write_bytes(gzip.compress(DEEP.encode()))
    with pytest.raises(CorruptFileError, match="nested too deeply") as info:
        load_run(folder)
    assert str(folder / "steps.jsonl.gz") in str(info.value)


# ---------------------------------------------------------------- the known-records cache

@pytest.mark.parametrize("content", ["", '{"indices": []}', '{"indices": [0, 1], "n_records": 3}',
                                     '{"indices": [0, 1], "records_fingerprint": "other"}'],
                         ids=["empty file", "empty list", "other number of records", "other records"])
def test_a_known_cache_that_is_empty_or_of_other_records_is_filtered_again(
        tmp_path: Path, tiny_tokenizer: Any, reference: Any, caplog: pytest.LogCaptureFixture, content: str):
    run(tmp_path, tiny_tokenizer, seed=10)
    (cache,) = (tmp_path / "runs" / "known").glob("*.json")
    cache.write_text(content)
    fake = FakeEditor(known_limit=10)
    with caplog.at_level(logging.WARNING, logger="wilke_lib"):
        again = run(tmp_path, tiny_tokenizer, fake)
    assert fake.filters == 1
    same_numbers(again, reference)
    assert any(str(cache) in m and "filtering again" in m for m in caplog.messages), caplog.messages
    assert json.loads(cache.read_text())["indices"] == list(range(10))


def test_a_good_known_cache_is_used(tmp_path: Path, tiny_tokenizer: Any, reference: Any):
    run(tmp_path, tiny_tokenizer, seed=10)
    fake = FakeEditor(known_limit=10)
    same_numbers(run(tmp_path, tiny_tokenizer, fake), reference)
    assert fake.filters == 0


# ---------------------------------------------------------------- long model folder names

def test_bounded_name_keeps_short_names_and_shortens_long_ones():
    assert bounded_name("toy-gpt2") == "toy-gpt2"
    assert bounded_name("x" * NAME_LIMIT) == "x" * NAME_LIMIT
    a, b = bounded_name("m" * 240 + "a"), bounded_name("m" * 240 + "b")
    assert a != b and a.startswith("m" * 50) and len(a.encode()) <= NAME_LIMIT
    assert len(bounded_name("é" * 200).encode()) <= NAME_LIMIT


def test_short_names_keep_their_run_folder_and_statistics_folder(tmp_path: Path):
    name = "toy-gpt2-" + "w" * (NAME_LIMIT - 9)  # the longest name kept as it is
    assert run_dir("runs", config(tmp_path, model_name=name), "fp").name.startswith(f"{name}__fake__n4__seed9__")
    assert stats.stats_path("toy-gpt2-1234abcd-5678ef90-1000", "wikitext", 3, 100, tmp_path).parent.parent.name == \
        "toy-gpt2-1234abcd-5678ef90-1000"


def test_a_model_folder_with_a_240_character_name_runs(tmp_path: Path, tiny_tokenizer: Any,
                                                       monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("WILKE_CACHE_DIR", str(tmp_path / "cache"))  # the weights digest's cache
    folder = tmp_path / ("m" * 240)
    model = tiny_model_for(tiny_tokenizer)
    model.save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    first = run(tmp_path, tiny_tokenizer, model=model, model_name=str(folder))
    assert first.source == "computed" and len(first.run_dir.name.encode()) < 200
    fake = FakeEditor(known_limit=10)
    again = run(tmp_path, tiny_tokenizer, fake, model=model, model_name=str(folder))
    assert again.source == "read back" and again.run_dir == first.run_dir and fake.edits == 0
    assert all(len(p.name.encode()) <= 200 for p in tmp_path.rglob("*") if p != folder)
    assert len(list((tmp_path / "runs" / "known").glob("m*__*.json"))) == 1
    long_stats = stats.stats_path("m" * 240 + "-1234abcd-5678ef90-1000", "wikitext", 3, 100, tmp_path)
    assert all(len(part.encode()) <= NAME_LIMIT for part in long_stats.parts)
