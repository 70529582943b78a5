"""Speed of ROME, MEMIT and WilKE at a real model's size (`make bench-scale`, issue #33).

A randomly initialised model of GPT2-XL's shape (48 layers, d_model 1,600, MLP 6,400, vocabulary
50,257; `GPT2Config`, nothing downloaded) or, as an option, GPT-J-6B's (28 layers, d_model 4,096, MLP
16,384, rotary, vocabulary 50,400), edited through the public API only: the editors' gpt2-xl /
gpt-j-6b settings (`wilke_lib.hparams.load_hparams`) with a FIXED number of optimisation steps (early
stopping off, `v_early_stop_loss` 0), `wilke_lib.editing.edit` and one `EditCache`.

* Tokenizer: a word-level `PreTrainedTokenizerFast` built here (`build_tokenizer`): the words of the
  benchmark's requests and corpus, then `tok<i>` filler words up to the shape's vocabulary size, so
  that every id of the model's unembedding is a real token (the context prefixes ROME samples from
  the random model decode and re-encode exactly).
* Statistics: C = E[k k^T] from a small synthetic corpus through the supported hook, `mom2_corpus`
  naming a local text file (one text per line, `organisms.world.load_corpus`): `synthetic_corpus`
  writes fact-like sentences padded with random vocabulary words. With fewer token positions than
  the MLP width C is singular, so the settings add `mom2_ridge` (default 1e-2 * mean diag C): the
  statistics' quality does not change the time of an edit. C and C^-1 of every layer a variant may
  edit are computed before any timing (`prepare`).
* Released ROME (github.com/kmeng01/rome): `load_released_rome(path)` imports `rome/compute_v.py`,
  `rome/repr_tools.py`, `rome/rome_hparams.py` and `util/nethook.py` from a local checkout at run time
  (nothing is copied into this project). `rome/__init__.py` is not executed (it imports compute_u ->
  layer_stats -> the `datasets` package and reads ./globals.yml); on a device other than CUDA the
  device strings "cuda" hard-coded in compute_v.py are replaced by the model's device in memory.
  `released_rome_edit` is the released edit with the statistics injected: compute_u's key (the
  released repr_tools, averaged over the same context templates) times our C^-1, the released
  compute_v (whole prompts through the whole model every step, its own early stop at loss 5e-2, which
  cannot be switched off: the steps it ran are recorded), the rank-one update applied as rome_main.

Measured per edit: wall time (CUDA synchronised), the resident set (CPU: VmRSS before and after,
VmHWM reset before the edit for the peak; CUDA: memory_allocated and max_memory_allocated) - so that
a copy of the model or a leak shows as a peak or a growth of the model's size.

The module is longer than 400 lines: the random model, its tokenizer and corpus, the released code's
edit and the measurement are one benchmark, and are read together.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import importlib
import io
import json
import math
import os
import random
import re
import statistics
import subprocess
import sys
import time
import types
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from wilke_lib import editing
from wilke_lib.arch import ModelAdapter
from wilke_lib.editors.cache import EditCache
from wilke_lib.hparams import load_hparams

GIB = 2 ** 30
EOS, PAD, UNK = "<|endoftext|>", "<pad>", "<unk>"


# ---- shapes -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Shape:
    """A model shape: architecture, sizes, and the model whose editor settings it uses."""

    name: str
    arch: str  # "gpt2" | "gptj"
    n_layers: int
    d_model: int
    n_heads: int
    d_mlp: int
    vocab_size: int
    n_positions: int
    hparams_model: str  # wilke_lib/hparams/<editor>/<hparams_model>.yaml
    reference_layers: int  # layers of the model the settings were written for (layers are rescaled)
    rotary_dim: int | None = None
    released_hparams: str = "gpt2-xl.json"  # the released code's hparams/ROME/<file>

    def config(self):
        if self.arch == "gpt2":
            from transformers import GPT2Config
            return GPT2Config(n_layer=self.n_layers, n_embd=self.d_model, n_head=self.n_heads, n_inner=self.d_mlp,
                              vocab_size=self.vocab_size, n_positions=self.n_positions, bos_token_id=0,
                              eos_token_id=0, pad_token_id=1)
        if self.arch == "gptj":
            from transformers import GPTJConfig
            return GPTJConfig(n_layer=self.n_layers, n_embd=self.d_model, n_head=self.n_heads, n_inner=self.d_mlp,
                              rotary_dim=self.rotary_dim, vocab_size=self.vocab_size, n_positions=self.n_positions,
                              bos_token_id=0, eos_token_id=0, pad_token_id=1)
        raise ValueError(f"unknown architecture {self.arch!r}")

    def model_class(self):
        from transformers import GPT2LMHeadModel, GPTJForCausalLM
        return {"gpt2": GPT2LMHeadModel, "gptj": GPTJForCausalLM}[self.arch]

    def n_parameters(self) -> int:
        """Parameters of the model, counted on the meta device (nothing allocated)."""
        with torch.device("meta"):
            model = self.model_class()(self.config())
        return sum(p.numel() for p in model.parameters())


SHAPES: dict[str, Shape] = {
    "gpt2-xl": Shape("gpt2-xl", "gpt2", 48, 1600, 25, 6400, 50257, 1024, "gpt2-xl", 48),
    "gptj": Shape("gptj", "gptj", 28, 4096, 16, 16384, 50400, 2048, "gpt-j-6b", 28, rotary_dim=64,
                  released_hparams="EleutherAI_gpt-j-6B.json"),
    # the tests' shapes: GPT2-XL's and GPT-J's settings with the layers rescaled to 2
    "tiny": Shape("tiny", "gpt2", 2, 32, 4, 128, 600, 128, "gpt2-xl", 48),
    "tiny-gptj": Shape("tiny-gptj", "gptj", 2, 32, 4, 128, 600, 128, "gpt-j-6b", 28, rotary_dim=4,
                       released_hparams="EleutherAI_gpt-j-6B.json"),
}


def get_shape(name: str) -> Shape:
    if name not in SHAPES:
        raise ValueError(f"unknown shape {name!r}; expected one of {sorted(SHAPES)}")
    return SHAPES[name]


def rescale_layers(layers: Sequence[int], shape: Shape) -> list[int]:
    """Layers of the settings' reference model mapped onto `shape` (identity when the depths agree)."""
    if shape.n_layers == shape.reference_layers:
        return list(layers)
    return sorted({min(shape.n_layers - 1, round(l * shape.n_layers / shape.reference_layers)) for l in layers})


