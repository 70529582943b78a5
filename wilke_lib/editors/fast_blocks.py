"""GPT-2's and GPT-J's blocks in fewer operations, for the block runner (`runners.BlockRunner`).

The runner calls every block above the edited layer twice per optimisation step (forward and
backward) on a few dozen tokens, where a block's cost is the number of operations it launches more
than their arithmetic. These forwards compute what the modules compute, from the block's own weights
(read when the runner is built, once per edit), in fewer operations: GPT-J's query, key and value and
the rotated query and key of its rotary embedding out of one matrix product (the rotation is linear:
its rows are folded into the stacked weights), the residual sums in one expression; GPT-2's
projections straight from its `Conv1D` weights. Attention is PyTorch's `scaled_dot_product_attention`
with the mask, scale, rotary sin / cos and prefix keys / values the model passes the block (recorded
by the runner), as transformers' own "sdpa" attention; on a CPU the same softmax written out in three
operations is faster at these sizes (`_attend_explicitly`). `attention` picks the kernel: "auto" (explicit
on a CPU, sdpa elsewhere), "explicit" or "sdpa"; `tests/test_runners.py` runs both.

`fast_block` returns None, and the runner calls the module, for any block it does not know exactly:
another class, a training-mode block, a hook on any of its modules (an editor's hook layer must
run), GPT-2's cross-attention or upcast-reordered attention, or arguments it was not recorded with.
`BlockRunner.check` compares the runner's unpatched pass with the model's own forward in every case.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from wilke_lib.arch import is_kv_cache

BlockFn = Callable[..., torch.Tensor]
ATTENTION_KERNELS = ("auto", "explicit", "sdpa")


def _has_hooks(module: nn.Module) -> bool:
    hook_dicts = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
    if any(getattr(torch.nn.modules.module, f"_global{name}", None) for name in hook_dicts):
        return True
    return any(getattr(m, name, None) for m in module.modules() for name in hook_dicts)


def _layer_norm(ln: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return F.layer_norm(x, ln.normalized_shape, ln.weight, ln.bias, ln.eps)


def _attend_explicitly(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
                       scale: float) -> torch.Tensor:
    """softmax(q k^T * scale + mask) v as three operations. On a CPU, for the runner's few query tokens
    and heads of a few dozen dimensions, this is faster than `scaled_dot_product_attention`, whose
    flash kernel (and its backward) costs more to set up than to run at these sizes. Interleaved A/B on
    the organisms (2 threads, 12 records, toy-gpt2 / toy-gptj): ROME's delta optimisation 182 -> 141 /
    213 -> 193 ms, WilKE's batched search 372 -> 273 / 409 -> 308 ms."""
    scores = (q @ k.transpose(-1, -2)) * scale
    scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
    return torch.softmax(scores, dim=-1) @ v


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kwargs: dict[str, Any], attn: nn.Module,
            kernel: str) -> torch.Tensor:
    """softmax(q k^T * scale + mask) v over the cached prefix keys / values and the new ones;
    (n, heads, s, head_dim) in, (n, s, heads * head_dim) out."""
    cache = kwargs.get("cache")
    if cache is not None:
        k, v = cache.update(k, v, attn.layer_idx)
    mask = kwargs["attention_mask"][..., :k.shape[-2]]
    if kernel == "explicit" or (kernel == "auto" and q.device.type == "cpu"):
        out = _attend_explicitly(q, k, v, mask, attn.scaling)
    else:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=attn.scaling)
    n, heads, s, head_dim = out.shape
    return out.transpose(1, 2).reshape(n, s, heads * head_dim)


def _gpt2(block: nn.Module, kernel: str, hidden: torch.Tensor, **kwargs: Any) -> torch.Tensor:
    attn, mlp = block.attn, block.mlp
    n, s, d = hidden.shape
    a = _layer_norm(block.ln_1, hidden).reshape(n * s, d)
    qkv = torch.addmm(attn.c_attn.bias, a, attn.c_attn.weight).view(n, s, 3, attn.num_heads, attn.head_dim)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    o = _attend(q, k, v, kwargs, attn, kernel).reshape(n * s, d)
    x = hidden + torch.addmm(attn.c_proj.bias, o, attn.c_proj.weight).view(n, s, d)
    m = mlp.act(torch.addmm(mlp.c_fc.bias, _layer_norm(block.ln_2, x).reshape(n * s, d), mlp.c_fc.weight))
    return x + torch.addmm(mlp.c_proj.bias, m, mlp.c_proj.weight).view(n, s, d)


