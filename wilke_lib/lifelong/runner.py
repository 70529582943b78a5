"""The lifelong-editing protocol of Appendix F (Hu et al. 2024), as the authors' released code runs it.

1. Keep the CounterFact records the unedited model knows (greedy exact match of target_true); shuffle
   all of them with `random.Random(seed)`; P = the first n (edited), Q = the next n (retention).
2. Step i: edit record i of P (target_true -> target_new) on the current model f*_{i-1}, giving f_i;
   on f_i measure ES (rewrite prompt -> target_new, Eq. 12), PS (paraphrase prompts -> target_new,
   Eq. 13) and NS (neighbourhood prompts -> target_true, Eq. 14). Roll back with the same editor
   (`editing.rollback`: targets swapped, same layers), giving f*_i, which carries on to step i + 1;
   measure the rollback's success (rewrite and paraphrase prompts -> target_true, App. B) and the
   toxicity of the recorded layers (`toxicity.ToxicityMonitor`).
3. At checkpoints (powers of two, multiples of 50, the last step) measure on f*_i ERS (records
   1..i of P answer target_true again, Eq. 15) and ORS (all of Q answer target_true, Eq. 16).
   ES, PS, NS at checkpoint i are averages over steps 1..i; S = harmonic mean of the five.

The files of a run are described in `lifelong.store`; `run_lifelong` resumes a killed run and reads a
finished one back. The module is longer than 420 lines because the protocol, its resume and its guards
(the code a run was computed with, the weights it starts from) are read best in one place.
"""

from __future__ import annotations

import copy
import gc
import logging
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from wilke_lib import counterfact, editing, generation, registry
from wilke_lib.arch import ModelAdapter
from wilke_lib.editors.cache import EditCache
from wilke_lib.editors.common import EditorState
from wilke_lib.hparams import editor_of
from wilke_lib.lifelong import provenance, store
from wilke_lib.lifelong.config import (LifelongConfig, checkpoint_steps, records_fingerprint, resolve_hparams, run_dir,
                                       run_identity)
from wilke_lib.lifelong.monitor import ToxicityMonitor, is_snapshot_step
from wilke_lib.metrics import answers_true, evaluate_edit, fraction, score_S
from wilke_lib.models import canonical_model_name, check_weights_match, context_length, model_key
from wilke_lib.results import (CorruptFileError, append_jsonl, bounded_name, digest, read_json, runs_dir,
                               write_json_atomic)

log = logging.getLogger(__name__)


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
    stateful: bool = False  # edit / rollback take `state=` (an `EditorState`, saved and restored with the weights)


def predefined_layers(hparams: Any) -> list[int]:
    """The layer(s) an editor edits unless told otherwise, by its layer rule in the registry
    (`registry.EditorSpec.layers`): the setting `layer` (ROME, FT, LEMoE) or `layers` (MEMIT, KN, ...);
    [] for WilKE, which chooses per edit, and for KN's None (every layer). Settings of a class outside the
    registry (a custom backend's) by their `layers`, else their `layer`."""
    try:
        rule = registry.spec(editor_of(hparams)).layers
    except TypeError:
        rule = None
    if rule == "chosen":
        return []
    layers = getattr(hparams, "layers", None) if rule in (None, "layers") else None
    if layers:
        return [int(l) for l in layers]
    layer = getattr(hparams, "layer", None) if rule in (None, "layer") else None
    return [int(layer)] if isinstance(layer, int) else []


def stat_layers(hparams: Any, n_layers: int) -> list[int]:
    """Layers whose second moment C an editor will ask for (WilKE: every candidate layer)."""
    if not hasattr(hparams, "mom2_corpus"):
        return []
    if hasattr(hparams, "candidate_layers"):
        return list(hparams.candidate_layers or range(n_layers))
    return predefined_layers(hparams)