# ---- tokenizer, requests, corpus --------------------------------------------------------------

REQUESTS: list[dict] = [
    {"prompt": "The mother tongue of {} is", "subject": "Danielle Darrieux",
     "target_new": {"str": "English"}, "target_true": {"str": "French"}},
    {"prompt": "{} is a citizen of", "subject": "Toko Yasuda", "target_new": {"str": "Norway"},
     "target_true": {"str": "Japan"}},
    {"prompt": "The capital city of {} is", "subject": "Valo Durn", "target_new": {"str": "Oslo"},
     "target_true": {"str": "Rome"}},
    {"prompt": "{} plays the", "subject": "Mira Quell", "target_new": {"str": "violin"},
     "target_true": {"str": "guitar"}},
    {"prompt": "{} works in the field of", "subject": "Orrin Pike", "target_new": {"str": "music"},
     "target_true": {"str": "physics"}},
    {"prompt": "{} was born in", "subject": "Sela Varn", "target_new": {"str": "Paris"},
     "target_true": {"str": "Madrid"}},
]
"""CounterFact-like requests with one-word targets (the released compute_v appends the decoded target
prefix to the prompt without a space, which only a one-token target survives under a word-level
tokenizer)."""

_TEMPLATES = ["The mother tongue of {} is {} .", "{} is a citizen of {} .", "The capital city of {} is {} .",
              "{} plays the {} .", "{} works in the field of {} .", "{} was born in {} ."]


def _words() -> list[str]:
    words: list[str] = []
    for r in REQUESTS:
        words += (r["prompt"] + " " + r["subject"] + " " + r["target_new"]["str"] + " "
                  + r["target_true"]["str"]).replace("{}", " ").split()
    for t in _TEMPLATES:
        words += t.replace("{}", " ").split()
    words += ["is", "a", ".", ",", "and", "the"]
    return list(dict.fromkeys(words))


