"""Sweep an editor's hyper-parameters on an organism: the procedure that derives the organisms'
settings in wilke_lib/hparams (see wilke_lib/hparams/README.md), starting from the paper's.

    .venv/bin/python -m scripts.sweep_organism_hparams toy-gpt2 --editor rome --records 20 \
        --grid layer=2,3,4 clamp_norm_factor=4,8 v_lr=0.5,1.0
    .venv/bin/python -m scripts.sweep_organism_hparams toy-gptj --editor memit \
        --grid "layers=[2,3],[2,3,4]" mom2_update_weight=100,1000

Each grid value is read as YAML (`[2,3]` is a list). Every setting edits the same evenly spaced
known records, each on a fresh copy of the organism, and reports ES (the rewrite prompt answers
target_new), PS (share of paraphrases), NS (share of neighbourhood prompts still answering
target_true), the share whose rollback restores target_true (editors that roll back) and the
seconds per edit. The rows are printed and appended to `results/<model>/sweeps/<editor>.csv` (one row per finished setting).

Step 1 of the procedure, ROME's layer by causal tracing (the tables of the hparams README):

    .venv/bin/python -m scripts.sweep_organism_hparams toy-gpt2 --trace 100
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import time

import pandas as pd
import torch
import yaml
from tqdm.auto import tqdm

from wilke_lib import counterfact, editing, experiments, hparams, models
from wilke_lib.lifelong.runner import default_backend
from wilke_lib.metrics import evaluate_edit
from wilke_lib.results import results_dir

ROLLBACK_EDITORS = ("rome", "wilke")


def parse_grid(items: list[str]) -> dict[str, list]:
    """`key=v1,v2` -> {key: [v1, v2]}, each value read as YAML; commas inside brackets stay."""
    grid = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"--grid entry {item!r}: expected key=value[,value...]")
        values, depth, start = [], 0, 0
        for i, ch in enumerate(text + ","):
            depth += (ch in "[{") - (ch in "]}")
            if ch == "," and depth == 0:
                values.append(yaml.safe_load(text[start:i]))
                start = i + 1
        grid[key] = values
    return grid


def settings(base, grid: dict[str, list]):
    """Every combination of the grid, as hyper-parameters validated like a YAML file."""
    keys = list(grid)
    for combo in itertools.product(*(grid[k] for k in keys)):
        changes = dict(zip(keys, combo))
        unknown = set(changes) - {f.name for f in dataclasses.fields(base)}
        if unknown:
            raise SystemExit(f"{type(base).__name__} has no field(s) {sorted(unknown)}")
        yield changes, dataclasses.replace(base, **changes)


def measure(model, tok, records, hp, cache, backend) -> dict:
    totals = dict(ES=0.0, PS=0.0, NS=0.0, rollback=0.0, failed=0)
    started = time.time()
    for record in records:
        if hp.editor in ROLLBACK_EDITORS:
            totals["rollback"] += experiments.edit_and_rollback(model, tok, record, hp, cache)["rollback_restored"]
        try:
            edited = editing.edit(model, tok, record["requested_rewrite"], hp, copy=True, cache=cache).model
        except editing.EditError:
            totals["failed"] += 1
            continue
        scores = evaluate_edit(backend, edited, tok, record, batch_size=32)
        for key in ("ES", "PS", "NS"):
            totals[key] += scores[key]
    n = len(records)
    row = {k: totals[k] / n for k in ("ES", "PS", "NS")}
    row["rollback"] = totals["rollback"] / n if hp.editor in ROLLBACK_EDITORS else float("nan")
    row["failed"] = totals["failed"]
    row["seconds"] = (time.time() - started) / n
    return row


def sweep(model_name: str, editor: str, n_records: int, grid: dict[str, list]) -> pd.DataFrame:
    model, tok = models.load_model(model_name, device="cpu")
    known = counterfact.known_records(model, tok, counterfact.load_counterfact("toy-world"))
    chosen = experiments.evenly_spaced(known, n_records)
    cache = editing.EditCache.for_model(model)
    backend = default_backend()
    base = hparams.load_hparams(editor, model_name)
    out = results_dir(model_name, "sweeps") / f"{editor}.csv"
    rows = []
    for changes, hp in tqdm(list(settings(base, grid)), desc=f"{editor} on {model_name}"):
        row = {**{k: str(v) for k, v in changes.items()}, **measure(model, tok, chosen, hp, cache, backend)}
        rows.append(row)
        tqdm.write("  ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))
        # one row at a time, so that a sweep stopped part-way keeps the settings it finished
        pd.DataFrame([row]).assign(model=model_name, editor=editor, records=len(chosen)).to_csv(
            out, mode="a", header=not out.exists(), index=False)
    return pd.DataFrame(rows).assign(model=model_name, editor=editor, records=len(chosen))


def trace_table(model_name: str, n_records: int) -> pd.DataFrame:
    """The average indirect effect at the last subject token over `n_records` evenly spaced known
    records (ROME's noise over their subjects, 10 samples): the hidden state, MLP windows of 3 and 1
    (rows), per layer (columns); and the per-record peak layers of the 3-layer MLP window."""
    from wilke_lib.analysis import aie

    model, tok = models.load_model(model_name, device="cpu")
    known = counterfact.known_records(model, tok, counterfact.load_counterfact("toy-world"))
    chosen = experiments.evenly_spaced(known, n_records)
    rows, peaks = {}, None
    for label, kind, window in (("hidden state", "hidden", 1), ("MLP, window 3", "mlp", 3), ("MLP, window 1", "mlp", 1)):
        result = aie.average_indirect_effect(model, tok, chosen, kind=kind, window=window, use_target_true=True)
        rows[label] = result.aie
        if window == 3:
            peaks = aie.peak_layers(result).value_counts().sort_index()
    print("per-record peaks of the 3-layer MLP window (layer: records):",
          {int(layer): int(n) for layer, n in peaks.items()})
    return pd.DataFrame(rows).T.round(3)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model_name")
    parser.add_argument("--editor", default="rome", choices=sorted(hparams.HPARAMS_CLASSES))
    parser.add_argument("--records", type=int, default=20)
    parser.add_argument("--grid", nargs="*", default=[], help="key=v1,v2 (YAML values)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--trace", type=int, metavar="N", default=None,
                        help="instead of a sweep: the causal-tracing tables over N known records")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.trace:
        print(trace_table(args.model_name, args.trace).to_markdown())
        return
    frame = sweep(args.model_name, args.editor, args.records, parse_grid(args.grid))
    print(frame.to_string(index=False))


if __name__ == "__main__":
    main()
