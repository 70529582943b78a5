"""Training the hypernetwork editors, MEND (`editors.mend`) and KE (`editors.ke`), and their command line:

    python -m wilke_lib.editors.hypernet --model toy-gpt2 --editor mend      # or --editor ke
    python -m wilke_lib.editors.hypernet --model /data/gpt2-xl --editor mend --records /data/counterfact.json

writes the network to the `weights` file of the editor's hyper-parameters (`organisms/<name>/mend.safetensors`,
a path relative to the model's directory) and its provenance beside it (`mend.json`: the command, the seconds,
the number of training requests, the steps, the seed, the final metrics, the model's fingerprint).

**Training data.** The requests come from the records the unedited model knows (a CounterFact file, or the
organisms' world). The lifelong protocol evaluates on all the known records (`lifelong.runner.split_records`),
so the training requests are *other requests*: for a known record (subject s, relation r, true object o,
evaluated new target t), the training request asks s -> t', t' another object of r (not o, not t) drawn with
the seed; its equivalence prompts are the record's paraphrase prompts, filled with s, with the target t';
its locality prompts (`n_local`) are, in turn, the record's neighbourhood prompts (other subjects, same
relation) and the rewrite prompts of other known records, on which the edited model must keep the unedited
model's next-token distributions (the model's own predictions). This is a deviation from the papers, which
train on a separate split (zsRE, Wikitext): the subjects overlap with the evaluation records; the requests
and the targets do not. `n_val` records of other subjects, none of them in training, are the validation set.

**Objective.** MEND (Sec. 3.2): c_edit * L_e + c_loc * L_loc with L_e the NLL of t' after the rewrite prompt and
its paraphrases with the edited weights and L_loc the KL(unedited || edited) over the locality prompts'
positions. KE (Sec. 3.1): L_e + lambda (L_loc - kl_margin), the Lagrangian of the constrained problem, lambda
by projected gradient ascent. Each step edits `batch_size` requests at once (a weight change per request,
`hypernet_core.added_deltas`); the model is frozen, only the editor network learns (Adam).
"""

from __future__ import annotations

import argparse
import dataclasses
import random
import shlex
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from wilke_lib import hparams as hparams_lib
from wilke_lib.arch import frozen, model_device
from wilke_lib.editors.hypernet_core import (added_deltas, base_fingerprint, forward_logits, gradient_factors, lm_batch,
                                             masked_kl, row_argmax_match, row_nll, save_network, weights_path)
from wilke_lib.editors.ke import KENet
from wilke_lib.editors.mend import MENDNet
from wilke_lib.tokens import fill, prepare_request

NETWORKS = {"mend": MENDNet, "ke": KENet}


@dataclass
class TrainingRequest:
    """An edit request (CounterFact's `requested_rewrite`) with its equivalence and locality prompts."""

    request: dict
    equivalent: list[str]
    local: list[str]


def objects_by_relation(records: Sequence[dict]) -> dict[str, list[str]]:
    """Every object the records name for each relation (true and new targets), sorted."""
    found: dict[str, set[str]] = {}
    for rec in records:
        rw = rec["requested_rewrite"]
        found.setdefault(rw["relation_id"], set()).update({rw["target_true"]["str"], rw["target_new"]["str"]})
    return {r: sorted(objects) for r, objects in found.items()}


def split_by_subject(known: Sequence[dict], n_val: int, seed: int) -> tuple[list[dict], list[dict]]:
    """(training records, validation records): the validation records are `n_val` known records (shuffled
    with the seed), the training records those of the other subjects."""
    pool = list(known)
    random.Random(seed).shuffle(pool)
    val = pool[:n_val]
    held_out = {r["requested_rewrite"]["subject"] for r in val}
    return [r for r in pool[n_val:] if r["requested_rewrite"]["subject"] not in held_out], val


def training_requests(records: Sequence[dict], objects: dict[str, list[str]], others: Sequence[dict], n_local: int,
                      seed: int) -> list[TrainingRequest]:
    """One training request per record (module docstring): the subject, another object of the relation
    than the true and the evaluated ones, the paraphrases, and `n_local` locality prompts (neighbourhood
    prompts and the rewrite prompts of `others`, alternately)."""
    rng = random.Random(seed)
    out = []
    for rec in records:
        rw = rec["requested_rewrite"]
        choices = [o for o in objects.get(rw["relation_id"], []) if o not in (rw["target_true"]["str"], rw["target_new"]["str"])]
        if not choices:
            continue
        new = rng.choice(choices)
        neighbours = list(rec.get("neighborhood_prompts") or [])
        local = []
        for k in range(n_local):
            if k % 2 == 0 and neighbours:
                local.append(neighbours.pop(rng.randrange(len(neighbours))))
            else:
                other = rng.choice(others)["requested_rewrite"]
                local.append(fill(other["prompt"], other["subject"]))
        out.append(TrainingRequest({**rw, "target_new": {"str": new, "id": f"train:{new}"}},
                                   list(rec.get("paraphrase_prompts") or []), local))
    return out


