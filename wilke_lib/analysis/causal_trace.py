"""Causal tracing (causal mediation analysis) of factual recall.

Meng et al. 2022a (ROME), Sec. 2.1 and Fig. 1: the subject's token embeddings
are corrupted with Gaussian noise (std = 3 x the std of the subjects' token
embeddings, `subject_noise_std`, as the released code's `collect_embedding_std`), which
usually destroys the model's recall of the object; then the *clean* value of a
single internal state (token t, layer l) is restored in the corrupted run, and
the recovered probability of the clean answer measures that state's indirect
effect. Three kinds of state are traced: the block output ("hidden"), the MLP
output and the attention output; for MLP / attention a window of `window`
neighbouring layers centred on l is restored together (ROME uses 10).

The WilKE paper (Hu et al. 2024, Appendix A, Fig. 10-25) uses this analysis to
show that records causing toxicity flash are recalled from the MLPs of the first
layers, away from ROME's predefined editing layer (Sec. 4.3).

Implementation notes: one forward pass holds the clean run in row 0 and, for
each restore set, `n_samples` corrupted copies (the same noise for every set,
as in ROME, where the noise generator is re-seeded for each patched run);
restoration copies row 0's state into those rows through forward hooks placed
with `ModelAdapter` on the block / `mlp` / `attn` modules (tuple outputs are
patched on element 0). Restore sets are batched, `max_batch` rows per pass.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from wilke_lib.arch import ModelAdapter, hooks, patch_output
from wilke_lib.tokens import encode_target, fill, target_str

KINDS = ("hidden", "mlp", "attn")

State = tuple[int, int]  # (token position, layer)

@dataclass
class TraceResult:
    """Outcome of one causal trace (one prompt, one kind of state).

    scores[t, l] is the probability of the target when state (t, l) (or its
    window, for "mlp" / "attn") is restored in the corrupted run; `low_score`
    is the fully corrupted probability, `high_score` the clean one.
    """

    scores: np.ndarray
    low_score: float
    high_score: float
    tokens: list[str]
    subject_range: tuple[int, int]
    kind: str
    target: str
    target_id: int
    prompt: str
    subject: str
    window: int
    noise_std: float
    token_positions: list[int] = field(default_factory=list)

    @property
    def indirect_effect(self) -> np.ndarray:
        """scores - low_score (ROME's indirect effect of each state)."""
        return self.scores - self.low_score


# ---------------------------------------------------------------------------
# tokens


def _full_prompt(prompt: str, subject: str) -> str:
    """A CounterFact template ("... {} ...") filled with the subject, or the prompt as is."""
    return fill(prompt, subject)


def _subject_char_span(prompt: str, subject: str) -> tuple[int, int]:
    """Character span of the subject in the filled prompt."""
    start = prompt.index("{}") if "{}" in prompt else prompt.find(subject)
    if start < 0:
        raise ValueError(f"subject {subject!r} not found in prompt {prompt!r}")
    return start, start + len(subject)


def subject_token_range(tok, prompt: str, subject: str) -> tuple[list[int], tuple[int, int]]:
    """Token ids of the filled prompt and the half-open token range [b, e) of the subject.

    Uses the fast tokenizer's offset mapping (tokens overlapping the subject's
    characters); falls back to ROME's decode-prefix search for slow tokenizers.
    """
    text = _full_prompt(prompt, subject)
    cs, ce = _subject_char_span(prompt, subject)
    if getattr(tok, "is_fast", False):
        enc = tok(text, return_offsets_mapping=True)
        span = [i for i, (s, e) in enumerate(enc["offset_mapping"]) if e > s and s < ce and e > cs]
        if span:
            return list(enc["input_ids"]), (span[0], span[-1] + 1)
    ids = list(tok(text)["input_ids"])
    return ids, _decode_search(tok, ids, subject)


def _decode_search(tok, ids: Sequence[int], subject: str) -> tuple[int, int]:
    """ROME's `find_token_range`: locate the subject by decoding growing token prefixes."""
    pieces = [tok.decode([i]) for i in ids]
    whole = "".join(pieces)
    loc = whole.index(subject)
    b = e = None
    pos = 0
    for i, piece in enumerate(pieces):
        pos += len(piece)
        if b is None and pos > loc:
            b = i
        if e is None and pos >= loc + len(subject):
            e = i + 1
            break
    return b, e


def _target_token(tok, target) -> int:
    """First token of the target as the token layer encodes it (`target` may be a dict with "str")."""
    return int(encode_target(tok, target_str(target).lstrip())[0])


# ---------------------------------------------------------------------------
# noise


def subject_noise_std(model: nn.Module, tok, subjects: Iterable[str], multiplier: float = 3.0) -> float:
    """ROME's noise level: `multiplier` x the standard deviation of the token embeddings of `subjects`
    (Meng et al. 2022a, Sec. 2.1: noise of 3 sigma, "the empirical standard deviation of embeddings").

    As the released code's `collect_embedding_std` computes it: each subject tokenised on its own, the
    token-embedding rows of all of them stacked, the std over every entry. ROME passes the subjects of
    its known facts; the vocabulary as a whole is not the same population (on the organisms its std
    is 0.6x-1.8x that of the subject tokens).
    """
    ids = [i for subject in dict.fromkeys(subjects) for i in tok(subject, add_special_tokens=False)["input_ids"]]
    if not ids:
        raise ValueError("subject_noise_std: no subject tokens (empty subject list)")
    weight = ModelAdapter(model).embed.weight
    rows = weight.detach()[torch.tensor(ids, device=weight.device)]
    return multiplier * float(rows.float().std())


def _make_noise(n_samples: int, n_tokens: int, d_model: int, std: float, seed: int) -> torch.Tensor:
    """Gaussian noise [n_samples, n_tokens, d_model], reproducible on any device (drawn on CPU)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n_samples, n_tokens, d_model, generator=gen) * std


# ---------------------------------------------------------------------------
# patched forward


def _module_of(adapter: ModelAdapter, kind: str, layer: int) -> nn.Module:
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}; expected one of {KINDS}")
    return {"hidden": adapter.layer, "mlp": adapter.mlp, "attn": adapter.attn}[kind](layer)


def _restore_hook(entries: list[tuple[int, int]], n_samples: int):
    """Forward hook copying row 0's state at token t into the rows of restore set g."""
    rows = [1 + g * n_samples + i for g, _ in entries for i in range(n_samples)]
    cols = [t for _, t in entries for _ in range(n_samples)]

    def patch(h: torch.Tensor) -> torch.Tensor:
        r = torch.tensor(rows, device=h.device)
        c = torch.tensor(cols, device=h.device)
        h = h.clone()
        h[r, c] = h[0, c]
        return h

    return patch_output(patch)


def _corrupt_hook(noise: torch.Tensor, subject_range: tuple[int, int], n_groups: int):
    """Forward hook on the token embedding adding the noise to the subject tokens of rows 1:."""
    b, e = subject_range

    def corrupt(x: torch.Tensor) -> torch.Tensor:
        x = x.clone()
        x[1:, b:e] += noise.to(device=x.device, dtype=x.dtype).repeat(n_groups, 1, 1)
        return x

    return patch_output(corrupt)


@torch.no_grad()
def patched_probs(model: nn.Module, input_ids: torch.Tensor, subject_range: tuple[int, int],
                  noise: torch.Tensor, restore_sets: Sequence[Iterable[State]], kind: str,
                  target_id: int) -> tuple[float, np.ndarray]:
    """(clean probability, corrupted-with-restoration probability per restore set).

    One forward pass: row 0 is clean; restore set g gets the `noise.shape[0]`
    rows 1 + g*n ... with the subject embeddings corrupted and the clean value
    of each (token, layer) state of the set restored. An empty set gives the
    fully corrupted probability (ROME's low score). Probabilities are those of
    `target_id` at the last position, averaged over the noise samples.
    """
    adapter = ModelAdapter(model)
    n, n_groups = noise.shape[0], len(restore_sets)
    by_layer: dict[int, list[tuple[int, int]]] = defaultdict(list)
    for g, states in enumerate(restore_sets):
        for t, layer in states:
            by_layer[layer].append((g, t))
    forward = [(adapter.embed, _corrupt_hook(noise, subject_range, n_groups))]
    forward += [(_module_of(adapter, kind, layer), _restore_hook(entries, n)) for layer, entries in by_layer.items()]
    with hooks(forward=forward):
        batch = input_ids.reshape(1, -1).repeat(1 + n_groups * n, 1)
        logits = model(input_ids=batch, use_cache=False).logits[:, -1].float()
    probs = torch.softmax(logits, dim=-1)[:, target_id]
    return float(probs[0]), probs[1:].reshape(n_groups, n).mean(1).cpu().numpy()


def window_layers(layer: int, n_layers: int, kind: str, window: int) -> list[int]:
    """Layers restored together for state (t, layer): ROME's window centred on `layer`, clipped.

    "hidden" restores a single layer; "mlp" / "attn" restore
    range(max(0, l - window // 2), min(n_layers, l - (-window // 2))).
    """
    if kind == "hidden" or window <= 1:
        return [layer]
    return list(range(max(0, layer - window // 2), min(n_layers, layer - (-window // 2))))


# ---------------------------------------------------------------------------
# public API


@dataclass
class _Prepared:
    input_ids: torch.Tensor
    subject_range: tuple[int, int]
    noise: torch.Tensor
    target_id: int
    high_score: float
    low_score: float
    noise_std: float


def _prepare(model, tok, prompt, subject, target, noise_multiplier, n_samples, seed, noise_std):
    """Tokenise, pick the target (clean greedy first token unless given) and measure low / high scores."""
    device = next(model.parameters()).device
    ids, subject_range = subject_token_range(tok, prompt, subject)
    input_ids = torch.tensor(ids, device=device)
    if target is None:
        with torch.no_grad():
            logits = model(input_ids=input_ids[None], use_cache=False).logits[0, -1]
        target_id = int(logits.argmax())
    else:
        target_id = _target_token(tok, target)
    std = subject_noise_std(model, tok, [subject], noise_multiplier) if noise_std is None else float(noise_std)
    d_model = ModelAdapter(model).embed.weight.shape[1]
    noise = _make_noise(n_samples, subject_range[1] - subject_range[0], d_model, std, seed)
    high, low = patched_probs(model, input_ids, subject_range, noise, [[]], "hidden", target_id)
    return _Prepared(input_ids, subject_range, noise, target_id, high, float(low[0]), std)


def trace(model: nn.Module, tok, prompt: str, subject: str, target=None, *, kind: str = "hidden",
          noise_multiplier: float = 3.0, n_samples: int = 10, window: int = 10, seed: int = 1,
          token_positions: Sequence[int] | str | None = None, noise_std: float | None = None,
          max_batch: int = 128, progress: bool = False) -> TraceResult:
    """Causal trace of `prompt` (a CounterFact template with "{}" or a filled prompt) for `subject`.

    Meng et al. 2022a, Sec. 2.1 / Fig. 1; WilKE paper Appendix A (Fig. 10-25).
    The noise std is `noise_std` (for many records, `subject_noise_std` over
    all their subjects, as ROME) or else `noise_multiplier` x the std of this
    subject's own token embeddings. `target` (string or CounterFact target dict) defaults
    to the clean greedy first token. `token_positions` restricts the traced
    tokens (default all; "last_subject" = the subject's last token); rows of
    untraced tokens are NaN. Returns a `TraceResult` with scores [n_tokens, n_layers].
    """
    adapter = ModelAdapter(model)
    prep = _prepare(model, tok, prompt, subject, target, noise_multiplier, n_samples, seed, noise_std)
    n_tokens = prep.input_ids.shape[0]
    if token_positions == "last_subject":
        token_positions = [prep.subject_range[1] - 1]
    positions = list(range(n_tokens)) if token_positions is None else [int(t) for t in token_positions]
    jobs = [(t, l) for t in positions for l in range(adapter.n_layers)]
    sets = [[(t, w) for w in window_layers(l, adapter.n_layers, kind, window)] for t, l in jobs]
    per_pass = max(1, (max_batch - 1) // n_samples)
    values: list[float] = []
    chunks = range(0, len(sets), per_pass)
    for start in tqdm(chunks, desc=f"trace {kind}", disable=not progress, leave=False):
        _, probs = patched_probs(model, prep.input_ids, prep.subject_range, prep.noise,
                                 sets[start:start + per_pass], kind, prep.target_id)
        values.extend(probs.tolist())
    scores = np.full((n_tokens, adapter.n_layers), np.nan)
    for (t, l), value in zip(jobs, values):
        scores[t, l] = value
    return TraceResult(
        scores=scores, low_score=prep.low_score, high_score=prep.high_score,
        tokens=[tok.decode([i]) for i in prep.input_ids.tolist()], subject_range=prep.subject_range,
        kind=kind, target=tok.decode([prep.target_id]), target_id=prep.target_id,
        prompt=_full_prompt(prompt, subject), subject=subject, window=1 if kind == "hidden" else window,
        noise_std=prep.noise_std, token_positions=positions,
    )


@torch.no_grad()
def impostor_scores(model: nn.Module, tok, prompt: str, subject: str, impostor: str, target=None, *,
                    kind: str = "mlp", noise_multiplier: float = 3.0, n_samples: int = 10, seed: int = 1,
                    noise_std: float | None = None, max_batch: int = 128) -> np.ndarray:
    """Per layer, the target's probability in `trace`'s corrupted run (same noise, same seed) when the
    state (`kind`, window 1) at the last subject token is restored with the clean value that
    `impostor`, a subject ending in the same token, has there in the same prompt.

    An interchange intervention (Geiger et al. 2021) set beside ROME's restoration: what restoring the
    *subject's own* value recovers beyond an impostor's is what that state knows about the subject;
    what the impostor recovers as well belongs to the last token (for GPT-J's MLP 0, which reads the
    token alone in parallel with attention, all of it). Returns an array [n_layers].
    """
    if "{}" not in prompt:
        raise ValueError(f"impostor_scores: {prompt!r} is not a template with '{{}}' for the subject")
    adapter = ModelAdapter(model)
    prep = _prepare(model, tok, prompt, subject, target, noise_multiplier, n_samples, seed, noise_std)
    ids_imp, (_, end_imp) = subject_token_range(tok, prompt, impostor)
    last = prep.subject_range[1] - 1
    if ids_imp[end_imp - 1] != int(prep.input_ids[last]):
        raise ValueError(f"impostor_scores: {impostor!r} does not end in the last token of {subject!r} "
                         f"({tok.decode([int(prep.input_ids[last])])!r}) in {prompt!r}")
    modules = [_module_of(adapter, kind, layer) for layer in range(adapter.n_layers)]
    clean: dict[int, torch.Tensor] = {}

    def capture(layer: int):
        def keep(h: torch.Tensor) -> torch.Tensor:
            clean[layer] = h[0, end_imp - 1].clone()
            return h
        return patch_output(keep)

    with hooks(forward=[(m, capture(l)) for l, m in enumerate(modules)]):
        model(input_ids=torch.tensor([ids_imp], device=prep.input_ids.device), use_cache=False)
    n, scores = prep.noise.shape[0], []
    per_pass = max(1, (max_batch - 1) // n)
    for first in range(0, adapter.n_layers, per_pass):
        layers = range(first, min(adapter.n_layers, first + per_pass))

        def put(group: int, layer: int):
            def replace(h: torch.Tensor) -> torch.Tensor:
                h = h.clone()
                h[1 + group * n:1 + (group + 1) * n, last] = clean[layer].to(h.dtype)
                return h
            return patch_output(replace)

        forward = [(adapter.embed, _corrupt_hook(prep.noise, prep.subject_range, len(layers)))]
        forward += [(modules[l], put(g, l)) for g, l in enumerate(layers)]
        with hooks(forward=forward):
            batch = prep.input_ids.reshape(1, -1).repeat(1 + len(layers) * n, 1)
            logits = model(input_ids=batch, use_cache=False).logits[:, -1].float()
        probs = torch.softmax(logits, dim=-1)[1:, prep.target_id]
        scores.extend(probs.reshape(len(layers), n).mean(1).tolist())
    return np.asarray(scores)


def trace_all_kinds(model: nn.Module, tok, prompt: str, subject: str, target=None,
                    kinds: Sequence[str] = KINDS, **kwargs) -> dict[str, TraceResult]:
    """`trace` for each kind ("hidden", "mlp", "attn"): the three panels of Meng et al. 2022a Fig. 1."""
    return {kind: trace(model, tok, prompt, subject, target, kind=kind, **kwargs) for kind in kinds}
