"""Files that are not what the library expects, and that used to give a raw error or a wrong count (issue 34):
JSON nested too deeply to parse (RecursionError), a model folder whose name makes cache and run file names
pass 255 bytes (ENAMETOOLONG), a records "file" that is a pipe, a device or a folder ("not found"), and a
known-records cache emptied or written for other records ("only 0 known records"). Each is refused with an
error naming the file, or, for a run's or a cache's own file, set aside or recomputed with a warning naming it."""

from __future__ import annotations

import dataclasses
import gzip
import json
import logging
import os
import zlib
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from tiny import make_tiny_model

from wilke_lib import stats
from wilke_lib.arch import ModelAdapter
from wilke_lib.counterfact import load_counterfact
from wilke_lib.errors import EditError, RecordError
from wilke_lib.lifelong import Backend, LifelongConfig, load_run, run_dir, run_lifelong
from wilke_lib.lifelong.store import read_progress
from wilke_lib.results import NAME_LIMIT, CorruptFileError, bounded_name, read_json, read_jsonl

DEEP = "[" * 100_000 + "]" * 100_000
DEEP_OBJECT = '{"a": ' * 100_000 + "1" + "}" * 100_000


def make_records(n: int) -> list[dict]:
    subjects = ["Valo Durn", "Mira Quell", "Tobin Ash", "Sela Varn", "Orrin Pike", "Kesta Lum"]
    objects = ["French", "Welsh", "Dutch", "English", "Spanish", "Norwegian", "Japanese", "Danish"]
    return [{"case_id": i,
             "requested_rewrite": {"prompt": "The mother tongue of {} is", "subject": f"{subjects[i % 6]} {i}",
                                   "relation_id": "P103", "target_new": {"str": objects[i % 8], "id": f"Q{i}"},
                                   "target_true": {"str": objects[(i + 3) % 8], "id": f"Q{100 + i}"}},
             "paraphrase_prompts": [f"{subjects[i % 6]} {i} grew up speaking"],
             "neighborhood_prompts": [f"The mother tongue of {subjects[(i + 3) % 6]} is"]} for i in range(n)]


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

def _apply(model: torch.nn.Module, text: str, scale: float) -> SimpleNamespace:
    adapter = ModelAdapter(model)
    v = torch.randn(adapter.d_mlp, generator=torch.Generator().manual_seed(zlib.crc32(text.encode())))
    with torch.no_grad():
        delta = scale * torch.outer(torch.tanh(adapter.out_weight(1).float() @ v), v) / v.norm() ** 2
        adapter.add_to_out_weight(1, delta)
    return SimpleNamespace(layers=[1], weight_deltas={adapter.name_of("mlp_out", 1): delta}, scores=None)


@dataclasses.dataclass
class Fake:
    """A fake editor (rank-one, weight dependent) and known-record filter that count their calls."""

    edits: int = 0
    filters: int = 0

    def edit(self, model: Any, tok: Any, request: dict, hparams: Any) -> SimpleNamespace:
        self.edits += 1
        return _apply(model, request["subject"] + request["target_new"]["str"], 0.5)

    def rollback(self, model: Any, tok: Any, request: dict, hparams: Any, previous: Any) -> SimpleNamespace:
        return _apply(model, request["subject"] + request["target_new"]["str"], -0.45)

    def known(self, model: Any, tok: Any, records: list[dict], batch_size: int = 64) -> list[dict]:
        self.filters += 1
        return records[:10]

    def backend(self) -> Backend:
        return Backend(edit=self.edit, rollback=self.rollback, matches=_matches, known=self.known, edit_error=EditError)


def _matches(model: Any, tok: Any, prompts: list[str], targets: list[str], batch_size: int = 64) -> list[bool]:
    weights = int(float(ModelAdapter(model).out_weight(1).double().sum()) * 1e6)
    return [(zlib.crc32(f"{p}|{t}".encode()) + weights) % 3 != 0 for p, t in zip(prompts, targets)]


@dataclasses.dataclass
class FakeHparams:
    scale: float = 0.5


def config(tmp_path: Path, **kw: Any) -> LifelongConfig:
    base = dict(model_name="tiny-gpt2", editor="fake", hparams=FakeHparams(), n_edits=4, seed=9,
                out_dir=str(tmp_path / "runs"), eval_batch_size=8, filter_known=True)
    return LifelongConfig(**{**base, **kw})


def run(tmp_path: Path, tok: Any, fake: Fake | None = None, model: Any = None, **kw: Any):
    model = model if model is not None else make_tiny_model("gpt2", len(tok), eos_token_id=tok.eos_token_id,
                                                            pad_token_id=tok.pad_token_id)
    return run_lifelong(model, tok, RECORDS, config(tmp_path, **kw), backend=(fake or Fake()).backend())


def same_numbers(result: Any, reference: Any) -> None:
    clean = lambda df: df.drop(columns=[c for c in df.columns if c.endswith("_seconds")])  # noqa: E731
    assert clean(result.steps).equals(clean(reference.steps))
    assert result.checkpoints.equals(reference.checkpoints)
    assert result.final == reference.final


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer: Any):
    return run(tmp_path_factory.mktemp("reference"), tiny_tokenizer)


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
    class Kill(Exception):
        pass

    def kill(step: int, row: dict) -> None:
        if step == 3:
            raise Kill
    model = make_tiny_model("gpt2", len(tiny_tokenizer), eos_token_id=0, pad_token_id=1)
    with pytest.raises(Kill):
        run_lifelong(model, tiny_tokenizer, RECORDS, config(tmp_path), backend=Fake().backend(), on_step=kill)
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
    fake = Fake()
    with caplog.at_level(logging.WARNING, logger="wilke_lib"):
        again = run(tmp_path, tiny_tokenizer, fake)
    assert fake.filters == 1
    same_numbers(again, reference)
    assert any(str(cache) in m and "filtering again" in m for m in caplog.messages), caplog.messages
    assert json.loads(cache.read_text())["indices"] == list(range(10))


def test_a_good_known_cache_is_used(tmp_path: Path, tiny_tokenizer: Any, reference: Any):
    run(tmp_path, tiny_tokenizer, seed=10)
    fake = Fake()
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
    model = make_tiny_model("gpt2", len(tiny_tokenizer), eos_token_id=0, pad_token_id=1)
    model.save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    first = run(tmp_path, tiny_tokenizer, model=model, model_name=str(folder))
    assert first.source == "computed" and len(first.run_dir.name.encode()) < 200
    fake = Fake()
    again = run(tmp_path, tiny_tokenizer, fake, model=model, model_name=str(folder))
    assert again.source == "read back" and again.run_dir == first.run_dir and fake.edits == 0
    assert all(len(p.name.encode()) <= 200 for p in tmp_path.rglob("*") if p != folder)
    assert len(list((tmp_path / "runs" / "known").glob("m*__*.json"))) == 1
    long_stats = stats.stats_path("m" * 240 + "-1234abcd-5678ef90-1000", "wikitext", 3, 100, tmp_path)
    assert all(len(part.encode()) <= NAME_LIMIT for part in long_stats.parts)
