"""Lifelong editing protocol of Appendix F (Hu et al. 2024), as run by the authors' released code.

Protocol (`docs/design.md`, `hparams_reported.md` "Lifelong protocol of the released evaluation"):

1. Keep the CounterFact records the unedited model knows (greedy exact match of target_true),
   the first 2n of them; shuffle with `random.Random(seed)`; P = first n (edited), Q = next n.
2. Step i: edit record i of P (target_true -> target_new) on the current model f*_{i-1}, giving
   f_i; on f_i measure ES (rewrite prompt -> target_new, Eq. 12), PS (fraction of paraphrase
   prompts -> target_new, Eq. 13) and NS (fraction of neighbourhood prompts -> target_true,
   Eq. 14). Roll back with the same editor (`editing.rollback`: targets swapped, same layers),
   giving f*_i, which carries on to step i + 1.
3. At checkpoints (powers of two, multiples of 50, the last step) measure on f*_i ERS (records
   1..i of P answer target_true again, Eq. 15) and ORS (all of Q answer target_true, Eq. 16).
   ES, PS, NS at checkpoint i are averages over steps 1..i; S = harmonic mean of the five.

On disk, under `run_dir(base, config, records)`:

* `config.json`     the configuration, its identity and its hash key (written at the start);
* `steps.jsonl`     one JSON object per step (see `_step_row`);
* `checkpoints.jsonl` one JSON object per checkpoint (see `_checkpoint_row`);
* `state.safetensors` the current values of every parameter touched so far, with the step in the
  metadata, replaced atomically after every `save_every` steps: resuming loads the original model,
  overwrites those parameters and continues, bit-identical to an uninterrupted run;
* `result.json`     the final metrics; a run with this file is read back, never recomputed.

Known-record filtering is cached under `<base>/known/`.
"""

from __future__ import annotations

import dataclasses
import gc
import hashlib
import json
import logging
import math
import os
import random
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from tqdm.auto import tqdm

from wilke_lib.metrics import score_S

log = logging.getLogger(__name__)

STEPS_FILE = "steps.jsonl"
CHECKPOINTS_FILE = "checkpoints.jsonl"
CONFIG_FILE = "config.json"
RESULT_FILE = "result.json"
STATE_FILE = "state.safetensors"
FORMAT_VERSION = 1


# --------------------------------------------------------------------------- configuration
@dataclass(frozen=True)
class CheckpointPolicy:
    """When ERS / ORS are measured: powers of two, multiples of `multiple_of`, the last step."""

    powers_of_two: bool = True
    multiple_of: int | None = 50
    include_last: bool = True
    extra: tuple[int, ...] = ()

    def is_checkpoint(self, step: int, n_edits: int) -> bool:
        """Whether ERS / ORS are measured after step `step` (1-based) of `n_edits`."""
        if step < 1 or step > n_edits:
            return False
        return ((self.powers_of_two and step & (step - 1) == 0)
                or (self.multiple_of is not None and step % self.multiple_of == 0)
                or (self.include_last and step == n_edits)
                or step in self.extra)


def checkpoint_steps(n_edits: int, policy: CheckpointPolicy | None = None) -> list[int]:
    """All checkpoint steps (1-based, increasing) of a run of `n_edits` edits."""
    policy = policy or CheckpointPolicy()
    return [s for s in range(1, n_edits + 1) if policy.is_checkpoint(s, n_edits)]


@dataclass
class LifelongConfig:
    """One lifelong run. The run's identity (hence its directory) is everything except
    `records_source`, `out_dir`, `eval_batch_size` and `save_every`, plus a fingerprint of the
    records actually passed.

    hparams: an editor hyper-parameter dataclass; None -> `load_hparams(editor, model_name)`;
    a string -> `load_hparams(editor, that string)` (e.g. another model's file).
    filter_known: False when the caller already passes known records only.
    model_fingerprint: optional extra model identity (e.g. a checksum of the weights).
    """

    model_name: str
    editor: str
    hparams: Any = None
    records_source: str = "counterfact"
    n_edits: int = 32
    seed: int = 9
    checkpoints: CheckpointPolicy = field(default_factory=CheckpointPolicy)
    out_dir: str = "runs/lifelong"
    eval_batch_size: int = 64
    save_every: int = 1
    filter_known: bool = True
    model_fingerprint: str = ""


