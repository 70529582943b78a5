"""Typed hyper-parameters of the editors and their YAML files.

One dataclass per editor (this module is longer than 420 lines because every editor's settings, with
their documentation and checks, live together). The files live in
`wilke_lib/hparams/<editor>/<model>.yaml` (editors: the implementations of `wilke_lib.registry`, ft, ke, kn,
mend, rome, memit, alphaedit, comeba_hk, lemoe, wilke; models: the organisms toy-gpt2 / toy-gptj and the paper's gpt2-xl / gpt-j-6b). `load_hparams("rome", "toy-gpt2")` reads one of them;
`hparams_from_file(path)` reads any JSON or YAML file. Unknown keys are an error that names
the key and lists the valid ones, so a typo never silently falls back to a default.

References: ROME = Meng et al. 2022a ("Locating and Editing Factual Associations in GPT"),
MEMIT = Meng et al. 2022b ("Mass-Editing Memory in a Transformer"), WilKE = Hu et al. 2024,
FT-L = Zhu et al. 2020 as used by ROME, KN = Dai et al. 2021 ("Knowledge Neurons"), AlphaEdit = Fang
et al. 2025, COMEBA-HK = Li et al. 2024 ("Consecutive Model Editing with Batch alongside HooK Layers"), LEMoE = Wang & Li 2024,
MEND = Mitchell et al. 2022 ("Fast Model Editing at Scale"), KE = De Cao et al. 2021 ("Editing Factual Knowledge in
Language Models").
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import yaml

from wilke_lib.registry import implemented

HPARAMS_DIR: Path = Path(__file__).resolve().parent  # the YAML files sit beside this module, one folder per editor

FACT_TOKENS = ("subject_last", "last")
DELTA_RUNNERS = ("prefix-cache", "full", "prefix-kv", "block")
WILKE_SCORES = ("eq10", "update_norm")


_SCALARS = {"int": (int,), "float": (int, float), "bool": (bool,), "str": (str,)}
# field -> (lowest allowed, whether the bound itself is allowed); every other number must be finite
_LOWER_BOUNDS = {
    "v_num_grad_steps": (1, True), "v_lr": (0, False), "v_weight_decay": (0, True), "clamp_norm_factor": (0, False),
    "kl_factor": (0, True), "v_early_stop_loss": (0, True), "context_top_k": (1, True), "context_seed": (0, True),
    "mom2_n_samples": (1, True), "mom2_batch_size": (1, True), "mom2_max_length": (1, True), "mom2_ridge": (0, True),
    "mom2_update_weight": (0, False), "steps": (1, True), "lr": (0, False), "norm_constraint": (0, False),
    "early_stop_loss": (0, True), "ig_steps": (1, True), "max_neurons": (1, True), "threshold": (0, False),
    # the hypernetwork editors (MEND, KE) and their training
    "train_steps": (1, True), "batch_size": (1, True), "n_train": (1, True), "n_val": (0, True), "n_local": (0, True),
    "seed": (0, True), "rank": (1, True), "edit_lr": (0, False), "lr_lr": (0, True), "c_edit": (0, False),
    "c_loc": (0, True), "lstm_hidden": (1, True), "condition_dim": (1, True), "hidden_dim": (1, True),
    "max_scale": (0, False), "kl_margin": (0, True), "multiplier_lr": (0, True),
    # LEMoE, AlphaEdit
    "scale": (0, False), "expert_dim": (1, True), "nullspace_threshold": (0, False), "l2": (0, True),
}
MAX_LEARNING_RATE = 10.0
# field -> highest allowed value (included): a learning rate of 1e30 "succeeds" with a delta of 0
_UPPER_BOUNDS = {"v_lr": MAX_LEARNING_RATE, "lr": MAX_LEARNING_RATE, "edit_lr": MAX_LEARNING_RATE,
                 "lr_lr": MAX_LEARNING_RATE, "multiplier_lr": MAX_LEARNING_RATE}
MAX_EDIT_LAMBDA = 1e3
"""KN's |edit_lambda| at most: beyond it the value vectors, hence the weights, blow up (1e30 gives weights
near 1e30)."""


def check_fields(obj: Any) -> None:
    """Type and range of every scalar field of a hyper-parameter dataclass; ValueError naming the field,
    the value and what is expected (a YAML "40" or "fast" for a number, a null, a NaN, a negative count)."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        annotation = str(f.type).replace(" ", "")
        optional = annotation.endswith("|None")
        kinds = _SCALARS.get(annotation[:-5] if optional else annotation)
        if kinds is None or (optional and value is None):
            continue
        where = f"{type(obj).__name__}.{f.name}"
        if value is None or not isinstance(value, kinds) or (bool not in kinds and isinstance(value, bool)):
            raise ValueError(f"{where}: expected {annotation.replace('|', ' or ')}, got {value!r} "
                             f"({type(value).__name__})")
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"{where}: expected a finite number, got {value!r}")
        if f.name in _LOWER_BOUNDS and not isinstance(value, bool):
            low, inclusive = _LOWER_BOUNDS[f.name]
            if value < low or (value == low and not inclusive):
                raise ValueError(f"{where}: must be {'>=' if inclusive else '>'} {low}, got {value!r}")
        if f.name in _UPPER_BOUNDS and value > _UPPER_BOUNDS[f.name]:
            raise ValueError(f"{where}: must be <= {_UPPER_BOUNDS[f.name]:g} (a learning rate beyond it makes the "
                             f"edit meaningless), got {value!r}")


