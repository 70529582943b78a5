"""The runners of the delta optimisation: what maps the deltas, layer by layer, to the final hidden states.

`delta.optimize_deltas` (ROME Eq. 4 = MEMIT Eq. 16 = WilKE Eq. 9) adds delta_i to the output of a
module at the fact token of every prompt, for several copies of the prompts at once (one copy per
layer of WilKE's search; one copy for ROME and MEMIT), and asks a runner for the final hidden states
of every copy. Three runners compute the same function, side by side:

* `FullForward` ("full"): the model's own forward over the whole prompts, the deltas added by hooks.
  The reference: the slowest and the simplest.
* `PrefixKV` ("prefix-kv"): the model's own forward over the tokens from the fact token on, on top of
  a KV cache of the tokens before it. A delta at the fact token changes no earlier position
  (causality), so the cache is computed once per edit and every step runs about a third of the tokens
  (one token for the essence prompt, whose KL term reads only the fact token).
* `BlockRunner` ("block"): the blocks themselves, on the same suffix tokens and KV cache, each copy
  joining after its own layer. A delta at the output of block l's MLP (ROME, WilKE) or of block l
  (MEMIT's z) is added to the residual stream unchanged, so copy i enters at block l_i + 1 with the
  recorded unpatched output of block l_i plus its delta: block j runs only the copies with l_i < j,
  and the backward of copy i stops at its layer. The blocks are called with the arguments the model
  itself passes them (recorded by a pre-hook and tiled over the copies); with `fast`, GPT-2's and
  GPT-J's blocks run as `fast_blocks` plain-PyTorch forwards. `BlockRunner.check` compares its
  unpatched pass with the model's own forward.

`make_runner` builds one by name. A runner that cannot serve a model raises `Unsupported` when it is
built; `delta_runner: prefix-cache` (the editors' default) asks for the block runner and falls back,
deliberately, to `PrefixKV`, logging a WARNING and recording the reason in the edit's info.
`tests/test_runners.py` checks every runner against `FullForward`, values and gradients, on GPT-2 and
GPT-J blocks, with both attention kernels of `fast_blocks`.

The module is longer than 400 lines on purpose: the three runners and the prompts and KV cache they
share are one idea, read side by side (the block runner is most of it).
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from wilke_lib.arch import ModelAdapter, hidden_of, hooks, is_kv_cache, with_hidden
from wilke_lib.editors.fast_blocks import ATTENTION_KERNELS, fast_block
from wilke_lib.errors import EditError
from wilke_lib.tokens import (Request, encode_prompt, fact_token_index, fill, pad_id_of, prepare_request)


# ---- the prompts of Eq. 4, split at the fact token ----------------------------------------------------

def rewrite_rows(tok: PreTrainedTokenizerBase, prepared: Request, hparams: Any,
                 prefixes: Sequence[str]) -> tuple[list[list[int]], list[int], list[list[int]]]:
    """The rows of the NLL term of ROME Eq. 4: for each prefix c_j, the token ids of c_j + p followed
    by target_new but its last token (teacher forcing), the fact-token column, and the positions
    whose next-token logits score the target tokens."""
    seqs, cols, positions = [], [], []
    for prefix in prefixes:
        prompt_ids = encode_prompt(tok, prefix + prepared.prompt)
        seqs.append(prompt_ids + prepared.target_new_ids[:-1])
        cols.append(fact_token_index(tok, prepared.template, prepared.subject, prefix, hparams.fact_token))
        positions.append([len(prompt_ids) - 1 + t for t in range(len(prepared.target_new_ids))])
    return seqs, cols, positions


def essence_row(tok: PreTrainedTokenizerBase, prepared: Request, hparams: Any) -> tuple[list[int], int]:
    """The ids of the essence prompt p' (the KL term of Eq. 4) and its fact-token column."""
    essence = hparams.essence_template
    return (encode_prompt(tok, fill(essence, prepared.subject)),
            fact_token_index(tok, essence, prepared.subject, "", hparams.fact_token))