@dataclass
class Backend:
    """The functions the runner calls; `default_backend()` wires the library's own.

    edit(model, tok, request, hparams[, cache=]) -> EditResult;
    rollback(model, tok, request, hparams, previous[, cache=]) -> EditResult;
    matches(model, tok, prompts, targets, batch_size=) -> list[bool] (greedy exact match);
    known(model, tok, records, batch_size=) -> the known records;
    prepare(model, tok, hparams, cache) -> cache: called once on the ORIGINAL model (before a
    resumed run's state is restored) so that everything an editor derives from the unedited model
    is derived from it whether or not the run was interrupted.
    """

    edit: Callable[..., Any]
    rollback: Callable[..., Any]
    matches: Callable[..., list[bool]]
    known: Callable[..., list[dict]]
    edit_error: type[BaseException] | tuple[type[BaseException], ...] = ValueError
    prepare: Callable[[nn.Module, Any, Any, Any], Any] = lambda model, tok, hparams, cache: cache


def _stat_layers(hparams: Any, n_layers: int) -> list[int]:
    """Layers whose second moment C an editor will ask for (WilKE: every candidate layer)."""
    if not hasattr(hparams, "mom2_corpus"):
        return []
    if hasattr(hparams, "candidate_layers"):
        return list(hparams.candidate_layers or range(n_layers))
    if getattr(hparams, "layers", None):
        return list(hparams.layers)
    return [hparams.layer] if getattr(hparams, "layer", None) is not None else []


def prepare_edit_cache(model: nn.Module, tok: Any, hparams: Any, cache: Any = None) -> Any:
    """An `editing.EditCache` of the original model with its context prefixes (ROME Eq. 4) and
    second moments C of the editor's layers already computed from the unedited weights."""
    from wilke_lib.arch import ModelAdapter
    from wilke_lib.editing import EditCache

    cache = cache if cache is not None else EditCache.for_model(model)
    if hasattr(hparams, "context_lengths"):
        cache.get_prefixes(model, tok, hparams)
    layers = _stat_layers(hparams, ModelAdapter(model).n_layers)
    if layers:
        cache.get_mom2(model, tok, layers, hparams)
    return cache


def default_backend() -> Backend:
    """Backend of the real editors (`wilke_lib.editing`) and evaluator (`wilke_lib.generation`)."""
    from wilke_lib import counterfact, editing, generation

    return Backend(edit=editing.edit, rollback=editing.rollback, matches=generation.greedy_matches,
                   known=counterfact.known_records, edit_error=editing.EditError, prepare=prepare_edit_cache)


@dataclass
class RunResult:
    """A finished (or loaded) run: per-step and per-checkpoint tables and the final metrics
    (fractions: ES, PS, NS, ERS, ORS, S at the last checkpoint; empty if unfinished)."""

    config: LifelongConfig
    steps: pd.DataFrame
    checkpoints: pd.DataFrame
    final: dict[str, float]
    run_dir: Path


# --------------------------------------------------------------------------- identity
def _json_safe(obj: Any) -> Any:
    """A JSON round-trip of `obj` (dataclasses as dicts, unknown objects as str)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        obj = dataclasses.asdict(obj)
    return json.loads(json.dumps(obj, default=str, sort_keys=True))


def resolve_hparams(config: LifelongConfig) -> Any:
    """The hyper-parameter object handed to the editor (see `LifelongConfig.hparams`)."""
    if config.hparams is None or isinstance(config.hparams, str):
        from wilke_lib.hparams import load_hparams

        return load_hparams(config.editor, config.hparams or config.model_name)
    return config.hparams


def records_fingerprint(records: Sequence[dict]) -> str:
    """sha256 of the records' canonical JSON (order matters)."""
    h = hashlib.sha256()
    for rec in records:
        h.update(json.dumps(rec, sort_keys=True, default=str).encode())
        h.update(b"\n")
    return h.hexdigest()


