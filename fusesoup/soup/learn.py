"""Soups as functions of the ingredients' stacked weights: theta = sum_i alpha_i * theta_i per group of tensors.

SoupLM's learnable soup parametrises alpha = softmax(logits) per group (one group for the whole model, one per
layer, or one per module, i.e. per linear mapping / norm of each layer) and learns the logits on a held-out split
with every ingredient frozen (torch.func.functional_call over the mixed weights). The regularised soup adds
lambda * sum |alpha - 1/N|: under softmax the L1 norm of alpha is always 1, so this project reads SoupLM's L1
penalty as a pull toward the uniform (vanilla) soup.
"""
from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Literal, NamedTuple

import torch
from torch.func import functional_call

from fusesoup.train.loss import clm_loss, student_log_probs

Granularity = Literal["model", "layer", "module"]
_LAYER = re.compile(r"^(.*?\.(?:layers|h|blocks)\.\d+)\.")  # llama/neox `layers.N`, gpt2 `h.N`


def group_of(name: str, granularity: Granularity) -> str:
    """The alpha group of parameter `name`: `model`; its layer (`model.layers.3`, or its module outside the layers);
    or its module (`model.layers.3.self_attn.q_proj`: weight and bias share one alpha vector)."""
    if granularity == "model":
        return "model"
    module = name.rsplit(".", 1)[0] if name.endswith((".weight", ".bias")) else name
    if granularity == "layer" and (match := _LAYER.match(name)):
        return match.group(1)
    return module


def stack_ingredients(models: Sequence[torch.nn.Module], names: Sequence[str]) -> dict[str, torch.Tensor]:
    """name -> [N, *shape] float32 stack of every ingredient's parameter, detached (ingredients stay frozen).
    Raises ValueError naming the tensor and the ingredient when names or shapes differ."""
    parameters = [dict(model.named_parameters()) for model in models]
    reference = parameters[0]
    for name, other in zip(names[1:], parameters[1:]):
        if other.keys() != reference.keys():
            missing = sorted(reference.keys() ^ other.keys())[0]
            raise ValueError(f"ingredients {names[0]!r} and {name!r} differ: tensor {missing!r} is in only one of them")
        for tensor, value in other.items():
            if value.shape != reference[tensor].shape:
                raise ValueError(f"ingredients {names[0]!r} and {name!r} differ: tensor {tensor!r} has shape "
                                 f"{tuple(reference[tensor].shape)} vs {tuple(value.shape)}")
    return {tensor: torch.stack([p[tensor].detach().float() for p in parameters]) for tensor in reference}


def groups(stacked: dict[str, torch.Tensor], granularity: Granularity) -> list[str]:
    """The alpha groups of the stacked parameters, in parameter order."""
    return list(dict.fromkeys(group_of(name, granularity) for name in stacked))


def mix(stacked: dict[str, torch.Tensor], alphas: dict[str, torch.Tensor], granularity: Granularity
        ) -> dict[str, torch.Tensor]:
    """The soup's parameters: each tensor's stack contracted with its group's alpha vector [N]."""
    return {name: torch.tensordot(alphas[group_of(name, granularity)], stack, dims=1) for name, stack in stacked.items()}


def uniform(stacked: dict[str, torch.Tensor], weights: Sequence[float]) -> dict[str, torch.Tensor]:
    """One alpha vector for every tensor (the vanilla soup, a greedy soup's members, a probe point)."""
    vector = torch.tensor(list(weights), dtype=torch.float32)
    return mix(stacked, {"model": vector}, "model")


def load_weights(model: torch.nn.Module, weights: dict[str, torch.Tensor]) -> torch.nn.Module:
    """Copy `weights` into `model`'s parameters in place (so it can be scored or saved) and return it."""
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            parameter.copy_(weights[name])
    return model


def greedy_soup(stacked: dict[str, torch.Tensor], own_scores: Sequence[float],
                score: Callable[[dict[str, torch.Tensor]], float]) -> tuple[list[float], float]:
    """Model soups' greedy recipe: ingredients in order of their own score (lower is better, ties by position), each
    added to the uniform soup of those kept so far only if `score` of the result improves. (weights, its score)."""
    order = sorted(range(len(own_scores)), key=lambda i: (own_scores[i], i))
    kept, best = [order[0]], own_scores[order[0]]
    for candidate in order[1:]:
        trial = kept + [candidate]
        value = score(uniform(stacked, members(trial, len(own_scores))))
        if value < best:
            kept, best = trial, value
    return members(kept, len(own_scores)), best


def members(kept: Sequence[int], count: int) -> list[float]:
    """Uniform weights over the ingredients `kept`, 0 for the others."""
    return [1.0 / len(kept) if i in kept else 0.0 for i in range(count)]


class LearnedSoup(NamedTuple):
    alphas: dict[str, list[float]]  # group -> alpha per ingredient
    log: list[dict]  # per step: step, loss (valid CE in nats per token), penalty


def learn_alphas(model: torch.nn.Module, stacked: dict[str, torch.Tensor],
                 batches: Sequence[tuple[torch.Tensor, torch.Tensor]], granularity: Granularity, l1: float,
                 steps: int, lr: float) -> LearnedSoup:
    """Adam on the alpha logits (zeros: the uniform soup) over `batches` of (input_ids, attention_mask) in turn,
    minimising next-token CE + l1 * sum |alpha - 1/N|; `model` supplies the architecture and buffers only."""
    names = groups(stacked, granularity)
    count = next(iter(stacked.values())).shape[0]
    logits = torch.zeros(len(names), count, requires_grad=True)
    optimizer = torch.optim.Adam([logits], lr=lr)
    model.eval().requires_grad_(False)
    log = []
    for step in range(steps):
        input_ids, mask = batches[step % len(batches)]
        alphas = logits.softmax(dim=-1)
        weights = mix(stacked, dict(zip(names, alphas)), granularity)
        out = functional_call(model, weights, args=(), kwargs={"input_ids": input_ids, "attention_mask": mask})
        loss = clm_loss(student_log_probs(out.logits[:, :-1]), input_ids[:, 1:], mask[:, 1:])
        penalty = l1 * (alphas - 1.0 / count).abs().sum()
        optimizer.zero_grad(set_to_none=True)
        (loss + penalty).backward()
        optimizer.step()
        log.append({"step": step, "loss": loss.item(), "penalty": penalty.item()})
    final = logits.detach().softmax(dim=-1)
    return LearnedSoup({name: final[i].tolist() for i, name in enumerate(names)}, log)
