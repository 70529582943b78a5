"""Speed of the editors: ms per edit, edits/s, peak memory, FLOPs, and WilKE's search cost.

Used by `benchmarks/bench_editors.py` (what `make bench` runs) and `notebooks/10_performance.ipynb`.
Per organism and editor variant (ROME, MEMIT, WilKE with the batched search, WilKE with the released
code's one-layer-at-a-time search): the wall time of `n_edits` edits of known records after `warmup`
untimed ones, each applied to the unedited model; the variants are interleaved (record 1 by every
variant, then record 2, ..., the order rotating) so that load changes on a shared machine hit all of
them alike; then the peak memory and the counted FLOPs of one edit in untimed runs
(`bench.measure`). Statistics C and C^-1 of every layer are computed before timing (once per model,
as ROME does).

Every variant uses ROME's delta-optimisation settings (steps, learning rate, early stopping, prompts,
context prefixes, statistics): `aligned_hparams` copies them from the ROME file into the MEMIT and
WilKE settings; the editors' own settings (layers, clamp, MEMIT's lambda, WilKE's candidates and
score) stay as in their files.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import pandas as pd
import torch
from torch import nn

from wilke_lib import counterfact, editing
from wilke_lib.arch import ModelAdapter, model_device
from wilke_lib.bench.tables import format_table, summary_json, summary_ratios  # noqa: F401 (bm.* for the notebook)
from wilke_lib.bench.measure import (PeakMemory, count_flops, device_name, original_weights, provenance, sync,
                                     timed_edit)
from wilke_lib.editors.cache import EditCache
from wilke_lib.editors import rome as rome_lib
from wilke_lib.editors import wilke as wilke_editor_module
from wilke_lib.editors.common import WeightJournal
from wilke_lib.editors.delta import compute_keys
from wilke_lib.editors.wilke import wilke_editor
from wilke_lib.editors.ke import load_ke
from wilke_lib.editors.mend import load_mend
from wilke_lib.hparams import KEHParams, MENDHParams, WilKEHParams, load_hparams
from wilke_lib.lifelong import default_backend
from wilke_lib.metrics import answers_true, evaluate_edit
from wilke_lib.models import load_model
from wilke_lib.results import REPO_ROOT, model_slug

SHARED_FIELDS = ("v_num_grad_steps", "v_lr", "v_weight_decay", "v_weight_decay_form", "kl_factor",
                 "v_early_stop_loss", "essence_template", "fact_token", "context_lengths", "context_seed",
                 "context_top_k", "context_prefixes", "mom2_corpus", "mom2_n_samples", "mom2_batch_size",
                 "mom2_max_length", "mom2_dtype", "mom2_ridge")
"""Delta-optimisation and statistics settings every benchmarked variant takes from ROME's file."""

VARIANTS = ("rome", "rome-full", "memit", "wilke-batched", "wilke-sequential", "comeba-hk", "lemoe", "mend", "ke")
"""rome-full: ROME's delta optimisation without the prefix cache (every step runs the whole prompts
through the whole model, as the released code), the reference of `rome_speedup_vs_previous`.
comeba-hk (MEMIT's targets into hook layers, whole prompts) and lemoe (one expert trained by gradient
descent) edit the unedited model too: each timed edit starts from an empty editor state. mend and ke
(trained hypernetworks, loaded once before timing) time one gradient and one pass of the editor network."""



# ---- variants ---------------------------------------------------------------------------------

@dataclass
class BenchVariant:
    """One benchmarked editor: its name, editor settings and (WilKE) search kind."""

    name: str
    hparams: Any
    search: str | None = None  # WilKE: "batched" | "sequential"

    def candidate_layers(self, n_layers: int) -> list[int]:
        """The layers whose delta this variant optimises."""
        hp = self.hparams
        if isinstance(hp, WilKEHParams):
            return list(hp.candidate_layers) if hp.candidate_layers is not None else list(range(n_layers))
        if hasattr(hp, "layers"):
            return [hp.layers[-1]]  # MEMIT optimises one delta, at its last layer
        return [hp.layer]


