"""The keys and the residual delta that ROME, MEMIT and WilKE share.

* `compute_ks`: k*^l = mean over the context-prefixed prompts c_j + p of the key (the input of
  `mlp_out(l)`) at the fact token (ROME Eq. 3's k*, averaged over prefixes as ROME's compute_u).
* `optimize_delta`: the vector delta added to a module's output at the fact token that minimises
  ROME Eq. 4 = WilKE Eq. 9 = MEMIT Eq. 16:
      mean_j NLL(target_new | c_j + p) / |target|  +  kl_factor * KL(P_edit(. | p') || P_orig(. | p'))
      + v_weight_decay * ||delta|| / ||v0||^2   (or ||delta||^2 / ||v0||^2, v_weight_decay_form="squared"),
  Adam with lr v_lr, ||delta|| clamped to clamp_norm_factor * ||v0|| after each step, stopping when
  the loss is below v_early_stop_loss (and, as ROME, evaluating the loss once more than it steps).
  v0 is the module's output at the fact token of the bare prompt (ROME's "target_init"), p' the
  essence prompt ("{} is a"). Model parameters do not require grad meanwhile.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedTokenizerBase

from wilke_lib.arch import ModelAdapter, frozen, hidden_of, hooks, model_device, patch_output
from wilke_lib.errors import EditError
from wilke_lib.tokens import Request, encode_prompt, fact_token_index, fill, pad_id_of, prepare_request, right_pad


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


def weight_decay(hparams: Any, delta_norm: torch.Tensor, v0_norm: torch.Tensor) -> torch.Tensor:
    """The released code's v_weight_decay * ||delta|| / ||v0||^2 (or the squared form)."""
    size = delta_norm ** 2 if hparams.v_weight_decay_form == "squared" else delta_norm
    return hparams.v_weight_decay * size / v0_norm ** 2


def optimize_delta(model: nn.Module, tok: PreTrainedTokenizerBase, request: dict, module: nn.Module,
                   hparams: Any, prefixes: Sequence[str]) -> DeltaResult:
    """Optimise a vector delta added to `module`'s output at the fact token of every prompt (see the
    module docstring); NaN/inf loss -> EditError."""
    prepared = prepare_request(tok, request)
    device = model_device(model)
    target = prepared.target_new_ids
    n_tgt = len(target)
    seqs, cols, positions = rewrite_rows(tok, prepared, hparams, prefixes)
    n_rewrite = len(seqs)
    essence_ids, essence_col = essence_row(tok, prepared, hparams)
    seqs.append(essence_ids)
    cols.append(essence_col)
    ids, mask = right_pad(seqs, pad_id_of(tok), device)
    rows_t = torch.arange(len(seqs), device=device)
    cols_t = torch.tensor(cols, device=device)
    pos_rows = torch.arange(n_rewrite, device=device).unsqueeze(1).expand(-1, n_tgt)
    pos_cols = torch.tensor(positions, device=device)
    tgt_t = torch.tensor(target, device=device).unsqueeze(0).expand(n_rewrite, -1)

    def losses(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(NLL averaged over prompts, log-probs at the essence prompt's fact token)."""
        tgt_logits = logits[pos_rows, pos_cols].float()  # (n_rewrite, n_tgt, vocab)
        log_probs = torch.log_softmax(tgt_logits, dim=-1).gather(-1, tgt_t.unsqueeze(-1)).squeeze(-1)
        nll = -(log_probs.sum(dim=1) / n_tgt).mean()
        kl_log_probs = torch.log_softmax(logits[n_rewrite, cols[n_rewrite]].float(), dim=-1).unsqueeze(0)
        return nll, kl_log_probs

    with frozen(model):
        captured: dict[str, torch.Tensor] = {}

        def capture(_module, _inputs, output):
            captured["v0"] = hidden_of(output)[0, cols[0]].detach().float().clone()

        with torch.no_grad(), hooks(forward=[(module, capture)]):
            logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        nll_init, kl_init = losses(logits)
        kl_init = kl_init.detach()
        v0 = captured["v0"]
        v0_norm = v0.norm()
        if not torch.isfinite(v0_norm) or v0_norm == 0:
            raise EditError(f"module output at the fact token has norm {v0_norm.item()}: cannot scale delta")
        max_norm = hparams.clamp_norm_factor * v0_norm
        delta = torch.zeros(v0.shape[0], dtype=torch.float32, device=device, requires_grad=True)
        optimizer = torch.optim.Adam([delta], lr=hparams.v_lr)
        history: list[float] = []
        with hooks(forward=[(module, add_delta_hook(rows_t, cols_t, delta))]):
            for step in range(hparams.v_num_grad_steps):
                optimizer.zero_grad()
                logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
                nll, kl_log_probs = losses(logits)
                # F.kl_div(input=log P_orig, target=log P_edit) = KL(P_edit || P_orig), as ROME's code.
                kl = hparams.kl_factor * F.kl_div(kl_init, kl_log_probs, log_target=True, reduction="batchmean")
                decay = weight_decay(hparams, delta.norm(), v0_norm)
                loss = nll + kl + decay
                if not torch.isfinite(loss):
                    raise EditError(f"NaN/inf loss at step {step} of the delta optimisation")
                history.append(loss.item())
                if loss.item() < hparams.v_early_stop_loss or step == hparams.v_num_grad_steps - 1:
                    break
                loss.backward()
                optimizer.step()
                with torch.no_grad():
                    norm = delta.norm()
                    if norm > max_norm:
                        delta.mul_(max_norm / norm)
    delta = delta.detach()
    if not torch.isfinite(delta).all():
        raise EditError("delta optimisation produced non-finite values")
    info = {"nll_init": nll_init.item(), "nll": nll.item(), "kl": kl.item(), "weight_decay": decay.item(),
            "loss": loss.item(), "steps": len(history), "loss_history": history,
            "target_prob": float(torch.exp(-nll.detach())), "v0_norm": float(v0_norm), "delta_norm": float(delta.norm()),
            "n_prompts": n_rewrite}
    return DeltaResult(delta=delta, v0=v0, info=info)