def run_identity(config: LifelongConfig, records: Sequence[dict] | str,
                 hparams: Any = None) -> dict[str, Any]:
    """What makes two runs the same run (the dict hashed into the run directory's name).

    `records` is the record list or its `records_fingerprint`."""
    hp = resolve_hparams(config) if hparams is None else hparams
    fp = records if isinstance(records, str) else records_fingerprint(records)
    return {"model_name": config.model_name, "model_fingerprint": config.model_fingerprint,
            "editor": config.editor, "hparams_class": type(hp).__name__, "hparams": _json_safe(hp),
            "seed": config.seed, "n_edits": config.n_edits, "records_fingerprint": fp,
            "filter_known": config.filter_known, "checkpoints": _json_safe(config.checkpoints),
            "format_version": FORMAT_VERSION}


def _hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-") or "x"


def run_dir(base: str | Path, config: LifelongConfig, records: Sequence[dict] | str,
            hparams: Any = None) -> Path:
    """Directory of the run: `<base>/<model>__<editor>__n<n>__seed<seed>__<hash of identity>`."""
    key = _hash(run_identity(config, records, hparams))
    name = f"{_slug(config.model_name)}__{_slug(config.editor)}__n{config.n_edits}__seed{config.seed}__{key[:12]}"
    return Path(base) / name


def _config_to_dict(config: LifelongConfig, hparams: Any) -> dict[str, Any]:
    out = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}
    out["hparams"] = _json_safe(hparams)
    out["checkpoints"] = dataclasses.asdict(config.checkpoints)
    return _json_safe(out)


def _config_from_dict(d: dict[str, Any]) -> LifelongConfig:
    d = dict(d)
    ck = dict(d.get("checkpoints") or {})
    ck["extra"] = tuple(ck.get("extra", ()))
    d["checkpoints"] = CheckpointPolicy(**ck)
    names = {f.name for f in dataclasses.fields(LifelongConfig)}
    return LifelongConfig(**{k: v for k, v in d.items() if k in names})


# --------------------------------------------------------------------------- small file helpers
def _write_json_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, sort_keys=True), encoding="utf-8")
    os.replace(tmp, path)


