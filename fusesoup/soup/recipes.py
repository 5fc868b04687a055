"""Every soup the params ask for, one function per strategy behind one table (STRATEGIES), and the probe.

A strategy gets the Kitchen (the ingredients' names and own valid scores, and the callables that score, learn and
merge on the valid split) and returns its soups: name -> recipe. A recipe is {"granularity", "groups" (group ->
alpha per ingredient), "valid_bpb"} for a linear soup, or {"method", "base", "weights", "density", "lambda",
"select_topk", "valid_bpb"} for a merge relative to the first ingredient (mergekit's task_arithmetic, ties, sce).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import numpy as np
import torch

from fusesoup.batching import pad_batch, plan_batches
from fusesoup.params import Soup, SoupStrategy
from fusesoup.soup.checkpoint import SoupError
from fusesoup.soup.learn import LearnedSoup, greedy_soup, group_of, uniform
from fusesoup.soup.relative import TASK_VECTOR_METHODS, Settings, lambdas_for, settings_for

Batches = list[tuple[torch.Tensor, torch.Tensor]]  # (input_ids, attention_mask) of the valid split


class Kitchen(NamedTuple):
    spec: Soup
    names: list[str]  # the ingredients, in order
    own: list[float]  # each ingredient's valid bpb
    score: Callable[[dict[str, torch.Tensor], str], float]  # (alphas, granularity) -> valid bpb of that soup
    learn: Callable[[Batches, float], LearnedSoup]  # (batches, l1) -> fitted alphas (learn.learn_alphas)
    score_merge: Callable[[str, list[float], Settings], float]  # (method, weights, settings) -> valid bpb of the merge
    batches: Callable[[], Batches]  # the learning batches, made on first use and kept


def vanilla(kitchen: Kitchen) -> dict[str, dict]:
    weights = [1.0 / len(kitchen.names)] * len(kitchen.names)
    return {"soup-vanilla": {"granularity": "model", "groups": {"model": weights},
                             "valid_bpb": kitchen.score(uniform(weights), "model")}}


def greedy(kitchen: Kitchen) -> dict[str, dict]:
    weights, best = greedy_soup(kitchen.own, lambda members: kitchen.score(uniform(members), "model"))
    return {"soup-greedy": {"granularity": "model", "groups": {"model": weights}, "valid_bpb": best}}


def fitted(kitchen: Kitchen, l1: float) -> dict:
    """A learned soup's recipe: alphas fitted on the valid batches with penalty l1, scored, with its loss curve."""
    fit = kitchen.learn(kitchen.batches(), l1)
    alphas = {group: torch.tensor(alpha) for group, alpha in fit.alphas.items()}
    granularity = kitchen.spec.granularity
    return {"granularity": granularity, "groups": fit.alphas, "l1": l1,
            "valid_bpb": kitchen.score(alphas, granularity), "loss": [row["loss"] for row in fit.log]}


def learned(kitchen: Kitchen) -> dict[str, dict]:
    return {"soup-learned": fitted(kitchen, 0.0)}


def regularized(kitchen: Kitchen) -> dict[str, dict]:
    return {f"soup-l1-{lam:g}": fitted(kitchen, lam) for lam in kitchen.spec.l1}


def task_vector_merge(method: str) -> Callable[[Kitchen], dict[str, dict]]:
    """A merge relative to the first ingredient (relative.METHODS): each soup.task_vectors lambda tried (one trial
    for sce, which takes none), the best kept."""
    def merge(kitchen: Kitchen) -> dict[str, dict]:
        vectors = kitchen.spec.task_vectors
        weights = [0.0] + [vectors.weight] * (len(kitchen.names) - 1)  # the first ingredient is the base
        trials = {lam: kitchen.score_merge(method, weights, settings_for(method, vectors, lam))
                  for lam in lambdas_for(method, vectors)}
        best = min(trials, key=trials.get)
        settings = settings_for(method, vectors, best)
        return {f"soup-{method}": {"method": method, "base": kitchen.names[0], "weights": weights,
                                   "density": settings.density, "lambda": settings.lam,
                                   "select_topk": settings.select_topk, "valid_bpb": trials[best],
                                   "valid_bpb_by_lambda": trials}}
    return merge


STRATEGIES: dict[SoupStrategy, Callable[[Kitchen], dict[str, dict]]] = {
    "vanilla": vanilla, "greedy": greedy, "learned": learned, "regularized": regularized,
    **{method: task_vector_merge(method) for method in TASK_VECTOR_METHODS}}


def cook(kitchen: Kitchen) -> dict[str, dict]:
    """{"ingredients": name -> own valid bpb, "soups": name -> recipe} for soup.strategies, in STRATEGIES order."""
    soups = {}
    for name, strategy in STRATEGIES.items():
        if name in kitchen.spec.strategies:
            soups.update(strategy(kitchen))
    return {"ingredients": dict(zip(kitchen.names, kitchen.own)), "soups": soups}


def learning_batches(sequences: Sequence[Sequence[int]], pad: int, batch_tokens: int, seed: int) -> Batches:
    """The valid split's sequences in padded batches of at most batch_tokens, in a seeded order."""
    batches = [pad_batch([sequences[i] for i in batch], pad)
               for batch in plan_batches([len(s) for s in sequences], batch_tokens)]
    order = np.random.default_rng(seed).permutation(len(batches))
    return [batches[i] for i in order]


def coefficients(recipe: dict) -> Callable[[str], list[float]]:
    """tensor name -> alpha per ingredient, from a linear recipe's groups."""
    def alphas_of(tensor: str) -> list[float]:
        group = group_of(tensor, recipe["granularity"])
        if group not in recipe["groups"]:
            raise SoupError(f"tensor {tensor!r}: no learned alpha for its group {group!r} (it is not a parameter of "
                            "the loaded model)")
        return recipe["groups"][group]
    return alphas_of


def probe_rows(spec: Soup, names: list[str], load: Callable[[dict, str], object],
               valid_bpb: Callable[[], float], test_bpb: Callable[[], float]) -> list[dict]:
    """Valid and test bits per byte at soup.probe.points evenly spaced points from probe model a to model b;
    `load(alphas, granularity)` gives the working model a soup's weights, which valid_bpb() and test_bpb() score."""
    first, second = (names.index(name) for name in spec.probe.between)
    rows = []
    for alpha in np.linspace(0.0, 1.0, spec.probe.points).round(6).tolist():
        weights = [0.0] * len(names)
        weights[first], weights[second] = 1.0 - alpha, alpha
        load(uniform(weights), "model")
        rows.append({"alpha": alpha, "model_a": names[first], "model_b": names[second],
                     "valid_bpb": valid_bpb(), "test_bpb": test_bpb()})
    return rows
