"""Train the model organisms, or measure where they keep their facts (`analysis.organism_report`).

A command, at the top of the layers (docs/design.md): it drives the organisms and their report, an analysis.

    python -m wilke_lib.organisms train --all                 # = make organisms
    python -m wilke_lib.organisms train --name toy-gpt2 --epochs 5 --out /tmp/quick
    python -m wilke_lib.organisms train --name toy-gpt2 --epoch-budget 20   # resumable slices
    python -m wilke_lib.organisms train --name toy-gpt2-x4-w192 --time-budget 480 --device cuda
    python -m wilke_lib.organisms report --all                # = make organism-report
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import replace
from pathlib import Path

import pandas as pd
import torch

from wilke_lib.analysis.organism_report import REPORT_FILE, organism_report, target_table
from wilke_lib.organisms.train import ORGANISM_DIR, ORGANISMS, train
from wilke_lib.results import write_json_atomic


def print_report(reports: list[dict]) -> None:
    """A table: one row per measured key and target, one column per organism."""
    tables = [target_table(r).set_index(["key", "target"])["value"].rename(r["model"]) for r in reports]
    print(pd.concat(tables, axis=1).to_string())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=["train", "report"])
    parser.add_argument("--all", action="store_true", help="every organism")
    parser.add_argument("--name", choices=sorted(ORGANISMS), action="append", default=[])
    parser.add_argument("--epochs", type=int, help="train: override the number of epochs")
    parser.add_argument("--out", type=Path, help="train: output directory (default organisms/<name>)")
    parser.add_argument("--device", help="train: cpu or cuda (default: cuda when present)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (give 1 beside another job: two jobs that "
                        "each use every core slow each other down many times over)")
    parser.add_argument("--epoch-budget", type=int, help="train: stop after this many epochs (resumable: run "
                        "the same command again to go on from the checkpoint)")
    parser.add_argument("--time-budget", type=float, help="train: stop after the first epoch that ends this many "
                        "seconds after the start (resumable, as --epoch-budget)")
    args = parser.parse_args(argv)
    names = sorted(ORGANISMS) if args.all else args.name
    if not names:
        parser.error("give --all or --name")
    logging.basicConfig(level=logging.INFO)
    if args.command == "train":
        for name in names:
            cfg = ORGANISMS[name] if args.epochs is None else replace(ORGANISMS[name], epochs=args.epochs)
            out = args.out or ORGANISM_DIR / name
            summary = train(cfg, out, args.device, args.threads, args.epoch_budget, args.time_budget)
            if not summary["finished"]:
                print(f"{name}: stopped after epoch {summary['epoch']} of {summary['epochs']} "
                      f"({summary['train_seconds']:.0f} s so far); run again to resume from {summary['checkpoint']}")
                continue
            print(f"{name}: trained in {summary['train_seconds']:.0f} s, {summary['n_parameters'] / 1e6:.2f} M "
                  f"parameters, known-fact rate {summary['known_fact_rate']['all']:.1%} of {summary['n_facts']} "
                  f"facts -> {out}")
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    reports = []
    for name in names:
        report = organism_report(name)
        write_json_atomic(ORGANISM_DIR / name / REPORT_FILE, report)
        reports.append(report)
    print_report(reports)


if __name__ == "__main__":
    main()
