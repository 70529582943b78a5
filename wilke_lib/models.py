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

from wilke_lib.results import (REPO_ROOT, CorruptFileError, bounded_name, cache_dir, model_slug, read_json,
                               write_json_atomic)

ORGANISMS: tuple[str, ...] = ("toy-gpt2", "toy-gptj")
ORGANISMS_DIR: Path = REPO_ROOT / "organisms"
# the rungs of the width ladder (`organisms.train.LADDER`): organisms too, by name, but not the book's default pair
LADDER_NAME = re.compile(r"toy-(gpt2|gptj)(-x4)?-w\d+")


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


def canonical_model_name(name: str | Path) -> str:
    """The name a model is keyed by: an organism given by its folder (`/work/main/organisms/toy-gpt2`,
    `organisms/toy-gpt2/`, a symbolic link to it) becomes its name ("toy-gpt2"), so that the spelling of a
    path does not make its runs new runs the book never reads; anything else is returned unchanged (the
    identity of the names already used, hence of the committed runs, does not change)."""
    text = str(name)
    if is_organism_name(text):
        return text
    try:
        path = Path(text).expanduser().resolve()
    except (OSError, RuntimeError, ValueError):
        return text
    if path.parent == ORGANISMS_DIR.resolve() and is_organism_name(path.name) and path.is_dir():
        return path.name
    return text


def model_key(name: str | Path, edge_bytes: int = 1 << 20) -> str:
    """The identity under which results of a model are stored: its folder name and 8 hex digits of
    its config and weight files (`is_model_file`: names, sizes, first and last MiB of each), computed without loading
    it; the name alone for a hub id that is not on this machine. A retrained organism is therefore a
    different model, and its predecessor's results are not read back. (Statistics, which depend on
    the weights actually in memory, are keyed by `model_identity(model)` instead.)"""
    name = canonical_model_name(name)
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


def editor_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Tensors an editor keeps beside the weights that change the model's outputs (LEMoE's experts and their
    keys, `editors.lemoe.ExpertBypass`): those of every object attached to the model that offers
    `identity_tensors()`. Not parameters, so `named_parameters` and `state_dict` do not see them."""
    out: dict[str, torch.Tensor] = {}
    for value in list(vars(model).values()):
        tensors = getattr(value, "identity_tensors", None)
        if callable(tensors):
            out.update(tensors())
    return out


def _hash_tensors(h: "hashlib._Hash", tensors: dict[str, torch.Tensor]) -> None:
    for name, tensor in sorted(tensors.items()):
        flat = tensor.detach().to("cpu").contiguous().reshape(-1)
        h.update(f"{name}:{flat.dtype}:{tuple(tensor.shape)}".encode())
        h.update(flat.view(torch.uint8).numpy())


def weights_digest(model: nn.Module) -> str:
    """16 hex digits of the sha256 of every parameter's bytes (name, dtype and shape included) and of the
    editors' tensors (`editor_tensors`): equal exactly when the weights in memory are bit-identical.
    One pass over the weights, unlike `weights_fingerprint`'s sample, so that an edit of a few rows is seen."""
    h = hashlib.sha256()
    with torch.no_grad():
        _hash_tensors(h, dict(model.named_parameters()))
        _hash_tensors(h, {f"editor/{k}": v for k, v in editor_tensors(model).items()})
    return h.hexdigest()[:16]


_FILE_DIGESTS: dict[tuple[str, str], str] = {}


def files_weights_digest(name: str | Path, dtype: torch.dtype) -> str | None:
    """`weights_digest` of the model files `name` is keyed by, loaded on the CPU in `dtype`; None when `name`
    is not a local model folder (a hub id, a test's made-up name: no files to compare with). Loaded once per
    (model_key, dtype): kept in memory and in `<cache>/weights/`, so that later runs pay only the hash."""
    path = Path(resolve_model_path(canonical_model_name(name)))
    if not (path / "config.json").is_file():
        return None
    memo = (model_key(name), str(dtype).removeprefix("torch."))
    if memo in _FILE_DIGESTS:
        return _FILE_DIGESTS[memo]
    cached = cache_dir("weights", f"{bounded_name(memo[0])}__{memo[1]}.json")  # a long name: ENAMETOOLONG
    try:
        digest = read_json(cached).get("weights_digest") if cached.is_file() else None
    except (CorruptFileError, AttributeError):
        digest = None
    if not isinstance(digest, str):
        model, _ = load_model(path, device="cpu", dtype=dtype)
        digest = weights_digest(model)
        del model
        cached.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(cached, {"model_key": memo[0], "dtype": memo[1], "weights_digest": digest})
    _FILE_DIGESTS[memo] = digest
    return digest


class WeightsMismatchError(ValueError):
    """The weights in memory are not those of the model files a run is stored under."""


def check_weights_match(model: nn.Module, name: str | Path) -> None:
    """WeightsMismatchError when `model`'s weights (`weights_digest`) differ from those of the files of `name`
    (the model the run is keyed by): a model edited before (e.g. by an earlier edit on the same object)
    would otherwise store its numbers under the clean model's identity."""
    dtype = next(model.parameters()).dtype
    reference = files_weights_digest(name, dtype)
    if reference is None:
        return
    actual = weights_digest(model)
    if actual != reference:
        raise WeightsMismatchError(
            f"the weights of the model passed (digest {actual}) are not those of the files of {str(name)!r} "
            f"({resolve_model_path(canonical_model_name(name))}, digest {reference} in {str(dtype).removeprefix('torch.')}), "
            "under which the run would be stored: the model was edited or replaced after loading (an edit, a "
            "LEMoE expert, another checkpoint). Pass a freshly loaded model: models.load_model(name)")


def model_identity(model: PreTrainedModel) -> str:
    """Short stable string identifying the (unedited) model, used as a cache key.

    `<basename of name_or_path>-<8 hex of the config hash>-<8 hex of the weights>-<n_params>`.
    The config hash ignores entries that saving or loading change, and the weights fingerprint
    (`weights_fingerprint`) makes a retrained model a different model; a model and its
    saved-and-reloaded copy share the identity. Caches keyed by it (e.g. the second-moment
    statistics) are meant for the unedited model: compute it before editing. Tensors an editor attached
    beside the weights (LEMoE's experts: `editor_tensors`) add `-experts-<8 hex>`, so that two models with
    different experts, which answer differently, never share an identity.
    """
    config = model.config.to_dict()
    for key in _VOLATILE_CONFIG_KEYS:
        config.pop(key, None)
    digest = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:8]
    basename = Path(str(getattr(model.config, "_name_or_path", "") or "")).name or model.config.model_type
    extra = editor_tensors(model)
    experts = ""
    if extra:
        h = hashlib.sha256()
        _hash_tensors(h, extra)
        experts = f"-experts-{h.hexdigest()[:8]}"
    return f"{basename}-{digest}-{weights_fingerprint(model)}-{count_parameters(model)}{experts}"


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
