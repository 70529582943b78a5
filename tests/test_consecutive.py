"""Consecutive batch editing (`lifelong.consecutive`) on tiny models: the batches and checkpoints it
writes, a killed run resuming to the same numbers (the hook layers of COMEBA-HK included), and
`editing.edit_batch` landing a batch whole or not at all."""

from __future__ import annotations

import pytest
import torch

from helpers import Kill, comeba_hparams, numbered_records
from tiny import tiny_model_for
from wilke_lib.editing import EditCache, EditError, edit_batch
from wilke_lib.editors.common import EditorState
from wilke_lib.hparams import MEMITHParams, ROMEHParams
from wilke_lib.lifelong.consecutive import ConsecutiveConfig, load, matrix, read_progress, run_consecutive


def settings(corpus_file, editor: str):
    common = dict(context_lengths=[[5, 3]], mom2_corpus=str(corpus_file), mom2_n_samples=800, mom2_batch_size=128)
    if editor == "memit":
        return MEMITHParams(layers=[1, 2], mom2_update_weight=50.0, **common)
    if editor == "rome":
        return ROMEHParams(layer=2, **common)
    return comeba_hparams(corpus_file)


def run(tok, corpus_file, tmp_path, stats_dir, editor: str, out: str, **kw):
    config = ConsecutiveConfig(model_name="tiny-gpt2", editor=editor, n_edits=5, batch_size=2,
                               hparams=settings(corpus_file, editor), out_dir=str(tmp_path / out), eval_batch_size=8,
                               filter_known=False)
    model = tiny_model_for(tok, "gpt2")
    return run_consecutive(model, tok, numbered_records(12), config, EditCache.for_model(model, stats_dir=stats_dir), **kw)


@pytest.mark.parametrize("editor", ["memit", "rome"])
def test_batches_and_checkpoints(editor, tok, corpus_file, tmp_path, stats_dir):
    result = run(tok, corpus_file, tmp_path, stats_dir, editor, "a")
    assert result.steps["n_requests"].tolist() == [2, 2, 1] and result.steps["edits"].tolist() == [2, 4, 5]
    assert result.checkpoints["edits"].tolist() == [2, 4, 5]  # the batches that reach 1, 2, 4 and the end
    assert set(result.final) == {"efficacy", "generalization", "locality", "kept"}
    assert all(0 <= v <= 1 for v in result.final.values())
    assert not (result.run_dir / "state.safetensors").exists()
    again = run(tok, corpus_file, tmp_path, stats_dir, editor, "a")  # read back, not recomputed
    assert again.source == "read back" and again.final == result.final


def test_a_killed_run_resumes_to_the_same_numbers_with_its_hook_layers(tok, corpus_file, tmp_path, stats_dir):
    full = run(tok, corpus_file, tmp_path, stats_dir, "comeba_hk", "full")

    def kill(j, row):
        if j == 2:
            raise Kill("killed after batch 2")

    with pytest.raises(Kill):
        run(tok, corpus_file, tmp_path, stats_dir, "comeba_hk", "killed", on_batch=kill)
    config = load(next((tmp_path / "killed" / "consecutive").iterdir())).config
    assert read_progress(numbered_records(12), config).source.startswith("unfinished after 2 of 3")
    resumed = run(tok, corpus_file, tmp_path, stats_dir, "comeba_hk", "killed")
    assert resumed.final == full.final
    assert resumed.checkpoints.equals(full.checkpoints)


def test_a_batch_lands_whole_or_not_at_all(tok, corpus_file, stats_dir):
    model = tiny_model_for(tok, "gptj")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    good = numbered_records(2)[0]["requested_rewrite"]
    bad = {**good, "prompt": "The capital city of Spain", "subject": "Nobody"}
    state = EditorState({"x": torch.ones(2)})
    with pytest.raises(EditError):
        edit_batch(model, tok, [good, bad], settings(corpus_file, "rome"),
                   cache=EditCache.for_model(model, stats_dir=stats_dir), state=state)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert set(state.tensors) == {"x"}


def test_the_matrix_lists_every_editor_and_batch_size():
    configs = matrix(["toy-gpt2"], ["memit", "rome", "comeba_hk"], [100, 1], 64)
    assert [(c.editor, c.batch_size) for c in configs] == [("memit", 1), ("rome", 1), ("comeba_hk", 1), ("memit", 100),
                                                           ("comeba_hk", 100)]  # ROME edits one by one: once
    three = ConsecutiveConfig("toy-gpt2", "memit", 300, 100)
    assert three.batch_ends() == [100, 200, 300]
    assert three.checkpoints() == [1, 2, 4, 8, 16, 32, 64, 128, 256, 300]
    with pytest.raises(ValueError, match="batch_size"):
        ConsecutiveConfig("toy-gpt2", "memit", 10, 0)
