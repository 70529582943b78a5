"""Delta optimisations at several layers in one batch (WilKE's search), with the prefix cache.

`optimize_deltas_batched` returns for every layer l the same `DeltaResult` as
`delta.optimize_delta` at `mlp_out(l)` (same keys, deltas and norms up to float rounding), but
optimises the L deltas in ONE loop of `v_num_grad_steps` steps:

* one batched forward and one backward per step: the N prompts of `optimize_delta` (the
  context-prefixed prompts c_j + p and the essence prompt p') are repeated once per layer; copy i
  gets delta_i added to the output of `mlp_out(l_i)` at the fact token, and only there;
* the loss is the SUM of the per-copy losses. Copy i's rows depend on delta_i only, so
  d(sum)/d delta_i = d loss_i / d delta_i: each delta gets exactly its own gradient;
* one Adam over the stacked (L, d_model) parameter. Adam is elementwise (moments, bias corrections
  and the step count are per element, and every row still being optimised has taken the same number
  of steps), so it is L independent Adams; the clamp ||delta_i|| <= clamp_norm_factor * ||v0_i|| is
  applied per row;
* early stopping: `optimize_delta` stops a layer at the first step whose loss is below
  `v_early_stop_loss` (and, as ROME, evaluates the loss once more than it steps). Here each row is
  frozen at exactly that step: its loss leaves the sum, its copy leaves the batch, and its row is
  restored after `optimizer.step()` (a zero gradient alone would not freeze it: Adam's momentum would
  still move it). `info["steps"]` / `info["loss_history"]` are those of the sequential run.

Modes: "staircase" (default) runs the `prefix_cache.BlockRunner` (every step runs only the tokens
from the fact token on, each copy from the block after its own layer up, and only the logits the loss reads); it
falls back to "model" when the runner cannot reproduce the model's forward. "model" runs the model's
own forward on all copies with the prefix KV cache; "full" runs the whole prompts (no KV cache).

Equality. The batched run does the same arithmetic in another order (other batch shapes, attention
over a cache), so it agrees with the sequential optimisation up to float rounding amplified by the
Adam steps (tests/test_batched_search.py: rtol 1e-4 in float32). Exception: at a layer where the
loss does not depend on delta beyond rounding (the LAST layer when the fact token is not the prompt's
last token: the target logits are read after the fact token, so the NLL term cannot see delta there,
and the KL term has zero gradient at delta = 0), Adam normalises gradients that are pure rounding
noise, in both implementations; such a layer's delta norm agrees only in order of magnitude.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedTokenizerBase

from wilke_lib.arch import ModelAdapter, frozen, fused_activations, hidden_of, hooks, model_device, with_hidden
from wilke_lib.editors.delta import DeltaResult, weight_decay
from wilke_lib.editors.prefix_cache import (BatchedPrompts, BlockRunner, Unsupported, build_prompts,
                                            model_suffix_pass, prefix_cache, repeat_cache)
from wilke_lib.errors import EditError

log = logging.getLogger(__name__)

MODES = ("staircase", "model", "full")
# what a block runner that cannot run this model raises (mode "staircase" then falls back to "model")
RUNNER_ERRORS = (Unsupported, TypeError, AttributeError, IndexError, KeyError, RuntimeError)
INFO_KEYS = ("nll_init", "nll", "kl", "weight_decay", "loss", "steps", "loss_history", "target_prob", "v0_norm",
             "delta_norm", "n_prompts")



# ---- timing ----------------------------------------------------------------------------------------

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


SITES = ("mlp_out", "block")


def optimize_deltas_batched(model: nn.Module, tok: PreTrainedTokenizerBase, request: dict, layers: Sequence[int],
                            hparams: Any, prefixes: Sequence[str], mode: str = "staircase",
                            profile: dict[str, float] | None = None, site: str = "mlp_out") -> dict[int, DeltaResult]:
    """`delta.optimize_delta` at `mlp_out(l)` (site "mlp_out": ROME, WilKE) or at the output of block l
    (site "block": MEMIT's z) for every l in `layers`, optimised together; with one layer, ROME's or
    MEMIT's own optimisation run on the prefix cache.

    Returns {layer: DeltaResult} with the info keys of `optimize_delta`. mode: "staircase" (default;
    falls back to "model" if the block runner cannot reproduce the model's forward), "model" or
    "full" (see the module docstring); `profile` (a dict) accumulates seconds per phase.
    The chosen mode is reported in every result's info["batched_mode"].
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if site not in SITES:
        raise ValueError(f"site must be one of {SITES}, got {site!r}")
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
    modules = [adapter.mlp_out(l) if site == "mlp_out" else adapter.layer(l) for l in order]

    with frozen(model), fused_activations(model):
        with timed(profile, "prefix pass", device):
            cache = prefix_cache(model, prompts)
        runner = None
        if mode == "staircase":
            with timed(profile, "block runner set-up", device):
                try:
                    runner = BlockRunner(model, prompts, cache, max_copies=L)
                except RUNNER_ERRORS as err:
                    runner, mode = None, "model"
                    log.info("staircase block runner unavailable (%s); using mode 'model'", err)

        # -- unpatched pass: v0 of every module (bare prompt = row 0, fact token), reference log-probs, nll_init;
        # through the block runner when there is one, which it checks against the model's own forward
        with timed(profile, "unpatched pass", device):
            v0s: dict[int, torch.Tensor] = {}

            def capture(i: int):
                def hook(_module, _inputs, output):
                    v0s[i] = hidden_of(output)[0, prompts.fact_in_suffix[0]].detach().float().clone()
                return hook

            with torch.no_grad(), hooks(forward=[(m, capture(i)) for i, m in enumerate(modules)]):
                hidden = None
                if runner is not None:
                    try:
                        hidden = runner.run({0: runner.zero_delta()}, modules=True)  # the v0 hooks see the modules
                        runner.check(prompts, hidden)
                        if runner.fast_layers:
                            runner.check(prompts, runner.run({0: runner.zero_delta()}))
                    except RUNNER_ERRORS as err:
                        runner, mode, hidden = None, "model", None
                        log.info("staircase block runner unavailable (%s); using mode 'model'", err)
                if hidden is None:
                    hidden = model_suffix_pass(model, prompts, cache, 1)
                nll_init, kl_init = _copy_loss_parts(model, hidden, prompts, 1, True)
        kl_init = kl_init.detach()  # (1, vocab): the unpatched log-probs, the same for every copy
        v0 = torch.stack([v0s[i] for i in range(L)])  # (L, d_model)
        v0_norm = v0.norm(dim=1)
        for i in range(L):
            if not torch.isfinite(v0_norm[i]) or v0_norm[i] == 0:
                raise EditError(f"module output at the fact token has norm {v0_norm[i].item()}: cannot scale delta")
        max_norm = hparams.clamp_norm_factor * v0_norm

        # -- the batched optimisation
        full_cache = repeat_cache(model, prompts, cache, L) if mode == "model" else cache
        delta = torch.zeros_like(v0, requires_grad=True)  # (L, d_model) float32
        optimizer = torch.optim.Adam([delta], lr=hparams.v_lr)
        fact_cols = prompts.fact_cols_t

        def add_delta(i: int):  # mode "model": prompt-major rows (the KV cache repeats rows interleaved)
            rows = torch.arange(N, device=device) * L + i

            def hook(_module, _inputs, output):
                h = hidden_of(output)
                values = delta[i].to(h.dtype).unsqueeze(0).expand(N, -1)
                return with_hidden(output, h.index_put((rows, fact_cols), values, accumulate=True))
            return hook

        active = list(range(L))
        histories: list[list[float]] = [[] for _ in range(L)]
        final: dict[int, dict[str, float]] = {}
        n_steps = hparams.v_num_grad_steps
        with hooks(forward=[(m, add_delta(i)) for i, m in enumerate(modules)] if runner is None else []):
            for step in range(n_steps):
                optimizer.zero_grad()
                with timed(profile, "forward", device):
                    if runner is not None:  # copy i joins after its own block, delta i added (copy-major rows)
                        joining: dict[int, list[int]] = {}
                        for i in active:
                            joining.setdefault(order[i] + 1, []).append(i)
                        hidden = runner.run({j: delta[ids] for j, ids in joining.items()})
                        in_batch, copy_major = active, True
                    else:
                        hidden = model_suffix_pass(model, prompts, full_cache, L)
                        in_batch, copy_major = list(range(L)), False
                    nll, kl_log_probs = _copy_loss_parts(model, hidden, prompts, len(in_batch), copy_major)
                    if len(in_batch) != len(active):
                        pick = torch.tensor(active, device=device)
                        nll, kl_log_probs = nll[pick], kl_log_probs[pick]
                    idx = torch.tensor(active, device=device)
                    # F.kl_div(input=log P_orig, target=log P_edit) = KL(P_edit || P_orig), as delta.optimize_delta
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
                            delta[done] = kept_rows  # a frozen row does not move (Adam's momentum would move it)
                        live = torch.zeros(L, dtype=torch.bool, device=device)
                        live[still] = True
                        norm = delta.norm(dim=1)
                        over = (norm > max_norm) & live
                        if over.any():
                            delta.mul_(torch.where(over, max_norm / norm, torch.ones_like(norm)).unsqueeze(1))
                    active = still
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