def prepare_edit_cache(model: nn.Module, tok: Any, hparams: Any, cache: EditCache | None = None) -> EditCache:
    """An `EditCache` of the original model with its context prefixes (ROME Eq. 4) and the second
    moments C of the editor's layers already computed from the unedited weights."""
    cache = cache if cache is not None else EditCache.for_model(model)
    return cache.prepare(model, tok, hparams, stat_layers(hparams, ModelAdapter(model).n_layers))


def default_backend() -> Backend:
    """Backend of the real editors (`wilke_lib.editing`) and evaluator (`wilke_lib.generation`)."""
    return Backend(edit=editing.edit, rollback=editing.rollback, matches=generation.greedy_matches,
                   known=counterfact.known_records, edit_error=editing.EditError, prepare=prepare_edit_cache,
                   stateful=True)


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


def _cached_known(path: Path, records: Sequence[dict], records_fp: str) -> list[dict] | None:
    """The known records a cache file lists, or None (filter again) when it is missing, unreadable, lists no
    record at all, or was written for other records. An empty list is not believed: a file emptied or cut
    short would otherwise make every run of the model say "only 0 known records" (a model that truly knows
    nothing is filtered again, which costs one pass and gives the same answer)."""
    if not path.exists():
        return None
    try:
        data = read_json(path, rebuild="filtering again")
    except CorruptFileError as err:
        log.warning("%s", err)
        return None
    problem = _known_problem(data, records, records_fp)
    if problem:
        log.warning("%s %s: filtering again", path, problem)
        return None
    return [records[i] for i in data["indices"]]


def _known_problem(data: Any, records: Sequence[dict], records_fp: str) -> str:
    """Why a known-records cache's content cannot be used ("" when it can)."""
    indices = data.get("indices") if isinstance(data, dict) else None
    if not isinstance(indices, list) or not all(isinstance(i, int) and 0 <= i < len(records) for i in indices):
        return "does not list known records"
    if not indices:
        return "lists no known record (an empty cache is not trusted)"
    if data.get("n_records", len(records)) != len(records) or data.get("records_fingerprint", records_fp) != records_fp:
        return "was written for other records"
    return ""


def known_cached(model: nn.Module, tok: Any, records: Sequence[dict], config: LifelongConfig, backend: Backend,
                 records_fp: str) -> list[dict]:
    """`backend.known(...)` on the unedited model, cached as record indices under `<out_dir>/known/`."""
    if not config.filter_known:
        return list(records)
    name = canonical_model_name(config.model_name)  # an organism by its path shares its name's cache
    key = digest({"model": name, "model_key": model_key(name), "records": records_fp})
    path = Path(config.out_dir) / "known" / f"{bounded_name(Path(name).name)}__{key[:12]}.json"
    cached = _cached_known(path, records, records_fp)
    if cached is not None:
        return cached
    log.info("filtering %d records for facts %s knows", len(records), config.model_name)
    known = {id(r) for r in backend.known(model, tok, list(records), batch_size=config.eval_batch_size)}
    indices = [i for i, rec in enumerate(records) if id(rec) in known]
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, {"model_name": config.model_name, "records_fingerprint": records_fp,
                             "n_records": len(records), "indices": indices})
    return [records[i] for i in indices]


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
    monitor: ToxicityMonitor
    editor_state: EditorState = field(default_factory=EditorState)
    touched: set[str] = field(default_factory=set)
    steps: list[dict] = field(default_factory=list)
    checkpoints: list[dict] = field(default_factory=list)
    snapshots: dict[str, torch.Tensor] = field(default_factory=dict)


def _call_editor(st: _RunState, fn: Callable[..., Any], *args: Any) -> tuple[Any, float]:
    kwargs: dict[str, Any] = {"cache": st.cache} if st.cache is not None else {}
    if st.backend.stateful:
        kwargs["state"] = st.editor_state
    t0 = time.perf_counter()
    result = fn(*args, **kwargs)
    return result, time.perf_counter() - t0