class BatchedPrompts:
    """The N rows of Eq. 4 (n_rewrite rewriting prompts c_j + p + target[:-1], then the
    essence prompt p' up to its fact token), each split into a prefix (the tokens before the fact
    token) and a suffix (the fact token and everything after it).

    prefix_ids: (N, P) right-padded, P = the longest prefix (0: no prefix, as for `FullForward`);
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
    """The rows of Eq. 4 (`rewrite_rows`, then the essence prompt up to its fact token), split at the
    fact token (split=False: no prefix, the whole prompts are the suffixes)."""
    prepared = prepare_request(tok, request)
    target = prepared.target_new_ids
    seqs, cols, positions = rewrite_rows(tok, prepared, hparams, prefixes)
    essence_ids, essence_col = essence_row(tok, prepared, hparams)
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

    A forward given the cache appends to the cache object (HF's DynamicCache does
    `self.keys = torch.cat([self.keys, new])`, leaving the old tensors untouched): a fresh structure
    per forward keeps the prefix cache reusable without copying its tensors.
    """
    memo: dict[int, Any] = {}
    _tensor_memo(cache, memo)
    return copy.deepcopy(cache, memo)


def cache_argument(module: nn.Module) -> str:
    """The name under which `module.forward` takes a KV cache: `cache` (transformers >= 5.2x, where
    `past_key_values` is deprecated and goes in 5.40) or `past_key_values` (older releases)."""
    return "cache" if "cache" in inspect.signature(module.forward).parameters else "past_key_values"


def returned_cache(output: Any) -> Any:
    """The KV cache a forward with use_cache=True returned, under either name (see `cache_argument`)."""
    cache = getattr(output, "cache", None)
    return cache if cache is not None else getattr(output, "past_key_values", None)


def _cache_pass(model: nn.Module, ids: torch.Tensor) -> Any:
    return returned_cache(model.base_model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=True))


def prefix_cache(model: nn.Module, prompts: BatchedPrompts) -> Any:
    """The model's KV cache of the N prefixes (None when there is no prefix).

    The prefix pass attends to its own pads too (an all-ones attention mask): real tokens never see
    later pads (causality), and a row whose prefix is all pads then has no fully-masked query (which
    would give NaN keys / values). The pads' keys / values are masked out in the suffix pass.
    """
    if prompts.P == 0:
        return None
    with torch.no_grad():
        cache = _cache_pass(model, prompts.prefix_ids)
    if cache is None:
        raise RuntimeError("the model returned no KV cache (use_cache=True)")
    return cache


def repeat_cache(model: nn.Module, prompts: BatchedPrompts, cache: Any, repeats: int) -> Any:
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
        return _cache_pass(model, ids)


def layer_kv(cache: Any, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(keys, values) of one layer of a KV cache (transformers 5.x layers, 4.x key_cache, or tuples)."""
    layers = getattr(cache, "layers", None)
    if layers is not None and hasattr(layers[layer], "keys"):
        return layers[layer].keys, layers[layer].values
    if hasattr(cache, "key_cache"):
        return cache.key_cache[layer], cache.value_cache[layer]
    entry = cache[layer]
    return entry[0], entry[1]


def model_suffix_pass(model: nn.Module, prompts: BatchedPrompts, cache: Any, repeats: int) -> torch.Tensor:
    """The model's own forward of the suffixes (rows r * repeats + i): final hidden states after the final norm."""
    ids = prompts.suffix_ids.repeat_interleave(repeats, dim=0)
    pos = prompts.suffix_pos.repeat_interleave(repeats, dim=0)
    if cache is None:
        mask = prompts.suffix_mask.repeat_interleave(repeats, dim=0)
        out = model.base_model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False)
    else:
        mask = prompts.full_mask.repeat_interleave(repeats, dim=0)
        out = model.base_model(input_ids=ids, attention_mask=mask, position_ids=pos,
                               **{cache_argument(model.base_model): share_copy(cache)}, use_cache=True)
    return out.last_hidden_state


# ---- the block runner --------------------------------------------------------------------------------

