"""The editors' linear algebra checked against an independent computation (issue 33).

Each test lets `wilke_lib.editing.edit` / `edit_batch` make an edit on a tiny random model, then
recomputes the update from scratch: the keys and hidden states are read with this file's own forward
hooks on the Hugging Face modules (not with the library's helpers), the context prefixes are fixed in
the hyper-parameters, the second moments C are taken from the `EditCache` (their estimation is tested
in tests/test_second_moments.py), and every system is solved here with `torch.linalg.solve` in float64.

* MEMIT (Meng et al. 2022b, Eq. 14 and Alg. 1): at layer l, the i-th of n,
      dW^l = R K^T (lambda C^l + K K^T)^-1,   R = (Z - h^L) / (n - i),
  with K the keys at l averaged over the prefixed prompts and h^L the output of the last layer L of
  the range at the bare prompts, both read on the model as updated at the earlier layers. The targets
  Z come from the delta optimisation; they are recovered from the first layer's update (the only free
  quantity there), checked against the norms the optimisation reports, and must then predict every
  later layer's update exactly.
* ROME (Meng et al. 2022a, Eq. 2): dW = (v* - W k_t) (C^-1 k*)^T / ((C^-1 k*)^T k_t), for both
  update forms (`ROMEHParams.update_form`). The optimised delta is the same for both: it is read
  off the released form's update and must then predict r-ROME's update exactly.

Each test also recomputes the update with one ingredient deliberately wrong (lambda, the divisor of
the spreading, the averaging of the keys, the model the keys are read on, C^-1, the key of the
denominator) and asserts that this gives a discrepancy far above the tolerance: the comparison can fail.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from torch import nn

from tiny import tiny_model_for
from wilke_lib.editing import EditCache, edit, edit_batch
from wilke_lib.hparams import MEMITHParams, ROMEHParams

PREFIXES = ["Alpha beta gamma. ", "The delta. "]  # fixed context prefixes c_j (the bare prompt "" comes first)
REQUESTS = [
    {"prompt": "The capital city of {}", "subject": "Valo Durn",
     "target_new": {"str": "Norway", "id": "Q20"}, "target_true": {"str": "Spain", "id": "Q29"}},
    {"prompt": "The mother tongue of {} is", "subject": "Mira Quell",
     "target_new": {"str": "French", "id": "Q150"}, "target_true": {"str": "Welsh", "id": "Q9309"}},
]
LAMBDA = 50.0  # mom2_update_weight, deliberately not 1
TOLERANCE = 2e-4  # relative Frobenius error between the library's update and this file's float64 solve
WRONG = 10 * TOLERANCE  # a deliberately wrong recomputation must differ by at least this much


# ---- this file's own view of the model -------------------------------------------------------------

def mlp_out(model: nn.Module, layer: int) -> nn.Module:
    """The MLP's output projection of `layer` (its input is the key k)."""
    if model.config.model_type == "gpt2":
        return model.transformer.h[layer].mlp.c_proj
    if model.config.model_type == "llama":
        return model.model.layers[layer].mlp.down_proj
    raise NotImplementedError(model.config.model_type)


def block(model: nn.Module, layer: int) -> nn.Module:
    if model.config.model_type == "gpt2":
        return model.transformer.h[layer]
    return model.model.layers[layer]


def module_name(model: nn.Module, layer: int) -> str:
    return next(name for name, module in model.named_modules() if module is mlp_out(model, layer))


def add_update(model: nn.Module, layer: int, dW: torch.Tensor) -> None:
    """W_out += dW, dW in the (d_model, d_mlp) convention (GPT-2's Conv1D stores the transpose)."""
    module = mlp_out(model, layer)
    with torch.no_grad():
        if type(module).__name__ == "Conv1D":
            module.weight += dW.T.to(module.weight.dtype)
        else:
            module.weight += dW.to(module.weight.dtype)


def out_weight(model: nn.Module, layer: int) -> torch.Tensor:
    module = mlp_out(model, layer)
    W = module.weight.detach()
    return (W.T if type(module).__name__ == "Conv1D" else W).double()


def subject_last(tok, request: dict, prefix: str) -> int:
    """ROME's fact token: the last token of the subject, tokenising the text up to its end."""
    template = request["prompt"]
    return len(tok(prefix + template[:template.index("{}")] + request["subject"])["input_ids"]) - 1