def param_name(params: dict[str, nn.Parameter], name: str) -> str:
    """The parameter a weight delta refers to: `name` itself or `name + '.weight'`."""
    for candidate in (name, f"{name}.weight"):
        if candidate in params:
            return candidate
    raise KeyError(f"weight delta for {name!r}: no such parameter or module weight in the model")


def _norms(deltas: dict[str, torch.Tensor] | None) -> dict[str, float]:
    return {k: float(torch.linalg.norm(v.detach().float())) for k, v in (deltas or {}).items()}


def _touch(st: _RunState, result: Any) -> list[str]:
    names = [param_name(st.params, n) for n in (getattr(result, "weight_deltas", None) or {})]
    st.touched.update(names)
    return names


def runner_fallbacks(info: Any, depth: int = 0) -> list[str]:
    """The reasons an edit's delta optimisation left the runner it was asked for (`delta.optimize_deltas`
    records them as info["delta_runner_fallback"], in nested per-request or per-layer infos too)."""
    if depth > 4:
        return []
    if isinstance(info, dict):
        found = [info["delta_runner_fallback"]] if "delta_runner_fallback" in info else []
        return found + [r for k, v in info.items() if k != "delta_runner_fallback" for r in runner_fallbacks(v, depth + 1)]
    if isinstance(info, (list, tuple)):
        return [r for v in info for r in runner_fallbacks(v, depth + 1)]
    return []


def step_row(st: _RunState, step: int) -> dict[str, Any]:
    """Edit record `step` of P, measure ES/PS/NS, roll back, measure the rollback; the row written
    to steps.jsonl. An edit that raises `backend.edit_error` is a failed step (weights unchanged)."""
    rec = st.P[step - 1]
    request = rec["requested_rewrite"]
    bs = st.config.eval_batch_size
    row: dict[str, Any] = {"step": step, "case_id": rec.get("case_id"), "failed": False, "error": None,
                           "rollback_error": None, "edit_layers": [], "edit_delta_norms": {}, "edit_scores": None,
                           "rollback_layers": [], "rollback_delta_norms": {}, "rollback_seconds": None}
    torch.manual_seed((st.config.seed * 1_000_003 + step) % 2**64)  # editors that draw random numbers (mod: torch's range)
    t0 = time.perf_counter()
    try:
        res, row["edit_seconds"] = _call_editor(st, st.backend.edit, st.model, st.tok, request, st.hparams)
    except st.backend.edit_error as err:  # weights unchanged by contract
        log.warning("step %d (case %s): edit failed: %s", step, row["case_id"], err)
        row.update(failed=True, error=f"{type(err).__name__}: {err}", rollback_seconds=0.0,
                   edit_seconds=time.perf_counter() - t0)
        row.update(evaluate_edit(st.backend, st.model, st.tok, rec, bs, edited=False))
        names = []
    else:
        names = _touch(st, res)
        fallbacks = sorted(set(runner_fallbacks(getattr(res, "info", None))))
        if fallbacks:  # a deliberate fallback of the delta runner is part of the run's record (absent otherwise)
            row["delta_runner_fallback"] = fallbacks
        scores = getattr(res, "scores", None)
        row.update(edit_layers=list(getattr(res, "layers", [])), edit_delta_norms=_norms(res.weight_deltas),
                   edit_scores={str(k): float(v) for k, v in scores.items()} if scores else None)
        row.update(evaluate_edit(st.backend, st.model, st.tok, rec, bs))
        try:
            back, row["rollback_seconds"] = _call_editor(st, st.backend.rollback, st.model, st.tok, request,
                                                         st.hparams, res)
            names += _touch(st, back)
            row.update(rollback_layers=list(getattr(back, "layers", [])),
                       rollback_delta_norms=_norms(back.weight_deltas))
        except st.backend.edit_error as err:  # the edited model carries on
            log.warning("step %d (case %s): rollback failed: %s", step, row["case_id"], err)
            row["rollback_error"] = f"{type(err).__name__}: {err}"
    row["rollback_success"] = fraction(answers_true(st.backend, st.model, st.tok, [rec], bs, with_paraphrases=True))
    row["weight_norms_after_rollback"] = {n: float(torch.linalg.norm(st.params[n].detach().float()))
                                          for n in sorted(set(names))}
    row.update(st.monitor.row())
    return row