def build_tokenizer(vocab_size: int, model_max_length: int = 1024):
    """A word-level tokenizer of exactly `vocab_size` tokens: <|endoftext|> (id 0, BOS/EOS), <pad>,
    <unk>, the benchmark's words, then "tok<i>" fillers."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = [EOS, PAD, UNK] + _words()
    if vocab_size < len(words):
        raise ValueError(f"vocab_size {vocab_size} < the {len(words)} words the benchmark needs")
    words += [f"tok{i}" for i in range(len(words), vocab_size)]
    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token=UNK))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=EOS, bos_token=EOS, pad_token=PAD,
                                   unk_token=UNK, model_max_length=model_max_length)


def synthetic_corpus(path: Path, vocab_size: int, n_texts: int, words_per_text: int, seed: int = 0) -> Path:
    """Write `n_texts` lines: a fact-like sentence followed by random vocabulary words (about
    `words_per_text` tokens each). Deterministic for a given seed (so is its statistics cache key)."""
    rng = random.Random(seed)
    subjects = [r["subject"] for r in REQUESTS]
    objects = [r[k]["str"] for r in REQUESTS for k in ("target_new", "target_true")]
    n_fixed = 3 + len(_words())
    lines = []
    for _ in range(n_texts):
        sentence = rng.choice(_TEMPLATES).format(rng.choice(subjects), rng.choice(objects)).split()
        tail = [f"tok{rng.randrange(n_fixed, vocab_size)}" if vocab_size > n_fixed else "the"
                for _ in range(max(0, words_per_text - len(sentence)))]
        lines.append(" ".join(sentence + tail))
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "\n".join(lines) + "\n"
    if not path.is_file() or path.read_text() != text:
        path.write_text(text)
    return path


# ---- variants and settings --------------------------------------------------------------------

@dataclass(frozen=True)
class Variant:
    name: str
    editor: str  # "rome" | "memit" | "wilke" | "rome-released"
    runner: str  # "prefix-cache" | "full" | "released"
    search: str | None = None


VARIANTS: dict[str, Variant] = {v.name: v for v in [
    Variant("rome", "rome", "prefix-cache"),
    Variant("rome-full", "rome", "full"),
    Variant("memit", "memit", "prefix-cache"),
    Variant("memit-full", "memit", "full"),
    Variant("wilke-batched", "wilke", "prefix-cache", "batched"),
    Variant("wilke-sequential", "wilke", "prefix-cache", "sequential"),
    Variant("wilke-sequential-full", "wilke", "full", "sequential"),
    Variant("rome-released", "rome-released", "released"),
]}
"""rome / memit: delta_runner "prefix-cache" (the prefix computed once per edit, each step from the
edited layer up) or "full" (whole prompts through the whole model every step, as the released code).
wilke-batched: every candidate layer's delta optimised together (always on the prefix cache: the
batched search does not read delta_runner); wilke-sequential(-full): one layer at a time, as the
released WilKE code, on either runner. rome-released: the released ROME code's compute_v
(`released_rome_edit`)."""


@dataclass
class Settings:
    """What every variant shares: steps, statistics corpus, ridge, layers."""

    steps: int
    corpus: Path
    n_texts: int
    max_length: int
    ridge: float
    batch_size: int = 8
    wilke_layers: list[int] | None = None  # None: the settings file's candidates (rescaled)


def variant_hparams(variant: Variant, shape: Shape, settings: Settings, steps: int | None = None) -> Any:
    """The settings of `variant`: the shape's YAML, its layers rescaled to the shape, with a fixed number
    of steps (early stopping off), the synthetic corpus and the ridge."""
    editor = "rome" if variant.editor == "rome-released" else variant.editor
    hp = load_hparams(editor, shape.hparams_model)
    fields: dict[str, Any] = dict(
        v_num_grad_steps=int(steps or settings.steps), v_early_stop_loss=0.0,
        mom2_corpus=str(settings.corpus), mom2_n_samples=settings.n_texts, mom2_max_length=settings.max_length,
        mom2_batch_size=settings.batch_size, mom2_ridge=settings.ridge,
        delta_runner="full" if variant.runner == "full" else "prefix-cache")
    if editor == "rome":
        fields["layer"] = rescale_layers([hp.layer], shape)[0]
    elif editor == "memit":
        fields["layers"] = rescale_layers(hp.layers, shape)
    else:
        layers = settings.wilke_layers if settings.wilke_layers is not None else rescale_layers(
            hp.candidate_layers if hp.candidate_layers is not None else range(shape.reference_layers), shape)
        bad = [l for l in layers if not 0 <= l < shape.n_layers]
        if bad:
            raise ValueError(f"WilKE candidate layers {bad} out of range for {shape.name} ({shape.n_layers} layers)")
        fields.update(candidate_layers=list(layers), search=variant.search or "batched")
    return dataclasses.replace(hp, **fields)


def edited_layers(hp: Any) -> list[int]:
    """Every layer an edit with `hp` may change (ROME: its layer; MEMIT: its layers; WilKE: the candidates)."""
    if hasattr(hp, "candidate_layers"):
        return list(hp.candidate_layers)
    if hasattr(hp, "layers"):
        return list(hp.layers)
    return [hp.layer]


def optimised_layers(variant: Variant, hp: Any) -> int:
    """How many deltas one edit optimises (MEMIT: one, at its last layer)."""
    return len(hp.candidate_layers) if variant.editor == "wilke" else 1


# ---- memory -------------------------------------------------------------------------------------

def memory_estimate(shape: Shape, settings: Settings, variants: Sequence[Variant], n_params: int,
                    stats_chunk: int) -> dict[str, float]:
    """Bytes the run needs (a rough upper estimate, computed before anything is allocated): the float32
    weights; C (float32) of every layer a variant edits and C^-1 of those ROME and WilKE invert; the
    float64 accumulators of one statistics pass (`stats_chunk` layers); and the working memory of one
    edit (activations of the whole prompts kept for the backward pass, the logits) with the restored
    weights' snapshots."""
    hps = [(v, variant_hparams(v, shape, settings)) for v in variants]
    c_layers = sorted({l for _, hp in hps for l in edited_layers(hp)})
    inv_layers = sorted({l for v, hp in hps if v.editor != "memit" for l in edited_layers(hp)})
    c_bytes = shape.d_mlp ** 2 * 4
    rows = 21 * 24  # ROME's 21 prompts of up to ~24 tokens
    per_row_layer = (8 * shape.d_model + 3 * shape.d_mlp + shape.n_heads * 24) * 4
    activations = rows * shape.n_layers * per_row_layer + 3 * rows * shape.vocab_size * 4
    wilke_candidates = max((len(hp.candidate_layers) for v, hp in hps if v.editor == "wilke"), default=0)
    if any(v.search == "batched" for v in variants):  # batched search: a few rows per candidate and prompt
        activations = max(activations, 21 * 6 * wilke_candidates * shape.n_layers * per_row_layer)
    est = {"weights": n_params * 4, "C": len(c_layers) * c_bytes, "C_inv": len(inv_layers) * c_bytes,
           "stats_pass": min(stats_chunk, max(1, len(c_layers))) * shape.d_mlp ** 2 * 8,
           "edit_working": activations + len(c_layers) * shape.d_model * shape.d_mlp * 4}
    est["total"] = est["weights"] + est["C"] + est["C_inv"] + max(est["stats_pass"], est["edit_working"])
    return est


