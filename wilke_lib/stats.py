"""Second-moment statistics C = E[k k^T] of the keys of an MLP output projection.

The key k of layer l is the input of `mlp_out(l)` (sigma(x W_fc), or act(gate) * up for LLaMA),
as in ROME (Meng et al. 2022a, Eq. 2: C = K K^T estimated over Wikipedia) and MEMIT (Meng et al.
2022b, Eq. 14: C_0 = K_0 K_0^T). C is averaged over every non-pad token position of the first
`n_samples` texts of a corpus, accumulated in float64.

Statistics are cached on disk at
`<repo>/.cache/stats/<model_key>/<corpus_key>/layer<l>_n<n>.pt`.
The `model_key` is explicit: in lifelong editing the weights change after every edit but the
statistics belong to the ORIGINAL model (ROME computes them once), so callers pass the key of the
unedited model (`wilke_lib.models.model_identity(original_model)`, the default when omitted).
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from wilke_lib.arch import ModelAdapter
from wilke_lib.models import REPO_ROOT, model_identity

log = logging.getLogger(__name__)

DEFAULT_CACHE_DIR: Path = REPO_ROOT / ".cache" / "stats"

_DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16,
           "bfloat16": torch.bfloat16}


def _resolve_dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return _DTYPES[str(dtype)]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; expected one of {sorted(_DTYPES)}") from None


def _sanitize(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "corpus"


def corpus_key(corpus: str) -> str:
    """Directory name for a corpus: a sanitised name, or for a file `<stem>-<sha256[:12] of its bytes>`."""
    path = Path(corpus).expanduser()
    if path.is_file():
        digest = hashlib.sha256()
        with path.open("rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
        return f"{_sanitize(path.stem)}-{digest.hexdigest()[:12]}"
    return _sanitize(corpus)


def stats_path(model_key: str, corpus: str, layer: int, n_samples: int,
               cache_dir: str | Path | None = None) -> Path:
    """Where the statistics of (model, corpus, layer, n_samples) are cached."""
    root = Path(cache_dir) if cache_dir is not None else DEFAULT_CACHE_DIR
    return root / _sanitize(model_key) / corpus_key(corpus) / f"layer{layer}_n{n_samples}.pt"


def _load_texts(corpus: str, n_samples: int) -> list[str]:
    from wilke_lib.world import load_corpus  # lazy: only needed when computing

    texts = load_corpus(corpus)
    if len(texts) < n_samples:
        log.warning("corpus %r has %d texts, fewer than the %d requested; using all", corpus, len(texts), n_samples)
    return texts[:n_samples]


def _context_length(model: nn.Module, max_length: int) -> int:
    config = getattr(model, "config", None)
    limit = None
    for name in ("n_positions", "max_position_embeddings"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            limit = value
            break
    return min(max_length, limit) if limit else max_length


@torch.no_grad()
def _accumulate(model: nn.Module, tok: PreTrainedTokenizerBase, layers: Sequence[int], texts: Sequence[str],
                batch_size: int, max_length: int, progress: bool = True) -> tuple[dict[int, torch.Tensor], int]:
    """Sum over token positions of k k^T (float64) at every layer in one pass; returns (sums, count)."""
    adapter = ModelAdapter(model)
    device = next(model.parameters()).device
    acc_device = device if device.type != "mps" else torch.device("cpu")  # mps has no float64
    sums = {l: torch.zeros(adapter.d_mlp, adapter.d_mlp, dtype=torch.float64, device=acc_device) for l in layers}
    mask_holder: dict[str, torch.Tensor] = {}
    count = 0

    def make_hook(l: int):
        def hook(_module, inputs):
            keys = inputs[0]
            flat = keys[mask_holder["mask"]].to(device=acc_device, dtype=torch.float64)
            sums[l].addmm_(flat.T, flat)
        return hook

    pad_id = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    encoded = [list(tok(t, truncation=True, max_length=max_length)["input_ids"]) for t in texts]
    encoded = [e for e in encoded if e]
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    handles = [adapter.mlp_out(l).register_forward_pre_hook(make_hook(l)) for l in layers]
    was_training = model.training
    model.eval()
    try:
        batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
        for batch in tqdm(batches, desc=f"second moments ({len(layers)} layer(s))", disable=not progress,
                          leave=False):
            width = max(len(encoded[i]) for i in batch)
            ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.bool)
            for row, i in enumerate(batch):
                ids[row, :len(encoded[i])] = torch.tensor(encoded[i])
                mask[row, :len(encoded[i])] = True
            mask_holder["mask"] = mask.to(device)
            model(input_ids=ids.to(device), attention_mask=mask.long().to(device), use_cache=False)
            count += int(mask.sum())
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return sums, count


def second_moments(model: nn.Module, tok: PreTrainedTokenizerBase, layers: Sequence[int], corpus: str,
                   n_samples: int, batch_size: int = 64, dtype: torch.dtype | str = torch.float32, *,
                   model_key: str | None = None, max_length: int = 256, cache_dir: str | Path | None = None,
                   progress: bool = True) -> dict[int, torch.Tensor]:
    """C^l = E[k k^T] (d_mlp, d_mlp) for every layer in `layers`, on the model's device, in `dtype`.

    Layers already cached on disk are loaded; the others are computed together in one pass over
    the corpus (hooks on every missing layer) and saved. `model_key` names the ORIGINAL model
    (default: `model_identity(model)`); pass it explicitly once the model has been edited.
    """
    layers = list(dict.fromkeys(int(l) for l in layers))
    key = model_key if model_key is not None else model_identity(model)
    device = next(model.parameters()).device
    out_dtype = _resolve_dtype(dtype)
    max_length = _context_length(model, max_length)
    result: dict[int, torch.Tensor] = {}
    missing = []
    for l in layers:
        path = stats_path(key, corpus, l, n_samples, cache_dir)
        if path.is_file():
            payload = torch.load(path, map_location="cpu", weights_only=True)
            if int(payload.get("max_length", max_length)) == max_length:
                result[l] = payload["mom2"].to(device=device, dtype=out_dtype)
                log.debug("loaded second moment of layer %d from %s", l, path)
                continue
            log.info("cached statistics %s used max_length %s, not %s: recomputing",
                     path, payload.get("max_length"), max_length)
        missing.append(l)
    if missing:
        texts = _load_texts(corpus, n_samples)
        if not texts:
            raise ValueError(f"corpus {corpus!r} has no texts")
        sums, count = _accumulate(model, tok, missing, texts, batch_size, max_length, progress)
        if count == 0:
            raise ValueError(f"corpus {corpus!r} produced no token positions")
        for l in missing:
            mom2 = (sums[l] / count).float().cpu()
            path = stats_path(key, corpus, l, n_samples, cache_dir)
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".tmp{os.getpid()}")
            torch.save({"mom2": mom2, "count": count, "n_texts": len(texts), "layer": l, "corpus": corpus,
                        "model_key": key, "max_length": max_length}, tmp)
            os.replace(tmp, path)  # atomic: concurrent readers never see a partial file
            result[l] = mom2.to(device=device, dtype=out_dtype)
    return {l: result[l] for l in layers}


def second_moment(model: nn.Module, tok: PreTrainedTokenizerBase, layer: int, corpus: str, n_samples: int,
                  batch_size: int = 64, dtype: torch.dtype | str = torch.float32, *, model_key: str | None = None,
                  max_length: int = 256, cache_dir: str | Path | None = None, progress: bool = True) -> torch.Tensor:
    """C = E[k k^T] (d_mlp, d_mlp) of layer `layer`; see `second_moments`."""
    return second_moments(model, tok, [layer], corpus, n_samples, batch_size, dtype, model_key=model_key,
                          max_length=max_length, cache_dir=cache_dir, progress=progress)[layer]
