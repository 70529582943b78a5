#!/usr/bin/env python
"""Single-edit success of every editor on the organisms (`make bench-success`).

For each model and editor: n known records spread over the model's world, each edited on a fresh
copy of the model and then rolled back on the edited copy (`experiments.edit_and_rollback`).
Prints, per editor, the share of edits after which the rewrite prompt answers target_new, the share
of rollbacks after which it answers target_true again, and the median seconds per edit. Rows are
appended to `benchmarks/results/<device>/single_edit_<model>.jsonl` as they finish, each with the
organism's weights fingerprint and a hash of the editor's settings; a rerun skips the (editor, record)
pairs already there for the same weights and settings, so an interrupted run resumes and a retrained
organism or a changed setting is measured anew (rows of other weights or settings are dropped).

    python benchmarks/single_edit_success.py                         # both organisms, 100 records
    python benchmarks/single_edit_success.py --models toy-gpt2 --editors rome wilke --records 20
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import statistics
import sys
from pathlib import Path

import torch
from tqdm.auto import tqdm

from wilke_lib import counterfact, editing, experiments, hparams, models
from wilke_lib.bench.editors import results_dir

EDITORS = sorted(editing.EDITORS)


def summarise(rows: list[dict]) -> list[dict]:
    by_editor: dict[str, list[dict]] = {}
    for row in rows:
        by_editor.setdefault(row["editor"], []).append(row)
    return [{"editor": editor, "n": len(group),
             "success": sum(r["success"] for r in group) / len(group),
             "rollback_restored": sum(r["rollback_restored"] for r in group) / len(group),
             "impossible_edits": sum("error" in r for r in group),
             "median_seconds": statistics.median(r["seconds"] for r in group),
             "layers": sorted({l for r in group for l in r["layers"]})}
            for editor, group in by_editor.items()]


def settings_hash(hp) -> str:
    """8 hex digits of the sha256 of the editor's settings as canonical JSON."""
    text = json.dumps(dataclasses.asdict(hp), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:8]


def run_model(model_name: str, editors: list[str], n_records: int, path: Path) -> list[dict]:
    model, tok = models.load_model(model_name)
    known = counterfact.known_records(model, tok, counterfact.load_counterfact("toy-world"))
    records = experiments.evenly_spaced(known, n_records)
    weights = models.weights_fingerprint(model)
    settings = {editor: settings_hash(hparams.load_hparams(editor, model_name)) for editor in editors}
    rows = [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []
    done = [r for r in rows if r.get("weights") == weights and r.get("settings") == settings.get(r["editor"])]
    if len(done) < len(rows):  # measured on other weights or settings: stale
        path.write_text("".join(json.dumps(r) + "\n" for r in done))
    seen = {(r["editor"], r["case_id"]) for r in done}
    cache = editing.EditCache.for_model(model)
    with path.open("a") as sink:
        for editor in editors:
            hp = hparams.load_hparams(editor, model_name)
            todo = [r for r in records if (editor, r["case_id"]) not in seen]
            for record in tqdm(todo, desc=f"{model_name} {editor}", unit="edit"):
                row = {**experiments.edit_and_rollback(model, tok, record, hp, cache),
                       "weights": weights, "settings": settings[editor]}
                sink.write(json.dumps(row) + "\n")
                sink.flush()
                done.append(row)
    wanted = {r["case_id"] for r in records}
    return [r for r in done if r["case_id"] in wanted and r["editor"] in editors]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["toy-gpt2", "toy-gptj"])
    parser.add_argument("--editors", nargs="+", default=EDITORS, choices=sorted(editing.EDITORS),
                        help="default: every registered editor (mend and ke need their trained networks)")
    parser.add_argument("--records", type=int, default=100, help="known records per model")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (tiny models: 1 is fastest)")
    parser.add_argument("--out", type=Path, default=None, help="results root (default benchmarks/results)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    out_dir = results_dir(models.default_device(), args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    for model_name in args.models:
        path = out_dir / f"single_edit_{Path(model_name).name}.jsonl"
        summary = summarise(run_model(model_name, args.editors, args.records, path))
        print(f"\n{model_name}: {args.records} known records, one edit each on a fresh copy, then rollback ({path})")
        print("| editor | success | impossible edits | rollback restored | median s/edit | layers edited |")
        print("|---|---|---|---|---|---|")
        for s in summary:
            print(f"| {s['editor']} | {s['success']:.0%} | {s['impossible_edits']} | {s['rollback_restored']:.0%} | "
                  f"{s['median_seconds']:.2f} | {','.join(map(str, s['layers']))} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
