"""MEND: Model Editor Networks with gradient Decomposition (Mitchell et al. 2022, "Fast Model Editing at
Scale", arXiv 2110.11309, Sec. 3).

The gradient of the edit loss (the NLL of target_new after the rewrite prompt) with respect to an MLP
output projection W_l is a sum over tokens of rank-one terms, grad W_l = sum_t delta_t u_t^T (Sec. 3.1;
u_t the layer's input, delta_t the gradient with respect to its output: `hypernet_core.gradient_factors`).
MEND edits with a transformed gradient: each token's z_t = (u_t, delta_t), normalised to zero mean and
unit variance, goes through the editor network g_l,

    h   = z + relu(s1_l * (U1 V1 z + b1) + o1_l)          (Eq. 3)
    g_l = h + relu(s2_l * (U2 V2 h + b2) + o2_l)          (Eq. 4)

low rank (U (dim, rank), V (rank, dim)), with a residual connection, shared by the edited layers (they
have one shape) and specialised by the per-layer scale s_l and offset o_l; g_l(z_t) splits into
(u~_t, delta~_t) and

    W~_l = W_l - alpha_l sum_t delta~_t u~_t^T                (Sec. 3.1, the pseudo-gradient step)

with a learned step alpha_l per layer. U starts at zero, so g starts as the identity. Training
(`editors.hypernet`, Sec. 3.2): L = c_edit L_e + L_loc, L_e the NLL of the new target after the edited
weights on the rewrite prompt and its paraphrases, L_loc = KL(p_theta(.|x_loc) || p_theta~(.|x_loc)) on
unrelated prompts; only the editor network and the alpha_l are trained.

Differences from the released code (eric-mitchell/mend), all small: only the MLP output projections are
edited (the paper also edits the input projections W_fc: this library's editors change W_proj only,
through the `WeightJournal`); the normalisation statistics are per layer and fixed from a pass over the
training requests before training (the code pools them per weight shape and updates them online during
training); V is drawn from N(0, 1/dim) (the code: N(0, 1)).
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
from wilke_lib.editors.hypernet_core import (edit_with_network, gradient_factors, lm_batch, load_network,
                                             normalise, token_mask, weight_gradient)
from wilke_lib.hparams import MENDHParams
from wilke_lib.tokens import Request


class LowRankResidual(nn.Module):
    """One layer of MEND's editor MLP: z + relu(s_l * (U V z + b) + o_l) (Eq. 3; Eq. 4 is the same map on h)."""

    def __init__(self, dim: int, rank: int, n_layers: int) -> None:
        super().__init__()
        rank = min(rank, dim)
        self.U = nn.Parameter(torch.zeros(dim, rank))
        self.V = nn.Parameter(torch.randn(rank, dim) / dim ** 0.5)
        self.b = nn.Parameter(torch.zeros(dim))
        self.scale = nn.Parameter(torch.ones(n_layers, dim))
        self.offset = nn.Parameter(torch.zeros(n_layers, dim))

    def forward(self, z: torch.Tensor, i: int) -> torch.Tensor:
        pre = (z @ self.V.T) @ self.U.T + self.b
        return z + (self.scale[i] * pre + self.offset[i]).clamp(min=0)  # clamp: a gradient at 0, as the code


