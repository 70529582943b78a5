"""The width ladder: organisms that differ only in MLP width, and the rule, fixed before any WilKE or
MEMIT run on them, that picks the one whose ROME collapses where the paper's models do.

On both of the paper's models ROME's lifelong S falls below half its best at step 64 (the authors'
curves, `reported.paper_curves`), and everything the paper is about (the staircase, flashes in a working
model, WilKE delaying the collapse) happens before and around that step. The third-generation
organisms (MLP width 48) collapse after 4-16 edits. Width buys lifespan (pilots in docs/organisms.md),
so the ladder trains the third generation's recipe at widths 48, 96, 192, 384 (768 if needed)
(`organisms.train.LADDER`) and measures, for each rung:

* its organism report (`make organism-report`): whether it meets every realism target;
* ROME's collapse step over 1,024 lifelong edits with rollback, seeds 9, 10, 11 (`claims.collapse_step`,
  checkpoints at every step up to 16, then powers of two and every 32 steps);
* FT's S after 1,024 edits (seed 9), the control: a collapse that FT does not share belongs to ROME's family;
* cheap proxies over single edits: the relative size of one ROME update ||dW|| / ||W|| (the released
  WilKE's criterion), ||W - W_0|| / ||W_0|| after one edit and its rollback, and the share of other known
  facts lost after one edit and its rollback.

The choice (`choose`), in three tiers, in this order:
1. among the rungs that meet every realism target, the one whose median ROME collapse step over the
   seeds is closest to 64 on a log scale, if that step is in 32-128;
2. otherwise the same rule on a second arm with a world four times as heavy (`world.HEAVY_SPEC`, rungs
   "toy-gpt2-x4-w<width>"), width 192 first (`choose` says which width comes next);
3. otherwise the same rule with the spread targets relaxed (at most 0.85 of the peaks at one layer, at
   least 4 distinct layers).
The result, with the tier that decided, goes to organisms/ladder.json (`python -m wilke_lib.ladder`).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import math
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from wilke_lib import claims, counterfact, editing, lifelong, models
from wilke_lib.analysis.organism_report import REPORT_FILE, TARGETS, recipe_name
from wilke_lib.generation import greedy_matches
from wilke_lib.hparams import load_hparams
from wilke_lib.lifelong import CheckpointPolicy
from wilke_lib.organisms.train import LADDER, ORGANISM_DIR, world_name
from wilke_lib.results import REPO_ROOT, read_json, write_json_atomic

TARGET_STEP = 64
"""ROME's collapse step on GPT2-XL and on GPT-J (the authors' curves)."""
TIER1_RANGE = (32, 128)
"""Collapse steps that count as calibrated (a factor of two either side of 64)."""
SEEDS = (9, 10, 11)
N_EDITS = 1024
CHECKPOINTS = CheckpointPolicy(powers_of_two=True, multiple_of=32, extra=tuple(range(1, 17)))
"""Every step up to 16 (where the narrow rungs collapse), then powers of two and every 32 steps."""
RELAXED_SPREAD = {"causal_peak_top_share": 0.85, "causal_peak_distinct": 4}
"""Tier 3: the spread targets, relaxed; the other targets stay."""
LADDER_FILE = ORGANISM_DIR / "ladder.json"


def rung_folder(name: str) -> str:
    """The organism to load for a rung: its own folder, or for width 48, which the book's pair are until the
    calibrated pair replace them, the book's organism of that architecture."""
    if (ORGANISM_DIR / name / "config.json").is_file():
        return name
    arch, width = name.removeprefix("toy-").rsplit("-w", 1)
    base = f"toy-{arch}"
    config = ORGANISM_DIR / base / "config.json"
    if config.is_file() and int(read_json(config).get("n_inner") or 0) == int(width):
        return base
    raise FileNotFoundError(f"rung {name!r} is not trained: run `python -m wilke_lib.organisms train --name {name} "
                            f"--threads 1` (resumable)")


