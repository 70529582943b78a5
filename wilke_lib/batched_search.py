"""WilKE's layer search (Hu et al. 2024, Section 5.1) with the deltas of all layers optimised together.

`wilke.layer_scores` runs ROME's delta optimisation (ROME Eq. 4 = WilKE Eq. 9) once per candidate
layer, as the released code does: L layers cost L ROME optimisations. `batched_layer_scores`
returns the same `LayerCandidate`s (same keys, deltas, norms and scores, up to float rounding: see
"Equality") but optimises the L deltas in ONE loop of `v_num_grad_steps` steps:

* one batched forward and one backward per step: the N prompts of `rome.optimize_delta` (the
  context-prefixed prompts c_j + p and the essence prompt p') are repeated once per candidate
  layer; copy i gets delta_i added to the output of `mlp_out(l_i)` at the fact token, and only there;
* the loss is the SUM of the per-copy losses of `optimize_delta`. Copy i's rows depend on delta_i
  only, so d(sum)/d delta_i = d loss_i / d delta_i: each delta gets exactly its own gradient;
* one Adam over the stacked (L, d_model) parameter. Adam is elementwise (moments, bias corrections
  and the step count are per element, and every row still being optimised has taken the same number
  of steps), so it is L independent Adams; the clamp ||delta_i|| <= clamp_norm_factor * ||v0_i|| is
  applied per row;
* early stopping: `optimize_delta` stops a layer at the first step whose loss is below
  `v_early_stop_loss` (and, as ROME, evaluates the loss once more than it steps). Here each row is
  frozen at exactly that step: its loss leaves the sum, its copy leaves the batch, and its row is
  restored after `optimizer.step()` (a zero gradient alone would not freeze it: Adam's momentum would
  still move it). `info["steps"]` / `info["loss_history"]` are those of the sequential run.

Shared computation (`mode="staircase"`, the default):
* below the fact token: the delta is added at the fact token (the subject's last token), so by
  causality no position BEFORE it depends on any delta. Those positions' keys / values are computed
  once per edit (one no-grad pass of the prompts cut before their fact token, the model's own KV
  cache) and every step runs only the tokens from the fact token on (about a third of the tokens of
  a CounterFact prompt; one token for the essence prompt, whose KL term reads only the fact token);
* below each copy's layer: the unpatched suffix states entering every block are recorded once; copy
  i joins the batch at block l_i (its own layer, where the hook adds delta_i), so block j runs only
  the copies with l_i <= j, and the backward of copy i stops at l_i. The blocks are called with the
  arguments the model itself passes them (recorded by a pre-hook during the unpatched pass and tiled
  over the copies), the cached keys / values through a minimal cache object; the runner is checked
  against the model's own forward once per edit and otherwise falls back to `mode="model"`;
* only the logits the loss reads are computed (final norm + unembedding at the target positions);
* model parameters never require grad: the backward computes input gradients only.
`mode="model"` runs the model's own forward on all copies with the prefix KV cache (no block runner:
every copy runs every block, the backward goes down to the lowest candidate layer); `mode="full"`
runs the whole prompts (no KV cache), the plain batched version.

Computed once per edit and reused: the keys k*^l of every layer (one `compute_ks` pass), the context
prefixes, C and C^-1 (`EditCache`), one spectral and Frobenius norm per layer.

Equality. The batched run does the same arithmetic in another order (other batch shapes, attention
over a cache), so it agrees with `layer_scores` up to float rounding amplified by the Adam steps:
tests/test_batched_search.py checks delta norms and scores at rtol 1e-4 (float32) and the same
argmin. Exception: at a layer where the loss does not depend on delta beyond rounding (the LAST
layer when the fact token is not the prompt's last token: the target logits are read after the fact
token, so the NLL term cannot see delta there, and the KL term has zero gradient at delta = 0),
Adam normalises gradients that are pure rounding noise, in both implementations; such a layer's
delta norm agrees only in order of magnitude (it is meaningless in either).
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Sequence
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedTokenizerBase

from wilke_lib.arch import ModelAdapter
from wilke_lib.editing import EditCache, EditError
from wilke_lib.hparams import WilKEHParams
from wilke_lib.rome import (DeltaResult, _hidden, compute_ks, encode, fact_token_index, fill, frozen, model_device,
                            pad_id_of, prepare_request, rank_one_update, rewrite_rows)
from wilke_lib.wilke import LayerCandidate, candidate_layers, eq10_score, update_norm_score

log = logging.getLogger(__name__)

__all__ = ["batched_layer_scores", "optimize_deltas_batched", "build_prompts", "MODES"]

MODES = ("staircase", "model", "full")
INFO_KEYS = ("nll_init", "nll", "kl", "weight_decay", "loss", "steps", "loss_history", "target_prob", "v0_norm",
             "delta_norm", "n_prompts")


# ---- timing ----------------------------------------------------------------------------------------

@contextmanager
def _timed(profile: dict[str, float] | None, name: str, device: torch.device):
    """Add the wall time of the block to profile[name] (synchronising CUDA); no-op without a profile."""
    if profile is None:
        yield
        return
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    try:
        yield
    finally:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        profile[name] = profile.get(name, 0.0) + time.perf_counter() - start


# ---- the prompts, split at the fact token ------------------------------------------------------------

class BatchedPrompts:
    """The N rows of `rome.optimize_delta` (n_rewrite rewriting prompts c_j + p + target[:-1], then the
    essence prompt p' up to its fact token), each split into a prefix (the tokens before the fact
    token) and a suffix (the fact token and everything after it).

    prefix_ids: (N, P) right-padded, P = the longest prefix (0: no prefix, e.g. mode "full");
    prefix_mask: (N, P), 1 on real prefix tokens; suffix_ids / suffix_mask / suffix_pos: (N, S)
    right-padded suffixes and their absolute positions; loss_cols: (n_rewrite, n_tgt) suffix indices
    whose logits predict the target tokens. The fact token is suffix index 0 of every row.
    """

    def __init__(self, seqs: list[list[int]], fact_cols: list[int], loss_positions: list[list[int]],
                 target: list[int], pad_id: int, device: torch.device, split: bool = True) -> None:
        n_rows = len(seqs)
        self.n_rows, self.n_rewrite, self.n_tgt = n_rows, n_rows - 1, len(target)
        cut = list(fact_cols) if split else [0] * n_rows
        self.fact_in_suffix = [c - f for c, f in zip(fact_cols, cut)]
        P = max(cut)
        S = max(len(seq) - f for seq, f in zip(seqs, cut))
        self.P, self.S = P, S
        prefix_ids = torch.full((n_rows, P), pad_id, dtype=torch.long)
        prefix_mask = torch.zeros((n_rows, P), dtype=torch.long)
        suffix_ids = torch.full((n_rows, S), pad_id, dtype=torch.long)
        suffix_mask = torch.zeros((n_rows, S), dtype=torch.long)
        suffix_pos = torch.zeros((n_rows, S), dtype=torch.long)
        for r, (seq, f) in enumerate(zip(seqs, cut)):
            prefix_ids[r, :f] = torch.tensor(seq[:f], dtype=torch.long)
            prefix_mask[r, :f] = 1
            n = len(seq) - f
            suffix_ids[r, :n] = torch.tensor(seq[f:], dtype=torch.long)
            suffix_mask[r, :n] = 1
            suffix_pos[r, :n] = torch.arange(f, len(seq))  # pads keep position 0 (never read)
        self.prefix_ids, self.prefix_mask = prefix_ids.to(device), prefix_mask.to(device)
        self.suffix_ids, self.suffix_mask = suffix_ids.to(device), suffix_mask.to(device)
        self.suffix_pos = suffix_pos.to(device)
        self.loss_cols = torch.tensor([[p - f for p in pos] for pos, f in zip(loss_positions, cut)],
                                      dtype=torch.long, device=device).view(self.n_rewrite, self.n_tgt)
        self.fact_cols_t = torch.tensor(self.fact_in_suffix, dtype=torch.long, device=device)
        self.target = torch.tensor(target, dtype=torch.long, device=device)

    @property
    def full_mask(self) -> torch.Tensor:
        """(N, P + S) attention mask over the cached prefix and the suffix (pads of both masked)."""
        return torch.cat([self.prefix_mask, self.suffix_mask], dim=1)


def build_prompts(tok: PreTrainedTokenizerBase, request: dict, hparams: Any, prefixes: Sequence[str],
                  device: torch.device, split: bool = True) -> BatchedPrompts:
    """The rows of `rome.optimize_delta` (same prompts, fact tokens and target positions), split."""
    prepared = prepare_request(tok, request)
    target = prepared.target_new_ids
    seqs, cols, positions = rewrite_rows(tok, prepared, hparams, prefixes)
    essence = hparams.essence_template
    essence_ids = encode(tok, fill(essence, prepared.subject))
    essence_col = fact_token_index(tok, essence, prepared.subject, "", hparams.fact_token)
    seqs.append(essence_ids[:essence_col + 1])  # the KL term reads the fact token's logits only
    cols.append(essence_col)
    for seq, col, pos in zip(seqs, cols, positions + [[]]):
        if not 0 <= col < len(seq) or any(p < col for p in pos):
            raise EditError(f"fact token {col} outside its prompt of {len(seq)} tokens or after a target position")
    return BatchedPrompts(seqs, cols, positions, target, pad_id_of(tok), device, split=split)


# ---- the model's KV cache of the prefixes ----------------------------------------------------------

def _tensor_memo(obj: Any, memo: dict[int, Any], depth: int = 0) -> None:
    """Map every tensor reachable from `obj` (a few levels deep) to itself, for copy.deepcopy."""
    if isinstance(obj, torch.Tensor):
        memo[id(obj)] = obj
    elif depth > 6:
        return
    elif isinstance(obj, (list, tuple)):
        for item in obj:
            _tensor_memo(item, memo, depth + 1)
    elif isinstance(obj, dict):
        for item in obj.values():
            _tensor_memo(item, memo, depth + 1)
    elif hasattr(obj, "__dict__") and not isinstance(obj, (nn.Module, type)):
        for item in vars(obj).values():
            _tensor_memo(item, memo, depth + 1)


def share_copy(cache: Any) -> Any:
    """A copy of a KV-cache object that shares its tensors.

    A forward with `past_key_values=cache` appends to the cache object (HF's DynamicCache does
    `self.keys = torch.cat([self.keys, new])`, leaving the old tensors untouched): a fresh structure
    per forward keeps the prefix cache reusable without copying its tensors.
    """
    memo: dict[int, Any] = {}
    _tensor_memo(cache, memo)
    return copy.deepcopy(cache, memo)


def _prefix_cache(model: nn.Module, prompts: BatchedPrompts) -> Any:
    """The model's KV cache of the N prefixes (None when there is no prefix).

    The prefix pass attends to its own pads too (an all-ones attention mask): real tokens never see
    later pads (causality), and a row whose prefix is all pads then has no fully-masked query (which
    would give NaN keys / values). The pads' keys / values are masked out in the suffix pass.
    """
    if prompts.P == 0:
        return None
    with torch.no_grad():
        cache = model.base_model(input_ids=prompts.prefix_ids, attention_mask=torch.ones_like(prompts.prefix_ids),
                                 use_cache=True).past_key_values
    if cache is None:
        raise RuntimeError("the model returned no KV cache (use_cache=True)")
    return cache


def _repeat_cache(model: nn.Module, prompts: BatchedPrompts, cache: Any, repeats: int) -> Any:
    """The prefix cache with each row repeated `repeats` times (row r * repeats + i)."""
    if cache is None or repeats == 1:
        return cache
    if hasattr(cache, "batch_repeat_interleave"):
        repeated = share_copy(cache)
        repeated.batch_repeat_interleave(repeats)
        return repeated
    if isinstance(cache, tuple):  # legacy format of older transformers: ((k, v), ...) per layer
        return tuple(tuple(t.repeat_interleave(repeats, dim=0) for t in layer) for layer in cache)
    ids = prompts.prefix_ids.repeat_interleave(repeats, dim=0)
    with torch.no_grad():  # unknown cache type: recompute it on the repeated prefixes
        return model.base_model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=True).past_key_values


def _layer_kv(cache: Any, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(keys, values) of one layer of a KV cache (transformers 5.x layers, 4.x key_cache, or tuples)."""
    layers = getattr(cache, "layers", None)
    if layers is not None and hasattr(layers[layer], "keys"):
        return layers[layer].keys, layers[layer].values
    if hasattr(cache, "key_cache"):
        return cache.key_cache[layer], cache.value_cache[layer]
    entry = cache[layer]
    return entry[0], entry[1]


