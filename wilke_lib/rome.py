"""ROME: Rank-One Model Editing (Meng et al. 2022a, "Locating and Editing Factual Associations in GPT").

One edit rewrites W_proj of one MLP layer l so that the key k* of the subject maps to a new
value v*:

* `compute_ks`: k* = mean over the context-prefixed prompts c_j + p of the key (input of
  `mlp_out(l)`) at the subject's last token (ROME Eq. 3's k* averaged over prefixes).
* `compute_v`: v* = W k* + delta, delta minimising ROME Eq. 4 (= WilKE Eq. 9): the NLL of
  target_new after every c_j + p with delta added to the output of `mlp_out(l)` at the subject's
  last token, plus kl_factor * KL(P_orig || P_edit) of the next-token distribution at the subject's
  last token of the essence prompt p' ("{} is a"), plus v_weight_decay * ||delta||^2 / ||v0||^2.
  After each Adam step ||delta|| <= clamp_norm_factor * ||v0||. v0 is the current output of
  `mlp_out(l)` at the subject's last token of the bare prompt (ROME's "target_init").
* `rank_one_update`: dW = (v* - W k*)(C^-1 k*)^T / ((C^-1 k*)^T k*)   (ROME Eq. 2), so that
  (W + dW) k* = v* exactly, with C = E[k k^T] from `wilke_lib.stats`.

This module also holds the request / prompt helpers the other delta-optimising editors (MEMIT,
WilKE) share. No global state: prefixes and statistics come from an explicit `EditCache`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedTokenizerBase

from wilke_lib.arch import ModelAdapter
from wilke_lib.editing import EditCache, EditError, EditorOutput, WeightJournal, as_request
from wilke_lib.hparams import ROMEHParams

log = logging.getLogger(__name__)


# ---- requests and prompts ------------------------------------------------------------------------

def fill(template: str, subject: str) -> str:
    """The prompt with the subject in place of its "{}" (no str.format: other braces stay)."""
    return template.replace("{}", subject, 1)


def normalise_template(prompt: str, subject: str) -> str:
    """A template with exactly one "{}"; a prompt that already contains the subject is accepted.

    EditError if the subject is empty or cannot be found in the prompt.
    """
    if not isinstance(subject, str) or not subject.strip():
        raise EditError(f"empty subject {subject!r}")
    if not isinstance(prompt, str) or not prompt.strip():
        raise EditError(f"empty prompt {prompt!r}")
    count = prompt.count("{}")
    if count > 1:
        raise EditError(f"prompt {prompt!r} has {count} '{{}}' placeholders, expected one for the subject")
    if count == 1:
        return prompt
    if subject in prompt:
        return prompt.replace(subject, "{}", 1)
    raise EditError(f"subject {subject!r} not found in prompt {prompt!r} (no '{{}}' placeholder either)")


def encode(tok: PreTrainedTokenizerBase, text: str) -> list[int]:
    """Prompt ids with the tokenizer's usual special tokens (as generation.encode_prompt)."""
    return list(tok(text)["input_ids"])


def encode_target(tok: PreTrainedTokenizerBase, target: str, which: str = "target") -> list[int]:
    """Ids of `" " + target` (no special tokens); EditError if the target tokenises to nothing."""
    if not isinstance(target, str) or not target.strip():
        raise EditError(f"{which} {target!r} is empty")
    ids = list(tok(" " + target, add_special_tokens=False)["input_ids"])
    if not ids:
        raise EditError(f"{which} {target!r} tokenises to nothing")
    return ids


def subject_last_token_index(tok: PreTrainedTokenizerBase, prompt_template: str, subject: str,
                             prefix: str = "") -> int:
    """Index of the subject's last token in `tok(prefix + prompt)` (ROME's "subject_last" fact token).

    Tokenises the text up to the end of the subject, as ROME does. EditError if the subject is
    empty or not in the prompt.
    """
    template = normalise_template(prompt_template, subject)
    head = prefix + template[:template.index("{}")] + subject
    ids = encode(tok, head)
    if not ids:
        raise EditError(f"subject {subject!r} tokenises to nothing")
    return len(ids) - 1