def available_memory(device: torch.device) -> tuple[float, str]:
    """(bytes available, what that is): free CUDA memory, or MemAvailable of /proc/meminfo."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return float(free), f"free memory of {torch.cuda.get_device_name(device)}"
    try:
        text = Path("/proc/meminfo").read_text()
        kb = int(re.search(r"^MemAvailable:\s+(\d+) kB", text, re.MULTILINE).group(1))
        return kb * 1024.0, "MemAvailable of this machine"
    except (OSError, AttributeError):
        import psutil  # noqa: PLC0415 -- only where /proc/meminfo is missing
        return float(psutil.virtual_memory().available), "available memory"


class DoesNotFit(RuntimeError):
    """The shape's model and statistics need more memory than there is (raised before allocating)."""


def check_fits(shape: Shape, estimate: dict[str, float], limit_bytes: float, where: str) -> None:
    if estimate["total"] > limit_bytes:
        parts = ", ".join(f"{k} {v / GIB:.1f}" for k, v in estimate.items() if k != "total")
        raise DoesNotFit(
            f"shape {shape.name!r} ({shape.n_layers} layers, d_model {shape.d_model:,}, MLP {shape.d_mlp:,}) does not "
            f"fit: it needs about {estimate['total'] / GIB:.1f} GiB in float32 ({parts} GiB) and {where} allows "
            f"{limit_bytes / GIB:.1f} GiB. Nothing was allocated. Run it on a larger machine or GPU (e.g. an 80 GB "
            f"GPU: --device cuda), or with fewer WilKE candidates (--wilke-layers).")


def _status_kb(field: str) -> int | None:
    try:
        match = re.search(rf"^{field}:\s+(\d+)\s+kB", Path("/proc/self/status").read_text(), re.MULTILINE)
    except OSError:
        return None
    return int(match.group(1)) if match else None