def _append_jsonl(path: Path, row: dict[str, Any]) -> None:
    with path.open("a", encoding="utf-8") as fh:
        fh.write(json.dumps(row, sort_keys=True) + "\n")
        fh.flush()
        os.fsync(fh.fileno())


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Rows of a JSON-lines file; a truncated last line (killed mid-write) is dropped."""
    if not path.exists():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            log.warning("dropping unreadable line in %s", path)
    return rows


def _truncate_jsonl(path: Path, last_step: int) -> list[dict[str, Any]]:
    """Keep the rows with step <= last_step (rewritten atomically); return them."""
    rows = [r for r in _read_jsonl(path) if r.get("step", 0) <= last_step]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in rows), encoding="utf-8")
    os.replace(tmp, path)
    return rows


# --------------------------------------------------------------------------- records
def split_records(known: Sequence[dict], n_edits: int, seed: int) -> tuple[list[dict], list[dict]]:
    """P (edited) and Q (retention set): all known records shuffled with `random.Random(seed)`,
    the first n edited and the next n kept for retention (App. F.2). Shuffling all of them, not
    only the first 2n, matters when n is small and the file is ordered (CounterFact and the
    synthetic world list records relation by relation). Raises ValueError if fewer than 2n are
    known."""
    if n_edits < 1:
        raise ValueError(f"n_edits must be >= 1, got {n_edits}")
    if len(known) < 2 * n_edits:
        raise ValueError(f"the lifelong protocol needs 2 * n_edits = {2 * n_edits} known records "
                         f"(n_edits={n_edits} edited + {n_edits} for retention), but only {len(known)} "
                         f"known records are available; lower n_edits to at most {len(known) // 2}")
    pool = list(known)
    random.Random(seed).shuffle(pool)
    return pool[:n_edits], pool[n_edits:2 * n_edits]


def _known_cached(model: nn.Module, tok: Any, records: Sequence[dict], config: LifelongConfig,
                  backend: Backend, records_fp: str) -> list[dict]:
    """`backend.known(...)` on the unedited model, cached as record indices under `<base>/known/`."""
    if not config.filter_known:
        return list(records)
    key = _hash({"model": config.model_name, "fp": config.model_fingerprint, "records": records_fp})
    path = Path(config.out_dir) / "known" / f"{_slug(config.model_name)}__{key[:12]}.json"
    if path.exists():
        indices = json.loads(path.read_text(encoding="utf-8"))["indices"]
        return [records[i] for i in indices]
    log.info("filtering %d records for facts %s knows", len(records), config.model_name)
    known = backend.known(model, tok, list(records), batch_size=config.eval_batch_size)
    indices = _indices_of(records, known)
    path.parent.mkdir(parents=True, exist_ok=True)
    _write_json_atomic(path, {"model_name": config.model_name, "records_fingerprint": records_fp,
                              "n_records": len(records), "indices": indices})
    return [records[i] for i in indices]


def _indices_of(records: Sequence[dict], subset: Sequence[dict]) -> list[int]:
    """Positions in `records` of the records in `subset` (by identity, else by case_id)."""
    by_id = {id(rec): i for i, rec in enumerate(records)}
    by_case = {rec.get("case_id"): i for i, rec in enumerate(records)}
    return [by_id[id(rec)] if id(rec) in by_id else by_case[rec.get("case_id")] for rec in subset]


def _prompt(rec: dict) -> str:
    rw = rec["requested_rewrite"]
    return rw["prompt"].format(rw["subject"])


def _target(rec: dict, which: str) -> str:
    return rec["requested_rewrite"][which]["str"]


# --------------------------------------------------------------------------- evaluation
def _matches(backend: Backend, model: nn.Module, tok: Any, prompts: list[str], targets: list[str],
             batch_size: int) -> list[bool]:
    if not prompts:
        return []
    return [bool(m) for m in backend.matches(model, tok, prompts, targets, batch_size=batch_size)]


def _fraction(flags: Sequence[bool]) -> float:
    return float(np.mean(flags)) if len(flags) else math.nan


def evaluate_edit(backend: Backend, model: nn.Module, tok: Any, rec: dict, batch_size: int,
                  edited: bool = True) -> dict[str, float]:
    """ES (Eq. 12), PS (Eq. 13, fraction of paraphrases) and NS (Eq. 14, fraction of neighbourhood
    prompts keeping target_true) of one record on the current model, in one matcher call.
    With `edited=False` (failed edit) ES = PS = 0 and only NS is measured."""
    new, true = _target(rec, "target_new"), _target(rec, "target_true")
    para = list(rec.get("paraphrase_prompts", [])) if edited else []
    neigh = list(rec.get("neighborhood_prompts", []))
    rewrite = [_prompt(rec)] if edited else []
    prompts = rewrite + para + neigh
    targets = [new] * (len(rewrite) + len(para)) + [true] * len(neigh)
    flags = _matches(backend, model, tok, prompts, targets, batch_size)
    k = len(rewrite)
    return {"ES": _fraction(flags[:k]) if edited else 0.0,
            "PS": _fraction(flags[k:k + len(para)]) if edited else 0.0,
            "NS": _fraction(flags[k + len(para):])}


def retention(backend: Backend, model: nn.Module, tok: Any, recs: Sequence[dict],
              batch_size: int) -> list[bool]:
    """Whether each record's rewrite prompt answers its target_true (Eq. 15-16)."""
    return _matches(backend, model, tok, [_prompt(r) for r in recs],
                    [_target(r, "target_true") for r in recs], batch_size)


# --------------------------------------------------------------------------- model state
def _param_name(params: dict[str, nn.Parameter], name: str) -> str:
    """The parameter a weight delta refers to: `name` itself or `name + '.weight'`."""
    for candidate in (name, f"{name}.weight"):
        if candidate in params:
            return candidate
    raise KeyError(f"weight delta for {name!r}: no such parameter or module weight in the model")


def _norms(deltas: dict[str, torch.Tensor] | None) -> dict[str, float]:
    return {k: float(torch.linalg.norm(v.detach().float())) for k, v in (deltas or {}).items()}


def _save_state(path: Path, params: dict[str, nn.Parameter], touched: set[str], step: int,
                key: str) -> None:
    """Current values of the touched parameters + step, written atomically."""
    tensors = {n: params[n].detach().to("cpu", copy=True).contiguous() for n in sorted(touched)}
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata={"step": str(step), "key": key})
    os.replace(tmp, path)