def check_context_lengths(value: Any) -> list[list[int]]:
    """ROME's context prefixes as [[length, count], ...] with length >= 1 and count >= 1 (a pair with a
    length or count below 1 silently switched the prefixes off); [] for the bare prompt only."""
    want = "a list of [length, count] pairs with length >= 1 and count >= 1, e.g. [[5, 10], [10, 10]]"
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"context_lengths must be {want}, got {value!r}")
    pairs = []
    for pair in value:
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2
                and all(isinstance(x, int) and not isinstance(x, bool) for x in pair)):
            raise ValueError(f"context_lengths must be {want}, got {value!r}")
        if pair[0] < 1 or pair[1] < 1:
            raise ValueError(f"context_lengths must be {want}; {list(pair)} has a length or count below 1 "
                             f"(in {value!r})")
        pairs.append([int(pair[0]), int(pair[1])])
    return pairs


def parse_layers(value: Any, what: str = "layers") -> list[int] | None:
    """Normalise a layer specification to a sorted-as-given list of ints (or None).

    Accepts None, an int, a list of ints, a Python range, or a string "a..b" (inclusive),
    e.g. "0..23".
    """
    if value is None:
        return None
    if isinstance(value, bool):
        raise ValueError(f"{what}: expected layer indices, got {value!r}")
    if isinstance(value, int):
        return [value]
    if isinstance(value, range):
        return list(value)
    if isinstance(value, str):
        text = value.strip()
        if ".." in text:
            start, _, stop = text.partition("..")
            try:
                lo, hi = int(start), int(stop)
            except ValueError:
                raise ValueError(f"{what}: cannot parse range {value!r}; use 'a..b' (inclusive)") from None
            if hi < lo:
                raise ValueError(f"{what}: empty range {value!r}")
            return list(range(lo, hi + 1))
        try:
            return [int(text)]
        except ValueError:
            raise ValueError(f"{what}: cannot parse {value!r}; use an int, a list or 'a..b'") from None
    if isinstance(value, (list, tuple)):
        out = []
        for item in value:
            if isinstance(item, bool) or not isinstance(item, int):
                raise ValueError(f"{what}: every layer must be an int, got {item!r}")
            out.append(int(item))
        if not out:
            raise ValueError(f"{what}: empty list of layers")
        if len(set(out)) != len(out):
            raise ValueError(f"{what}: repeated layer in {out}")
        return out
    raise ValueError(f"{what}: cannot interpret {value!r} as layers")


