"""The merges relative to a base, by mergekit merge_method name (METHODS), streamed tensor by tensor.

Each method is a pure function of one tensor per ingredient (task_vectors.py: task_arithmetic, ties; sce.py: sce)
behind one interface, Merge(base, others, weights, settings): `weights` are the other ingredients' w_i and
`settings` the scalars of soup.task_vectors; each method reads only those it takes (METHODS' `takes`), so a
recipe records the neutral value (1.0) for the others.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, NamedTuple, Sequence

import torch

from fusesoup.params import TaskVectors
from fusesoup.soup.checkpoint import SoupError, TensorEntry, ingredient_indexes, read_entry
from fusesoup.soup.merge import Combine, MergeStep
from fusesoup.soup.sce import sce
from fusesoup.soup.task_vectors import task_arithmetic, ties


class Settings(NamedTuple):
    """A relative merge's scalars, under soup.task_vectors' names (mergekit's density, lambda and select_topk)."""
    density: float = 1.0
    lam: float = 1.0
    select_topk: float = 1.0


Merge = Callable[[torch.Tensor, Sequence[torch.Tensor], Sequence[float], Settings], torch.Tensor]


class Method(NamedTuple):
    merge: Merge
    takes: tuple[str, ...]  # the Settings fields it reads


METHODS: dict[str, Method] = {
    "task_arithmetic": Method(lambda base, others, weights, s: task_arithmetic(base, others, weights, s.lam),
                              ("lam",)),
    "ties": Method(lambda base, others, weights, s: ties(base, others, weights, s.density, s.lam),
                   ("density", "lam")),
    "sce": Method(lambda base, others, _weights, s: sce(base, others, s.select_topk), ("select_topk",)),
}
TASK_VECTOR_METHODS = tuple(METHODS)  # mergekit's merge_method names


def method_of(name: str) -> Method:
    if name not in METHODS:
        raise SoupError(f"merge method {name!r}: not one of {', '.join(METHODS)}")
    return METHODS[name]


def settings_for(name: str, spec: TaskVectors, lam: float) -> Settings:
    """The Settings of method `name` from soup.task_vectors with scaling `lam`: the fields it does not take at 1.0."""
    given = {"density": spec.density, "lam": lam, "select_topk": spec.select_topk}
    return Settings(**{field: given[field] for field in method_of(name).takes})


def lambdas_for(name: str, spec: TaskVectors) -> list[float]:
    """The scalings to try for method `name`: soup.task_vectors.lambdas, or [1.0] for one that takes no lambda."""
    return list(spec.lambdas) if "lam" in method_of(name).takes else [1.0]


def task_vector_combine(name: str, base: int, settings: Settings = Settings()) -> Combine:
    """merge.write_merge's `combine` for method `name` relative to ingredient `base`: each step's weights are the
    other ingredients' w_i (the base's entry is unused)."""
    merge = method_of(name).merge

    def combine(step: MergeStep, sources: Sequence[dict[str, TensorEntry]]) -> torch.Tensor:
        tensors = [read_entry(entries[step.name]) for entries in sources]
        others = [tensor for index, tensor in enumerate(tensors) if index != base]
        weights = [weight for index, weight in enumerate(step.weights) if index != base]
        return merge(tensors[base], others, weights, settings)
    return combine


def load_task_vector_merge(model: torch.nn.Module, model_dirs: Sequence[Path], name: str, weights: Sequence[float],
                           settings: Settings) -> torch.nn.Module:
    """Give `model` the merge of `model_dirs` relative to the first (task_vector_combine), one parameter at a time,
    in the model's dtype; returns it for scoring."""
    sources = ingredient_indexes(model_dirs)
    combine = task_vector_combine(name, 0, settings)
    with torch.no_grad():
        for parameter_name, parameter in model.named_parameters():
            if parameter_name not in sources[0]:
                raise SoupError(f"parameter {parameter_name} of the {type(model).__name__} is not in {model_dirs[0]}")
            step = MergeStep(parameter_name, tuple(parameter.shape), sources[0][parameter_name].dtype, tuple(weights))
            parameter.data = combine(step, sources).to(parameter.dtype)
    return model