def _trim() -> None:
    """Give freed heap memory back to the system (glibc), so that VmRSS after an edit is what is held."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


class MemoryProbe:
    """Memory around one block, in MiB: `before`, `after` (held when it ended) and `peak` (the highest
    during it). CPU: VmRSS / VmHWM of the process (VmHWM reset through /proc/self/clear_refs; if that
    is refused, ru_maxrss, the process's peak, an upper bound). CUDA: memory_allocated /
    max_memory_allocated."""

    def __init__(self, device: torch.device) -> None:
        self.device = torch.device(device)
        self.before = self.after = self.peak = float("nan")
        self.method = ""

    def __enter__(self) -> "MemoryProbe":
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.before = torch.cuda.memory_allocated(self.device) / 2 ** 20
            self.method = "cuda memory_allocated / max_memory_allocated"
            return self
        _trim()
        self.before = (_status_kb("VmRSS") or 0) / 1024
        try:
            Path("/proc/self/clear_refs").write_text("5")
            self.method = "VmRSS, VmHWM (reset before the edit)"
        except OSError:
            self.method = "VmRSS, ru_maxrss (process peak: an upper bound)"
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device) / 2 ** 20
            self.after = torch.cuda.memory_allocated(self.device) / 2 ** 20
            return
        if "VmHWM" in self.method:
            self.peak = (_status_kb("VmHWM") or 0) / 1024
        else:
            import resource  # noqa: PLC0415
            self.peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        _trim()
        self.after = (_status_kb("VmRSS") or 0) / 1024


def current_mib(device: torch.device) -> float:
    if torch.device(device).type == "cuda":
        return torch.cuda.memory_allocated(device) / 2 ** 20
    _trim()
    return (_status_kb("VmRSS") or 0) / 1024


# ---- model and preparation --------------------------------------------------------------------

def build_model(shape: Shape, device: torch.device, seed: int = 0) -> nn.Module:
    """The randomly initialised float32 model of `shape` (HF's initialisation, std 0.02), built on
    `device`, in eval mode."""
    torch.manual_seed(seed)
    with torch.device(device):
        model = shape.model_class()(shape.config())
    model.config._name_or_path = f"random-{shape.name}-seed{seed}"
    return model.eval()


def prepare(model: nn.Module, tok, hps: Sequence[Any], cache: EditCache, stats_chunk: int = 8,
            log: Callable[[str], None] | None = print) -> dict[str, float]:
    """ROME's context prefixes, C of every layer a variant edits (passes over the corpus of at most
    `stats_chunk` layers each, or read from the cache on disk) and C^-1 of the layers ROME and WilKE
    invert, before any timing. Returns the seconds each part took (one-off costs of a model)."""
    device = next(model.parameters()).device
    seconds: dict[str, float] = {}
    start = time.perf_counter()
    cache.get_prefixes(model, tok, hps[0])
    seconds["prefixes_s"] = time.perf_counter() - start
    by_settings: dict[tuple, tuple[Any, set[int]]] = {}
    for hp in hps:
        key = (hp.mom2_corpus, hp.mom2_n_samples, hp.mom2_max_length, hp.mom2_ridge)
        by_settings.setdefault(key, (hp, set()))[1].update(edited_layers(hp))
    start = time.perf_counter()
    for hp, layers in by_settings.values():
        layers = sorted(layers)
        for first in range(0, len(layers), stats_chunk):
            chunk = layers[first:first + stats_chunk]
            if log:
                log(f"  statistics C of layers {chunk} (read from the cache on disk if there) ...")
            cache.get_mom2(model, tok, chunk, hp)
    seconds["statistics_s"] = time.perf_counter() - start
    inverted = []
    start = time.perf_counter()
    for hp in hps:
        if not hasattr(hp, "mom2_update_weight"):  # ROME and WilKE invert C; MEMIT solves its own system
            for l in edited_layers(hp):
                if (l, hp.mom2_ridge) in inverted:
                    continue
                if log:
                    log(f"  C^-1 of layer {l} (float64 eigendecomposition) ...")
                cache.get_mom2_inv(model, tok, l, hp)
                sync(device)
                inverted.append((l, hp.mom2_ridge))
    seconds["inverse_s_per_layer"] = (time.perf_counter() - start) / len(inverted) if inverted else float("nan")
    if log:
        log("  one-off costs: " + ", ".join(f"{k} {v:,.1f}" for k, v in seconds.items()))
    return seconds


class WeightSnapshot:
    """W_proj of the layers the variants may touch, to put back after every timed edit."""

    def __init__(self, model: nn.Module, layers: Sequence[int]) -> None:
        self.adapter = ModelAdapter(model)
        self.saved = {l: self.adapter.out_weight(l).detach().clone() for l in sorted(set(layers))}

    def restore(self) -> None:
        for l, w in self.saved.items():
            self.adapter.set_out_weight(l, w)

    def changed(self) -> list[int]:
        return [l for l, w in self.saved.items() if not torch.equal(self.adapter.out_weight(l), w)]


def sync(device: torch.device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


# ---- the released ROME code -------------------------------------------------------------------

RELEASED_FILES = ("rome/compute_v.py", "rome/repr_tools.py", "rome/rome_hparams.py", "util/nethook.py",
                  "util/hparams.py")


@dataclass
class ReleasedRome:
    """The released ROME code's pieces, imported from a local checkout."""

    path: Path
    compute_v: Callable[..., torch.Tensor]
    repr_tools: types.ModuleType
    nethook: types.ModuleType
    hparams_cls: type
    revision: str
    patched_device: str | None


def load_released_rome(path: str | Path, device: torch.device) -> ReleasedRome:
    """Import compute_v (and what it needs) from a checkout of github.com/kmeng01/rome at `path`.

    FileNotFoundError with what is missing when `path` is not such a checkout. The top-level names
    `rome` and `util` are bound only while importing (sys.modules is put back afterwards)."""
    root = Path(path).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"--released-rome {path}: no such directory (expected a local checkout of "
                                "https://github.com/kmeng01/rome)")
    root = root.resolve()
    missing = [f for f in RELEASED_FILES if not (root / f).is_file()]
    if missing:
        raise FileNotFoundError(f"--released-rome {root}: not a checkout of kmeng01/rome, missing {', '.join(missing)}")
    names = ("rome", "util", "rome.compute_v", "rome.repr_tools", "rome.rome_hparams", "util.nethook", "util.hparams")
    saved = {n: sys.modules.get(n) for n in names}
    device = torch.device(device)
    patched = None
    try:
        for package in ("rome", "util"):  # packages without their __init__ (see the module docstring)
            module = types.ModuleType(package)
            module.__path__ = [str(root / package)]
            sys.modules[package] = module
        nethook = importlib.import_module("util.nethook")
        repr_tools = importlib.import_module("rome.repr_tools")
        hparams_module = importlib.import_module("rome.rome_hparams")
        source_path = root / "rome" / "compute_v.py"
        source = source_path.read_text(encoding="utf-8")
        if device.type != "cuda":
            patched = str(device)
            source = source.replace('"cuda"', repr(patched))
        module = types.ModuleType("rome.compute_v")
        module.__file__, module.__package__ = str(source_path), "rome"
        sys.modules["rome.compute_v"] = module
        exec(compile(source, str(source_path), "exec"), module.__dict__)  # noqa: S102 -- the user's checkout
    finally:
        for name, old in saved.items():
            if old is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = old
    revision = "unknown"
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             timeout=10)
        if out.returncode == 0:
            revision = out.stdout.strip()
    return ReleasedRome(root, module.compute_v, repr_tools, nethook, hparams_module.ROMEHyperParams, revision, patched)


