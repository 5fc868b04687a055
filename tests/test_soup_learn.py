"""Soups over stacked ingredient weights: groups, mixing, greedy selection and learned alphas."""
from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from fusesoup.soup.learn import (greedy_soup, group_of, groups, learn_alphas, load_weights, members, mix,
                                 stack_ingredients, uniform)


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
    stacked = stack_ingredients([tiny_llama(0), tiny_llama(1)], ["a", "b"])
    layer_groups = groups(stacked, "layer")
    assert layer_groups[:3] == ["model.embed_tokens", "model.layers.0", "model.layers.1"]
    assert len(groups(stacked, "module")) == 1 + 2 * 9 + 1 + 1  # embeddings, 9 per layer, final norm, lm_head


def test_mix_is_the_weighted_sum_per_group_and_loads_into_a_model():
    a, b = tiny_llama(0), tiny_llama(1)
    stacked = stack_ingredients([a, b], ["a", "b"])
    alphas = {group: torch.tensor([0.25, 0.75]) for group in groups(stacked, "module")}
    alphas["model.layers.1.mlp.down_proj"] = torch.tensor([1.0, 0.0])
    mixed = mix(stacked, alphas, "module")
    pa, pb = dict(a.named_parameters()), dict(b.named_parameters())
    torch.testing.assert_close(mixed["model.layers.0.mlp.up_proj.weight"],
                               0.25 * pa["model.layers.0.mlp.up_proj.weight"] + 0.75 * pb["model.layers.0.mlp.up_proj.weight"])
    torch.testing.assert_close(mixed["model.layers.1.mlp.down_proj.weight"], pa["model.layers.1.mlp.down_proj.weight"])
    torch.testing.assert_close(uniform(stacked, [1.0, 0.0])["lm_head.weight"], pa["lm_head.weight"])
    target = load_weights(tiny_llama(2), uniform(stacked, [0.0, 1.0]))
    ids = torch.tensor([[1, 5, 7, 9]])
    torch.testing.assert_close(target(input_ids=ids).logits, b(input_ids=ids).logits)


def test_different_shapes_name_the_tensor():
    with pytest.raises(ValueError, match=r"'a' and 'b' differ: tensor 'model.layers.0.mlp.gate_proj.weight' has shape"):
        stack_ingredients([tiny_llama(0), tiny_llama(1, intermediate=32)], ["a", "b"])


def test_greedy_soup_keeps_only_ingredients_that_improve_the_score():
    stacked = {"w": torch.tensor([[0.0], [1.0], [10.0]])}  # three ingredients of one scalar parameter
    score = lambda weights: abs(float(weights["w"][0]) - 0.4)  # noqa: E731  best soup: w close to 0.4
    weights, best = greedy_soup(stacked, [0.4, 0.6, 9.6], score)
    assert weights == [0.5, 0.5, 0.0]  # 0 and 1 average to 0.5 (0.1 from target); adding 10 makes it worse
    assert best == pytest.approx(0.1)
    assert members([2], 3) == [0.0, 0.0, 1.0]


def test_learned_alphas_lower_the_loss_and_l1_holds_them_near_uniform():
    models = [tiny_llama(seed) for seed in range(3)]
    stacked = stack_ingredients(models, ["a", "b", "c"])
    torch.manual_seed(5)
    ids = torch.randint(0, 40, (4, 12))
    batches = [(ids, torch.ones_like(ids))]
    free = learn_alphas(tiny_llama(9), stacked, batches, "module", l1=0.0, steps=25, lr=0.1)
    assert free.log[-1]["loss"] < free.log[0]["loss"] - 0.01
    pulled = learn_alphas(tiny_llama(9), stacked, batches, "module", l1=100.0, steps=25, lr=0.1)
    spread = lambda soup: max(abs(a - 1 / 3) for alpha in soup.alphas.values() for a in alpha)  # noqa: E731
    assert spread(pulled) < 0.25 * spread(free)
    for alpha in free.alphas.values():
        assert sum(alpha) == pytest.approx(1.0, abs=1e-5) and min(alpha) >= 0
