"""What the hypernetwork editors (MEND, KE) share at edit time and in training: the fine-tuning gradient
of an edit request as per-token factors, a forward pass with per-example weight changes, and the file
of a trained editor network.

* **Gradient factors** (MEND Sec. 3.1): for a linear layer value = W key, the gradient of a loss with
  respect to W (the adapter's (d_model, d_mlp) convention) is a sum of rank-one terms over the tokens,
  grad W = sum_t delta_t u_t^T, with u_t the layer's input (the key, the MLP hidden activation) and
  delta_t the gradient of the loss with respect to its output. `gradient_factors` captures both with a
  forward hook on `mlp_out(l)` (u: its input; delta: the gradient with respect to a zero tensor added to
  its output), for a batch of requests whose losses are summed, so that each row's factors are that
  request's own gradient.
* **Edited forward** (`added_deltas`): the model with W_l + dW_l[b] for the rows of example b, by a forward
  hook that adds key @ dW^T to the output of `mlp_out(l)`; the same function of the weights as
  `torch.func.functional_call` with W + dW, but with a different dW per example of a batch (training
  edits a batch of requests at once), and differentiable in dW.
* **Weights files**: a trained network is a safetensors file (its settings in the metadata) beside a JSON
  file of provenance; `load_network` reads it once per (file, unedited model, device), checks that it was
  trained for this model (`base_fingerprint`: every parameter except the W_proj that editors change, so
  that the check passes on a model that earlier edits have changed) and with these settings.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import PreTrainedTokenizerBase

from wilke_lib.arch import ModelAdapter, frozen, hooks, model_device
from wilke_lib.editors.common import EditorOutput, WeightJournal
from wilke_lib.errors import EditError
from wilke_lib.models import ORGANISMS_DIR
from wilke_lib.tokens import encode_prompt, pad_id_of, prepare_request, right_pad


@dataclass
class LMBatch:
    """Right-padded prompt + target sequences: ids and mask (rows, tokens); labels[r, t] = the token that
    position t must predict (-100 where there is no target)."""

    ids: torch.Tensor
    mask: torch.Tensor
    labels: torch.Tensor


def lm_batch(tok: PreTrainedTokenizerBase, prompts: Sequence[str], targets: Sequence[Sequence[int]],
             device: torch.device) -> LMBatch:
    """Each prompt followed by its target ids (the last one only predicted); labels on the target."""
    prompt_ids = [encode_prompt(tok, p) for p in prompts]
    sequences = [p + list(t[:-1]) if t else p for p, t in zip(prompt_ids, targets)]
    ids, mask = right_pad(sequences, pad_id_of(tok), device)
    labels = torch.full_like(ids, -100)
    for row, (p, t) in enumerate(zip(prompt_ids, targets)):
        if t:
            labels[row, len(p) - 1:len(p) - 1 + len(t)] = torch.tensor(list(t), device=device)
    return LMBatch(ids, mask, labels)


def row_nll(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean negative log-likelihood of each row's labelled tokens, (rows,)."""
    mask = labels != -100
    logp = logits.float().log_softmax(-1).gather(-1, labels.clamp(min=0)[..., None])[..., 0]
    return -(logp * mask).sum(-1) / mask.sum(-1).clamp(min=1)