def rung_hparams(editor: str, name: str) -> Any:
    """The editor's settings for a rung: those of the book's organism of the same architecture (the rungs share
    its recipe; the calibrated pair get their own sweeps afterwards), with the second moments of the rung's
    own world."""
    hparams = load_hparams(editor, recipe_name(name))
    if hasattr(hparams, "mom2_corpus"):
        hparams = dataclasses.replace(hparams, mom2_corpus=world_name(name))
    return hparams


def run_configs(name: str) -> list[lifelong.LifelongConfig]:
    """ROME with every seed and FT with the first: the lifelong runs a rung is measured by."""
    folder = rung_folder(name)
    out = str(REPO_ROOT / "runs" / folder)
    return ([lifelong.LifelongConfig(model_name=folder, editor="rome", hparams=rung_hparams("rome", name),
                                     n_edits=N_EDITS, seed=s, checkpoints=CHECKPOINTS, out_dir=out) for s in SEEDS]
            + [lifelong.LifelongConfig(model_name=folder, editor="ft", hparams=rung_hparams("ft", name),
                                       n_edits=N_EDITS, seed=SEEDS[0], checkpoints=CHECKPOINTS, out_dir=out)])


def run_rung(name: str, compute: bool = True, allow_code_change: bool = False,
             seeds: Sequence[int] | None = None) -> list[lifelong.RunResult | None]:
    """The rung's runs (`run_configs`, those of `seeds` only when given): computed where missing (resumably; an
    unfinished run started with other code only with `allow_code_change`, which its config.json records) or, with
    compute=False, read back as far as they are on disk (None: not started)."""
    records = counterfact.load_counterfact(world_name(name))
    configs = [c for c in run_configs(name) if seeds is None or c.seed in seeds]
    if compute:
        return lifelong.run_many(models.load_model, records, configs, allow_code_change=allow_code_change)
    fp = lifelong.records_fingerprint(records)
    return [lifelong.read_progress(fp, c) for c in configs]


def collapse_steps(runs: Sequence[lifelong.RunResult | None]) -> list[float | None]:
    """ROME's collapse step per seed (NaN: none within the run; None: the run has not finished)."""
    steps = []
    for run in runs:
        if run is None or not run.final:
            steps.append(None)
            continue
        s = run.checkpoints.set_index("step")["S"].sort_index() * 100.0
        steps.append(claims.collapse_step(s))
    return steps


PROXY_KEYS = ("rome_update_rel_norm", "rome_residue_after_rollback", "retention_lost_after_one_edit",
              "alphaedit_null_share")
"""The single-edit proxies `proxies` measures (organisms/ladder.json keeps them with `--proxies`)."""