@dataclass(kw_only=True)
class _DeltaOptimHParams:
    """Settings shared by the editors that optimise a residual vector delta (ROME Eq. 4, WilKE Eq. 9).

    The loss for a request is
        mean_j NLL(target_new | c_j + p)                                   (rewriting term)
        + kl_factor * KL(P_edit(. | p') || P_orig(. | p'))                 (essence drift, p' = essence_template)
        + v_weight_decay * ||delta|| / ||v0||^2                            (weight decay, v_weight_decay_form)
    (KL direction as WilKE Eq. 9 and ROME's released code; the weight decay as the released code,
    "released"; "squared" = v_weight_decay * ||delta||^2 / ||v0||^2, a scale-free alternative.)
    optimised with Adam for `v_num_grad_steps` steps at learning rate `v_lr`, clamping
    ||delta|| <= clamp_norm_factor * ||v0|| after each step, stopping early when the total loss
    falls below `v_early_stop_loss` (ROME stops at 5e-2).
    """

    v_num_grad_steps: int = 20
    v_lr: float = 0.5
    v_weight_decay: float = 0.5
    v_weight_decay_form: str = "released"  # "released": ||delta|| / ||v0||^2; "squared": ||delta||^2 / ||v0||^2
    clamp_norm_factor: float = 4.0
    kl_factor: float = 0.0625
    v_early_stop_loss: float = 0.05
    essence_template: str = "{} is a"
    fact_token: str = "subject_last"
    # Context prefixes c_j: `count` texts of `length` generated tokens for each [length, count],
    # plus the bare prompt (empty prefix). ROME's compute_v uses [[5, 10], [10, 10]].
    context_lengths: list[list[int]] = field(default_factory=lambda: [[5, 10], [10, 10]])
    context_seed: int = 0
    context_top_k: int = 5
    # If given, these prefixes are used instead of generating them (the bare prompt is added first).
    context_prefixes: list[str] | None = None
    # Second-moment statistics C = E[k k^T] (ROME Eq. 2, MEMIT Eq. 14).
    mom2_corpus: str = "toy-world"
    mom2_n_samples: int = 2000  # number of corpus texts (ROME's convention); all their token positions count
    mom2_batch_size: int = 64
    mom2_max_length: int = 256  # texts are truncated to min(this, the model's context length) tokens
    mom2_dtype: str = "float32"  # dtype of the linear algebra with C (statistics are accumulated in float64)
    # Ridge added to C as mom2_ridge * mean(diag C) * I before inverting. 0 = the published methods.
    mom2_ridge: float = 0.0
    # The runner of the delta optimisation (`editors.runners`): "prefix-cache" (the block runner over a
    # KV cache of the tokens before the fact token, each step running from the edited layer up; where it
    # cannot serve the model, the model's own forward on that cache, with a WARNING), "full" (the whole
    # prompts through the whole model every step, as the released code), or "block" / "prefix-kv"
    # explicitly (an error where they cannot serve the model). The same delta up to float rounding.
    delta_runner: str = "prefix-cache"

    editor: ClassVar[str] = ""

    def __post_init__(self) -> None:
        check_fields(self)
        if self.fact_token not in FACT_TOKENS:
            raise ValueError(f"fact_token must be one of {FACT_TOKENS}, got {self.fact_token!r}")
        if self.essence_template.count("{}") != 1:
            raise ValueError(f"essence_template must contain '{{}}' exactly once (for the subject), got "
                             f"{self.essence_template!r}")
        if self.v_num_grad_steps < 1:
            raise ValueError("v_num_grad_steps must be >= 1")
        if self.v_weight_decay_form not in ("released", "squared"):
            raise ValueError(f"v_weight_decay_form must be 'released' or 'squared', got {self.v_weight_decay_form!r}")
        if self.delta_runner not in DELTA_RUNNERS:
            raise ValueError(f"delta_runner must be one of {DELTA_RUNNERS}, got {self.delta_runner!r}")
        if self.mom2_dtype not in ("float32", "float64"):
            raise ValueError(f"mom2_dtype must be 'float32' or 'float64', got {self.mom2_dtype!r}")
        self.context_lengths = check_context_lengths(self.context_lengths)
        if self.context_prefixes is not None:
            self.context_prefixes = [str(p) for p in self.context_prefixes]


UPDATE_FORMS = ("released", "r-rome")


