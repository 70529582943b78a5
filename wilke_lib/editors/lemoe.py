"""LEMoE: a mixture-of-experts adaptor for lifelong editing (Wang & Li 2024, "LEMoE: Advanced Mixture of
Experts Adaptor for Lifelong Model Editing of Large Language Models", arXiv 2406.20030, Sec. 3-4).

A bypass beside the MLP of one layer l: for the MLP input x_t of token t,

    h_t = MLP(x_t) + lambda * g_t * f_{i_t}(x_t),     f_i(x) = W2_i act(W1_i x)

with one new expert f_i per batch of edits ("module inserting": the experts of earlier batches are
frozen, so a new batch cannot overwrite them) and KV-anchor routing: each expert keeps a frozen key
k_i, the anchor of its batch; a token's query q_t is the mean of the input embeddings of the tokens
up to t; the token goes to the expert whose key is most cosine-similar (top-1, the newest on a tie)
and g_t = 1 when that similarity reaches `route_threshold`, else 0 (no expert: the base model).
Training a new expert routes its batch's prompts through it exactly as inference will (the paper's
point: routing consistent between training and inference). The expert is trained with Adam on the
negative log-likelihood of target_new after each prompt of its batch; W2 starts at zero, so an
untrained expert changes nothing.

Where the paper is silent or its code is not public, the choices made here (each a setting):
* the query is the *causal* running mean of the input token embeddings (the paper: a projection of
  the mean-pooled input embedding); causal so that the answer at a position depends on the tokens
  before it only, and the key of an edit equals the query at its prompt's last token; the projection
  is the identity (no trained projection exists in an editing setting);
* the key of a batch is the mean of its prompts' queries at their last token;
* the threshold on the cosine similarity (`route_threshold`) decides locality; experts are FFNs of
  `expert_dim` hidden units with GELU;
* the clustering-based ordering of the edit batches (their Sec. 4.3) is `plan_batches`: k-means on
  the edit prompts' queries, then batches cut from the clusters in turn.

The experts and keys live in the `EditorState` ("lemoe/expert<i>/w1", ".../w2", ".../key"), saved and
restored with the weights by the lifelong runner; the base weights never change, so the experts are
hashed into the model's identity (`ExpertBypass.identity_tensors`, `models.model_identity`).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedTokenizerBase

from wilke_lib.arch import ModelAdapter, frozen, model_device
from wilke_lib.editors.cache import EditCache
from wilke_lib.editors.common import EditorOutput, EditorState, WeightJournal
from wilke_lib.errors import EditError
from wilke_lib.hparams import LEMoEHParams
from wilke_lib.tokens import encode_prompt, pad_id_of, prepare_request, right_pad

_ATTRIBUTE = "_wilke_lemoe"
_TIE = 1e-6


def expert_keys(state: EditorState) -> list[int]:
    return sorted(int(k.split("/")[1][6:]) for k in state.tensors if k.startswith("lemoe/expert") and k.endswith("/key"))


def running_mean_embedding(embeddings: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """q_t = mean of the embeddings of the real tokens up to t, (batch, tokens, d_model)."""
    weight = (mask if mask is not None else torch.ones(embeddings.shape[:2], device=embeddings.device)).to(embeddings)
    total = torch.cumsum(embeddings * weight[..., None], dim=1)
    count = torch.cumsum(weight, dim=1).clamp(min=1)[..., None]
    return total / count


class ExpertBypass:
    """The bypass of one model: the query captured at the root forward, experts added at the MLP of `layer`."""

    def __init__(self, state: EditorState, layer: int, hparams: LEMoEHParams) -> None:
        self.state, self.layer, self.hparams = state, layer, hparams
        self._query: torch.Tensor | None = None
        self._handles: list[Any] = []
        self._keys_of: tuple[dict, int, list[int], torch.Tensor] | None = None

    @classmethod
    def attach(cls, model: nn.Module, state: EditorState | None, hparams: LEMoEHParams) -> "ExpertBypass":
        bypass = getattr(model, _ATTRIBUTE, None)
        if bypass is not None:
            if bypass.layer != hparams.layer:
                raise EditError(f"the model's LEMoE bypass is at layer {bypass.layer}, not {hparams.layer}")
            bypass.state = state if state is not None else bypass.state
            bypass.hparams = hparams
            return bypass
        bypass = cls(state if state is not None else EditorState(), hparams.layer, hparams)
        setattr(model, _ATTRIBUTE, bypass)
        adapter = ModelAdapter(model)
        bypass._handles = [model.register_forward_pre_hook(functools.partial(bypass._capture, adapter.embed),
                                                           with_kwargs=True),
                           model.register_forward_hook(bypass._release),
                           adapter.mlp(hparams.layer).register_forward_hook(bypass._forward)]
        return bypass

    @staticmethod
    def detach(model: nn.Module) -> None:
        bypass = getattr(model, _ATTRIBUTE, None)
        if bypass is not None:
            for handle in bypass._handles:
                handle.remove()
            delattr(model, _ATTRIBUTE)

    def identity_tensors(self) -> dict[str, torch.Tensor]:
        """The experts and keys (the state's "lemoe/..." tensors): they change the model's outputs without
        being parameters, so `models.model_identity` and `models.weights_digest` hash them through this."""
        return {k: v for k, v in self.state.tensors.items() if k.startswith("lemoe/")}

    def _capture(self, embed: nn.Module, _module: nn.Module, args: tuple, kwargs: dict) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        if not isinstance(ids, torch.Tensor):
            self._query = None
            return
        mask = kwargs.get("attention_mask")
        mask = mask if isinstance(mask, torch.Tensor) and mask.shape == ids.shape else None
        with torch.no_grad():
            self._query = running_mean_embedding(embed(ids).float(), mask)

    def _release(self, *_: Any) -> None:
        self._query = None

    def keys(self) -> tuple[list[int], torch.Tensor]:
        """The expert numbers and their stacked keys, rebuilt only when experts were added or the state
        replaced (entries are only ever added to a state's dict, and a key never changes once set), not
        at every forward: a lifelong run holds a thousand experts or more."""
        tensors = self.state.tensors
        cached = self._keys_of
        if cached is None or cached[0] is not tensors or cached[1] != len(tensors):
            experts = expert_keys(self.state)
            stacked = (torch.stack([tensors[f"lemoe/expert{i}/key"] for i in experts]) if experts
                       else torch.empty(0))
            cached = self._keys_of = (tensors, len(tensors), experts, stacked)
        return cached[2], cached[3]

    def route(self, query: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(expert number per token, gate 0/1 per token) for queries (batch, tokens, d)."""
        experts, keys = self.keys()
        sims = F.normalize(query, dim=-1) @ F.normalize(keys.to(query), dim=-1).T  # cosine, (batch, tokens, experts)
        best = sims.max(dim=-1, keepdim=True).values
        # a tie (a rollback's expert has the key of the edit it undoes) goes to the newest expert; "tie"
        # within float noise, since a matmul need not give identical columns bit-identical values
        tied = sims >= best - _TIE
        newest = sims.shape[-1] - 1 - tied.flip(-1).to(torch.uint8).argmax(-1)
        chosen = torch.tensor(experts, device=query.device)[newest]
        return chosen, best[..., 0] >= self.hparams.route_threshold

    def _forward(self, _module: nn.Module, inputs: tuple, output: Any) -> Any:
        query = self._query
        experts, _ = self.keys()
        if query is None or not experts:
            return None
        hidden = output[0] if isinstance(output, tuple) else output
        x = inputs[0]
        if query.shape[:2] != x.shape[:2]:
            return None  # a call that is not the whole sequence (e.g. with a key-value cache): base model
        chosen, gate = self.route(query)  # while an expert trains, by the same rule: as inference will route
        extra = torch.zeros_like(hidden)
        for i in chosen[gate].unique().tolist():
            w1, w2 = (self._weight(f"lemoe/expert{i}/{n}", x) for n in ("w1", "w2"))
            rows = (chosen == i) & gate
            extra[rows] = (F.gelu(x[rows] @ w1.T) @ w2.T).to(extra.dtype)
        hidden = hidden + self.hparams.scale * extra
        return (hidden,) + tuple(output[1:]) if isinstance(output, tuple) else hidden

    def _weight(self, name: str, like: torch.Tensor) -> torch.Tensor:
        tensor = self.state.tensors[name]
        return tensor if tensor.requires_grad else tensor.to(device=like.device, dtype=like.dtype)


def prompt_queries(model: nn.Module, tok: PreTrainedTokenizerBase, prompts: Sequence[str]) -> torch.Tensor:
    """The query at each prompt's last token (the mean of its input embeddings), (n, d_model)."""
    embed = ModelAdapter(model).embed
    with torch.no_grad():
        return torch.stack([embed(torch.tensor(encode_prompt(tok, p), device=model_device(model))).float().mean(0)
                            for p in prompts]).cpu()


def plan_batches(model: nn.Module, tok: PreTrainedTokenizerBase, requests: Sequence[dict], batch_size: int,
                 seed: int = 0) -> list[list[int]]:
    """Clustering-based editing order (LEMoE Sec. 4.3): indices of `requests` cut into batches of similar
    prompts (k-means with ceil(n / batch_size) centres on the queries, cosine; batches are cut from
    the clusters in turn, so a batch mixes clusters only where a cluster does not fill it)."""
    prompts = [prepare_request(tok, r).prompt for r in requests]
    q = F.normalize(prompt_queries(model, tok, prompts), dim=-1)
    k = max(1, -(-len(requests) // batch_size))
    gen = torch.Generator().manual_seed(seed)
    centres = q[torch.randperm(len(q), generator=gen)[:k]]
    for _ in range(20):
        assign = (q @ centres.T).argmax(-1)
        centres = torch.stack([F.normalize(q[assign == c].mean(0), dim=0) if (assign == c).any() else centres[c]
                               for c in range(k)])
    order = [i for c in range(k) for i in (assign == c).nonzero()[:, 0].tolist()]
    return [order[s:s + batch_size] for s in range(0, len(order), batch_size)]


def train_expert(model: nn.Module, tok: PreTrainedTokenizerBase, requests: Sequence[dict], hparams: LEMoEHParams,
                 bypass: ExpertBypass, number: int) -> dict[str, Any]:
    """Train expert `number` on the batch (NLL of target_new after each prompt); its tensors are put in
    the state only when the training ends with finite values."""
    prepared = [prepare_request(tok, r) for r in requests]
    seqs = [encode_prompt(tok, p.prompt) + p.target_new_ids for p in prepared]
    ids, mask = right_pad(seqs, pad_id_of(tok), model_device(model))
    labels = torch.full_like(ids, -100)
    for row, p in enumerate(prepared):
        start = len(seqs[row]) - len(p.target_new_ids)
        labels[row, start - 1:len(seqs[row]) - 1] = ids[row, start:len(seqs[row])]
    adapter = ModelAdapter(model)
    gen = torch.Generator().manual_seed(number)
    w1 = (torch.randn(hparams.expert_dim, adapter.d_model, generator=gen) / adapter.d_model ** 0.5).to(model_device(model))
    w2 = torch.zeros(adapter.d_model, hparams.expert_dim, device=model_device(model))
    w1.requires_grad_(True)
    w2.requires_grad_(True)
    names = {"w1": f"lemoe/expert{number}/w1", "w2": f"lemoe/expert{number}/w2", "key": f"lemoe/expert{number}/key"}
    bypass.state.tensors.update({names["w1"]: w1, names["w2"]: w2,
                                 names["key"]: prompt_queries(model, tok, [p.prompt for p in prepared]).mean(0)})
    opt = torch.optim.Adam([w1, w2], lr=hparams.lr)
    losses = []
    with frozen(model):
        for _ in range(hparams.steps):
            logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
            loss = F.cross_entropy(logits.float().transpose(1, 2), labels, ignore_index=-100)
            if not loss.requires_grad:  # training routes as inference will: no token reached the new expert
                raise EditError(f"LEMoE expert {number}: no token of the batch's prompts routes to it (an older "
                                f"expert's key is closer, or no similarity reaches route_threshold "
                                f"{hparams.route_threshold}); the edit cannot take effect")
            losses.append(loss.item())
            if loss.item() < hparams.early_stop_loss:
                break
            opt.zero_grad()
            loss.backward()
            opt.step()
    if not all(torch.isfinite(t).all() for t in (w1, w2)):
        raise EditError(f"LEMoE expert {number}: training diverged (non-finite weights)")
    bypass.state.tensors[names["w1"]] = w1.detach().cpu()
    bypass.state.tensors[names["w2"]] = w2.detach().cpu()
    return {"expert": number, "loss_first": losses[0], "loss_last": losses[-1], "steps": len(losses)}


def lemoe_batch_editor(model: nn.Module, tok: PreTrainedTokenizerBase, requests: list[dict], hparams: LEMoEHParams, *,
                       journal: WeightJournal, layers: list[int] | None, cache: EditCache,
                       state: EditorState | None = None) -> EditorOutput:
    """One new expert for the batch; the base weights (the journal) are never touched."""
    if layers is not None and list(layers) != [hparams.layer]:
        raise ValueError(f"LEMoE's bypass is at layer {hparams.layer}; got layers={layers}")
    bypass = ExpertBypass.attach(model, state, hparams)
    before = dict(bypass.state.tensors)
    number = max(expert_keys(bypass.state), default=-1) + 1
    try:
        info = train_expert(model, tok, requests, hparams, bypass, number)
    except BaseException:
        bypass.state.tensors = before
        raise
    return EditorOutput(layers=[hparams.layer], info=info)


def lemoe_editor(model: nn.Module, tok: PreTrainedTokenizerBase, request: dict, hparams: LEMoEHParams, *,
                 journal: WeightJournal, layers: list[int] | None, cache: EditCache,
                 state: EditorState | None = None) -> EditorOutput:
    """The "lemoe" editor of the registry: one request, one new expert."""
    return lemoe_batch_editor(model, tok, [request], hparams, journal=journal, layers=layers, cache=cache, state=state)
