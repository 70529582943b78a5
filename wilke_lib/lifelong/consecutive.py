"""Consecutive batch editing without rollback: the protocol the batch editors are made for (Li et al.
2024, COMEBA-HK, Sec. 4: consecutive batches of CounterFact edits; Fang et al. 2025, AlphaEdit:
sequential batches), run for every editor so that WilKE's and ROME's one-at-a-time updates can be
set beside MEMIT's, AlphaEdit's and COMEBA-HK's batch updates.

1. The known records shuffled with the seed, as in the lifelong protocol (`runner.split_records`):
   P = the first n (edited), Q = the next n (facts never edited).
2. P is cut into batches of `batch_size`. Batch j is written into the model as batches 1..j-1 left it
   (`editing.edit_batch`: at once for the batch editors, one request after another for the others;
   no rollback), then measured on its own records: efficacy (the rewrite prompt answers target_new),
   generalization (the share of paraphrases that do) and locality (the share of neighbourhood prompts
   that still answer target_true), each averaged over the records. A batch that raises EditError
   leaves the model as it was and is recorded as failed (its records count as not edited).
3. After each batch that brings the number of edits to a checkpoint (powers of two, multiples of 128,
   the end) the same three on every record edited so far (retention of the earlier batches) and the
   share of Q still answered with target_true ("kept").

A run lives in `runs/<model>/consecutive/<model>__<editor>__n<n>__b<batch>__seed<seed>__<hash>/`:
config.json, batches.jsonl, checkpoints.jsonl, result.json, and while unfinished state.safetensors
(the touched parameters and the editor's state, e.g. COMEBA-HK's hook layers, saved after every
batch) from which a killed run resumes with the same numbers. `python -m wilke_lib.lifelong.consecutive --profile default`
(`make consecutive-runs`) computes the matrix of a profile, resumably.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn
from tqdm.auto import tqdm

from wilke_lib import counterfact, editing, models
from wilke_lib.editors import BATCH_EDITORS
from wilke_lib.editors.common import EditorState
from wilke_lib.lifelong import provenance, store
from wilke_lib.lifelong.config import records_fingerprint, slug
from wilke_lib.hparams import hparams_from_dict, load_hparams
from wilke_lib.lifelong.runner import (Backend, param_name, default_backend, known_cached, lifelong_dir,
                                       split_records)
from wilke_lib.metrics import answers_true, fraction
from wilke_lib.models import canonical_model_name, model_key
from wilke_lib.profiles import get_profile
from wilke_lib.results import append_jsonl, digest, plain, read_jsonl, write_json_atomic
from wilke_lib.tokens import target_str

log = logging.getLogger(__name__)
FORMAT_VERSION = 1
BATCHES_FILE = "batches.jsonl"
MEASURES = ("efficacy", "generalization", "locality")
FINAL_METRICS = (*MEASURES, "kept")
"""The metrics of a consecutive run's `final` (result.json); NaN where a measure had no prompts."""


