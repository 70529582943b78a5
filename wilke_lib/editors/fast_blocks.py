"""GPT-2's and GPT-J's blocks in fewer operations, for the block runner (`prefix_cache.BlockRunner`).

The runner calls every block above the edited layer twice per optimisation step (forward and
backward) on a few dozen tokens, where a block's cost is the number of operations it launches more
than their arithmetic. These forwards compute what the modules compute, from the block's own weights
(so they follow every edit), in fewer operations: GPT-J's query, key and value projections as one
matrix product (the three weights stacked once per runner) and the residual sums in one expression;
GPT-2's projections read directly from its `Conv1D` weights. Attention is PyTorch's
`scaled_dot_product_attention` with the mask, scale, rotary sin / cos and prefix keys / values the
model passes the block (recorded by the runner), as transformers' own "sdpa" attention.

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

BlockFn = Callable[..., torch.Tensor]


def _has_hooks(module: nn.Module) -> bool:
    hook_dicts = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
    if any(getattr(torch.nn.modules.module, f"_global{name}", None) for name in hook_dicts):
        return True
    return any(getattr(m, name, None) for m in module.modules() for name in hook_dicts)


def _layer_norm(ln: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return F.layer_norm(x, ln.normalized_shape, ln.weight, ln.bias, ln.eps)


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kwargs: dict[str, Any], attn: nn.Module) -> torch.Tensor:
    """softmax(q k^T * scale + mask) v over the cached prefix keys / values and the new ones;
    (n, heads, s, head_dim) in, (n, s, heads * head_dim) out."""
    cache = kwargs.get("cache")
    if cache is not None:
        k, v = cache.update(k, v, attn.layer_idx)
    mask = kwargs["attention_mask"]
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[..., :k.shape[-2]], scale=attn.scaling)
    n, heads, s, head_dim = out.shape
    return out.transpose(1, 2).reshape(n, s, heads * head_dim)


def _gpt2(block: nn.Module, hidden: torch.Tensor, **kwargs: Any) -> torch.Tensor:
    attn, mlp = block.attn, block.mlp
    n, s, d = hidden.shape
    a = _layer_norm(block.ln_1, hidden).reshape(n * s, d)
    qkv = torch.addmm(attn.c_attn.bias, a, attn.c_attn.weight).view(n, s, 3, attn.num_heads, attn.head_dim)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    o = _attend(q, k, v, kwargs, attn).reshape(n * s, d)
    x = hidden + torch.addmm(attn.c_proj.bias, o, attn.c_proj.weight).view(n, s, d)
    m = mlp.act(torch.addmm(mlp.c_fc.bias, _layer_norm(block.ln_2, x).reshape(n * s, d), mlp.c_fc.weight))
    return x + torch.addmm(mlp.c_proj.bias, m, mlp.c_proj.weight).view(n, s, d)


def _rotate(x: torch.Tensor, rotary_dim: int, sin: torch.Tensor, cos: torch.Tensor) -> torch.Tensor:
    from transformers.models.gptj.modeling_gptj import apply_rotary_pos_emb

    if rotary_dim >= x.shape[-1]:
        return apply_rotary_pos_emb(x, sin, cos)
    return torch.cat([apply_rotary_pos_emb(x[..., :rotary_dim], sin, cos), x[..., rotary_dim:]], dim=-1)


def _gptj(block: nn.Module, qkv_weight: torch.Tensor, hidden: torch.Tensor, **kwargs: Any) -> torch.Tensor:
    attn, mlp = block.attn, block.mlp
    n, s, d = hidden.shape
    heads, head_dim = attn.num_attention_heads, attn.head_dim
    h = _layer_norm(block.ln_1, hidden)
    q, k, v = F.linear(h, qkv_weight).view(n, s, 3, heads, head_dim).unbind(2)
    sin, cos = kwargs["position_embeddings"]
    rotary_dim = attn.rotary_dim or head_dim
    q, k = _rotate(q, rotary_dim, sin, cos), _rotate(k, rotary_dim, sin, cos)
    o = _attend(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), kwargs, attn)
    return F.linear(o, attn.out_proj.weight) + mlp.fc_out(mlp.act(mlp.fc_in(h))) + hidden


def _named(block: nn.Module, args: tuple, kwargs: dict[str, Any]) -> dict[str, Any] | None:
    """The block's arguments after the hidden states by name ("cache" for the KV cache whatever the
    model calls it); None when they do not bind to its forward's signature."""
    try:
        bound = inspect.signature(block.forward).bind(None, *args, **kwargs)
    except TypeError:
        return None
    named = dict(bound.arguments)
    named.pop(next(iter(named)))  # the hidden states
    named.update(named.pop("kwargs", {}))
    caches = [name for name, value in named.items() if hasattr(value, "update") and hasattr(value, "get_seq_length")]
    if len(caches) > 1:
        return None
    if caches:
        named["cache"] = named.pop(caches[0])
    return named


def _by_name(block: nn.Module, fn: Callable[..., torch.Tensor]) -> BlockFn:
    """`fn(hidden, **named)` called as the module is (positional arguments named once per call)."""
    names = list(inspect.signature(block.forward).parameters)[1:]
    cache_names = {"cache", "past_key_values", "layer_past"}

    def call(hidden: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        named = {**dict(zip(names, args)), **kwargs}
        for name in cache_names & named.keys() - {"cache"}:
            named["cache"] = named.pop(name)
        return fn(hidden, **named)
    return call


def fast_block(block: nn.Module, recorded_args: tuple, recorded_kwargs: dict[str, Any]) -> BlockFn | None:
    """`block(hidden, *args, **kwargs)` in fewer operations (module docstring), or None: call the module.
    `recorded_args` / `recorded_kwargs`: what the model passed the block after its hidden states."""
    from transformers.models.gpt2.modeling_gpt2 import GPT2Block
    from transformers.models.gptj.modeling_gptj import GPTJBlock

    named = _named(block, recorded_args, recorded_kwargs)
    if block.training or _has_hooks(block) or named is None or not isinstance(named.get("attention_mask"), torch.Tensor):
        return None
    if any(v is not None for k, v in named.items() if k.startswith("encoder_") or k == "head_mask"):
        return None
    if type(block) is GPT2Block:
        attn = block.attn
        if getattr(attn, "is_cross_attention", False) or getattr(attn, "reorder_and_upcast_attn", False) \
                or hasattr(block, "crossattention"):
            return None
        return _by_name(block, lambda hidden, **kwargs: _gpt2(block, hidden, **kwargs))
    if type(block) is GPTJBlock:
        sincos = named.get("position_embeddings")
        if not (isinstance(sincos, tuple) and len(sincos) == 2):
            return None
        attn = block.attn
        if any(p.bias is not None for p in (attn.q_proj, attn.k_proj, attn.v_proj, attn.out_proj)):
            return None
        qkv_weight = torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]).detach()
        return _by_name(block, lambda hidden, **kwargs: _gptj(block, qkv_weight, hidden, **kwargs))
    return None
