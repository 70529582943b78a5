"""The paper's run matrix (`make runs`): every lifelong run the book reads, computed where missing.

The matrix of a profile (`paper`: 1,024 edits) is ROME, MEMIT and WilKE with every seed of the
profile (9, 10, 11) and every other editor with the first seed, on each model. Each run is the one
the book's chapters configure (`experiments.run_config`), so that once it is finished the book reads
it back from `runs/<model>/` and recomputes nothing. Runs go one per process:

* `executor="processes"` (default): `jobs` local processes (the machine's cores); a progress bar per
  run and one overall bar with the ETA, from the steps the runs have written;
* `executor="submitit-local"` / `"slurm"`: the same runs through submitit (one job per run), for
  clusters (`--slurm-partition`, `--timeout-min`); the local executor is what the tests use.

Killed runs resume where they stopped (`lifelong.run_lifelong`); a run being written by another
process is skipped with a note (the run's lock), and an unfinished run computed with other code is
refused with a note unless `--allow-code-change`. `--stale` lists the runs whose code differs from the
current code (or is unknown) without computing anything; `--restamp N` checks each stale finished run's
first N steps against the current code and records the current code where they agree (`lifelong.restamp`).
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import submitit
import torch
from tqdm.auto import tqdm

from wilke_lib import code_version, counterfact, experiments, lifelong, models
from wilke_lib.lifelong.provenance import CodeChangedError
from wilke_lib.lifelong.store import (CONFIG_FILE, RESULT_FILE, STEPS_ARCHIVE, STEPS_FILE, RunLockedError, final_problem,
                                      recorded_code)
from wilke_lib.profiles import Profile, get_profile
from wilke_lib.results import CorruptFileError, read_json

@dataclass(frozen=True)
class RunSpec:
    """One cell of the matrix."""

    model_name: str
    editor: str
    seed: int
    n_edits: int
    profile: str
    records: str = "toy-world"
    label: str = ""
    overrides: tuple[tuple[str, Any], ...] = ()  # hyper-parameters replaced in the editor's file

    def variant(self) -> experiments.EditorVariant:
        base = experiments.editor_variant(self.editor)
        return experiments.EditorVariant(self.label or base.label, base.editor, {**base.overrides, **dict(self.overrides)})

    def config(self, profile: Profile | None = None) -> lifelong.LifelongConfig:
        profile = profile or get_profile(self.profile)
        return experiments.run_config(self.model_name, self.variant(), self.n_edits, self.seed, profile)


def paper_matrix(model_names: Sequence[str], profile_name: str = "paper", editors: Sequence[str] | None = None,
                 records: str = "toy-world", seeds: Sequence[int] | None = None) -> list[RunSpec]:
    """Every editor of the profile with its seeds (`Profile.seeds_for`: Table 1's with all three; `seeds`
    keeps only those of them); in the order that makes a partial matrix most useful: Table 1's editors
    seed by seed, then the rest."""
    profile = get_profile(profile_name)
    editors = list(editors or profile.editors)
    if seeds is not None and not set(seeds) <= set(profile.seeds):
        raise ValueError(f"seeds {sorted(set(seeds) - set(profile.seeds))} are not in profile {profile_name!r} "
                         f"(its seeds: {list(profile.seeds)})")
    specs = [RunSpec(m, e, seed, profile.n_edits, profile_name, records)
             for m in model_names for e in editors
             for seed in profile.seeds_for(e) if seeds is None or seed in seeds]
    return sorted(specs, key=lambda s: (len(profile.seeds_for(s.editor)) == 1, profile.seeds.index(s.seed)))


def ablation_matrix(model_names: Sequence[str], profile_name: str = "paper", records: str = "toy-world",
                    scores: Sequence[str] = ("eq10", "update_norm")) -> list[RunSpec]:
    """The ablation of Fig. 9 as runs (chapter 04 reads them back: `experiments.ablation_progress`): every
    variant of `experiments.ablation_variants` with the profile's `ablation_n_edits` and its first seed."""
    profile = get_profile(profile_name)
    return [RunSpec(m, v.editor, profile.seeds[0], profile.ablation_n_edits, profile_name, records,
                    label=v.label, overrides=tuple(sorted(v.overrides.items())))
            for m in model_names for v in experiments.ablation_variants(tuple(scores))]