def row_argmax_match(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Whether every labelled token is the argmax (the greedy answer, teacher-forced), (rows,) bool."""
    mask = labels != -100
    return ((logits.argmax(-1) == labels) | ~mask).all(-1)


def masked_kl(base_logits: torch.Tensor, post_logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """KL(p_base || p_post) per position, averaged over the positions of `mask` (MEND's L_loc)."""
    base = base_logits.float().log_softmax(-1)
    kl = (base.exp() * (base - post_logits.float().log_softmax(-1))).sum(-1)
    mask = mask.to(kl)
    return (kl * mask).sum() / mask.sum().clamp(min=1)


def forward_logits(model: nn.Module, batch: LMBatch) -> torch.Tensor:
    return model(input_ids=batch.ids, attention_mask=batch.mask, use_cache=False).logits


def gradient_factors(model: nn.Module, batch: LMBatch, layers: Sequence[int]
                     ) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """{layer: (u, delta)}, u (rows, tokens, d_mlp) the input of `mlp_out(layer)`, delta (rows, tokens,
    d_model) the gradient of the row's mean NLL of its labels with respect to that layer's output (float32,
    no graph). grad W_l of row r = sum_t delta[r, t] u[r, t]^T (module docstring)."""
    adapter = ModelAdapter(model)
    captured: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def capture(layer: int) -> Callable[..., torch.Tensor]:
        def hook(_module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
            zero = torch.zeros_like(output, requires_grad=True)
            captured[layer] = (inputs[0].detach(), zero)
            return output + zero
        return hook

    with frozen(model), torch.enable_grad(), hooks(forward=[(adapter.mlp_out(l), capture(l)) for l in layers]):
        loss = row_nll(forward_logits(model, batch), batch.labels).sum()
        grads = torch.autograd.grad(loss, [captured[l][1] for l in layers])
    return {l: (captured[l][0].float(), g.float()) for l, g in zip(layers, grads)}


def token_mask(u: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """(rows, tokens, 1): the tokens that carry gradient (MEND skips the others: padding, the positions
    after the last target)."""
    return ((u != 0).any(-1) & (delta != 0).any(-1))[..., None].to(u)


def weight_gradient(u: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """grad W = sum_t delta_t u_t^T per row, (rows, d_model, d_mlp)."""
    return torch.einsum("btd,btk->bdk", delta, u)


@contextmanager
def added_deltas(model: nn.Module, deltas: dict[int, torch.Tensor], rows: torch.Tensor | None = None) -> Iterator[None]:
    """Inside, `mlp_out(l)` computes (W_l + deltas[l][rows[r]]) key for batch row r (rows=None: row r uses
    deltas[l][r]); deltas[l] is (examples, d_model, d_mlp), differentiable."""
    adapter = ModelAdapter(model)

    def add(dW: torch.Tensor) -> Callable[..., torch.Tensor]:
        def hook(_module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
            per_row = dW if rows is None else dW[rows]
            return output + torch.einsum("btk,bdk->btd", inputs[0].to(per_row.dtype), per_row).to(output.dtype)
        return hook

    with hooks(forward=[(adapter.mlp_out(l), add(dW)) for l, dW in deltas.items()]):
        yield


# ---- the weights file -------------------------------------------------------------------------------

def base_fingerprint(model: nn.Module, samples_per_tensor: int = 4096) -> str:
    """8 hex digits of an evenly strided sample of every parameter except the MLP output projections
    (the weights editors change), as `models.weights_fingerprint`: the same for a model and its edits."""
    adapter = ModelAdapter(model)
    editable = {adapter.name_of("mlp_out", l) + ".weight" for l in range(adapter.n_layers)}
    h = hashlib.sha256()
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            if name in editable:
                continue
            flat = param.detach().reshape(-1)
            h.update(name.encode())
            h.update(flat[:: max(1, flat.numel() // samples_per_tensor)].to("cpu", torch.float32).numpy().tobytes())
    return h.hexdigest()[:8]


def model_dir(model: nn.Module) -> Path | None:
    """The directory the model was loaded from, when it was a local one."""
    name = str(getattr(getattr(model, "config", None), "_name_or_path", "") or "")
    return Path(name) if name and Path(name).is_dir() else None


def weights_path(model: nn.Module, weights: str) -> Path:
    """`weights` as a path: absolute as given; relative to the model's directory (an organism, a model
    saved with save_pretrained), else to the current directory."""
    path = Path(weights).expanduser()
    if path.is_absolute():
        return path
    folder = model_dir(model)
    return (folder / path) if folder is not None else Path.cwd() / path


def train_command(model: nn.Module, editor: str) -> str:
    folder = model_dir(model)
    if folder is not None and folder.resolve().parent == ORGANISMS_DIR.resolve():
        name = folder.name
    else:
        name = str(folder or getattr(model.config, "_name_or_path", "") or "<model directory>")
    return f"python -m wilke_lib.editors.hypernet --model {name} --editor {editor}"


def save_network(net: nn.Module, path: Path, editor: str, config: dict[str, Any], fingerprint: str,
                 provenance: dict[str, Any]) -> None:
    """`path` (the tensors, the settings in the metadata) and `path` with .json (provenance)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
    metadata = {"editor": editor, "config": json.dumps(config, sort_keys=True), "base_fingerprint": fingerprint}
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=metadata)
    tmp.chmod(0o644)
    tmp.replace(path)
    path.with_suffix(".json").write_text(json.dumps(provenance, indent=1, sort_keys=True) + "\n", encoding="utf-8")


_NETWORKS: dict[tuple, nn.Module] = {}  # (file, its mtime and size, unedited model, device) -> network, at most 4


def load_network(model: nn.Module, editor: str, weights: str, config: dict[str, Any],
                 build: Callable[[dict[str, Any]], nn.Module]) -> nn.Module:
    """The trained network of `editor` for `model` from `weights` (cached), in eval mode on the model's
    device. FileNotFoundError / ValueError naming the file and the command that trains it when the file
    is missing, was trained for another model, or with other settings than `config`."""
    path = weights_path(model, weights)
    retrain = f"train it with `{train_command(model, editor)}`"
    if not path.is_file():
        raise FileNotFoundError(f"{editor.upper()}: no trained editor network at {path}; {retrain}")
    stat, fingerprint, device = path.stat(), base_fingerprint(model), model_device(model)
    key = (str(path.resolve()), stat.st_mtime_ns, stat.st_size, fingerprint, str(device), json.dumps(config, sort_keys=True))
    if key in _NETWORKS:
        return _NETWORKS[key]
    try:
        with safe_open(str(path), framework="pt") as handle:
            meta = handle.metadata() or {}
        saved = json.loads(meta.get("config", "null"))
    except Exception as err:  # a damaged or foreign file: safetensors' own errors name no file
        raise ValueError(f"{editor.upper()}: {path} is not a readable editor network ({type(err).__name__}: {err}); "
                         f"{retrain}") from err
    if meta.get("editor") != editor or not isinstance(saved, dict):
        raise ValueError(f"{path} is not a {editor.upper()} network (editor {meta.get('editor')!r}); {retrain}")
    if meta.get("base_fingerprint") != fingerprint:
        raise ValueError(f"{path} was trained for another model (fingerprint {meta.get('base_fingerprint')} of the "
                         f"unedited weights, this model's is {fingerprint}); {retrain}")
    differ = {k: (saved.get(k), v) for k, v in config.items() if saved.get(k) != v}
    if differ:
        raise ValueError(f"{path} was trained with other settings than these hyper-parameters "
                         f"(setting: (file, hyper-parameters) {differ}); {retrain}, or change the settings")
    net = build(saved)
    net.load_state_dict(load_file(str(path)), strict=True)
    net = net.to(device).eval()
    for p in net.parameters():
        p.requires_grad_(False)
    while len(_NETWORKS) >= 4:
        _NETWORKS.pop(next(iter(_NETWORKS)))
    _NETWORKS[key] = net
    return net


def check_layers(layers: Sequence[int] | None, expected: Sequence[int], editor: str) -> None:
    """The hypernetwork editors edit the layers they were trained for; `layers` (a rollback's) must agree."""
    if layers is not None and list(layers) != list(expected):
        raise ValueError(f"{editor}'s network edits layers {list(expected)}; got layers={list(layers)}")


def normalise(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    return (x - mean) / (std + 1e-7)


def apply_deltas(journal: WeightJournal, deltas: dict[int, torch.Tensor], editor: str) -> dict[int, float]:
    """Row 0 of every layer's change through the journal; EditError (nothing added) if one is not finite."""
    for layer, dW in deltas.items():
        if not torch.isfinite(dW).all():
            raise EditError(f"{editor} produced a non-finite weight update at layer {layer}")
    for layer, dW in deltas.items():
        journal.add(layer, dW[0])
    return {layer: float(dW[0].norm()) for layer, dW in deltas.items()}


def edit_with_network(net: nn.Module, model: nn.Module, tok, request: dict, journal: WeightJournal,
                      layers: Sequence[int] | None, editor: str) -> EditorOutput:
    """One edit by a trained hypernetwork (MEND's, KE's): its weight changes for the request, added to
    W_proj of its layers through the journal."""
    check_layers(layers, net.layers, editor)
    with torch.no_grad():
        deltas = net.request_deltas(model, tok, [prepare_request(tok, request)])
    norms = apply_deltas(journal, deltas, editor)
    return EditorOutput(layers=list(net.layers), info={"update_norms": norms})