@dataclass
class ConsecutiveConfig:
    """One consecutive-batch run; its identity is everything but `out_dir` and `eval_batch_size`, plus
    the model's key and the records' fingerprint. hparams None: the editor's file for the model."""

    model_name: str
    editor: str
    n_edits: int
    batch_size: int
    seed: int = 9
    hparams: Any = None
    out_dir: str = ""
    eval_batch_size: int = 64
    filter_known: bool = True

    def __post_init__(self) -> None:
        for name in ("n_edits", "batch_size", "seed", "eval_batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or (name != "seed" and value < 1):
                raise ValueError(f"ConsecutiveConfig.{name} must be a positive int, got {value!r}")
        if self.hparams is None:
            self.hparams = load_hparams(self.editor, self.model_name)
        self.out_dir = self.out_dir or str(lifelong_dir(self.model_name))

    def checkpoints(self) -> list[int]:
        """Numbers of edits after which retention is measured: powers of two, multiples of 128, n."""
        return [e for e in range(1, self.n_edits + 1) if e & (e - 1) == 0 or e % 128 == 0 or e == self.n_edits]

    def batch_ends(self) -> list[int]:
        return [min(self.n_edits, j * self.batch_size) for j in range(1, math.ceil(self.n_edits / self.batch_size) + 1)]


def identity(config: ConsecutiveConfig, records_fp: str) -> dict[str, Any]:
    name = canonical_model_name(config.model_name)
    return {"protocol": "consecutive", "model_name": name, "model_key": model_key(name),
            "editor": config.editor, "hparams_class": type(config.hparams).__name__, "hparams": plain(config.hparams),
            "n_edits": config.n_edits, "batch_size": config.batch_size, "seed": config.seed,
            "filter_known": config.filter_known, "records_fingerprint": records_fp, "format_version": FORMAT_VERSION}


def locate(records: Sequence[dict] | str, config: ConsecutiveConfig) -> tuple[Path, str]:
    """(directory, key) of the run `config` on `records` (or their fingerprint)."""
    fp = records if isinstance(records, str) else records_fingerprint(records)
    key = digest(identity(config, fp))
    name = (f"{slug(Path(config.model_name).name)}__{slug(config.editor)}__n{config.n_edits}__b{config.batch_size}"
            f"__seed{config.seed}__{key[:12]}")
    return Path(config.out_dir) / "consecutive" / name, key


# --------------------------------------------------------------------------- measuring
def measure(backend: Backend, model: nn.Module, tok: Any, records: Sequence[dict], batch_size: int,
            edited: Sequence[bool] | None = None) -> dict[str, float]:
    """Efficacy, generalization and locality of `records` on the current model (one matcher call),
    averaged over the records; a record whose edit failed (`edited` False) counts 0 for the first two."""
    prompts, targets, owner = [], [], []
    for i, rec in enumerate(records):
        rw = rec["requested_rewrite"]
        new, true = target_str(rw["target_new"]), target_str(rw["target_true"])
        for kind, group, target in (("efficacy", [counterfact.rewrite_prompt(rec)], new),
                                    ("generalization", rec.get("paraphrase_prompts", []), new),
                                    ("locality", rec.get("neighborhood_prompts", []), true)):
            prompts += list(group)
            targets += [target] * len(group)
            owner += [(i, kind)] * len(group)
    flags = backend.matches(model, tok, prompts, targets, batch_size=batch_size) if prompts else []
    per: dict[tuple[int, str], list[bool]] = {}
    for key, flag in zip(owner, flags):
        per.setdefault(key, []).append(bool(flag))
    ok = list(edited) if edited is not None else [True] * len(records)
    out = {}
    for kind in MEASURES:
        values = [fraction(per[(i, kind)]) if (kind == "locality" or ok[i]) else 0.0
                  for i in range(len(records)) if (i, kind) in per]
        out[kind] = float(np.nanmean(values)) if values else math.nan
    return out


# --------------------------------------------------------------------------- the run
def run_consecutive(model: nn.Module, tok: Any, records: Sequence[dict], config: ConsecutiveConfig, cache: Any = None,
                    *, backend: Backend | None = None, on_batch: Any = None,
                    allow_code_change: bool = False) -> store.RunResult:
    """Run (or resume, or read back) one consecutive-batch run on the ORIGINAL `model` (left edited).
    `on_batch(j, row)` is called after batch j's row is written, before the state is saved (a test's kill).
    An unfinished run computed with other code is refused unless `allow_code_change` (`provenance.stamp`)."""
    backend = backend or default_backend()
    fp = records_fingerprint(records)
    rdir, key = locate(fp, config)
    ends = config.batch_ends()
    if store.finished(rdir, key, metrics=FINAL_METRICS, allow_nan=True):
        return load(rdir)
    provenance.refuse_code_change(rdir, key, allow_code_change, rows_file=BATCHES_FILE)
    P, Q = split_records(known_cached(model, tok, records, config, backend, fp), config.n_edits, config.seed)
    with store.writer_lock(rdir):
        _start(rdir, config, key)
        cache = backend.prepare(model, tok, config.hparams, cache)
        params = dict(model.named_parameters())
        done, saved = store.read_state(rdir / store.STATE_FILE, params, key)
        state = EditorState(store.apply_state(params, saved))
        touched = {n for n in saved if not n.startswith(store.EDITOR_STATE_PREFIX)}
        rows = store.truncate_rows(rdir / BATCHES_FILE, done)
        store.truncate_rows(rdir / store.CHECKPOINTS_FILE, ends[done - 1] if done else 0)
        provenance.stamp(rdir, key, done, allow_code_change)
        edited_ok = [ok for row in rows for ok in [not row["failed"]] * row["n_requests"]]
        bar = tqdm(total=len(ends), initial=done, desc=f"{config.editor} b{config.batch_size} {config.model_name}",
                   unit="batch", leave=False)
        for j in range(done + 1, len(ends) + 1):
            start, end = (ends[j - 2] if j > 1 else 0), ends[j - 1]
            batch = P[start:end]
            row = {"step": j, "edits": end, "n_requests": len(batch), "failed": False, "error": None}
            t0 = time.perf_counter()
            try:
                result = editing.edit_batch(model, tok, [r["requested_rewrite"] for r in batch], config.hparams,
                                            cache=cache, state=state)
                touched |= {param_name(params, name) for name in result.weight_deltas}
            except backend.edit_error as err:
                row.update(failed=True, error=f"{type(err).__name__}: {err}")
            row["seconds"] = time.perf_counter() - t0
            edited_ok += [not row["failed"]] * len(batch)
            row.update(measure(backend, model, tok, batch, config.eval_batch_size, [not row["failed"]] * len(batch)))
            append_jsonl(rdir / BATCHES_FILE, row)
            if any(start < c <= end for c in config.checkpoints()):
                append_jsonl(rdir / store.CHECKPOINTS_FILE, _checkpoint(backend, model, tok, P[:end], Q,
                                                                         edited_ok, end, config.eval_batch_size))
            if on_batch is not None:
                on_batch(j, row)
            store.save_state(rdir / store.STATE_FILE, params, touched, j, key, state.tensors)
            bar.update(1)
        bar.close()
        last = read_jsonl(rdir / store.CHECKPOINTS_FILE)[-1]
        write_json_atomic(rdir / store.RESULT_FILE, {"key": key, "final": {k: last[k] for k in FINAL_METRICS}})
        (rdir / store.STATE_FILE).unlink(missing_ok=True)
    return load(rdir, source="computed")


def _checkpoint(backend: Backend, model: nn.Module, tok: Any, edited: list[dict], Q: list[dict], ok: list[bool],
                edits: int, batch_size: int) -> dict[str, Any]:
    row = {"step": edits, "edits": edits, **measure(backend, model, tok, edited, batch_size, ok)}
    row["kept"] = fraction(answers_true(backend, model, tok, Q, batch_size))
    return row


def _holds_key(path: Path, key: str) -> bool:
    """Whether config.json is this run's; an unreadable one (garbage, or JSON nested too deeply) is named in a
    warning and counts as another run's, so that the folder starts again instead of failing on every call."""
    if not path.exists():
        return False
    try:
        data = store.read_json(path, rebuild="starting the run again")
    except store.CorruptFileError as err:
        log.warning("%s", err)
        return False
    return isinstance(data, dict) and data.get("key") == key


def _start(rdir: Path, config: ConsecutiveConfig, key: str) -> None:
    path = rdir / store.CONFIG_FILE
    if _holds_key(path, key):
        return
    for stale in (BATCHES_FILE, store.CHECKPOINTS_FILE, store.STATE_FILE, store.RESULT_FILE):
        (rdir / stale).unlink(missing_ok=True)
    cfg = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}
    write_json_atomic(path, {"key": key, "config": plain(cfg), "format_version": FORMAT_VERSION})


