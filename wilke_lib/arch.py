"""Architecture adapter: one object that knows where a model keeps its MLPs.

Editors (ROME, MEMIT, WilKE, ...) only ever talk about "layer l", its MLP,
the MLP's input projection W_fc and its output projection W_proj. This module
maps those notions onto the concrete module names of each supported Hugging
Face architecture, and hides the one real trap: GPT-2 stores its MLP weights
in `Conv1D` modules whose weight is laid out [in, out], the transpose of
`nn.Linear`'s [out, in].

Convention used everywhere in wilke_lib: the output projection of layer l is
a (d_model, d_mlp) matrix W with value = W @ key, where the key is the input
of `mlp_out(l)` and the value its output (bias excluded).

Every hook the library places goes through `hooks(...)`, a context manager that
always removes them (in the spirit of ROME's `nethook.TraceDict` and
TransformerLens's `run_with_hooks`); `hidden_of` / `patch_output` deal with
blocks that return tuples.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


@dataclass(frozen=True)
class ArchSpec:
    """Dotted module paths of one architecture family.

    `layers` is relative to the model; the per-layer paths are relative to
    the layer block. `mlp_gate` is only set for gated (SwiGLU) MLPs.
    `unembed` lists alternatives, first match wins: transformers 5 renamed
    GPT-NeoX's `embed_out` to `lm_head`.
    """

    layers: str
    mlp: str
    attn: str
    mlp_in: str
    mlp_out: str
    embed: str
    final_norm: str
    unembed: tuple[str, ...]
    mlp_gate: str | None = None


_GPT2 = ArchSpec(
    layers="transformer.h", mlp="mlp", attn="attn", mlp_in="mlp.c_fc", mlp_out="mlp.c_proj",
    embed="transformer.wte", final_norm="transformer.ln_f", unembed=("lm_head",),
)
_GPTJ = ArchSpec(
    layers="transformer.h", mlp="mlp", attn="attn", mlp_in="mlp.fc_in", mlp_out="mlp.fc_out",
    embed="transformer.wte", final_norm="transformer.ln_f", unembed=("lm_head",),
)
_GPT_NEOX = ArchSpec(
    layers="gpt_neox.layers", mlp="mlp", attn="attention",
    mlp_in="mlp.dense_h_to_4h", mlp_out="mlp.dense_4h_to_h",
    embed="gpt_neox.embed_in", final_norm="gpt_neox.final_layer_norm", unembed=("embed_out", "lm_head"),
)
_LLAMA = ArchSpec(
    layers="model.layers", mlp="mlp", attn="self_attn", mlp_in="mlp.up_proj", mlp_out="mlp.down_proj",
    embed="model.embed_tokens", final_norm="model.norm", unembed=("lm_head",), mlp_gate="mlp.gate_proj",
)

# config.model_type -> (adapter.arch, spec). Mistral and Qwen2 share LLaMA's layout.
_SPECS: dict[str, tuple[str, ArchSpec]] = {
    "gpt2": ("gpt2", _GPT2),
    "gptj": ("gptj", _GPTJ),
    "gpt_neox": ("gpt_neox", _GPT_NEOX),
    "llama": ("llama", _LLAMA),
    "mistral": ("llama", _LLAMA),
    "qwen2": ("llama", _LLAMA),
}

SUPPORTED_MODEL_TYPES: tuple[str, ...] = tuple(_SPECS)

_LAYER_KINDS = ("layer", "mlp", "attn", "mlp_in", "mlp_out", "mlp_gate")
_GLOBAL_KINDS = ("embed", "final_norm", "unembed")


class UnsupportedArchitectureError(ValueError):
    """The model is not one of the architectures wilke_lib knows how to edit."""


def _supported_list() -> str:
    return ", ".join(SUPPORTED_MODEL_TYPES)


def _first_existing(model: nn.Module, names: tuple[str, ...]) -> str | None:
    """The first dotted name in `names` that resolves to a sub-module of `model`."""
    for name in names:
        try:
            model.get_submodule(name)
        except AttributeError:
            continue
        return name
    return None


def detect_arch(model: nn.Module) -> tuple[str, ArchSpec]:
    """Return (arch, spec) for `model`, or raise UnsupportedArchitectureError.

    Detection uses `model.config.model_type`, then checks that the model class
    really has the expected layout (a bare `GPT2Model` has the right
    model_type but no `transformer.h`: it is a base model, not a causal LM).
    """
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    class_name = type(model).__name__
    if model_type not in _SPECS:
        raise UnsupportedArchitectureError(
            f"unsupported architecture: model_type={model_type!r} (class {class_name}); "
            f"supported model types: {_supported_list()}"
        )
    arch, spec = _SPECS[model_type]
    if _first_existing(model, (spec.layers,)) is None or _first_existing(model, spec.unembed) is None:
        raise UnsupportedArchitectureError(
            f"model_type={model_type!r} but class {class_name} lacks the expected modules "
            f"({spec.layers}, {' or '.join(spec.unembed)}); pass the causal-LM class "
            f"(e.g. AutoModelForCausalLM). Supported model types: {_supported_list()}"
        )
    return arch, spec


def _is_conv1d(module: nn.Module) -> bool:
    """True for HF's GPT-2 style Conv1D (weight stored [in, out]).

    Matched by class name so that this works across transformers versions
    that moved the class between modules.
    """
    return type(module).__name__ == "Conv1D"


class ModelAdapter:
    """Uniform access to blocks, MLPs and the MLP output weight of a causal LM."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.arch, self.spec = detect_arch(model)
        self.model_type: str = model.config.model_type
        self._layers: nn.ModuleList = model.get_submodule(self.spec.layers)  # type: ignore[assignment]
        self.n_layers: int = len(self._layers)
        self._unembed_name: str = _first_existing(model, self.spec.unembed)  # type: ignore[assignment]
        d_model, d_mlp = self.out_weight(0).shape
        self.d_model: int = int(d_model)
        self.d_mlp: int = int(d_mlp)

    def __repr__(self) -> str:
        return (f"ModelAdapter(arch={self.arch!r}, model_type={self.model_type!r}, "
                f"n_layers={self.n_layers}, d_model={self.d_model}, d_mlp={self.d_mlp})")

    # ---- names -------------------------------------------------------------

    def _check_layer(self, l: int) -> int:
        if not isinstance(l, int) or isinstance(l, bool):
            raise TypeError(f"layer index must be an int, got {type(l).__name__}")
        if not 0 <= l < self.n_layers:
            raise IndexError(f"layer {l} out of range for a {self.n_layers}-layer {self.arch} model")
        return l

    def name_of(self, kind: str, l: int | None = None) -> str:
        """Full dotted module name, usable with `model.get_submodule(name)`.

        kind is one of "layer", "mlp", "attn", "mlp_in", "mlp_out" (and
        "mlp_gate" for gated MLPs), which need the layer index `l`, or one of
        "embed", "final_norm", "unembed", which take no layer.
        """
        if kind == "unembed":
            return self._unembed_name
        if kind in _GLOBAL_KINDS:
            return getattr(self.spec, kind)
        if kind not in _LAYER_KINDS:
            raise ValueError(f"unknown module kind {kind!r}; expected one of {_LAYER_KINDS + _GLOBAL_KINDS}")
        if l is None:
            raise ValueError(f"module kind {kind!r} needs a layer index")
        prefix = f"{self.spec.layers}.{self._check_layer(l)}"
        if kind == "layer":
            return prefix
        relative = getattr(self.spec, kind)
        if relative is None:
            raise ValueError(f"architecture {self.arch!r} has no {kind!r} module")
        return f"{prefix}.{relative}"

    # ---- modules -----------------------------------------------------------

    def layer(self, l: int) -> nn.Module:
        """The l-th transformer block."""
        return self._layers[self._check_layer(l)]

    def mlp(self, l: int) -> nn.Module:
        return self.model.get_submodule(self.name_of("mlp", l))

    def attn(self, l: int) -> nn.Module:
        return self.model.get_submodule(self.name_of("attn", l))

    def mlp_in(self, l: int) -> nn.Module:
        """W_fc: c_fc / fc_in / dense_h_to_4h / up_proj."""
        return self.model.get_submodule(self.name_of("mlp_in", l))

    def mlp_out(self, l: int) -> nn.Module:
        """W_proj: c_proj / fc_out / dense_4h_to_h / down_proj. Its input is the key."""
        return self.model.get_submodule(self.name_of("mlp_out", l))

    def mlp_gate(self, l: int) -> nn.Module:
        """gate_proj of gated (LLaMA-family) MLPs; ValueError elsewhere."""
        return self.model.get_submodule(self.name_of("mlp_gate", l))

    @property
    def embed(self) -> nn.Module:
        return self.model.get_submodule(self.spec.embed)

    @property
    def final_norm(self) -> nn.Module:
        return self.model.get_submodule(self.spec.final_norm)

    @property
    def unembed(self) -> nn.Module:
        return self.model.get_submodule(self._unembed_name)

    # ---- the output weight W_proj ------------------------------------------

    def out_weight_param(self, l: int) -> tuple[nn.Parameter, bool]:
        """The weight Parameter of `mlp_out(l)` and whether it is stored transposed.

        transposed=True (GPT-2 Conv1D) means the parameter is (d_mlp, d_model),
        i.e. the transpose of the (d_model, d_mlp) convention.
        """
        module = self.mlp_out(l)
        return module.weight, _is_conv1d(module)

    def out_weight(self, l: int) -> torch.Tensor:
        """W_proj^l as a (d_model, d_mlp) tensor with value = W @ key.

        A detached view sharing storage with the parameter: cheap, and
        in-place changes made through the adapter are visible in it. Clone it
        if you need a snapshot.
        """
        weight, transposed = self.out_weight_param(l)
        weight = weight.detach()
        return weight.T if transposed else weight

    def _as_param_layout(self, l: int, matrix: torch.Tensor, what: str) -> tuple[nn.Parameter, torch.Tensor]:
        """Check a (d_model, d_mlp) matrix and return it in the parameter's layout, dtype and device."""
        weight, transposed = self.out_weight_param(l)
        expected = (self.d_model, self.d_mlp)
        if tuple(matrix.shape) != expected:
            raise ValueError(f"{what} for layer {l} must have shape {expected} (d_model, d_mlp), "
                             f"got {tuple(matrix.shape)}")
        matrix = matrix.T if transposed else matrix
        return weight, matrix.to(device=weight.device, dtype=weight.dtype)

    @torch.no_grad()
    def add_to_out_weight(self, l: int, delta: torch.Tensor) -> None:
        """W_proj^l += delta, in place; delta is (d_model, d_mlp)."""
        weight, delta = self._as_param_layout(l, delta, "delta")
        weight.add_(delta)

    @torch.no_grad()
    def set_out_weight(self, l: int, new_weight: torch.Tensor) -> None:
        """W_proj^l = new_weight, in place; new_weight is (d_model, d_mlp)."""
        weight, new_weight = self._as_param_layout(l, new_weight, "new weight")
        weight.copy_(new_weight)


