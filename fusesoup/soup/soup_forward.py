"""A model that runs as the soup of its ingredients, mixing each module's weights when that module runs.

While the alphas are learned the soup's weights exist only inside the forward pass: a forward pre-hook on every module
that owns parameters mixes them from the ingredients (learn.WeightedSum, differentiable in the alphas) and a forward
hook lets go of them. A mixed tensor then lives only as long as autograd saves it for backward, and its gradient is
reduced to its alphas right after its module's backward (the WeightedSum node is created beside the module's own
ops, so autograd runs it then), instead of one mixed model and its whole gradient living at once. With `recompute`
each decoder layer is checkpointed as well: its mixed weights are dropped after the forward pass and mixed again in
backward, so learning holds one layer's mixed weights (and the embeddings and head) at a time.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
from torch.utils.checkpoint import checkpoint

from fusesoup.train.engine import decoder_layers


def owned_parameters(model: torch.nn.Module) -> list[tuple[torch.nn.Module, str, str]]:
    """(module, attribute, parameter name) for every parameter a module holds itself; a tied parameter (a head that
    shares the embedding's tensor) under the name model.named_parameters gives it, which the ingredients use."""
    names = {id(parameter): name for name, parameter in model.named_parameters()}
    return [(module, attribute, names[id(parameter)]) for module in model.modules()
            for attribute, parameter in module._parameters.items() if parameter is not None]


def checkpointed(layer: torch.nn.Module) -> None:
    """Recompute `layer` in backward (torch's non-reentrant checkpoint around its own forward, so the pre-hooks of
    the modules inside it run again and mix their weights again)."""
    forward = layer.forward
    layer.forward = lambda *args, **kwargs: checkpoint(forward, *args, use_reentrant=False, **kwargs)


@contextlib.contextmanager
def soup_forward(model: torch.nn.Module, mixed: Callable[[str], torch.Tensor], recompute: bool = False
                 ) -> Iterator[None]:
    """While active, `model` computes with `mixed(name)` as its parameter `name`, called each time the parameter's
    module runs; its own parameters are never read (they may be released). Hooks and checkpoints go on exit."""
    owned: dict[torch.nn.Module, list[tuple[str, str]]] = {}
    for module, attribute, name in owned_parameters(model):
        owned.setdefault(module, []).append((attribute, name))

    def mix_in(module, args):
        # an entry in the instance __dict__ is found before nn.Module's __getattr__ looks in _parameters
        for attribute, name in owned[module]:
            module.__dict__[attribute] = mixed(name)

    def let_go(module, args, output):
        for attribute, _ in owned[module]:
            module.__dict__.pop(attribute, None)

    handles = [hook for module in owned for hook in (module.register_forward_pre_hook(mix_in),
                                                     module.register_forward_hook(let_go))]
    layers = decoder_layers(model) if recompute else []
    for layer in layers:
        checkpointed(layer)
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
        for layer in layers:
            del layer.forward  # the class's forward again
        for module, attributes in owned.items():
            for attribute, _ in attributes:
                module.__dict__.pop(attribute, None)