def _restore_state(path: Path, params: dict[str, nn.Parameter], key: str) -> tuple[int, set[str]]:
    """Overwrite the touched parameters of the (original) model; return (step, touched)."""
    if not path.exists():
        return 0, set()
    with safe_open(str(path), framework="pt") as fh:
        meta = fh.metadata() or {}
        if meta.get("key") != key:
            raise RuntimeError(f"{path} belongs to another run (key {meta.get('key')!r} != {key!r})")
        touched = set(fh.keys())
        with torch.no_grad():
            for name in touched:
                p = params[name]
                p.copy_(fh.get_tensor(name).to(device=p.device, dtype=p.dtype))
    return int(meta["step"]), touched


# --------------------------------------------------------------------------- one step
@dataclass
class _RunState:
    """Mutable state of a run in progress."""

    model: nn.Module
    tok: Any
    config: LifelongConfig
    hparams: Any
    backend: Backend
    cache: Any
    params: dict[str, nn.Parameter]
    P: list[dict]
    Q: list[dict]
    key: str
    dir: Path
    touched: set[str] = field(default_factory=set)
    steps: list[dict] = field(default_factory=list)
    checkpoints: list[dict] = field(default_factory=list)


def _call_editor(fn: Callable[..., Any], cache: Any, *args: Any) -> tuple[Any, float]:
    kwargs = {"cache": cache} if cache is not None else {}
    t0 = time.perf_counter()
    result = fn(*args, **kwargs)
    return result, time.perf_counter() - t0


def _touch(st: _RunState, result: Any) -> list[str]:
    names = [_param_name(st.params, n) for n in (getattr(result, "weight_deltas", None) or {})]
    st.touched.update(names)
    return names


def _step_row(st: _RunState, step: int) -> dict[str, Any]:
    """Edit record `step` of P, measure ES/PS/NS, roll back; the row written to steps.jsonl."""
    rec = st.P[step - 1]
    request = rec["requested_rewrite"]
    row: dict[str, Any] = {"step": step, "case_id": rec.get("case_id"), "failed": False,
                           "error": None, "rollback_error": None}
    torch.manual_seed(st.config.seed * 1_000_003 + step)  # editors that draw random numbers
    t0 = time.perf_counter()
    try:
        res, row["edit_seconds"] = _call_editor(st.backend.edit, st.cache, st.model, st.tok,
                                                request, st.hparams)
    except st.backend.edit_error as err:  # weights unchanged by contract
        log.warning("step %d (case %s): edit failed: %s", step, row["case_id"], err)
        row.update(failed=True, error=f"{type(err).__name__}: {err}", edit_layers=[], edit_delta_norms={},
                   edit_scores=None, rollback_layers=[], rollback_delta_norms={}, rollback_seconds=0.0,
                   weight_norms_after_rollback={}, edit_seconds=time.perf_counter() - t0)
        row.update(evaluate_edit(st.backend, st.model, st.tok, rec, st.config.eval_batch_size, edited=False))
        return row
    names = _touch(st, res)
    scores = getattr(res, "scores", None)
    row.update(edit_layers=list(getattr(res, "layers", [])), edit_delta_norms=_norms(res.weight_deltas),
               edit_scores={str(k): float(v) for k, v in scores.items()} if scores else None)
    row.update(evaluate_edit(st.backend, st.model, st.tok, rec, st.config.eval_batch_size))
    row.update(rollback_layers=[], rollback_delta_norms={}, rollback_seconds=None)
    try:
        back, row["rollback_seconds"] = _call_editor(st.backend.rollback, st.cache, st.model, st.tok,
                                                     request, st.hparams, res)
        names += _touch(st, back)
        row.update(rollback_layers=list(getattr(back, "layers", [])),
                   rollback_delta_norms=_norms(back.weight_deltas))
    except st.backend.edit_error as err:  # the edited model carries on
        log.warning("step %d (case %s): rollback failed: %s", step, row["case_id"], err)
        row["rollback_error"] = f"{type(err).__name__}: {err}"
    row["weight_norms_after_rollback"] = {
        n: float(torch.linalg.norm(st.params[n].detach().float())) for n in sorted(set(names))}
    return row


