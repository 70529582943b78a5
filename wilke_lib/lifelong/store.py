"""A lifelong run on disk: one directory per run, one writer at a time, resumable after a kill.

Under `config.run_dir(...)`:

* `config.json`       the configuration, its identity and its hash key (written at the start), and under
  "code" the code the rows were computed with (`provenance`: updated at every start and resume);
* `steps.jsonl`       one JSON object per step (`runner.step_row`); gzip-compressed to
  `steps.jsonl.gz` when the run finishes, so that finished runs are small enough to commit;
* `checkpoints.jsonl` one JSON object per checkpoint (`runner.checkpoint_row`);
* `state.safetensors` the current values of every parameter touched so far, with the step in the
  metadata, replaced atomically after every `save_every` steps: resuming loads the original model,
  overwrites those parameters and continues, bit-identical to an uninterrupted run. It holds only
  the touched layers (< 1 MB on the organisms) and is deleted when the run finishes, so an unfinished
  paper-scale run is committed with it and a later session (or machine) resumes where it stopped;
* `toxicity.safetensors` the block-averaged toxicity matrices W - W_0 of the recorded layers at
  powers of two (Fig. 3b-6b), "step<s>/layer<l>";
* `result.json`       the final metrics; a run with this file is read back, never recomputed. It is
  written only when the run produced numbers: a run in which every edit failed, or whose metrics are
  not finite, is left unfinished with the reason, never stored as a result.
* `.lock`             held (fcntl advisory lock) by the process writing the run.

What is read back is checked against the shape the runner writes (`schema`): a file that reads as JSON but lacks what the runner needs is named
with its line, moved aside as `<name>.corrupt` and the run goes on from its last good state, instead
of failing with a KeyError on every later call.
"""

from __future__ import annotations

import fcntl
import gzip
import json
import logging
import os
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import pandas as pd
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from wilke_lib import code_version
from wilke_lib.lifelong.config import (FORMAT_VERSION, LifelongConfig, checkpoint_steps, config_from_dict, config_to_dict,
                                       records_fingerprint, resolve_hparams, run_dir, run_identity)
from wilke_lib.lifelong.schema import CHECKPOINT_ROW, FINAL_METRICS, STEP_ROW, config_problem, final_problem, row_problem
from wilke_lib.lifelong.monitor import is_snapshot_step
from wilke_lib.results import (CorruptFileError, digest, read_json, read_jsonl, read_jsonl_numbered, write_json_atomic,
                               write_jsonl_atomic)

log = logging.getLogger(__name__)

STEPS_FILE = "steps.jsonl"
STEPS_ARCHIVE = "steps.jsonl.gz"
CHECKPOINTS_FILE = "checkpoints.jsonl"
CONFIG_FILE = "config.json"
RESULT_FILE = "result.json"
STATE_FILE = "state.safetensors"
TOXICITY_FILE = "toxicity.safetensors"
LOCK_FILE = ".lock"


class RunLockedError(RuntimeError):
    """Another process is writing the same run."""


def set_aside(path: Path, problem: str, then: str) -> None:
    """Move a file that reads but holds the wrong thing to `<name>.corrupt` (kept for inspection), with a
    warning naming it, what is wrong and what happens next."""
    corrupt = path.with_name(path.name + ".corrupt")
    os.replace(path, corrupt)
    log.warning("%s %s: moved to %s, %s", path, problem, corrupt.name, then)


@dataclass
class RunResult:
    """A finished (or loaded) run: per-step and per-checkpoint tables and the final metrics
    (fractions: ES, PS, NS, ERS, ORS, S at the last checkpoint; empty if unfinished); `source` says
    whether this process "computed" it or "read back" a finished run."""

    config: LifelongConfig
    steps: pd.DataFrame
    checkpoints: pd.DataFrame
    final: dict[str, float]
    run_dir: Path
    source: str = "read back"
    code: str | None = None

    @property
    def code_status(self) -> str:
        """"current", "differs" or "unknown" (`code_version.code_status`): whether the code fingerprint the run
        recorded (`code`) is the code running now; "unknown" for runs written before fingerprints existed."""
        return code_version.code_status(self.code)

    @property
    def stale(self) -> bool:
        """True when the run's numbers may not be what the current code computes (its code differs or is
        unknown); `lifelong.restamp` checks its first steps and records the current code when they agree."""
        return self.code_status != "current"


