"""The runners' contract (`editors.runners`): every runner computes what the full forward computes.

For each architecture, site and runner, deltas at two layers (two copies of the prompts) go through the
runner and through `FullForward` (the model's own forward over the whole prompts, deltas added by hooks);
the per-copy losses of Eq. 4 (`delta.copy_losses`: the NLL of target_new and the essence prompt's
log-probs) and their gradients with respect to the deltas must agree. The block runner is checked with
its plain-PyTorch blocks on both attention kernels of `fast_blocks` ("explicit", the CPU default, and
"sdpa", the GPU default) and with the blocks called as modules.
"""

from __future__ import annotations

import pytest
import torch

from tiny import make_tiny_model
from wilke_lib.arch import ModelAdapter, frozen
from wilke_lib.editors import runners as rn
from wilke_lib.editors.delta import copy_losses
from wilke_lib.hparams import ROMEHParams

PREFIXES = ["Hello there. ", "Tobin Ash was born in Oslo. ", ""]
REQUEST = {"prompt": "{} was born in", "subject": "Tobin Ash",
           "target_new": {"str": "Oslo"}, "target_true": {"str": "Rome"}}
LAYERS = [0, 2]
RUNNERS = [("prefix-kv", "auto"), ("block", "explicit"), ("block", "sdpa"), ("block", "modules")]


def losses_and_grads(model, tok, runner_name: str, attention: str, site: str):
    hparams = ROMEHParams(layer=1, context_prefixes=PREFIXES)
    adapter = ModelAdapter(model)
    modules = [adapter.mlp_out(l) if site == "mlp_out" else adapter.layer(l) for l in LAYERS]
    prompts = rn.build_prompts(tok, REQUEST, hparams, PREFIXES, torch.device("cpu"), split=runner_name != "full")
    cache = rn.prefix_cache(model, prompts)
    if attention == "modules":
        runner = rn.BlockRunner(model, prompts, cache, max_copies=len(LAYERS), fast=False)
    else:
        runner = rn.make_runner(runner_name, model, prompts, cache, modules, attention=attention)
    torch.manual_seed(0)
    delta = (0.5 * torch.randn(len(LAYERS), model.config.hidden_size)).requires_grad_(True)
    hidden = runner.patched(delta, list(range(len(LAYERS))), LAYERS)
    nll, kl_log_probs = copy_losses(model, hidden, prompts, len(LAYERS), runner.row_order == "copy-major")
    weights = torch.linspace(0.5, 1.5, kl_log_probs.shape[-1])  # every vocabulary entry reaches the gradient
    (grad,) = torch.autograd.grad(nll.sum() + (kl_log_probs.exp() * weights).sum(), delta)
    return runner, nll.detach(), kl_log_probs.detach(), grad


@pytest.mark.parametrize("site", ["mlp_out", "block"])
@pytest.mark.parametrize("arch", ["gpt2", "gptj", "llama"])
def test_every_runner_computes_the_full_forward(arch, site, tiny_tokenizer):
    model = make_tiny_model(arch, len(tiny_tokenizer), eos_token_id=tiny_tokenizer.eos_token_id,
                            pad_token_id=tiny_tokenizer.pad_token_id)
    with frozen(model):
        _, nll_ref, kl_ref, grad_ref = losses_and_grads(model, tiny_tokenizer, "full", "auto", site)
        assert grad_ref.abs().sum() > 0  # the check has something to compare
        for name, attention in RUNNERS:
            runner, nll, kl, grad = losses_and_grads(model, tiny_tokenizer, name, attention, site)
            if name == "block":  # GPT-2 and GPT-J blocks run as fast_blocks forwards unless asked not to
                fast = attention != "modules" and arch in ("gpt2", "gptj")
                assert bool(runner.fast_layers) == fast, (arch, attention)
            what = f"{arch} {site} {name} {attention}"
            torch.testing.assert_close(nll, nll_ref, rtol=1e-5, atol=1e-5, msg=what)
            torch.testing.assert_close(kl, kl_ref, rtol=1e-5, atol=1e-5, msg=what)
            torch.testing.assert_close(grad, grad_ref, rtol=1e-4, atol=1e-5, msg=what)


