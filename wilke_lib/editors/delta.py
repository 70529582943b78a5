"""ROME's keys and the one delta optimisation that ROME, MEMIT and WilKE share.

* `compute_keys` / `compute_ks`: k*^l = mean over the context-prefixed prompts c_j + p of the key (the
  input of `mlp_out(l)`) at the fact token (ROME Eq. 3's k*, averaged over prefixes as ROME's compute_u).
* `optimize_deltas`: the vector delta added to a module's output at the fact token that minimises
  ROME Eq. 4 = WilKE Eq. 9 = MEMIT Eq. 16:
      mean_j NLL(target_new | c_j + p) / |target|  +  kl_factor * KL(P_edit(. | p') || P_orig(. | p'))
      + v_weight_decay * ||delta|| / ||v0||^2   (or ||delta||^2 / ||v0||^2, v_weight_decay_form="squared"),
  Adam with lr v_lr, ||delta|| clamped to clamp_norm_factor * ||v0|| after each step, stopping when
  the loss is below v_early_stop_loss (and, as ROME, evaluating the loss once more than it steps).
  v0 is the module's output at the fact token of the bare prompt (ROME's "target_init"), p' the
  essence prompt ("{} is a"). Model parameters do not require grad meanwhile.

One loop serves every editor: it optimises a row of deltas, one per layer (one row for ROME and for
MEMIT's z of one request, one per candidate layer for WilKE's search), and asks a runner
(`editors.runners`) for the final hidden states of every copy of the prompts. Rows are independent:

* the loss is the SUM of the per-row losses and row i's prompts depend on delta_i only, so each
  delta gets exactly its own gradient;
* Adam is elementwise (moments, bias corrections and the step count are per element, and every row
  still being optimised has taken the same number of steps), so one Adam over the (L, d) parameter is
  L independent Adams; the clamp is applied per row;
* a row stops at the first step whose loss is below `v_early_stop_loss`: its loss leaves the sum,
  its copy leaves the batch (block runner) and its row is restored after `optimizer.step()` (a zero
  gradient alone would not freeze it: Adam's momentum would still move it).

With several rows the arithmetic is the one-row optimisation's in another order, so they agree up to
float rounding amplified by the Adam steps (tests/test_batched_search.py: rtol 1e-4 in float32).
Exception: at a layer where the loss does not depend on delta beyond rounding (the LAST layer when
the fact token is not the prompt's last token: the NLL term cannot see delta there, and the KL term
has zero gradient at delta = 0), Adam normalises gradients that are pure rounding noise, in both; such
a layer's delta norm agrees only in order of magnitude.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedTokenizerBase

from wilke_lib.arch import ModelAdapter, frozen, fused_activations, hidden_of, hooks, model_device, patch_output
from wilke_lib.editors.runners import (RUNNERS, BatchedPrompts, Unsupported, build_prompts, make_runner,
                                       prefix_cache)
from wilke_lib.errors import EditError
from wilke_lib.tokens import encode_prompt, fact_token_index, pad_id_of, prepare_request, right_pad

log = logging.getLogger(__name__)

SITES = ("mlp_out", "block")
"""Where delta is added: the output of `mlp_out(l)` (ROME, WilKE) or of block l (MEMIT's z)."""
INFO_KEYS = ("nll_init", "nll", "kl", "weight_decay", "loss", "steps", "loss_history", "target_prob", "v0_norm",
             "delta_norm", "n_prompts")


@dataclass
class LayerKeys:
    """The keys of one layer at the fact token: `star`, the mean over the prompts c_j + p (ROME's k*),
    and `bare`, the key of the bare prompt p (ROME's released update divides by it, ROME's compute_v)."""

    star: torch.Tensor
    bare: torch.Tensor


@torch.no_grad()
def compute_keys(model: nn.Module, tok: PreTrainedTokenizerBase, request: dict, layers: Sequence[int],
                 hparams: Any, prefixes: Sequence[str]) -> dict[int, LayerKeys]:
    """k*^l and the bare prompt's key of every l in `layers`, in one forward pass: the input of
    `mlp_out(l)` at the fact token (ROME's compute_u before C^-1), float32, (d_mlp,). The bare prompt
    is run too when the prefixes do not include "" (it does not enter k* then)."""
    prepared = prepare_request(tok, request)
    adapter = ModelAdapter(model)
    device = model_device(model)
    rows = list(prefixes) if "" in prefixes else list(prefixes) + [""]
    bare_row = rows.index("")
    seqs = [encode_prompt(tok, prefix + prepared.prompt) for prefix in rows]
    cols = [fact_token_index(tok, prepared.template, prepared.subject, prefix, hparams.fact_token) for prefix in rows]
    ids, mask = right_pad(seqs, pad_id_of(tok), device)
    rows_t = torch.arange(len(prefixes), device=device)
    cols_t = torch.tensor(cols[:len(prefixes)], device=device)
    keys: dict[int, LayerKeys] = {}

    def capture(l: int):
        def hook(_module, inputs):
            found = inputs[0]
            keys[l] = LayerKeys(star=found[rows_t, cols_t].float().mean(0),
                                bare=found[bare_row, cols[bare_row]].float().clone())
        return hook

    with frozen(model), hooks(pre=[(adapter.mlp_out(l), capture(l)) for l in layers]):
        model(input_ids=ids, attention_mask=mask, use_cache=False)
    return {l: keys[l] for l in layers}


def compute_ks(model: nn.Module, tok: PreTrainedTokenizerBase, request: dict, layers: Sequence[int],
               hparams: Any, prefixes: Sequence[str]) -> dict[int, torch.Tensor]:
    """k*^l of every l in `layers` (see `compute_keys`)."""
    return {l: k.star for l, k in compute_keys(model, tok, request, layers, hparams, prefixes).items()}


def add_delta_hook(rows: torch.Tensor, cols: torch.Tensor, delta: torch.Tensor):
    """Forward hook adding `delta` to the module output at (rows[i], cols[i]) (out of place)."""
    def add(hidden: torch.Tensor) -> torch.Tensor:
        values = delta.to(hidden.dtype).unsqueeze(0).expand(len(rows), -1)
        return hidden.index_put((rows, cols), values, accumulate=True)
    return patch_output(add)


@dataclass
class DeltaResult:
    """Optimised delta (float32, d_model), the module's initial output v0 at the bare prompt, and a log."""

    delta: torch.Tensor
    v0: torch.Tensor
    info: dict[str, Any] = field(default_factory=dict)


def weight_decay(hparams: Any, delta_norm: torch.Tensor, v0_norm: torch.Tensor) -> torch.Tensor:
    """The released code's v_weight_decay * ||delta|| / ||v0||^2 (or the squared form)."""
    size = delta_norm ** 2 if hparams.v_weight_decay_form == "squared" else delta_norm
    return hparams.v_weight_decay * size / v0_norm ** 2


@contextmanager
def timed(profile: dict[str, float] | None, name: str, device: torch.device):
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


def copy_losses(model: nn.Module, hidden: torch.Tensor, prompts: BatchedPrompts, n_copies: int,
                copy_major: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Per copy: (NLL of target_new averaged over the rewriting prompts, log-probs at the essence fact token).

    Row of (prompt r, copy p): p * N + r (copy-major) or r * n_copies + p (prompt-major). Only the needed
    positions go through the unembedding."""
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


def _fall_back(name: str, model: nn.Module, err: Unsupported) -> str:
    """The reason to record when "prefix-cache" falls back from the block runner to "prefix-kv" (logged at
    WARNING); a runner asked for by name re-raises instead."""
    if name != "prefix-cache":
        raise Unsupported(f"delta runner {name!r} cannot run {type(model).__name__}: {err}") from err
    reason = f"block runner unavailable ({err}); using 'prefix-kv'"
    log.warning("%s: %s", type(model).__name__, reason)
    return reason


def optimize_deltas(model: nn.Module, tok: PreTrainedTokenizerBase, request: dict, layers: Sequence[int],
                    hparams: Any, prefixes: Sequence[str], runner: str = "prefix-cache", site: str = "mlp_out",
                    profile: dict[str, float] | None = None) -> dict[int, DeltaResult]:
    """Eq. 4's delta at `site` of every layer in `layers`, one row each, optimised together (module docstring).

    runner: "prefix-cache" (the block runner, or "prefix-kv" where it cannot serve the model: a WARNING,
    and info["delta_runner_fallback"] says why) or one of `runners.RUNNERS` ("full", "prefix-kv",
    "block"); `profile` (a dict) accumulates seconds per phase. Returns {layer: DeltaResult}; every
    result's info["delta_runner"] names the runner that computed it. NaN/inf loss -> EditError."""
    if runner not in RUNNERS + ("prefix-cache",):
        raise ValueError(f"runner must be one of {RUNNERS + ('prefix-cache',)}, got {runner!r}")
    if site not in SITES:
        raise ValueError(f"site must be one of {SITES}, got {site!r}")
    order = sorted(layers)
    if len(set(order)) != len(order):
        raise ValueError(f"repeated layer in {list(layers)}")
    if not order:
        return {}
    adapter = ModelAdapter(model)
    L, device = len(order), model_device(model)
    prompts = build_prompts(tok, request, hparams, prefixes, device, split=(runner != "full"))
    modules = [adapter.mlp_out(l) if site == "mlp_out" else adapter.layer(l) for l in order]

    with frozen(model), fused_activations(model):
        with timed(profile, "prefix pass", device):
            cache = prefix_cache(model, prompts)
        v0s: dict[int, torch.Tensor] = {}

        def capture(i: int):
            def hook(_module, _inputs, output):
                v0s[i] = hidden_of(output)[0, prompts.fact_in_suffix[0]].detach().float().clone()
            return hook

        # "prefix-cache" is the block runner, or "prefix-kv" where it cannot serve the model; built before the
        # v0 hooks are placed, which would keep `fast_blocks` from serving the hooked blocks
        fallback = None
        with timed(profile, "runner set-up", device):
            try:
                run = make_runner("block" if runner == "prefix-cache" else runner, model, prompts, cache, modules)
            except Unsupported as err:
                fallback = _fall_back(runner, model, err)
                run = make_runner("prefix-kv", model, prompts, cache, modules)
        with timed(profile, "unpatched pass", device), torch.no_grad(), \
                hooks(forward=[(m, capture(i)) for i, m in enumerate(modules)]):
            try:  # the block runner checks itself against the model's own forward here
                hidden = run.unpatched()
            except Unsupported as err:
                fallback = _fall_back(runner, model, err)
                run = make_runner("prefix-kv", model, prompts, cache, modules)
                hidden = run.unpatched()
            nll_init, kl_init = copy_losses(model, hidden, prompts, 1, True)
        kl_init = kl_init.detach()  # (1, vocab): the unpatched log-probs, the same for every copy
        v0 = torch.stack([v0s[i] for i in range(L)])  # (L, d_model)
        v0_norm = v0.norm(dim=1)
        for i in range(L):
            if not torch.isfinite(v0_norm[i]) or v0_norm[i] == 0:
                raise EditError(f"module output at the fact token has norm {v0_norm[i].item()}: cannot scale delta")
        delta, histories, final = _adam(model, run, prompts, order, v0, kl_init, hparams, profile, device)
    if not torch.isfinite(delta).all():
        raise EditError("delta optimisation produced non-finite values")
    out: dict[int, DeltaResult] = {}
    for i, layer in enumerate(order):
        d = delta[i].clone()
        info = {"nll_init": float(nll_init[0]), **final[i], "steps": len(histories[i]), "loss_history": histories[i],
                "target_prob": float(torch.exp(-torch.tensor(final[i]["nll"]))), "v0_norm": float(v0_norm[i]),
                "delta_norm": float(d.norm()), "n_prompts": prompts.n_rewrite}
        info = {k: info[k] for k in INFO_KEYS}
        info["delta_runner"] = run.name
        if fallback:
            info["delta_runner_fallback"] = fallback
        out[layer] = DeltaResult(delta=d, v0=v0[i].clone(), info=info)
    return out


def _adam(model: nn.Module, run: Any, prompts: BatchedPrompts, order: list[int], v0: torch.Tensor,
          kl_init: torch.Tensor, hparams: Any, profile: dict[str, float] | None, device: torch.device):
    """The Adam loop of Eq. 4 over the rows still active: (deltas (L, d), loss histories, final loss parts)."""
    L = len(order)
    v0_norm = v0.norm(dim=1)
    max_norm = hparams.clamp_norm_factor * v0_norm
    delta = torch.zeros_like(v0, requires_grad=True)  # (L, d_model) float32
    optimizer = torch.optim.Adam([delta], lr=hparams.v_lr)
    active = list(range(L))
    histories: list[list[float]] = [[] for _ in range(L)]
    final: dict[int, dict[str, float]] = {}
    n_steps = hparams.v_num_grad_steps
    copy_major = run.row_order == "copy-major"
    for step in range(n_steps):
        optimizer.zero_grad()
        with timed(profile, "forward", device):
            hidden = run.patched(delta, active, order)
            in_batch = len(active) if copy_major else L  # the block runner runs the active copies only
            nll, kl_log_probs = copy_losses(model, hidden, prompts, in_batch, copy_major)
            if in_batch != len(active):
                pick = torch.tensor(active, device=device)
                nll, kl_log_probs = nll[pick], kl_log_probs[pick]
            idx = torch.tensor(active, device=device)
            # F.kl_div(input=log P_orig, target=log P_edit) = KL(P_edit || P_orig), as ROME's code
            kl = hparams.kl_factor * F.kl_div(kl_init.expand(len(active), -1), kl_log_probs, log_target=True,
                                              reduction="none").sum(dim=-1)
            decay = weight_decay(hparams, delta[idx].norm(dim=1), v0_norm[idx])
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
        with timed(profile, "backward", device):
            (loss[keep].sum() if len(keep) < len(active) else loss.sum()).backward()
        with timed(profile, "optimizer step", device):
            still = [active[k] for k in keep]
            done = torch.tensor([i for i in range(L) if i not in still], dtype=torch.long, device=device)
            kept_rows = delta.detach()[done].clone() if len(done) else None
            optimizer.step()
            with torch.no_grad():
                if kept_rows is not None:
                    delta[done] = kept_rows  # a finished row does not move (Adam's momentum would move it)
                live = torch.zeros(L, dtype=torch.bool, device=device)
                live[still] = True
                norm = delta.norm(dim=1)
                over = (norm > max_norm) & live
                if over.any():
                    delta.mul_(torch.where(over, max_norm / norm, torch.ones_like(norm)).unsqueeze(1))
            active = still
    return delta.detach(), histories, final


def optimize_delta(model: nn.Module, tok: PreTrainedTokenizerBase, request: dict, layer: int, hparams: Any,
                   prefixes: Sequence[str], site: str = "mlp_out", runner: str | None = None) -> DeltaResult:
    """Eq. 4's delta at one layer: `optimize_deltas` with one row (runner: `hparams.delta_runner` by default)."""
    runner = runner or hparams.delta_runner
    return optimize_deltas(model, tok, request, [layer], hparams, prefixes, runner=runner, site=site)[layer]