@contextmanager
def writer_lock(rdir: Path) -> Iterator[None]:
    """Hold the run's lock while writing it; RunLockedError naming the run if another process has it."""
    rdir.mkdir(parents=True, exist_ok=True)
    with (rdir / LOCK_FILE).open("a+") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RunLockedError(f"{rdir} is being written by another process; wait for it to finish "
                                 "(its results are then read back) or stop it") from None
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def finished(rdir: Path, key: str, checkpoints: list[int] | None = None, metrics: Sequence[str] = FINAL_METRICS,
             allow_nan: bool = False) -> bool:
    """Whether `rdir` holds this run (`key`) finished: its result.json with a `final` of `metrics`
    (`final_problem`; one without is moved aside as result.json.corrupt), and when `checkpoints` (the
    steps the run measures) is given, a row in checkpoints.jsonl for each; a warning and False otherwise."""
    path = rdir / RESULT_FILE
    if not path.exists():
        return False
    try:
        result = read_json(path, rebuild="the run will be recomputed")
    except CorruptFileError as err:
        set_aside(path, f"cannot be read ({err})", "the run is finished again from its last good state")
        return False
    if not isinstance(result, dict) or result.get("key") != key:
        return False
    problem = final_problem(result, metrics, allow_nan)
    if problem:
        set_aside(path, problem, "the run is finished again from its last good state")
        return False
    found = [row.get("step") if isinstance(row, dict) else None for row in read_jsonl(rdir / CHECKPOINTS_FILE)]
    if checkpoints is not None and found != list(checkpoints):
        log.warning("%s holds the checkpoints of steps %s instead of %s: the run will be recomputed",
                    rdir / CHECKPOINTS_FILE, found, list(checkpoints))
        return False
    return True


def _config_record(config: LifelongConfig, hparams: Any, identity: dict, key: str) -> dict[str, Any]:
    return {"key": key, "identity": identity, "config": config_to_dict(config, hparams), "format_version": FORMAT_VERSION}


def repair_config(rdir: Path, config: LifelongConfig, hparams: Any, identity: dict, key: str) -> None:
    """Rewrite this run's config.json when it carries the run's key but cannot be read back
    (`config_problem`, e.g. its "config" lost): the bad file is moved aside as config.json.corrupt and
    the rows, state and result, which carry the key themselves, are kept, and so is the record of the code
    that computed them ("code", `provenance`) when the bad file still holds it. Anything else is left alone."""
    path = rdir / CONFIG_FILE
    try:
        data = read_json(path) if path.is_file() else None
    except CorruptFileError:
        return  # unreadable: `start_dir` resets the folder, `load_run` names the file
    if not isinstance(data, dict) or data.get("key") != key or not config_problem(data):
        return
    set_aside(path, config_problem(data), "written again from the run's configuration")
    code = {"code": data["code"]} if isinstance(data.get("code"), dict) else {}
    write_json_atomic(path, _config_record(config, hparams, identity, key) | code)


def start_dir(rdir: Path, config: LifelongConfig, hparams: Any, identity: dict, key: str) -> None:
    """Write config.json (kept if it is already this run's; a run dir of another identity is reset)."""
    path = rdir / CONFIG_FILE
    repair_config(rdir, config, hparams, identity, key)
    if path.exists():
        try:
            if read_json(path, rebuild="starting the run again").get("key") == key:
                return
        except CorruptFileError as err:
            log.warning("%s", err)
    for stale in (STEPS_FILE, STEPS_ARCHIVE, CHECKPOINTS_FILE, STATE_FILE, TOXICITY_FILE, RESULT_FILE):
        (rdir / stale).unlink(missing_ok=True)
    write_json_atomic(path, _config_record(config, hparams, identity, key))