def test_a_perturbed_runner_fails_the_contract(tiny_tokenizer, monkeypatch):
    """The contract can fail: a block runner that drops the delta of its second copy is caught."""
    model = make_tiny_model("gpt2", len(tiny_tokenizer), eos_token_id=tiny_tokenizer.eos_token_id,
                            pad_token_id=tiny_tokenizer.pad_token_id)
    original = rn.BlockRunner.patched

    def drop_second(self, delta, active, layers):
        return original(self, delta * torch.tensor([[1.0], [0.0]]), active, layers)

    with frozen(model):
        _, nll_ref, _, _ = losses_and_grads(model, tiny_tokenizer, "full", "auto", "mlp_out")
        monkeypatch.setattr(rn.BlockRunner, "patched", drop_second)
        _, nll, _, _ = losses_and_grads(model, tiny_tokenizer, "block", "explicit", "mlp_out")
    assert torch.allclose(nll[0], nll_ref[0], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(nll[1], nll_ref[1], rtol=1e-5, atol=1e-5)


def test_unknown_runner_and_kernel_are_refused(tiny_tokenizer):
    model = make_tiny_model("gpt2", len(tiny_tokenizer), eos_token_id=tiny_tokenizer.eos_token_id,
                            pad_token_id=tiny_tokenizer.pad_token_id)
    hparams = ROMEHParams(layer=1, context_prefixes=PREFIXES)
    prompts = rn.build_prompts(tiny_tokenizer, REQUEST, hparams, PREFIXES, torch.device("cpu"))
    modules = [ModelAdapter(model).mlp_out(1)]
    with pytest.raises(ValueError, match="supported"):
        rn.make_runner("fast", model, prompts, None, modules)
    with pytest.raises(ValueError, match="split=False"):
        rn.make_runner("full", model, prompts, None, modules)
    with frozen(model), pytest.raises(ValueError, match="attention"):
        rn.make_runner("block", model, prompts, rn.prefix_cache(model, prompts), modules, attention="flash")


def test_a_fallback_reaches_the_edit_and_the_run_record(tiny_tokenizer, monkeypatch, caplog):
    """`delta_runner: prefix-cache` falls back from the block runner only on `Unsupported`, with a WARNING; the
    reason is in the edit's info and `lifelong.runner.runner_fallbacks` finds it there for the step's row."""
    from wilke_lib.editing import EditCache, edit
    from wilke_lib.lifelong.runner import runner_fallbacks

    def refuse(self, prompts, hidden):
        raise rn.Unsupported("refused by the test")

    model = make_tiny_model("gpt2", len(tiny_tokenizer), eos_token_id=tiny_tokenizer.eos_token_id,
                            pad_token_id=tiny_tokenizer.pad_token_id)
    hparams = ROMEHParams(layer=1, context_prefixes=PREFIXES, v_num_grad_steps=3)
    cache = EditCache(model_key="tiny-gpt2")
    cache.mom2[EditCache._stats_key(hparams, 1)] = torch.eye(ModelAdapter(model).d_mlp)
    monkeypatch.setattr(rn.BlockRunner, "check", refuse)
    with caplog.at_level("WARNING"):
        result = edit(model, tiny_tokenizer, REQUEST, hparams, copy=True, cache=cache)
    assert result.info["delta_runner"] == "prefix-kv"
    assert runner_fallbacks(result.info) == ["block runner unavailable (refused by the test); using 'prefix-kv'"]
    assert "refused by the test" in caplog.text
    assert runner_fallbacks({"per_request": [{"a": 1}, {"delta_runner_fallback": "x"}]}) == ["x"]
    assert runner_fallbacks({"delta_runner": "block"}) == []