def aligned_hparams(model_name: str) -> dict[str, Any]:
    """{"rome", "memit", "wilke"} settings of `model_name`, the latter two with ROME's SHARED_FIELDS."""
    rome = load_hparams("rome", model_name)
    shared = {f: getattr(rome, f) for f in SHARED_FIELDS}
    return {"rome": rome,
            "memit": dataclasses.replace(load_hparams("memit", model_name), **shared),
            "wilke": dataclasses.replace(load_hparams("wilke", model_name), **shared),
            "comeba-hk": dataclasses.replace(load_hparams("comeba_hk", model_name), **shared),
            "lemoe": load_hparams("lemoe", model_name),
            "mend": load_hparams("mend", model_name), "ke": load_hparams("ke", model_name)}


def make_variants(model_name: str, names: Sequence[str] = VARIANTS,
                  candidate_layers: Sequence[int] | None = None) -> list[BenchVariant]:
    """The benchmarked variants; `candidate_layers` overrides WilKE's search range."""
    hps = aligned_hparams(model_name)
    wilke = hps["wilke"]
    if candidate_layers is not None:
        wilke = dataclasses.replace(wilke, candidate_layers=list(candidate_layers))
    out = []
    for name in names:
        if name in ("rome", "memit", "comeba-hk", "lemoe", "mend", "ke"):
            out.append(BenchVariant(name, hps[name]))
        elif name == "rome-full":
            out.append(BenchVariant(name, dataclasses.replace(hps["rome"], delta_runner="full")))
        elif name in ("wilke-batched", "wilke-sequential"):
            out.append(BenchVariant(name, wilke, search=name.split("-")[1]))
        else:
            raise ValueError(f"unknown variant {name!r}; expected one of {VARIANTS}")
    return out


def variant_hparams(variant: BenchVariant) -> Any:
    """The settings to pass to `edit`: WilKE's with `search` set to the variant's search."""
    hp = variant.hparams
    if variant.search is not None:
        hp = dataclasses.replace(hp, search=variant.search)
    return hp


def prepare_statistics(model: nn.Module, tok, variants: Sequence[BenchVariant], cache: EditCache) -> None:
    """Context prefixes, C and C^-1 of every layer a variant may touch, computed before any timing."""
    n_layers = ModelAdapter(model).n_layers
    for variant in variants:
        hp = variant.hparams
        if isinstance(hp, MENDHParams):
            load_mend(model, hp)  # the network is loaded once, as in a lifelong run, not timed
        elif isinstance(hp, KEHParams):
            load_ke(model, hp)
        if not hasattr(hp, "mom2_corpus"):  # LEMoE, MEND, KE: no statistics, no prefixes
            continue
        cache.get_prefixes(model, tok, hp)
        layers = (list(hp.layers) if hasattr(hp, "layers") and hp.layers is not None
                  else variant.candidate_layers(n_layers))
        cache.get_mom2(model, tok, layers, hp)
        if not hasattr(hp, "mom2_update_weight"):  # ROME / WilKE invert C; MEMIT solves its own system
            for l in layers:
                cache.get_mom2_inv(model, tok, l, hp)


# ---- the benchmarks -----------------------------------------------------------------------------

def load_organism(model_name: str, device: str | torch.device | None = None) -> tuple[nn.Module, Any, list[dict]]:
    """(model, tok, known records of the first 200 records of the model's world) on `device`."""
    model, tok = load_model(model_name, device=device)
    records = counterfact.known_records(model, tok, counterfact.load_counterfact("toy-world")[:200])
    return model, tok, records