@dataclass(kw_only=True)
class ROMEHParams(_DeltaOptimHParams):
    """ROME (Meng et al. 2022a): rank-one update of W_proj at one fixed layer (Eq. 2), v* from Eq. 4.

    update_form: which key the update maps to v* (`wilke_lib.editors.rome`): "released" (ROME's
    released code: the bare prompt's key in the denominator) or "r-rome" (Gupta et al. 2024, the
    averaged key k* in both places).
    """

    layer: int
    update_form: str = "released"
    editor: ClassVar[str] = "rome"

    def __post_init__(self) -> None:
        super().__post_init__()
        self._check_layer()
        if self.update_form not in UPDATE_FORMS:
            raise ValueError(f"update_form must be one of {UPDATE_FORMS}, got {self.update_form!r}")

    def _check_layer(self) -> None:
        if isinstance(self.layer, bool) or not isinstance(self.layer, int) or self.layer < 0:
            raise ValueError(f"layer must be a non-negative int, got {self.layer!r}")


@dataclass(kw_only=True)
class WilKEHParams(ROMEHParams):
    """WilKE (Hu et al. 2024): ROME's update (Eq. 11) at the layer chosen by Eq. 10.

    candidate_layers: None = every layer whose MLP writes something (not attention-only); or a list / "a..b" range.
    score: "eq10"        -> ||delta^l|| / (||W_proj^l||_2 * ||sigma(x W_fc^l)||)  (Eq. 10 as a ratio of norms)
           "update_norm" -> ||dW^l||_F / ||W_proj^l||_F of ROME's update at l (the released code's criterion)
    use_delta / use_activation / use_weight_norm: the three factors of the score; switching one off
    replaces it by 1 (the ablation of Section 6.3). For "update_norm", which factorises as
    ||delta|| * ||C^-1 k|| / (k^T C^-1 k) / ||W||_F (the update is rank one), the key term
    ||C^-1 k|| / (k^T C^-1 k) plays the part of the activation.
    search: "batched" (every candidate's delta optimised together, `editors.wilke.batched_layer_scores`) or
    "sequential" (one layer at a time, as the released code does); the same scores.
    `layer` is unused by the search (kept so that WilKE files can be read as ROME settings).
    """

    layer: int | None = None  # type: ignore[assignment]
    candidate_layers: list[int] | None = None
    score: str = "eq10"
    use_delta: bool = True
    use_activation: bool = True
    use_weight_norm: bool = True
    search: str = "batched"
    editor: ClassVar[str] = "wilke"

    def __post_init__(self) -> None:
        super().__post_init__()  # ROME's checks (update_form, ...), its layer check relaxed below
        self.candidate_layers = parse_layers(self.candidate_layers, "candidate_layers")
        if self.score not in WILKE_SCORES:
            raise ValueError(f"score must be one of {WILKE_SCORES}, got {self.score!r}")
        if self.search not in ("batched", "sequential"):
            raise ValueError(f"search must be 'batched' or 'sequential', got {self.search!r}")

    def _check_layer(self) -> None:
        """`layer` is unused by the search: null is allowed, an int must still be a layer."""
        if self.layer is not None:
            super()._check_layer()


@dataclass(kw_only=True)
class MEMITHParams(_DeltaOptimHParams):
    """MEMIT (Meng et al. 2022b): target z at the last layer of `layers` (Eq. 16), spread over the
    layers with dW = R K^T (mom2_update_weight * C + K K^T)^-1 (Eq. 14)."""

    layers: list[int]
    mom2_update_weight: float = 15000.0
    clamp_norm_factor: float = 0.75
    editor: ClassVar[str] = "memit"

    def __post_init__(self) -> None:
        super().__post_init__()
        parsed = parse_layers(self.layers, "layers")
        assert parsed is not None
        if parsed != sorted(parsed) or any(l < 0 for l in parsed):
            raise ValueError(f"layers must be increasing non-negative ints, got {self.layers!r}")
        self.layers = parsed
        if self.mom2_update_weight <= 0:
            raise ValueError(f"mom2_update_weight must be > 0 (with 0 the update ignores the preserved keys' "
                             f"statistics C), got {self.mom2_update_weight!r}")