def checkpoint_row(st: _RunState, step: int) -> dict[str, Any]:
    """ERS / ORS on the rolled-back model and the running ES / PS / NS averages (Eq. 12-16)."""
    bs = st.config.eval_batch_size
    edited = st.P[:step]
    ers_flags = answers_true(st.backend, st.model, st.tok, edited, bs)
    ors_flags = answers_true(st.backend, st.model, st.tok, st.Q, bs)
    rows = st.steps[:step]
    m = {k: float(np.nanmean([r[k] for r in rows])) for k in ("ES", "PS", "NS")}
    m["ERS"], m["ORS"] = fraction(ers_flags), fraction(ors_flags)
    finite = all(math.isfinite(v) for v in m.values())
    m["S"] = score_S(m["ES"], m["PS"], m["NS"], m["ERS"], m["ORS"]) if finite else math.nan
    return {"step": step, **m, "n_failed_edits": sum(bool(r["failed"]) for r in rows),
            "ers_lost_case_ids": [r.get("case_id") for r, ok in zip(edited, ers_flags) if not ok],
            "ors_lost_case_ids": [r.get("case_id") for r, ok in zip(st.Q, ors_flags) if not ok]}


# --------------------------------------------------------------------------- the runner
def _resume(st: _RunState) -> int:
    """Restore a killed run's weights and rows; return the last completed step (0 if new).

    The rows are cut back to the saved state's step (a step written twice keeps one row); when the
    state and the rows disagree (step or checkpoint rows or toxicity snapshots missing), the run starts
    again from the original model."""
    state_path = st.dir / store.STATE_FILE
    step, state = store.read_state(state_path, st.params, st.key)
    st.steps, st.checkpoints, st.snapshots, missing = store.read_rows(st.dir, step, st.config, st.monitor.layers)
    if missing:
        store.discard(state_path, f"at step {step} while {missing}")
        step, state = 0, {}
        st.steps, st.checkpoints, st.snapshots, _ = store.read_rows(st.dir, 0, st.config, st.monitor.layers)
    st.editor_state = EditorState(store.apply_state(st.params, state))
    st.touched = {n for n in state if not n.startswith(store.EDITOR_STATE_PREFIX)}
    if step:
        log.info("resuming %s after step %d", st.dir.name, step)
    return step


def _postfix(st: _RunState, t0: float, done: int) -> dict[str, str]:
    last_s = st.checkpoints[-1]["S"] if st.checkpoints else math.nan
    es = float(np.mean([r["ES"] for r in st.steps])) if st.steps else math.nan
    rate = done / max(time.perf_counter() - t0, 1e-9)
    return {"S": f"{100 * last_s:.1f}", "ES": f"{100 * es:.1f}", "edits/s": f"{rate:.2f}"}


def _finish(st: _RunState) -> dict[str, float]:
    """The final metrics, or RuntimeError when the run produced none worth storing."""
    failures = [r for r in st.steps if r["failed"]]
    if len(failures) == len(st.steps):
        raise RuntimeError(f"{st.dir}: every one of the {len(st.steps)} edits failed (first error: "
                           f"{failures[0]['error']}); the run is not stored as finished")
    last = st.checkpoints[-1]
    final = {k: last[k] for k in ("ES", "PS", "NS", "ERS", "ORS", "S")}
    if not all(isinstance(v, (int, float)) and math.isfinite(v) for v in final.values()):
        raise RuntimeError(f"{st.dir}: the final metrics are not finite ({final}); the run is not stored as "
                           "finished (records without paraphrase or neighbourhood prompts?)")
    final["n_failed_edits"] = last["n_failed_edits"]
    return final