# ---- hooks and model plumbing ------------------------------------------------------------------

HookSpec = tuple[nn.Module, Callable[..., Any]]


@contextmanager
def hooks(forward: Iterable[HookSpec] = (), pre: Iterable[HookSpec] = (),
          pre_with_kwargs: Iterable[HookSpec] = ()) -> Iterator[None]:
    """Register forward hooks, forward pre-hooks (and pre-hooks that receive the keyword arguments)
    for the duration of the block; they are removed on exit, whatever happens inside."""
    handles = []
    try:
        handles += [module.register_forward_pre_hook(fn) for module, fn in pre]
        handles += [module.register_forward_pre_hook(fn, with_kwargs=True) for module, fn in pre_with_kwargs]
        handles += [module.register_forward_hook(fn) for module, fn in forward]
        yield
    finally:
        for handle in handles:
            handle.remove()


def hidden_of(output: Any) -> torch.Tensor:
    """The hidden states of a module output (blocks of some architectures return a tuple)."""
    return output[0] if isinstance(output, tuple) else output


def with_hidden(output: Any, hidden: torch.Tensor) -> Any:
    """`output` with its hidden states replaced (the tuple structure kept)."""
    return (hidden,) + tuple(output[1:]) if isinstance(output, tuple) else hidden


def patch_output(fn: Callable[[torch.Tensor], torch.Tensor]) -> Callable[..., Any]:
    """A forward hook that replaces the module's hidden states h by fn(h)."""
    return lambda _module, _inputs, output: with_hidden(output, fn(hidden_of(output)))


