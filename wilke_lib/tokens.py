"""The request and token layer: one place that fills prompts, encodes targets and pads batches.

A request is CounterFact's `requested_rewrite` {prompt with "{}" for the subject, subject,
relation_id, target_new {str, id}, target_true {str, id}}; a whole record is accepted too. Editors,
the evaluation and the analyses all go through these functions, so that what an editor optimises is
exactly what the evaluation checks:

* a prompt is filled by replacing its one "{}" (never `str.format`: other braces stay);
* a prompt is encoded with the tokenizer's usual special tokens (LLaMA's BOS);
* a target is encoded as `" " + target` without special tokens (as ROME does), with the lone "▁"
  that SentencePiece tokenizers of the LLaMA-2 kind prepend to an explicit space dropped;
* prompt and target ids are concatenated. The authors' evaluation tokenises "prompt target" jointly;
  `joint_encoding_agrees` says whether the two coincide for a tokenizer (they do for byte-level BPE
  such as GPT-2's and the organisms', tested over every record of the world).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase

from wilke_lib.errors import EditError
from wilke_lib.hparams import FACT_TOKENS


def fill(template: str, subject: str) -> str:
    """The prompt with the subject in place of its "{}" (no str.format: other braces stay)."""
    return template.replace("{}", subject, 1)


def as_request(request: dict) -> dict:
    """Accept a CounterFact record as well as its `requested_rewrite`."""
    if isinstance(request, dict) and "requested_rewrite" in request:
        return request["requested_rewrite"]
    return request


def swapped(request: dict) -> dict:
    """The rollback request: target_new and target_true exchanged."""
    request = as_request(request)
    return {**request, "target_new": request["target_true"], "target_true": request["target_new"]}


def rewrite_prompt(record: dict) -> str:
    """The rewrite prompt of a record (or request) with the subject filled in."""
    request = as_request(record)
    return fill(request["prompt"], request["subject"])


def target_str(value: dict | str) -> str:
    """The string of a CounterFact target ({"str": ..., "id": ...}) or a plain string."""
    return value["str"] if isinstance(value, dict) else value


def normalise_template(prompt: str, subject: str) -> str:
    """A template with exactly one "{}"; a prompt that already contains the subject is accepted.

    EditError if the subject or the prompt is empty, or the subject cannot be found in the prompt.
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


def encode_prompt(tok: PreTrainedTokenizerBase, text: str) -> list[int]:
    """Token ids of a prompt, with the tokenizer's usual special tokens (e.g. LLaMA's BOS)."""
    return list(tok(text)["input_ids"])


def encode_target(tok: PreTrainedTokenizerBase, target: str, which: str = "target") -> list[int]:
    """Ids of `" " + target` without special tokens; EditError if the target is empty.

    SentencePiece tokenizers of the LLaMA-2 kind prepend their own "▁" and so turn the explicit space
    into a lone "▁" token that a model never produces after a prompt; it is dropped.
    """
    if not isinstance(target, str) or not target.strip():
        raise EditError(f"{which} {target!r} is empty")
    ids = list(tok(" " + target, add_special_tokens=False)["input_ids"])
    if not ids:
        raise EditError(f"{which} {target!r} tokenises to nothing")
    if len(ids) > 1:
        first, second = tok.convert_ids_to_tokens(ids[:2])
        if first == "\u2581" and second.startswith("\u2581"):
            ids = ids[1:]
    return ids


def joint_encoding_agrees(tok: PreTrainedTokenizerBase, prompt: str, target: str) -> bool:
    """Whether encoding "prompt target" in one go (the authors' evaluation) gives the prompt's ids
    followed by the target's ids (this library's way)."""
    return encode_prompt(tok, prompt + " " + target) == encode_prompt(tok, prompt) + encode_target(tok, target)


def subject_last_token_index(tok: PreTrainedTokenizerBase, template: str, subject: str, prefix: str = "") -> int:
    """Index of the subject's last token in the ids of `prefix + prompt` (ROME's "subject_last").

    Tokenises the text up to the end of the subject, as ROME does.
    """
    template = normalise_template(template, subject)
    ids = encode_prompt(tok, prefix + template[:template.index("{}")] + subject)
    if not ids:
        raise EditError(f"subject {subject!r} tokenises to nothing")
    return len(ids) - 1


def fact_token_index(tok: PreTrainedTokenizerBase, template: str, subject: str, prefix: str, fact_token: str) -> int:
    """Position whose representation is edited: the subject's last token, or the prompt's last token."""
    if fact_token == "subject_last":
        return subject_last_token_index(tok, template, subject, prefix)
    if fact_token == "last":
        return len(encode_prompt(tok, prefix + fill(template, subject))) - 1
    raise ValueError(f"unknown fact_token {fact_token!r}; expected one of {FACT_TOKENS}")


@dataclass
class Request:
    """A validated request: the template with one "{}", the subject, and the targets with their ids."""

    template: str
    subject: str
    target_new: str
    target_new_ids: list[int]
    target_true: str | None
    target_true_ids: list[int] | None

    @property
    def prompt(self) -> str:
        return fill(self.template, self.subject)


def prepare_request(tok: PreTrainedTokenizerBase, request: dict) -> Request:
    """Validate a CounterFact `requested_rewrite` (or record); EditError naming what is impossible."""
    request = as_request(request)
    if not isinstance(request, dict):
        raise EditError(f"request must be a dict, got {type(request).__name__}")
    for key in ("prompt", "subject", "target_new"):
        if key not in request:
            raise EditError(f"request lacks {key!r}")
    subject = request["subject"]
    template = normalise_template(request["prompt"], subject)
    new = target_str(request["target_new"])
    new_ids = encode_target(tok, new, "target_new")
    true = true_ids = None
    if request.get("target_true") is not None:
        true = target_str(request["target_true"])
        true_ids = encode_target(tok, true, "target_true")
    return Request(template, subject, new, new_ids, true, true_ids)


def pad_id_of(tok: PreTrainedTokenizerBase) -> int:
    """Id used for padding; its value is irrelevant because pads are masked out."""
    for token_id in (tok.pad_token_id, tok.eos_token_id):
        if token_id is not None:
            return int(token_id)
    return 0


def right_pad(sequences: Sequence[Sequence[int]], pad_id: int, device: torch.device | str = "cpu"
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) of right-padded sequences; positions stay 0..len-1 per row."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        ids[row, :len(seq)] = torch.tensor(list(seq), dtype=torch.long)
        mask[row, :len(seq)] = 1
    return ids.to(device), mask.to(device)


def left_pad(sequences: Sequence[Sequence[int]], pad_id: int, device: torch.device | str = "cpu"
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Left-padded (input_ids, attention_mask, position_ids), each (batch, max_len).

    Position ids are cumsum(mask) - 1, clamped at 0 on the pads, so each sequence's first real token
    sits at position 0 whatever its padding (HF models otherwise count pads as positions, which
    shifts rotary and learned position embeddings).
    """
    max_len = max(len(seq) for seq in sequences)
    input_ids = torch.full((len(sequences), max_len), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), max_len), dtype=torch.long)
    for row, seq in enumerate(sequences):
        if len(seq) == 0:
            raise ValueError("cannot pad an empty sequence")
        input_ids[row, max_len - len(seq):] = torch.tensor(list(seq), dtype=torch.long)
        attention_mask[row, max_len - len(seq):] = 1
    position_ids = (attention_mask.cumsum(dim=-1) - 1).clamp(min=0)
    return input_ids.to(device), attention_mask.to(device), position_ids.to(device)