def proxies(name: str, n_records: int = 100, n_probes: int = 100) -> dict[str, float]:
    """Single-edit proxies of a rung's lifespan, medians over `n_records` known records, each edited by ROME on a
    fresh copy and rolled back: ||dW|| / ||W|| of the edit, ||W - W_0|| / ||W_0|| after edit and rollback, and
    the share of `n_probes` other known records that no longer answer their true object after both."""
    folder = rung_folder(name)
    model, tok = models.load_model(folder, device="cpu")
    hp = rung_hparams("rome", name)
    known = counterfact.known_records(model, tok, counterfact.load_counterfact(world_name(name)))
    edited, probes = known[::max(1, len(known) // n_records)][:n_records], known[1::max(1, len(known) // n_probes)][:n_probes]
    probe_prompts = [counterfact.rewrite_prompt(r) for r in probes]
    probe_targets = [r["requested_rewrite"]["target_true"]["str"] for r in probes]
    cache = editing.EditCache.for_model(model)
    update, residue, lost = [], [], []
    for record in edited:
        work = copy.deepcopy(model)
        before = {k: v.detach().clone() for k, v in work.state_dict().items()}
        result = editing.edit(work, tok, record["requested_rewrite"], hp, cache=cache)
        weight = f"{next(iter(result.weight_deltas))}.weight"
        w0 = before[weight]
        update.append(_relative_change(work, weight, w0))
        editing.rollback(work, tok, record["requested_rewrite"], hp, result, cache=cache, keep_deltas=False)
        residue.append(_relative_change(work, weight, w0))
        lost.append(1.0 - sum(greedy_matches(work, tok, probe_prompts, probe_targets)) / len(probes))
    return {"rome_update_rel_norm": statistics.median(update),
            "rome_residue_after_rollback": statistics.median(residue),
            "retention_lost_after_one_edit": statistics.median(lost),
            "alphaedit_null_share": null_space_share(model, tok, name, hp.layer, cache)}


def null_space_share(model: torch.nn.Module, tok: Any, name: str, layer: int, cache: editing.EditCache) -> float:
    """The share of the key space at `layer` that AlphaEdit's null-space projection keeps editable (Fang et al. 2025,
    Eq. 11: the eigen-directions of C = E[k k^T] below the organism's `nullspace_threshold`): trace(P) / d_mlp."""
    projector = cache.get_projector(model, tok, layer, rung_hparams("alphaedit", name))
    return float(projector.trace()) / projector.shape[0]


def _relative_change(model: torch.nn.Module, name: str, original: torch.Tensor) -> float:
    """||W - W_0|| / ||W_0|| of parameter `name`."""
    return (torch.linalg.norm(model.state_dict()[name] - original) / torch.linalg.norm(original)).item()


def targets_met(report: dict, relaxed: bool = False) -> bool:
    """Whether a rung's organism report meets every realism target (tier 3: the spread targets relaxed)."""
    if relaxed:
        report = {**report, "causal_peak_top_share": min(report["causal_peak_top_share"], 0.6)
                  if report["causal_peak_top_share"] <= RELAXED_SPREAD["causal_peak_top_share"] else 1.0,
                  "causal_peak_distinct": max(report["causal_peak_distinct"], 4)
                  if report["causal_peak_distinct"] >= RELAXED_SPREAD["causal_peak_distinct"] else 0}
    return all(test(report) for _, _, test in TARGETS)


def rung_row(name: str, compute_proxies: bool = False) -> dict[str, Any]:
    """One row of organisms/ladder.json, from what is on disk (runs are not computed here)."""
    width = LADDER[name].d_mlp
    try:
        folder = rung_folder(name)
    except FileNotFoundError:
        return {"name": name, "d_mlp": width, "trained": False}
    report_path = ORGANISM_DIR / folder / REPORT_FILE
    report = read_json(report_path) if report_path.is_file() else None
    runs = run_rung(name, compute=False)
    steps = collapse_steps(runs[:len(SEEDS)])
    ft = runs[len(SEEDS)]
    row = {"name": name, "folder": folder, "d_mlp": width, "trained": True,
           "targets_met": None if report is None else targets_met(report),
           "targets_met_relaxed": None if report is None else targets_met(report, relaxed=True),
           "causal_peak_top_share": None if report is None else report["causal_peak_top_share"],
           "causal_peak_distinct": None if report is None else report["causal_peak_distinct"],
           "rome_collapse_steps": [None if s is None or math.isnan(s) else int(s) for s in steps],
           "rome_collapsed": [None if s is None else not math.isnan(s) for s in steps],
           "ft_s_final": None if ft is None or not ft.final else 100 * ft.final["S"]}
    if compute_proxies:
        row.update(proxies(name))
    return row


def median_collapse(row: dict) -> float | None:
    """The median over the seeds of a rung's ROME collapse step; a seed without collapse counts as beyond
    the run (N_EDITS + 1); None until every seed's run has finished."""
    if not row.get("trained") or None in row.get("rome_collapsed", [None]):
        return None
    steps = [s if collapsed else N_EDITS + 1 for s, collapsed in zip(row["rome_collapse_steps"], row["rome_collapsed"])]
    return float(statistics.median(steps))


OPTIONAL_WIDTHS = (768,)
"""Standard-world rungs trained only if the 384 rung's median collapse comes before step 64."""
HEAVY_FIRST = 192
"""Tier 2's first rung: in the heavy world, width 192 carries width 48's load per parameter (`world.HEAVY_SPEC`)."""


def is_heavy(row: dict) -> bool:
    """Whether a rung belongs to tier 2's heavier world ("toy-gpt2-x4-w192")."""
    return "-x4-" in row["name"]


def choose(rows: Sequence[dict], tier2_out_of_reach: bool = False) -> dict[str, Any]:
    """The rule fixed in advance (module docstring): {"chosen": name or None, "tier": 1 / 2 / 3 / None, "reason"}.

    Tier 1 on the standard world's rungs (48, 96, 192, 384 required; 768 only if 384's median collapse comes
    before 64). Tier 2 on the heavy world's (`is_heavy`): 192 first; 96 only if 192 misses a target or collapses
    after 128 (a heavier load per parameter spreads storage and shortens the lifespan), 384 only if 192 meets
    the targets but collapses before 32. Tier 3 (spread targets relaxed, over every rung) once the tier-2 rungs
    asked for are measured and none qualifies, or once tier 2 is declared out of reach. Undecided while a rung the
    current tier needs lacks its report, or lacks its runs while its report meets the tier's targets (a rung that
    misses them cannot be chosen whatever it collapses at; the runs of 384 and of tier 2's first rung are always
    needed, since their step says which rung comes next)."""
    standard = [r for r in rows if not is_heavy(r)]
    heavy = [r for r in rows if is_heavy(r)]

    def width(group: Sequence[dict], d_mlp: int) -> dict | None:
        return next((r for r in group if r["d_mlp"] == d_mlp), None)

    def missing(group: Sequence[dict], widths: Sequence[int], always_runs: Sequence[int] = ()) -> list[str]:
        """The names of the rungs of `widths` in `group` that are untrained or not yet measured. A rung whose
        report misses the targets cannot be chosen in this tier whatever its collapse step, so its runs are
        not waited for (those of `always_runs` are: their step decides which rung comes next)."""
        out = []
        for d_mlp in widths:
            r = width(group, d_mlp)
            if r is None:
                out.append(f"width {d_mlp}")
            elif not r.get("trained") or r.get("targets_met") is None:
                out.append(r["name"])
            elif median_collapse(r) is None and (r["targets_met"] or d_mlp in always_runs):
                out.append(r["name"])
        return out

    def undecided(waiting: list[str], tier: int) -> dict[str, Any]:
        return {"chosen": None, "tier": None,
                "reason": f"undecided (tier {tier}): waiting for {', '.join(waiting)} (organism, report, ROME runs)"}

    def closest(group: Sequence[dict], key: str) -> str | None:
        fits = [(abs(math.log(median_collapse(r) / TARGET_STEP)), r["name"]) for r in group
                if r.get(key) and median_collapse(r) is not None and TIER1_RANGE[0] <= median_collapse(r) <= TIER1_RANGE[1]]
        return min(fits)[1] if fits else None

    def decided(name: str, tier: int) -> dict[str, Any]:
        step = median_collapse(next(r for r in rows if r["name"] == name))
        among = {1: "the standard world's rungs", 2: "the heavy world's rungs", 3: "all rungs"}[tier]
        return {"chosen": name, "tier": tier,
                "reason": f"median ROME collapse step {step:g}, the closest to {TARGET_STEP} on a log scale among "
                          f"{among} in {TIER1_RANGE[0]}-{TIER1_RANGE[1]} that meet "
                          f"{'the targets with the spread relaxed' if tier == 3 else 'every realism target'}"}

    required = [48, 96, 192, 384]
    w384 = width(standard, 384)
    if w384 and not missing(standard, [384], always_runs=[384]) and median_collapse(w384) < TARGET_STEP:
        required += list(OPTIONAL_WIDTHS)
    if waiting := missing(standard, required, always_runs=[384]):
        return undecided(waiting, 1)
    if (name := closest(standard, "targets_met")) is not None:
        return decided(name, 1)

    if not tier2_out_of_reach:
        if waiting := missing(heavy, [HEAVY_FIRST], always_runs=[HEAVY_FIRST]):
            return undecided(waiting, 2)
        first = width(heavy, HEAVY_FIRST)
        asked = [HEAVY_FIRST]
        if not first["targets_met"] or median_collapse(first) > TIER1_RANGE[1]:
            asked.append(96)
        elif median_collapse(first) < TIER1_RANGE[0]:
            asked.append(384)
        if waiting := missing(heavy, asked):
            return undecided(waiting, 2)
        if (name := closest(heavy, "targets_met")) is not None:
            return decided(name, 2)

    unmeasured = [r["name"] for r in rows if r.get("trained") and r.get("targets_met_relaxed") is not False
                  and (r.get("targets_met_relaxed") is None or median_collapse(r) is None)]
    if unmeasured:  # a rung the relaxed targets admit, or may admit, is not measured yet
        return undecided(unmeasured, 3)
    if (name := closest(rows, "targets_met_relaxed")) is not None:
        return decided(name, 3)
    return {"chosen": None, "tier": None, "reason": "no rung qualifies, even with the spread targets relaxed"}


def ladder_table(names: Sequence[str] | None = None, proxies_for: Sequence[str] = (),
                 tier2_out_of_reach: bool = False) -> dict[str, Any]:
    """organisms/ladder.json's content: every GPT-2 rung's row (or those of `names`), the choice and the rule.
    The single-edit proxies are measured for the rungs of `proxies_for`; the others keep those last measured."""
    names = list(names or [n for n in LADDER if n.startswith("toy-gpt2-")])
    rows = [rung_row(n, n in proxies_for) for n in names]
    if LADDER_FILE.is_file():
        measured = {r["name"]: {k: r[k] for k in PROXY_KEYS if k in r} for r in read_json(LADDER_FILE)["rungs"]}
        for row in rows:
            if row.get("trained") and row["name"] not in proxies_for:
                row.update(measured.get(row["name"], {}))
    decision = choose(rows, tier2_out_of_reach)
    for row in rows:
        row["chosen"] = row["name"] == decision["chosen"]
    return {"rule": {"target_step": TARGET_STEP, "tier1_range": list(TIER1_RANGE), "seeds": list(SEEDS),
                     "n_edits": N_EDITS, "relaxed_spread": RELAXED_SPREAD,
                     "definition": "collapse step: first checkpoint where S falls below half its best so far"},
            "rungs": rows, **decision}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--names", nargs="+", default=None,
                        help="the rungs to run or measure (default: every GPT-2 rung); ladder.json always lists all")
    parser.add_argument("--run", action="store_true", help="compute the rungs' missing ROME and FT runs (resumable)")
    parser.add_argument("--seeds", type=int, nargs="+", choices=SEEDS, default=None,
                        help="--run: only the runs of these seeds (FT runs at the first), e.g. two processes side by "
                             "side, one thread each: --seeds 9 10 and --seeds 11")
    parser.add_argument("--proxies", action="store_true", help="also measure the rungs' single-edit proxies (minutes each)")
    parser.add_argument("--allow-code-change", action="store_true",
                        help="--run: continue unfinished runs started with other code (recorded in their config.json)")
    parser.add_argument("--tier2-out-of-reach", action="store_true",
                        help="allow tier 3 (spread targets relaxed) when no rung qualifies for tier 1")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    names = args.names or [n for n in LADDER if n.startswith("toy-gpt2-")]
    if args.run:
        for name in names:
            try:
                run_rung(name, allow_code_change=args.allow_code_change, seeds=args.seeds)
            except FileNotFoundError as err:
                print(f"{name}: {err}")
    table = ladder_table(None, names if args.proxies else (), args.tier2_out_of_reach)
    write_json_atomic(LADDER_FILE, table)
    for row in table["rungs"]:
        print({k: row.get(k) for k in ("name", "d_mlp", "targets_met", "rome_collapse_steps", "ft_s_final", "chosen")})
    print(f"choice: {table['chosen']} (tier {table['tier']}): {table['reason']}")


if __name__ == "__main__":
    main()