def benchmark_editors(model_name: str, *, n_edits: int = 10, warmup: int = 1, device: str | None = None,
                      variants: Sequence[str] = VARIANTS, flops: bool = True, memory: bool = True,
                      loaded: tuple | None = None, log: Callable[[str], None] | None = print):
    """The main table: one row per variant (a pandas DataFrame); see the module docstring."""
    model, tok, records = loaded if loaded is not None else load_organism(model_name, device)
    dev = model_device(model)
    if len(records) < warmup + n_edits:
        raise ValueError(f"{model_name}: {len(records)} known records, {warmup + n_edits} needed")
    chosen = [r["requested_rewrite"] for r in records[: warmup + n_edits]]
    adapter = ModelAdapter(model)
    todo = make_variants(model_name, variants)
    cache = EditCache.for_model(model)
    prepare_statistics(model, tok, todo, cache)
    originals = original_weights(model)
    for variant in todo:  # warm-up
        for request in chosen[:warmup]:
            timed_edit(model, tok, request, variant_hparams(variant), cache, originals)
    # 1. timing, interleaved: every record is edited by every variant in turn (the order rotating), so
    #    that a change in the load of a shared machine hits every variant alike
    timings: dict[str, tuple[list[float], list[int]]] = {v.name: ([], []) for v in todo}
    for n, request in enumerate(chosen[warmup:]):
        for variant in todo[n % len(todo):] + todo[:n % len(todo)]:
            seconds, result = timed_edit(model, tok, request, variant_hparams(variant), cache, originals)
            timings[variant.name][0].append(seconds)
            timings[variant.name][1].append(result.layers[-1])
    if log:
        for variant in todo:
            times = timings[variant.name][0]
            log(f"  {model_name} {variant.name:17s} median {1000 * statistics.median(times):8.1f} ms"
                f"  ({len(times)} edits)")
    rows = []
    for variant in todo:  # 2. peak memory and FLOPs of one edit, in untimed runs
        peak = PeakMemory(dev)
        if memory:
            with peak:
                timed_edit(model, tok, chosen[warmup], variant_hparams(variant), cache, originals)
        counted = count_flops(model, tok, chosen[warmup], variant_hparams(variant), cache, originals) if flops else float("nan")
        times, layers = timings[variant.name]
        median = statistics.median(times)
        hp = variant.hparams
        rows.append({
            "model": model_name, "variant": variant.name, "device": dev.type, "device_name": device_name(dev),
            "threads": torch.get_num_threads(), "n_layers": adapter.n_layers,
            "layers_optimised": len(variant.candidate_layers(adapter.n_layers)),
            "n_prompts": len(cache.get_prefixes(model, tok, hp)) + 1 if hasattr(hp, "context_lengths") else 1,
            "max_steps": getattr(hp, "v_num_grad_steps", getattr(hp, "steps", 0)),
            "n_edits": len(times), "median_ms": 1000 * median, "min_ms": 1000 * min(times),
            "max_ms": 1000 * max(times), "edits_per_s": 1 / median, "peak_mem_mib": peak.mib,
            "mem_method": peak.method, "gflop_per_edit": counted / 1e9,
            "achieved_gflops": counted / 1e9 / median, "edited_layers": " ".join(map(str, layers)),
            "times_ms": " ".join(f"{1000 * t:.1f}" for t in times), **provenance()})
    table = pd.DataFrame(rows)
    rome = table.loc[table["variant"] == "rome", "median_ms"]
    table["time_vs_rome"] = table["median_ms"] / rome.iloc[0] if len(rome) else float("nan")
    return table


OPTIMISED = ("rome", "rome-full")
"""The variants whose delta optimisation `optimisation_ms` times alone."""


def optimisation_ms(model: nn.Module, tok, requests: Sequence[dict], variants: Sequence[BenchVariant],
                    cache: EditCache, warmup: int = 1) -> dict[str, float]:
    """Median ms of ROME's delta optimisation alone (`rome.compute_v`, ROME Eq. 4: with the prefix cache
    for "rome", the whole prompts through the whole model for "rome-full"), the part of an edit the
    prefix cache changes; the keys, C^-1 and the update are computed outside the timing. Interleaved as
    `benchmark_editors` (the order alternating per record); {} unless a variant of `OPTIMISED` is given."""
    chosen = [v for v in variants if v.name in OPTIMISED]
    if not chosen:
        return {}
    dev = model_device(model)
    prepared = []
    for request in requests:
        hp = chosen[0].hparams
        prefixes = cache.get_prefixes(model, tok, hp)
        prepared.append((request, prefixes, compute_keys(model, tok, request, [hp.layer], hp, prefixes)[hp.layer]))
    times: dict[str, list[float]] = {v.name: [] for v in chosen}
    for n, (request, prefixes, keys) in enumerate(prepared):
        for variant in (chosen if n % 2 == 0 else chosen[::-1]):
            hp = variant.hparams
            sync(dev)
            start = time.perf_counter()
            rome_lib.compute_v(model, tok, request, hp.layer, keys, hp, prefixes)
            sync(dev)
            if n >= warmup:
                times[variant.name].append(time.perf_counter() - start)
    return {name: 1000 * statistics.median(t) for name, t in times.items() if t}


