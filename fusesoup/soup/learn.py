"""Soups as functions of the ingredients' weights: theta = sum_i alpha_i * theta_i per group of tensors.

SoupLM's learnable soup parametrises alpha = softmax(logits) per group (one group for the whole model, one per
layer, or one per module, i.e. per linear mapping / norm of each layer) and learns the logits on a held-out split
with every ingredient frozen (the model mixes each module's weights as it runs: soup_forward). The regularised soup adds
lambda * sum |alpha - 1/N|: under softmax the L1 norm of alpha is always 1, so this project reads SoupLM's L1
penalty as a pull toward the uniform (vanilla) soup.
"""
from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NamedTuple

import torch

from fusesoup.errors import lookup
from fusesoup.params import Granularity
from fusesoup.soup.checkpoint import SoupError, ingredient_indexes, read_entry
from fusesoup.soup.soup_forward import soup_forward
from fusesoup.train.engine import decoder_layers
from fusesoup.train.loss import clm_loss, student_log_probs

_LAYER = re.compile(r"^(.*?\.(?:layers|h|blocks)\.\d+)\.")  # llama/neox `layers.N`, gpt2 `h.N`


def module_group(name: str) -> str:
    """`module`: the parameter's module (`model.layers.3.self_attn.q_proj`: weight and bias share one alpha)."""
    return name.rsplit(".", 1)[0] if name.endswith((".weight", ".bias")) else name


def layer_group(name: str) -> str:
    """`layer`: the parameter's layer (`model.layers.3`), or its module outside the layers."""
    match = _LAYER.match(name)
    return match.group(1) if match else module_group(name)


GROUPINGS: dict[Granularity, Callable[[str], str]] = {
    "model": lambda name: "model", "layer": layer_group, "module": module_group}


def group_of(name: str, granularity: Granularity) -> str:
    """The alpha group of parameter `name` at `granularity` (one alpha vector per group)."""
    return lookup(GROUPINGS, granularity, "soup.granularity")(name)


Ingredients = dict[str, tuple[torch.Tensor, ...]]  # parameter name -> every ingredient's tensor (frozen, own dtype)


def model_ingredients(models: Sequence[torch.nn.Module], names: Sequence[str]) -> Ingredients:
    """The ingredients of in-memory models: their parameters as they are (no copy, no cast). Raises ValueError naming
    the tensor and the ingredient when names or shapes differ."""
    parameters = [{name: p.detach() for name, p in model.named_parameters()} for model in models]
    reference = parameters[0]
    for name, other in zip(names[1:], parameters[1:]):
        if other.keys() != reference.keys():
            missing = sorted(reference.keys() ^ other.keys())[0]
            raise ValueError(f"ingredients {names[0]!r} and {name!r} differ: tensor {missing!r} is in only one of them")
        for tensor, value in other.items():
            if value.shape != reference[tensor].shape:
                raise ValueError(f"ingredients {names[0]!r} and {name!r} differ: tensor {tensor!r} has shape "
                                 f"{tuple(reference[tensor].shape)} vs {tuple(value.shape)}")
    return {tensor: tuple(p[tensor] for p in parameters) for tensor in reference}


def mapped_ingredients(model_dirs: Sequence[Path], model: torch.nn.Module, device: torch.device) -> Ingredients:
    """Each parameter of `model` from every ingredient's safetensors (a multimodal one's language model under the
    text names: checkpoint.ingredient_indexes), in its stored dtype: on the CPU zero-copy views
    of the files' memory maps (pages the OS reads on use and may drop, not N copies in memory), else copied to
    `device`. SoupError names a parameter that a checkpoint lacks or holds in another shape."""
    indexes = ingredient_indexes(model_dirs)
    ingredients = {}
    for name, parameter in model.named_parameters():
        tensors = []
        for directory, index in zip(model_dirs, indexes):
            if name not in index:
                raise SoupError(f"parameter {name} of the {type(model).__name__} is not in {directory}'s safetensors "
                                f"(it holds e.g. {next(iter(index))}); save the ingredient with save_pretrained")
            entry = index[name]
            if entry.shape != tuple(parameter.shape):
                raise SoupError(f"tensor {name}: shape {list(entry.shape)} in {entry.file}, but the model has "
                                f"{list(parameter.shape)}")
            tensor = read_entry(entry)
            tensors.append(tensor if device.type == "cpu" else tensor.to(device))
        ingredients[name] = tuple(tensors)
    return ingredients