@dataclass(kw_only=True)
class AlphaEditHParams(MEMITHParams):
    """AlphaEdit (Fang et al. 2025, "AlphaEdit: Null-Space Constrained Knowledge Editing"): MEMIT's
    targets z and residual spreading over `layers`, each layer's update projected onto the null space
    of the preserved keys: eigen-directions of C = E[k k^T] with eigenvalue below `nullspace_threshold`
    (absolute, as their code), the keys of earlier edits accumulated, `l2` the ridge of the solve.
    (`mom2_update_weight` is not used.)"""

    nullspace_threshold: float = 2e-2
    l2: float = 10.0
    editor: ClassVar[str] = "alphaedit"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.nullspace_threshold <= 0 or self.l2 < 0:
            raise ValueError("nullspace_threshold must be > 0 and l2 >= 0")


@dataclass(kw_only=True)
class COMEBAHKHParams(MEMITHParams):
    """COMEBA-HK (Li et al. 2024, "Consecutive Model Editing with Batch alongside HooK Layers"): MEMIT's
    targets and residual spreading over `layers`, written into hook layers with the accumulated keys of
    the earlier edits in the system (C_accu = mom2_update_weight * C + sum K K^T); a token takes the
    hook's output when its z-score reaches alpha, which starts at `alpha_init` and is lowered after each
    batch. `delta_runner` "full" (the default here): the z-scores are taken over whole prompts."""

    alpha_init: float = 2.2
    delta_runner: str = "full"
    editor: ClassVar[str] = "comeba_hk"


@dataclass(kw_only=True)
class LEMoEHParams:
    """LEMoE (Wang & Li 2024): one new expert f(x) = W2 gelu(W1 x) of `expert_dim` hidden units per batch
    in a bypass of the MLP of `layer`, trained `steps` Adam steps at `lr` (stopping below
    `early_stop_loss`), added with weight `scale`; a token takes the expert whose key is most cosine-
    similar to its query when the similarity reaches `route_threshold` (`editors.lemoe`)."""

    layer: int
    expert_dim: int = 64
    steps: int = 40
    lr: float = 1e-2
    scale: float = 1.0
    route_threshold: float = 0.9
    early_stop_loss: float = 0.05
    editor: ClassVar[str] = "lemoe"

    def __post_init__(self) -> None:
        check_fields(self)
        if isinstance(self.layer, bool) or not isinstance(self.layer, int) or self.layer < 0:
            raise ValueError(f"layer must be a non-negative int, got {self.layer!r}")
        if self.expert_dim < 1 or self.steps < 1 or self.lr <= 0 or not -1 <= self.route_threshold <= 1:
            raise ValueError("expert_dim and steps must be >= 1, lr > 0 and -1 <= route_threshold <= 1")
        if self.scale <= 0:
            raise ValueError(f"scale must be > 0 (with 0 the experts are added with weight 0: no edit), got {self.scale!r}")


@dataclass(kw_only=True)
class FTHParams:
    """FT-L (Zhu et al. 2020, ROME's constrained fine-tuning baseline): Adam on W_proj of one layer,
    NLL of target_new after the prompt, L-inf constraint |W - W_0| <= norm_constraint."""

    layer: int
    steps: int = 25
    lr: float = 5e-4
    norm_constraint: float = 5e-4
    early_stop_loss: float = 1e-2
    editor: ClassVar[str] = "ft"

    def __post_init__(self) -> None:
        check_fields(self)
        if isinstance(self.layer, bool) or not isinstance(self.layer, int) or self.layer < 0:
            raise ValueError(f"layer must be a non-negative int, got {self.layer!r}")
        if self.steps < 1 or self.lr <= 0 or self.norm_constraint <= 0:
            raise ValueError("steps must be >= 1, lr and norm_constraint > 0")


@dataclass(kw_only=True)
class KNHParams:
    """Knowledge Neurons (Dai et al. 2021): integrated-gradients attribution of the MLP intermediate
    neurons at the last prompt token, then v_i <- v_i - lambda E[true] + lambda E[new] for the
    selected neurons' value vectors (columns of W_proj)."""

    layers: list[int] | None = None  # None = every layer
    ig_steps: int = 20
    threshold: float = 0.2  # keep neurons with attribution >= threshold * max attribution
    max_neurons: int = 10
    edit_lambda: float = 1.0
    editor: ClassVar[str] = "kn"

    def __post_init__(self) -> None:
        check_fields(self)
        self.layers = parse_layers(self.layers, "layers")
        if self.ig_steps < 1 or not 0 < self.threshold <= 1 or self.max_neurons < 1:
            raise ValueError("ig_steps >= 1, 0 < threshold <= 1 and max_neurons >= 1 are required")
        if not 0 < abs(self.edit_lambda) <= MAX_EDIT_LAMBDA:
            raise ValueError(f"edit_lambda must be non-zero with |edit_lambda| <= {MAX_EDIT_LAMBDA:g} (0 edits "
                             f"nothing, a huge value blows the weights up), got {self.edit_lambda!r}")