def fact_token_index(tok: PreTrainedTokenizerBase, template: str, subject: str, prefix: str,
                     fact_token: str) -> int:
    """Position whose representation is edited: the subject's last token, or the prompt's last token."""
    if fact_token == "subject_last":
        return subject_last_token_index(tok, template, subject, prefix)
    if fact_token == "last":
        return len(encode(tok, prefix + fill(template, subject))) - 1
    raise ValueError(f"unknown fact_token {fact_token!r}")


@dataclass
class PreparedRequest:
    """A validated request: template with one "{}", subject, target token ids."""

    template: str
    subject: str
    target_new: str
    target_new_ids: list[int]
    target_true: str | None
    target_true_ids: list[int] | None

    @property
    def prompt(self) -> str:
        return fill(self.template, self.subject)


def prepare_request(tok: PreTrainedTokenizerBase, request: dict) -> PreparedRequest:
    """Validate a CounterFact `requested_rewrite`; EditError naming what is impossible."""
    request = as_request(request)
    if not isinstance(request, dict):
        raise EditError(f"request must be a dict, got {type(request).__name__}")
    for key in ("prompt", "subject", "target_new"):
        if key not in request:
            raise EditError(f"request lacks {key!r}")
    subject = request["subject"]
    template = normalise_template(request["prompt"], subject)

    def target_str(key: str) -> str:
        value = request[key]
        return value["str"] if isinstance(value, dict) else value

    new = target_str("target_new")
    new_ids = encode_target(tok, new, "target_new")
    true = true_ids = None
    if request.get("target_true") is not None:
        true = target_str("target_true")
        true_ids = encode_target(tok, true, "target_true")
    return PreparedRequest(template, subject, new, new_ids, true, true_ids)


# ---- model plumbing ------------------------------------------------------------------------------

def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def pad_id_of(tok: PreTrainedTokenizerBase) -> int:
    for token_id in (tok.pad_token_id, tok.eos_token_id):
        if token_id is not None:
            return int(token_id)
    return 0


def right_pad(sequences: Sequence[Sequence[int]], pad_id: int,
              device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) of right-padded sequences; positions stay 0..len-1 per row."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        ids[row, :len(seq)] = torch.tensor(list(seq), dtype=torch.long)
        mask[row, :len(seq)] = 1
    return ids.to(device), mask.to(device)


