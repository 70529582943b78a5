"""Loading models and tokenizers: built-in organisms, local directories, hub ids.

The built-in "organisms" (`toy-gpt2`, `toy-gptj`) are tiny models trained on
the synthetic world by `make organisms`; they live in `<repo>/organisms/<name>/`.
Anything else is a local directory or a Hugging Face hub id (gpt2-xl,
EleutherAI/gpt-j-6b), loaded with the Auto classes.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import socket
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn
from huggingface_hub import try_to_load_from_cache
from safetensors import SafetensorError
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from wilke_lib.results import REPO_ROOT, model_slug

ORGANISMS: tuple[str, ...] = ("toy-gpt2", "toy-gptj")
ORGANISMS_DIR: Path = REPO_ROOT / "organisms"
# the rungs of the width ladder (`organisms.train.LADDER`): organisms too, by name, but not the book's default pair
LADDER_NAME = re.compile(r"toy-(gpt2|gptj)-w\d+")


def is_organism_name(name: str) -> bool:
    return name in ORGANISMS or LADDER_NAME.fullmatch(name) is not None

_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32, "fp32": torch.float32,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
}

# Config entries that change when a model is merely saved/loaded or moved, not when it is
# a different model; they must not change the cache identity.
_VOLATILE_CONFIG_KEYS = ("_name_or_path", "transformers_version", "torch_dtype", "dtype",
                         "_commit_hash", "_attn_implementation_autoset", "_attn_implementation")


def default_device() -> torch.device:
    """CUDA when available, otherwise CPU. Never hard-code "cuda" elsewhere."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_dtype(dtype: torch.dtype | str | None) -> torch.dtype:
    """Map None / "float32" / "float16" / "bfloat16" (or a torch.dtype) to a torch.dtype.

    None means float32: half precision is only used when the caller asks for it.
    """
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return _DTYPES[str(dtype).lower()]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; expected one of float32, float16, bfloat16") from None


def resolve_model_path(name: str | Path) -> str:
    """Turn a model name into what `from_pretrained` should receive.

    - "toy-gpt2" / "toy-gptj": `<repo>/organisms/<name>/` (FileNotFoundError if not built yet);
    - an existing local directory: used as is;
    - anything else: returned unchanged, as a hub id.
    """
    name = str(name)
    if is_organism_name(name):
        path = ORGANISMS_DIR / name
        if not (path / "config.json").is_file():
            raise FileNotFoundError(
                f"organism {name!r} not found at {path}; build it first with `make organisms` "
                f"(from {REPO_ROOT})"
            )
        return str(path)
    if Path(name).expanduser().is_dir():
        return str(Path(name).expanduser())
    return name


def model_key(name: str | Path, edge_bytes: int = 1 << 20) -> str:
    """The identity under which results of a model are stored: its folder name and 8 hex digits of
    its config and weight files (`is_model_file`: names, sizes, first and last MiB of each), computed without loading
    it; the name alone for a hub id that is not on this machine. A retrained organism is therefore a
    different model, and its predecessor's results are not read back. (Statistics, which depend on
    the weights actually in memory, are keyed by `model_identity(model)` instead.)"""
    path = Path(resolve_model_path(name))
    if not path.is_dir():
        return model_slug(str(name))
    h = hashlib.sha256()
    for file in sorted(p for p in path.iterdir() if is_model_file(p)):
        size = file.stat().st_size
        h.update(f"{file.name}:{size}".encode())
        with file.open("rb") as handle:
            h.update(handle.read(edge_bytes))
            handle.seek(max(0, size - edge_bytes))
            h.update(handle.read(edge_bytes))
    return f"{model_slug(str(name))}-{h.hexdigest()[:8]}"


_WEIGHT_FILE = re.compile(r"^(model|pytorch_model)(-\d+-of-\d+)?\.(safetensors|bin)$")


def is_model_file(path: Path) -> bool:
    """Whether a file is part of the model's identity: `config.json` and the weight files the
    `transformers` loader reads (`model.safetensors`, `pytorch_model.bin`, and their shards), by name
    only. Anything else kept beside the model (trained editor networks, reports, a file being written
    while a run starts) cannot change the key its runs are stored under."""
    return path.name == "config.json" or bool(_WEIGHT_FILE.match(path.name))


