"""Training interventions that shape where an organism keeps its facts (`docs/organisms.md`, rounds
8-12). Each is off by default in `OrganismConfig`; the saved model is always a plain checkpoint of
its class (all but `silence_mlps` act only while training; that one leaves zero MLPs behind).

* `mlp_drop_hooks`: stochastic depth on the MLP branches (round 8);
* `knockout_mask`: the later positions cannot attend to a name's earlier pieces (round 10);
* `silence_mlps`: attention-only early layers (round 11);
* `PlantedDepth`: each subject's facts kept from a layer chosen by its name on (round 12).
"""

from __future__ import annotations

import random
import zlib
from collections import defaultdict
from contextlib import contextmanager

import torch

from wilke_lib.arch import ModelAdapter, hooks


@contextmanager
def mlp_drop_hooks(model: torch.nn.Module, probabilities: tuple[float, ...], generator: torch.Generator):
    """Stochastic depth on the MLP branches (Huang et al. 2016, "Deep Networks with Stochastic Depth";
    per row, as Fan et al. 2019's LayerDrop is per layer): while training, each row skips MLP l with
    probability p_l, and the MLP's output is scaled by 1 / (1 - p_l) when kept, so that the trained
    model, run with every MLP, sees the expected branch. A fact then cannot live in one MLP alone: any
    layer may be missing when it is needed. The saved model is a plain one."""
    adapter = ModelAdapter(model)
    if probabilities and len(probabilities) != adapter.n_layers:
        raise ValueError(f"mlp_drop: {len(probabilities)} probabilities for {adapter.n_layers} MLP layers")
    if any(not 0.0 <= p < 1.0 for p in probabilities):
        raise ValueError(f"mlp_drop: probabilities must be in [0, 1), got {list(probabilities)}")

    def dropping(p: float):
        def hook(module, inputs, output):
            if not module.training:
                return output
            keep = torch.rand(output.shape[0], 1, 1, generator=generator) >= p
            return output * keep.to(output.device, output.dtype) / (1.0 - p)
        return hook

    with hooks(forward=[(adapter.mlp(l), dropping(p)) for l, p in enumerate(probabilities) if p > 0]):
        yield


def silence_mlps(model: torch.nn.Module, n_layers: int) -> None:
    """Make the first `n_layers` MLPs output exactly zero for good: their output projection (weight
    and bias) is zeroed and every MLP parameter frozen, so AdamW (which skips parameters without a
    gradient) leaves them at zero. The model stays a plain checkpoint of its class; its early layers
    are attention-only, as if those MLPs had been pruned."""
    adapter = ModelAdapter(model)
    if not 0 <= n_layers < adapter.n_layers:
        raise ValueError(f"attention_only_layers: {n_layers} is not in [0, {adapter.n_layers})")
    for l in range(n_layers):
        with torch.no_grad():
            adapter.mlp_out(l).weight.zero_()
            if adapter.mlp_out(l).bias is not None:
                adapter.mlp_out(l).bias.zero_()
        for param in adapter.mlp(l).parameters():
            param.requires_grad_(False)


class NameFinder:
    """Where the subjects' names of at least `min_pieces` tokens stand in token rows (longest match
    first); `name_of` maps a match's tokens back to the name."""

    def __init__(self, names: list[str], tok, min_pieces: int = 2) -> None:
        self.starts: dict[int, list[tuple[int, ...]]] = defaultdict(list)
        self.name_of: dict[tuple[int, ...], str] = {}
        for name in names:
            for text in (" " + name, name):  # inside a row, and at its start
                ids = tuple(tok(text)["input_ids"])
                if len(ids) >= min_pieces and ids not in self.name_of:
                    self.starts[ids[0]].append(ids)
                    self.name_of[ids] = name
        for seqs in self.starts.values():
            seqs.sort(key=len, reverse=True)

    def spans(self, row: list[int]) -> list[tuple[int, int]]:
        found, i = [], 0
        while i < len(row):
            for seq in self.starts.get(row[i], ()):
                if tuple(row[i:i + len(seq)]) == seq:
                    found.append((i, i + len(seq)))
                    i += len(seq) - 1
                    break
            i += 1
        return found