def _model_suffix_pass(model: nn.Module, prompts: BatchedPrompts, cache: Any, repeats: int) -> torch.Tensor:
    """The model's own forward of the suffixes (rows r * repeats + i): final hidden states after the final norm."""
    ids = prompts.suffix_ids.repeat_interleave(repeats, dim=0)
    pos = prompts.suffix_pos.repeat_interleave(repeats, dim=0)
    if cache is None:
        mask = prompts.suffix_mask.repeat_interleave(repeats, dim=0)
        out = model.base_model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False)
    else:
        mask = prompts.full_mask.repeat_interleave(repeats, dim=0)
        out = model.base_model(input_ids=ids, attention_mask=mask, position_ids=pos,
                               past_key_values=share_copy(cache), use_cache=True)
    return out.last_hidden_state


# ---- the block runner of mode "staircase" ----------------------------------------------------------

class _FixedPrefixKV:
    """The minimal cache a block's attention needs: `update(k, v, layer_idx)` returns the fixed prefix
    keys / values followed by the new ones (and stores nothing)."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        self.keys, self.values = keys, values

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any):
        return (torch.cat([self.keys.to(key_states.dtype), key_states], dim=-2),
                torch.cat([self.values.to(value_states.dtype), value_states], dim=-2))

    def get_seq_length(self, *args: Any, **kwargs: Any) -> int:
        return int(self.keys.shape[-2])


def _is_cache(obj: Any) -> bool:
    return (not isinstance(obj, (torch.Tensor, dict, list, tuple)) and hasattr(obj, "update")
            and hasattr(obj, "get_seq_length"))


class _Unsupported(Exception):
    """The recorded block arguments cannot be tiled over copies."""


def _template(a: Any, b: Any, n: int) -> Any:
    """Describe an argument recorded with batch n (a) and 2n (b): ("batch", t) for per-row tensors
    (tiled over copies later), ("cache",) for the KV cache, ("static", x) for the rest."""
    if isinstance(a, torch.Tensor):
        if not isinstance(b, torch.Tensor):
            raise _Unsupported("argument changed type")
        if a.shape == b.shape:
            if not torch.equal(a, b):
                raise _Unsupported("a static argument depends on the batch")
            return ("static", a)
        if a.dim() >= 1 and a.shape[0] == n and b.shape[0] == 2 * n and a.shape[1:] == b.shape[1:]:
            if not torch.equal(a.repeat_interleave(2, dim=0), b):
                raise _Unsupported("a batch argument is not per row")
            return ("batch", a)
        raise _Unsupported(f"argument of shape {tuple(a.shape)} vs {tuple(b.shape)}")
    if _is_cache(a):
        return ("cache",)
    if isinstance(a, (list, tuple)):
        if not isinstance(b, (list, tuple)) or len(a) != len(b):
            raise _Unsupported("argument structure changed")
        return ("seq", type(a), [_template(x, y, n) for x, y in zip(a, b)])
    if isinstance(a, dict):
        if not isinstance(b, dict) or set(a) != set(b):
            raise _Unsupported("argument structure changed")
        return ("dict", {k: _template(a[k], b[k], n) for k in a})
    if a is not b and a != b:
        raise _Unsupported("a non-tensor argument depends on the batch")
    return ("static", a)


def _materialise(template: Any, copies: int, cache: Any) -> Any:
    kind = template[0]
    if kind == "batch":
        t = template[1]
        return t.repeat(copies, *([1] * (t.dim() - 1)))  # copy-major: rows p * n + r
    if kind == "cache":
        return cache
    if kind == "seq":
        items = [_materialise(x, copies, cache) for x in template[2]]
        return template[1](items) if template[1] in (list, tuple) else tuple(items)
    if kind == "dict":
        return {k: _materialise(v, copies, cache) for k, v in template[1].items()}
    return template[1]


class _BlockRunner:
    """Runs the blocks of the model on the suffix tokens, copy p (rows p * N + r) joining at its layer.

    Built from two recorded unpatched passes (N and 2N rows): the inputs of every block (the states a
    copy joins with) and the arguments the model passes every block.
    """

    def __init__(self, model: nn.Module, prompts: BatchedPrompts, cache: Any) -> None:
        self.adapter = ModelAdapter(model)
        self.N = prompts.n_rows
        n_layers = self.adapter.n_layers
        rec1, hidden1 = self._record(model, prompts, cache, 1)
        rec2, _ = self._record(model, prompts, _repeat_cache(model, prompts, cache, 2), 2)
        self.inputs = {j: rec1[j][0] for j in range(n_layers)}  # (N, S, d): the unpatched input of block j
        self.templates = {}
        for j in range(n_layers):
            (_, args1, kwargs1), (_, args2, kwargs2) = rec1[j], rec2[j]
            self.templates[j] = (_template(tuple(args1), tuple(args2), self.N), _template(kwargs1, kwargs2, self.N))
        self.kv = {j: _layer_kv(cache, j) for j in range(n_layers)} if cache is not None else {}
        self._args: dict[tuple[int, int], tuple] = {}
        self.reference = hidden1  # the model's own final hidden states of the N rows

    def _record(self, model: nn.Module, prompts: BatchedPrompts, cache: Any, repeats: int):
        recorded: dict[int, tuple] = {}

        def pre(j: int):
            def hook(_module, args, kwargs):
                if args:
                    recorded[j] = (args[0].detach(), args[1:], dict(kwargs))
                else:
                    kwargs = dict(kwargs)
                    recorded[j] = (kwargs.pop("hidden_states").detach(), (), kwargs)
            return hook

        handles = [self.adapter.layer(j).register_forward_pre_hook(pre(j), with_kwargs=True)
                   for j in range(self.adapter.n_layers)]
        try:
            with torch.no_grad():
                hidden = _model_suffix_pass(model, prompts, cache, repeats)
        finally:
            for h in handles:
                h.remove()
        if len(recorded) != self.adapter.n_layers:
            raise _Unsupported("not every block was called with recordable arguments")
        return recorded, hidden

    def _block_args(self, j: int, copies: int) -> tuple[tuple, dict]:
        key = (j, copies)
        if key not in self._args:
            fixed = None
            if j in self.kv:
                keys, values = self.kv[j]
                fixed = _FixedPrefixKV(keys.repeat(copies, *([1] * (keys.dim() - 1))),
                                       values.repeat(copies, *([1] * (values.dim() - 1))))
            args_t, kwargs_t = self.templates[j]
            self._args[key] = (_materialise(args_t, copies, fixed), _materialise(kwargs_t, copies, fixed))
        return self._args[key]

    def run(self, joining: dict[int, int]) -> torch.Tensor:
        """Final hidden states (after the final norm), copy-major; joining[layer] = number of copies
        joining the batch at that block (copies ordered by layer)."""
        hidden = None
        copies = 0
        for j in range(min(joining), self.adapter.n_layers):
            if joining.get(j):
                new = self.inputs[j].repeat(joining[j], 1, 1)
                hidden = new if hidden is None else torch.cat([hidden, new], dim=0)
                copies += joining[j]
            if hidden is None:
                continue
            args, kwargs = self._block_args(j, copies)
            hidden = _hidden(self.adapter.layer(j)(hidden, *args, **kwargs))
        return self.adapter.final_norm(hidden)

    def check(self, prompts: BatchedPrompts) -> None:
        """The runner reproduces the model's own forward (one copy joining at block 0); _Unsupported otherwise."""
        with torch.no_grad():
            out = self.run({0: 1})
        mask = prompts.suffix_mask.bool()
        ref = self.reference[mask].float()
        err = (out[mask].float() - ref).abs().max().item()
        if not err <= 1e-3 * max(1.0, ref.abs().max().item()):
            raise _Unsupported(f"block runner differs from the model's forward by {err:.3g}")