@contextmanager
def quiet_loading():
    """No per-tensor loading bar (it fills the book's pages); restored afterwards."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def _hub_reachable(timeout: float = 2.0) -> bool:
    try:
        socket.create_connection(("huggingface.co", 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def require_hub_model(name: str) -> None:
    """Fail at once, with what to do, when `name` is neither in the local Hugging Face cache nor
    downloadable (HF_HUB_OFFLINE set, or the hub unreachable): no 30 s of network retries."""
    if isinstance(try_to_load_from_cache(name, "config.json"), str):  # a path: cached
        return
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")
    if offline or not _hub_reachable():
        why = "HF_HUB_OFFLINE is set" if offline else "the Hugging Face hub cannot be reached"
        raise FileNotFoundError(
            f"model {name!r} is not an organism ({', '.join(ORGANISMS)}), not a local directory and not in the local "
            f"Hugging Face cache, and {why}; give an organism name, the path of a directory saved with "
            "save_pretrained, or a hub id already in the cache (HF_HOME points at the cache)")


def load_model(name_or_path: str | Path, device: torch.device | str | None = None,
               dtype: torch.dtype | str | None = None) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load (model, tokenizer) in eval mode on `device` (default: `default_device()`).

    dtype defaults to float32 everywhere. The tokenizer gets pad_token = eos_token
    when it has none, and right padding; generation.py pads explicitly on the left.
    """
    path = resolve_model_path(name_or_path)
    local = Path(path).is_dir()
    if local and not (Path(path) / "config.json").is_file():
        raise FileNotFoundError(
            f"model {str(name_or_path)!r} is a directory ({Path(path).resolve()}) with no config.json in it; give a "
            f"directory saved with save_pretrained, an organism ({', '.join(ORGANISMS)}) or a hub id")
    if not local:
        require_hub_model(path)
    device = torch.device(device) if device is not None else default_device()
    dtype = resolve_dtype(dtype)
    try:
        with quiet_loading():
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
        tok = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, RuntimeError, SafetensorError) as err:
        if not local:
            raise
        raise ValueError(f"cannot load the model saved in {path}: {type(err).__name__}: {' '.join(str(err).split())}; "
                         "save it again with save_pretrained") from err
    if len(tok) < 2:  # transformers makes an empty tokenizer for a folder without tokenizer files
        raise FileNotFoundError(f"{path} has no tokenizer files (the tokenizer loaded from it is empty); save the "
                                "model's tokenizer there too, with tokenizer.save_pretrained")
    # Older transformers 4.x ignore `dtype=` (they want `torch_dtype=`): cast to be sure.
    model.to(device=device, dtype=dtype).eval()
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "right"
    if model.generation_config is not None and model.generation_config.pad_token_id is None:
        # Silences generate()'s "setting pad_token_id" warning and makes it explicit.
        model.generation_config.pad_token_id = tok.pad_token_id
    return model, tok


def count_parameters(model: nn.Module) -> int:
    """Number of distinct parameters (tied embeddings counted once)."""
    return sum(p.numel() for p in model.parameters())


def weights_fingerprint(model: nn.Module, samples_per_tensor: int = 4096) -> str:
    """8 hex digits of the sha256 of an evenly strided sample of every parameter (as float32).

    Cheap even for GPT-J (a few thousand values per tensor), and different for two trainings of
    the same configuration, which share everything else."""
    h = hashlib.sha256()
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            flat = param.detach().reshape(-1)
            sample = flat[:: max(1, flat.numel() // samples_per_tensor)]
            h.update(name.encode())
            h.update(sample.to(device="cpu", dtype=torch.float32).numpy().tobytes())
    return h.hexdigest()[:8]


def model_identity(model: PreTrainedModel) -> str:
    """Short stable string identifying the (unedited) model, used as a cache key.

    `<basename of name_or_path>-<8 hex of the config hash>-<8 hex of the weights>-<n_params>`.
    The config hash ignores entries that saving or loading change, and the weights fingerprint
    (`weights_fingerprint`) makes a retrained model a different model; a model and its
    saved-and-reloaded copy share the identity. Caches keyed by it (e.g. the second-moment
    statistics) are meant for the unedited model: compute it before editing.
    """
    config = model.config.to_dict()
    for key in _VOLATILE_CONFIG_KEYS:
        config.pop(key, None)
    digest = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:8]
    basename = Path(str(getattr(model.config, "_name_or_path", "") or "")).name or model.config.model_type
    return f"{basename}-{digest}-{weights_fingerprint(model)}-{count_parameters(model)}"


def tune_threads(model: nn.Module, max_parameters: int = 50_000_000) -> int:
    """Use one CPU thread for a small model on the CPU (the organisms: their matrices are so small
    that extra threads only add overhead, and contend with other work on a shared machine);
    leave larger models and GPUs alone. Returns the number of threads in use."""
    if model_device_type(model) == "cpu" and count_parameters(model) <= max_parameters:
        torch.set_num_threads(1)
    return torch.get_num_threads()


def model_device_type(model: nn.Module) -> str:
    return next(model.parameters()).device.type


def context_length(model: nn.Module) -> int | None:
    """The number of positions the model can attend over (None when its config does not say)."""
    config = getattr(model, "config", None)
    for name in ("n_positions", "max_position_embeddings"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None