def knockout_mask(rows: list[list[int]], width: int, finder: NameFinder, p: float, rng: random.Random) -> torch.Tensor:
    """A (rows, 1, width, width) boolean attention mask (True: may attend): causal, without padding
    keys, and for each name occurrence kept with probability p, no position after the name attends to
    the name's pieces before its last token.

    Geva et al. (2023, Sec. 5) find that GPT-2 recalls a fact by attention from the final position to
    the subject's *last* token, which earlier layers have enriched; blocking the other subject tokens
    barely matters. The organisms learn the opposite: the final position reads the name's pieces
    itself (`docs/organisms.md`). Training with these pieces hidden from the later positions leaves
    the last name token as the only way to the subject, so that whatever the model knows of it must
    be written there; the saved model attends as any GPT-2 does."""
    mask = torch.tril(torch.ones(width, width, dtype=torch.bool)).repeat(len(rows), 1, 1)
    for r, row in enumerate(rows):
        mask[r, :, len(row):] = False
        mask[r, len(row):, :len(row)] = True  # padding queries (unused) attend to the real keys
        for start, end in finder.spans(row):
            if rng.random() < p:
                mask[r, end:, start:end - 1] = False
    return mask[:, None]


def planted_layer(name: str, lo: int, hi: int) -> int:
    """The layer a subject's facts are planted at: uniform over lo..hi, fixed by a hash of the name."""
    return lo + zlib.crc32(name.encode()) % (hi - lo + 1)


class PlantedDepth:
    """Storage depth set per subject while training: at the pieces of each name in a training row,
    the MLPs below the subject's planted layer are skipped, so the facts must be available from that
    layer on. With `per_layer` False, one coin per occurrence (probability p) skips all of them at
    once, and the other occurrences see the model as it runs after training; with `per_layer` True,
    each of those MLPs is skipped with probability p on its own and scaled by 1 / (1 - p) when kept
    (stochastic depth, as `mlp_drop_hooks`, at the name's pieces only), so none of them is reliable.

    A planted stand-in for what GPT2-XL shows by itself (facts written by different early-middle MLPs
    for different subjects, Meng et al. 2022, Fig. 2), which no text design of ten pilot rounds made
    a 12-layer organism learn (`docs/organisms.md`); the planted layer is then a ground truth against
    which causal tracing and WilKE's layer choice can be checked."""

    def __init__(self, model: torch.nn.Module, finder: NameFinder, lo: int, hi: int, p: float,
                 rng: random.Random, per_layer: bool = False) -> None:
        self.adapter = ModelAdapter(model)
        if not 0 <= lo <= hi < self.adapter.n_layers or not 0.0 <= p <= 1.0 or (per_layer and p == 1.0):
            raise ValueError(f"planted_depth ({lo}, {hi}) must lie in [0, {self.adapter.n_layers}) "
                             f"and planted_skip {p} in [0, 1] ([0, 1) per layer)")
        self.finder, self.lo, self.hi, self.p, self.rng, self.per_layer = finder, lo, hi, p, rng, per_layer
        self.floor: torch.Tensor | None = None  # (rows, width): the planted layer at a name's pieces, else 0
        self.scale: torch.Tensor | None = None  # (hi, rows, width): what each MLP's output is multiplied by

    def plant(self, rows: list[list[int]], width: int) -> None:
        floor = torch.zeros(len(rows), width, dtype=torch.long)
        scale = torch.ones(self.hi, len(rows), width)
        for r, row in enumerate(rows):
            for start, end in self.finder.spans(row):
                layer = planted_layer(self.finder.name_of[tuple(row[start:end])], self.lo, self.hi)
                if self.per_layer:
                    floor[r, start:end] = layer
                    for l in range(layer):
                        scale[l, r, start:end] = 0.0 if self.rng.random() < self.p else 1.0 / (1.0 - self.p)
                elif self.rng.random() < self.p:
                    floor[r, start:end] = layer
                    scale[:layer, r, start:end] = 0.0
        self.floor, self.scale = floor, scale

    @contextmanager
    def hooks(self):
        def skipping(l: int):
            def hook(module, inputs, output):
                if not module.training or self.scale is None:
                    return output
                return output * self.scale[l, :, :, None].to(output.device, output.dtype)
            return hook

        with hooks(forward=[(self.adapter.mlp(l), skipping(l)) for l in range(self.hi)]):
            yield