def lifelong_step_ms(model: nn.Module, tok, records: Sequence[dict], hparams: Any, cache: EditCache,
                     originals) -> float:
    """Median ms of one step of the lifelong protocol (edit, ES/PS/NS, rollback, rollback success) on
    the unedited model (the weights are put back after each step)."""
    backend = default_backend()
    times = []
    for record in records:
        sync(model_device(model))
        start = time.perf_counter()
        result = editing.edit(model, tok, record["requested_rewrite"], hparams, cache=cache, keep_deltas=False)
        evaluate_edit(backend, model, tok, record, 64)
        editing.rollback(model, tok, record["requested_rewrite"], hparams, result, cache=cache, keep_deltas=False)
        answers_true(backend, model, tok, [record], 64, with_paraphrases=True)
        sync(model_device(model))
        times.append(time.perf_counter() - start)
        originals.restore()
    return 1000 * statistics.median(times)


def benchmark_scaling(model_name: str, *, ks: Sequence[int] = (1, 2, 4, 8, 12), n_edits: int = 3, warmup: int = 1,
                      device: str | None = None, searches: Sequence[str] = ("batched", "sequential"),
                      loaded: tuple | None = None, log: Callable[[str], None] | None = print):
    """Time per WilKE edit vs the number of candidate layers (the first k layers whose MLP writes: the
    organisms have none in layers 0-1), per search kind."""
    model, tok, records = loaded if loaded is not None else load_organism(model_name, device)
    dev = model_device(model)
    wilke_hp = dataclasses.replace(load_hparams("wilke", model_name), candidate_layers=None)
    writing = wilke_editor_module.candidate_layers(model, wilke_hp)  # WilKE's rule: every layer whose MLP writes
    n_layers = len(writing)
    chosen = [r["requested_rewrite"] for r in records[: warmup + n_edits]]
    cache = EditCache.for_model(model)
    originals = original_weights(model)
    all_layers = make_variants(model_name, ["wilke-batched"], candidate_layers=writing)
    prepare_statistics(model, tok, all_layers, cache)
    points = []
    for k in ks:
        k = min(int(k), n_layers)
        for search in searches:
            variant = make_variants(model_name, [f"wilke-{search}"], candidate_layers=writing[:k])[0]
            points.append((k, search, variant))
            for request in chosen[:warmup]:
                timed_edit(model, tok, request, variant_hparams(variant), cache, originals)
    times: dict[tuple[int, str], list[float]] = {(k, s): [] for k, s, _ in points}
    for n, request in enumerate(chosen[warmup:]):  # interleaved, as in benchmark_editors
        for k, search, variant in points[n % len(points):] + points[:n % len(points)]:
            times[(k, search)].append(timed_edit(model, tok, request, variant_hparams(variant), cache, originals)[0])
    rows = []
    for k, search, _ in points:
        t = times[(k, search)]
        median = statistics.median(t)
        rows.append({"model": model_name, "device": dev.type, "device_name": device_name(dev),
                     "threads": torch.get_num_threads(), "n_candidates": k, "search": search,
                     "n_edits": len(t), "median_ms": 1000 * median, "min_ms": 1000 * min(t),
                     "max_ms": 1000 * max(t), **provenance()})
        if log:
            log(f"  {model_name} {k:2d} layers {search:10s} median {1000 * median:8.1f} ms")
    return pd.DataFrame(rows)


def plot_scaling(table, ax=None, rome_ms: float | None = None):
    """Time per WilKE edit vs the number of candidate layers, one line per search kind."""
    if ax is None:
        _, ax = plt.subplots(figsize=(5, 3.2))
    for search, part in table.groupby("search"):
        part = part.sort_values("n_candidates")
        ax.errorbar(part["n_candidates"], part["median_ms"] / 1000,
                    yerr=[(part["median_ms"] - part["min_ms"]) / 1000, (part["max_ms"] - part["median_ms"]) / 1000],
                    marker="o", capsize=3, label=f"WilKE, {search} search")
    if rome_ms is not None:
        ax.axhline(rome_ms / 1000, color="grey", ls="--", lw=1, label="one ROME edit")
    model = table["model"].iloc[0]
    ax.set(xlabel="candidate layers searched", ylabel="seconds per edit (median)",
           title=f"{model} on {table['device'].iloc[0]}")
    ax.set_xticks(sorted(table["n_candidates"].unique()))
    ax.legend(frameon=False)
    return ax.figure


