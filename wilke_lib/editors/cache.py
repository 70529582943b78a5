"""What is computed once per ORIGINAL model and reused by every edit: ROME's context prefixes and
the second moments C = E[k k^T] (and C^-1) of the edited layers (Meng et al. 2022a compute both once).

`EditCache` is explicit, never global: the caller creates it from the unedited model
(`EditCache.for_model`) and passes it to every edit and rollback. Statistics are stored on disk
under the original model's identity (`wilke_lib.models.model_identity`), so a lifelong run keeps
using the unedited model's C however far the weights have moved.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from wilke_lib.arch import frozen, model_device
from wilke_lib.errors import EditError
from wilke_lib.models import model_identity
from wilke_lib.second_moments import CorpusLoader, second_moments


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


def invert_second_moment(mom2: torch.Tensor, ridge: float = 0.0, layer: int | None = None) -> torch.Tensor:
    """Inverse of the symmetric C (+ ridge * mean(diag C) * I), in C's dtype; EditError when singular.

    Computed through an eigendecomposition in float64: C must have all eigenvalues > 0, otherwise
    the system of ROME Eq. 2 is singular.
    """
    where = f" at layer {layer}" if layer is not None else ""
    work_device = mom2.device if mom2.device.type != "mps" else torch.device("cpu")
    c64 = mom2.to(device=work_device, dtype=torch.float64)
    if not torch.isfinite(c64).all():
        raise EditError(f"singular system: second-moment matrix{where} has non-finite entries")
    c64 = (c64 + c64.T) / 2
    if ridge:
        c64 = c64 + ridge * c64.diagonal().mean() * torch.eye(c64.shape[0], dtype=c64.dtype, device=c64.device)
    eigvals, eigvecs = torch.linalg.eigh(c64)
    if eigvals.max() <= 0 or eigvals.min() <= 0:
        raise EditError(f"singular system: second-moment matrix{where} is not positive definite "
                        f"(eigenvalues in [{eigvals.min().item():.3g}, {eigvals.max().item():.3g}]); "
                        "use more statistics samples or set mom2_ridge > 0")
    inv = (eigvecs / eigvals) @ eigvecs.T
    return inv.to(device=mom2.device, dtype=mom2.dtype)


@dataclass
class EditCache:
    """Per-original-model cache of context prefixes and second moments (no global state).

    model_key: identity of the ORIGINAL (unedited) model; statistics on disk are stored under it.
    stats_dir: root of the on-disk statistics cache (default `<repo>/.cache/stats`).
    corpus_loader: the texts of a settings' `mom2_corpus` (default `sources.load_corpus`: a registered
    name such as "toy-world", or a text file); the editors reach a corpus only through it.
    Spectral norms are not cached: they change as the weights are edited.
    """

    model_key: str
    stats_dir: Path | None = None
    prefixes: dict[tuple, list[str]] = field(default_factory=dict)
    mom2: dict[tuple, torch.Tensor] = field(default_factory=dict)
    mom2_inv: dict[tuple, torch.Tensor] = field(default_factory=dict)
    projectors: dict[tuple, torch.Tensor] = field(default_factory=dict)
    progress: bool = False
    corpus_loader: CorpusLoader | None = None

    @classmethod
    def for_model(cls, model: nn.Module, stats_dir: str | Path | None = None,
                  corpus_loader: CorpusLoader | None = None) -> "EditCache":
        """A cache keyed by `model`'s identity; create it from the ORIGINAL model."""
        return cls(model_key=model_identity(model), stats_dir=Path(stats_dir) if stats_dir else None,
                   corpus_loader=corpus_loader)

    def get_prefixes(self, model: nn.Module, tok: PreTrainedTokenizerBase, hparams: Any) -> list[str]:
        """The context prefixes c_j of ROME Eq. 4 / WilKE Eq. 9 ("" = the bare prompt first)."""
        key = (tuple(map(tuple, hparams.context_lengths)), hparams.context_seed, hparams.context_top_k,
               tuple(hparams.context_prefixes) if hparams.context_prefixes is not None else None)
        if key not in self.prefixes:
            self.prefixes[key] = context_prefixes(model, tok, hparams)
        return self.prefixes[key]

    @staticmethod
    def _stats_key(hparams: Any, layer: int) -> tuple:
        return (hparams.mom2_corpus, hparams.mom2_n_samples, hparams.mom2_max_length, hparams.mom2_dtype, layer)

    def get_mom2(self, model: nn.Module, tok: PreTrainedTokenizerBase, layers: Sequence[int],
                 hparams: Any) -> dict[int, torch.Tensor]:
        """C^l = E[k k^T] for each layer (computed in one pass for all missing layers)."""
        missing = [l for l in layers if self._stats_key(hparams, l) not in self.mom2]
        if missing:
            found = second_moments(model, tok, missing, hparams.mom2_corpus, hparams.mom2_n_samples,
                                   hparams.mom2_batch_size, hparams.mom2_dtype, model_key=self.model_key,
                                   max_length=hparams.mom2_max_length, cache_dir=self.stats_dir,
                                   progress=self.progress, corpus_loader=self.corpus_loader)
            for l, mom2 in found.items():
                self.mom2[self._stats_key(hparams, l)] = mom2
        return {l: self.mom2[self._stats_key(hparams, l)] for l in layers}

    def get_mom2_inv(self, model: nn.Module, tok: PreTrainedTokenizerBase, layer: int, hparams: Any) -> torch.Tensor:
        """(C + ridge * mean(diag C) * I)^-1 in mom2_dtype; EditError if C is not positive definite."""
        key = self._stats_key(hparams, layer) + (hparams.mom2_ridge,)
        if key not in self.mom2_inv:
            mom2 = self.get_mom2(model, tok, [layer], hparams)[layer]
            self.mom2_inv[key] = invert_second_moment(mom2, hparams.mom2_ridge, layer)
        return self.mom2_inv[key]

    def get_projector(self, model: nn.Module, tok: PreTrainedTokenizerBase, layer: int, hparams: Any) -> torch.Tensor:
        """AlphaEdit's projector onto the null space of the preserved keys: U U^T over the eigenvectors
        of C whose eigenvalue is below `hparams.nullspace_threshold` (float32, on C's device)."""
        key = self._stats_key(hparams, layer) + (hparams.nullspace_threshold,)
        if key not in self.projectors:
            mom2 = self.get_mom2(model, tok, [layer], hparams)[layer]
            eigvals, eigvecs = torch.linalg.eigh(mom2.double())
            small = eigvecs[:, eigvals < hparams.nullspace_threshold]
            self.projectors[key] = (small @ small.T).to(device=mom2.device, dtype=torch.float32)
        return self.projectors[key]

    def prepare(self, model: nn.Module, tok: PreTrainedTokenizerBase, hparams: Any, layers: Sequence[int]) -> "EditCache":
        """Derive the prefixes and the statistics of `layers` from the (unedited) model now."""
        if hasattr(hparams, "context_lengths"):
            self.get_prefixes(model, tok, hparams)
        if layers and hasattr(hparams, "mom2_corpus"):
            self.get_mom2(model, tok, layers, hparams)
        return self