def run_lifelong(model: nn.Module, tok: Any, records: Sequence[dict], config: LifelongConfig, cache: Any = None, *,
                 backend: Backend | None = None, on_step: Callable[[int, dict], None] | None = None,
                 allow_code_change: bool = False, copy_model: bool = True) -> store.RunResult:
    """Run (or resume, or read back) the lifelong protocol of Appendix F on the original `model`.

    `records`: CounterFact records (filtered for known facts unless `config.filter_known` is False).
    `cache`: passed to the editor as `cache=` (an `EditCache` of the ORIGINAL model; the default
    backend makes one and fills it before any edit when None).
    `on_step(step, row)`: called after each step's rows are appended, before the state is saved
    (an exception there behaves like a kill at the worst moment; the run resumes from the last
    saved state). Edits that raise `backend.edit_error` are recorded as failed steps.

    The caller's `model` is never edited: the run works on a deep copy (`copy_model=False` hands the model
    over, as `run_many` does with the fresh model it loaded). A model whose weights differ from the files of
    `config.model_name` (the model the run is stored under) is refused (`models.WeightsMismatchError`).
    An unfinished run computed with other code is refused (`provenance.CodeChangedError`) unless
    `allow_code_change`, which records the continuation in its config.json.
    """
    if isinstance(records, (str, bytes, Path)) or not all(isinstance(r, dict) for r in records):
        raise TypeError(f"run_lifelong: records must be a list of CounterFact records (dicts), got "
                        f"{type(records).__name__}; read a file with counterfact.load_counterfact")
    hparams = resolve_hparams(config)
    fp = records_fingerprint(records)
    identity = run_identity(config, fp, hparams)
    key, measured = digest(identity), checkpoint_steps(config.n_edits, config.checkpoints)
    rdir = run_dir(config.out_dir, config, fp, hparams)
    store.repair_config(rdir, config, hparams, identity, key)
    if store.finished(rdir, key, measured):
        log.info("lifelong run already finished, reading %s", rdir)
        return store.load_run(rdir)
    provenance.refuse_code_change(rdir, key, allow_code_change)  # before anything costly
    check_weights_match(model, config.model_name)
    model = copy.deepcopy(model) if copy_model else model
    backend = backend or default_backend()
    P, Q = split_records(known_cached(model, tok, records, config, backend, fp), config.n_edits, config.seed)
    place = {id(rec): i for i, rec in enumerate(records)}  # a record's number in the file, for the errors
    counterfact.check_for_model(P + Q, tok, context_length(model), config.records_source,
                                positions=[place[id(rec)] for rec in P + Q])
    layers = list(config.toxicity_layers) if config.toxicity_layers is not None else predefined_layers(hparams)
    n_layers = ModelAdapter(model).n_layers
    if any(not 0 <= l < n_layers for l in layers):
        raise ValueError(f"toxicity layers {layers} out of range for a {n_layers}-layer model "
                         "(LifelongConfig.toxicity_layers, or the editor's layers when it is None)")
    with store.writer_lock(rdir):
        if store.finished(rdir, key, measured):  # finished by another process while this one waited
            return store.load_run(rdir)
        store.start_dir(rdir, config, hparams, identity, key)
        cache = backend.prepare(model, tok, hparams, cache)
        st = _RunState(model=model, tok=tok, config=config, hparams=hparams, backend=backend, cache=cache,
                       params=dict(model.named_parameters()), P=P, Q=Q, key=key, dir=rdir,
                       monitor=ToxicityMonitor(model, layers))
        start = _resume(st)
        provenance.stamp(rdir, key, start, allow_code_change)
        _loop(st, start, on_step)
        final = _finish(st)
        store.archive_steps(rdir)
        (rdir / store.STATE_FILE).unlink(missing_ok=True)  # the weights are not needed once the run is finished
        write_json_atomic(rdir / store.RESULT_FILE, {"key": key, "final": final, "n_steps": len(st.steps)})
    return store.load_run(rdir, source="computed")


