#!/usr/bin/env python
"""Benchmark the editors on the organisms: ms per edit, edits/s, peak memory, FLOPs (`make bench`).

For each model: ROME, MEMIT, WilKE with the batched layer search and WilKE with the released code's
one-layer-at-a-time search, all with ROME's optimisation settings (steps, prompts, prefixes), timed
over `--n-edits` known records after a warm-up edit (see `wilke_lib.bench` for what exactly
is measured). Writes `benchmarks/results/<device>/bench_<model>.csv` and, with `--scaling`, the time
per WilKE edit vs the number of candidate layers (`scaling_<model>.csv` / `.png`). Prints a table and
the ratios the project targets: on CPU the batched search >= 2.5x faster than one layer at a time on a
12-layer organism; on GPU one WilKE edit <= 1.5x one ROME edit.

    python benchmarks/bench_editors.py                                # both organisms, 10 edits
    python benchmarks/bench_editors.py --models toy-gpt2 --n-edits 5 --threads 2 --scaling
    python benchmarks/bench_editors.py --device cuda --scaling
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pandas as pd
import torch

from wilke_lib.bench import editors as bm
from wilke_lib.bench.measure import device_name
from wilke_lib.models import default_device


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["toy-gpt2", "toy-gptj"])
    parser.add_argument("--n-edits", type=int, default=10, help="timed edits per variant (after the warm-up)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed edits per variant first")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--device", default=None, help="cpu | cuda (default: the default device)")
    parser.add_argument("--variants", nargs="+", default=list(bm.VARIANTS), choices=list(bm.VARIANTS))
    parser.add_argument("--scaling", action="store_true", help="also time WilKE vs the number of candidate layers")
    parser.add_argument("--scaling-ks", nargs="+", type=int, default=[1, 2, 4, 8, 12])
    parser.add_argument("--scaling-edits", type=int, default=3, help="timed edits per point of the scaling curve")
    parser.add_argument("--no-flops", action="store_true", help="skip the FLOP count (one extra edit per variant)")
    parser.add_argument("--step-records", type=int, default=5, help="records timed through a whole lifelong step")
    parser.add_argument("--out", type=Path, default=None, help="results root (default benchmarks/results)")
    parser.add_argument("--merge", action="store_true",
                        help="keep the saved rows of the variants not run now (each row says when and at which "
                             "commit it was measured) in the CSVs and summary.json")
    args = parser.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device) if args.device else default_device()
    out_dir = bm.results_dir(device, args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    print(f"device: {device_name(device)}; results in {out_dir}", flush=True)
    status = 0
    tables, steps, optimisation = {}, {}, {}
    for model_name in args.models:
        loaded = bm.load_organism(model_name, device)
        table = bm.benchmark_editors(model_name, n_edits=args.n_edits, warmup=args.warmup, variants=args.variants,
                                     flops=not args.no_flops, loaded=loaded)
        tables[model_name] = table
        model, tok, records = loaded
        cache = bm.EditCache.for_model(model)
        originals = bm.original_weights(model)
        steps[model_name] = {v.name: bm.lifelong_step_ms(model, tok, records[:args.step_records], bm.variant_hparams(v),
                                                          cache, originals)
                             for v in bm.make_variants(model_name, args.variants)}
        variants = bm.make_variants(model_name, args.variants)
        optimisation[model_name] = bm.optimisation_ms(model, tok, [r["requested_rewrite"] for r in
                                                                   records[:args.warmup + args.n_edits]],
                                                      variants, cache, warmup=args.warmup)
        path = out_dir / f"bench_{Path(model_name).name}.csv"
        if args.merge:
            optimisation[model_name] = {**saved_optimisation(out_dir / "summary.json", model_name),
                                        **optimisation[model_name]}
            table, steps[model_name] = merge_saved(table, steps[model_name], path, out_dir / "summary.json",
                                                      model_name)
            tables[model_name] = table
        table.to_csv(path, index=False)
        print(f"\n{model_name} on {table['device_name'].iloc[0]} ({args.n_edits} edits per variant): {path}")
        print(bm.format_table(table))
        ratios = bm.summary_ratios(table)
        if "sequential_over_batched" in ratios:
            target = "(target on CPU: >= 2.5)" if device.type == "cpu" else ""
            print(f"  WilKE sequential / batched search: {ratios['sequential_over_batched']:.2f}x (ratio of medians), "
                  f"{ratios.get('sequential_over_batched_paired', float('nan')):.2f}x (median of per-record ratios) "
                  f"{target}")
        if "wilke_batched_over_rome" in ratios:
            target = "(target on GPU: <= 1.5)" if device.type == "cuda" else ""
            print(f"  one WilKE edit (batched) / one ROME edit: {ratios['wilke_batched_over_rome']:.2f} (medians), "
                  f"{ratios.get('wilke_batched_over_rome_paired', float('nan')):.2f} (paired) {target}")
        if args.scaling:
            scaling = bm.benchmark_scaling(model_name, ks=args.scaling_ks, n_edits=args.scaling_edits,
                                           warmup=args.warmup, loaded=loaded)
            spath = out_dir / f"scaling_{Path(model_name).name}.csv"
            scaling.to_csv(spath, index=False)
            rome = table.loc[table["variant"] == "rome", "median_ms"]
            fig = bm.plot_scaling(scaling, rome_ms=float(rome.iloc[0]) if len(rome) else None)
            fig.savefig(spath.with_suffix(".png"), dpi=150, bbox_inches="tight")
            wide = scaling.pivot(index="n_candidates", columns="search", values="median_ms")
            if {"batched", "sequential"} <= set(wide.columns):
                wide["sequential / batched"] = wide["sequential"] / wide["batched"]
            print(f"\n  time per WilKE edit (ms, median of {args.scaling_edits}) vs candidate layers: {spath}")
            print(wide.to_string(float_format=lambda x: f"{x:,.2f}"))
    summary = bm.summary_json(tables, steps, optimisation)
    path = out_dir / "summary.json"
    path.write_text(json.dumps(summary, indent=1))
    print(f"\nsummary ({path}):")
    for model_name, s in summary.items():
        print(f"  {model_name}: ROME's edit against the released code's path {s['rome_speedup_vs_previous']:.2f}x (target on CPU "
              f">= 2); WilKE / ROME time {s['wilke_over_rome']:.2f}, FLOPs {s['wilke_over_rome_flops']:.2f} (target: "
              f"time ratio <= 1.2 x FLOP ratio: {s['wilke_over_rome'] / s['wilke_over_rome_flops']:.2f})")
        if s.get("rome_optimisation_speedup"):
            o = s["optimisation_ms"]
            print(f"    ROME's delta optimisation alone: {o['rome-full']:.1f} ms as the released code (whole prompts, "
                  f"the modules), {o['rome']:.1f} ms on the block runner (prefix cache, fast blocks, fused GELU): {s['rome_optimisation_speedup']:.2f}x (target on CPU >= 2)")
        for editor, e in s["editors"].items():
            print(f"    {editor:17s} {e['ms_per_edit']:8.1f} ms/edit {e['ms_per_lifelong_step'] or float('nan'):8.1f} "
                  f"ms/step {e['gflop_per_edit']:8.2f} GFLOP/edit")
    return status


def saved_optimisation(summary_path: Path, model_name: str) -> dict[str, float]:
    """The optimisation timings of `model_name` in a saved summary ({} if none)."""
    if not summary_path.is_file():
        return {}
    return json.loads(summary_path.read_text()).get(model_name, {}).get("optimisation_ms", {}) or {}


def merge_saved(table, steps: dict[str, float], csv_path: Path, summary_path: Path, model_name: str):
    """(table, lifelong-step ms) with the saved rows of the variants not in `table` added back, in
    `VARIANTS` order: a benchmark of some variants updates theirs and keeps the others' (with their
    own date and commit)."""
    if not csv_path.is_file():
        return table, steps
    saved = pd.read_csv(csv_path)
    kept = saved[~saved["variant"].isin(table["variant"])]
    merged = pd.concat([kept, table], ignore_index=True)
    order = {v: i for i, v in enumerate(bm.VARIANTS)}
    merged = merged.sort_values("variant", key=lambda c: c.map(lambda v: order.get(v, len(order))), kind="stable")
    saved_steps = {}
    if summary_path.is_file():
        editors = json.loads(summary_path.read_text()).get(model_name, {}).get("editors", {})
        saved_steps = {v: e.get("ms_per_lifelong_step") for v, e in editors.items() if v in set(kept["variant"])}
    rome = merged.loc[merged["variant"] == "rome", "median_ms"]
    if len(rome) and "time_vs_rome" in merged.columns:
        merged["time_vs_rome"] = merged["median_ms"] / float(rome.iloc[0])
    return merged.reset_index(drop=True), {**saved_steps, **steps}


if __name__ == "__main__":
    import matplotlib

    matplotlib.use("Agg")
    sys.exit(main())
