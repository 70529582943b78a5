"""Sweep ROME's editing layer and optimisation settings on an organism: the procedure that derives
the organisms' settings in wilke_lib/hparams (see wilke_lib/hparams/README.md), starting from the
paper's (20 steps at lr 0.5, clamp 4, weight decay 0.5).

    .venv/bin/python -m scripts.sweep_organism_hparams toy-gpt2 --records 20 --layers 0 1 2 3 \
        --steps 20 40 --lrs 0.5 1.0 --clamps 4 8

Prints, per setting, the share of known records whose rewrite prompt greedily answers target_new
after one ROME edit (ES), the mean paraphrase success (PS), the share whose rollback restores
target_true, and the seconds per edit.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import time

import torch

from wilke_lib import counterfact, editing, experiments, generation, hparams, models


def sweep(model_name: str, n_records: int, layers, steps, lrs, clamps, decays, forms) -> list[dict]:
    model, tok = models.load_model(model_name, device="cpu")
    known = counterfact.known_records(model, tok, counterfact.load_counterfact("toy-world"))
    chosen = experiments.evenly_spaced(known, n_records)
    cache = editing.EditCache.for_model(model)
    base = hparams.load_hparams("rome", model_name)
    rows = []
    print("layer steps    lr clamp decay form       ES     PS  rollback s/edit", flush=True)
    for layer, n_steps, lr, clamp, decay, form in itertools.product(layers, steps, lrs, clamps, decays, forms):
        hp = dataclasses.replace(base, layer=layer, v_num_grad_steps=n_steps, v_lr=lr, clamp_norm_factor=clamp,
                                 v_weight_decay=decay, update_form=form)
        es = ps = back = 0.0
        started = time.time()
        for record in chosen:
            result = experiments.edit_and_rollback(model, tok, record, hp, cache)
            es += result["success"]
            back += result["rollback_restored"]
            edited = editing.edit(model, tok, record["requested_rewrite"], hp, copy=True, cache=cache).model
            paraphrases = record["paraphrase_prompts"]
            new = record["requested_rewrite"]["target_new"]["str"]
            ps += sum(generation.greedy_matches(edited, tok, paraphrases, [new] * len(paraphrases))) / len(paraphrases)
        n = len(chosen)
        row = dict(layer=layer, steps=n_steps, lr=lr, clamp=clamp, decay=decay, form=form, ES=es / n, PS=ps / n,
                   rollback=back / n, seconds=(time.time() - started) / n / 2)
        rows.append(row)
        print(f"{layer:5d} {n_steps:5d} {lr:5.2f} {clamp:5.1f} {decay:5.2f} {form:9s} {es / n:6.1%} {ps / n:6.1%} "
              f"{back / n:6.1%} {row['seconds']:6.2f}", flush=True)
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model_name")
    parser.add_argument("--records", type=int, default=20)
    parser.add_argument("--layers", type=int, nargs="+", default=[0, 1, 2, 3])
    parser.add_argument("--steps", type=int, nargs="+", default=[20])
    parser.add_argument("--lrs", type=float, nargs="+", default=[0.5])
    parser.add_argument("--clamps", type=float, nargs="+", default=[4.0])
    parser.add_argument("--decays", type=float, nargs="+", default=[0.5])
    parser.add_argument("--forms", nargs="+", default=["released"], choices=list(hparams.UPDATE_FORMS))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    sweep(args.model_name, args.records, args.layers, args.steps, args.lrs, args.clamps, args.decays, args.forms)


if __name__ == "__main__":
    main()
