"""Activation strength and delta strength per layer (Hu et al. 2024, Sec. 4.4 and Appendix D).

Pattern unmatch (Sec. 4.4, Appendix D): for records causing toxicity flash the
key sigma(x W_fc^l) at ROME's predefined layer is orders of magnitude smaller
than elsewhere (activation strength, Appendix D.1, Fig. 31-34), while the
residual delta^l that the edit must write (Eq. 9) varies less across layers
(delta strength, Appendix D.2, Fig. 35-38). Through Eq. 11, dividing by a tiny
key makes the update, hence the toxicity, explode.

* activation strength of layer l: ||k^l||_2, the key (input of mlp_out(l),
  sigma(x W_fc^l); act(gate) * up for LLaMA) at the subject's last token,
  averaged over the context prefixes as ROME's k* (`rome.compute_ks`), or at
  the bare prompt only (`prefixes=None`);
* delta strength of layer l: ||delta^l||_2 with delta^l optimised at the
  output of mlp_out(l) (Eq. 9, `rome.compute_v`).
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any, Sequence

import pandas as pd
import torch
from torch import nn
from tqdm.auto import tqdm

from wilke_lib.arch import ModelAdapter


def _layers(model: nn.Module, layers: Sequence[int] | None) -> list[int]:
    return list(range(ModelAdapter(model).n_layers)) if layers is None else [int(l) for l in layers]


def _prefixes(model: nn.Module, tok, hparams: Any, prefixes: Sequence[str] | str | None, cache: Any) -> list[str]:
    """None -> the bare prompt; "rome" -> ROME's context prefixes (Eq. 9's c_j); else the given list."""
    if prefixes is None:
        return [""]
    if isinstance(prefixes, str) and prefixes == "rome":
        from wilke_lib.editing import EditCache

        cache = cache if cache is not None else EditCache.for_model(model)
        return cache.get_prefixes(model, tok, hparams)
    return list(prefixes)


def activation_strength(model: nn.Module, tok, request: dict, layers: Sequence[int] | None = None, *,
                        hparams: Any = None, prefixes: Sequence[str] | str | None = None,
                        cache: Any = None) -> pd.Series:
    """||sigma(x W_fc^l)||_2 at the subject's last token for each layer (Appendix D.1, Fig. 31-34).

    The key is averaged over `prefixes` before the norm, as ROME's k*:
    None = the bare prompt only, "rome" = ROME's context prefixes (needs
    `hparams`), or a list of prefix strings. Returns a Series indexed by layer.
    """
    from wilke_lib.rome import compute_ks

    layers = _layers(model, layers)
    settings = hparams if hparams is not None else SimpleNamespace(fact_token="subject_last")
    keys = compute_ks(model, tok, request, layers, settings, _prefixes(model, tok, hparams, prefixes, cache))
    values = [float(torch.linalg.norm(keys[l])) for l in layers]
    return pd.Series(values, index=pd.Index(layers, name="layer"), name="activation_strength")


def delta_strength(model: nn.Module, tok, request: dict, hparams: Any, layers: Sequence[int] | None = None, *,
                   cache: Any = None, progress: bool = False) -> pd.Series:
    """||delta^l||_2 of Eq. 9 for each layer (Appendix D.2, Fig. 35-38).

    delta^l is optimised at the output of mlp_out(l) with ROME's loss and
    settings (`hparams`, e.g. ROME's or WilKE's) and context prefixes from
    `cache` (an `editing.EditCache`; a fresh one if None). The model is not
    changed. Returns a Series indexed by layer.
    """
    from wilke_lib.rome import compute_ks, compute_v

    layers = _layers(model, layers)
    prefixes = _prefixes(model, tok, hparams, "rome", cache)
    keys = compute_ks(model, tok, request, layers, hparams, prefixes)
    values = []
    for l in tqdm(layers, desc="delta per layer", disable=not progress):
        _, delta, _ = compute_v(model, tok, request, l, keys[l], hparams, prefixes)
        values.append(float(torch.linalg.norm(delta)))
    return pd.Series(values, index=pd.Index(layers, name="layer"), name="delta_strength")


def strength_table(model: nn.Module, tok, records: Sequence[dict], hparams: Any,
                   layers: Sequence[int] | None = None, *, prefixes: Sequence[str] | str | None = "rome",
                   with_delta: bool = True, with_gain: bool = False, cache: Any = None,
                   progress: bool = True) -> pd.DataFrame:
    """Long table (case_id, layer, activation_strength[, delta_strength][, update_gain]) over `records`
    (Fig. 31-38; `update_gain` is not in the paper, see that function)."""
    from wilke_lib.editing import EditCache

    cache = cache if cache is not None else EditCache.for_model(model)
    frames = []
    for record in tqdm(records, desc="strength", disable=not progress):
        act = activation_strength(model, tok, record, layers, hparams=hparams, prefixes=prefixes, cache=cache)
        frame = act.to_frame()
        if with_delta:
            frame["delta_strength"] = delta_strength(model, tok, record, hparams, layers, cache=cache)
        if with_gain:
            frame["update_gain"] = update_gain(model, tok, record, hparams, layers, cache=cache)
        frames.append(frame.reset_index().assign(case_id=record.get("case_id")))
    return pd.concat(frames, ignore_index=True)[
        ["case_id", "layer", "activation_strength"] + (["delta_strength"] if with_delta else [])
        + (["update_gain"] if with_gain else [])]


def update_gain(model: nn.Module, tok, request: dict, hparams: Any, layers: Sequence[int] | None = None, *,
                cache: Any = None) -> pd.Series:
    """||C^-1 k*|| / (k*^T C^-1 k*) for each layer: the size of ROME's update per unit of residual.

    ROME's rank-one update (Eq. 2 of Meng et al. 2022a, Eq. 11 of Hu et al.) is
    dW = r u^T with r = v* - W k* and u = C^-1 k* / (k*^T C^-1 k*), so ||dW||_F = ||r|| * ||u||.
    With C = I the gain is 1 / ||k*||, the inverse activation strength of Appendix D.1; a key that
    points into directions the layer's keys rarely take (small eigenvalues of C) makes it larger
    still. k* is averaged over ROME's context prefixes; C^-1 comes from `cache` (an
    `editing.EditCache` of the original model, a fresh one if None). Returns a Series by layer.
    """
    from wilke_lib.editing import EditCache
    from wilke_lib.rome import compute_ks

    layers = _layers(model, layers)
    cache = cache if cache is not None else EditCache.for_model(model)
    cache.get_mom2(model, tok, layers, hparams)  # one pass over the corpus for every missing layer
    keys = compute_ks(model, tok, request, layers, hparams, _prefixes(model, tok, hparams, "rome", cache))
    values = []
    for l in layers:
        c_inv = cache.get_mom2_inv(model, tok, l, hparams).double()
        k = keys[l].double().to(c_inv.device)
        u = c_inv @ k
        values.append(float(torch.linalg.norm(u) / (u @ k)))
    return pd.Series(values, index=pd.Index(layers, name="layer"), name="update_gain")