def _loop(st: _RunState, start: int, on_step: Callable[[int, dict], None] | None) -> None:
    """Steps start+1..n: edit, measure, roll back, checkpoint, persist."""
    n, cfg = st.config.n_edits, st.config
    t0 = time.perf_counter()
    bar = tqdm(total=n, initial=start, desc=f"{cfg.editor} {Path(cfg.model_name).name} seed {cfg.seed}", unit="edit")
    for step in range(start + 1, n + 1):
        row = step_row(st, step)
        st.steps.append(row)
        append_jsonl(st.dir / store.STEPS_FILE, row)
        if cfg.checkpoints.is_checkpoint(step, n):
            ck = checkpoint_row(st, step)
            st.checkpoints.append(ck)
            append_jsonl(st.dir / store.CHECKPOINTS_FILE, ck)
            log.info("step %d: S=%.3f ES=%.3f PS=%.3f NS=%.3f ERS=%.3f ORS=%.3f",
                     step, ck["S"], ck["ES"], ck["PS"], ck["NS"], ck["ERS"], ck["ORS"])
        if st.monitor.layers and is_snapshot_step(step):
            st.snapshots.update(st.monitor.snapshot(step))
            store.save_toxicity(st.dir / store.TOXICITY_FILE, st.snapshots)
        if on_step is not None:
            on_step(step, row)
        if step % max(cfg.save_every, 1) == 0 or step == n:
            store.save_state(st.dir / store.STATE_FILE, st.params, st.touched, step, st.key, st.editor_state.tensors)
        bar.update(1)
        bar.set_postfix(_postfix(st, t0, step - start))
    bar.close()


def run_many(model_loader: Callable[[str], tuple[nn.Module, Any]], records: Sequence[dict],
             configs: Sequence[LifelongConfig], *, backend: Backend | None = None,
             cache_factory: Callable[[nn.Module, Any], Any] | None = None,
             allow_code_change: bool = False) -> list[store.RunResult]:
    """Run the configs one after another, each on a fresh original model from
    `model_loader(config.model_name) -> (model, tok)` (handed to the run, not copied: the loader must
    return a new model each call, as `models.load_model` does); finished runs are read back unloaded.
    `allow_code_change`: see `run_lifelong`."""
    results = []
    fp = records_fingerprint(records)
    refuse_repeats(fp, configs)
    for config in configs:
        finished = store.read_back(fp, config)
        if finished is not None:
            results.append(finished)
            continue
        model, tok = model_loader(config.model_name)
        cache = cache_factory(model, tok) if cache_factory is not None else None
        results.append(run_lifelong(model, tok, records, config, cache, backend=backend,
                                    allow_code_change=allow_code_change, copy_model=False))
        del model, tok, cache
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return results


def refuse_repeats(records_fp: str, configs: Sequence[LifelongConfig]) -> None:
    """ValueError when two configs are the same run (a repeated seed or editor): the one run would be
    counted as two replicates, with a confidence interval of 0."""
    first: dict[str, int] = {}
    for i, config in enumerate(configs):
        key = store.locate(records_fp, config)[1]
        j = first.setdefault(key, i)
        if j != i:
            raise ValueError(f"run_many: configs #{j} and #{i} are the same run (editor {config.editor!r}, seed "
                             f"{config.seed}, model {config.model_name!r}, n_edits {config.n_edits}); a repeated "
                             "seed or editor would count one run as two replicates: drop the repeat")


def lifelong_dir(model_name: str) -> Path:
    """Where the book's lifelong runs of a model live: `runs/<model>/`, a tracked folder (finished runs
    are committed and read back; `WILKE_RUNS_DIR` replaces `<repo>/runs`)."""
    return runs_dir(model_name)
