"""A model run as the soup of its ingredients (soup_forward: each module mixes its weights as it runs, optionally
recomputed per layer) against a dense reference: the whole mix computed first and run through functional_call."""
from __future__ import annotations

import pytest
import torch
from torch.func import functional_call
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from fusesoup.soup.learn import (groups, learn_alphas, load_mix, memory_plan, mixed_bytes, mixed_tensor,
                                 model_ingredients, release_weights)
from fusesoup.soup.soup_forward import soup_forward


def llama(seed: int, tied: bool = False) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=40, num_hidden_layers=3,
                                        num_attention_heads=2, num_key_value_heads=1, vocab_size=48,
                                        max_position_embeddings=64, tie_word_embeddings=tied)).eval()


def gpt2(seed: int) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(n_embd=16, n_layer=2, n_head=2, vocab_size=48, n_positions=64)).eval()


BUILDERS = {"llama": llama, "llama-tied": lambda seed: llama(seed, tied=True), "gpt2": gpt2}


def loss_of(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


@pytest.mark.parametrize("architecture", sorted(BUILDERS))
@pytest.mark.parametrize("recompute", [False, True])
def test_the_soup_forward_gives_the_dense_mix_loss_and_alpha_gradients(architecture, recompute):
    build = BUILDERS[architecture]
    ingredients = model_ingredients([build(seed) for seed in range(3)], ["a", "b", "c"])
    names = groups(ingredients, "module")
    logits = torch.randn(len(names), 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    ids = torch.randint(0, 48, (2, 10), generator=torch.Generator().manual_seed(2))

    def alphas(leaf):
        return dict(zip(names, leaf.float().softmax(dim=-1)))

    dense_leaf = logits.clone().requires_grad_(True)
    dense_alphas = alphas(dense_leaf)
    weights = {name: mixed_tensor(ingredients, name, dense_alphas, "module", torch.float32) for name in ingredients}
    dense = loss_of(functional_call(build(9), weights, args=(), kwargs={"input_ids": ids}).logits, ids)
    dense.backward()

    model = build(9)
    release_weights(model)  # the soup forward never reads the model's own weights
    leaf = logits.clone().requires_grad_(True)
    current = alphas(leaf)
    with soup_forward(model, lambda name: mixed_tensor(ingredients, name, current, "module", torch.float32),
                      recompute):
        ours = loss_of(model(input_ids=ids).logits, ids)
        ours.backward()
    torch.testing.assert_close(ours, dense, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(leaf.grad, dense_leaf.grad, rtol=1e-5, atol=1e-7)
    assert leaf.grad.abs().sum() > 0

    # on exit the model is itself again: no hooks, no checkpoint wrapper, no mixed tensor left behind
    assert all(not m._forward_hooks and not m._forward_pre_hooks and "forward" not in m.__dict__
               for m in model.modules())
    load_mix(model, ingredients, dense_alphas, "module")
    torch.testing.assert_close(loss_of(model(input_ids=ids).logits, ids), dense.detach(), rtol=1e-6, atol=1e-6)


def test_learning_with_recompute_follows_the_same_alphas_and_plans_one_layer():
    ingredients = model_ingredients([llama(seed) for seed in range(3)], ["a", "b", "c"])
    ids = torch.randint(0, 48, (2, 12), generator=torch.Generator().manual_seed(3))
    batches = [(ids, torch.ones_like(ids))]
    plain = learn_alphas(llama(9), ingredients, batches, "module", l1=0.0, steps=6, lr=0.1)
    recomputed = learn_alphas(llama(9), ingredients, batches, "module", l1=0.0, steps=6, lr=0.1, recompute=True)
    assert plain.log[-1]["loss"] < plain.log[0]["loss"]
    assert [row["loss"] for row in recomputed.log] == pytest.approx([row["loss"] for row in plain.log], rel=1e-6)
    for group, alpha in plain.alphas.items():
        assert recomputed.alphas[group] == pytest.approx(alpha, abs=1e-6)

    model = llama(9)
    sizes = {name: tensors[0].numel() for name, tensors in ingredients.items()}
    layer = sum(size for name, size in sizes.items() if name.startswith("model.layers.0."))
    outside = sum(size for name, size in sizes.items() if not name.startswith("model.layers."))
    assert mixed_bytes(ingredients, model, recompute=False) == 4 * sum(sizes.values())
    assert mixed_bytes(ingredients, model, recompute=True) == 4 * (layer + outside)
    assert "one decoder layer's mixed weights at a time" in memory_plan(ingredients, model, "module", recompute=True)
