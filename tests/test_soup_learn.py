"""Soups over the ingredients' own tensors: groups, mixing (and its gradient), memory-mapped checkpoints, greedy
selection and learned alphas."""
from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from fusesoup.soup.learn import (WeightedSum, greedy_soup, group_of, groups, learn_alphas, load_mix,
                                 mapped_ingredients, members, memory_plan, mixed_tensor, model_ingredients, uniform)
from fusesoup.soup.checkpoint import SoupError


def tiny_llama(seed: int, intermediate: int = 48) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=16, intermediate_size=intermediate, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=2, vocab_size=40, max_position_embeddings=64)
    return LlamaForCausalLM(config).eval()


def test_groups_at_each_granularity():
    name = "model.layers.3.self_attn.q_proj.weight"
    assert group_of(name, "model") == "model"
    assert group_of(name, "layer") == "model.layers.3"
    assert group_of(name, "module") == "model.layers.3.self_attn.q_proj"
    assert group_of("model.layers.3.self_attn.q_proj.bias", "module") == "model.layers.3.self_attn.q_proj"
    assert group_of("model.embed_tokens.weight", "layer") == "model.embed_tokens"
    assert group_of("transformer.h.1.attn.c_attn.weight", "layer") == "transformer.h.1"
    ingredients = model_ingredients([tiny_llama(0), tiny_llama(1)], ["a", "b"])
    layer_groups = groups(ingredients, "layer")
    assert layer_groups[:3] == ["model.embed_tokens", "model.layers.0", "model.layers.1"]
    assert len(groups(ingredients, "module")) == 1 + 2 * 9 + 1 + 1  # embeddings, 9 per layer, final norm, lm_head


def mix(ingredients, alphas, granularity):
    return {name: mixed_tensor(ingredients, name, alphas, granularity, torch.float32) for name in ingredients}


def test_mix_is_the_weighted_sum_per_group_and_loads_into_a_model():
    a, b = tiny_llama(0), tiny_llama(1)
    ingredients = model_ingredients([a, b], ["a", "b"])
    alphas = {group: torch.tensor([0.25, 0.75]) for group in groups(ingredients, "module")}
    alphas["model.layers.1.mlp.down_proj"] = torch.tensor([1.0, 0.0])
    mixed = mix(ingredients, alphas, "module")
    pa, pb = dict(a.named_parameters()), dict(b.named_parameters())
    torch.testing.assert_close(mixed["model.layers.0.mlp.up_proj.weight"],
                               0.25 * pa["model.layers.0.mlp.up_proj.weight"] + 0.75 * pb["model.layers.0.mlp.up_proj.weight"])
    torch.testing.assert_close(mixed["model.layers.1.mlp.down_proj.weight"], pa["model.layers.1.mlp.down_proj.weight"])
    torch.testing.assert_close(mix(ingredients, uniform([1.0, 0.0]), "model")["lm_head.weight"], pa["lm_head.weight"])
    assert torch.equal(ingredients["lm_head.weight"][0], a.lm_head.weight)  # float32 ingredients are not mixed in place
    target = load_mix(tiny_llama(2), ingredients, uniform([0.0, 1.0]), "model")
    ids = torch.tensor([[1, 5, 7, 9]])
    torch.testing.assert_close(target(input_ids=ids).logits, b(input_ids=ids).logits)