def layer_control_matrix(model_names: Sequence[str], profile_name: str = "paper", records: str = "toy-world",
                         k: int = 2) -> list[RunSpec]:
    """ROME fixed at each of the `k` layers WilKE's runs of the profile (either rule) chose most (as far as they have got),
    with every seed of the profile: the control of `claims.layer_per_fact` (chapter 3 reads them back)."""
    profile = get_profile(profile_name)
    facts = counterfact.load_counterfact(records)
    specs = []
    for m in model_names:
        wilke_runs, _ = experiments.matrix_progress(m, facts, profile, ("wilke", "wilke-eq10"))
        for variant in experiments.layer_controls(experiments.top_layers(wilke_runs, k=k)):
            specs += [RunSpec(m, "rome", seed, profile.n_edits, profile_name, records, label=variant.label,
                              overrides=tuple(sorted(variant.overrides.items()))) for seed in profile.seeds]
    return specs


def run_dir_of(spec: RunSpec, records: Sequence[dict]) -> Path:
    config = spec.config()
    return lifelong.run_dir(config.out_dir, config, records, lifelong.resolve_hparams(config))


def steps_done(rdir: Path, n_edits: int) -> int:
    """How many steps a run has written (n_edits once it is finished)."""
    if (rdir / STEPS_ARCHIVE).exists() and not (rdir / STEPS_FILE).exists():
        return n_edits
    path = rdir / STEPS_FILE
    return sum(1 for _ in path.open("rb")) if path.exists() else 0


def run_one(spec: RunSpec, position: int = 0, threads: int = 1, allow_code_change: bool = False) -> dict[str, Any]:
    """Compute (or read back) one run in this process; a row of the final table (a run locked by another
    process, or computed so far with other code, is a row saying so: the other runs go on)."""
    torch.set_num_threads(threads)
    started = time.time()
    records = counterfact.load_counterfact(spec.records)
    config = spec.config()
    row = {"model": spec.model_name, "editor": spec.variant().label, "seed": spec.seed, "n_edits": spec.n_edits}
    try:
        result = lifelong.run_many(models.load_model, records, [config], allow_code_change=allow_code_change)[0]
    except RunLockedError as err:
        return row | {"status": "skipped (another process is writing it)", "seconds": 0.0, "S": float("nan"),
                      "run": str(err).split(" is being")[0]}
    except CodeChangedError as err:
        print(err, flush=True)
        return row | {"status": "refused (computed so far with other code; --allow-code-change continues it)",
                      "seconds": 0.0, "S": float("nan"), "run": str(err).split(" was computed")[0]}
    return row | {"status": result.source, "seconds": round(time.time() - started, 1),
                  "S": 100 * result.final.get("S", float("nan")), "run": result.run_dir.name}


def _poll(bars: dict[RunSpec, tqdm], overall: tqdm, dirs: dict[RunSpec, Path]) -> None:
    done = 0
    for spec, bar in bars.items():
        n = steps_done(dirs[spec], spec.n_edits)
        bar.n = n
        bar.refresh()
        done += n
    overall.n = done
    overall.refresh()


def run_matrix(specs: Sequence[RunSpec], *, jobs: int | None = None, executor: str = "processes",
               folder: Path | None = None, slurm: dict | None = None, poll_seconds: float = 5.0,
               allow_code_change: bool = False) -> pd.DataFrame:
    """Compute the runs of `specs` that are missing; a table of what was done (status, seconds, S).
    `allow_code_change`: continue unfinished runs computed with other code (`lifelong.run_lifelong`)."""
    if jobs is not None and (isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1):
        raise ValueError(f"run_matrix: jobs must be a positive int (runs at once) or None for the CPU cores, got {jobs!r}")
    jobs = jobs or max(1, os.cpu_count() or 1)
    records = {s.records: counterfact.load_counterfact(s.records) for s in specs}
    dirs = {s: run_dir_of(s, records[s.records]) for s in specs}
    todo = [s for s in specs if steps_done(dirs[s], s.n_edits) < s.n_edits or not has_result(dirs[s])]
    rows = [{"model": s.model_name, "editor": s.variant().label, "seed": s.seed, "n_edits": s.n_edits,
             "status": "read back", "seconds": 0.0, "S": _final_s(dirs[s]), "run": dirs[s].name}
            for s in specs if s not in todo]
    if todo and executor == "processes":
        rows += _run_processes(todo, jobs, dirs, poll_seconds, allow_code_change)
    elif todo:
        rows += _run_submitit(todo, executor, folder or Path("runs") / ".submitit", slurm or {}, allow_code_change)
    return pd.DataFrame(rows)


