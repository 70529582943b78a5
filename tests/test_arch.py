"""ModelAdapter: module lookup and the (d_model, d_mlp) output-weight convention on every architecture."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    BertConfig,
    BertModel,
    GPT2Config,
    GPT2Model,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    T5Config,
    T5ForConditionalGeneration,
)

from wilke_lib.arch import SUPPORTED_MODEL_TYPES, ModelAdapter, UnsupportedArchitectureError

LAYER_KINDS = ("layer", "mlp", "attn", "mlp_in", "mlp_out")


def _bias(module: torch.nn.Module) -> torch.Tensor | float:
    bias = getattr(module, "bias", None)
    return bias if bias is not None else 0.0


def test_reports_shapes_and_arch(tiny_model):
    adapter = ModelAdapter(tiny_model)
    assert adapter.arch == tiny_model.config.model_type
    assert adapter.n_layers == 4
    assert adapter.d_model == tiny_model.config.hidden_size
    expected_d_mlp = 3 * adapter.d_model if adapter.arch == "llama" else 4 * adapter.d_model
    assert adapter.d_mlp == expected_d_mlp


def test_every_accessor_resolves(tiny_model):
    adapter = ModelAdapter(tiny_model)
    for l in range(adapter.n_layers):
        for kind in LAYER_KINDS:
            by_name = tiny_model.get_submodule(adapter.name_of(kind, l))
            assert by_name is getattr(adapter, kind)(l), (kind, l)
    assert adapter.layer(2) is tiny_model.get_submodule(adapter.name_of("layer", 2))
    assert adapter.embed is tiny_model.get_input_embeddings()
    assert adapter.unembed is tiny_model.get_output_embeddings()
    assert tiny_model.get_submodule(adapter.name_of("final_norm")) is adapter.final_norm
    assert adapter.name_of("mlp_out", 1).startswith(adapter.name_of("layer", 1) + ".")


def test_bad_layer_index_and_kind(tiny_model):
    adapter = ModelAdapter(tiny_model)
    with pytest.raises(IndexError):
        adapter.mlp_out(adapter.n_layers)
    with pytest.raises(ValueError, match="unknown module kind"):
        adapter.name_of("mlp_middle", 0)
    with pytest.raises(ValueError, match="needs a layer index"):
        adapter.name_of("mlp")


def test_out_weight_is_value_equals_weight_times_key(tiny_model):
    adapter = ModelAdapter(tiny_model)
    torch.manual_seed(0)
    for l in range(adapter.n_layers):
        weight = adapter.out_weight(l)
        assert weight.shape == (adapter.d_model, adapter.d_mlp)
        key = torch.randn(adapter.d_mlp)
        module = adapter.mlp_out(l)
        with torch.no_grad():
            value = module(key[None])[0] - _bias(module)
        torch.testing.assert_close(weight @ key, value, rtol=1e-5, atol=1e-5)


def test_out_weight_param_orientation(tiny_model):
    adapter = ModelAdapter(tiny_model)
    param, transposed = adapter.out_weight_param(1)
    assert param is adapter.mlp_out(1).weight
    assert transposed == (adapter.arch == "gpt2")  # only GPT-2's Conv1D stores [in, out]
    expected = (adapter.d_mlp, adapter.d_model) if transposed else (adapter.d_model, adapter.d_mlp)
    assert param.shape == expected


def test_add_to_out_weight_shifts_value_by_delta_times_key(tiny_model):
    adapter = ModelAdapter(tiny_model)
    module = adapter.mlp_out(2)
    torch.manual_seed(1)
    key = torch.randn(adapter.d_mlp)
    delta = torch.randn(adapter.d_model, adapter.d_mlp) * 0.1
    with torch.no_grad():
        before = module(key[None])[0].clone()
        adapter.add_to_out_weight(2, delta)
        after = module(key[None])[0]
    torch.testing.assert_close(after - before, delta @ key, rtol=1e-4, atol=1e-5)
    assert not module.weight.grad_fn  # still a leaf parameter: the edit was made under no_grad


def test_add_leaves_other_layers_untouched(tiny_model):
    adapter = ModelAdapter(tiny_model)
    others = {l: adapter.out_weight(l).clone() for l in range(adapter.n_layers) if l != 1}
    adapter.add_to_out_weight(1, torch.ones(adapter.d_model, adapter.d_mlp))
    for l, weight in others.items():
        assert torch.equal(adapter.out_weight(l), weight)


def test_set_out_weight_round_trips(tiny_model):
    adapter = ModelAdapter(tiny_model)
    new_weight = torch.arange(adapter.d_model * adapter.d_mlp, dtype=torch.float32).reshape(
        adapter.d_model, adapter.d_mlp)
    adapter.set_out_weight(0, new_weight)
    assert torch.equal(adapter.out_weight(0), new_weight)


def test_wrong_shape_is_rejected(tiny_model):
    adapter = ModelAdapter(tiny_model)
    before = adapter.out_weight(0).clone()
    with pytest.raises(ValueError, match="d_model, d_mlp"):
        adapter.add_to_out_weight(0, torch.zeros(adapter.d_mlp, adapter.d_model))
    assert torch.equal(adapter.out_weight(0), before)


def test_edits_keep_parameter_dtype(tiny_model):
    adapter = ModelAdapter(tiny_model.to(torch.bfloat16))
    adapter.add_to_out_weight(0, torch.ones(adapter.d_model, adapter.d_mlp, dtype=torch.float64))
    assert adapter.out_weight_param(0)[0].dtype == torch.bfloat16


def test_hook_on_mlp_out_sees_key_and_value(tiny_model):
    """The key is the input of mlp_out, and the MLP's output is mlp_out's output."""
    adapter = ModelAdapter(tiny_model)
    captured = {}

    def hook(module, inputs, output):
        captured["key"], captured["value"] = inputs[0].detach(), output.detach()

    handle = adapter.mlp_out(1).register_forward_hook(hook)
    try:
        hidden = torch.randn(1, 5, adapter.d_model)
        with torch.no_grad():
            mlp_output = adapter.mlp(1)(hidden)
    finally:
        handle.remove()
    assert captured["key"].shape == (1, 5, adapter.d_mlp)
    torch.testing.assert_close(mlp_output, captured["value"])
    bias = _bias(adapter.mlp_out(1))
    torch.testing.assert_close(captured["key"] @ adapter.out_weight(1).T + bias, captured["value"],
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("config_class, model_class", [(MistralConfig, MistralForCausalLM),
                                                        (Qwen2Config, Qwen2ForCausalLM)])
def test_llama_layout_families(config_class, model_class):
    config = config_class(vocab_size=50, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                          num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32)
    adapter = ModelAdapter(model_class(config))
    assert adapter.arch == "llama"
    assert adapter.out_weight(1).shape == (16, 24)
    assert adapter.mlp_gate(0) is adapter.mlp(0).gate_proj


def _assert_lists_supported(err: pytest.ExceptionInfo, model_type: str) -> None:
    message = str(err.value)
    assert model_type in message
    for supported in SUPPORTED_MODEL_TYPES:
        assert supported in message


def test_bert_is_unsupported():
    model = BertModel(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                 intermediate_size=32))
    with pytest.raises(UnsupportedArchitectureError) as err:
        ModelAdapter(model)
    assert isinstance(err.value, ValueError)
    _assert_lists_supported(err, "bert")


def test_t5_is_unsupported():
    model = T5ForConditionalGeneration(T5Config(vocab_size=50, d_model=16, d_kv=8, d_ff=32, num_layers=1,
                                                num_heads=2))
    with pytest.raises(UnsupportedArchitectureError) as err:
        ModelAdapter(model)
    _assert_lists_supported(err, "t5")


def test_base_model_without_lm_head_is_unsupported():
    model = GPT2Model(GPT2Config(vocab_size=50, n_embd=16, n_layer=1, n_head=2))
    with pytest.raises(UnsupportedArchitectureError, match="AutoModelForCausalLM"):
        ModelAdapter(model)


@pytest.mark.parametrize("model_type", ["gpt2", "gptj"])
def test_fused_activations_compute_the_same_function_and_are_removed(model_type):
    from transformers import GPTJConfig, GPTJForCausalLM, GPT2LMHeadModel
    from transformers.activations import NewGELUActivation

    from wilke_lib.arch import fused_activations

    torch.manual_seed(0)
    if model_type == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=50, n_positions=16,
                                           activation_function="gelu_new")).eval()
    else:
        model = GPTJForCausalLM(GPTJConfig(n_layer=2, n_embd=32, n_head=4, vocab_size=50, n_positions=16,
                                           rotary_dim=4, activation_function="gelu_new")).eval()
    acts = [m for m in model.modules() if type(m) is NewGELUActivation]
    assert len(acts) == 2
    ids = torch.randint(0, 50, (2, 7))
    x = torch.randn(4, 64) * 3
    with torch.no_grad():
        before = model(ids).logits
        with fused_activations(model):
            assert all("forward" in vars(m) for m in acts)
            fused_out = acts[0](x)
            during = model(ids).logits
        after = model(ids).logits
    assert all("forward" not in vars(m) for m in acts)
    torch.testing.assert_close(fused_out, NewGELUActivation.forward(acts[0], x), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(during, before, rtol=1e-5, atol=1e-5)
    assert torch.equal(after, before)


def test_fused_activations_restore_on_error():
    from transformers import GPT2LMHeadModel
    from transformers.activations import NewGELUActivation

    from wilke_lib.arch import fused_activations

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=20, n_positions=8,
                                       activation_function="gelu_new"))
    with pytest.raises(RuntimeError, match="inside"):
        with fused_activations(model):
            raise RuntimeError("inside")
    assert all("forward" not in vars(m) for m in model.modules() if type(m) is NewGELUActivation)