EDITOR_STATE_PREFIX = "editor_state/"


def save_state(path: Path, params: dict[str, nn.Parameter], touched: set[str], step: int, key: str,
               editor_state: dict[str, torch.Tensor] | None = None) -> None:
    """Current values of the touched parameters and of the editor's state (`EditorState`, names
    prefixed "editor_state/") + step, written atomically."""
    tensors = {n: params[n].detach().to("cpu", copy=True).contiguous() for n in sorted(touched)}
    tensors.update({EDITOR_STATE_PREFIX + n: t.detach().to("cpu").contiguous() for n, t in (editor_state or {}).items()})
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata={"step": str(step), "key": key})
    os.replace(tmp, path)


def read_state(path: Path, params: dict[str, nn.Parameter], key: str) -> tuple[int, dict[str, torch.Tensor]]:
    """(step, tensors) of a killed run's state file, checked against the run and the model.

    A state file of another run, or one that does not read or does not fit the model, is set aside
    (renamed `*.bad`) and (0, {}) returned: the run starts again from the original model."""
    if not path.exists():
        return 0, {}
    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
            if meta.get("key") != key:
                raise ValueError(f"belongs to another run (key {meta.get('key')!r})")
            state = {name: fh.get_tensor(name) for name in fh.keys()}
        step = int(meta["step"])
        for name, tensor in state.items():
            if not torch.isfinite(tensor).all():
                raise ValueError(f"{name!r} is not finite")
            if not name.startswith(EDITOR_STATE_PREFIX) and (name not in params or params[name].shape != tensor.shape):
                raise ValueError(f"parameter {name!r} is unknown or of another shape")
    except (SafetensorError, OSError, ValueError, KeyError) as err:
        discard(path, f"unusable ({err})")
        return 0, {}
    return step, state


def discard(path: Path, why: str) -> None:
    """Set a run file aside as `<name>.bad` (kept for inspection), saying why."""
    if path.exists():
        bad = path.with_name(path.name + ".bad")
        os.replace(path, bad)
        log.warning("%s is %s: moved to %s, the run starts again from step 0", path, why, bad.name)


def apply_state(params: dict[str, nn.Parameter], state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Copy the saved parameters into the model; return the editor's state (prefix removed)."""
    editor_state = {}
    with torch.no_grad():
        for name, tensor in state.items():
            if name.startswith(EDITOR_STATE_PREFIX):
                editor_state[name[len(EDITOR_STATE_PREFIX):]] = tensor
            else:
                params[name].copy_(tensor.to(device=params[name].device, dtype=params[name].dtype))
    return editor_state


def truncate_rows(path: Path, last_step: int, schema: dict[str, tuple[Any, str]] | None = None) -> list[dict[str, Any]]:
    """Keep the rows with step <= last_step, one per step (rewritten atomically); return them.

    With `schema` (`STEP_ROW`, `CHECKPOINT_ROW`), the first kept row that lacks what it asks for is named
    with its line, the file is moved aside as `<name>.corrupt` and the rows before that line are kept:
    the caller sees the steps missing and goes back to its last good state."""
    rows: dict[int, dict[str, Any]] = {}
    for number, row in read_jsonl_numbered(path):
        problem = row_problem(row, schema) if schema is not None else ""
        step = row.get("step", 0) if isinstance(row, dict) else None
        if problem and (not isinstance(step, int) or step <= last_step):
            set_aside(path, f"line {number} {problem}", f"the rows before it are kept (up to step {max(rows, default=0)})")
            break
        if isinstance(step, int) and step <= last_step:
            rows[step] = row  # a step written twice keeps its last row
    kept = [rows[s] for s in sorted(rows)]
    write_jsonl_atomic(path, kept)
    return kept


def read_rows(rdir: Path, step: int, config: LifelongConfig, snapshot_layers: list[int]
              ) -> tuple[list[dict[str, Any]], list[dict[str, Any]], dict[str, torch.Tensor], str]:
    """(step rows, checkpoint rows, toxicity snapshots) of a run up to `step` (those after it cut off),
    and what is missing among them ("" when nothing): a run resumed with a row or a snapshot missing
    would lose that point of its curves for good, so the caller starts it again instead."""
    steps = truncate_rows(rdir / STEPS_FILE, step, STEP_ROW)
    checkpoints = truncate_rows(rdir / CHECKPOINTS_FILE, step, CHECKPOINT_ROW)
    snapshots = load_toxicity(rdir / TOXICITY_FILE, step)
    lacks = []
    if [r.get("step") for r in steps] != list(range(1, step + 1)):
        lacks.append(f"{STEPS_FILE} holds only {len(steps)} of its steps")
    expected = [s for s in checkpoint_steps(config.n_edits, config.checkpoints) if s <= step]
    if [r.get("step") for r in checkpoints] != expected:
        lacks.append(f"{CHECKPOINTS_FILE} holds the checkpoints of steps {[r.get('step') for r in checkpoints]} "
                     f"instead of {expected}")
    names = {f"step{s}/layer{l}" for s in range(1, step + 1) if is_snapshot_step(s) for l in snapshot_layers}
    if names - set(snapshots):
        lacks.append(f"{TOXICITY_FILE} lacks the snapshots {sorted(names - set(snapshots))}")
    return steps, checkpoints, snapshots, "; ".join(lacks)


def save_toxicity(path: Path, snapshots: dict[str, torch.Tensor]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.contiguous() for k, v in snapshots.items()}, str(tmp))
    os.replace(tmp, path)