def has_result(run_dir: Path) -> bool:
    """Whether a run folder holds a result.json with final metrics (`store.final_problem`); one without
    them is run again (the runner moves it aside as result.json.corrupt and finishes the run)."""
    path = run_dir / RESULT_FILE
    try:
        return path.is_file() and not final_problem(read_json(path))
    except CorruptFileError:
        return False


def _final_s(run_dir: Path) -> float:
    """S (%) after a finished run's last step, from its result.json (a corrupt one: CorruptFileError
    naming it)."""
    return 100 * float(read_json(run_dir / "result.json")["final"].get("S", float("nan")))


def _run_processes(todo: Sequence[RunSpec], jobs: int, dirs: dict[RunSpec, Path], poll_seconds: float,
                   allow_code_change: bool = False) -> list[dict]:
    total = sum(s.n_edits for s in todo)
    overall = tqdm(total=total, desc=f"{len(todo)} runs", unit="step", position=0)
    bars = {s: tqdm(total=s.n_edits, desc=f"{Path(s.model_name).name} {s.variant().label} seed {s.seed}",
                    unit="step", position=i + 1, leave=False) for i, s in enumerate(todo)}
    rows = []
    with ProcessPoolExecutor(max_workers=jobs) as pool:
        futures = {pool.submit(run_one, s, i + 1, 1, allow_code_change): s for i, s in enumerate(todo)}
        pending = set(futures)
        while pending:
            finished = {f for f in pending if f.done()}
            for future in finished:
                rows.append(future.result())
            pending -= finished
            _poll(bars, overall, dirs)
            if pending:
                time.sleep(poll_seconds)
    for bar in bars.values():
        bar.close()
    overall.close()
    return rows


def _run_submitit(todo: Sequence[RunSpec], executor: str, folder: Path, slurm: dict,
                  allow_code_change: bool = False) -> list[dict]:
    if executor == "submitit-local":
        ex = submitit.LocalExecutor(folder=str(folder))
        ex.update_parameters(timeout_min=slurm.get("timeout_min", 24 * 60))
    elif executor == "slurm":
        ex = submitit.AutoExecutor(folder=str(folder), cluster="slurm")
        ex.update_parameters(**{"timeout_min": 24 * 60, "cpus_per_task": 2, **slurm})
    else:
        raise ValueError(f"executor must be processes, submitit-local or slurm, got {executor!r}")
    submitted = [ex.submit(run_one, spec, 0, 1, allow_code_change) for spec in todo]
    return [job.result() for job in tqdm(submitted, desc="jobs", unit="run")]


def code_table(specs: Sequence[RunSpec]) -> pd.DataFrame:
    """The code of every started run of `specs`, read from its config.json (nothing computed or loaded): model,
    editor, seed, n_edits, finished, code (the recorded fingerprint or "unknown"), status ("current",
    "differs", "unknown": `code_version.code_status`) and run folder."""
    records = {s.records: counterfact.load_counterfact(s.records) for s in specs}
    rows = []
    for s in specs:
        rdir = run_dir_of(s, records[s.records])
        try:
            code = recorded_code(read_json(rdir / CONFIG_FILE))
        except (FileNotFoundError, CorruptFileError):
            continue  # not started (or a config.json the run writes again when it runs)
        rows.append({"model": s.model_name, "editor": s.variant().label, "seed": s.seed, "n_edits": s.n_edits,
                     "finished": has_result(rdir), "code": code or "unknown",
                     "status": code_version.code_status(code), "run": str(rdir)})
    return pd.DataFrame(rows, columns=["model", "editor", "seed", "n_edits", "finished", "code", "status", "run"])


def stale_runs(specs: Sequence[RunSpec]) -> pd.DataFrame:
    """The started runs of `specs` whose code differs from the current code or is unknown (`code_table`)."""
    table = code_table(specs)
    return table[table["status"] != "current"].reset_index(drop=True)