def is_kv_cache(obj: Any) -> bool:
    """Whether `obj` is a key-value cache object (transformers' Cache classes, or the block runner's)."""
    return (not isinstance(obj, (torch.Tensor, dict, list, tuple)) and hasattr(obj, "update")
            and hasattr(obj, "get_seq_length"))


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@contextmanager
def frozen(model: nn.Module) -> Iterator[None]:
    """No parameter requires grad and the model is in eval mode inside; both restored after."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    training = model.training
    for p, _ in flags:
        p.requires_grad_(False)
    model.eval()
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        model.train(training)


def _fused_tanh_gelu(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.gelu(x, approximate="tanh")


@contextmanager
def fused_activations(model: nn.Module) -> Iterator[None]:
    """GPT-2's and GPT-J's tanh GELU ("gelu_new", 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))), which
    transformers computes as six element-wise operations and as many in the backward) computed by
    PyTorch's fused kernel of the same function inside the block; equal up to float rounding (about
    1e-7 relative). Per module instance (nothing global), restored on exit."""
    from transformers.activations import NewGELUActivation

    patched = [m for m in model.modules() if type(m) is NewGELUActivation and "forward" not in vars(m)]
    try:
        for module in patched:
            module.forward = _fused_tanh_gelu
        yield
    finally:
        for module in patched:
            vars(module).pop("forward", None)