def edit_losses(model: nn.Module, tok: PreTrainedTokenizerBase, net: nn.Module, batch: Sequence[TrainingRequest]
                ) -> dict[str, torch.Tensor]:
    """Edit every request of the batch with `net` (a weight change each) and measure: L_e (NLL of the new
    target after the rewrite prompts and their paraphrases), L_loc (KL on the locality prompts), and the
    shares of rewrite prompts (es) / paraphrases (ps) answering the new target and of locality prompts
    whose greedy next token is unchanged (kept)."""
    device = model_device(model)
    prepared = [prepare_request(tok, r.request) for r in batch]
    deltas = net.request_deltas(model, tok, prepared)
    prompts, targets, rows, rewrite = [], [], [], []
    for b, (r, p) in enumerate(zip(batch, prepared)):
        for k, text in enumerate([p.prompt] + r.equivalent):
            prompts.append(text)
            targets.append(p.target_new_ids)
            rows.append(b)
            rewrite.append(k == 0)
    edited = lm_batch(tok, prompts, targets, device)
    with added_deltas(model, deltas, torch.tensor(rows, device=device)):
        logits = forward_logits(model, edited)
    hits, is_rewrite = row_argmax_match(logits, edited.labels), torch.tensor(rewrite, device=device)
    out = {"edit": row_nll(logits, edited.labels).mean(), "es": hits[is_rewrite].float().mean(),
           "ps": hits[~is_rewrite].float().mean() if (~is_rewrite).any() else torch.tensor(float("nan"))}
    local = [(b, text) for b, r in enumerate(batch) for text in r.local]
    if not local:
        return {**out, "loc": torch.zeros((), device=device), "kept": torch.tensor(float("nan"))}
    plain = lm_batch(tok, [t for _, t in local], [[] for _ in local], device)
    with torch.no_grad():
        base = forward_logits(model, plain)
    with added_deltas(model, deltas, torch.tensor([b for b, _ in local], device=device)):
        post = forward_logits(model, plain)
    last = (torch.arange(len(local), device=device), plain.mask.sum(-1) - 1)
    return {**out, "loc": masked_kl(base, post, plain.mask), "kept": (base[last].argmax(-1) == post[last].argmax(-1)).float().mean()}


def fit_mend_normalisation(model: nn.Module, tok: PreTrainedTokenizerBase, net: MENDNet,
                           requests: Sequence[TrainingRequest], batch_size: int, n: int = 256) -> None:
    """MEND's input normalisation: the statistics of (u, delta) over the gradients of up to `n` training requests."""
    factors = []
    for start in range(0, min(n, len(requests)), batch_size):
        prepared = [prepare_request(tok, r.request) for r in requests[start:start + batch_size]]
        batch = lm_batch(tok, [p.prompt for p in prepared], [p.target_new_ids for p in prepared], model_device(model))
        factors.append(gradient_factors(model, batch, net.layers))
    net.fit_normalisation(factors)


def evaluate(model: nn.Module, tok: PreTrainedTokenizerBase, net: nn.Module, requests: Sequence[TrainingRequest],
             batch_size: int) -> dict[str, float]:
    """The means of `edit_losses`' numbers over `requests` (no training)."""
    sums: dict[str, float] = {}
    with torch.no_grad():
        for start in range(0, len(requests), batch_size):
            chunk = requests[start:start + batch_size]
            for key, value in edit_losses(model, tok, net, chunk).items():
                sums[key] = sums.get(key, 0.0) + float(value) * len(chunk)
    return {k: v / max(1, len(requests)) for k, v in sums.items()}


