"""SCE merge relative to a base (FuseChat-2.0, arXiv 2408.07990), as mergekit's `merge_method: sce` defines it.

Per tensor, over the task vectors tau_i = theta_i - theta_base of the other ingredients (i = 1..N):
- Select: with select_topk < 1, the k = int(count_nonzero(var) * select_topk) elements of largest population
  variance across the tau_i are kept in every tau_i and the others zeroed (among equal variances torch.topk's
  choice decides, as in mergekit); select_topk >= 1 keeps every element and computes no variance;
- Calculate: w_i = mean(tau_i^2) / sum_j mean(tau_j^2) over the selected tau_i (the paper's sums of squares;
  the means only matter for the thresholds below), uniform 1/N when that sum is below 1e-6;
- Erase: per element, tau_i takes part only where its sign is the sign of sum_j tau_j (a sum >= 0 counts as
  positive, a zero element never takes part);
- merge: theta = base + sum_i w_i e_i tau_i / max(sum_i w_i e_i, 1e-6), e_i the element's Erase mask.
Unlike task_arithmetic and ties there is no per-ingredient weight and no lambda: mergekit's sce takes neither.
Computed in float32 (float64 for float64 tensors) in mergekit's order of operations (mergekit 0.1.5,
merge_methods/sce.py), so that mergekit replays it bit for bit; cast back to the tensor's dtype at the end.
"""
from __future__ import annotations

from typing import Sequence

import torch

from fusesoup.soup.task_vectors import ACCUMULATE, task_deltas

THRESHOLD = 1e-6  # mergekit's floor on the weights' sum (Calculate) and on each element's divisor (merge)


def select(deltas: torch.Tensor, select_topk: float) -> torch.Tensor:
    """0/1 mask [*shape] (deltas' dtype) of the elements whose variance across the N deltas [N, *shape] is in the
    top select_topk share (in [0, 1]) of the elements of nonzero variance (every element for select_topk >= 1)."""
    if select_topk >= 1:
        return torch.ones_like(deltas[0])
    variance = torch.var(deltas, dim=0, unbiased=False)
    keep = int(torch.count_nonzero(variance) * select_topk)
    mask = torch.zeros_like(variance)
    if keep:
        mask.view(-1)[torch.topk(variance.view(-1), k=keep, largest=True).indices] = 1
    return mask


def calculate(deltas: torch.Tensor) -> torch.Tensor:
    """[N] weights: each delta's mean square over their sum (uniform when that sum is below THRESHOLD)."""
    squares = deltas.square().reshape(deltas.shape[0], -1).mean(dim=1)
    total = torch.sum(squares).item()
    if abs(total) < THRESHOLD:
        return torch.ones_like(squares) / squares.shape[0]
    return squares / total


def erase(deltas: torch.Tensor) -> torch.Tensor:
    """Boolean [N, *shape]: where each delta's sign is the sign of the deltas' sum (>= 0: positive)."""
    elected = (deltas.sum(dim=0) >= 0).to(deltas.dtype) * 2 - 1
    return deltas.sign() == elected


def sce(base: torch.Tensor, tensors: Sequence[torch.Tensor], select_topk: float = 1.0) -> torch.Tensor:
    """SCE merge of `tensors` relative to `base` (the module docstring's four steps), in base's dtype."""
    if not tensors:
        return base
    accumulate = ACCUMULATE[base.dtype]
    deltas = task_deltas(base, tensors, accumulate)
    if select_topk < 1:
        deltas = deltas * select(deltas, select_topk).unsqueeze(0)
    agree = erase(deltas)
    weights = calculate(deltas).reshape(-1, *[1] * base.dim()) * agree
    mixed = (deltas * weights).sum(dim=0) / torch.sum(weights, dim=0).clamp(min=THRESHOLD)
    return (base.to(accumulate) + mixed).to(base.dtype)