@torch.no_grad()
def read_at_fact_token(model: nn.Module, tok, request: dict, prefix: str, layer: int, last: int
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """(key at `layer`, output of block `last`) at the fact token of prefix + prompt, float64; one
    unpadded prompt per forward pass."""
    text = prefix + request["prompt"].replace("{}", request["subject"])
    ids = torch.tensor([tok(text)["input_ids"]])
    col = subject_last(tok, request, prefix)
    seen: dict[str, torch.Tensor] = {}
    pre = mlp_out(model, layer).register_forward_pre_hook(lambda m, args: seen.__setitem__("k", args[0][0, col]))
    post = block(model, last).register_forward_hook(
        lambda m, args, out: seen.__setitem__("h", (out[0] if isinstance(out, tuple) else out)[0, col]))
    try:
        model(input_ids=ids, use_cache=False)
    finally:
        pre.remove()
        post.remove()
    return seen["k"].double().clone(), seen["h"].double().clone()


def averaged_key(model: nn.Module, tok, request: dict, layer: int, prefixes: list[str]) -> torch.Tensor:
    """k*: the key at the fact token averaged over the prompts c_j + p (ROME Eq. 3, MEMIT's K)."""
    return torch.stack([read_at_fact_token(model, tok, request, p, layer, layer)[0] for p in prefixes]).mean(0)


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


# ---- settings ------------------------------------------------------------------------------------

def stats_settings(corpus_file: Path) -> dict:
    return dict(mom2_corpus=str(corpus_file), mom2_n_samples=800, mom2_batch_size=128)


# ---- MEMIT, Eq. 14 -------------------------------------------------------------------------------

def memit_expected(original: nn.Module, tok, requests: list[dict], layers: list[int], mom2: dict[int, torch.Tensor],
                   recorded: dict[int, torch.Tensor], lam: float, *, divisor_shift: int = 0, average_keys: bool = True,
                   keys_on_original: bool = False) -> tuple[dict[int, torch.Tensor], torch.Tensor, torch.Tensor]:
    """This file's MEMIT, layer by layer, on a copy of `original` to which the recorded updates are
    added in turn. Returns ({layer: expected dW}, Z, h^L of the unedited model at the bare prompts).

    The first layer's update fixes Z: from dW = R K^T A^-1 (A = lam C + K K^T), R = dW A K (K^T K)^-1
    and Z = h^L + n R. The keyword arguments make the recomputation deliberately wrong."""
    work = copy.deepcopy(original)
    prefixes = [""] + PREFIXES
    last, n = layers[-1], len(layers)
    expected: dict[int, torch.Tensor] = {}
    Z = h0 = None
    for i, layer in enumerate(layers):
        keyed_on = original if keys_on_original else work
        if average_keys:
            K = torch.stack([averaged_key(keyed_on, tok, r, layer, prefixes) for r in requests], dim=1)
        else:
            K = torch.stack([read_at_fact_token(keyed_on, tok, r, "", layer, layer)[0] for r in requests], dim=1)
        H = torch.stack([read_at_fact_token(work, tok, r, "", layer, last)[1] for r in requests], dim=1)
        A = lam * mom2[layer].double() + K @ K.T
        if i == 0:
            h0 = H
            R = recorded[layer].double() @ A @ K @ torch.linalg.inv(K.T @ K)
            Z = H + (n + divisor_shift) * R
        else:
            R = (Z - H) / (n - i + divisor_shift)
        expected[layer] = R @ torch.linalg.solve(A, K).T  # R K^T A^-1, A symmetric
        add_update(work, layer, recorded[layer])
    return expected, Z, h0


@pytest.mark.parametrize("arch, n_requests", [("gpt2", 1), ("gpt2", 2), ("llama", 2)])
def test_memit_update_is_eq14_spread_over_the_layers(arch, n_requests, tok, corpus_file, stats_dir):
    requests = REQUESTS[:n_requests]
    layers = [0, 1, 2]
    hparams = MEMITHParams(layers=layers, mom2_update_weight=LAMBDA, context_prefixes=PREFIXES, v_num_grad_steps=8,
                           **stats_settings(corpus_file))
    original = tiny_model_for(tok, arch)
    model = copy.deepcopy(original)
    cache = EditCache.for_model(original, stats_dir=stats_dir)
    if n_requests == 1:
        result = edit(model, tok, requests[0], hparams, cache=cache)
        z_infos = [result.info]
    else:
        result = edit_batch(model, tok, requests, hparams, cache=cache)
        z_infos = result.info["z_infos"]
    assert result.layers == layers
    recorded = {l: result.weight_deltas[module_name(model, l)] for l in layers}
    mom2 = cache.get_mom2(original, tok, layers, hparams)

    expected, Z, h0 = memit_expected(original, tok, requests, layers, mom2, recorded, LAMBDA)
    # The first layer's update has the form R K^T A^-1 (R fitted), and Z - h^L is the optimised delta.
    for l in layers:
        error = relative(recorded[l], expected[l])
        assert error < TOLERANCE, f"layer {l}: the update differs from Eq. 14 by {error:.2e} (relative)"
    for j, info in enumerate(z_infos):
        assert float((Z[:, j] - h0[:, j]).norm()) == pytest.approx(info["delta_norm"], rel=TOLERANCE)
        assert float(h0[:, j].norm()) == pytest.approx(info["v0_norm"], rel=1e-5)
    # After the last layer the model reaches Z as far as Eq. 14 lets it (what the library reports).
    final = torch.stack([read_at_fact_token(model, tok, r, "", layers[-1], layers[-1])[1] for r in requests], dim=1)
    assert float((Z - final).norm() / Z.norm()) == pytest.approx(result.info["z_residual_after"], rel=1e-3, abs=1e-6)

    # The same recomputation with one ingredient wrong misses by far more than the tolerance.
    wrong = {
        "lambda 10% off": dict(lam=LAMBDA * 1.1),
        "residual divided by n - i + 1": dict(divisor_shift=1),
        "keys of the bare prompt only": dict(average_keys=False),
        "keys read on the unedited model": dict(keys_on_original=True),
    }
    for what, kw in wrong.items():
        lam = kw.pop("lam", LAMBDA)
        bad, _, _ = memit_expected(original, tok, requests, layers, mom2, recorded, lam, **kw)
        worst = max(relative(recorded[l], bad[l]) for l in layers)
        assert worst > WRONG, f"{what}: a wrong recomputation agrees ({worst:.2e}): the check is blind to it"


# ---- ROME, Eq. 2 ---------------------------------------------------------------------------------

def rome_expected(W: torch.Tensor, C: torch.Tensor, k_star: torch.Tensor, k_bare: torch.Tensor,
                  delta: torch.Tensor, form: str) -> torch.Tensor:
    """dW = (v* - W k_t) (C^-1 k*)^T / ((C^-1 k*)^T k_t) of `form` (rome.py's docstring), float64."""
    u = torch.linalg.solve(C, k_star)
    k_t = k_bare if form == "released" else k_star
    v_star = W @ k_bare + delta
    return torch.outer(v_star - W @ k_t, u) / (u @ k_t)


@pytest.mark.parametrize("arch, ridge", [("gpt2", 0.0), ("gpt2", 0.05), ("llama", 0.0)])
def test_rome_update_is_eq2_for_every_update_form(arch, ridge, tok, corpus_file, stats_dir):
    layer = 2
    original = tiny_model_for(tok, arch)
    cache = EditCache.for_model(original, stats_dir=stats_dir)
    request = REQUESTS[1]
    recorded, infos = {}, {}
    for form in ("released", "r-rome"):
        hparams = ROMEHParams(layer=layer, update_form=form, mom2_ridge=ridge, context_prefixes=PREFIXES,
                              v_num_grad_steps=8, **stats_settings(corpus_file))
        result = edit(original, tok, request, hparams, copy=True, cache=cache)
        recorded[form] = result.weight_deltas[module_name(original, layer)].double()
        infos[form] = result.info
    C = cache.get_mom2(original, tok, [layer], hparams)[layer].double()
    C = C + ridge * C.diagonal().mean() * torch.eye(C.shape[0], dtype=C.dtype)
    W = out_weight(original, layer)
    k_star = averaged_key(original, tok, request, layer, [""] + PREFIXES)
    k_bare = read_at_fact_token(original, tok, request, "", layer, layer)[0]
    assert relative(k_star, k_bare) > 1e-2  # the prefixes move the averaged key: the forms differ

    # The released form maps k_bare to W k_bare + delta: delta = dW k_bare, of the norm the optimiser reports.
    delta = recorded["released"] @ k_bare
    assert float(delta.norm()) == pytest.approx(infos["released"]["delta_norm"], rel=TOLERANCE)
    for form, dW in recorded.items():
        error = relative(dW, rome_expected(W, C, k_star, k_bare, delta, form))
        assert error < TOLERANCE, f"{form}: the update differs from Eq. 2 by {error:.2e} (relative)"
        assert infos[form]["delta_norm"] == pytest.approx(infos["released"]["delta_norm"], rel=1e-6)

    # Wrong ingredients: C^-1 left out, the ridge forgotten / added, k* in the denominator, the bare key in C^-1 k.
    plain = cache.get_mom2(original, tok, [layer], hparams)[layer].double()
    eye = torch.eye(C.shape[0], dtype=C.dtype)
    u = torch.linalg.solve(C, k_star)
    wrong = {
        "C^-1 left out": rome_expected(W, eye, k_star, k_bare, delta, "released"),
        "ridge forgotten or added": rome_expected(W, plain if ridge else plain + 0.05 * plain.diagonal().mean() * eye,
                                                  k_star, k_bare, delta, "released"),
        "k* in the denominator": torch.outer(delta, u) / (u @ k_star),
        "bare key in C^-1 k": rome_expected(W, C, k_bare, k_bare, delta, "released"),
    }
    for what, bad in wrong.items():
        assert relative(recorded["released"], bad) > WRONG, f"{what}: the check is blind to it"