@dataclass(kw_only=True)
class _HypernetHParams:
    """Settings shared by the hypernetwork editors (MEND, KE): the MLP output projections they edit, the
    file of the trained editor network and how `python -m wilke_lib.editors.hypernet` trains it.

    layers: the edited W_proj (each a list, or "a..b"); weights: a .safetensors file, a relative path
    being resolved against the model's directory (`editors.hypernet_core.weights_path`).
    Training: `train_steps` Adam steps at `lr` on batches of `batch_size` edit requests drawn from
    `n_train` training requests (`n_val` more, of other subjects, for validation), each with
    `n_local` locality prompts, seed `seed`.
    """

    layers: list[int]
    weights: str
    train_steps: int = 1500
    batch_size: int = 8
    lr: float = 1e-3
    n_train: int = 2000
    n_val: int = 100
    n_local: int = 2
    seed: int = 0

    editor: ClassVar[str] = ""

    def __post_init__(self) -> None:
        check_fields(self)
        parsed = parse_layers(self.layers, "layers")
        assert parsed is not None
        if any(l < 0 for l in parsed):
            raise ValueError(f"layers must be non-negative ints, got {self.layers!r}")
        self.layers = parsed
        if not self.weights.strip() or not self.weights.endswith(".safetensors"):
            raise ValueError(f"weights must name a .safetensors file, got {self.weights!r}")


@dataclass(kw_only=True)
class MENDHParams(_HypernetHParams):
    """MEND (Mitchell et al. 2022, Sec. 3): a low-rank editor MLP g (Eq. 3-4, `rank`, identity at
    initialisation, shared by the edited layers, with a per-layer scale and offset) maps each token's
    (u, delta) of the fine-tuning gradient to (u~, delta~); W~ = W - alpha_l sum_t delta~_t u~_t^T with a
    learned step alpha_l per layer, initialised at `edit_lr`. Trained on c_edit * L_e + c_loc * L_loc
    (Sec. 3.2), the editor network at `lr`, the steps alpha_l at `lr_lr`."""

    weights: str = "mend.safetensors"
    rank: int = 192
    edit_lr: float = 1e-3
    lr_lr: float = 1e-3
    c_edit: float = 0.1
    c_loc: float = 1.0
    editor: ClassVar[str] = "mend"


@dataclass(kw_only=True)
class KEHParams(_HypernetHParams):
    """KE, KnowledgeEditor (De Cao et al. 2021, Sec. 3): a bidirectional LSTM of `lstm_hidden` units
    over the request "prompt >> y || a" gives a condition of `condition_dim`; per edited layer an FFNN
    of `hidden_dim` units gives the rank-one factors of dW = max_scale * sigmoid(eta) (alpha^ * grad W
    + beta^). Trained on L_e under KL(locality) <= kl_margin, Lagrangian (the multiplier by gradient
    ascent at `multiplier_lr`)."""

    weights: str = "ke.safetensors"
    lstm_hidden: int = 128
    condition_dim: int = 256
    hidden_dim: int = 128
    max_scale: float = 1.0
    kl_margin: float = 1e-3
    multiplier_lr: float = 0.1
    editor: ClassVar[str] = "ke"


HParams = (ROMEHParams | WilKEHParams | MEMITHParams | AlphaEditHParams | COMEBAHKHParams | LEMoEHParams | FTHParams
           | KNHParams | MENDHParams | KEHParams)

def _settings_classes() -> dict[str, type]:
    """editor -> its settings class, for the editors of the registry (`wilke_lib.registry`), in its order."""
    classes = {}
    for spec in implemented():
        cls = globals()[spec.hparams_class]
        if cls.editor != spec.editor:
            raise ImportError(f"registry: {cls.__name__}.editor is {cls.editor!r}, registered as {spec.editor!r}")
        classes[spec.editor] = cls
    return classes