# ---- the batched delta optimisation ----------------------------------------------------------------

def _copy_loss_parts(model: nn.Module, hidden: torch.Tensor, prompts: BatchedPrompts, n_copies: int,
                     copy_major: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Per copy: (NLL of target_new averaged over the rewriting prompts, log-probs at the essence fact token).

    Row of (prompt r, copy p): p * N + r (copy_major) or r * n_copies + p. Only the needed positions
    go through the unembedding.
    """
    unembed = ModelAdapter(model).unembed
    device = hidden.device
    N, n_rw, n_tgt = prompts.n_rows, prompts.n_rewrite, prompts.n_tgt
    p = torch.arange(n_copies, device=device).view(-1, 1)
    r = torch.arange(N, device=device).view(1, -1)
    rows = p * N + r if copy_major else r * n_copies + p  # (copies, N)
    rw_rows = rows[:, :n_rw].unsqueeze(-1).expand(-1, -1, n_tgt)
    cols = prompts.loss_cols.unsqueeze(0).expand(n_copies, -1, -1)
    logits = unembed(hidden[rw_rows, cols]).float()  # (copies, n_rw, n_tgt, vocab)
    log_probs = torch.log_softmax(logits, dim=-1)
    picked = log_probs.gather(-1, prompts.target.view(1, 1, n_tgt, 1).expand(n_copies, n_rw, -1, -1)).squeeze(-1)
    nll = -(picked.sum(dim=2) / n_tgt).mean(dim=1)  # (copies,)
    essence = hidden[rows[:, n_rw], prompts.fact_cols_t[n_rw]]
    kl_log_probs = torch.log_softmax(unembed(essence).float(), dim=-1)  # (copies, vocab)
    return nll, kl_log_probs


def optimize_deltas_batched(model: nn.Module, tok: PreTrainedTokenizerBase, request: dict, layers: Sequence[int],
                            hparams: Any, prefixes: Sequence[str], mode: str = "staircase",
                            profile: dict[str, float] | None = None) -> dict[int, DeltaResult]:
    """`rome.optimize_delta` at `mlp_out(l)` for every l in `layers`, optimised together.

    Returns {layer: DeltaResult} with the info keys of `optimize_delta`. mode: "staircase" (default;
    falls back to "model" if the block runner cannot reproduce the model's forward), "model" or
    "full" (see the module docstring); `profile` (a dict) accumulates seconds per phase.
    The chosen mode is reported in every result's info["batched_mode"].
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    adapter = ModelAdapter(model)
    order = sorted(layers)
    if len(set(order)) != len(order):
        raise ValueError(f"repeated layer in {list(layers)}")
    if not order:
        return {}
    L = len(order)
    device = model_device(model)
    prompts = build_prompts(tok, request, hparams, prefixes, device, split=(mode != "full"))
    N, n_rw = prompts.n_rows, prompts.n_rewrite
    modules = [adapter.mlp_out(l) for l in order]

    with frozen(model):
        with _timed(profile, "prefix pass", device):
            cache = _prefix_cache(model, prompts)
        runner = None
        if mode == "staircase":
            with _timed(profile, "block runner set-up", device):
                try:
                    runner = _BlockRunner(model, prompts, cache)
                    runner.check(prompts)
                except (_Unsupported, TypeError, AttributeError, IndexError, KeyError, RuntimeError) as err:
                    runner, mode = None, "model"
                    log.info("staircase block runner unavailable (%s); using mode 'model'", err)

        # -- unpatched pass: v0 of every module (bare prompt = row 0, fact token), reference log-probs, nll_init
        with _timed(profile, "unpatched pass", device):
            v0s: dict[int, torch.Tensor] = {}

            def capture(i: int):
                def hook(_module, _inputs, output):
                    v0s[i] = _hidden(output)[0, prompts.fact_in_suffix[0]].detach().float().clone()
                return hook

            handles = [m.register_forward_hook(capture(i)) for i, m in enumerate(modules)]
            try:
                with torch.no_grad():
                    hidden = _model_suffix_pass(model, prompts, cache, 1)
                    nll_init, kl_init = _copy_loss_parts(model, hidden, prompts, 1, True)
            finally:
                for h in handles:
                    h.remove()
        kl_init = kl_init.detach()  # (1, vocab): the unpatched log-probs, the same for every copy
        v0 = torch.stack([v0s[i] for i in range(L)])  # (L, d_model)
        v0_norm = v0.norm(dim=1)
        for i in range(L):
            if not torch.isfinite(v0_norm[i]) or v0_norm[i] == 0:
                raise EditError(f"module output at the fact token has norm {v0_norm[i].item()}: cannot scale delta")
        max_norm = hparams.clamp_norm_factor * v0_norm

        # -- the batched optimisation
        full_cache = _repeat_cache(model, prompts, cache, L) if mode == "model" else cache
        delta = torch.zeros_like(v0, requires_grad=True)  # (L, d_model) float32
        optimizer = torch.optim.Adam([delta], lr=hparams.v_lr)
        position = {i: i for i in range(L)}  # copy i -> its place among the copies in the batch
        fact_cols = prompts.fact_cols_t

        def add_delta(i: int):
            def hook(_module, _inputs, output):
                p = position.get(i)
                if p is None:
                    return output
                h = _hidden(output)
                if runner is not None:  # copy-major rows, only the active copies in the batch
                    rows = p * N + torch.arange(N, device=h.device)
                else:  # prompt-major rows (the model's KV cache repeats rows interleaved), every copy
                    rows = torch.arange(N, device=h.device) * L + p
                values = delta[i].to(h.dtype).unsqueeze(0).expand(N, -1)
                new = h.index_put((rows, fact_cols), values, accumulate=True)
                return (new,) + tuple(output[1:]) if isinstance(output, tuple) else new
            return hook

        handles = [m.register_forward_hook(add_delta(i)) for i, m in enumerate(modules)]
        active = list(range(L))
        histories: list[list[float]] = [[] for _ in range(L)]
        final: dict[int, dict[str, float]] = {}
        n_steps = hparams.v_num_grad_steps
        try:
            for step in range(n_steps):
                optimizer.zero_grad()
                with _timed(profile, "forward", device):
                    if runner is not None:
                        position.clear()
                        position.update({i: p for p, i in enumerate(active)})
                        joining: dict[int, int] = {}
                        for i in active:
                            joining[order[i]] = joining.get(order[i], 0) + 1
                        hidden = runner.run(joining)
                        in_batch, copy_major = active, True
                    else:
                        hidden = _model_suffix_pass(model, prompts, full_cache, L)
                        in_batch, copy_major = list(range(L)), False
                    nll, kl_log_probs = _copy_loss_parts(model, hidden, prompts, len(in_batch), copy_major)
                    if len(in_batch) != len(active):
                        pick = torch.tensor(active, device=device)
                        nll, kl_log_probs = nll[pick], kl_log_probs[pick]
                    idx = torch.tensor(active, device=device)
                    # F.kl_div(input=log P_orig, target=log P_edit) = KL(P_edit || P_orig), as rome.optimize_delta
                    kl = hparams.kl_factor * F.kl_div(kl_init.expand(len(active), -1), kl_log_probs, log_target=True,
                                                      reduction="none").sum(dim=-1)
                    norms = delta[idx].norm(dim=1)
                    if hparams.v_weight_decay_form == "squared":
                        decay = hparams.v_weight_decay * norms ** 2 / v0_norm[idx] ** 2
                    else:
                        decay = hparams.v_weight_decay * norms / v0_norm[idx] ** 2
                    loss = nll + kl + decay  # (len(active),)
                values = loss.detach().cpu()
                if not torch.isfinite(values).all():
                    raise EditError(f"NaN/inf loss at step {step} of the delta optimisation")
                parts = torch.stack([nll.detach(), kl.detach(), decay.detach()]).cpu()
                keep = []
                for k, i in enumerate(active):
                    histories[i].append(float(values[k]))
                    if values[k].item() < hparams.v_early_stop_loss or step == n_steps - 1:
                        final[i] = {"nll": float(parts[0, k]), "kl": float(parts[1, k]),
                                    "weight_decay": float(parts[2, k]), "loss": float(values[k])}
                    else:
                        keep.append(k)
                if not keep:
                    break
                with _timed(profile, "backward", device):
                    (loss[keep].sum() if len(keep) < len(active) else loss.sum()).backward()
                with _timed(profile, "optimizer step", device):
                    still = [active[k] for k in keep]
                    done = torch.tensor([i for i in range(L) if i not in still], dtype=torch.long, device=device)
                    kept_rows = delta.detach()[done].clone() if len(done) else None
                    optimizer.step()
                    with torch.no_grad():
                        if kept_rows is not None:
                            delta[done] = kept_rows  # a frozen row does not move (Adam's momentum would move it)
                        live = torch.zeros(L, dtype=torch.bool, device=device)
                        live[still] = True
                        norm = delta.norm(dim=1)
                        over = (norm > max_norm) & live
                        if over.any():
                            delta.mul_(torch.where(over, max_norm / norm, torch.ones_like(norm)).unsqueeze(1))
                    active = still
        finally:
            for h in handles:
                h.remove()
    delta = delta.detach()
    if not torch.isfinite(delta).all():
        raise EditError("delta optimisation produced non-finite values")
    out: dict[int, DeltaResult] = {}
    for i, layer in enumerate(order):
        d = delta[i].clone()
        info = {"nll_init": float(nll_init[0]), **final[i], "steps": len(histories[i]), "loss_history": histories[i],
                "target_prob": float(torch.exp(-torch.tensor(final[i]["nll"]))), "v0_norm": float(v0_norm[i]),
                "delta_norm": float(d.norm()), "n_prompts": n_rw}
        info = {k: info[k] for k in INFO_KEYS}
        info["batched_mode"] = mode
        out[layer] = DeltaResult(delta=d, v0=v0[i].clone(), info=info)
    return out


# ---- the layer search --------------------------------------------------------------------------------

def batched_layer_scores(model: nn.Module, tok: PreTrainedTokenizerBase, request: dict, hparams: WilKEHParams,
                         cache: EditCache, layers: list[int] | None = None, *, chunk_size: int | None = None,
                         mode: str = "staircase", profile: dict[str, float] | None = None) -> dict[int, LayerCandidate]:
    """`wilke.layer_scores` with the deltas of all candidate layers optimised together (changes no weight).

    chunk_size: at most this many layers per batched optimisation (None = all at once), contiguous in
    layer order: bounds memory on large models; the results do not depend on it (beyond rounding).
    mode: "staircase" | "model" | "full" (module docstring). profile: a dict that accumulates seconds
    per phase (keys, prefix pass, forward, backward, optimizer step, norms, ...).
    """
    prepare_request(tok, request)
    adapter = ModelAdapter(model)
    device = model_device(model)
    layers = list(layers) if layers is not None else candidate_layers(model, hparams)
    if len(set(layers)) != len(layers):
        raise ValueError(f"repeated candidate layer in {layers}")
    with _timed(profile, "prefixes and statistics", device):
        prefixes = cache.get_prefixes(model, tok, hparams)
        if hparams.score == "update_norm":
            cache.get_mom2(model, tok, layers, hparams)  # one pass over the corpus for every missing layer
    with _timed(profile, "keys", device):
        keys = compute_ks(model, tok, request, layers, hparams, prefixes)
    ordered = sorted(layers)
    size = len(ordered) if not chunk_size else max(1, int(chunk_size))
    deltas: dict[int, DeltaResult] = {}
    for start in range(0, len(ordered), size):
        deltas.update(optimize_deltas_batched(model, tok, request, ordered[start:start + size], hparams, prefixes,
                                              mode=mode, profile=profile))
    out: dict[int, LayerCandidate] = {}
    for layer in layers:
        k_star, result = keys[layer], deltas[layer]
        with _timed(profile, "norms and scores", device):
            weight = adapter.out_weight(layer).float()
            v_star = weight @ k_star.to(weight.device, torch.float32) + result.delta
            spectral = float(torch.linalg.matrix_norm(weight, ord=2))
            fro = float(torch.linalg.matrix_norm(weight, ord="fro"))
            delta_norm, activation_norm = float(result.delta.norm()), float(k_star.norm())
        update_rel = None
        if hparams.score == "update_norm":
            with _timed(profile, "second-moment solve", device):
                dW = rank_one_update(weight, cache.get_mom2_inv(model, tok, layer, hparams), k_star, v_star)
                update_rel = float(dW.norm()) / fro
            score = update_norm_score(update_rel, delta_norm, fro, hparams)
        else:
            score = eq10_score(delta_norm, activation_norm, spectral, hparams)
        out[layer] = LayerCandidate(layer, k_star, v_star, result.delta, delta_norm, activation_norm, spectral, fro,
                                    score, update_rel, dict(result.info))
    return out
