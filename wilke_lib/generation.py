"""Batched greedy decoding and target scoring for causal LMs, with explicit left padding.

Prompts and targets are encoded by the token layer (`wilke_lib.tokens`), the same rules the editors
optimise with: prompt ids followed by the ids of `" " + target`.

Left padding needs two things to be right: an attention mask that hides the
pad tokens, and position ids that start at 0 on the first real token (HF
models otherwise count pads as positions, which shifts rotary and learned
position embeddings). All forward passes here pass both.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from wilke_lib.arch import model_device
from wilke_lib.tokens import encode_prompt, encode_target, left_pad, pad_id_of


def _forward_logits(model: nn.Module, sequences: Sequence[Sequence[int]], pad_id: int) -> torch.Tensor:
    """Logits (batch, max_len, vocab) of a left-padded batch."""
    input_ids, attention_mask, position_ids = left_pad(sequences, pad_id, model_device(model))
    output = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                   use_cache=False)
    return output.logits


def _length_sorted_batches(lengths: Sequence[int], batch_size: int) -> Iterator[list[int]]:
    """Indices grouped into batches of similar length, so little compute goes to padding."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    for start in range(0, len(order), batch_size):
        yield order[start:start + batch_size]


def _check_pairs(prompts: Sequence[str], targets: Sequence[str]) -> None:
    if len(prompts) != len(targets):
        raise ValueError(f"got {len(prompts)} prompts but {len(targets)} targets")


def _target_logits(model: nn.Module, tok: PreTrainedTokenizerBase, prompts: Sequence[str],
                   targets: Sequence[str], batch_size: int) -> Iterator[tuple[int, torch.Tensor, list[int]]]:
    """Teacher-forced pass over prompt + target; yields (index, logits predicting each target token, target ids).

    The sequences are right-aligned by the left padding, so the target of every
    row occupies its last len(target) positions, and the logits predicting them
    sit one position earlier.
    """
    _check_pairs(prompts, targets)
    pairs = [(encode_prompt(tok, p), encode_target(tok, t)) for p, t in zip(prompts, targets)]
    # The last target token is never an input: it is only predicted.
    sequences = [prompt_ids + target_ids[:-1] for prompt_ids, target_ids in pairs]
    pad_id = pad_id_of(tok)
    for batch in _length_sorted_batches([len(s) for s in sequences], batch_size):
        logits = _forward_logits(model, [sequences[i] for i in batch], pad_id)
        for row, index in enumerate(batch):
            target_ids = pairs[index][1]
            yield index, logits[row, logits.shape[1] - len(target_ids):], target_ids


@torch.no_grad()
def greedy_matches(model: nn.Module, tok: PreTrainedTokenizerBase, prompts: Sequence[str],
                   targets: Sequence[str], batch_size: int = 64) -> list[bool]:
    """For each prompt, whether greedy decoding reproduces every token of `" " + target`.

    Computed with one teacher-forced forward pass: greedy decoding emits the
    target iff, at each target position, the argmax given the prompt and the
    preceding target tokens is that target token (by induction on the position).
    """
    matches = [False] * len(prompts)
    for index, logits, target_ids in _target_logits(model, tok, prompts, targets, batch_size):
        predicted = logits.argmax(dim=-1).tolist()
        matches[index] = predicted == target_ids
    return matches


@torch.no_grad()
def target_logprob(model: nn.Module, tok: PreTrainedTokenizerBase, prompts: Sequence[str],
                   targets: Sequence[str], batch_size: int = 64, reduce: str = "sum") -> torch.Tensor:
    """Log-probability of `" " + target` after each prompt, as a float32 CPU tensor (n,).

    reduce="sum" gives log P(target | prompt); reduce="mean" the mean log-prob per target token.
    """
    if reduce not in ("sum", "mean"):
        raise ValueError(f"reduce must be 'sum' or 'mean', got {reduce!r}")
    scores = torch.zeros(len(prompts), dtype=torch.float32)
    for index, logits, target_ids in _target_logits(model, tok, prompts, targets, batch_size):
        log_probs = torch.log_softmax(logits.float(), dim=-1)
        token_log_probs = log_probs[torch.arange(len(target_ids)), torch.tensor(target_ids, device=log_probs.device)]
        score = token_log_probs.sum() if reduce == "sum" else token_log_probs.mean()
        scores[index] = score.cpu()
    return scores


@torch.no_grad()
def predict_greedy_ids(model: nn.Module, tok: PreTrainedTokenizerBase, prompts: Sequence[str],
                       max_new_tokens: int = 5, batch_size: int = 64) -> list[list[int]]:
    """Greedy continuation ids of each prompt, cut after the first EOS (which is kept out).

    Re-runs the full sequence each step instead of using a KV cache: prompts
    are short and this keeps one code path, the same as greedy_matches, for
    every architecture.
    """
    pad_id, eos_id = pad_id_of(tok), tok.eos_token_id
    encoded = [encode_prompt(tok, p) for p in prompts]
    continuations: list[list[int]] = [[] for _ in prompts]
    for batch in _length_sorted_batches([len(e) for e in encoded], batch_size):
        sequences = [list(encoded[i]) for i in batch]
        finished = [False] * len(batch)
        for _ in range(max_new_tokens):
            next_ids = _forward_logits(model, sequences, pad_id)[:, -1].argmax(dim=-1).tolist()
            for row, token_id in enumerate(next_ids):
                sequences[row].append(token_id)
                if finished[row]:
                    continue
                if token_id == eos_id:
                    finished[row] = True
                else:
                    continuations[batch[row]].append(token_id)
            if all(finished):
                break
    return continuations


def predict_greedy(model: nn.Module, tok: PreTrainedTokenizerBase, prompts: Sequence[str],
                   max_new_tokens: int = 5, batch_size: int = 64) -> list[str]:
    """Greedy continuation text of each prompt (at most max_new_tokens tokens, stops at EOS)."""
    ids = predict_greedy_ids(model, tok, prompts, max_new_tokens, batch_size)
    return [tok.decode(continuation) for continuation in ids]
