"""Model organisms: GPT-2 and GPT-J architecture models trained on the synthetic world.

The paper edits GPT2-XL (48 layers) and GPT-J (28 layers). Here each architecture is a 12-layer
model, small enough to train on a 2-core CPU, that has memorised the facts of
``wilke_lib.world``. The weights are saved with ``save_pretrained`` so that
``AutoModelForCausalLM.from_pretrained`` loads them exactly as it would load ``gpt2-xl``.

    python -m wilke_lib.organisms --all            # retrain both (what `make organisms` runs)
    python -m wilke_lib.organisms --name toy-gpt2 --epochs 5 --out /tmp/quick
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import random
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from tqdm.auto import tqdm
from transformers import (GPT2Config, GPT2LMHeadModel, GPTJConfig, GPTJForCausalLM,
                          PreTrainedTokenizerFast)

from wilke_lib import world as world_lib
from wilke_lib.models import default_device

log = logging.getLogger(__name__)

EOS, PAD = "<|endoftext|>", "<|pad|>"
ORGANISM_DIR = Path(__file__).resolve().parents[1] / "organisms"


@dataclass(frozen=True)
class OrganismConfig:
    """Everything that determines an organism: architecture, size, data and optimisation."""

    name: str
    arch: str  # "gpt2" | "gptj"
    n_layer: int = 12
    d_model: int = 96
    n_head: int = 4
    d_mlp: int = 384
    vocab_size: int = 2048
    n_positions: int = 96
    world_seed: int = world_lib.DEFAULT_SEED
    train_seed: int = 0
    epochs: int = 14
    batch_size: int = 32
    lr: float = 3e-3
    warmup_steps: int = 150
    weight_decay: float = 0.01
    sentences_per_row: int = 3  # training rows hold 1..3 corpus sentences, so facts are recalled after any context


ORGANISMS = {
    "toy-gpt2": OrganismConfig(name="toy-gpt2", arch="gpt2"),
    "toy-gptj": OrganismConfig(name="toy-gptj", arch="gptj"),
}


def train_tokenizer(texts: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Byte-level BPE, as GPT-2's, trained on the corpus."""
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS, PAD],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token=EOS, eos_token=EOS,
                                   unk_token=EOS, pad_token=PAD)


def build_model(cfg: OrganismConfig, tok: PreTrainedTokenizerFast) -> torch.nn.Module:
    common = dict(vocab_size=len(tok), n_positions=cfg.n_positions, n_embd=cfg.d_model,
                  n_layer=cfg.n_layer, n_head=cfg.n_head, n_inner=cfg.d_mlp,
                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                  bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id,
                  pad_token_id=tok.pad_token_id)
    if cfg.arch == "gpt2":
        return GPT2LMHeadModel(GPT2Config(**common))
    if cfg.arch == "gptj":
        return GPTJForCausalLM(GPTJConfig(rotary_dim=cfg.d_model // cfg.n_head // 2,
                                          tie_word_embeddings=False, **common))
    raise ValueError(f"organism arch {cfg.arch!r}: supported are 'gpt2' and 'gptj'")


def pack_rows(texts: list[str], tok: PreTrainedTokenizerFast, max_sentences: int, max_tokens: int,
              rng: random.Random) -> list[list[int]]:
    """Token rows of 1..max_sentences consecutive (shuffled) sentences joined by spaces, each ending
    in EOS and at most max_tokens long.

    Single-sentence rows put every subject at the same few absolute positions; an editor's context
    prefixes (ROME's c_j) then move the subject somewhere the organism never recalled a fact from,
    and one delta has to serve prompts the model reads differently. Documents of several facts, as
    in real pre-training text, teach recall at any position.
    """
    rows, i = [], 0
    order = list(range(len(texts)))
    rng.shuffle(order)
    while i < len(order):
        take = rng.randint(1, max_sentences)
        while take > 1:
            row = tok(" ".join(texts[j] for j in order[i:i + take]))["input_ids"] + [tok.eos_token_id]
            if len(row) <= max_tokens:
                break
            take -= 1
        else:
            row = tok(texts[order[i]])["input_ids"] + [tok.eos_token_id]
        rows.append(row)
        i += take
    return rows


def length_bucketed_batches(lengths: list[int], batch_size: int, rng: random.Random
                            ) -> list[list[int]]:
    """Batches of similar length (less padding), in random order."""
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], rng.random()))
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    rng.shuffle(batches)
    return batches


def collate(encoded: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(ids) for ids in encoded)
    ids = torch.full((len(encoded), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(encoded), width), dtype=torch.long)
    for row, seq in enumerate(encoded):
        ids[row, :len(seq)] = torch.tensor(seq)
        mask[row, :len(seq)] = 1
    return ids, mask


