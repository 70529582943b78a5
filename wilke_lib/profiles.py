"""Run-size profiles: how much of the paper's protocol a build reproduces.

* "quick": smoke test of every chapter in minutes on a CPU;
* "default": the size the book is built with (the numbers are tuned by the project lead);
* "paper": the sizes of Hu et al. (2024): 1024 lifelong edits (Table 1), seeds 9, 10, 11
  (three runs; the released code used seed 9), 200 traced records.

Import-light (no torch): a table of sizes reads the editor registry and the checkpoint schedule only.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from wilke_lib import registry
from wilke_lib.schedule import CheckpointPolicy

ALL_EDITORS: tuple[str, ...] = registry.names()
"""The editors of the lifelong tables, every editor of the registry in its order (`wilke_lib.registry`:
"r-rome" is ROME with the update of Gupta et al. 2024; "wilke" is WilKE as released, "wilke-eq10" WilKE
with the paper's Eq. 10)."""

TABLE1_EDITORS: tuple[str, ...] = ("rome", "memit", "wilke", "wilke-eq10")
"""The editors whose Table 1 rows the paper gives with three seeds (the others: one seed here), and
WilKE with the rule of the paper's text, to compare with the released one."""

CONSECUTIVE_EDITORS: tuple[str, ...] = ("rome", "memit", "alphaedit", "comeba_hk", "lemoe", "wilke")
"""The editors of the consecutive-batch chapter (12): the batch editors and the one-at-a-time ones."""

DEFAULT_N_EDITS = 16
"""Lifelong edits of the "default" profile: what fits the 20-minute CPU budget of `make book`."""


@dataclass(frozen=True)
class Profile:
    """Sizes of every experiment for one build profile.

    n_edits: lifelong edits per run (2 * n_edits known records are needed, App. F.2);
    seeds: one lifelong run per seed (shuffle of the known records);
    editors: the editors compared in the lifelong table;
    checkpoints: when ERS / ORS are measured;
    eval_batch_size: prompts per forward pass when measuring;
    (the toxicity chapters, 05 for ROME and its flash detector, Sec. 4.1-4.2 and App. B, and 09 for
    MEMIT, App. C, read the lifelong runs of chapter 03: n_edits steps, seed seeds[0]);
    n_flash_records: flash records, and as many normal ones, edited once at every layer (06, Sec. 4.3,
        App. E); 08 reads their delta strength (App. D.2) from those edits;
    n_trace_records: known records of the average indirect effect, and records per group of the
        per-record MLP effects (07, App. A);
    n_strength_records: normal records of the activation strength (08, App. D.1);
    layer_stride: 06 edits every layer_stride-th layer (and the predefined one); 1 = every layer;
    n_heatmaps: records per group drawn as full causal-trace heatmaps (07; the paper: 8 + 8);
    ablation_n_edits: lifelong edits of each WilKE variant of the ablation (04, Fig. 9; `paper`: 256,
        seed seeds[0], since 8 variants x 1,024 edits would take about 6 hours of one core per organism);
    multi_seed_editors: the editors run with every seed (Table 1's); the others run with seeds[0]
        (None: every editor with every seed);
    consecutive_n_edits / consecutive_batch_sizes / consecutive_editors: the runs of consecutive batch
        editing without rollback (12, `lifelong.consecutive`), read back by the chapter (computed by
        `python -m wilke_lib.lifelong.consecutive`), seed seeds[0].
    """

    name: str
    n_edits: int
    seeds: tuple[int, ...]
    editors: tuple[str, ...]
    checkpoints: CheckpointPolicy = field(default_factory=CheckpointPolicy)
    eval_batch_size: int = 64
    n_flash_records: int = 4
    n_trace_records: int = 20
    n_strength_records: int = 50
    layer_stride: int = 1
    n_heatmaps: int = 2
    ablation_n_edits: int = 16
    multi_seed_editors: tuple[str, ...] | None = None
    consecutive_n_edits: int = 64
    consecutive_batch_sizes: tuple[int, ...] = (1, 8, 64)
    consecutive_editors: tuple[str, ...] = CONSECUTIVE_EDITORS

    def __post_init__(self):
        def fail(field_name: str, want: str) -> None:
            raise ValueError(f"profile {self.name!r}: {field_name} must be {want}, "
                             f"got {getattr(self, field_name)!r}")

        self._lists_as_tuples()

        for name in ("n_edits", "eval_batch_size", "n_flash_records", "n_trace_records",
                     "n_strength_records", "layer_stride", "n_heatmaps", "ablation_n_edits", "consecutive_n_edits"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                fail(name, "a positive int")
        if not isinstance(self.seeds, tuple) or not self.seeds or not all(
                isinstance(s, int) and not isinstance(s, bool) for s in self.seeds):
            fail("seeds", "a non-empty tuple of ints, e.g. (9, 10, 11)")
        if not (isinstance(self.consecutive_batch_sizes, tuple) and self.consecutive_batch_sizes and all(
                isinstance(b, int) and not isinstance(b, bool) and b >= 1 for b in self.consecutive_batch_sizes)):
            fail("consecutive_batch_sizes", "a non-empty tuple of positive ints, e.g. (1, 10, 100)")
        for name in ("editors", "multi_seed_editors", "consecutive_editors"):
            value = getattr(self, name)
            if value is None and name == "multi_seed_editors":
                continue
            if not isinstance(value, tuple) or not value or not all(isinstance(e, str) for e in value):
                fail(name, 'a non-empty tuple of editor names, e.g. ("rome", "wilke")')
        for name in ("seeds", "editors", "multi_seed_editors", "consecutive_batch_sizes", "consecutive_editors"):
            repeated = _repeated(getattr(self, name) or ())
            if repeated:
                fail(name, f"free of repeats (a repeated seed or editor is the same run twice, counted as two "
                           f"replicates with a confidence interval of 0; repeated: {repeated})")

    def _lists_as_tuples(self) -> None:
        """Accept lists where tuples are expected: a notebook parameter given on the command line
        (papermill `-p seeds "[9, 10]"`) arrives as a list. The profile is frozen, hence `object.__setattr__`."""
        for name in ("seeds", "editors", "multi_seed_editors", "consecutive_batch_sizes", "consecutive_editors"):
            value = getattr(self, name)
            if isinstance(value, list):
                object.__setattr__(self, name, tuple(value))

    def seeds_for(self, editor: str) -> tuple[int, ...]:
        """The seeds `editor` (a table name: "rome", "r-rome", ...) runs with."""
        if self.multi_seed_editors is None or editor in self.multi_seed_editors:
            return self.seeds
        return self.seeds[:1]


def _repeated(values: tuple) -> list:
    """The values that occur more than once, in order of first repeat."""
    seen, out = set(), []
    for value in values:
        if value in seen and value not in out:
            out.append(value)
        seen.add(value)
    return out


PROFILES: dict[str, Profile] = {
    "quick": Profile(name="quick", n_edits=4, seeds=(9,), editors=("rome", "memit", "wilke"),
                     n_flash_records=1, n_trace_records=2, n_strength_records=4,
                     layer_stride=6, n_heatmaps=1, ablation_n_edits=2,
                     consecutive_n_edits=8, consecutive_batch_sizes=(1, 4), consecutive_editors=("memit", "comeba_hk")),
    "default": Profile(name="default", n_edits=DEFAULT_N_EDITS, seeds=(9,), editors=ALL_EDITORS,
                       n_flash_records=1, n_trace_records=20,
                       n_strength_records=20, layer_stride=1, n_heatmaps=2,
                       ablation_n_edits=8),
    "paper": Profile(name="paper", n_edits=1024, seeds=(9, 10, 11), editors=ALL_EDITORS,
                     n_flash_records=20, n_trace_records=200,
                     n_strength_records=1024, layer_stride=1, n_heatmaps=8,
                     ablation_n_edits=256, multi_seed_editors=TABLE1_EDITORS,
                     consecutive_n_edits=1024, consecutive_batch_sizes=(1, 10, 100)),
}


def get_profile(name: str) -> Profile:
    """The profile called `name`; ValueError listing the valid names otherwise."""
    try:
        return PROFILES[name]
    except KeyError:
        raise ValueError(f"unknown profile {name!r}; valid profiles: {', '.join(PROFILES)}") from None