def _checkpoint_row(st: _RunState, step: int) -> dict[str, Any]:
    """ERS / ORS on the rolled-back model and the running ES / PS / NS averages (Eq. 12-16)."""
    bs = st.config.eval_batch_size
    edited = st.P[:step]
    ers_flags = retention(st.backend, st.model, st.tok, edited, bs)
    ors_flags = retention(st.backend, st.model, st.tok, st.Q, bs)
    rows = st.steps[:step]
    m = {k: float(np.nanmean([r[k] for r in rows])) for k in ("ES", "PS", "NS")}
    m["ERS"], m["ORS"] = _fraction(ers_flags), _fraction(ors_flags)
    m["S"] = score_S(m["ES"], m["PS"], m["NS"], m["ERS"], m["ORS"])
    return {"step": step, **m, "n_failed_edits": sum(bool(r["failed"]) for r in rows),
            "ers_lost_case_ids": [r.get("case_id") for r, ok in zip(edited, ers_flags) if not ok],
            "ors_lost_case_ids": [r.get("case_id") for r, ok in zip(st.Q, ors_flags) if not ok]}


# --------------------------------------------------------------------------- the runner
def _finished(rdir: Path, key: str) -> bool:
    path = rdir / RESULT_FILE
    return path.exists() and json.loads(path.read_text(encoding="utf-8")).get("key") == key


def _start_dir(rdir: Path, config: LifelongConfig, hparams: Any, identity: dict, key: str) -> None:
    """Create the run directory and write config.json (kept if it is already this run's)."""
    rdir.mkdir(parents=True, exist_ok=True)
    path = rdir / CONFIG_FILE
    if path.exists() and json.loads(path.read_text(encoding="utf-8")).get("key") == key:
        return
    for stale in (STEPS_FILE, CHECKPOINTS_FILE, STATE_FILE):
        (rdir / stale).unlink(missing_ok=True)
    _write_json_atomic(path, {"key": key, "identity": identity, "config": _config_to_dict(config, hparams),
                              "format_version": FORMAT_VERSION})


def _resume(st: _RunState) -> int:
    """Restore a killed run's weights and rows; return the last completed step (0 if new)."""
    step, st.touched = _restore_state(st.dir / STATE_FILE, st.params, st.key)
    st.steps = _truncate_jsonl(st.dir / STEPS_FILE, step)
    st.checkpoints = _truncate_jsonl(st.dir / CHECKPOINTS_FILE, step)
    if len(st.steps) != step:
        raise RuntimeError(f"{st.dir}: state is at step {step} but {STEPS_FILE} has {len(st.steps)} rows")
    if step:
        log.info("resuming %s after step %d", st.dir.name, step)
    return step


def _postfix(st: _RunState, t0: float, done: int) -> dict[str, str]:
    last_s = st.checkpoints[-1]["S"] if st.checkpoints else math.nan
    es = float(np.mean([r["ES"] for r in st.steps])) if st.steps else math.nan
    rate = done / max(time.perf_counter() - t0, 1e-9)
    return {"S": f"{100 * last_s:.1f}", "ES": f"{100 * es:.1f}", "edits/s": f"{rate:.2f}"}


