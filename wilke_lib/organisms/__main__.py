"""Train the model organisms, or measure where they keep their facts.

    python -m wilke_lib.organisms train --all                 # = make organisms
    python -m wilke_lib.organisms train --name toy-gpt2 --epochs 5 --out /tmp/quick
    python -m wilke_lib.organisms report --all                # = make organism-report
"""

from __future__ import annotations

import argparse
import logging
import math
from dataclasses import replace
from pathlib import Path

from wilke_lib.organisms.report import organism_report
from wilke_lib.organisms.train import ORGANISM_DIR, ORGANISMS, train
from wilke_lib.results import write_json_atomic

REPORT_FILE = "report.json"
TARGETS = (  # issue 12: (key, description, test)
    ("known_rate", ">= 0.90", lambda r: r["known_rate"] >= 0.9),
    ("n_known", ">= 2560", lambda r: r["n_known"] >= 2560),
    ("subject_state_recovery_median", ">= 0.5", lambda r: r["subject_state_recovery_median"] >= 0.5),
    ("causal_peak_median", "in layers 2-8 of 12", lambda r: 2 * r["layers"] / 12 <= r["causal_peak_median"] <= 8 * r["layers"] / 12),
    ("causal_peak_distinct", ">= 4", lambda r: r["causal_peak_distinct"] >= 4),
    ("causal_peak_top_share", "<= 0.60", lambda r: r["causal_peak_top_share"] <= 0.6),
    ("rome_success", ">= 0.90", lambda r: r["rome_success"] >= 0.9),
    ("rome_clamp_factor", "<= 8", lambda r: r["rome_clamp_factor"] <= 8),
    ("rome_steps", "<= 40", lambda r: r["rome_steps"] <= 40),
    ("last_token_recall", ">= 0.90", lambda r: r["last_token_recall"] >= 0.9),
)


def print_report(reports: list[dict]) -> None:
    """A table: one row per measured key and target, one column per organism."""
    names = [r["model"] for r in reports]
    print("| key | target | " + " | ".join(names) + " |")
    print("|---|---|" + "---|" * len(names))
    for key in ("n_facts", "layers", "d_model", "train_seconds", "n_traced", "rome_layer"):
        print(f"| {key} | | " + " | ".join(str(r.get(key)) for r in reports) + " |")
    for key, target, test in TARGETS:
        cells = []
        for r in reports:
            value = r.get(key)
            shown = f"{value:.3g}" if isinstance(value, float) and not math.isnan(value) else str(value)
            cells.append(f"{shown} {'ok' if test(r) else 'MISSED'}")
        print(f"| {key} | {target} | " + " | ".join(cells) + " |")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=["train", "report"])
    parser.add_argument("--all", action="store_true", help="every organism")
    parser.add_argument("--name", choices=sorted(ORGANISMS), action="append", default=[])
    parser.add_argument("--epochs", type=int, help="train: override the number of epochs")
    parser.add_argument("--out", type=Path, help="train: output directory (default organisms/<name>)")
    parser.add_argument("--device", help="train: cpu or cuda (default: cuda when present)")
    parser.add_argument("--threads", type=int, help="train: torch CPU threads")
    args = parser.parse_args(argv)
    names = sorted(ORGANISMS) if args.all else args.name
    if not names:
        parser.error("give --all or --name")
    logging.basicConfig(level=logging.INFO)
    if args.command == "train":
        for name in names:
            cfg = ORGANISMS[name] if args.epochs is None else replace(ORGANISMS[name], epochs=args.epochs)
            out = args.out or ORGANISM_DIR / name
            summary = train(cfg, out, args.device, args.threads)
            print(f"{name}: trained in {summary['train_seconds']:.0f} s, {summary['n_parameters'] / 1e6:.2f} M "
                  f"parameters, known-fact rate {summary['known_fact_rate']['all']:.1%} of {summary['n_facts']} "
                  f"facts -> {out}")
        return
    reports = []
    for name in names:
        report = organism_report(name)
        write_json_atomic(ORGANISM_DIR / name / REPORT_FILE, report)
        reports.append(report)
    print_report(reports)


if __name__ == "__main__":
    main()