class WeightedSum(torch.autograd.Function):
    """sum_i alphas[i] * tensors[i], accumulated in the alphas' dtype from tensors of any dtype, one cast of one
    tensor at a time. Backward gives d/d alphas[i] = <grad, tensors[i]> and nothing to the frozen tensors, so no
    float32 copy of any ingredient outlives the call."""

    @staticmethod
    def forward(ctx, alphas: torch.Tensor, *tensors: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(*tensors)  # references, not copies
        total = tensors[0].to(alphas.dtype, copy=True).mul_(alphas[0])
        for alpha, tensor in zip(alphas[1:], tensors[1:]):
            total.add_(tensor.to(alphas.dtype, copy=True).mul_(alpha))
        return total

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        flat, tensors = grad.reshape(-1), ctx.saved_tensors  # read once (a checkpoint's recompute yields them once)
        grads = torch.stack([torch.dot(flat, tensor.reshape(-1).to(grad.dtype)) for tensor in tensors])
        return (grads, *[None] * len(tensors))


def ingredient_count(ingredients: Ingredients) -> int:
    return len(next(iter(ingredients.values())))


def groups(ingredients: Ingredients, granularity: Granularity) -> list[str]:
    """The alpha groups of the ingredients' parameters, in parameter order."""
    return list(dict.fromkeys(group_of(name, granularity) for name in ingredients))


def mixed_tensor(ingredients: Ingredients, name: str, alphas: dict[str, torch.Tensor], granularity: Granularity,
                 dtype: torch.dtype) -> torch.Tensor:
    """Parameter `name` of the soup (differentiable in its group's alpha vector [N]), in `dtype`."""
    return WeightedSum.apply(alphas[group_of(name, granularity)], *ingredients[name]).to(dtype)


def uniform(weights: Sequence[float]) -> dict[str, torch.Tensor]:
    """One alpha vector for every tensor (the vanilla soup, a greedy soup's members, a probe point), at granularity
    `model`."""
    return {"model": torch.tensor(list(weights), dtype=torch.float32)}


def load_mix(model: torch.nn.Module, ingredients: Ingredients, alphas: dict[str, torch.Tensor],
             granularity: Granularity) -> torch.nn.Module:
    """Give `model` the soup's weights, one tensor at a time (each replaces the parameter's storage, so the model
    never holds two copies), in the model's own dtype; returns it for scoring or saving."""
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            parameter.data = mixed_tensor(ingredients, name, alphas, granularity, parameter.dtype)
    return model


def release_weights(model: torch.nn.Module) -> None:
    """Drop `model`'s own parameter storage (it only supplies the architecture and buffers while alphas are learned
    through soup_forward); load_mix gives it weights again."""
    for parameter in model.parameters():
        parameter.data = torch.empty(0, dtype=parameter.dtype, device=parameter.device)


def greedy_soup(own_scores: Sequence[float], score: Callable[[list[float]], float]) -> tuple[list[float], float]:
    """Model soups' greedy recipe: ingredients in order of their own score (lower is better, ties by position), each
    added to the uniform soup of those kept so far only if `score` (of a weight per ingredient) improves."""
    order = sorted(range(len(own_scores)), key=lambda i: (own_scores[i], i))
    kept, best = [order[0]], own_scores[order[0]]
    for candidate in order[1:]:
        trial = kept + [candidate]
        value = score(members(trial, len(own_scores)))
        if value < best:
            kept, best = trial, value
    return members(kept, len(own_scores)), best


def members(kept: Sequence[int], count: int) -> list[float]:
    """Uniform weights over the ingredients `kept`, 0 for the others."""
    return [1.0 / len(kept) if i in kept else 0.0 for i in range(count)]


class LearnedSoup(NamedTuple):
    alphas: dict[str, list[float]]  # group -> alpha per ingredient
    log: list[dict]  # per step: step, loss (valid CE in nats per token), penalty


def learn_alphas(model: torch.nn.Module, ingredients: Ingredients,
                 batches: Sequence[tuple[torch.Tensor, torch.Tensor]], granularity: Granularity, l1: float,
                 steps: int, lr: float, recompute: bool = False) -> LearnedSoup:
    """Adam on the alpha logits (zeros: the uniform soup) over `batches` of (input_ids, attention_mask) in turn,
    minimising next-token CE + l1 * sum |alpha - 1/N|. `model` supplies the architecture, buffers and compute dtype:
    its own weights are released (release_weights), and it runs as the soup (soup_forward: each module mixes its
    weights when it runs; with `recompute` each decoder layer mixes them again in backward), so memory is the
    ingredients, the mixed weights autograd keeps (all, or one layer's with `recompute`) and activations."""
    names = groups(ingredients, granularity)
    count = ingredient_count(ingredients)
    dtype = next(model.parameters()).dtype
    logits = torch.zeros(len(names), count, device=next(model.parameters()).device, requires_grad=True)
    optimizer = torch.optim.Adam([logits], lr=lr)
    model.eval().requires_grad_(False)
    release_weights(model)
    alphas: dict[str, torch.Tensor] = {}  # this step's, read by the modules as they run
    log = []
    with soup_forward(model, lambda name: mixed_tensor(ingredients, name, alphas, granularity, dtype), recompute):
        for step in range(steps):
            input_ids, mask = (tensor.to(logits.device) for tensor in batches[step % len(batches)])
            weights = logits.softmax(dim=-1)
            alphas.update(zip(names, weights))
            out = model(input_ids=input_ids, attention_mask=mask)
            loss = clm_loss(student_log_probs(out.logits[:, :-1]), input_ids[:, 1:], mask[:, 1:])
            penalty = l1 * (weights - 1.0 / count).abs().sum()
            optimizer.zero_grad(set_to_none=True)
            (loss + penalty).backward()
            optimizer.step()
            log.append({"step": step, "loss": loss.item(), "penalty": penalty.item()})
            del out, loss
    final = logits.detach().softmax(dim=-1).cpu()
    return LearnedSoup({name: final[i].tolist() for i, name in enumerate(names)}, log)


def mixed_bytes(ingredients: Ingredients, model: torch.nn.Module, recompute: bool) -> int:
    """Bytes of the mixed weights learning holds at once: the whole soup, or with `recompute` the largest decoder
    layer's plus every tensor outside the layers (embeddings, norms, head)."""
    itemsize = next(model.parameters()).dtype.itemsize
    sizes = {name: tensors[0].numel() for name, tensors in ingredients.items()}
    if not recompute:
        return sum(sizes.values()) * itemsize
    layers = set(decoder_layers(model))
    prefixes = [name + "." for name, module in model.named_modules() if module in layers]
    per_layer = [sum(size for name, size in sizes.items() if name.startswith(prefix)) for prefix in prefixes]
    outside = sum(size for name, size in sizes.items() if not name.startswith(tuple(prefixes)))
    return (max(per_layer) + outside) * itemsize


def memory_plan(ingredients: Ingredients, model: torch.nn.Module, granularity: Granularity,
                recompute: bool = False) -> str:
    """One line before the first step: where the ingredients live and what each part of a learned soup holds."""
    first = [tensors[0] for tensors in ingredients.values()]
    parameters, count = sum(t.numel() for t in first), ingredient_count(ingredients)
    stored = sum(t.numel() * t.element_size() for t in first)
    dtype = next(model.parameters()).dtype
    working = parameters * dtype.itemsize
    where = ("memory-mapped from their safetensors (read on use, not copied)" if first[0].device.type == "cpu"
             else f"copied to {first[0].device}: {count * stored / 1e9:.2f} GB")
    held = ("one decoder layer's mixed weights at a time (mixed again in backward) and those outside the layers"
            if recompute else "the whole soup's mixed weights for backward")
    return (f"soup memory plan: {count} ingredients of {parameters:,} parameters ({first[0].dtype}, "
            f"{stored / 1e9:.2f} GB each), {where}; working model {dtype} {working / 1e9:.2f} GB, released while "
            f"alphas are learned; learning holds {held} "
            f"({mixed_bytes(ingredients, model, recompute) / 1e9:.2f} GB), "
            f"{len(groups(ingredients, granularity))} x {count} alphas and one batch's activations "
            f"(for scale: {count} x float32 of one model is {count * parameters * 4 / 1e9:.2f} GB)")
