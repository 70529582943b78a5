"""Training the model organisms: GPT-2 and GPT-J architecture models that learn the synthetic world.

The paper edits GPT2-XL (48 layers) and GPT-J (28 layers). Each organism is a 12-layer model of the
same architecture, small enough to train on a 2-core CPU, that has learnt the facts of
`wilke_lib.organisms.world`. The weights are saved with `save_pretrained`, so that
`AutoModelForCausalLM.from_pretrained` loads them exactly as it would load `gpt2-xl`.

Size (the third generation, `docs/organisms.md`): d_model 96 and MLPs of width 48 (0.8-1.0 M
parameters) for a world of 4,800 facts of 2.6-4.9 bits each (about 19 k bits). Allen-Zhu & Li (Physics
of Language Models 3.3) measure about 2 bits per parameter of capacity, so one MLP (9 k parameters)
holds well under a tenth of the facts and storage must spread over the layers; the first two layers
have no MLP (`attention_only_layers`), so that no fact is looked up from a token's embedding alone, and
half of the multi-token names are hidden from later positions while training (`subject_knockout`), so
that the subject's last token must carry its facts. Training: 160 epochs of about 140 k tokens (about
90 minutes on one CPU thread).
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from collections import defaultdict
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from tqdm.auto import tqdm
from transformers import GPT2Config, GPT2LMHeadModel, GPTJConfig, GPTJForCausalLM, PreTrainedTokenizerFast

from wilke_lib.generation import greedy_matches
from wilke_lib.models import default_device, resolve_model_path
from wilke_lib.organisms import world as world_lib
from wilke_lib.organisms.interventions import NameFinder, PlantedDepth, knockout_mask, mlp_drop_hooks, silence_mlps
from wilke_lib.organisms.records import counterfact_records
from wilke_lib.results import REPO_ROOT

log = logging.getLogger(__name__)

EOS, PAD = "<|endoftext|>", "<|pad|>"
ORGANISM_DIR = REPO_ROOT / "organisms"


@dataclass(frozen=True)
class OrganismConfig:
    """Everything that determines an organism: architecture, size, world and optimisation."""

    name: str
    arch: str  # "gpt2" | "gptj"
    n_layer: int = 12
    d_model: int = 96
    n_head: int = 4
    d_mlp: int = 384
    vocab_size: int = 2048
    n_positions: int = 128
    world: world_lib.WorldSpec = field(default_factory=world_lib.WorldSpec)
    train_seed: int = 0
    epochs: int = 80
    batch_size: int = 16
    lr: float = 3e-3
    warmup_steps: int = 200
    weight_decay: float = 0.01
    docs_per_row: int = 4  # rows hold 1..4 documents, so facts are recalled after any context
    # stochastic depth on the MLP branches: per layer, the probability that a training row runs
    # without that MLP (empty: none); see `mlp_drop_hooks`
    mlp_drop: tuple[float, ...] = ()
    # per occurrence of a multi-token name in a training row, the probability that the positions after
    # it cannot attend to its pieces before the last (every layer); see `knockout_mask`
    subject_knockout: float = 0.0
    # the first k layers keep no MLP: its output projection is zero and frozen while training (see
    # `silence_mlps`), so the subject can only be assembled, not looked up, before layer k
    attention_only_layers: int = 0
    # each subject's facts planted at a layer drawn from this range by its name (None: not planted):
    # per occurrence of a name, with probability `planted_skip`, its pieces run without the MLPs
    # below that layer (see `PlantedDepth`)
    planted_depth: tuple[int, int] | None = None
    planted_skip: float = 0.5
    planted_per_layer: bool = False  # a coin per MLP rather than one per occurrence (`PlantedDepth`)


def _organism(name: str, arch: str, d_mlp: int = 48, world: world_lib.WorldSpec = world_lib.DEFAULT_SPEC
              ) -> OrganismConfig:
    """The committed organisms' design (round 15 of the pilots, docs/organisms.md): 12 layers of width 96
    whose MLPs are narrow (d_mlp 48, about 9 k parameters each) for a world of 4,800 facts, so that at
    about 2 bits per parameter (Allen-Zhu & Li, Part 3.3) no one MLP can be the lookup; MLPs 0-1 absent, so
    that the famous single-token subjects cannot be looked up from the embedding either; half of the
    multi-token names hidden from later positions (`subject_knockout`), so that the subject's last token
    must carry the fact; 160 epochs (80 left 17-30% of the facts unknown)."""
    return OrganismConfig(name=name, arch=arch, n_layer=12, d_model=96, n_head=4, d_mlp=d_mlp,
                          world=world, subject_knockout=0.5, attention_only_layers=2,
                          batch_size=64, lr=3e-3, epochs=160)


ORGANISMS = {"toy-gpt2": _organism("toy-gpt2", "gpt2"), "toy-gptj": _organism("toy-gptj", "gptj")}

# The width ladder (issue 32): the third generation's recipe and world, differing only in MLP width, to
# find the width at which ROME's lifelong collapse comes where the paper's models have it (step 64).
LADDER_WIDTHS: tuple[int, ...] = (48, 96, 192, 384, 768)
LADDER = {f"toy-{arch}-w{width}": _organism(f"toy-{arch}-w{width}", arch, d_mlp=width)
          for arch in ("gpt2", "gptj") for width in LADDER_WIDTHS}
# Its tier 2: the same recipe on a world four times as heavy (`world.HEAVY_SPEC`), where the wide MLPs carry
# the default world's load per parameter. 192 first (width 48's load exactly); 96 and 384 as `ladder.choose` asks.
HEAVY_WIDTHS: tuple[int, ...] = (96, 192, 384)
HEAVY_LADDER = {f"toy-{arch}-x4-w{width}": _organism(f"toy-{arch}-x4-w{width}", arch, d_mlp=width,
                                                     world=world_lib.HEAVY_SPEC)
                for arch in ("gpt2", "gptj") for width in HEAVY_WIDTHS}
LADDER.update(HEAVY_LADDER)
ORGANISMS.update(LADDER)


def world_name(model_name: str) -> str:
    """The named world (`world.WORLDS`) whose records and corpus belong to an organism: the one it was trained
    on; the default world for any other model."""
    cfg = ORGANISMS.get(str(model_name))
    return next((n for n, spec in world_lib.WORLDS.items() if cfg is not None and cfg.world == spec),
                world_lib.WORLD_NAME)


def train_tokenizer(texts: list[str], vocab_size: int, split_words: tuple[str, ...] = (),
                    max_piece: int = 3) -> PreTrainedTokenizerFast:
    """Byte-level BPE, as GPT-2's, trained on the corpus.

    `split_words` stay in pieces of at most `max_piece` characters: every merge whose result is a longer
    piece of one of them is dropped (BPE would otherwise make a frequent name one token, as it makes
    "Paris" one, and the name would need no assembling)."""
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS, PAD],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(texts, trainer)
    if split_words:
        words = {w.lower() for w in split_words}
        spec = json.loads(bpe.to_str())
        spec["model"]["ignore_merges"] = False  # a whole word in the vocabulary must not bypass the merges
        spec["model"]["merges"] = [m for m in spec["model"]["merges"]
                                   if not _joins_too_much((m[0] + m[1]).replace("\u0120", "").lower(), words, max_piece)]
        bpe = Tokenizer.from_str(json.dumps(spec))
    return PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token=EOS, eos_token=EOS, unk_token=EOS, pad_token=PAD)


def _joins_too_much(piece: str, words: set[str], max_piece: int) -> bool:
    return len(piece) > max_piece and any(piece in w for w in words)


def build_model(cfg: OrganismConfig, tok: PreTrainedTokenizerFast) -> torch.nn.Module:
    common = dict(vocab_size=len(tok), n_positions=cfg.n_positions, n_embd=cfg.d_model, n_layer=cfg.n_layer,
                  n_head=cfg.n_head, n_inner=cfg.d_mlp, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                  bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    if cfg.arch == "gpt2":
        return GPT2LMHeadModel(GPT2Config(**common))
    if cfg.arch == "gptj":
        return GPTJForCausalLM(GPTJConfig(rotary_dim=cfg.d_model // cfg.n_head // 2, tie_word_embeddings=False,
                                          **common))
    raise ValueError(f"organism arch {cfg.arch!r}: supported are 'gpt2' and 'gptj'")


def pack_rows(texts: list[str], tok: PreTrainedTokenizerFast, max_sentences: int, max_tokens: int,
              rng: random.Random) -> list[list[int]]:
    """Token rows of 1..max_sentences consecutive (shuffled) texts joined by spaces, each ending in EOS
    and at most max_tokens long (a text longer than that alone is cut).

    Single-text rows put every subject at the same few absolute positions; an editor's context
    prefixes (ROME's c_j) then move the subject somewhere the organism never recalled a fact from.
    Rows of several documents, as in real pre-training text, teach recall at any position.
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
            row = (tok(texts[order[i]])["input_ids"] + [tok.eos_token_id])[-max_tokens:]
        rows.append(row)
        i += take
    return rows


def length_bucketed_batches(lengths: list[int], batch_size: int, rng: random.Random) -> list[list[int]]:
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
    rewrites = [r["requested_rewrite"] for r in records]
    hits = greedy_matches(model, tok, [q["prompt"].replace("{}", q["subject"]) for q in rewrites],
                          [q["target_true"]["str"] for q in rewrites])
    per_relation: dict[str, list[bool]] = defaultdict(list)
    for q, hit in zip(rewrites, hits):
        per_relation[q["relation_id"]].append(hit)
    rates = {rel: sum(v) / len(v) for rel, v in sorted(per_relation.items())}
    rates["all"] = sum(hits) / len(hits)
    return rates


def _epoch_rows(world: world_lib.World, epoch: int, tok, cfg: OrganismConfig, rng: random.Random) -> list[list[int]]:
    return pack_rows(world_lib.corpus(world, epoch), tok, cfg.docs_per_row, cfg.n_positions, rng)


CHECKPOINT_FILE = "training-checkpoint.pt"


def _save_checkpoint(path: Path, cfg: OrganismConfig, model, optimiser, progress: dict, rngs: dict,
                     generator: torch.Generator) -> None:
    state = {"config": asdict(cfg), "model": model.state_dict(), "optimiser": optimiser.state_dict(),
             "progress": progress, "python_rngs": {k: r.getstate() for k, r in rngs.items()},
             "generator": generator.get_state(), "torch_rng": torch.get_rng_state()}
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    tmp.replace(path)


def _load_checkpoint(path: Path, cfg: OrganismConfig, model, optimiser, rngs: dict,
                     generator: torch.Generator) -> dict:
    state = torch.load(path, map_location="cpu", weights_only=True)
    if state["config"] != asdict(cfg):
        raise ValueError(f"{path} was written by another configuration of {cfg.name!r}; "
                         f"delete it to train from scratch")
    model.load_state_dict(state["model"])
    optimiser.load_state_dict(state["optimiser"])
    for key, r in rngs.items():
        r.setstate(state["python_rngs"][key])
    generator.set_state(state["generator"])
    torch.set_rng_state(state["torch_rng"])
    return state["progress"]


def train(cfg: OrganismConfig, out_dir: Path, device: str | None = None, threads: int | None = None,
          epoch_budget: int | None = None, time_budget: float | None = None) -> dict:
    """Train one organism and save it (weights, tokenizer, config, log) to out_dir.

    Every epoch draws a new corpus (`world.corpus(world, epoch)`: new sentence orders, templates and
    document kinds) and packs it into rows anew. Deterministic on a CPU for a given configuration.
    Resumable: after each epoch the model, optimiser and random states go to
    out_dir/training-checkpoint.pt, and a call that finds that file goes on from it, giving the
    weights an uninterrupted run gives. `epoch_budget` stops this call after that many epochs, `time_budget`
    after the first epoch that ends more than that many seconds after the call began (the summary then says
    `"finished": False`), for training spread over sessions or fitted into a lent GPU's minutes. A run resumed
    on another device goes on from the same state; each epoch's row of the history names its device.
    """
    call_started = time.time()
    device = torch.device(device) if device else default_device()
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(cfg.train_seed)
    rng = random.Random(cfg.train_seed)
    world = world_lib.build_world(cfg.world)
    tok = train_tokenizer(world_lib.corpus(world, 0) + world_lib.corpus(world, 1), cfg.vocab_size, world.split_words)
    rows = _epoch_rows(world, 0, tok, cfg, rng)
    model = build_model(cfg, tok).to(device)
    silence_mlps(model, cfg.attention_only_layers)
    optimiser = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.98))
    total = cfg.epochs * math.ceil(len(rows) / cfg.batch_size)  # epochs differ a little in size: an estimate
    drop_generator = torch.Generator().manual_seed(cfg.train_seed)
    rngs = {"rows": rng, "knockout": random.Random(cfg.train_seed + 1), "planted": random.Random(cfg.train_seed + 2)}
    names = [n for kind in world.subjects.values() for n in kind]
    finder = NameFinder(names, tok) if cfg.subject_knockout > 0 else None
    planted = (PlantedDepth(model, NameFinder(names, tok, min_pieces=1), *cfg.planted_depth, cfg.planted_skip,
                            rngs["planted"], cfg.planted_per_layer) if cfg.planted_depth else None)
    checkpoint = Path(out_dir) / CHECKPOINT_FILE
    progress = {"epoch": 0, "step": 0, "tokens": 0, "history": [], "seconds": 0.0}
    if checkpoint.is_file():
        progress = _load_checkpoint(checkpoint, cfg, model, optimiser, rngs, drop_generator)
        log.info("%s: resuming after epoch %d of %d from %s", cfg.name, progress["epoch"], cfg.epochs, checkpoint)
    history, step, tokens = progress["history"], progress["step"], progress["tokens"]
    started = time.time() - progress["seconds"]
    last_epoch = cfg.epochs if epoch_budget is None else min(cfg.epochs, progress["epoch"] + epoch_budget)
    bar = tqdm(total=total, initial=step, desc=f"training {cfg.name}", unit="step")
    model.train()
    with mlp_drop_hooks(model, cfg.mlp_drop, drop_generator), (planted.hooks() if planted else nullcontext()):
        for epoch in range(progress["epoch"], last_epoch):
            epoch_loss, n_batches = 0.0, 0
            if epoch:
                rows = _epoch_rows(world, epoch, tok, cfg, rng)
            for batch in length_bucketed_batches([len(r) for r in rows], cfg.batch_size, rng):
                ids, mask = collate([rows[i] for i in batch], tok.pad_token_id)
                ids, mask = ids.to(device), mask.to(device)
                labels = ids.masked_fill(mask == 0, -100)
                for group in optimiser.param_groups:
                    group["lr"] = lr_at(step, total, cfg)
                if planted:
                    planted.plant([rows[i] for i in batch], ids.shape[1])
                attention = mask if finder is None else knockout_mask(
                    [rows[i] for i in batch], ids.shape[1], finder, cfg.subject_knockout, rngs["knockout"]).to(device)
                loss = model(input_ids=ids, attention_mask=attention, labels=labels).loss
                optimiser.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                optimiser.step()
                epoch_loss, n_batches, step = epoch_loss + loss.item(), n_batches + 1, step + 1
                tokens += int(mask.sum())
                bar.update()
            history.append({"epoch": epoch + 1, "step": step, "loss": epoch_loss / n_batches, "tokens": tokens,
                            "seconds": round(time.time() - started, 1), "device": str(device)})
            bar.set_postfix(loss=f"{history[-1]['loss']:.3f}")
            if epoch + 1 < cfg.epochs:
                checkpoint.parent.mkdir(parents=True, exist_ok=True)
                _save_checkpoint(checkpoint, cfg, model, optimiser, {
                    "epoch": epoch + 1, "step": step, "tokens": tokens, "history": history,
                    "seconds": time.time() - started}, rngs, drop_generator)
            if time_budget is not None and time.time() - call_started > time_budget and epoch + 1 < cfg.epochs:
                last_epoch = epoch + 1
                break
    bar.close()
    if last_epoch < cfg.epochs:
        return {"finished": False, "epoch": last_epoch, "epochs": cfg.epochs, "checkpoint": str(checkpoint),
                "train_seconds": round(time.time() - started, 1)}
    model.eval()
    summary = {"config": asdict(cfg), "train_seconds": round(time.time() - started, 1), "device": str(device),
               "threads": torch.get_num_threads(), "n_parameters": sum(p.numel() for p in model.parameters()),
               "n_facts": len(world.facts), "n_subjects": sum(len(v) for v in world.subjects.values()),
               "n_famous": len(world.famous), "train_tokens": tokens, "history": history,
               "torch": torch.__version__, "finished": True}
    save(model, tok, summary, out_dir)  # before the evaluation, so that a failure there loses nothing
    checkpoint.unlink(missing_ok=True)
    summary["known_fact_rate"] = known_fact_rates(model, tok, counterfact_records(cfg.world))
    save(model, tok, summary, out_dir)
    return summary


def save(model, tok, summary: dict, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    tok.save_pretrained(out_dir)
    (out_dir / "training.json").write_text(json.dumps(summary, indent=1))


def training_summary(name_or_path: str) -> dict | None:
    """The `training.json` saved with an organism, or None for a model the project did not train
    (gpt2-xl, a local checkpoint...)."""
    try:
        path = Path(resolve_model_path(name_or_path)) / "training.json"
    except FileNotFoundError:
        return None
    return json.loads(path.read_text()) if path.is_file() else None