class MENDNet(nn.Module):
    """The editor network of MEND for the W_proj of `layers` (module docstring)."""

    def __init__(self, layers: Sequence[int], d_model: int, d_mlp: int, rank: int, edit_lr: float = 1e-3) -> None:
        super().__init__()
        self.layers, self.d_model, self.d_mlp, self.rank = [int(l) for l in layers], int(d_model), int(d_mlp), int(rank)
        n, dim = len(self.layers), self.d_mlp + self.d_model
        self.register_buffer("u_mean", torch.zeros(n, self.d_mlp))
        self.register_buffer("u_std", torch.ones(n, self.d_mlp))
        self.register_buffer("delta_mean", torch.zeros(n, self.d_model))
        self.register_buffer("delta_std", torch.ones(n, self.d_model))
        self.g1 = LowRankResidual(dim, self.rank, n)
        self.g2 = LowRankResidual(dim, self.rank, n)
        self.edit_lrs = nn.Parameter(torch.full((n,), float(edit_lr)))  # alpha_l

    @classmethod
    def for_model(cls, model: nn.Module, hparams: MENDHParams) -> "MENDNet":
        adapter = ModelAdapter(model)
        return cls(hparams.layers, adapter.d_model, adapter.d_mlp, hparams.rank, hparams.edit_lr)

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "MENDNet":
        return cls(config["layers"], config["d_model"], config["d_mlp"], config["rank"])

    def config(self) -> dict[str, Any]:
        return {"layers": self.layers, "d_model": self.d_model, "d_mlp": self.d_mlp, "rank": self.rank}

    @torch.no_grad()
    def fit_normalisation(self, factors: Sequence[dict[int, tuple[torch.Tensor, torch.Tensor]]]) -> None:
        """Mean and standard deviation of u and delta over the tokens that carry gradient, per layer."""
        for i, layer in enumerate(self.layers):
            keep = [token_mask(*f[layer])[..., 0].bool() for f in factors]
            u = torch.cat([f[layer][0][k] for f, k in zip(factors, keep)])
            delta = torch.cat([f[layer][1][k] for f, k in zip(factors, keep)])
            if len(u) < 2:
                raise ValueError("MEND's normalisation needs the gradients of at least two tokens")
            self.u_mean[i], self.u_std[i] = u.mean(0), u.std(0)
            self.delta_mean[i], self.delta_std[i] = delta.mean(0), delta.std(0)

    def transform(self, u: torch.Tensor, delta: torch.Tensor, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(u~, delta~) = g_l(normalised (u, delta)) for the i-th edited layer (Eq. 3-4)."""
        z = torch.cat([normalise(u, self.u_mean[i], self.u_std[i]),
                       normalise(delta, self.delta_mean[i], self.delta_std[i])], dim=-1)
        out = self.g2(self.g1(z, i), i)
        return out[..., :self.d_mlp], out[..., self.d_mlp:]

    def deltas(self, factors: dict[int, tuple[torch.Tensor, torch.Tensor]]) -> dict[int, torch.Tensor]:
        """{layer: dW = -alpha_l sum_t delta~_t u~_t^T}, (rows, d_model, d_mlp), from `gradient_factors`."""
        out = {}
        for i, layer in enumerate(self.layers):
            u, delta = factors[layer]
            keep = token_mask(u, delta)
            u_t, delta_t = self.transform(u, delta, i)
            out[layer] = -self.edit_lrs[i] * weight_gradient(u_t * keep, delta_t * keep)
        return out

    def request_deltas(self, model: nn.Module, tok: PreTrainedTokenizerBase, requests: Sequence[Request]
                       ) -> dict[int, torch.Tensor]:
        """The weight changes of each request (a row each), from the gradient of NLL(target_new | prompt)."""
        batch = lm_batch(tok, [r.prompt for r in requests], [r.target_new_ids for r in requests], model_device(model))
        return self.deltas(gradient_factors(model, batch, self.layers))


def load_mend(model: nn.Module, hparams: MENDHParams) -> MENDNet:
    """The trained network of `hparams.weights` (`hypernet_core.load_network`: cached, checked)."""
    return load_network(model, "mend", hparams.weights, {"layers": hparams.layers, "rank": hparams.rank},
                        MENDNet.from_config)  # type: ignore[return-value]


def mend_editor(model: nn.Module, tok: PreTrainedTokenizerBase, request: dict, hparams: MENDHParams, *,
                journal: WeightJournal, layers: list[int] | None, cache: EditCache | None = None,
                state: EditorState | None = None) -> EditorOutput:
    """The "mend" editor of the registry: one pass of the trained editor network, W_proj of its layers changed."""
    return edit_with_network(load_mend(model, hparams), model, tok, request, journal, layers, "MEND")
