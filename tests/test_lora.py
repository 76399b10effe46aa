"""lora.py against hand computations on a tiny randomly initialised Llama (no downloads, CPU, seconds)."""
import os

import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from tiny import lora_parameters
from lora import (LoRALinear, adapters_disabled, add_lora, load_adapters, lora_modules, merge_adapters, save_adapters)

N_LAYERS = 2


def tiny_model(seed=0):
    """The same seed gives the same weights, so two calls are two copies of one base model."""
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=64, hidden_size=32, num_hidden_layers=N_LAYERS, num_attention_heads=4,
                         num_key_value_heads=4, intermediate_size=64, max_position_embeddings=64)
    return LlamaForCausalLM(config).eval()


def logits(model, input_ids):
    with torch.no_grad():
        return model(input_ids=input_ids).logits


def randomize_B(model, seed=1):
    """Non-zero B (training would get there), large enough that the adapters visibly move the logits."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, m in lora_modules(model):
            m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g))


@pytest.fixture
def input_ids():
    return torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(2))


def test_zero_B_gives_the_base_model_exactly(input_ids):
    model = tiny_model()
    base_logits = logits(model, input_ids)
    names = add_lora(model)
    assert len(names) == 2 * N_LAYERS and all(n.endswith(("q_proj", "v_proj")) for n in names)
    assert all(isinstance(model.get_submodule(n), LoRALinear) for n in names)
    assert torch.equal(logits(model, input_ids), base_logits)


def test_fresh_adapters_depend_on_their_seed_only():
    """The same seed gives the same starting A whatever torch's global generator did before (two runs of one
    stage start alike); another seed gives another A. A is kaiming-uniform: bound 1 / sqrt(in_features) for
    a = sqrt(5), so a uniform on [-bound, bound] with variance bound^2 / 3."""
    def fresh_A(seed, global_seed):
        model = tiny_model()
        torch.manual_seed(global_seed)
        add_lora(model, seed=seed)
        return {name: m.lora_A.detach().clone() for name, m in lora_modules(model)}
    a, b, c = fresh_A(3, 100), fresh_A(3, 200), fresh_A(4, 100)
    assert a.keys() == b.keys() == c.keys()
    for name in a:
        assert torch.equal(a[name], b[name]) and not torch.allclose(a[name], c[name])
    first = a["model.layers.0.self_attn.q_proj"]                      # [8, 32]
    assert not torch.allclose(first, a["model.layers.0.self_attn.v_proj"])   # each module its own draw
    bound = 1 / 32 ** 0.5
    values = torch.cat([t.flatten() for t in a.values()])             # 4 modules x 256 values
    assert values.abs().max() <= bound and values.abs().max() > 0.9 * bound
    assert values.var().item() == pytest.approx(bound ** 2 / 3, rel=0.15)


def test_lora_linear_matches_the_formula():
    torch.manual_seed(0)
    base = nn.Linear(8, 6, bias=True)
    layer = LoRALinear(base, rank=4, alpha=12)
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(3, 5, 8)
    W, b, A, B = base.weight, base.bias, layer.lora_A, layer.lora_B
    expected = x @ W.T + b + (12 / 4) * x @ A.T @ B.T
    assert not torch.allclose(expected, x @ W.T + b, atol=1e-2)       # the update is not negligible
    torch.testing.assert_close(layer(x), expected, atol=1e-6, rtol=1e-6)


def test_only_adapters_train(input_ids):
    model = tiny_model()
    add_lora(model)
    randomize_B(model)                          # with B = 0 the gradient of A would be exactly zero
    logits_sum = model(input_ids=input_ids).logits.sum()
    logits_sum.backward()
    for name, p in model.named_parameters():
        if name.endswith((".lora_A", ".lora_B")):
            assert p.requires_grad and p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert not p.requires_grad and p.grad is None, name
    params = lora_parameters(model)
    assert len(params) == 2 * len(lora_modules(model)) == 2 * 2 * N_LAYERS
    expected = {id(p) for n, p in model.named_parameters() if n.endswith((".lora_A", ".lora_B"))}
    assert {id(p) for p in params} == expected


def test_adapters_disabled_gives_the_base_model(input_ids):
    model = tiny_model()
    base_logits = logits(model, input_ids)
    add_lora(model)
    randomize_B(model)
    adapted_logits = logits(model, input_ids)
    assert not torch.allclose(adapted_logits, base_logits, atol=1e-3)
    with adapters_disabled(model):
        assert torch.equal(logits(model, input_ids), base_logits)
    assert all(m.enabled for _, m in lora_modules(model))
    assert torch.equal(logits(model, input_ids), adapted_logits)


def test_save_then_load_onto_a_fresh_base(input_ids, tmp_path):
    model = tiny_model()
    add_lora(model, rank=4, alpha=8)
    randomize_B(model)
    save_adapters(model, str(tmp_path), {"base_model": "tiny-llama"})
    assert sorted(os.listdir(tmp_path)) == ["adapter_config.json", "adapter_model.safetensors"]  # no .tmp left

    fresh = tiny_model()
    base_logits = logits(fresh, input_ids)
    config = load_adapters(fresh, str(tmp_path))
    assert config == {"base_model": "tiny-llama", "rank": 4, "alpha": 8, "dropout": 0.0,
                      "targets": ["q_proj", "v_proj"]}
    assert all(m.rank == 4 and m.scaling == 2.0 for _, m in lora_modules(fresh))
    loaded_logits = logits(fresh, input_ids)
    assert not torch.allclose(loaded_logits, base_logits, atol=1e-3)
    assert torch.equal(loaded_logits, logits(model, input_ids))


def test_load_is_strict(tmp_path):
    model = tiny_model()
    add_lora(model)
    save_adapters(model, str(tmp_path))
    path = os.path.join(tmp_path, "adapter_model.safetensors")
    tensors = load_file(path)
    tensors.pop("model.layers.1.self_attn.v_proj.lora_B")
    save_file(tensors, path)
    with pytest.raises(ValueError, match="adapter_model.safetensors.*v_proj.lora_B"):
        load_adapters(tiny_model(), str(tmp_path))

    # Rank 1 onto rank-8 adapters: copy_ alone would broadcast lora_A [1, in] into [8, in] without an error.
    rank1 = tiny_model()
    add_lora(rank1, rank=1, alpha=2)
    save_adapters(rank1, str(tmp_path))
    rank8 = tiny_model()
    add_lora(rank8)
    with pytest.raises(ValueError, match="adapter_model.safetensors.*lora_A has shape"):
        load_adapters(rank8, str(tmp_path))


def test_merge_then_save_pretrained_is_a_plain_checkpoint(input_ids, tmp_path):
    model = tiny_model()
    add_lora(model)
    randomize_B(model)
    adapted_logits = logits(model, input_ids)
    merge_adapters(model)
    assert not lora_modules(model)
    assert all(not n.endswith((".lora_A", ".lora_B", ".base.weight")) for n, _ in model.named_parameters())
    torch.testing.assert_close(logits(model, input_ids), adapted_logits, atol=1e-5, rtol=0)

    model.save_pretrained(tmp_path)
    reloaded, info = AutoModelForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert not any(isinstance(m, LoRALinear) for m in reloaded.modules())
    torch.testing.assert_close(logits(reloaded.eval(), input_ids), adapted_logits, atol=1e-5, rtol=0)


def test_no_match_names_the_targets():
    model = tiny_model()
    with pytest.raises(ValueError, match=r"query_key_value.*q_proj"):
        add_lora(model, targets=("query_key_value",))
    # Failing leaves the model as it was: nothing wrapped, nothing frozen.
    assert not lora_modules(model) and all(p.requires_grad for p in model.parameters())