def load_toxicity(path: Path, last_step: int | None = None) -> dict[str, torch.Tensor]:
    """The saved toxicity snapshots ("step<s>/layer<l>"), those after `last_step` dropped."""
    if not path.exists():
        return {}
    try:
        with safe_open(str(path), framework="pt") as fh:
            out = {k: fh.get_tensor(k) for k in fh.keys()}
    except (SafetensorError, OSError) as err:
        log.warning("%s is unreadable (%s): its snapshots are recomputed where the run still passes them", path, err)
        return {}
    return {k: v for k, v in out.items() if last_step is None or int(k.split("/")[0][4:]) <= last_step}


def toxicity_snapshots(run: RunResult) -> dict[int, dict[int, torch.Tensor]]:
    """{step: {layer: block-averaged W - W_0}} of a run."""
    out: dict[int, dict[int, torch.Tensor]] = {}
    for name, value in load_toxicity(run.run_dir / TOXICITY_FILE).items():
        step, layer = name.split("/")
        out.setdefault(int(step[4:]), {})[int(layer[5:])] = value
    return dict(sorted(out.items()))


def archive_steps(rdir: Path) -> None:
    """Compress a finished run's steps.jsonl into steps.jsonl.gz (deterministic bytes: no file name or
    time in the gzip header) and remove the plain file."""
    plain_path = rdir / STEPS_FILE
    if not plain_path.exists():
        return
    tmp = rdir / (STEPS_ARCHIVE + ".tmp")
    with tmp.open("wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", filename="", mtime=0) as gz:
        gz.write(plain_path.read_bytes())
    os.replace(tmp, rdir / STEPS_ARCHIVE)
    plain_path.unlink()


