"""Sweep the ROME editing layer and optimisation settings on an organism: the procedure that set
the organisms' defaults in wilke_lib/hparams (see wilke_lib/hparams/README.md).

    .venv/bin/python scripts/sweep_organism_hparams.py toy-gpt2 --records 16

Prints, per setting, the share of known records whose rewrite prompt greedily answers target_new
after one ROME edit (ES) and the mean paraphrase success (PS).
"""
import argparse
import dataclasses
import itertools
import time

import torch

from wilke_lib import counterfact, editing, experiments, generation, hparams, models

parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
parser.add_argument("model_name")
parser.add_argument("--records", type=int, default=16)
parser.add_argument("--layers", type=int, nargs="+", default=[0, 1, 2, 3])
parser.add_argument("--steps", type=int, nargs="+", default=[40])
parser.add_argument("--clamps", type=float, nargs="+", default=[30.0])
args = parser.parse_args()
torch.set_num_threads(1)
model, tok = models.load_model(args.model_name)
known = counterfact.known_records(model, tok, counterfact.load_counterfact("toy-world")[:400])
chosen = experiments.evenly_spaced(known, args.records)
cache = editing.EditCache.for_model(model)
base = hparams.load_hparams("rome", args.model_name)
print("layer steps clamp   ES     PS   s/edit")
for layer, steps, clamp in itertools.product(args.layers, args.steps, args.clamps):
    hp = dataclasses.replace(base, layer=layer, v_num_grad_steps=steps, clamp_norm_factor=clamp)
    es = ps = 0.0
    started = time.time()
    for record in chosen:
        rewrite = record["requested_rewrite"]
        edited = editing.edit(model, tok, rewrite, hp, copy=True, cache=cache).model
        new = rewrite["target_new"]["str"]
        es += generation.greedy_matches(edited, tok, [counterfact.rewrite_prompt(record)], [new])[0]
        paraphrases = record["paraphrase_prompts"]
        ps += sum(generation.greedy_matches(edited, tok, paraphrases, [new] * len(paraphrases))) / len(paraphrases)
    n = len(chosen)
    print(f"{layer:5d} {steps:5d} {clamp:5.0f} {es / n:6.1%} {ps / n:6.1%} {(time.time() - started) / n:6.2f}")