def _rotation_rows(weight: torch.Tensor, heads: int, rotary_dim: int) -> torch.Tensor:
    """Rows that compute GPT-J's rotate_every_two of `weight`'s output on each head's first rotary_dim
    dimensions (out[2i] = -x[2i+1], out[2i+1] = x[2i]) and 0 on the others: the rotation is linear, so
    it is folded into the projection (exactly: the rows are copies and negations)."""
    d_out, d_in = weight.shape
    per_head = weight.reshape(heads, d_out // heads, d_in)
    rows = torch.zeros_like(per_head)
    rows[:, 0:rotary_dim:2] = -per_head[:, 1:rotary_dim:2]
    rows[:, 1:rotary_dim:2] = per_head[:, 0:rotary_dim:2]
    return rows.reshape(d_out, d_in)


def _gptj_forward(heads: int, rotary_dim: int, kernel: str) -> Callable[..., torch.Tensor]:
    """GPT-J's block, x + attn(ln_1 x) + mlp(ln_1 x), with the rotary embedding
    q * cos + rotate_every_two(q) * sin (HF's apply_rotary_pos_emb) on the first rotary_dim dimensions
    of each head, the rotated q and k coming out of the same matrix product as q, k and v."""
    angles: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    def cos_sin(sin: torch.Tensor, cos: torch.Tensor, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
        if id(sin) not in angles:  # once per tensor the runner passes (the entry keeps `sin` alive)
            pad = head_dim - rotary_dim
            full_cos = torch.cat([cos.repeat_interleave(2, dim=-1), cos.new_ones(*cos.shape[:-1], pad)], dim=-1)
            full_sin = torch.cat([sin.repeat_interleave(2, dim=-1), sin.new_zeros(*sin.shape[:-1], pad)], dim=-1)
            angles[id(sin)] = (sin, full_cos.unsqueeze(2), full_sin.unsqueeze(2))
        return angles[id(sin)][1:]

    def forward(block: nn.Module, weight: torch.Tensor, hidden: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        attn, mlp = block.attn, block.mlp
        n, s, d = hidden.shape
        head_dim = d // heads
        h = _layer_norm(block.ln_1, hidden)
        q, k, v, q_rotated, k_rotated = F.linear(h, weight).view(n, s, 5, heads, head_dim).unbind(2)
        sin, cos = kwargs["position_embeddings"]
        full_cos, full_sin = cos_sin(sin, cos, head_dim)  # (n, s, 1, head_dim)
        q = q * full_cos + q_rotated * full_sin
        k = k * full_cos + k_rotated * full_sin
        o = _attend(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), kwargs, attn, kernel)
        return F.linear(o, attn.out_proj.weight) + mlp.fc_out(mlp.act(mlp.fc_in(h))) + hidden
    return forward


def _named(block: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[dict[str, Any], str | None] | None:
    """The block's arguments after the hidden states by name, and the name of its KV cache argument;
    None when they do not bind to its forward's signature or hold more than one cache."""
    try:
        bound = inspect.signature(block.forward).bind(None, *args, **kwargs)
    except TypeError:
        return None
    named = dict(bound.arguments)
    named.pop(next(iter(named)))  # the hidden states
    named.update(named.pop("kwargs", {}))
    caches = [name for name, value in named.items() if is_kv_cache(value)]
    return None if len(caches) > 1 else (named, caches[0] if caches else None)


def _by_name(block: nn.Module, fn: Callable[..., torch.Tensor], cache_name: str | None) -> BlockFn:
    """`fn(hidden, **named)` called as the module is: positional arguments named, the KV cache passed
    as `cache` whatever the model calls it."""
    names = list(inspect.signature(block.forward).parameters)[1:]

    def call(hidden: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        named = {**dict(zip(names, args)), **kwargs}
        if cache_name is not None and cache_name != "cache":
            named["cache"] = named.pop(cache_name)
        return fn(hidden, **named)
    return call


def fast_block(block: nn.Module, recorded_args: tuple, recorded_kwargs: dict[str, Any],
               attention: str = "auto") -> BlockFn | None:
    """`block(hidden, *args, **kwargs)` in fewer operations (module docstring), or None: call the module.
    `recorded_args` / `recorded_kwargs`: what the model passed the block after its hidden states;
    `attention`: one of ATTENTION_KERNELS."""
    if attention not in ATTENTION_KERNELS:
        raise ValueError(f"attention must be one of {ATTENTION_KERNELS}, got {attention!r}")
    from transformers.models.gpt2.modeling_gpt2 import GPT2Block
    from transformers.models.gptj.modeling_gptj import GPTJBlock

    found = _named(block, recorded_args, recorded_kwargs)
    if block.training or _has_hooks(block) or found is None:
        return None
    named, cache_name = found
    if not isinstance(named.get("attention_mask"), torch.Tensor):
        return None
    if any(v is not None for k, v in named.items() if k.startswith("encoder_") or k == "head_mask"):
        return None
    if type(block) is GPT2Block:
        attn = block.attn
        if getattr(attn, "is_cross_attention", False) or getattr(attn, "reorder_and_upcast_attn", False) \
                or hasattr(block, "crossattention"):
            return None
        return _by_name(block, lambda hidden, **kwargs: _gpt2(block, attention, hidden, **kwargs), cache_name)
    if type(block) is GPTJBlock:
        sincos = named.get("position_embeddings")
        if not (isinstance(sincos, tuple) and len(sincos) == 2):
            return None
        attn = block.attn
        if any(p.bias is not None for p in (attn.q_proj, attn.k_proj, attn.v_proj, attn.out_proj)):
            return None
        heads = attn.num_attention_heads
        rotary_dim = attn.rotary_dim or attn.head_dim
        q_w, k_w = attn.q_proj.weight.detach(), attn.k_proj.weight.detach()
        weight = torch.cat([q_w, k_w, attn.v_proj.weight.detach(),
                            _rotation_rows(q_w, heads, rotary_dim), _rotation_rows(k_w, heads, rotary_dim)])
        forward = _gptj_forward(heads, rotary_dim, attention)
        return _by_name(block, lambda hidden, **kwargs: forward(block, weight, hidden, **kwargs), cache_name)
    return None
