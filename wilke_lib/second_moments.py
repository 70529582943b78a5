"""Second-moment statistics C = E[k k^T] of the keys of an MLP output projection.

The key k of layer l is the input of `mlp_out(l)` (sigma(x W_fc), or act(gate) * up for LLaMA),
as in ROME (Meng et al. 2022a, Eq. 2: C = K K^T estimated over Wikipedia) and MEMIT (Meng et al.
2022b, Eq. 14: C_0 = K_0 K_0^T). C is averaged over every non-pad token position of the first
`n_samples` texts of a corpus, accumulated in float64.

Statistics are cached on disk as safetensors at
`<repo>/.cache/stats/<model_key>/<corpus_key>/layer<l>_n<n>.safetensors`, with what they are (model
key, layer, corpus, sample count, context length, format version) in the file's metadata, checked
on load: a file that belongs to another model or layer, or does not read, is recomputed, never used.
The `model_key` is explicit: in lifelong editing the weights change after every edit but the
statistics belong to the ORIGINAL model (ROME computes them once), so callers pass the key of the
unedited model (`wilke_lib.models.model_identity(original_model)`, the default when omitted).
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from wilke_lib.arch import ModelAdapter, hooks
from wilke_lib.models import context_length, model_identity
from wilke_lib.results import bounded_name, cache_dir
from wilke_lib.sources import load_corpus
from wilke_lib.tokens import pad_id_of, right_pad

log = logging.getLogger(__name__)

CorpusLoader = Callable[[str], Sequence[str]]
"""corpus name or path -> its texts (default `sources.load_corpus`: a registered name or a text file)."""

FORMAT_VERSION = "2"

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
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    folder = root / bounded_name(_sanitize(model_key)) / bounded_name(corpus_key(corpus))  # long names: ENAMETOOLONG
    return folder / f"layer{layer}_n{n_samples}.safetensors"


def default_cache_dir() -> Path:
    return cache_dir("stats")


def _load_texts(corpus: str, n_samples: int, corpus_loader: CorpusLoader | None = None) -> list[str]:
    texts = list((corpus_loader or load_corpus)(corpus))
    if len(texts) < n_samples:
        log.warning("corpus %r has %d texts, fewer than the %d requested; using all", corpus, len(texts), n_samples)
    return texts[:n_samples]


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

    pad_id = pad_id_of(tok)
    encoded = [list(tok(t, truncation=True, max_length=max_length)["input_ids"]) for t in texts]
    encoded = [e for e in encoded if e]
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    was_training = model.training
    model.eval()
    try:
        batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
        with hooks(pre=[(adapter.mlp_out(l), make_hook(l)) for l in layers]):
            for batch in tqdm(batches, desc=f"second moments ({len(layers)} layer(s))", disable=not progress,
                              leave=False):
                ids, mask = right_pad([encoded[i] for i in batch], pad_id)
                mask_holder["mask"] = mask.bool().to(device)
                model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False)
                count += int(mask.sum())
    finally:
        model.train(was_training)
    return sums, count


def _metadata(model_key: str, corpus: str, layer: int, n_samples: int, max_length: int) -> dict[str, str]:
    """What a statistics file is, stored in it and checked when it is read."""
    return {"format_version": FORMAT_VERSION, "model_key": model_key, "corpus": corpus_key(corpus),
            "layer": str(layer), "n_samples": str(n_samples), "max_length": str(max_length)}


def _read_cached(path: Path, expected: dict[str, str], shape: tuple[int, int]) -> torch.Tensor | None:
    """The cached C at `path` if its metadata match `expected`, it has `shape` and it is finite; None (logged)
    otherwise."""
    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
            mom2 = fh.get_tensor("mom2")
    except (SafetensorError, OSError, KeyError) as err:
        log.warning("statistics file %s is unreadable (%s): recomputing it", path, err)
        return None
    wrong = {k: (meta.get(k), v) for k, v in expected.items() if meta.get(k) != v}
    if wrong:
        log.warning("statistics file %s does not match what is asked (%s): recomputing it", path, wrong)
        return None
    if tuple(mom2.shape) != shape:
        log.warning("statistics file %s holds a matrix of shape %s, not the model's %s: recomputing it", path,
                    tuple(mom2.shape), shape)
        return None
    if not torch.isfinite(mom2).all():
        log.warning("statistics file %s holds non-finite values: recomputing it", path)
        return None
    return mom2


def second_moments(model: nn.Module, tok: PreTrainedTokenizerBase, layers: Sequence[int], corpus: str,
                   n_samples: int, batch_size: int = 64, dtype: torch.dtype | str = torch.float32, *,
                   model_key: str | None = None, max_length: int = 256, cache_dir: str | Path | None = None,
                   progress: bool = True, corpus_loader: CorpusLoader | None = None) -> dict[int, torch.Tensor]:
    """C^l = E[k k^T] (d_mlp, d_mlp) for every layer in `layers`, on the model's device, in `dtype`.

    Layers already cached on disk are loaded; the others are computed together in one pass over
    the corpus (hooks on every missing layer) and saved. `model_key` names the ORIGINAL model
    (default: `model_identity(model)`); pass it explicitly once the model has been edited.
    `corpus_loader(corpus)` gives the texts (default `sources.load_corpus`: a registered name such as
    "toy-world", or a text file); the files on disk are keyed by the corpus's name (`corpus_key`).
    """
    layers = list(dict.fromkeys(int(l) for l in layers))
    key = model_key if model_key is not None else model_identity(model)
    device = next(model.parameters()).device
    out_dtype = _resolve_dtype(dtype)
    limit = context_length(model)
    max_length = min(max_length, limit) if limit else max_length
    result: dict[int, torch.Tensor] = {}
    missing = []
    for l in layers:
        path = stats_path(key, corpus, l, n_samples, cache_dir)
        expected = _metadata(key, corpus, l, n_samples, max_length)
        mom2 = _read_cached(path, expected, (ModelAdapter(model).d_mlp,) * 2) if path.is_file() else None
        if mom2 is not None:
            result[l] = mom2.to(device=device, dtype=out_dtype)
            continue
        missing.append(l)
    if missing:
        texts = _load_texts(corpus, n_samples, corpus_loader)
        if not texts:
            raise ValueError(f"corpus {corpus!r} has no texts")
        sums, count = _accumulate(model, tok, missing, texts, batch_size, max_length, progress)
        if count == 0:
            raise ValueError(f"corpus {corpus!r} produced no token positions")
        for l in missing:
            mom2 = (sums[l] / count).float().cpu()
            if not torch.isfinite(mom2).all():
                raise ValueError(f"second moment of layer {l} on corpus {corpus!r} is not finite: the model "
                                 "produced NaN/inf keys")
            path = stats_path(key, corpus, l, n_samples, cache_dir)
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
            meta = _metadata(key, corpus, l, n_samples, max_length) | {"count": str(count), "n_texts": str(len(texts))}
            save_file({"mom2": mom2.contiguous()}, str(tmp), metadata=meta)
            os.replace(tmp, path)  # atomic: concurrent readers never see a partial file
            result[l] = mom2.to(device=device, dtype=out_dtype)
    return {l: result[l] for l in layers}


def second_moment(model: nn.Module, tok: PreTrainedTokenizerBase, layer: int, corpus: str, n_samples: int,
                  batch_size: int = 64, dtype: torch.dtype | str = torch.float32, *, model_key: str | None = None,
                  max_length: int = 256, cache_dir: str | Path | None = None, progress: bool = True,
                  corpus_loader: CorpusLoader | None = None) -> torch.Tensor:
    """C = E[k k^T] (d_mlp, d_mlp) of layer `layer`; see `second_moments`."""
    return second_moments(model, tok, [layer], corpus, n_samples, batch_size, dtype, model_key=model_key,
                          max_length=max_length, cache_dir=cache_dir, progress=progress,
                          corpus_loader=corpus_loader)[layer]
