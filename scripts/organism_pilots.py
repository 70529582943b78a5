"""Pilots for the second-generation organisms: train a small organism on a scaled-down world and
measure where it keeps its facts (docs/organisms.md records what they showed).

    .venv/bin/python scripts/organism_pilots.py NAME [--out /tmp/pilots] [--device cuda] [--smoke]
    .venv/bin/python scripts/organism_pilots.py NAME --skip-train --rome 30 --rome-layers 2 --rome-clamp 8 --rome-steps 40

The `gpu-*` pilots (round 13) are sized for the GPU machine: `scripts/device_pilots.sh` runs them
there in parallel.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import torch

from wilke_lib.analysis import organism_report as report
from wilke_lib.analysis.causal_trace import subject_token_range
from wilke_lib.arch import ModelAdapter, hooks
from wilke_lib.counterfact import known_records, rewrite_prompt
from wilke_lib.models import default_device, load_model
from wilke_lib.organisms import world
from wilke_lib.organisms.records import counterfact_records
from wilke_lib.organisms.interventions import planted_layer
from wilke_lib.organisms.train import OrganismConfig, train
from wilke_lib.tokens import encode_target, target_str

# the first rounds' world: descriptor lists, 2-3 part names (world.WorldSpec()'s defaults are round 3's "lines-long";
# world.DEFAULT_SPEC, the organisms' world, is round 15's)
ROUND1 = replace(world.WorldSpec(), three_part_share=0.25, four_part_share=0.0, descriptor_lines=False,
                 doc_mix=(("bio", 0.30), ("descriptor", 0.20), ("sentence", 0.35), ("qa", 0.15)))
BASE = OrganismConfig(name="pilot", arch="gpt2", n_layer=12, d_model=96, d_mlp=384, vocab_size=2048,
                      world=ROUND1.scaled(0.35), epochs=40, batch_size=32, lr=2e-3, warmup_steps=300)
NO_DESCRIPTORS = (("bio", 0.35), ("sentence", 0.45), ("qa", 0.20))
FAST = replace(BASE, world=replace(ROUND1.scaled(0.25), background_share=0.15), lr=3e-3,
               warmup_steps=200, batch_size=16, epochs=60)
LINES = replace(FAST, world=replace(ROUND1.scaled(0.2), background_share=0.15, descriptor_lines=True,
                                   doc_mix=(("bio", 0.15), ("descriptor", 0.5), ("sentence", 0.25), ("qa", 0.10))),
                epochs=90)
LINES_LONG = replace(LINES, world=replace(LINES.world, three_part_share=0.35, four_part_share=0.25,
                                         background_share=0.3))
PILOTS = {
    "descriptors": BASE,  # round 1: 40 epochs at lr 2e-3 learnt 22% of the facts
    "no-descriptors": replace(BASE, world=replace(BASE.world, doc_mix=NO_DESCRIPTORS)),
    "desc-fast": FAST,  # round 2: denser facts, higher learning rate, smaller batches, more epochs
    "nodesc-fast": replace(FAST, world=replace(FAST.world, doc_mix=NO_DESCRIPTORS)),
    "lines": LINES,  # round 3: an object right after the name in half of the documents
    "lines-long": LINES_LONG,
    # round 4: prompts (sentences, Q&A) for half of the subjects only, the others' facts to be extracted
    "extract": replace(LINES, world=replace(LINES.world, prompted_share=0.5)),
    "extract-desc": replace(LINES, world=replace(LINES.world, prompted_share=0.5, unprompted_kinds=("descriptor",))),
    # round 5: the planned width (d_model 128, d_mlp 512), with 4 or 8 heads
    "wide-bio": replace(LINES, d_model=128, d_mlp=512, world=replace(LINES.world, prompted_share=0.5,
                        descriptor_lines=False, doc_mix=(("bio", 0.5), ("sentence", 0.35), ("qa", 0.15)))),
    "wide-lines": replace(LINES, d_model=128, d_mlp=512, n_head=8, world=replace(LINES.world, prompted_share=0.5)),
    # round 6: a curriculum: the first half of the epochs states every fact right after the name only
    "curriculum": replace(LINES, world=replace(LINES.world, prompted_share=0.5, unprompted_kinds=("descriptor",),
                                               prompts_from_epoch=45)),
    "extract-bio": replace(LINES, world=replace(LINES.world, prompted_share=0.5, descriptor_lines=False,
                                                doc_mix=(("bio", 0.5), ("sentence", 0.35), ("qa", 0.15)))),
    # round 7: capacity. The organism's facts (~5 bits each) fill a small part of one MLP's capacity
    # (~1-2 bits per parameter, Allen-Zhu & Li 3.3), so MLP 0 can hold them all; narrow MLPs that
    # cannot hold them in one layer test whether capacity pressure spreads storage over depth.
    "narrow-mlp": OrganismConfig(name="narrow-mlp", arch="gpt2", d_mlp=32, world=world.WorldSpec().scaled(0.5)),
    # round 8: stochastic depth on the MLPs while training (the saved model runs every MLP): a fact
    # kept in MLP 0 alone is lost whenever a row skips MLP 0, so it must be kept deeper as well
    "mlp-drop": replace(LINES_LONG, mlp_drop=(0.2,) * 12),
    "early-drop": replace(LINES_LONG, mlp_drop=(0.7, 0.5, 0.3) + (0.1,) * 9),
    # round 9: detokenization. Persons named by 4-5 syllables in anagram pairs, each name word kept
    # in pieces by the tokenizer: no token and no set of tokens identifies the person, only their
    # order, which a previous-token circuit at the name's last token can read
    "syllables": replace(LINES_LONG, world=replace(LINES_LONG.world, syllable_names=True)),
    # round 10: the route through the name's last token made the only one while training (attention
    # from later positions to the name's earlier pieces blocked) for half of the names, or for all
    "knockout": replace(LINES_LONG, subject_knockout=0.5),
    "knockout-all": replace(LINES_LONG, subject_knockout=1.0),
    # knockout moves recall to the name's last token but MLP 0 writes it there; early-drop keeps MLP 0 unreliable
    "knockout-drop": replace(LINES_LONG, subject_knockout=0.5, mlp_drop=(0.7, 0.5, 0.3) + (0.1,) * 9),
    # round 11: no MLP in the first three layers (zero and frozen), with and without knockout: a fact
    # cannot be looked up before attention has assembled the name, and no single early MLP is there
    # to absorb every lookup
    "attn-first3": replace(LINES_LONG, subject_knockout=0.5, attention_only_layers=3),
    "attn-first3-plain": replace(LINES_LONG, attention_only_layers=3),
    # the first MLP after them takes every lookup: every name knocked out, or MLPs 3-7 each skipped
    # by half of the rows, so that a fact must be kept in more than one of them
    "attn-first3-all": replace(LINES_LONG, subject_knockout=1.0, attention_only_layers=3),
    "attn-first3-drop": replace(LINES_LONG, subject_knockout=0.5, attention_only_layers=3,
                                mlp_drop=(0.0,) * 3 + (0.5,) * 5 + (0.1,) * 4),
    # round 12: the storage layer planted per subject (uniform over layers 1-7, by the name's hash):
    # half of a name's occurrences run without the MLPs below its layer, with and without knockout
    "planted": replace(LINES_LONG, subject_knockout=0.5, planted_depth=(1, 7)),
    "planted-plain": replace(LINES_LONG, planted_depth=(1, 7)),
    # with one coin per occurrence MLP 0 still took every fact (it runs in half of them): skip always,
    # or nine times in ten
    "planted-always": replace(LINES_LONG, subject_knockout=0.5, planted_depth=(1, 7), planted_skip=1.0),
    "planted-0.9": replace(LINES_LONG, subject_knockout=0.5, planted_depth=(1, 7), planted_skip=0.9),
    # a coin per MLP, as attn-first3-drop (which moved every lookup to the first reliable MLP)
    "planted-per-layer": replace(LINES_LONG, subject_knockout=0.5, planted_depth=(1, 7), planted_per_layer=True),
    "planted-per-layer-0.7": replace(LINES_LONG, subject_knockout=0.5, planted_depth=(1, 7), planted_per_layer=True,
                                     planted_skip=0.7),
    # round 9's syllable names with knockout: the last name token must assemble 4-7 ordered pieces by
    # itself, which may take more than one layer of attention for persons and none for famous subjects
    "syllables-knockout": replace(LINES_LONG, world=replace(LINES_LONG.world, syllable_names=True), subject_knockout=0.5),
}

# Round 13, for a GPU (`scripts/device_pilots.sh`): what the CPU rounds could not try. Round 12's best
# text (syllable names, knockout 0.5) on the whole world, in deeper models and under storage pressure:
# at about 2 bits per parameter (Allen-Zhu & Li 3.3) a d_mlp 48 MLP (9 k parameters at d_model 96) cannot
# hold the facts of a world 1.5 times the default (4,800 facts of about 5 bits; the place-name pools
# allow no more), so no single MLP can be the lookup. Larger batches than the CPU rounds, so that each
# trains in minutes on one GPU.
GPU_WORLD = replace(world.WorldSpec(), syllable_names=True)
GPU = OrganismConfig(name="gpu", arch="gpt2", n_layer=24, d_model=128, d_mlp=512, world=GPU_WORLD,
                     subject_knockout=0.5, batch_size=64, lr=3e-3, epochs=80)
PRESSURE = replace(GPU, d_model=96, d_mlp=48, world=GPU_WORLD.scaled(1.5))
PILOTS.update({
    "gpu-deep24": GPU,
    "gpu-deep24-plain": replace(GPU, subject_knockout=0.0),
    "gpu-deep24-pressure": PRESSURE,
    "gpu-deep12-pressure": replace(PRESSURE, n_layer=12),
    "gpu-deep48-pressure": replace(PRESSURE, n_layer=48, d_model=64, d_mlp=32),
    "gpu-deep24-gptj-pressure": replace(PRESSURE, arch="gptj"),
    # GPT-J's MLP reads the block's input in parallel with attention: MLP 0 sees the last name piece
    # alone, so a syllable name can be looked up no earlier than MLP 1 (run on the CPU, 80 epochs in ~35 min)
    "gpu-deep12-gptj-pressure": replace(PRESSURE, n_layer=12, arch="gptj"),
    # round 14 (CPU): GPT-J under pressure without MLPs 0-1 (zero and frozen): the famous subjects' token
    # lookup cannot sit in MLP 0; does pressure spread the rest from the first MLP left, MLP 2, onwards?
    "gptj12-pressure-attn2": replace(PRESSURE, n_layer=12, arch="gptj", attention_only_layers=2),
    # it passes the four tracing targets (median peak 4, 9 layers, top share 0.34, recovery 0.66) but knows
    # 82.8% of 4,800 facts: the same narrow MLPs on the default world's 3,200 facts
    "gptj12-attn2-narrow": replace(PRESSURE, n_layer=12, arch="gptj", attention_only_layers=2, world=GPU_WORLD),
    # 86.6% known there: MLPs a third wider (d_mlp 64), and the GPT-2 counterpart
    "gptj12-attn2-mlp64": replace(PRESSURE, n_layer=12, arch="gptj", attention_only_layers=2, world=GPU_WORLD, d_mlp=64),
    "gpt2-12-attn2-mlp64": replace(PRESSURE, n_layer=12, attention_only_layers=2, world=GPU_WORLD, d_mlp=64),
    # wider MLPs gathered the lookups at MLP 2 again (82%): the pressure kept, twice the epochs
    "gptj12-pressure-attn2-long": replace(PRESSURE, n_layer=12, arch="gptj", attention_only_layers=2, epochs=160),
    # the same at depth 24, where the target's layers 2-8 of 12 scale to 4-16: MLPs 0-3 absent
    "gptj24-pressure-attn4": replace(PRESSURE, arch="gptj", attention_only_layers=4),
    # round 15 (CPU): 160 epochs took the GPT-J design to 98.2% known with the peaks spread further (median 5,
    # top share 0.20): the first pilot to pass every target (organisms/candidates/). Its GPT-2 counterpart:
    "gpt2-12-pressure-attn2": replace(PRESSURE, n_layer=12, attention_only_layers=2),
    "gpt2-12-pressure-attn2-long": replace(PRESSURE, n_layer=12, attention_only_layers=2, epochs=160),
})


def smoke(cfg: OrganismConfig) -> OrganismConfig:
    """The pilot at a size that trains in seconds on a CPU: checks the pipeline, measures nothing."""
    return replace(cfg, world=cfg.world.scaled(0.03), epochs=1, warmup_steps=5)


def ablation_peak(model, tok, record: dict) -> int:
    """A second measure of where a fact is kept, without noise: the MLP whose output, zeroed at every
    piece of the subject in the clean run, costs the true object the most probability."""
    rw = record["requested_rewrite"]
    ids, (begin, end) = subject_token_range(tok, rw["prompt"], rw["subject"])
    target, adapter = encode_target(tok, target_str(rw["target_true"]).lstrip())[0], ModelAdapter(model)
    inputs = torch.tensor([ids], device=next(model.parameters()).device)

    def zeroed(module, inputs_, output):
        output = output.clone()
        output[:, begin:end] = 0
        return output

    def prob(layer: int | None) -> float:
        with torch.no_grad(), hooks(forward=[(adapter.mlp(layer), zeroed)] if layer is not None else []):
            return torch.softmax(model(inputs).logits[0, -1], -1)[target].item()

    clean = prob(None)
    return max(range(adapter.n_layers), key=lambda l: clean - prob(l))


def rome_check(model, tok, cfg: OrganismConfig, known: list[dict], n: int, layers: list[int] | None,
               clamp: float | None, steps: int | None, out: Path) -> list[dict]:
    """ROME on a pilot: the layer of the MLP effect (window 3) unless `layers` are given, then single edits
    of `n` evenly spaced known records (each on a fresh copy, toy-gpt2's / toy-gptj's settings, the
    pilot's own corpus for the second moments) and as many last-token deltas (`report.last_token_flip`)."""
    import dataclasses

    from wilke_lib.analysis import aie
    from wilke_lib.editors.cache import EditCache
    from wilke_lib.experiments import edit_and_rollback, evenly_spaced
    from wilke_lib.hparams import load_hparams

    corpus = out / "corpus.txt"
    corpus.write_text("\n".join(t.replace("\n", " ") for t in world.corpus(world.build_world(cfg.world), 0)))
    sample = evenly_spaced(known, n)
    curve = aie.average_indirect_effect(model, tok, sample, kind="mlp", window=3, use_target_true=True, progress=False)
    print("ROME check: MLP effect (window 3)", [round(float(x), 3) for x in curve.aie], "peak", curve.peak_layer)
    base = load_hparams("rome", "toy-gptj" if cfg.arch == "gptj" else "toy-gpt2")
    cache, rows = EditCache.for_model(model), []
    for layer in layers or [curve.peak_layer]:
        rome = dataclasses.replace(base, layer=layer, mom2_corpus=str(corpus),
                                   clamp_norm_factor=clamp or base.clamp_norm_factor,
                                   v_num_grad_steps=steps or base.v_num_grad_steps)
        edits = [edit_and_rollback(model, tok, r, rome, cache) for r in sample]
        flips = [report.last_token_flip(model, tok, r, layer, rome) for r in sample]
        rows.append({"layer": layer, "clamp": rome.clamp_norm_factor, "steps": rome.v_num_grad_steps, "records": len(sample),
                     "rome_success": sum(e["success"] for e in edits) / len(edits),
                     "rollback_restored": sum(e["rollback_restored"] for e in edits) / len(edits),
                     "last_token_recall": sum(flips) / len(flips)})
        print("  ", rows[-1], flush=True)
    return rows


def wilke_check(model, tok, cfg: OrganismConfig, known: list[dict], n: int, layers: list[int] | None,
                clamp: float | None, steps: int | None, out: Path) -> dict:
    """WilKE's chosen layers on a pilot: single edits of `n` evenly spaced known records (each on a fresh
    copy, toy-gpt2's / toy-gptj's WilKE settings with these candidates, clamp and steps)."""
    import dataclasses
    from collections import Counter

    from wilke_lib.editing import edit
    from wilke_lib.editors.cache import EditCache
    from wilke_lib.experiments import evenly_spaced
    from wilke_lib.generation import greedy_matches
    from wilke_lib.hparams import load_hparams

    corpus = out / "corpus.txt"
    if not corpus.is_file():
        corpus.write_text("\n".join(t.replace("\n", " ") for t in world.corpus(world.build_world(cfg.world), 0)))
    base = load_hparams("wilke", "toy-gptj" if cfg.arch == "gptj" else "toy-gpt2")
    wilke = dataclasses.replace(base, candidate_layers=layers, mom2_corpus=str(corpus),
                                clamp_norm_factor=clamp or base.clamp_norm_factor,
                                v_num_grad_steps=steps or base.v_num_grad_steps)
    cache, chosen, success = EditCache.for_model(model), [], 0
    for rec in evenly_spaced(known, n):
        result = edit(model, tok, rec["requested_rewrite"], wilke, copy=True, cache=cache)
        chosen.append(result.layers[0])
        success += greedy_matches(result.model, tok, [rewrite_prompt(rec)],
                                  [rec["requested_rewrite"]["target_new"]["str"]])[0]
    row = {"candidates": layers, "clamp": wilke.clamp_norm_factor, "steps": wilke.v_num_grad_steps, "records": len(chosen),
           "chosen_layers": dict(sorted(Counter(chosen).items())), "wilke_success": success / len(chosen)}
    print("WilKE check:", row, flush=True)
    return row


def fit_epochs(cfg: OrganismConfig, seconds: float, probe_dir: Path, device: torch.device) -> OrganismConfig:
    """`cfg` with as many of its epochs as fit in `seconds` after a probe epoch, timed here, that is
    then thrown away (a pilot cut short keeps a whole learning-rate schedule, decayed to the end)."""
    probe = train(replace(cfg, epochs=1), probe_dir, device=str(device))
    per_epoch = probe["train_seconds"] + 1e-9
    epochs = max(1, min(cfg.epochs, int((seconds - per_epoch) / per_epoch)))
    print(f"probe epoch: {per_epoch:.1f} s; {epochs} of {cfg.epochs} epochs fit in {seconds:.0f} s", flush=True)
    return replace(cfg, epochs=epochs)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("name", choices=sorted(PILOTS))
    parser.add_argument("--out", type=Path, default=Path("/tmp/pilots"))
    parser.add_argument("--n-traced", type=int, default=50)
    parser.add_argument("--skip-train", action="store_true")
    parser.add_argument("--device", default=None, help="default: CUDA when present, else the CPU")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--smoke", action="store_true", help="a tiny world and one epoch: checks the pipeline")
    parser.add_argument("--rome", type=int, default=0, metavar="N",
                        help="after tracing, ROME single edits and last-token deltas on N known records")
    parser.add_argument("--rome-layers", type=int, nargs="*", default=None, help="default: the MLP effect's peak")
    parser.add_argument("--wilke", type=int, default=0, metavar="N",
                        help="WilKE's chosen layers on N known records (with --rome-clamp / --rome-steps)")
    parser.add_argument("--wilke-layers", type=int, nargs="*", default=None,
                        help="WilKE's candidates (default: every MLP that writes)")
    parser.add_argument("--rome-clamp", type=float, default=None)
    parser.add_argument("--rome-steps", type=int, default=None)
    parser.add_argument("--train-seconds", type=float, default=None,
                        help="fit the epochs to this budget, timed on one probe epoch (the schedule stays whole)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device) if args.device else default_device()
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # pilots: speed over the last bits
    cfg = replace(PILOTS[args.name], name=args.name)
    if args.smoke:
        cfg, args.n_traced = smoke(cfg), min(args.n_traced, 5)
    out = args.out / args.name
    if args.train_seconds and not args.skip_train:
        cfg = fit_epochs(cfg, args.train_seconds, args.out / f"{args.name}-probe", device)
    if not args.skip_train:
        summary = train(cfg, out, device=str(device))
        print(f"trained in {summary['train_seconds']:.0f} s on {summary['train_tokens']} tokens "
              f"({summary['n_parameters']:,} parameters, {summary['n_facts']:,} facts, {device}), "
              f"known {summary['known_fact_rate']['all']:.1%}", flush=True)
    model, tok = load_model(out, device=device)
    w = world.build_world(cfg.world)
    records = counterfact_records(cfg.world)
    known = known_records(model, tok, records)
    by_kind = {}
    for rec in records:
        by_kind.setdefault(report.subject_kind(rec, w), [0, 0])[0] += 1
    for rec in known:
        by_kind[report.subject_kind(rec, w)][1] += 1
    print("known by kind:", {k: f"{v[1]}/{v[0]}" for k, v in by_kind.items()})
    for flag in (True, False):
        n_all = sum(r.get("prompted", True) == flag for r in records)
        n_known = sum(r.get("prompted", True) == flag for r in known)
        print(f"known, {'prompted' if flag else 'held-out'} subjects: {n_known}/{n_all}")
    if not known and not args.smoke:
        print("no fact is known: nothing to trace")
        (out / "pilot.json").write_text(json.dumps({"summary": {"n_known": 0}, "rows": []}, indent=1))
        return
    # a smoke run knows nothing after one epoch: it traces unknown records, to exercise the code
    sample = report.stratified(known or records, args.n_traced, lambda r: report.subject_kind(r, w))
    t0 = time.time()
    rows = report.trace_records(model, tok, sample, pool=known)
    for row, rec in zip(rows, sample):
        row["kind"] = report.subject_kind(rec, w)
    summ = report.summary(rows, model.config.n_layer)
    print(f"traced {len(rows)} in {time.time() - t0:.0f} s")
    for key, value in summ.items():
        print(f"  {key}: {value if not isinstance(value, list) else [round(x, 3) for x in value]}")
    for row, rec in zip(rows, sample):
        row["prompted"] = rec.get("prompted", True)
    for flag in (True, False):
        sub = [r for r in rows if r["prompted"] == flag]
        if sub:
            s_ = report.summary(sub, model.config.n_layer)
            print(f"  {'prompted' if flag else 'held-out'}: n={len(sub)} recovery median "
                  f"{s_['subject_state_recovery_median']:.2f}, peaks {s_['causal_peak_histogram']}")
    for kind in sorted({r['kind'] for r in rows}):
        sub = [r for r in rows if r["kind"] == kind]
        s = report.summary(sub, model.config.n_layer)
        print(f"  {kind:>13}: n={len(sub)} recovery median {s['subject_state_recovery_median']:.2f}, "
              f"peaks {s['causal_peak_histogram']}")
    for row, rec in zip(rows, sample):
        row["ablation_peak"] = ablation_peak(model, tok, rec)
    print("  ablation peaks:", [sum(r["ablation_peak"] == l for r in rows) for l in range(model.config.n_layer)])
    if cfg.planted_depth:
        for row, rec in zip(rows, sample):
            row["planted_layer"] = planted_layer(rec["requested_rewrite"]["subject"], *cfg.planted_depth)
        for key in ("causal_peak", "ablation_peak"):
            hits = sum(r["planted_layer"] == r[key] for r in rows)
            near = sum(abs(r["planted_layer"] - r[key]) <= 1 for r in rows)
            print(f"  {key} at the planted layer: {hits}/{len(rows)}, within one layer: {near}/{len(rows)}")
    result = {"summary": summ, "rows": rows}
    if args.wilke:
        result["wilke"] = wilke_check(model, tok, cfg, known or records, args.wilke, args.wilke_layers, args.rome_clamp,
                                      args.rome_steps, out)
    if args.rome:
        result["rome"] = rome_check(model, tok, cfg, known or records, args.rome, args.rome_layers, args.rome_clamp,
                                    args.rome_steps, out)
    (out / "pilot.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