def test_the_mix_and_its_alpha_gradient_equal_a_dense_float64_reference_for_bf16_ingredients():
    generator = torch.Generator().manual_seed(0)
    tensors = [torch.randn(64, 48, generator=generator).to(torch.bfloat16) for _ in range(3)]
    probe = torch.randn(64, 48, generator=generator, dtype=torch.float64)
    alphas = torch.tensor([0.2, 0.5, 0.3], requires_grad=True)
    mixed = WeightedSum.apply(alphas, *tensors)
    assert mixed.dtype == torch.float32
    (mixed.double() * probe).sum().backward()
    dense = torch.tensor([0.2, 0.5, 0.3], dtype=torch.float64, requires_grad=True)
    reference = torch.tensordot(dense, torch.stack([t.double() for t in tensors]), dims=1)
    (reference * probe).sum().backward()
    torch.testing.assert_close(mixed.double(), reference.detach(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(alphas.grad.double(), dense.grad, rtol=1e-5, atol=1e-4)


def test_different_shapes_name_the_tensor():
    with pytest.raises(ValueError, match=r"'a' and 'b' differ: tensor 'model.layers.0.mlp.gate_proj.weight' has shape"):
        model_ingredients([tiny_llama(0), tiny_llama(1, intermediate=32)], ["a", "b"])


def test_checkpoints_are_mapped_in_their_stored_dtype_and_a_missing_tensor_is_named(tmp_path):
    models = [tiny_llama(seed).to(torch.bfloat16) for seed in range(3)]
    for index, model in enumerate(models):
        model.save_pretrained(tmp_path / f"m{index}")
    dirs = [tmp_path / f"m{index}" for index in range(3)]
    working = tiny_llama(9)
    ingredients = mapped_ingredients(dirs, working, torch.device("cpu"))
    assert list(ingredients) == [name for name, _ in working.named_parameters()]
    for name, tensors in ingredients.items():
        for tensor, model in zip(tensors, models):
            assert tensor.dtype == torch.bfloat16 and torch.equal(tensor, model.get_parameter(name))
    plan = memory_plan(ingredients, working, "module")
    parameters = sum(p.numel() for p in working.parameters())
    assert plan.startswith(f"soup memory plan: 3 ingredients of {parameters:,} parameters (torch.bfloat16, ")
    assert "memory-mapped from their safetensors" in plan and f"{len(groups(ingredients, 'module'))} x 3 alphas" in plan

    bigger = LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=48, num_hidden_layers=3,
                                          num_attention_heads=2, num_key_value_heads=2, vocab_size=40))
    with pytest.raises(SoupError, match=r"parameter model\.layers\.2\.self_attn\.q_proj\.weight of the "
                                        r"LlamaForCausalLM is not in .*m0's safetensors"):
        mapped_ingredients(dirs, bigger, torch.device("cpu"))


def test_greedy_soup_keeps_only_ingredients_that_improve_the_score():
    values = [0.0, 1.0, 10.0]  # three ingredients of one scalar parameter
    score = lambda weights: abs(sum(w * v for w, v in zip(weights, values)) - 0.4)  # noqa: E731  best: close to 0.4
    weights, best = greedy_soup([0.4, 0.6, 9.6], score)
    assert weights == [0.5, 0.5, 0.0]  # 0 and 1 average to 0.5 (0.1 from target); adding 10 makes it worse
    assert best == pytest.approx(0.1)
    assert members([2], 3) == [0.0, 0.0, 1.0]


def test_learned_alphas_lower_the_loss_and_l1_holds_them_near_uniform():
    models = [tiny_llama(seed) for seed in range(3)]
    ingredients = model_ingredients(models, ["a", "b", "c"])
    torch.manual_seed(5)
    ids = torch.randint(0, 40, (4, 12))
    batches = [(ids, torch.ones_like(ids))]
    free = learn_alphas(tiny_llama(9), ingredients, batches, "module", l1=0.0, steps=25, lr=0.1)
    assert free.log[-1]["loss"] < free.log[0]["loss"] - 0.01
    pulled = learn_alphas(tiny_llama(9), ingredients, batches, "module", l1=100.0, steps=25, lr=0.1)
    spread = lambda soup: max(abs(a - 1 / 3) for alpha in soup.alphas.values() for a in alpha)  # noqa: E731
    assert spread(pulled) < 0.25 * spread(free)
    for alpha in free.alphas.values():
        assert sum(alpha) == pytest.approx(1.0, abs=1e-5) and min(alpha) >= 0