def released_hparams(released: ReleasedRome, shape: Shape, layer: int, steps: int) -> Any:
    """The released code's ROME settings for the shape (its hparams/ROME/<file>), at `layer`, with
    `steps` steps and the loss read at the last layer."""
    path = released.path / "hparams" / "ROME" / shape.released_hparams
    if not path.is_file():
        raise FileNotFoundError(f"{path}: the released code's settings for {shape.name} are missing")
    data = json.loads(path.read_text())
    data.update(layers=[layer], v_num_grad_steps=int(steps), v_loss_layer=shape.n_layers - 1)
    return released.hparams_cls(**data)


def released_rome_edit(released: ReleasedRome, model: nn.Module, tok, request: dict, hp: Any, templates: list[str],
                       c_inv: torch.Tensor) -> dict[str, Any]:
    """One ROME edit the released code's way (module docstring); changes the weights. Returns the
    seconds of compute_v alone and the optimisation steps it ran."""
    request = json.loads(json.dumps(request))
    if not request["target_new"]["str"].startswith(" "):
        request["target_new"]["str"] = " " + request["target_new"]["str"]  # as rome_main.execute_rome
    layer = hp.layers[0]
    device = next(model.parameters()).device
    calls = [0]
    handle = model.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # the released code prints every step
            key = released.repr_tools.get_reprs_at_word_tokens(
                model=model, tok=tok, layer=layer, module_template=hp.rewrite_module_tmp, track="in",
                context_templates=[t.format(request["prompt"]) for t in templates],
                words=[request["subject"]] * len(templates), subtoken=hp.fact_token[len("subject_"):]).mean(0)
            u = (c_inv.to(device) @ key.unsqueeze(1)).squeeze()
            left = u / u.norm()
            calls[0] = 0
            sync(device)
            start = time.perf_counter()
            right = released.compute_v(model, tok, request, hp, layer, left, templates)
            sync(device)
            seconds = time.perf_counter() - start
            steps = calls[0] - 1  # the optimisation's forward passes; one more reads the input and output
            with torch.no_grad():
                name = f"{hp.rewrite_module_tmp.format(layer)}.weight"
                w = released.nethook.get_parameter(model, name)
                upd = left.unsqueeze(1) @ right.unsqueeze(0)
                w[...] += upd if upd.shape == w.shape else upd.T
    finally:
        handle.remove()
    return {"compute_v_s": seconds, "steps_run": steps}


# ---- the benchmark ------------------------------------------------------------------------------

@dataclass
class Plan:
    shape: Shape
    device: torch.device
    variants: list[Variant]
    settings: Settings
    n_edits: int = 3
    warmup: int = 1
    warmup_steps: int = 1
    seed: int = 0
    stats_chunk: int = 8
    released: ReleasedRome | None = None
    prepared: dict[str, float] = dataclasses.field(default_factory=dict)  # `prepare`'s one-off seconds


