"""KE, KnowledgeEditor (De Cao et al. 2021, "Editing Factual Knowledge in Language Models", arXiv
2104.08164, Sec. 3-4): a hypernetwork, conditioned on the edit request, that turns the fine-tuning
gradient into the weight update.

The request (x, y, a) = (the prompt, the model's answer, the new answer) is written as the text
"x >> y || a" (the released code's condition) and read by a bidirectional LSTM over the model's own
token embeddings; its last states give the condition c = tanh(W_c [h_fwd; h_bwd] + b_c) (Sec. 3.2).
For each edited W_l (d_model, d_mlp) an FFNN of c gives alpha, gamma, beta, delta, eta and

    alpha^ = softmax(alpha) gamma^T,   beta^ = softmax(beta) delta^T            (rank-one factors)
    dW_l   = max_scale * sigmoid(eta) * (alpha^ (elementwise) grad_W L(W; x, a) + beta^)

(Sec. 3.2's update; grad_W L is the gradient of the NLL of a after x, `hypernet_core.gradient_factors`).
Training (`editors.hypernet`, Sec. 3.1 / 4): the NLL of a after x and its paraphrases with the updated
weights, subject to KL(p_theta(.|x') || p_theta'(.|x')) <= kl_margin on unrelated prompts x', in the
Lagrangian form of the released code: L_e + lambda (KL - margin), lambda >= 0 raised by gradient ascent
(`multiplier_lr`) while the constraint is violated, lowered (down to 0) while it holds.

Differences from the paper: the edited matrices are the MLP output projections of `layers` (as MEND's
KE baseline for GPT models edits the MLPs of the last blocks; the paper edits every matrix of BERT /
BART); the LSTM reads the model's embeddings, frozen (the released code trains a copy, which for
GPT-J would be 200 M parameters in the editor's file); the FFNNs are plain linear layers (the code uses
weight normalisation); the margin is fixed (the code anneals it).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from wilke_lib.arch import ModelAdapter, model_device
from wilke_lib.editors.cache import EditCache
from wilke_lib.editors.common import EditorOutput, EditorState, WeightJournal
from wilke_lib.editors.hypernet_core import (edit_with_network, forward_logits, gradient_factors, lm_batch,
                                             load_network, weight_gradient)
from wilke_lib.hparams import KEHParams
from wilke_lib.tokens import Request, encode_prompt, pad_id_of, right_pad


class KENet(nn.Module):
    """KE's hypernetwork for the W_proj of `layers` (module docstring)."""

    def __init__(self, layers: Sequence[int], d_model: int, d_mlp: int, d_embed: int, lstm_hidden: int,
                 condition_dim: int, hidden_dim: int, max_scale: float) -> None:
        super().__init__()
        self.layers, self.d_model, self.d_mlp = [int(l) for l in layers], int(d_model), int(d_mlp)
        self.sizes = {"d_embed": int(d_embed), "lstm_hidden": int(lstm_hidden), "condition_dim": int(condition_dim),
                      "hidden_dim": int(hidden_dim), "max_scale": float(max_scale)}
        self.max_scale = float(max_scale)
        self.lstm = nn.LSTM(d_embed, lstm_hidden, batch_first=True, bidirectional=True)
        self.to_condition = nn.Linear(2 * lstm_hidden, condition_dim)
        self.heads = nn.ModuleList([nn.Sequential(nn.Linear(condition_dim, hidden_dim), nn.Tanh(),
                                                  nn.Linear(hidden_dim, 2 * (self.d_model + self.d_mlp) + 1))
                                    for _ in self.layers])

    @classmethod
    def for_model(cls, model: nn.Module, hparams: KEHParams) -> "KENet":
        adapter = ModelAdapter(model)
        return cls(hparams.layers, adapter.d_model, adapter.d_mlp, adapter.embed.weight.shape[1], hparams.lstm_hidden,
                   hparams.condition_dim, hparams.hidden_dim, hparams.max_scale)

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "KENet":
        return cls(config["layers"], config["d_model"], config["d_mlp"], config["d_embed"], config["lstm_hidden"],
                   config["condition_dim"], config["hidden_dim"], config["max_scale"])

    def config(self) -> dict[str, Any]:
        return {"layers": self.layers, "d_model": self.d_model, "d_mlp": self.d_mlp, **self.sizes}

    def condition(self, embeddings: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """c = tanh(W_c [h_fwd; h_bwd] + b_c) from the BiLSTM's last states, (rows, condition_dim)."""
        packed = nn.utils.rnn.pack_padded_sequence(embeddings, lengths.cpu(), batch_first=True, enforce_sorted=False)
        _, (h, _) = self.lstm(packed)
        return torch.tanh(self.to_condition(torch.cat([h[0], h[1]], dim=-1)))

    def deltas_from(self, condition: torch.Tensor, grads: dict[int, torch.Tensor]) -> dict[int, torch.Tensor]:
        """{layer: dW = max_scale sigmoid(eta) (alpha^ * grad W + beta^)}, (rows, d_model, d_mlp)."""
        out = {}
        for head, layer in zip(self.heads, self.layers):
            alpha, gamma, beta, delta, eta = head(condition).split(
                [self.d_model, self.d_mlp, self.d_model, self.d_mlp, 1], dim=-1)
            alpha_hat = alpha.softmax(-1)[:, :, None] * gamma[:, None, :]
            beta_hat = beta.softmax(-1)[:, :, None] * delta[:, None, :]
            out[layer] = self.max_scale * torch.sigmoid(eta)[:, :, None] * (alpha_hat * grads[layer] + beta_hat)
        return out

    def request_deltas(self, model: nn.Module, tok: PreTrainedTokenizerBase, requests: Sequence[Request]
                       ) -> dict[int, torch.Tensor]:
        """The weight changes of each request (a row each): the gradient of NLL(target_new | prompt),
        transformed under the condition "prompt >> answer || target_new"."""
        device = model_device(model)
        batch = lm_batch(tok, [r.prompt for r in requests], [r.target_new_ids for r in requests], device)
        factors = gradient_factors(model, batch, self.layers)
        grads = {l: weight_gradient(u, delta) for l, (u, delta) in factors.items()}
        texts = [f"{r.prompt} >> {answer} || {r.target_new}" for r, answer in zip(requests, answers(model, tok, requests))]
        ids, mask = right_pad([encode_prompt(tok, t) for t in texts], pad_id_of(tok), device)
        with torch.no_grad():
            embeddings = ModelAdapter(model).embed(ids).float()
        return self.deltas_from(self.condition(embeddings, mask.sum(-1)), grads)


def answers(model: nn.Module, tok: PreTrainedTokenizerBase, requests: Sequence[Request]) -> list[str]:
    """y of each request: its target_true, else the model's greedy next token after the prompt."""
    missing = [r for r in requests if r.target_true is None]
    greedy: list[str] = []
    if missing:
        batch = lm_batch(tok, [r.prompt for r in missing], [[] for _ in missing], model_device(model))
        with torch.no_grad():
            logits = forward_logits(model, batch)
        last = logits[torch.arange(len(missing)), batch.mask.sum(-1) - 1].argmax(-1)
        greedy = [tok.decode([int(t)]).strip() for t in last]
    found = iter(greedy)
    return [r.target_true if r.target_true is not None else next(found) for r in requests]


def load_ke(model: nn.Module, hparams: KEHParams) -> KENet:
    """The trained network of `hparams.weights` (`hypernet_core.load_network`: cached, checked)."""
    settings = {"layers": hparams.layers, "lstm_hidden": hparams.lstm_hidden, "condition_dim": hparams.condition_dim,
                "hidden_dim": hparams.hidden_dim, "max_scale": float(hparams.max_scale)}
    return load_network(model, "ke", hparams.weights, settings, KENet.from_config)  # type: ignore[return-value]


def ke_editor(model: nn.Module, tok: PreTrainedTokenizerBase, request: dict, hparams: KEHParams, *,
              journal: WeightJournal, layers: list[int] | None, cache: EditCache | None = None,
              state: EditorState | None = None) -> EditorOutput:
    """The "ke" editor of the registry: one pass of the trained hypernetwork, W_proj of its layers changed."""
    return edit_with_network(load_ke(model, hparams), model, tok, request, journal, layers, "KE")

