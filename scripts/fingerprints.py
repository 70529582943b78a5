"""Numbers unchanged by a refactor: sha256 of every editor's weight deltas and of a short lifelong run.

For each organism and each editor of the paper profile (`profiles.ALL_EDITORS`), the script edits 3
known records one at a time on a fresh copy of the model and hashes the deltas `edit` recorded (module
name, shape, dtype and bytes), then runs a 4-edit lifelong run (Appendix F: edit, evaluate, roll back)
in a temporary folder and hashes its per-step metrics (timings dropped) and its toxicity snapshots.

    python -m scripts.fingerprints --out benchmarks/results/fingerprints-before.json
    python -m scripts.fingerprints --compare benchmarks/results/fingerprints-before.json

`--compare` recomputes and prints, per editor and organism, whether each hash is the same; the exit status
is 1 when any differs.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import sys
import tempfile
from pathlib import Path

import torch

from wilke_lib import counterfact, editing, experiments, lifelong, models, profiles
from wilke_lib.organisms.records import counterfact_records

TIMING_KEYS = ("seconds", "edit_seconds", "rollback_seconds", "eval_seconds", "time", "wall")


def tensor_digest(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}\0{tuple(t.shape)}\0{t.dtype}\0".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def rows_digest(rows: list[dict]) -> str:
    def strip(value):
        if isinstance(value, dict):
            return {k: strip(v) for k, v in value.items() if not any(t in k for t in TIMING_KEYS)}
        if isinstance(value, list):
            return [strip(v) for v in value]
        return value
    return hashlib.sha256(json.dumps(strip(rows), sort_keys=True).encode()).hexdigest()


def single_edits(model_name: str, variant, records: list[dict]) -> str:
    model, tok = models.load_model(model_name)
    hparams = variant.hparams(model_name)
    cache = lifelong.prepare_edit_cache(model, tok, hparams)
    digests = []
    for record in records:
        result = editing.edit(model, tok, record["requested_rewrite"], hparams, copy=True, cache=cache)
        digests.append(tensor_digest(result.weight_deltas))
    return hashlib.sha256("".join(digests).encode()).hexdigest()


def lifelong_digest(model_name: str, variant, records: list[dict], n_edits: int = 4, seed: int = 9) -> str:
    profile = profiles.get_profile("paper")
    with tempfile.TemporaryDirectory() as out:
        config = experiments.run_config(model_name, variant, n_edits, seed, profile, Path(out))
        result = lifelong.run_many(models.load_model, records, [config])[0]
        rdir = Path(result.run_dir)
        steps = next(rdir.glob("steps.jsonl*"))
        text = gzip.decompress(steps.read_bytes()).decode() if steps.suffix == ".gz" else steps.read_text()
        rows = [json.loads(line) for line in text.splitlines() if line.strip()]
        parts = [rows_digest(rows)]
        for snap in sorted(rdir.glob("toxicity*.safetensors")):
            from safetensors.torch import load_file
            parts.append(tensor_digest(load_file(snap)))
        return hashlib.sha256("".join(parts).encode()).hexdigest()


def fingerprints(organisms: list[str], editors: list[str]) -> dict:
    out: dict = {}
    for model_name in organisms:
        records = counterfact_records()
        model, tok = models.load_model(model_name)
        known = counterfact.known_records(model, tok, records)[:3]
        del model
        for name in editors:
            variant = experiments.editor_variant(name)
            key = f"{model_name}/{name}"
            out[key] = {"single_edits": single_edits(model_name, variant, known),
                        "lifelong_4": lifelong_digest(model_name, variant, records)}
            print(key, out[key]["single_edits"][:12], out[key]["lifelong_4"][:12], flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--organisms", nargs="+", default=list(models.ORGANISMS))
    parser.add_argument("--editors", nargs="+", default=list(profiles.ALL_EDITORS))
    parser.add_argument("--out", type=Path)
    parser.add_argument("--compare", type=Path)
    args = parser.parse_args(argv)
    torch.use_deterministic_algorithms(True, warn_only=True)
    now = fingerprints(args.organisms, args.editors)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(now, indent=1, sort_keys=True) + "\n")
    if not args.compare:
        return 0
    before = json.loads(args.compare.read_text())
    differ = 0
    for key, hashes in now.items():
        for what, digest in hashes.items():
            same = before.get(key, {}).get(what) == digest
            differ += not same
            print(f"{key:28s} {what:13s} {'same' if same else 'DIFFERS'}")
    print(f"{differ} of {2 * len(now)} hashes differ")
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main())