HPARAMS_CLASSES: dict[str, type] = _settings_classes()


def editor_of(hparams: Any) -> str:
    """The editor name ("rome", ...) of a hyper-parameter object."""
    for name, cls in HPARAMS_CLASSES.items():
        if type(hparams) is cls:
            return name
    raise TypeError(f"not an editor hyper-parameter object: {type(hparams).__name__}")


def available() -> dict[str, list[str]]:
    """{editor: [model names with a file]} for the shipped files."""
    out: dict[str, list[str]] = {}
    for editor in HPARAMS_CLASSES:
        folder = HPARAMS_DIR / editor
        out[editor] = sorted(p.stem for p in folder.glob("*.yaml")) if folder.is_dir() else []
    return out


def hparams_from_dict(editor: str, data: dict[str, Any], source: str = "<dict>") -> Any:
    """Build the dataclass of `editor` from a dict; unknown keys raise ValueError naming them."""
    if editor not in HPARAMS_CLASSES:
        raise ValueError(f"unknown editor {editor!r}; expected one of {sorted(HPARAMS_CLASSES)}")
    cls = HPARAMS_CLASSES[editor]
    valid = [f.name for f in dataclasses.fields(cls)]
    data = {k: v for k, v in data.items() if k != "editor"}
    unknown = [k for k in data if k not in valid]
    if unknown:
        raise ValueError(f"{source}: unknown key(s) {unknown} for editor {editor!r}; valid keys: {valid}")
    try:
        return cls(**data)
    except TypeError as err:  # missing required field
        raise ValueError(f"{source}: {err}; valid keys: {valid}") from err
    except ValueError as err:  # a value of the wrong type or out of range
        raise ValueError(f"{source}: {err}") from err


def hparams_from_file(path: str | Path, editor: str | None = None) -> Any:
    """Read hyper-parameters from a JSON (.json) or YAML (.yaml/.yml) file.

    The editor is, in order: the `editor` argument, an `editor:` key in the file, or the name of
    the file's folder (as in `hparams/<editor>/<model>.yaml`).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"hyper-parameter file not found: {path}")
    form = "JSON" if path.suffix == ".json" else "YAML"
    try:
        text = path.read_text(encoding="utf-8")
        data = json.loads(text) if form == "JSON" else yaml.safe_load(text)
    except (UnicodeDecodeError, json.JSONDecodeError, yaml.YAMLError) as err:  # a bare parser error names no file
        raise ValueError(f"{path}: not readable {form} in UTF-8 ({' '.join(str(err).split())})") from err
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of settings, got {type(data).__name__}")
    file_editor = data.get("editor")
    chosen = editor or file_editor or (path.parent.name if path.parent.name in HPARAMS_CLASSES else None)
    if chosen is None:
        raise ValueError(f"{path}: cannot tell the editor; pass editor=... or add an 'editor:' key "
                         f"(one of {sorted(HPARAMS_CLASSES)})")
    if file_editor is not None and editor is not None and file_editor != editor:
        raise ValueError(f"{path}: file says editor {file_editor!r} but {editor!r} was requested")
    return hparams_from_dict(chosen, data, str(path))


def load_hparams(editor: str, model_name: str) -> Any:
    """The shipped settings `wilke_lib/hparams/<editor>/<model_name>.yaml` as a dataclass.

    model_name may also be a path-like name ("organisms/toy-gpt2"); its last component is used.
    """
    found = available()
    if editor not in found:
        raise ValueError(f"unknown editor {editor!r}; available editors: {sorted(found)}")
    name = Path(str(model_name)).name
    path = HPARAMS_DIR / editor / f"{name}.yaml"
    if not path.is_file():
        raise FileNotFoundError(
            f"no hyper-parameters for editor {editor!r} and model {name!r} ({path}); "
            f"available models for {editor!r}: {found[editor]}; available editors: {sorted(found)}")
    return hparams_from_file(path, editor)


def to_dict(hparams: Any) -> dict[str, Any]:
    """Plain dict (with the editor name) for provenance / JSON."""
    out = dataclasses.asdict(hparams)
    out["editor"] = editor_of(hparams)
    return out
