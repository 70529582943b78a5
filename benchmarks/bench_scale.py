#!/usr/bin/env python
"""ROME, MEMIT and WilKE's layer search at a real model's size (`make bench-scale`, issue #33).

A randomly initialised float32 model of GPT2-XL's shape (48 layers, d_model 1,600, MLP 6,400,
vocabulary 50,257; built from a GPT2Config, nothing downloaded), or GPT-J-6B's with --shape gptj,
edited with the editors' gpt2-xl / gpt-j-6b settings and a fixed number of optimisation steps (early
stopping off), the delta runners "prefix-cache" and "full" side by side, and the released ROME code's
compute_v (--released-rome PATH, a local checkout of github.com/kmeng01/rome). The statistics C come
from a small synthetic corpus. See `wilke_lib.bench.scale` for what exactly is measured.

Prints a table and writes benchmarks/results/scale-<device>.csv (the rows of other shapes in it are
kept) and scale-<device>.png.

    python benchmarks/bench_scale.py                                    # GPT2-XL shape, every variant
    python benchmarks/bench_scale.py --released-rome ~/src/rome --steps 5 --n-edits 2 \\
        --variants rome rome-full memit memit-full wilke-batched rome-released --wilke-layers 13..17
    python benchmarks/bench_scale.py --shape gptj --device cuda --released-rome ~/src/rome
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

from wilke_lib.bench import scale as sc
from wilke_lib.bench.measure import device_name, provenance
from wilke_lib.editors.cache import EditCache
from wilke_lib.hparams import parse_layers
from wilke_lib.models import default_device
from wilke_lib.results import REPO_ROOT

DEFAULT_VARIANTS = [v for v in sc.VARIANTS]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="gpt2-xl", help=f"one of {sorted(sc.SHAPES)} (default gpt2-xl)")
    parser.add_argument("--device", default=None, help="cpu | cuda (default: the default device)")
    parser.add_argument("--variants", nargs="+", default=DEFAULT_VARIANTS,
                        help=f"of {list(sc.VARIANTS)} (default: all; rome-released only with --released-rome)")
    parser.add_argument("--released-rome", type=Path, default=None, metavar="PATH",
                        help="a local checkout of github.com/kmeng01/rome: adds the released compute_v column")
    parser.add_argument("--steps", type=int, default=20, help="fixed optimisation steps per edit (default 20)")
    parser.add_argument("--n-edits", type=int, default=3, help="timed edits per variant (default 3)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed warm-up edits per variant first (default 1)")
    parser.add_argument("--warmup-steps", type=int, default=1, help="optimisation steps of a warm-up edit (default 1)")
    parser.add_argument("--wilke-layers", default=None,
                        help="WilKE's candidate layers, e.g. 13..17 (default: the settings file's, 0..23 on GPT2-XL)")
    parser.add_argument("--corpus-texts", type=int, default=256, help="texts of the synthetic statistics corpus")
    parser.add_argument("--corpus-words", type=int, default=16, help="words (tokens) per corpus text")
    parser.add_argument("--mom2-ridge", type=float, default=1e-2,
                        help="ridge added to C (times mean diag C): the corpus has fewer positions than the MLP width")
    parser.add_argument("--stats-chunk", type=int, default=8, help="layers per pass over the corpus")
    parser.add_argument("--stats-dir", type=Path, default=None,
                        help="keep the statistics there between runs (default: a temporary directory)")
    parser.add_argument("--memory-limit-gib", type=float, default=None,
                        help="refuse to start above this estimate (default: the memory available)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="results folder (default benchmarks/results)")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    if args.shape not in sc.SHAPES:
        parser.error(f"unknown shape {args.shape!r}; expected one of {sorted(sc.SHAPES)}")
    unknown = [v for v in args.variants if v not in sc.VARIANTS]
    if unknown:
        parser.error(f"unknown variant(s) {unknown}; expected some of {list(sc.VARIANTS)}")
    if args.released_rome is not None and not args.released_rome.expanduser().is_dir():
        parser.error(f"--released-rome {args.released_rome}: no such directory (expected a local checkout of "
                     "https://github.com/kmeng01/rome)")
    for name in ("steps", "n_edits", "warmup_steps", "corpus_texts", "corpus_words", "stats_chunk"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.warmup < 0 or args.mom2_ridge < 0:
        parser.error("--warmup and --mom2-ridge must be >= 0")
    try:
        args.wilke_layers = parse_layers(args.wilke_layers, "--wilke-layers")
    except ValueError as err:
        parser.error(str(err))
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device) if args.device else default_device()
    if device.type == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but no CUDA device is available", file=sys.stderr)
        return 2
    shape = sc.get_shape(args.shape)
    variants = [sc.VARIANTS[v] for v in dict.fromkeys(args.variants)]
    if args.released_rome is None:
        if any(v.editor == "rome-released" for v in variants):
            print("released ROME: no --released-rome PATH given, so the released code's column is skipped (give a "
                  "local checkout of https://github.com/kmeng01/rome to add it)", flush=True)
        variants = [v for v in variants if v.editor != "rome-released"]
    if not variants:
        print("error: no variant to run", file=sys.stderr)
        return 2
    out_dir = args.out or REPO_ROOT / "benchmarks" / "results"
    tmp = tempfile.TemporaryDirectory(prefix="bench-scale-")
    stats_dir = args.stats_dir or Path(tmp.name) / "stats"
    corpus = sc.synthetic_corpus(stats_dir / "corpus" / f"synthetic-v{shape.vocab_size}-n{args.corpus_texts}"
                                 f"-w{args.corpus_words}-s{args.seed}.txt", shape.vocab_size, args.corpus_texts,
                                 args.corpus_words, args.seed)
    settings = sc.Settings(steps=args.steps, corpus=corpus, n_texts=args.corpus_texts,
                           max_length=args.corpus_words + 8, ridge=args.mom2_ridge, wilke_layers=args.wilke_layers)
    try:
        hps = [sc.variant_hparams(v, shape, settings) for v in variants]
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2

    # 1. will it fit? (before allocating anything)
    n_params = shape.n_parameters()
    estimate = sc.memory_estimate(shape, settings, variants, n_params, args.stats_chunk)
    available, where = sc.available_memory(device)
    limit = args.memory_limit_gib * sc.GIB if args.memory_limit_gib else available
    if args.memory_limit_gib:
        where = f"--memory-limit-gib ({available / sc.GIB:.1f} GiB are available)"
    print(f"shape {shape.name}: {shape.n_layers} layers, d_model {shape.d_model:,}, MLP {shape.d_mlp:,}, vocabulary "
          f"{shape.vocab_size:,}{', rotary' if shape.rotary_dim else ''}: {n_params / 1e9:.3f} B parameters, "
          f"{n_params * 4 / sc.GIB:.2f} GiB in float32; estimated need {estimate['total'] / sc.GIB:.1f} GiB, "
          f"{where}: {limit / sc.GIB:.1f} GiB", flush=True)
    try:
        sc.check_fits(shape, estimate, limit, where)
    except sc.DoesNotFit as err:
        print(f"error: {err}", file=sys.stderr)
        return 3

    released = None
    if args.released_rome is not None:
        try:
            released = sc.load_released_rome(args.released_rome, device)
        except FileNotFoundError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        patched = (f"; its hard-coded \"cuda\" replaced by {released.patched_device!r} in memory"
                   if released.patched_device else "")
        print(f"released ROME: compute_v from {released.path} (revision {released.revision}){patched}", flush=True)

    # 2. model, tokenizer, statistics
    print(f"device: {device_name(device)}; steps per edit: {args.steps} (fixed, early stopping off); "
          f"{args.n_edits} timed edits per variant after {args.warmup} warm-up edit(s) of {args.warmup_steps} step(s)",
          flush=True)
    before = sc.current_mib(device)
    start = time.perf_counter()
    model = sc.build_model(shape, device, args.seed)
    for p in model.parameters():
        p.requires_grad_(False)
    tok = sc.build_tokenizer(shape.vocab_size, shape.n_positions)
    model_mib = n_params * 4 / 2 ** 20
    print(f"  model built in {time.perf_counter() - start:.0f} s; memory {before:,.0f} -> {sc.current_mib(device):,.0f} "
          f"MiB (weights {model_mib:,.0f} MiB)", flush=True)
    cache = EditCache.for_model(model, stats_dir=stats_dir / "cache")
    cache.progress = not args.no_progress
    plan = sc.Plan(shape=shape, device=device, variants=variants, settings=settings, n_edits=args.n_edits,
                   warmup=args.warmup, warmup_steps=args.warmup_steps, seed=args.seed, stats_chunk=args.stats_chunk,
                   released=released)
    start = time.perf_counter()
    rows = sc.run(plan, model, tok, cache, progress=not args.no_progress)
    wall = time.perf_counter() - start
    memory_end = sc.current_mib(device)

    # 3. table, CSV, figure
    extra = {"device": device.type, "device_name": device_name(device), "threads": torch.get_num_threads(),
             "n_params": n_params, "corpus_texts": args.corpus_texts, "corpus_words": args.corpus_words,
             "mom2_ridge": args.mom2_ridge, "wilke_candidates": " ".join(map(str, next(
                 (hp.candidate_layers for hp in hps if hasattr(hp, "candidate_layers")), []))),
             "released_revision": released.revision if released else "", **provenance()}
    summary = sc.summarise(rows, plan, model_mib, extra)
    out_dir.mkdir(parents=True, exist_ok=True)
    csv_path = out_dir / f"scale-{device.type}.csv"
    saved = save_csv(summary, csv_path, shape.name, args.steps)
    print(f"\n{shape.name} shape on {device_name(device)}, {args.steps} steps per edit, median of {args.n_edits} edits "
          f"({wall / 60:.0f} min of benchmarking): {csv_path}")
    print(sc.format_table(summary))
    print(f"  seconds per edit (whole edit: keys, optimisation, update); s_per_step: one more optimisation step "
          f"(timed edits against the {args.warmup_steps}-step warm-up edits), fixed_s: the rest of an edit, "
          f"at_{sc.REFERENCE_STEPS}_steps_s: extrapolated to the released settings' {sc.REFERENCE_STEPS} steps; "
          "compute_v: the released code's optimisation alone; peak: memory above the memory before the edit; "
          "growth: after - before the edit (MiB)")
    report_ratios(summary)
    print(f"  memory held: {memory_end:,.0f} MiB at the end (weights {model_mib:,.0f} MiB); largest peak above the "
          f"memory before an edit {max(r['peak_above_before_mib'] for r in summary):,.0f} MiB "
          f"({max(r['peak_above_before_mib'] for r in summary) / model_mib:.2f} x the weights)")
    png = csv_path.with_suffix(".png")
    shown = saved[saved["shape"] == shape.name].to_dict("records")  # every step count measured at this shape
    step_counts = sorted({int(r["steps"]) for r in shown})
    steps_text = " and ".join(map(str, step_counts))
    title = (f"{shape.name} shape (random weights, {n_params / 1e9:.2f} B parameters, float32), "
             f"{steps_text} optimisation steps per edit\non {device_name(device)}")
    fig = sc.plot(shown, title)
    fig.savefig(png, dpi=130, bbox_inches="tight")
    edits = " / ".join(sorted({str(int(r["n_edits"])) for r in shown}))
    print(f"\nFigure ({png}): seconds per edit (median of {edits} edits, bars min to max) and peak memory above "
          f"the memory before the edit for each editor and delta runner (blue: prefix cache, orange: whole prompts "
          f"through the whole model, grey: the released ROME code), on a randomly initialised model of "
          f"{shape.name}'s shape with {steps_text} fixed optimisation steps; the dashed line is the size of the "
          f"model's weights.")
    tmp.cleanup()
    return 0


def save_csv(summary: list[dict], path: Path, shape: str, steps: int):
    """Write the summary, keeping the saved rows of other shapes or step counts; returns the whole table."""
    import pandas as pd

    table = pd.DataFrame(summary)
    if path.is_file():
        saved = pd.read_csv(path)
        if {"shape", "steps"} <= set(saved.columns):
            kept = saved[(saved["shape"] != shape) | (saved["steps"] != steps)]
            table = pd.concat([kept, table], ignore_index=True)
    table.to_csv(path, index=False)
    return table


def report_ratios(summary: list[dict]) -> None:
    by = {r["variant"]: r for r in summary}
    for editor in ("rome", "memit", "wilke-sequential"):
        if editor in by and f"{editor}-full" in by:
            full, cached = by[editor + "-full"], by[editor]
            print(f"  {editor}: whole prompts / prefix cache {full['median_s'] / cached['median_s']:.2f}x per edit, "
                  f"{full['s_per_step'] / cached['s_per_step']:.2f}x per optimisation step")
    if "rome-released" in by:
        r = by["rome-released"]
        for ours in ("rome", "rome-full"):
            if ours in by:
                print(f"  released ROME edit / ours ({ours}): {r['median_s'] / by[ours]['median_s']:.2f}x "
                      f"(released compute_v alone {r['compute_v_median_s']:.1f} s of {r['median_s']:.1f} s)")
    if "wilke-batched" in by and "rome" in by:
        w = by["wilke-batched"]
        print(f"  WilKE (batched, {w['layers_optimised']} candidates) / ROME: {w['median_s'] / by['rome']['median_s']:.2f}x")


if __name__ == "__main__":
    import matplotlib

    matplotlib.use("Agg")
    sys.exit(main())