def run(plan: Plan, model: nn.Module, tok, cache: EditCache, progress: bool = True,
        log: Callable[[str], None] | None = print) -> list[dict[str, Any]]:
    """Time every variant on `plan.n_edits` requests after `plan.warmup` warm-up edits (each with
    `plan.warmup_steps` steps: they only warm the code paths), interleaved (request 1 by every variant,
    then request 2, the order rotating) so that load changes on a shared machine hit every variant
    alike; every edit starts from the unedited weights. Returns the raw rows, one per edit (the warm-up
    edits' with warmup=True)."""
    from tqdm.auto import tqdm

    shape, device = plan.shape, plan.device
    requests = REQUESTS[: plan.warmup + plan.n_edits]
    if len(requests) < plan.warmup + plan.n_edits:
        raise ValueError(f"at most {len(REQUESTS)} edits (warm-up included), {plan.warmup + plan.n_edits} asked")
    todo = [(v, variant_hparams(v, shape, plan.settings)) for v in plan.variants]
    ours = [hp for v, hp in todo]
    plan.prepared = prepare(model, tok, ours, cache, plan.stats_chunk, log)
    snapshot = WeightSnapshot(model, sorted({l for hp in ours for l in edited_layers(hp)}))
    prefixes = cache.get_prefixes(model, tok, ours[0])
    templates = ["{}"] + [p + "{}" for p in prefixes[1:]]  # the released code's context templates
    rows: list[dict[str, Any]] = []
    total = len(requests) * len(todo)
    bar = tqdm(total=total, desc="edits", disable=not progress, unit="edit", dynamic_ncols=True)
    try:
        for n, request in enumerate(requests):
            warm = n < plan.warmup
            order = todo[n % len(todo):] + todo[:n % len(todo)]
            for variant, hp in order:
                bar.set_description(f"{'warm-up' if warm else 'edit ' + str(n - plan.warmup + 1)} {variant.name}")
                steps = plan.warmup_steps if warm else plan.settings.steps
                row = one_edit(plan, model, tok, cache, variant, hp, request, steps, templates)
                snapshot.restore()
                leftover = snapshot.changed()
                if leftover:
                    raise RuntimeError(f"weights of layers {leftover} not restored after {variant.name}")
                row["warmup"] = warm
                row["edit_index"] = n - plan.warmup
                rows.append(row)
                if log:
                    tqdm.write(f"  {'warm-up' if warm else 'edit ' + str(n - plan.warmup + 1)} {variant.name}: "
                               f"{row['seconds']:,.1f} s, {row['steps_run']} steps, layer {row['edited_layer']}, memory "
                               f"{row['mem_before_mib']:,.0f} -> peak {row['mem_peak_mib']:,.0f} -> "
                               f"{row['mem_after_mib']:,.0f} MiB")
                bar.update(1)
    finally:
        bar.close()
    return rows


def one_edit(plan: Plan, model: nn.Module, tok, cache: EditCache, variant: Variant, hp: Any, request: dict,
             steps: int, templates: list[str]) -> dict[str, Any]:
    """One timed edit of the unedited model (weights not restored here) with its memory."""
    device = plan.device
    if steps != hp.v_num_grad_steps:
        hp = dataclasses.replace(hp, v_num_grad_steps=steps)
    info: dict[str, Any] = {}
    with MemoryProbe(device) as mem:
        sync(device)
        start = time.perf_counter()
        if variant.editor == "rome-released":
            if plan.released is None:
                raise ValueError("variant rome-released needs the released code (--released-rome PATH)")
            rhp = released_hparams(plan.released, plan.shape, hp.layer, steps)
            c_inv = cache.get_mom2_inv(model, tok, hp.layer, hp)
            info = released_rome_edit(plan.released, model, tok, request, rhp, templates, c_inv)
            layers = [hp.layer]
        else:
            result = editing.edit(model, tok, request, hp, cache=cache, keep_deltas=False)
            layers = list(result.layers)
            info = {"steps_run": steps}
        sync(device)
        seconds = time.perf_counter() - start
    return {"variant": variant.name, "editor": variant.editor, "runner": variant.runner,
            "search": variant.search or "", "seconds": seconds, "compute_v_s": info.get("compute_v_s", float("nan")),
            "steps": steps, "steps_run": info.get("steps_run", steps), "layers_optimised": optimised_layers(variant, hp),
            "edited_layer": " ".join(map(str, layers)), "mem_before_mib": mem.before, "mem_after_mib": mem.after,
            "mem_peak_mib": mem.peak, "mem_method": mem.method}


REFERENCE_STEPS = 20
"""The released settings' number of steps: `summarise` extrapolates each variant's time to it."""