def train_network(model: nn.Module, tok: PreTrainedTokenizerBase, editor: str, hparams: Any,
                  train: Sequence[TrainingRequest], val: Sequence[TrainingRequest] = (), progress: bool = True
                  ) -> tuple[nn.Module, dict[str, Any]]:
    """Train the network of `editor` ("mend" or "ke") on `train` (module docstring); (network, metrics)."""
    if editor not in NETWORKS:
        raise ValueError(f"unknown hypernetwork editor {editor!r}; expected one of {sorted(NETWORKS)}")
    if hparams_lib.editor_of(hparams) != editor:
        raise ValueError(f"training {editor!r} with the hyper-parameters of {hparams_lib.editor_of(hparams)!r}")
    if not train:
        raise ValueError("no training requests")
    rng = random.Random(hparams.seed)
    torch.manual_seed(hparams.seed)
    net = NETWORKS[editor].for_model(model, hparams).to(model_device(model))
    history: list[dict[str, float]] = []
    multiplier = 0.0
    with frozen(model):
        if editor == "mend":
            fit_mend_normalisation(model, tok, net, train, hparams.batch_size)
            groups = [{"params": [p for n, p in net.named_parameters() if n != "edit_lrs"], "lr": hparams.lr},
                      {"params": [net.edit_lrs], "lr": hparams.lr_lr}]
        else:
            groups = [{"params": list(net.parameters()), "lr": hparams.lr}]
        optimizer = torch.optim.Adam(groups)
        net.train()
        bar = tqdm(range(hparams.train_steps), desc=f"training {editor.upper()}", disable=not progress, unit="step")
        for step in bar:
            numbers = edit_losses(model, tok, net, rng.sample(list(train), min(hparams.batch_size, len(train))))
            if editor == "mend":
                loss = hparams.c_edit * numbers["edit"] + hparams.c_loc * numbers["loc"]
            else:
                loss = numbers["edit"] + multiplier * (numbers["loc"] - hparams.kl_margin)
                multiplier = max(0.0, multiplier + hparams.multiplier_lr * (float(numbers["loc"].detach()) - hparams.kl_margin))
            if not torch.isfinite(loss):
                raise FloatingPointError(f"{editor.upper()} training: the loss is {float(loss)} at step {step}")
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(net.parameters(), 100.0)
            optimizer.step()
            history.append({k: float(v.detach()) for k, v in numbers.items()} | {"loss": float(loss.detach()), "multiplier": multiplier})
            if step % 20 == 0:
                bar.set_postfix(es=f"{sum(h['es'] for h in history[-50:]) / len(history[-50:]):.2f}",
                                kl=f"{history[-1]['loc']:.3f}")
    net.eval()
    tail = history[-100:]
    metrics = {"train_last_100_steps": {k: sum(h[k] for h in tail) / len(tail) for k in tail[0]},
               "validation": evaluate(model, tok, net, list(val), hparams.batch_size) if val else {}}
    if editor == "mend":
        metrics["edit_lrs"] = [float(a) for a in net.edit_lrs.detach()]
    return net, metrics


def main(argv: list[str] | None = None) -> int:
    from wilke_lib.counterfact import known_records, load_counterfact
    from wilke_lib.models import load_model, tune_threads, weights_fingerprint

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="an organism (toy-gpt2, toy-gptj), a model directory or a hub id")
    parser.add_argument("--editor", required=True, choices=sorted(NETWORKS))
    parser.add_argument("--records", default="toy-world", help="CounterFact JSON file (default: the organisms' world)")
    parser.add_argument("--hparams", default=None, help="a YAML/JSON file (default: the shipped one for the model)")
    parser.add_argument("--out", default=None, help="the weights file (default: the hyper-parameters' `weights`)")
    parser.add_argument("--steps", type=int, default=None, help="override train_steps")
    args = parser.parse_args(argv)
    hp = (hparams_lib.hparams_from_file(args.hparams, args.editor) if args.hparams
          else hparams_lib.load_hparams(args.editor, args.model))
    if args.steps is not None:
        hp = dataclasses.replace(hp, train_steps=args.steps)
    start = time.perf_counter()
    model, tok = load_model(args.model)
    tune_threads(model)
    known = known_records(model, tok, load_counterfact(args.records))
    train_records, val_records = split_by_subject(known, hp.n_val, hp.seed)
    objects = objects_by_relation(known)
    train = training_requests(train_records[:hp.n_train], objects, known, hp.n_local, hp.seed)
    val = training_requests(val_records, objects, known, hp.n_local, hp.seed + 1)
    net, metrics = train_network(model, tok, args.editor, hp, train, val)
    seconds = time.perf_counter() - start
    path = Path(args.out) if args.out else weights_path(model, hp.weights)
    provenance = {"command": "python -m wilke_lib.editors.hypernet " + shlex.join(sys.argv[1:] if argv is None else argv),
                  "editor": args.editor, "model": args.model, "seconds": round(seconds, 1),
                  "threads": torch.get_num_threads(), "device": str(model_device(model)), "n_known": len(known),
                  "n_train": len(train), "n_val": len(val), "steps": hp.train_steps, "seed": hp.seed,
                  "hparams": hparams_lib.to_dict(hp), "metrics": metrics, "network": net.config(),
                  "n_network_parameters": sum(p.numel() for p in net.parameters()),
                  "weights_fingerprint": weights_fingerprint(model), "base_fingerprint": base_fingerprint(model),
                  "torch": torch.__version__}
    save_network(net, path, args.editor, net.config(), base_fingerprint(model), provenance)
    train_m, val_m = metrics["train_last_100_steps"], metrics["validation"]
    print(f"{args.editor.upper()} on {args.model}: {len(train)} training requests, {hp.train_steps} steps, seed {hp.seed}, "
          f"{seconds:.0f} s")
    print(f"  training (last 100 steps): edit success {train_m['es']:.1%}, paraphrases {train_m['ps']:.1%}, "
          f"locality kept {train_m['kept']:.1%}, KL {train_m['loc']:.4f}")
    if val_m:
        print(f"  validation ({len(val)} requests, unseen subjects): edit success {val_m['es']:.1%}, paraphrases "
              f"{val_m['ps']:.1%}, locality kept {val_m['kept']:.1%}, KL {val_m['loc']:.4f}")
    print(f"  wrote {path} and {path.with_suffix('.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