def read_steps(rdir: Path) -> list[dict[str, Any]]:
    """The step rows of a run: steps.jsonl while it runs, steps.jsonl.gz once it is finished."""
    archive = rdir / STEPS_ARCHIVE
    if archive.exists() and not (rdir / STEPS_FILE).exists():
        try:
            text = gzip.decompress(archive.read_bytes()).decode("utf-8")
            return [json.loads(line) for line in text.splitlines() if line.strip()]
        except (OSError, EOFError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
            why = "a line is nested too deeply" if isinstance(err, RecursionError) else err
            raise CorruptFileError(f"{archive} is not readable ({why}); delete {rdir} to recompute the run") from err
    return read_jsonl(rdir / STEPS_FILE)


def load_run(path: str | Path, source: str = "read back") -> RunResult:
    """Read a run directory (finished or not; `final` is empty for an unfinished run)."""
    rdir = Path(path)
    if not (rdir / CONFIG_FILE).is_file():
        raise FileNotFoundError(f"{rdir} is not a lifelong run: it has no {CONFIG_FILE}")
    rebuild = f"delete {rdir} to recompute the run"
    cfg = read_json(rdir / CONFIG_FILE, rebuild)
    if config_problem(cfg):
        raise CorruptFileError(f"{rdir / CONFIG_FILE} {config_problem(cfg)}; {rebuild} (or run it: `run_lifelong` "
                               "writes it again)")
    return RunResult(config=config_from_dict(cfg["config"]), steps=pd.DataFrame(read_steps(rdir)),
                     checkpoints=pd.DataFrame(read_jsonl(rdir / CHECKPOINTS_FILE)), final=read_final(rdir), run_dir=rdir,
                     source=source, code=recorded_code(cfg))


def recorded_code(config_record: Any) -> str | None:
    """The code fingerprint a run's config.json records (its "code" entry), None when it has none (a run
    written before fingerprints existed, or a config.json written again by `repair_config`)."""
    code = config_record.get("code") if isinstance(config_record, dict) else None
    fingerprint = code.get("fingerprint") if isinstance(code, dict) else None
    return fingerprint if isinstance(fingerprint, str) and fingerprint else None


def read_final(rdir: Path, metrics: Sequence[str] = FINAL_METRICS, allow_nan: bool = False) -> dict[str, float]:
    """The `final` metrics of a run's result.json; {} (unfinished) when it has none. One that reads but is
    not a result (`final_problem`) is moved aside as result.json.corrupt, so that the run is finished
    again rather than read back with a wrong `final`; an unreadable one raises CorruptFileError."""
    path = rdir / RESULT_FILE
    if not path.exists():
        return {}
    result = read_json(path, f"delete {rdir} to recompute the run")
    problem = final_problem(result, metrics, allow_nan)
    if problem:
        set_aside(path, problem, "the run reads as unfinished and is finished again when it is run")
        return {}
    return result["final"]


def locate(records: Sequence[dict] | str, config: LifelongConfig) -> tuple[Path, str]:
    """(directory, key) of the run `config` on `records` (or their `records_fingerprint`)."""
    fp = records if isinstance(records, str) else records_fingerprint(records)
    hparams = resolve_hparams(config)
    return run_dir(config.out_dir, config, fp, hparams), digest(run_identity(config, fp, hparams))


def read_back(records: Sequence[dict] | str, config: LifelongConfig) -> RunResult | None:
    """The run `config` if it is finished on disk, else None; never loads a model or computes (a
    config.json of this run that lost what `load_run` needs is written again: `repair_config`)."""
    fp = records if isinstance(records, str) else records_fingerprint(records)
    hparams = resolve_hparams(config)
    identity = run_identity(config, fp, hparams)
    rdir, key = run_dir(config.out_dir, config, fp, hparams), digest(identity)
    repair_config(rdir, config, hparams, identity, key)
    if finished(rdir, key, checkpoint_steps(config.n_edits, config.checkpoints)):
        return load_run(rdir)
    return None


def read_progress(records: Sequence[dict] | str, config: LifelongConfig) -> RunResult | None:
    """The run `config` as far as it got: finished (`source` "read back"), unfinished with the steps
    and checkpoints written so far (`source` "unfinished at step <k>", `final` empty), or None when
    it has not started (or its folder belongs to other settings). Never computes."""
    done = read_back(records, config)
    if done is not None:
        return done
    rdir, key = locate(records, config)
    try:
        if read_json(rdir / CONFIG_FILE, rebuild="the run will start again").get("key") != key:
            return None
    except (FileNotFoundError, CorruptFileError):
        return None
    run = load_run(rdir, source="unfinished")
    run.source = f"unfinished at step {len(run.steps)}"
    return run