def lr_at(step: int, total: int, cfg: OrganismConfig) -> float:
    """Linear warm-up then cosine decay to a tenth."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps))
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def known_fact_rates(model, tok, records: list[dict]) -> dict[str, float]:
    """Share of records whose rewrite prompt greedily yields the true object, per relation."""
    from wilke_lib.generation import greedy_matches

    rewrites = [r["requested_rewrite"] for r in records]
    hits = greedy_matches(model, tok, [q["prompt"].format(q["subject"]) for q in rewrites],
                          [q["target_true"]["str"] for q in rewrites])
    per_relation: dict[str, list[bool]] = defaultdict(list)
    for q, hit in zip(rewrites, hits):
        per_relation[q["relation_id"]].append(hit)
    rates = {rel: sum(v) / len(v) for rel, v in sorted(per_relation.items())}
    rates["all"] = sum(hits) / len(hits)
    return rates


def train(cfg: OrganismConfig, out_dir: Path, device: str | None = None) -> dict:
    """Train one organism from scratch and save it (weights, tokenizer, config, log) to out_dir."""
    device = torch.device(device) if device else default_device()
    torch.manual_seed(cfg.train_seed)
    rng = random.Random(cfg.train_seed)
    world = world_lib.build_world(cfg.world_seed)
    texts = world_lib.corpus(world)
    tok = train_tokenizer(texts, cfg.vocab_size)
    too_long = max(len(tok(t)["input_ids"]) + 1 for t in texts)
    if too_long > cfg.n_positions:
        raise ValueError(f"{cfg.name}: a corpus sentence has {too_long} tokens, more than "
                         f"n_positions={cfg.n_positions}")
    encoded = pack_rows(texts, tok, cfg.sentences_per_row, cfg.n_positions, rng)  # re-packed every epoch
    model = build_model(cfg, tok).to(device)
    optimiser = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay,
                                  betas=(0.9, 0.98))
    steps_per_epoch = math.ceil(len(encoded) / cfg.batch_size)
    total = cfg.epochs * steps_per_epoch
    history, step, started = [], 0, time.time()
    bar = tqdm(total=total, desc=f"training {cfg.name}", unit="step")
    for epoch in range(cfg.epochs):
        epoch_loss, n_batches = 0.0, 0
        if epoch:
            encoded = pack_rows(texts, tok, cfg.sentences_per_row, cfg.n_positions, rng)
        for batch in length_bucketed_batches([len(e) for e in encoded], cfg.batch_size, rng):
            ids, mask = collate([encoded[i] for i in batch], tok.pad_token_id)
            ids, mask = ids.to(device), mask.to(device)
            labels = ids.masked_fill(mask == 0, -100)
            for group in optimiser.param_groups:
                group["lr"] = lr_at(step, total, cfg)
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimiser.step()
            epoch_loss, n_batches, step = epoch_loss + loss.item(), n_batches + 1, step + 1
            bar.update()
        history.append({"epoch": epoch + 1, "step": step, "loss": epoch_loss / n_batches,
                        "seconds": round(time.time() - started, 1)})
        bar.set_postfix(loss=f"{history[-1]['loss']:.3f}")
    bar.close()
    model.eval()
    summary = {"config": asdict(cfg), "train_seconds": round(time.time() - started, 1),
               "device": str(device), "n_parameters": sum(p.numel() for p in model.parameters()),
               "n_facts": len(world.facts), "n_corpus_sentences": len(texts),
               "history": history, "torch": torch.__version__}
    save(model, tok, summary, out_dir)  # before the evaluation, so that a failure there loses nothing
    summary["known_fact_rate"] = known_fact_rates(
        model, tok, world_lib.counterfact_records(cfg.world_seed))
    save(model, tok, summary, out_dir)
    return summary


def save(model, tok, summary: dict, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    tok.save_pretrained(out_dir)
    (out_dir / "training.json").write_text(json.dumps(summary, indent=1))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--all", action="store_true", help="retrain every organism")
    parser.add_argument("--name", choices=sorted(ORGANISMS), action="append", default=[])
    parser.add_argument("--epochs", type=int, help="override the number of epochs")
    parser.add_argument("--out", type=Path, help="output directory (default organisms/<name>)")
    parser.add_argument("--device", help="cpu or cuda (default: cuda when present)")
    args = parser.parse_args(argv)
    names = sorted(ORGANISMS) if args.all else args.name
    if not names:
        parser.error("give --all or --name")
    logging.basicConfig(level=logging.INFO)
    for name in names:
        cfg = ORGANISMS[name] if args.epochs is None else replace(ORGANISMS[name],
                                                                   epochs=args.epochs)
        out = args.out or ORGANISM_DIR / name
        summary = train(cfg, out, args.device)
        print(f"{name}: trained in {summary['train_seconds']:.0f} s, "
              f"{summary['n_parameters'] / 1e6:.2f} M parameters, known-fact rate "
              f"{summary['known_fact_rate']['all']:.1%} of {summary['n_facts']} facts -> {out}")


if __name__ == "__main__":
    main()


def training_summary(name_or_path: str) -> dict | None:
    """The ``training.json`` saved with an organism, or None for a model the project did not train
    (gpt2-xl, a local checkpoint...)."""
    from wilke_lib.models import resolve_model_path

    try:
        path = Path(resolve_model_path(name_or_path)) / "training.json"
    except FileNotFoundError:
        return None
    return json.loads(path.read_text()) if path.is_file() else None