def restamp_runs(specs: Sequence[RunSpec], n_steps: int = 4) -> pd.DataFrame:
    """`lifelong.restamp` on every stale finished run of `specs`: its first `n_steps` steps recomputed with the
    current code (the model loaded fresh) and compared bit for bit; one row per run with the outcome."""
    stale = stale_runs(specs)
    finished = set(stale.loc[stale["finished"].astype(bool), "run"])
    records = {s.records: counterfact.load_counterfact(s.records) for s in specs}
    rows = []
    for s in specs:
        if str(run_dir_of(s, records[s.records])) not in finished:
            continue
        outcome = lifelong.restamp(records[s.records], s.config(), models.load_model, n_steps)
        print(outcome.describe(), flush=True)
        rows.append({"model": s.model_name, "editor": s.variant().label, "seed": s.seed, "status": outcome.status,
                     "checked_steps": outcome.checked_steps, "difference": outcome.describe() if outcome.status ==
                     "differs" else "", "run": outcome.run_dir.name})
    return pd.DataFrame(rows, columns=["model", "editor", "seed", "status", "checked_steps", "difference", "run"])


def positive_int(text: str) -> int:
    """An argparse type: an int >= 1 (`--jobs -3` or `--jobs 0` is a usage error, not a bare ValueError)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive whole number (at least 1), got {value}")
    return value


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=list(models.ORGANISMS))
    parser.add_argument("--profile", default="paper")
    parser.add_argument("--editors", nargs="+", default=None, help="default: the profile's editors")
    parser.add_argument("--records", default="toy-world", help="toy-world or the path of a CounterFact JSON")
    parser.add_argument("--seeds", nargs="+", type=int, default=None, help="default: the profile's seeds")
    parser.add_argument("--jobs", type=positive_int, default=None, help="runs at once (default: the CPU cores)")
    parser.add_argument("--executor", default="processes", choices=["processes", "submitit-local", "slurm"])
    parser.add_argument("--slurm-partition", default=None)
    parser.add_argument("--timeout-min", type=int, default=24 * 60)
    parser.add_argument("--ablation", action="store_true",
                        help="the ablation of Fig. 9 instead of the editors (WilKE's variants, the profile's "
                             "ablation_n_edits, its first seed)")
    parser.add_argument("--layer-controls", action="store_true",
                        help="ROME fixed at the two layers WilKE's runs chose most, every seed of the profile (the "
                             "control of the claim that choosing the layer per fact helps; needs WilKE's runs)")
    parser.add_argument("--scores", nargs="+", default=["eq10", "update_norm"], choices=["eq10", "update_norm"],
                        help="with --ablation: the layer scores whose variants run")
    parser.add_argument("--dry-run", action="store_true", help="list the runs and what is missing")
    parser.add_argument("--allow-code-change", action="store_true",
                        help="continue unfinished runs computed so far with other code (recorded in their config.json)")
    parser.add_argument("--stale", action="store_true",
                        help="list the runs whose code differs from the current code (or is unknown); computes nothing")
    parser.add_argument("--restamp", type=positive_int, nargs="?", const=4, default=None, metavar="N",
                        help="recompute the first N (default 4) steps of each stale finished run with the current code "
                             "and record the current code where they agree bit for bit")
    args = parser.parse_args(argv)
    if args.ablation and (args.editors or args.seeds):
        parser.error("--ablation runs WilKE's variants with the profile's first seed: drop --editors / --seeds")
    if args.layer_controls and (args.ablation or args.editors or args.seeds):
        parser.error("--layer-controls runs ROME at WilKE's layers with the profile's seeds: drop --ablation / "
                     "--editors / --seeds")
    specs = (ablation_matrix(args.models, args.profile, args.records, args.scores) if args.ablation
             else layer_control_matrix(args.models, args.profile, args.records) if args.layer_controls
             else paper_matrix(args.models, args.profile, args.editors, args.records, args.seeds))
    if args.stale or args.restamp is not None:
        table = restamp_runs(specs, args.restamp) if args.restamp is not None else stale_runs(specs)
        print(table.to_string(index=False) if len(table) else "no stale runs in this matrix "
              f"(code {code_version.current_fingerprint()})")
        return
    if args.dry_run:
        records = {s.records: counterfact.load_counterfact(s.records) for s in specs}
        for s in specs:
            d = run_dir_of(s, records[s.records])
            label = s.variant().label if s.label else s.editor
            print(f"{s.model_name:10s} {label:6s} seed {s.seed:3d}: {steps_done(d, s.n_edits):5d}/{s.n_edits} {d}")
        return
    slurm = {"timeout_min": args.timeout_min} | ({"slurm_partition": args.slurm_partition} if args.slurm_partition else {})
    table = run_matrix(specs, jobs=args.jobs, executor=args.executor, slurm=slurm,
                       allow_code_change=args.allow_code_change)
    print(table.to_string(index=False, float_format=lambda x: f"{x:.1f}"))


if __name__ == "__main__":
    main()