def load(rdir: Path, source: str = "read back") -> store.RunResult:
    """A consecutive run's tables: `steps` one row per batch, `checkpoints` the retention measures."""
    record = store.read_json(rdir / store.CONFIG_FILE, f"delete {rdir} to recompute the run")
    cfg = record["config"]
    final = store.read_final(rdir, FINAL_METRICS, allow_nan=True)
    hparams = {k: v for k, v in cfg["hparams"].items() if k != "__type__"}
    config = ConsecutiveConfig(**{**cfg, "hparams": hparams_from_dict(cfg["editor"], hparams, str(rdir))})
    return store.RunResult(config=config, steps=pd.DataFrame(read_jsonl(rdir / BATCHES_FILE)),
                           checkpoints=pd.DataFrame(read_jsonl(rdir / store.CHECKPOINTS_FILE)), final=final,
                           run_dir=rdir, source=source, code=store.recorded_code(record))


# --------------------------------------------------------------------------- a matrix of runs
def matrix(model_names: Sequence[str], editors: Sequence[str], batch_sizes: Sequence[int], n_edits: int,
           seed: int = 9) -> list[ConsecutiveConfig]:
    """Every (model, editor, batch size) run, the smallest batches first. An editor that writes one
    request at a time (no batch function in the registry: FT, KE, KN, MEND, ROME, WilKE) makes the same edits in
    the same order whatever the batch size, so it runs once, with the smallest batch size (measured
    after every batch of it); `one_at_a_time` tells which editors these are."""
    smallest = min(batch_sizes)
    return [ConsecutiveConfig(model_name=m, editor=e, n_edits=n_edits, batch_size=b, seed=seed)
            for m in model_names for b in sorted(batch_sizes) for e in editors
            if b == smallest or not one_at_a_time(e)]