@contextmanager
def frozen(model: nn.Module) -> Iterator[None]:
    """No parameter requires grad and the model is in eval mode inside; both restored after."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    training = model.training
    for p, _ in flags:
        p.requires_grad_(False)
    model.eval()
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        model.train(training)


def _hidden(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


def _replace_hidden(output: Any, hidden: torch.Tensor) -> Any:
    return (hidden,) + tuple(output[1:]) if isinstance(output, tuple) else hidden


def add_delta_hook(rows: torch.Tensor, cols: torch.Tensor, delta: torch.Tensor):
    """Forward hook adding `delta` to the module output at (rows[i], cols[i]) (out of place)."""
    def hook(_module, _inputs, output):
        hidden = _hidden(output)
        values = delta.to(hidden.dtype).unsqueeze(0).expand(len(rows), -1)
        return _replace_hidden(output, hidden.index_put((rows, cols), values, accumulate=True))
    return hook


# ---- context prefixes ------------------------------------------------------------------------

@torch.no_grad()
def context_prefixes(model: nn.Module, tok: PreTrainedTokenizerBase, hparams: Any) -> list[str]:
    """The prefixes c_j of ROME Eq. 4: "" (the bare prompt) then, for each [length, count] of
    `hparams.context_lengths`, `count` texts of `length` tokens sampled from the model after its
    BOS (or EOS) token with top-k sampling, each followed by ". " (ROME's "x. {}" templates).

    Sampling uses a CPU torch.Generator seeded with `context_seed`: deterministic for a given
    model. If `hparams.context_prefixes` is given, those are used instead (after the "" prefix).
    """
    if hparams.context_prefixes is not None:
        return [""] + [p for p in hparams.context_prefixes if p != ""]
    start_id = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
    if start_id is None:
        raise ValueError("tokenizer has neither a BOS nor an EOS token to start generation from")
    device = model_device(model)
    generator = torch.Generator(device="cpu").manual_seed(int(hparams.context_seed))
    prefixes = [""]
    with frozen(model):
        for length, count in hparams.context_lengths:
            if count <= 0 or length <= 0:
                continue
            ids = torch.full((count, 1), int(start_id), dtype=torch.long)
            for _ in range(length):
                logits = model(input_ids=ids.to(device), use_cache=False).logits[:, -1].float().cpu()
                if not torch.isfinite(logits).all():
                    raise EditError("NaN/inf logits while generating the context prefixes")
                top = logits.topk(min(hparams.context_top_k, logits.shape[-1]), dim=-1)
                choice = torch.multinomial(torch.softmax(top.values, dim=-1), 1, generator=generator)
                ids = torch.cat([ids, top.indices.gather(1, choice)], dim=1)
            for text in tok.batch_decode(ids[:, 1:], skip_special_tokens=True):
                prefixes.append(text.replace("{", " ").replace("}", " ") + ". ")
    return prefixes


# ---- keys --------------------------------------------------------------------------------------

@torch.no_grad()
def compute_ks(model: nn.Module, tok: PreTrainedTokenizerBase, request: dict, layers: Sequence[int],
               hparams: Any, prefixes: Sequence[str]) -> dict[int, torch.Tensor]:
    """k*^l for every l in `layers` in one forward pass: the mean over the prompts c_j + p of the
    input of `mlp_out(l)` at the fact token (ROME's compute_u before C^-1). float32, (d_mlp,)."""
    prepared = prepare_request(tok, request)
    adapter = ModelAdapter(model)
    device = model_device(model)
    seqs, cols = [], []
    for prefix in prefixes:
        seqs.append(encode(tok, prefix + prepared.prompt))
        cols.append(fact_token_index(tok, prepared.template, prepared.subject, prefix, hparams.fact_token))
    ids, mask = right_pad(seqs, pad_id_of(tok), device)
    rows_t = torch.arange(len(seqs), device=device)
    cols_t = torch.tensor(cols, device=device)
    keys: dict[int, torch.Tensor] = {}

    def make_hook(l: int):
        def hook(_module, inputs):
            keys[l] = inputs[0][rows_t, cols_t].float().mean(0)
        return hook

    handles = [adapter.mlp_out(l).register_forward_pre_hook(make_hook(l)) for l in layers]
    try:
        with frozen(model):
            model(input_ids=ids, attention_mask=mask, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return {l: keys[l] for l in layers}


def compute_k(model: nn.Module, tok: PreTrainedTokenizerBase, request: dict, layer: int, hparams: Any,
              prefixes: Sequence[str]) -> torch.Tensor:
    """k* of one layer (see compute_ks)."""
    return compute_ks(model, tok, request, [layer], hparams, prefixes)[layer]


# ---- the delta optimisation (ROME Eq. 4, WilKE Eq. 9, MEMIT Eq. 16) ----------------------------

@dataclass
class DeltaResult:
    """Optimised delta (float32, d_model), the module's initial output v0 at the bare prompt, and a log."""

    delta: torch.Tensor
    v0: torch.Tensor
    info: dict[str, Any] = field(default_factory=dict)


def rewrite_rows(tok: PreTrainedTokenizerBase, prepared: PreparedRequest, hparams: Any,
                 prefixes: Sequence[str]) -> tuple[list[list[int]], list[int], list[list[int]]]:
    """The rows of the NLL term of ROME Eq. 4: for each prefix c_j, the token ids of c_j + p followed
    by target_new but its last token (teacher forcing), the fact-token column, and the positions
    whose next-token logits score the target tokens."""
    seqs, cols, positions = [], [], []
    for prefix in prefixes:
        prompt_ids = encode(tok, prefix + prepared.prompt)
        seqs.append(prompt_ids + prepared.target_new_ids[:-1])
        cols.append(fact_token_index(tok, prepared.template, prepared.subject, prefix, hparams.fact_token))
        positions.append([len(prompt_ids) - 1 + t for t in range(len(prepared.target_new_ids))])
    return seqs, cols, positions


def optimize_delta(model: nn.Module, tok: PreTrainedTokenizerBase, request: dict, module: nn.Module,
                   hparams: Any, prefixes: Sequence[str]) -> DeltaResult:
    """Optimise a vector delta added to `module`'s output at the fact token of every prompt.

    loss = mean_j NLL(target_new | c_j + p) / |target|  +  kl_factor * KL(P_edit(.|p') || P_orig(.|p'))
           + v_weight_decay * ||delta|| / ||v0||^2   (or ||delta||^2 / ||v0||^2, v_weight_decay_form="squared"),
    Adam with lr v_lr, ||delta|| clamped to clamp_norm_factor * ||v0|| after each step; stops
    when the loss is below v_early_stop_loss, and (as ROME) evaluates the loss once more than it
    steps. Model parameters do not require grad meanwhile. NaN/inf loss -> EditError.
    """
    prepared = prepare_request(tok, request)
    device = model_device(model)
    target = prepared.target_new_ids
    n_tgt = len(target)
    seqs, cols, positions = rewrite_rows(tok, prepared, hparams, prefixes)
    n_rewrite = len(seqs)
    essence = hparams.essence_template
    seqs.append(encode(tok, fill(essence, prepared.subject)))
    cols.append(fact_token_index(tok, essence, prepared.subject, "", hparams.fact_token))
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
            captured["v0"] = _hidden(output)[0, cols[0]].detach().float().clone()

        handle = module.register_forward_hook(capture)
        try:
            with torch.no_grad():
                logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        finally:
            handle.remove()
        nll_init, kl_init = losses(logits)
        kl_init = kl_init.detach()
        v0 = captured["v0"]
        v0_norm = v0.norm()
        if not torch.isfinite(v0_norm) or v0_norm == 0:
            raise EditError(f"module output at the fact token has norm {v0_norm.item()}: cannot scale delta")
        max_norm = hparams.clamp_norm_factor * v0_norm
        delta = torch.zeros(v0.shape[0], dtype=torch.float32, device=device, requires_grad=True)
        optimizer = torch.optim.Adam([delta], lr=hparams.v_lr)
        handle = module.register_forward_hook(add_delta_hook(rows_t, cols_t, delta))
        history: list[float] = []
        try:
            for step in range(hparams.v_num_grad_steps):
                optimizer.zero_grad()
                logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
                nll, kl_log_probs = losses(logits)
                # F.kl_div(input=log P_orig, target=log P_edit) = KL(P_edit || P_orig), as ROME's code.
                kl = hparams.kl_factor * F.kl_div(kl_init, kl_log_probs, log_target=True, reduction="batchmean")
                if hparams.v_weight_decay_form == "squared":
                    decay = hparams.v_weight_decay * delta.norm() ** 2 / v0_norm ** 2
                else:
                    decay = hparams.v_weight_decay * delta.norm() / v0_norm ** 2
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
        finally:
            handle.remove()
    delta = delta.detach()
    if not torch.isfinite(delta).all():
        raise EditError("delta optimisation produced non-finite values")
    info = {"nll_init": nll_init.item(), "nll": nll.item(), "kl": kl.item(), "weight_decay": decay.item(),
            "loss": loss.item(), "steps": len(history), "loss_history": history,
            "target_prob": float(torch.exp(-nll.detach())), "v0_norm": float(v0_norm), "delta_norm": float(delta.norm()),
            "n_prompts": n_rewrite}
    return DeltaResult(delta=delta, v0=v0, info=info)


def compute_v(model: nn.Module, tok: PreTrainedTokenizerBase, request: dict, layer: int, k_star: torch.Tensor,
              hparams: Any, prefixes: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """(v*, delta, info) at layer `layer`: delta optimised at the output of `mlp_out(layer)` (ROME
    Eq. 4 / WilKE Eq. 9) and v* = W_proj k* + delta, so that delta = v* - W_proj k* (WilKE Eq. 9)."""
    adapter = ModelAdapter(model)
    result = optimize_delta(model, tok, request, adapter.mlp_out(layer), hparams, prefixes)
    weight = adapter.out_weight(layer).float()
    v_star = weight @ k_star.to(weight.device, torch.float32) + result.delta
    return v_star, result.delta, result.info


# ---- the rank-one update (ROME Eq. 2) ----------------------------------------------------------

def rank_one_update(W: torch.Tensor, C_inv: torch.Tensor, k_star: torch.Tensor, v_star: torch.Tensor) -> torch.Tensor:
    """dW = (v* - W k*)(C^-1 k*)^T / ((C^-1 k*)^T k*)   (ROME Eq. 2), in C_inv's dtype.

    W is (d_model, d_mlp); then (W + dW) k* = v*. EditError if (C^-1 k*)^T k* is not a positive
    finite number (singular system).
    """
    dtype, device = C_inv.dtype, C_inv.device
    W = W.to(device=device, dtype=dtype)
    k = k_star.to(device=device, dtype=dtype)
    v = v_star.to(device=device, dtype=dtype)
    u = C_inv @ k
    denom = u @ k
    if not torch.isfinite(denom) or denom <= 0:
        raise EditError(f"singular system: (C^-1 k*)^T k* = {denom.item():.3g}")
    dW = torch.outer(v - W @ k, u) / denom
    if not torch.isfinite(dW).all():
        raise EditError("singular system: rank-one update is not finite")
    return dW


@dataclass
class RomeOutcome:
    """Everything computed for one ROME edit at one layer."""

    layer: int
    k_star: torch.Tensor
    v_star: torch.Tensor
    delta: torch.Tensor
    dW: torch.Tensor
    info: dict[str, Any]


def compute_rome_update(model: nn.Module, tok: PreTrainedTokenizerBase, request: dict, layer: int,
                        hparams: Any, cache: EditCache) -> RomeOutcome:
    """k*, v*, delta and dW of ROME at `layer`, without changing any weight."""
    prepare_request(tok, request)
    prefixes = cache.get_prefixes(model, tok, hparams)
    k_star = compute_k(model, tok, request, layer, hparams, prefixes)
    v_star, delta, info = compute_v(model, tok, request, layer, k_star, hparams, prefixes)
    c_inv = cache.get_mom2_inv(model, tok, layer, hparams)
    dW = rank_one_update(ModelAdapter(model).out_weight(layer), c_inv, k_star, v_star)
    return RomeOutcome(layer, k_star, v_star, delta, dW, info)


def apply_rank_one(model: nn.Module, outcome: RomeOutcome, journal: WeightJournal) -> None:
    """Add outcome.dW to W_proj and record how well (W + dW) k* = v* holds in outcome.info."""
    adapter = ModelAdapter(model)
    journal.add(outcome.layer, outcome.dW)
    with torch.no_grad():
        new_w = adapter.out_weight(outcome.layer).double()
        v = outcome.v_star.double().to(new_w.device)
        residual = (new_w @ outcome.k_star.double().to(new_w.device) - v).norm() / v.norm()
    outcome.info["rank_one_residual"] = float(residual)


def apply_rome(model: nn.Module, tok: PreTrainedTokenizerBase, request: dict, hparams: ROMEHParams, *,
               cache: EditCache | None = None, layer: int | None = None,
               journal: WeightJournal | None = None) -> RomeOutcome:
    """ROME edit at `layer` (default hparams.layer), applied in place. Prefer `editing.edit`,
    which also restores the weights on failure and records the deltas."""
    cache = cache if cache is not None else EditCache.for_model(model)
    layer = hparams.layer if layer is None else layer
    if layer is None:
        raise ValueError("no layer given for ROME")
    outcome = compute_rome_update(model, tok, request, layer, hparams, cache)
    apply_rank_one(model, outcome, journal if journal is not None else WeightJournal(ModelAdapter(model)))
    return outcome


def rome_editor(model: nn.Module, tok: PreTrainedTokenizerBase, request: dict, hparams: ROMEHParams, *,
                journal: WeightJournal, layers: list[int] | None, cache: EditCache) -> EditorOutput:
    """`editing.EDITORS["rome"]`."""
    if layers is not None and len(layers) != 1:
        raise ValueError(f"ROME edits one layer; got layers={layers}")
    layer = layers[0] if layers is not None else hparams.layer
    outcome = apply_rome(model, tok, request, hparams, cache=cache, layer=layer, journal=journal)
    info = dict(outcome.info)
    info.update(k_star_norm=float(outcome.k_star.norm()), v_star_norm=float(outcome.v_star.norm()),
                dW_norm=float(outcome.dW.norm()))
    return EditorOutput(layers=[layer], info=info)