def run_lifelong(model: nn.Module, tok: Any, records: Sequence[dict], config: LifelongConfig,
                 cache: Any = None, *, backend: Backend | None = None,
                 on_step: Callable[[int, dict], None] | None = None) -> RunResult:
    """Run (or resume, or read back) the lifelong protocol of Appendix F on the original `model`.

    `records`: CounterFact records (filtered for known facts unless `config.filter_known` is False).
    `cache`: passed to the editor as `cache=` (an `editing.EditCache` of the ORIGINAL model; the
    default backend makes one and fills it before any edit when None).
    `on_step(step, row)`: called after each step's rows are appended, before the state is saved
    (an exception there behaves like a kill at the worst moment; the run resumes from the last
    saved state). Edits that raise `backend.edit_error` are recorded as failed steps.
    """
    hparams = resolve_hparams(config)
    fp = records_fingerprint(records)
    identity = run_identity(config, fp, hparams)
    key = _hash(identity)
    rdir = run_dir(config.out_dir, config, fp, hparams)
    if _finished(rdir, key):
        log.info("lifelong run already finished, reading %s", rdir)
        return load_run(rdir)
    backend = backend or default_backend()
    P, Q = split_records(_known_cached(model, tok, records, config, backend, fp), config.n_edits, config.seed)
    _start_dir(rdir, config, hparams, identity, key)
    cache = backend.prepare(model, tok, hparams, cache)
    st = _RunState(model=model, tok=tok, config=config, hparams=hparams, backend=backend, cache=cache,
                   params=dict(model.named_parameters()), P=P, Q=Q, key=key, dir=rdir)
    start = _resume(st)
    _loop(st, start, on_step)
    final = {k: st.checkpoints[-1][k] for k in ("ES", "PS", "NS", "ERS", "ORS", "S")}
    final["n_failed_edits"] = st.checkpoints[-1]["n_failed_edits"]
    _write_json_atomic(rdir / RESULT_FILE, {"key": key, "final": final, "n_steps": len(st.steps)})
    return load_run(rdir)


def _loop(st: _RunState, start: int, on_step: Callable[[int, dict], None] | None) -> None:
    """Steps start+1..n: edit, measure, roll back, checkpoint, persist."""
    n, cfg = st.config.n_edits, st.config
    t0 = time.perf_counter()
    bar = tqdm(total=n, initial=start, desc=f"{cfg.editor} {cfg.model_name} seed {cfg.seed}", unit="edit")
    for step in range(start + 1, n + 1):
        row = _step_row(st, step)
        st.steps.append(row)
        _append_jsonl(st.dir / STEPS_FILE, row)
        if cfg.checkpoints.is_checkpoint(step, n):
            ck = _checkpoint_row(st, step)
            st.checkpoints.append(ck)
            _append_jsonl(st.dir / CHECKPOINTS_FILE, ck)
            log.info("step %d: S=%.3f ES=%.3f PS=%.3f NS=%.3f ERS=%.3f ORS=%.3f",
                     step, ck["S"], ck["ES"], ck["PS"], ck["NS"], ck["ERS"], ck["ORS"])
        if on_step is not None:
            on_step(step, row)
        if step % max(cfg.save_every, 1) == 0 or step == n:
            _save_state(st.dir / STATE_FILE, st.params, st.touched, step, st.key)
        bar.update(1)
        bar.set_postfix(_postfix(st, t0, step - start))
    bar.close()


def load_run(path: str | Path) -> RunResult:
    """Read a run directory (finished or not; `final` is empty for an unfinished run)."""
    rdir = Path(path)
    cfg = json.loads((rdir / CONFIG_FILE).read_text(encoding="utf-8"))
    result_path = rdir / RESULT_FILE
    final = json.loads(result_path.read_text(encoding="utf-8"))["final"] if result_path.exists() else {}
    return RunResult(config=_config_from_dict(cfg["config"]),
                     steps=pd.DataFrame(_read_jsonl(rdir / STEPS_FILE)),
                     checkpoints=pd.DataFrame(_read_jsonl(rdir / CHECKPOINTS_FILE)),
                     final=final, run_dir=rdir)


def run_many(model_loader: Callable[[str], tuple[nn.Module, Any]], records: Sequence[dict],
             configs: Sequence[LifelongConfig], *, backend: Backend | None = None,
             cache_factory: Callable[[nn.Module, Any], Any] | None = None) -> list[RunResult]:
    """Run the configs one after another, each on a fresh original model from
    `model_loader(config.model_name) -> (model, tok)`; finished runs are read back unloaded."""
    results = []
    fp = records_fingerprint(records)
    for config in configs:
        hparams = resolve_hparams(config)
        rdir = run_dir(config.out_dir, config, fp, hparams)
        if _finished(rdir, _hash(run_identity(config, fp, hparams))):
            results.append(load_run(rdir))
            continue
        model, tok = model_loader(config.model_name)
        cache = cache_factory(model, tok) if cache_factory is not None else None
        results.append(run_lifelong(model, tok, records, config, cache, backend=backend))
        del model, tok, cache
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return results