def one_at_a_time(editor: str) -> bool:
    """Whether `editor` edits a batch request by request (`editing.edit_batch`)."""
    return editor not in BATCH_EDITORS


def read_progress(records: Sequence[dict] | str, config: ConsecutiveConfig) -> store.RunResult | None:
    """The run as far as it got on disk (`final` empty while unfinished), None if not started; never computes."""
    rdir, key = locate(records, config)
    try:
        if store.read_json(rdir / store.CONFIG_FILE).get("key") != key:
            return None
    except (FileNotFoundError, store.CorruptFileError):
        return None
    run = load(rdir)
    if not run.final:
        run.source = f"unfinished after {len(run.steps)} of {len(config.batch_ends())} batches"
    return run


def main(argv: Sequence[str] | None = None) -> pd.DataFrame:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", default="paper", help="sizes, batch sizes and editors (`profiles`); default paper")
    parser.add_argument("--models", nargs="+", default=["toy-gpt2", "toy-gptj"])
    parser.add_argument("--editors", nargs="+", default=None, help="default: the profile's consecutive_editors")
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=None)
    parser.add_argument("--n-edits", type=int, default=None)
    parser.add_argument("--records", default="toy-world", help="toy-world or the path of a CounterFact JSON")
    parser.add_argument("--allow-code-change", action="store_true",
                        help="continue unfinished runs computed with other code (recorded in their config.json)")
    args = parser.parse_args(argv)
    prof = get_profile(args.profile)
    configs = matrix(args.models, args.editors or prof.consecutive_editors,
                     args.batch_sizes or prof.consecutive_batch_sizes, args.n_edits or prof.consecutive_n_edits,
                     prof.seeds[0])
    torch.set_num_threads(1)
    records = counterfact.load_counterfact(args.records)
    rows = []
    for config in configs:
        started = time.time()
        model, tok = models.load_model(config.model_name)
        run = run_consecutive(model, tok, records, config, allow_code_change=args.allow_code_change)
        rows.append({"model": config.model_name, "editor": config.editor, "batch": config.batch_size,
                     **{k: 100 * v for k, v in run.final.items()}, "source": run.source,
                     "seconds": round(time.time() - started, 1)})
        print(pd.DataFrame(rows[-1:]).to_string(index=False, header=len(rows) == 1), flush=True)
    return pd.DataFrame(rows)


if __name__ == "__main__":
    main()