class FixedPrefixKV:
    """The minimal cache a block's attention needs: `update(k, v, layer_idx)` returns the fixed prefix
    keys / values followed by the new ones (and stores nothing)."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        self.keys, self.values = keys, values

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any):
        return (torch.cat([self.keys.to(key_states.dtype), key_states], dim=-2),
                torch.cat([self.values.to(value_states.dtype), value_states], dim=-2))

    def get_seq_length(self, *args: Any, **kwargs: Any) -> int:
        return int(self.keys.shape[-2])


class Unsupported(Exception):
    """The recorded block arguments cannot be tiled over copies."""


def _template(a: Any, b: Any, n: int) -> Any:
    """Describe an argument recorded with batch n (a) and 2n (b): ("batch", t) for per-row tensors
    (tiled over copies later), ("cache",) for the KV cache, ("static", x) for the rest."""
    if isinstance(a, torch.Tensor):
        if not isinstance(b, torch.Tensor):
            raise Unsupported("argument changed type")
        if a.shape == b.shape:
            if not torch.equal(a, b):
                raise Unsupported("a static argument depends on the batch")
            return ("static", a)
        if a.dim() >= 1 and a.shape[0] == n and b.shape[0] == 2 * n and a.shape[1:] == b.shape[1:]:
            if not torch.equal(a.repeat_interleave(2, dim=0), b):
                raise Unsupported("a batch argument is not per row")
            return ("batch", a)
        raise Unsupported(f"argument of shape {tuple(a.shape)} vs {tuple(b.shape)}")
    if is_kv_cache(a):
        return ("cache",)
    if isinstance(a, (list, tuple)):
        if not isinstance(b, (list, tuple)) or len(a) != len(b):
            raise Unsupported("argument structure changed")
        return ("seq", type(a), [_template(x, y, n) for x, y in zip(a, b)])
    if isinstance(a, dict):
        if not isinstance(b, dict) or set(a) != set(b):
            raise Unsupported("argument structure changed")
        return ("dict", {k: _template(a[k], b[k], n) for k in a})
    if a is not b and a != b:
        raise Unsupported("a non-tensor argument depends on the batch")
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


class BlockRunner:
    """Runs the blocks of the model on the suffix tokens, copy p (rows p * N + r) joining after its layer.

    A delta added at the output of block l's MLP (ROME, WilKE) or of block l itself (MEMIT's z) is
    added to the residual stream unchanged: block l's output is the unpatched one plus the delta at
    the fact token (GPT-2, GPT-J, GPT-NeoX and LLaMA blocks end with residual + MLP output). So a
    copy joins at block l + 1, with the recorded unpatched output of block l and its delta added;
    block l itself never runs again.

    Built from recorded unpatched passes: the inputs of every block (the states a copy joins with),
    the last block's output, and the arguments the model passes every block (from a pass with N rows,
    and, when more than one copy will run, a second one with 2N rows that tells which arguments are
    per row and are tiled over the copies). With `fast`, the blocks `fast_blocks.fast_block` knows run
    as its plain-PyTorch forwards (the same function in fewer operations).
    """

    name = "block"
    row_order = "copy-major"

    def __init__(self, model: nn.Module, prompts: BatchedPrompts, cache: Any, max_copies: int = 2,
                 fast: bool = True, attention: str = "auto") -> None:
        self.adapter = ModelAdapter(model)
        self.N = prompts.n_rows
        n_layers = self.adapter.n_layers
        rec1, hidden1, last = self._record(model, prompts, cache, 1)
        rec2 = rec1 if max_copies == 1 else self._record(model, prompts, repeat_cache(model, prompts, cache, 2), 2)[0]
        # (N, S, d): the unpatched input of block j; j = n_layers: the last block's output
        self.inputs = {**{j: rec1[j][0] for j in range(n_layers)}, n_layers: last}
        self.templates = {}
        for j in range(n_layers):
            (_, args1, kwargs1), (_, args2, kwargs2) = rec1[j], rec2[j]
            # with one recording every tensor reads as static: right for one copy, the only case then
            self.templates[j] = (_template(tuple(args1), tuple(args2), self.N), _template(kwargs1, kwargs2, self.N))
        # plain-PyTorch forwards of the blocks `fast_blocks` knows (None: call the module)
        # (decided now: a hook placed later is not seen; `run(modules=True)` calls the modules)
        fast_fns = {j: fast_block(self.adapter.layer(j), rec1[j][1], rec1[j][2], attention) if fast else None
                    for j in range(n_layers)}
        self.fast_layers = [j for j, fn in fast_fns.items() if fn is not None]
        self.blocks = {j: fast_fns[j] or self.adapter.layer(j) for j in range(n_layers)}
        self.kv = {j: layer_kv(cache, j) for j in range(n_layers)} if cache is not None else {}
        self._args: dict[tuple[int, int], tuple] = {}
        self.max_copies = max_copies
        self.fact_cols = prompts.fact_cols_t
        self.reference = hidden1  # the model's own final hidden states of the N rows
        self.prompts = prompts

    def _record(self, model: nn.Module, prompts: BatchedPrompts, cache: Any, repeats: int):
        recorded: dict[int, tuple] = {}
        last: list[torch.Tensor] = []

        def pre(j: int):
            def hook(_module, args, kwargs):
                if args:
                    recorded[j] = (args[0].detach(), args[1:], dict(kwargs))
                else:
                    kwargs = dict(kwargs)
                    recorded[j] = (kwargs.pop("hidden_states").detach(), (), kwargs)
            return hook

        n_layers = self.adapter.n_layers
        with torch.no_grad(), hooks(pre_with_kwargs=[(self.adapter.layer(j), pre(j)) for j in range(n_layers)],
                                    forward=[(self.adapter.layer(n_layers - 1),
                                              lambda _m, _i, output: last.append(hidden_of(output).detach()))]):
            hidden = model_suffix_pass(model, prompts, cache, repeats)
        if len(recorded) != n_layers or len(last) != 1:
            raise Unsupported("not every block was called with recordable arguments")
        return recorded, hidden, last[0]

    def _block_args(self, j: int, copies: int) -> tuple[tuple, dict]:
        if copies > 1 and self.max_copies == 1:
            raise ValueError(f"{copies} copies in a runner built for one")
        key = (j, copies)
        if key not in self._args:
            fixed = None
            if j in self.kv:
                keys, values = self.kv[j]
                fixed = FixedPrefixKV(keys.repeat(copies, *([1] * (keys.dim() - 1))),
                                       values.repeat(copies, *([1] * (values.dim() - 1))))
            args_t, kwargs_t = self.templates[j]
            self._args[key] = (_materialise(args_t, copies, fixed), _materialise(kwargs_t, copies, fixed))
        return self._args[key]

    def zero_delta(self) -> torch.Tensor:
        """The (1, d) delta of one unpatched copy."""
        return self.inputs[0].new_zeros(1, self.inputs[0].shape[-1])

    def _joining_states(self, j: int, deltas: torch.Tensor) -> torch.Tensor:
        """The states of len(deltas) copies joining before block j: the unpatched ones, each copy's
        delta added at the fact token of its N rows."""
        k = deltas.shape[0]
        states = self.inputs[j].repeat(k, 1, 1)
        rows = torch.arange(k * self.N, device=states.device)
        values = deltas.to(states.dtype).repeat_interleave(self.N, dim=0)
        return states.index_put((rows, self.fact_cols.repeat(k)), values, accumulate=True)

    def run(self, joining: dict[int, torch.Tensor], modules: bool = False) -> torch.Tensor:
        """Final hidden states (after the final norm), copy-major. joining[j] = the (k, d) deltas of the
        k copies that join before block j (j = the delta's layer + 1; n_layers: after the last block);
        copies ordered by j. modules: call every block as its module (hooks placed since the runner
        was built then see it), not the fast forwards."""
        n_layers = self.adapter.n_layers
        hidden = None
        copies = 0
        for j in range(min(joining), n_layers + 1):
            if j in joining:
                new = self._joining_states(j, joining[j])
                hidden = new if hidden is None else torch.cat([hidden, new], dim=0)
                copies += joining[j].shape[0]
            if j < n_layers:
                args, kwargs = self._block_args(j, copies)
                block = self.adapter.layer(j) if modules else self.blocks[j]
                hidden = hidden_of(block(hidden, *args, **kwargs))
        return self.adapter.final_norm(hidden)

    def check(self, prompts: BatchedPrompts, hidden: torch.Tensor) -> None:
        """`hidden`, the runner's unpatched pass (`run({0: zero_delta()})`), reproduces the model's own
        forward; Unsupported otherwise."""
        mask = prompts.suffix_mask.bool()
        ref = self.reference[mask].float()
        err = (hidden[mask].float() - ref).abs().max().item()
        if not err <= 1e-3 * max(1.0, ref.abs().max().item()):
            raise Unsupported(f"block runner differs from the model's forward by {err:.3g}")

    # -- the runner interface of `delta.optimize_deltas`

    def unpatched(self) -> torch.Tensor:
        """The final hidden states of the N rows without delta, every block called as its module (so that
        the caller's hooks on the edited modules see it), checked against the model's own forward."""
        hidden = self.run({0: self.zero_delta()}, modules=True)
        self.check(self.prompts, hidden)
        if self.fast_layers:
            self.check(self.prompts, self.run({0: self.zero_delta()}))
        return hidden

    def patched(self, delta: torch.Tensor, active: list[int], layers: list[int]) -> torch.Tensor:
        """Final hidden states of the `active` copies (copy-major, in the order of `active`): copy i joins
        after block layers[i] with delta[i] added at the fact token."""
        joining: dict[int, list[int]] = {}
        for i in active:
            joining.setdefault(layers[i] + 1, []).append(i)
        return self.run({j: delta[ids] for j, ids in joining.items()})


class PrefixKV:
    """The model's own forward over the suffixes, on the prefix KV cache repeated for the copies; delta i is
    added by a hook on `modules[i]` to rows r * L + i (prompt-major: the cache repeats rows interleaved).
    Every copy runs at every step; the loop picks the active ones."""

    name = "prefix-kv"
    row_order = "prompt-major"

    def __init__(self, model: nn.Module, prompts: BatchedPrompts, cache: Any, modules: Sequence[nn.Module]) -> None:
        self.model, self.prompts, self.cache, self.modules = model, prompts, cache, list(modules)
        self.repeated = repeat_cache(model, prompts, cache, len(self.modules))

    def unpatched(self) -> torch.Tensor:
        return model_suffix_pass(self.model, self.prompts, self.cache, 1)

    def _add(self, delta: torch.Tensor, i: int):
        n, copies = self.prompts.n_rows, len(self.modules)
        rows = torch.arange(n, device=delta.device) * copies + i
        cols = self.prompts.fact_cols_t

        def hook(_module, _inputs, output):
            h = hidden_of(output)
            values = delta[i].to(h.dtype).unsqueeze(0).expand(n, -1)
            return with_hidden(output, h.index_put((rows, cols), values, accumulate=True))
        return hook

    def patched(self, delta: torch.Tensor, active: list[int], layers: list[int]) -> torch.Tensor:
        with hooks(forward=[(m, self._add(delta, i)) for i, m in enumerate(self.modules)]):
            return model_suffix_pass(self.model, self.prompts, self.repeated, len(self.modules))


class FullForward(PrefixKV):
    """`PrefixKV` without a cache: the whole prompts (`build_prompts(..., split=False)`), the reference."""

    name = "full"

    def __init__(self, model: nn.Module, prompts: BatchedPrompts, modules: Sequence[nn.Module]) -> None:
        if prompts.P:
            raise ValueError("FullForward runs whole prompts: build them with split=False")
        super().__init__(model, prompts, None, modules)


RUNNERS = ("full", "prefix-kv", "block")
"""The runners by name; `delta_runner: prefix-cache` is "block" with a deliberate fallback to "prefix-kv"."""


def make_runner(name: str, model: nn.Module, prompts: BatchedPrompts, cache: Any, modules: Sequence[nn.Module],
                attention: str = "auto") -> BlockRunner | PrefixKV:
    """The runner `name` for these prompts (split for "prefix-kv" and "block") and modules; `Unsupported`
    when the block runner cannot run this model's blocks."""
    if name == "full":
        return FullForward(model, prompts, modules)
    if name == "prefix-kv":
        return PrefixKV(model, prompts, cache, modules)
    if name == "block":
        return BlockRunner(model, prompts, cache, max_copies=len(modules), attention=attention)
    raise ValueError(f"unknown delta runner {name!r}; supported: {RUNNERS}")
