"""Issue 34, items 2, 3, 5 and 9 and the lock file: what a run is keyed by and what it records beside its key.

* the code a run was computed with (`code_version`, `lifelong.provenance`): recorded at start and resume, a
  resume under other code refused unless allowed (then recorded), stale runs marked on read-back, re-stamped
  after their first steps are recomputed bit for bit (`lifelong.restamp`), listed by `run_matrix --stale`;
* the caller's model is never edited by `run_lifelong`, and a model whose weights differ from the files the
  run is keyed by is refused;
* an organism given by its folder path is the organism (same run identity, same folder);
* LEMoE's experts are part of `models.model_identity` and `models.weights_digest`;
* every committed run is still found where it is (the identities did not change);
* `book.versions()` names the lock file.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import torch
from tiny import make_tiny_model

from wilke_lib import book, code_version, models
from wilke_lib.arch import ModelAdapter
from wilke_lib.editors.common import EditorState
from wilke_lib.editors.lemoe import ExpertBypass
from wilke_lib.hparams import FTHParams, LEMoEHParams, hparams_from_dict
from wilke_lib.lifelong import (Backend, CodeChangedError, LifelongConfig, read_progress, restamp, run_dir,
                                run_identity, run_lifelong, run_many)
from wilke_lib.counterfact import load_counterfact
from wilke_lib.lifelong import consecutive, records_fingerprint
from wilke_lib.lifelong.config import config_from_dict
from wilke_lib.lifelong.restamp import first_difference
from wilke_lib.results import REPO_ROOT, digest

ORGANISM = "toy-gpt2"
HAS_ORGANISM = (models.ORGANISMS_DIR / ORGANISM / "config.json").is_file()

# ---------------------------------------------------------------- a deterministic fake editor (own copy: tests do
# not import each other)


class FakeEditError(ValueError):
    pass


@dataclass
class FakeHparams:
    scale: float = 2.0


@dataclass
class FakeResult:
    layers: list[int]
    weight_deltas: dict[str, torch.Tensor]
    info: dict = field(default_factory=dict)


def _crc(text: str) -> int:
    return zlib.crc32(text.encode())


@dataclass
class FakeEditor:
    """A rank-one change of mlp_out that depends on the current weights; `bias` stands for a code change that
    changes the numbers (the run's identity stays the same)."""

    bias: float = 0.0

    def edit(self, model, tok, request, hparams):
        return self._apply(model, request, hparams.scale + self.bias, request["target_new"]["str"])

    def rollback(self, model, tok, request, hparams, previous):
        return self._apply(model, request, -0.9 * hparams.scale, request["target_true"]["str"], previous.layers[0])

    @staticmethod
    def _apply(model, request, scale, target, layer=None):
        adapter = ModelAdapter(model)
        layer = _crc(request["subject"]) % adapter.n_layers if layer is None else layer
        v = torch.randn(adapter.d_mlp, generator=torch.Generator().manual_seed(_crc(request["subject"] + target)))
        delta = scale * torch.outer(torch.tanh(adapter.out_weight(layer).float() @ v), v) / v.norm() ** 2
        adapter.add_to_out_weight(layer, delta)
        return FakeResult(layers=[layer], weight_deltas={adapter.name_of("mlp_out", layer): delta})


@torch.no_grad()
def fake_matches(model, tok, prompts, targets, batch_size=64):
    out = []
    for prompt, target in zip(prompts, targets):
        top = int(model(input_ids=torch.tensor([tok(prompt)["input_ids"]])).logits[0, -1].argmax())
        out.append((top + _crc(target)) % 3 != 0)
    return out


def backend(bias: float = 0.0) -> Backend:
    editor = FakeEditor(bias)
    return Backend(edit=editor.edit, rollback=editor.rollback, matches=fake_matches,
                   known=lambda model, tok, records, batch_size=64: list(records), edit_error=FakeEditError)


SUBJECTS = ["Valo Durn", "Mira Quell", "Tobin Ash", "Sela Varn", "Orrin Pike", "Kesta Lum"]
OBJECTS = ["French", "Welsh", "Paris", "Rome", "Oslo", "physics", "music", "guitar"]


def make_records(n: int) -> list[dict]:
    out = []
    for i in range(n):
        subject, other = f"{SUBJECTS[i % len(SUBJECTS)]} {i}", SUBJECTS[(i + 3) % len(SUBJECTS)]
        out.append({"case_id": i,
                    "requested_rewrite": {"prompt": "The mother tongue of {} is", "subject": subject,
                                          "relation_id": "P103", "target_new": {"str": OBJECTS[i % 8], "id": f"n{i}"},
                                          "target_true": {"str": OBJECTS[(i + 1) % 8], "id": f"t{i}"}},
                    "paraphrase_prompts": [f"{subject} grew up speaking"],
                    "neighborhood_prompts": [f"The mother tongue of {other} is"]})
    return out


def new_model(tok) -> torch.nn.Module:
    return make_tiny_model("gpt2", len(tok), eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)


def config(tmp_path: Path, **kw) -> LifelongConfig:
    base = dict(model_name="tiny-gpt2", editor="fake", hparams=FakeHparams(), n_edits=5, seed=9,
                out_dir=str(tmp_path / "runs"), eval_batch_size=4, filter_known=True)
    return LifelongConfig(**{**base, **kw})


class Kill(RuntimeError):
    pass


def kill_at(step: int):
    def hook(s: int, row: dict) -> None:
        if s == step:
            raise Kill(f"killed after step {s}")
    return hook


def other_code(monkeypatch, fingerprint: str = "0123456789abcdef") -> None:
    """Pretend the library's sources changed: the current fingerprint becomes `fingerprint`."""
    monkeypatch.setattr(code_version, "current_code", lambda: {"fingerprint": fingerprint, "git_commit": "x",
                                                                "git_dirty": False})


def code_entry(rdir: Path) -> dict:
    return json.loads((rdir / "config.json").read_text()).get("code")


NON_TIMING = lambda df: df.drop(columns=[c for c in df.columns if c.endswith("seconds")])  # noqa: E731

# ---------------------------------------------------------------- the code fingerprint


def test_the_fingerprint_covers_sources_and_settings_paths_and_contents(tmp_path: Path) -> None:
    pkg = tmp_path / "wilke_lib"
    (pkg / "hparams" / "rome").mkdir(parents=True)
    (pkg / "a.py").write_text("x = 1\n")
    (pkg / "hparams" / "rome" / "m.yaml").write_text("layer: 2\n")
    (pkg / "notes.txt").write_text("not code")
    first = code_version.code_fingerprint(pkg)
    assert len(first) == 16 and code_version.code_fingerprint(pkg) == first
    (pkg / "notes.txt").write_text("still not code")
    assert code_version.code_fingerprint(pkg) == first
    (pkg / "hparams" / "rome" / "m.yaml").write_text("layer: 3\n")
    assert code_version.code_fingerprint(pkg) != first
    (pkg / "hparams" / "rome" / "m.yaml").write_text("layer: 2\n")
    (pkg / "a.py").rename(pkg / "b.py")
    assert code_version.code_fingerprint(pkg) != first  # a renamed file is other code
    info = code_version.current_code()  # once per process: the code it imported
    assert len(info["fingerprint"]) == 16 and code_version.current_code() is info
    assert code_version.code_status(None) == "unknown" and code_version.code_status(info["fingerprint"]) == "current"
    assert code_version.code_status("ffffffffffffffff") == "differs"


def test_a_run_records_its_code_and_is_not_stale(tmp_path: Path, tiny_tokenizer) -> None:
    records, cfg = make_records(12), config(tmp_path)
    run = run_lifelong(new_model(tiny_tokenizer), tiny_tokenizer, records, cfg, backend=backend())
    code = code_entry(run.run_dir)
    assert code["fingerprint"] == code_version.current_fingerprint() and "git_commit" in code
    assert [e["event"] for e in code["history"]] == ["started"]
    assert run.code == code["fingerprint"] and run.code_status == "current" and not run.stale
    assert not read_progress(records, cfg).stale


def test_a_run_without_a_fingerprint_is_read_back_as_unknown_code(tmp_path: Path, tiny_tokenizer) -> None:
    records, cfg = make_records(12), config(tmp_path)
    run = run_lifelong(new_model(tiny_tokenizer), tiny_tokenizer, records, cfg, backend=backend())
    path = run.run_dir / "config.json"
    data = json.loads(path.read_text())
    del data["code"]  # as every run written before fingerprints existed
    path.write_text(json.dumps(data))
    again = read_progress(records, cfg)
    assert again.source == "read back" and again.final == run.final
    assert again.code is None and again.code_status == "unknown" and again.stale
    assert run_many(lambda name: pytest.fail("a finished run loads no model"), records, [cfg])[0].stale


def test_resuming_under_other_code_is_refused_unless_allowed_and_then_recorded(tmp_path: Path, tiny_tokenizer,
                                                                               monkeypatch) -> None:
    records = make_records(12)
    reference = run_lifelong(new_model(tiny_tokenizer), tiny_tokenizer, records, config(tmp_path / "ref"),
                             backend=backend())
    cfg = config(tmp_path)
    with pytest.raises(Kill):
        run_lifelong(new_model(tiny_tokenizer), tiny_tokenizer, records, cfg, backend=backend(), on_step=kill_at(3))
    rdir = run_dir(cfg.out_dir, cfg, records)
    old = code_entry(rdir)["fingerprint"]
    other_code(monkeypatch)
    with pytest.raises(CodeChangedError) as err:
        run_lifelong(new_model(tiny_tokenizer), tiny_tokenizer, records, cfg, backend=backend())
    assert str(rdir) in str(err.value) and old in str(err.value) and "0123456789abcdef" in str(err.value)
    assert "allow_code_change" in str(err.value)
    assert code_entry(rdir)["fingerprint"] == old  # nothing recorded, nothing computed
    resumed = run_lifelong(new_model(tiny_tokenizer), tiny_tokenizer, records, cfg, backend=backend(),
                           allow_code_change=True)
    code = code_entry(rdir)
    assert code["fingerprint"] == "0123456789abcdef" and not resumed.stale
    continued = code["history"][-1]
    assert continued["event"] == "continued after a code change"
    assert (continued["from"], continued["fingerprint"], continued["step"]) == (old, "0123456789abcdef", 2)  # the state of step 2
    pd.testing.assert_frame_equal(NON_TIMING(resumed.steps), NON_TIMING(reference.steps))


def test_resuming_under_the_same_or_an_unknown_code_goes_on_and_is_recorded(tmp_path: Path, tiny_tokenizer) -> None:
    records, cfg = make_records(12), config(tmp_path)
    with pytest.raises(Kill):
        run_lifelong(new_model(tiny_tokenizer), tiny_tokenizer, records, cfg, backend=backend(), on_step=kill_at(2))
    rdir = run_dir(cfg.out_dir, cfg, records)
    data = json.loads((rdir / "config.json").read_text())
    del data["code"]  # an unfinished run from before fingerprints: not refused
    (rdir / "config.json").write_text(json.dumps(data))
    with pytest.raises(Kill):
        run_lifelong(new_model(tiny_tokenizer), tiny_tokenizer, records, cfg, backend=backend(), on_step=kill_at(4))
    assert code_entry(rdir)["history"][-1] | {"at": None} == {"event": "resumed", "step": 1, "from": None,
                                                               "fingerprint": code_version.current_fingerprint(),
                                                               "at": None}
    run_lifelong(new_model(tiny_tokenizer), tiny_tokenizer, records, cfg, backend=backend())
    assert [(e["event"], e["step"]) for e in code_entry(rdir)["history"]] == [("resumed", 1), ("resumed", 3)]


def test_the_consecutive_runner_records_and_checks_its_code(tmp_path: Path, tiny_tokenizer, monkeypatch) -> None:
    records = make_records(12)
    cfg = consecutive.ConsecutiveConfig(model_name="tiny-gpt2", editor="ft", n_edits=4, batch_size=1,
                                        hparams=FTHParams(layer=1), out_dir=str(tmp_path), filter_known=False)
    monkeypatch.setattr(consecutive.editing, "edit_batch", lambda model, tok, requests, hparams, **kw:
                        FakeEditor().edit(model, tok, requests[0], FakeHparams()))
    with pytest.raises(Kill):
        consecutive.run_consecutive(new_model(tiny_tokenizer), tiny_tokenizer, records, cfg, backend=backend(),
                                    on_batch=kill_at(2))
    rdir, _ = consecutive.locate(records, cfg)
    assert code_entry(rdir)["fingerprint"] == code_version.current_fingerprint()
    other_code(monkeypatch)
    with pytest.raises(CodeChangedError, match="computed up to step 2"):
        consecutive.run_consecutive(new_model(tiny_tokenizer), tiny_tokenizer, records, cfg, backend=backend())
    run = consecutive.run_consecutive(new_model(tiny_tokenizer), tiny_tokenizer, records, cfg, backend=backend(),
                                      allow_code_change=True)
    assert run.final and not run.stale
    assert code_entry(rdir)["history"][-1]["event"] == "continued after a code change"


# ---------------------------------------------------------------- re-stamping a stale run


def test_a_stale_run_whose_first_steps_agree_is_re_stamped(tmp_path: Path, tiny_tokenizer, monkeypatch) -> None:
    records, cfg = make_records(12), config(tmp_path)
    run = run_lifelong(new_model(tiny_tokenizer), tiny_tokenizer, records, cfg, backend=backend())
    before = (run.run_dir / "steps.jsonl.gz").read_bytes()
    other_code(monkeypatch)
    assert read_progress(records, cfg).stale
    loads = []

    def loader(name):
        loads.append(name)
        return new_model(tiny_tokenizer), tiny_tokenizer

    outcome = restamp(records, cfg, loader, 3, backend=backend())
    assert outcome.status == "re-stamped" and outcome.checked_steps == 3 and loads == ["tiny-gpt2"]
    code = code_entry(run.run_dir)
    assert code["fingerprint"] == "0123456789abcdef"
    assert code["history"][-1]["note"] == "re-stamped after checking steps 1..3"
    assert code["history"][-1]["from"] == run.code
    assert not read_progress(records, cfg).stale
    assert (run.run_dir / "steps.jsonl.gz").read_bytes() == before  # the rows are not touched
    assert restamp(records, cfg, loader, 3, backend=backend()).status == "current" and len(loads) == 1


def test_a_stale_run_whose_first_steps_differ_stays_stale(tmp_path: Path, tiny_tokenizer, monkeypatch) -> None:
    records, cfg = make_records(12), config(tmp_path)
    run = run_lifelong(new_model(tiny_tokenizer), tiny_tokenizer, records, cfg, backend=backend())
    other_code(monkeypatch)
    outcome = restamp(records, cfg, lambda name: (new_model(tiny_tokenizer), tiny_tokenizer), 2,
                      backend=backend(bias=0.5))  # the "new code" edits differently
    assert outcome.status == "differs" and outcome.table == "steps" and outcome.step == 1
    assert outcome.field == "edit_delta_norms" and outcome.stored != outcome.recomputed
    assert "differs at step 1" in outcome.describe() and "left stale" in outcome.describe()
    assert code_entry(run.run_dir)["fingerprint"] == run.code and read_progress(records, cfg).stale
    with pytest.raises(ValueError, match="not a finished run"):
        restamp(records, config(tmp_path, seed=10), lambda name: pytest.fail("nothing to load"), 2, backend=backend())


def test_rows_are_compared_bit_for_bit_without_timings() -> None:
    row = {"step": 1, "ES": 1.0, "NS": 0.5, "edit_seconds": 0.1, "seconds": 2.0}
    assert first_difference([row], [row | {"edit_seconds": 9.0, "seconds": 3.0}]) is None
    assert first_difference([row], [row | {"NS": 0.5000000000000001}]) == (1, "NS", 0.5, 0.5000000000000001)
    assert first_difference([row], [row | {"extra": 1}])[1] == "extra"
    assert first_difference([row, row], [row])[1] == "<row>"


@pytest.mark.slow  # about 2 min (measured 123 s on a shared 2-core machine)
@pytest.mark.skipif(not HAS_ORGANISM, reason=f"organism {ORGANISM!r} not built")
def test_run_matrix_lists_and_re_stamps_stale_runs(tmp_path: Path, monkeypatch, capsys) -> None:
    from wilke_lib import run_matrix
    from wilke_lib.run_matrix import RunSpec

    monkeypatch.setenv("WILKE_RUNS_DIR", str(tmp_path / "runs"))
    monkeypatch.setenv("WILKE_CACHE_DIR", str(tmp_path / "cache"))
    run_matrix.main(["--models", ORGANISM, "--profile", "quick", "--editors", "rome", "--stale"])
    assert "no stale runs" in capsys.readouterr().out
    spec = RunSpec(ORGANISM, "rome", seed=9, n_edits=2, profile="quick")
    run_matrix.run_matrix([spec], jobs=1, poll_seconds=0.2)
    assert run_matrix.stale_runs([spec]).empty
    other_code(monkeypatch)
    stale = run_matrix.stale_runs([spec])
    assert stale["status"].tolist() == ["differs"] and stale["finished"].tolist() == [True]
    table = run_matrix.restamp_runs([spec], 1)
    assert table["status"].tolist() == ["re-stamped"] and table["checked_steps"].tolist() == [1]
    assert run_matrix.stale_runs([spec]).empty
    capsys.readouterr()
    run_matrix.main(["--models", ORGANISM, "--profile", "quick", "--editors", "rome", "--restamp", "--seeds", "9"])
    assert "no stale runs in this matrix (code 0123456789abcdef)" in capsys.readouterr().out


# ---------------------------------------------------------------- the caller's model and the weights in memory


def test_run_lifelong_leaves_the_callers_model_unedited_even_when_killed(tmp_path: Path, tiny_tokenizer) -> None:
    records = make_records(12)
    model = new_model(tiny_tokenizer)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(Kill):
        run_lifelong(model, tiny_tokenizer, records, config(tmp_path / "a"), backend=backend(), on_step=kill_at(3))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    first = run_lifelong(model, tiny_tokenizer, records, config(tmp_path / "b"), backend=backend())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    second = run_lifelong(model, tiny_tokenizer, records, config(tmp_path / "c"), backend=backend())
    assert second.final == first.final  # the same object twice: the same numbers


def test_a_model_whose_weights_differ_from_its_files_is_refused(tmp_path: Path, tiny_tokenizer, monkeypatch) -> None:
    monkeypatch.setenv("WILKE_CACHE_DIR", str(tmp_path / "cache"))
    folder = tmp_path / "tiny-saved"
    new_model(tiny_tokenizer).save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    records = make_records(12)
    model, tok = models.load_model(folder, device="cpu")
    cfg = config(tmp_path, model_name=str(folder))
    run_lifelong(model, tok, records, cfg, backend=backend(), on_step=None)
    assert list((tmp_path / "cache" / "weights").glob("tiny-saved-*__float32.json"))
    with torch.no_grad():
        ModelAdapter(model).out_weight(1)[0, 0] += 1e-3  # an edit made on the object before the run
    with pytest.raises(models.WeightsMismatchError, match="tiny-saved") as err:
        run_lifelong(model, tok, records, config(tmp_path / "other", model_name=str(folder)), backend=backend())
    assert "freshly loaded" in str(err.value)
    assert not run_dir(tmp_path / "other" / "runs", cfg, records).exists()


# ---------------------------------------------------------------- an organism by its path


@pytest.mark.skipif(not HAS_ORGANISM, reason=f"organism {ORGANISM!r} not built")
def test_an_organism_by_its_path_is_the_organism(monkeypatch, tmp_path: Path) -> None:
    folder = models.ORGANISMS_DIR / ORGANISM
    monkeypatch.chdir(REPO_ROOT)
    for spelling in (str(folder), str(folder) + "/", f"organisms/{ORGANISM}", f"./organisms/{ORGANISM}/"):
        assert models.canonical_model_name(spelling) == ORGANISM, spelling
        named = LifelongConfig(model_name=ORGANISM, editor="rome", n_edits=4)
        spelled = dataclasses.replace(named, model_name=spelling)
        assert run_identity(spelled, "fp") == run_identity(named, "fp")
        assert run_dir("base", spelled, "fp") == run_dir("base", named, "fp")
        assert models.model_key(spelling) == models.model_key(ORGANISM)
        c_named = consecutive.ConsecutiveConfig(model_name=ORGANISM, editor="memit", n_edits=8, batch_size=4,
                                                out_dir=str(tmp_path))
        assert consecutive.locate("fp", dataclasses.replace(c_named, model_name=spelling)) == \
            consecutive.locate("fp", c_named)
    link = tmp_path / "link"
    link.symlink_to(folder)
    assert models.canonical_model_name(link) == ORGANISM
    assert run_identity(named, "fp")["model_name"] == ORGANISM  # the name's identity is what it was


def test_other_names_and_folders_are_left_as_they_are(tmp_path: Path) -> None:
    (tmp_path / "toy-gpt2").mkdir()  # an organism's name, but not in organisms/
    for name in ("gpt2-xl", "EleutherAI/gpt-j-6b", str(tmp_path / "toy-gpt2"), "tiny-gpt2", str(tmp_path)):
        assert models.canonical_model_name(name) == name


def _committed_runs(kind: str) -> list[Path]:
    found = sorted((REPO_ROOT / "runs").glob(f"*/{kind}/config.json"))
    return [p.parent for p in found]


@pytest.mark.skipif(not _committed_runs("*"), reason="no committed runs")
def test_every_committed_run_is_found_where_it_is() -> None:
    """Each committed run's folder is still the folder its configuration gives (identity and key unchanged)."""
    checked = 0
    for rdir in _committed_runs("*"):
        data = json.loads((rdir / "config.json").read_text())
        stored, cfg = data["identity"], data["config"]
        if stored["model_key"] != models.model_key(cfg["model_name"]):
            continue  # an organism retrained since: another model, rightly another run
        hp = hparams_from_dict(cfg["editor"], {k: v for k, v in cfg["hparams"].items() if k != "__type__"}, str(rdir))
        config = dataclasses.replace(config_from_dict(cfg), hparams=hp)
        identity = run_identity(config, stored["records_fingerprint"])
        assert identity == stored and digest(identity) == data["key"], rdir
        assert run_dir(rdir.parent, config, stored["records_fingerprint"]) == rdir
        checked += 1
    toy_world, found = records_fingerprint(load_counterfact("toy-world")), 0
    for rdir in _committed_runs("consecutive/*"):
        data = json.loads((rdir / "config.json").read_text())
        cfg = data["config"]
        hp = hparams_from_dict(cfg["editor"], {k: v for k, v in cfg["hparams"].items() if k != "__type__"}, str(rdir))
        config = consecutive.ConsecutiveConfig(**{**cfg, "hparams": hp, "out_dir": str(rdir.parent.parent)})
        found += consecutive.locate(toy_world, config) == (rdir, data["key"])  # the consecutive runs are on toy-world
    assert checked > 0 and (found > 0 or not _committed_runs("consecutive/*"))


# ---------------------------------------------------------------- LEMoE's experts in the model's identity


def test_lemoe_experts_are_part_of_the_model_identity(tiny_tokenizer) -> None:
    model = new_model(tiny_tokenizer)
    plain_id, plain_digest = models.model_identity(model), models.weights_digest(model)
    assert "experts" not in plain_id
    hp = LEMoEHParams(layer=2, expert_dim=4)
    d = ModelAdapter(model).d_model
    state = EditorState({"lemoe/expert0/w1": torch.ones(4, d), "lemoe/expert0/w2": torch.zeros(d, 4),
                         "lemoe/expert0/key": torch.ones(d)})
    ExpertBypass.attach(model, state, hp)
    one = models.model_identity(model)
    assert one != plain_id and "-experts-" in one and models.weights_digest(model) != plain_digest
    state.tensors = {**state.tensors, "lemoe/expert0/w2": torch.full((d, 4), 0.5)}
    two = models.model_identity(model)
    assert two != one and two.split("-experts-")[0] == one.split("-experts-")[0]
    ExpertBypass.detach(model)
    assert models.model_identity(model) == plain_id and models.weights_digest(model) == plain_digest


# ---------------------------------------------------------------- the lock file in a page's provenance


def test_book_versions_name_the_lock_file() -> None:
    lock = REPO_ROOT / "requirements.lock"
    assert book.versions()["requirements.lock"] == f"sha256 {hashlib.sha256(lock.read_bytes()).hexdigest()[:12]}"