def time_breakdown(model: nn.Module, tok, request: dict, model_name: str, *, cache: EditCache | None = None,
                   candidate_layers: Sequence[int] | None = None, warmup: bool = True):
    """Seconds per phase of one WilKE edit with the batched search (a pandas Series; after a warm-up edit
    unless warmup=False).

    Phases: context prefixes and statistics (cached: ~0), keys (one pass), prefix pass (KV cache of
    the tokens before the fact token), block runner set-up (two recorded unpatched passes), unpatched
    pass (v0, reference log-probs), forward / backward / optimizer step of the delta optimisation
    (all steps), norms and scores (spectral / Frobenius norms, v*), other (the rest of the edit:
    ROME's rank-one update at the chosen layer and applying it)."""
    variant = make_variants(model_name, ["wilke-batched"], candidate_layers=candidate_layers)[0]
    cache = cache if cache is not None else EditCache.for_model(model)
    prepare_statistics(model, tok, [variant], cache)
    dev = model_device(model)
    profile: dict[str, float] = {}
    for attempt in range(2 if warmup else 1):  # the first of two runs warms up
        profile.clear()
        journal = WeightJournal(ModelAdapter(model))
        sync(dev)
        start = time.perf_counter()
        try:
            wilke_editor(model, tok, request, variant.hparams, journal=journal, layers=None, cache=cache,
                         profile=profile)
            sync(dev)
            total = time.perf_counter() - start
        finally:
            journal.restore()
    series = pd.Series(profile, dtype=float)
    series["other"] = max(0.0, total - series.sum())
    return series


# ---- files ---------------------------------------------------------------------------------------

NOTEBOOK_SETTINGS = {
    "quick": dict(variants=("rome", "wilke-batched", "wilke-sequential"), n_edits=1, warmup=0, flops=False,
                  memory=False, ks=(1, 2, 4), scaling_searches=("batched",), scaling_edits=1, breakdown_warmup=False),
    "default": dict(variants=VARIANTS, n_edits=1, warmup=0, flops=False, memory=False, ks=(1, 2, 4),
                    scaling_searches=("batched", "sequential"), scaling_edits=1, breakdown_warmup=True),
}
"""Sizes of the small benchmark notebooks/10 runs when no saved results exist (about 20 s / 30 s of
benchmarking on one CPU core of the organisms); `make bench` measures the full tables."""

def results_dir(device: str | torch.device, root: Path | None = None) -> Path:
    """`<repo>/benchmarks/results/<device type>/`."""
    return (root or REPO_ROOT / "benchmarks" / "results") / torch.device(device).type


def load_saved(model_name: str, device: str | torch.device = "cpu", root: Path | None = None):
    """(main table, scaling table or None) saved by benchmarks/bench_editors.py, or None if absent."""
    folder = results_dir(device, root)
    slug = model_slug(model_name)
    main = folder / f"bench_{slug}.csv"
    if not main.is_file():
        return None
    scaling = folder / f"scaling_{slug}.csv"
    return pd.read_csv(main), (pd.read_csv(scaling) if scaling.is_file() else None)


def saved_or_small_run(model_name: str, profile: str, use_saved: bool = True, device: str | None = None,
                       loaded: tuple | None = None, log: Callable[[str], None] | None = None):
    """(main table, scaling table, source): the saved results of `make bench` when present (and
    use_saved), else a small run with NOTEBOOK_SETTINGS[profile]."""
    dev = torch.device(device) if device else (next(loaded[0].parameters()).device if loaded else torch.device("cpu"))
    saved = load_saved(model_name, dev) if use_saved else None
    if saved is not None and saved[1] is not None:
        where = results_dir(dev)
        shown = where.relative_to(REPO_ROOT) if where.is_relative_to(REPO_ROOT) else where.name  # no local path on a page
        return saved[0], saved[1], f"saved by benchmarks/bench_editors.py ({shown})"
    settings = NOTEBOOK_SETTINGS.get(profile, NOTEBOOK_SETTINGS["default"])
    main = benchmark_editors(model_name, n_edits=settings["n_edits"], warmup=settings["warmup"],
                             variants=settings["variants"], flops=settings["flops"], memory=settings["memory"],
                             loaded=loaded, device=device, log=log)
    scaling = benchmark_scaling(model_name, ks=settings["ks"], n_edits=settings["scaling_edits"],
                                warmup=settings["warmup"], searches=settings["scaling_searches"], loaded=loaded,
                                device=device, log=log)
    return main, scaling, f"measured now (profile {profile!r}: {settings['n_edits']} edit(s) per variant)"