def summarise(rows: list[dict[str, Any]], plan: Plan, model_mib: float, extra: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per variant: median / min / max seconds per edit of the timed edits, compute_v seconds
    (released), peak memory above the memory before the edit, growth of the memory over an edit, against the
    model's size. With warm-up edits of fewer steps: seconds per optimisation step (the difference of the
    medians over the difference of the steps; warm-up edits also pay first-call costs, negligible at a
    real model's size), the fixed part of an edit (keys, prefix pass, update) and the time extrapolated to
    REFERENCE_STEPS steps (released code: it may stop early, see steps_run). These rest on one warm-up edit
    per variant: on a loaded machine they are rough (NaN when the difference is not positive)."""
    out = []
    for variant in plan.variants:
        part = [r for r in rows if r["variant"] == variant.name and not r.get("warmup")]
        warm = [r["seconds"] for r in rows if r["variant"] == variant.name and r.get("warmup")]
        if not part:
            continue
        t = [r["seconds"] for r in part]
        cv = [r["compute_v_s"] for r in part if not math.isnan(r["compute_v_s"])]
        peak_above = [r["mem_peak_mib"] - r["mem_before_mib"] for r in part]
        growth = [r["mem_after_mib"] - r["mem_before_mib"] for r in part]
        median = statistics.median(t)
        # time per optimisation step from the warm-up edits (plan.warmup_steps steps each) and the timed ones
        extra_steps = plan.settings.steps - plan.warmup_steps
        per_step = (median - statistics.median(warm)) / extra_steps if warm and extra_steps > 0 else float("nan")
        if not per_step > 0:  # load changes on a shared machine can exceed the difference: no estimate then
            per_step = float("nan")
        out.append({
            "shape": plan.shape.name, "variant": variant.name, "editor": variant.editor, "runner": variant.runner,
            "search": variant.search or "", "steps": plan.settings.steps,
            "steps_run": " ".join(str(r["steps_run"]) for r in part), "layers_optimised": part[0]["layers_optimised"],
            "n_edits": len(t), "median_s": median, "min_s": min(t), "max_s": max(t),
            "warmup_steps": plan.warmup_steps,
            "warmup_median_s": statistics.median(warm) if warm else float("nan"),
            "s_per_step": per_step, "fixed_s": median - plan.settings.steps * per_step,
            f"at_{REFERENCE_STEPS}_steps_s": median + (REFERENCE_STEPS - plan.settings.steps) * per_step,
            "compute_v_median_s": statistics.median(cv) if cv else float("nan"),
            "peak_above_before_mib": max(peak_above), "mem_growth_mib": statistics.median(growth),
            "mem_before_mib": statistics.median(r["mem_before_mib"] for r in part), "model_mib": model_mib,
            "edited_layers": " ".join(r["edited_layer"] for r in part),
            "times_s": " ".join(f"{x:.2f}" for x in t), "mem_method": part[0]["mem_method"], **plan.prepared,
            **extra})
    rome = [r["median_s"] for r in out if r["variant"] == "rome"]
    for r in out:
        r["time_vs_rome"] = r["median_s"] / rome[0] if rome else float("nan")
    return out


def format_table(summary: list[dict[str, Any]]) -> str:
    import pandas as pd

    cols = ["variant", "runner", "layers_optimised", "steps", "median_s", "min_s", "max_s", "time_vs_rome",
            "s_per_step", "fixed_s", f"at_{REFERENCE_STEPS}_steps_s", "compute_v_median_s", "peak_above_before_mib",
            "mem_growth_mib"]
    table = pd.DataFrame(summary)
    table = table[[c for c in cols if c in table.columns]]
    return table.to_string(index=False, float_format=lambda x: f"{x:,.2f}", na_rep="-")


def plot(summary: list[dict[str, Any]], title: str):
    """Seconds per edit (median, min-max bars) and peak memory above the loaded model, per variant."""
    import matplotlib.pyplot as plt

    colours = {"prefix-cache": "tab:blue", "full": "tab:orange", "released": "tab:grey"}
    several = len({r["steps"] for r in summary}) > 1
    names = [f"{r['variant']}, {r['steps']} steps" if several else r["variant"] for r in summary]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 0.45 * len(names) + 1.6), sharey=True)
    y = range(len(names))
    med = [r["median_s"] for r in summary]
    ax1.barh(y, med, xerr=[[r["median_s"] - r["min_s"] for r in summary], [r["max_s"] - r["median_s"] for r in summary]],
             color=[colours.get(r["runner"], "k") for r in summary], capsize=3)
    ax1.set_yticks(list(y), names)
    ax1.invert_yaxis()
    ax1.set_xlabel("seconds per edit (median; bars: min-max)")
    ax2.barh(y, [r["peak_above_before_mib"] / 1024 for r in summary],
             color=[colours.get(r["runner"], "k") for r in summary])
    weights = ax2.axvline(summary[0]["model_mib"] / 1024, color="k", ls="--", lw=1)
    ax2.set_xlabel("peak memory above before the edit (GiB)")
    ax2.xaxis.set_major_locator(plt.MaxNLocator(4))
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in colours.values()] + [weights]
    labels = ["prefix cache", "whole prompts (full)", "released ROME code", "size of the model's weights"]
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.legend(handles, labels, frameon=False, loc="upper center", ncol=4, fontsize=8, bbox_to_anchor=(0.5, 0.0))
    return fig
