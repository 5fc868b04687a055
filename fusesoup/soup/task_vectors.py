"""Merges relative to a base model, under mergekit's names and parameters (merge_method task_arithmetic / ties).

Each ingredient i other than the base gives a task vector delta_i = theta_i - theta_base and a weight w_i:
- task arithmetic (Ilharco et al. 2023): theta = base + lambda * sum_i w_i delta_i (divided by sum_i w_i when
  normalize);
- TIES (Yadav et al. 2023): each delta_i keeps its `density` share of largest magnitudes (trim); per element the
  sign of sum_i w_i delta_i is elected (>= 0: positive); the weighted deltas agreeing with it are summed and, with
  normalize (TIES's default), divided by the sum of their weights (disjoint mean); theta = base + lambda * that.
All in float32 (float64 for float64 tensors), cast back to the tensor's dtype at the end. sce.py is the third
such merge; relative.py holds them by mergekit name and streams them.
"""
from __future__ import annotations

from typing import Sequence

import torch

from fusesoup.soup.merge import DTYPES

ACCUMULATE = {stored: accumulate for stored, accumulate in DTYPES.values()}  # torch dtype -> the one sums run in


def task_deltas(base: torch.Tensor, tensors: Sequence[torch.Tensor], accumulate: torch.dtype) -> torch.Tensor:
    """[N, *shape] task vectors t_i - base in the accumulation dtype (shared by every merge relative to a base)."""
    base = base.to(accumulate)
    return torch.stack([tensor.to(accumulate) - base for tensor in tensors])


def trim(delta: torch.Tensor, density: float) -> torch.Tensor:
    """`delta` with only its max(1, int(density * numel)) largest magnitudes kept (all for density >= 1)."""
    if density >= 1:
        return delta
    if density <= 0 or delta.numel() == 0:
        return torch.zeros_like(delta)
    keep = max(1, int(density * delta.numel()))
    flat = delta.reshape(-1)
    mask = torch.zeros_like(flat)
    # among equal magnitudes (frequent for bf16 weights) torch.argsort's order decides, as in mergekit's trim
    mask[torch.argsort(flat.abs(), descending=True)[:keep]] = 1
    return (flat * mask).reshape(delta.shape)


def task_arithmetic(base: torch.Tensor, tensors: Sequence[torch.Tensor], weights: Sequence[float],
                    lam: float = 1.0, normalize: bool = False) -> torch.Tensor:
    """base + lam * sum_i w_i (t_i - base) (over sum_i w_i when normalize), in base's dtype."""
    accumulate = ACCUMULATE[base.dtype]
    weight = torch.tensor(list(weights), dtype=accumulate).reshape(-1, *[1] * base.dim())
    mixed = (task_deltas(base, tensors, accumulate) * weight).sum(dim=0)
    if normalize:
        total = float(sum(weights))
        mixed /= total if abs(total) >= 1e-8 else 1.0
    return (base.to(accumulate) + lam * mixed).to(base.dtype)


def ties(base: torch.Tensor, tensors: Sequence[torch.Tensor], weights: Sequence[float], density: float,
         lam: float = 1.0, normalize: bool = True) -> torch.Tensor:
    """TIES-merging of `tensors` relative to `base`: trim, elect sign, disjoint (weighted) mean; in base's dtype."""
    accumulate = ACCUMULATE[base.dtype]
    deltas = torch.stack([trim(delta, density) for delta in task_deltas(base, tensors, accumulate)])
    weight = torch.tensor(list(weights), dtype=accumulate).reshape(-1, *[1] * base.dim())
    deltas *= weight
    elected = torch.where(deltas.sum(dim=0) >= 0, 1.0, -1.0).to(accumulate)
    agree = (deltas.sign() == elected).to(accumulate)
    mixed = (deltas * agree).sum(dim=0)
    if normalize:
        divisor = (weight * agree).sum(dim=0)
        mixed /= torch.where(divisor == 0, torch.ones_like(divisor), divisor)
    return (base.to(accumulate) + lam * mixed).to(base.dtype)
