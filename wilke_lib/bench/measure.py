"""Measuring one edit: wall time, peak memory, counted FLOPs, the machine it ran on.

* time: wall time of `editing.edit` on the unedited model (the touched weights are put back after
  every edit, untimed, through a `WeightJournal`); CUDA is synchronised;
* peak memory of one edit (`PeakMemory`): CUDA: `torch.cuda.max_memory_allocated` above the memory
  allocated before; CPU (Linux, glibc): the peak resident set size above the one before, with
  glibc's mmap threshold lowered so that freed tensors leave the resident set at once; elsewhere:
  ru_maxrss of the process (an upper bound);
* FLOPs: counted by `torch.utils.flop_counter.FlopCounterMode` over one whole edit (forward and
  backward passes, every optimisation step, the statistics solve): matrix multiplications and the
  attention kernels it knows (on CPU PyTorch's flash-attention-for-CPU kernel is not among them);
  element-wise operations are not counted.
"""

from __future__ import annotations

import ctypes
import os
import platform
import re
import resource
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from wilke_lib import editing
from wilke_lib.arch import ModelAdapter, model_device
from wilke_lib.book import git_commit
from wilke_lib.editors.cache import EditCache
from wilke_lib.editors.common import EditorState, WeightJournal
from wilke_lib.editors.hook_layers import HookLayers
from wilke_lib.editors.lemoe import ExpertBypass


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _status_kb(field: str) -> int | None:
    try:
        text = Path("/proc/self/status").read_text()
    except OSError:
        return None
    match = re.search(rf"^{field}:\s+(\d+)\s+kB", text, re.MULTILINE)
    return int(match.group(1)) if match else None


def _glibc():
    """glibc through ctypes (for mallopt / malloc_trim), or None."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt, libc.malloc_trim  # noqa: B018 -- both must exist
        return libc
    except (OSError, AttributeError):
        return None


M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter
MMAP_THRESHOLD_BYTES = 16384
GLIBC_DEFAULT_MMAP_THRESHOLD = 128 * 1024


class PeakMemory:
    """Peak memory of a block, in MiB, above the memory in use when it started.

    CUDA: `torch.cuda.max_memory_allocated` above `memory_allocated` at the start. CPU on Linux with
    glibc: the peak resident set size (VmHWM, reset through /proc/self/clear_refs) above the resident
    size at the start, with glibc's mmap threshold lowered to 16 KiB inside the block so that freed
    tensors leave the resident set at once (torch allocates CPU tensors with malloc, no caching), then
    set back to glibc's default 128 KiB: measure memory in untimed runs. Elsewhere: ru_maxrss of the
    whole process (an upper bound). Use as `with PeakMemory(device) as peak: ...`; then `peak.mib`,
    `peak.method`."""

    def __init__(self, device: torch.device) -> None:
        self.device = torch.device(device)
        self.mib: float = float("nan")
        self.method = ""
        self._libc = None

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
            self.method = "cuda max_memory_allocated"
            return self
        libc = _glibc()
        if libc is not None and _status_kb("VmRSS") is not None:
            libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)
            libc.malloc_trim(0)
            try:
                Path("/proc/self/clear_refs").write_text("5")
                self._libc = libc
                self._base = _status_kb("VmRSS")
                self.method = "peak RSS (VmHWM reset, mmap threshold 16 KiB)"
                return self
            except OSError:
                libc.mallopt(M_MMAP_THRESHOLD, GLIBC_DEFAULT_MMAP_THRESHOLD)
        self._base = 0
        self.method = "ru_maxrss (process peak)"
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.mib = (torch.cuda.max_memory_allocated(self.device) - self._base) / 2 ** 20
        elif self._libc is not None:
            self.mib = max(0, (_status_kb("VmHWM") or 0) - self._base) / 1024
            self._libc.mallopt(M_MMAP_THRESHOLD, GLIBC_DEFAULT_MMAP_THRESHOLD)
        else:
            self.mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


def device_name(device: torch.device) -> str:
    """GPU name, or the CPU model and the number of torch threads."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu} ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"


def original_weights(model: nn.Module) -> WeightJournal:
    """A journal holding every layer's W_proj, to put the touched ones back between timed edits."""
    adapter = ModelAdapter(model)
    journal = WeightJournal(adapter)
    for layer in range(adapter.n_layers):
        journal.snapshot(layer)
    return journal


def timed_edit(model: nn.Module, tok, request: dict, hparams: Any, cache: EditCache,
               originals: WeightJournal) -> tuple[float, editing.EditResult]:
    """(seconds, result) of one edit of the unedited model, from an empty editor state; the weights are
    restored and any hook layers or experts the edit added removed afterwards."""
    device = model_device(model)
    sync(device)
    start = time.perf_counter()
    result = editing.edit(model, tok, request, hparams, cache=cache, keep_deltas=False, state=EditorState())
    sync(device)
    seconds = time.perf_counter() - start
    originals.restore()
    HookLayers.detach(model)
    ExpertBypass.detach(model)
    return seconds, result


def count_flops(model: nn.Module, tok, request: dict, hparams: Any, cache: EditCache,
                originals: WeightJournal) -> float:
    """FLOPs of one whole edit counted by FlopCounterMode (matmuls and known attention kernels)."""
    counter = FlopCounterMode(display=False)
    with counter:
        timed_edit(model, tok, request, hparams, cache, originals)
    return float(counter.get_total_flops())


def provenance() -> dict[str, str]:
    return {"date_utc": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S"), "commit": git_commit(),
            "torch": torch.__version__}
