"""FuseLLM's objective, L = lambda * L_CLM + (1 - lambda) * L_fuse, with the fusion term on the stored entries only.

The fused targets are sparse (at most a few dozen target ids per position), so the fusion loss gathers the
student's log-softmax at those ids: a [B, L, E] gather, never a [B, L, V] target tensor (FuseLLM's collator builds
a dense [B, 2048, 32000] one in a Python loop).
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import numpy as np
import torch

from fusesoup.errors import lookup
from fusesoup.logits.sparse import SparseRows
from fusesoup.params import FusionLoss


class SparseTargets(NamedTuple):
    """Fused distributions of a batch, padded to E entries per position."""

    ids: torch.Tensor  # [B, L, E] int64 target ids (0 on padding)
    probs: torch.Tensor  # [B, L, E] float32 probabilities (0 on padding and on masked positions)


def pad_targets(rows: list[SparseRows], width: int) -> SparseTargets:
    """Per sequence b, its n_b rows -> [B, width, E] tensors; positions beyond n_b have no mass."""
    entries = max(int(r.counts.max()) for r in rows)
    ids = np.zeros((len(rows), width, entries), np.int64)
    probs = np.zeros((len(rows), width, entries), np.float32)
    for b, r in enumerate(rows):
        row_of = r.rows_of_entries()
        slot = np.arange(len(r.ids)) - r.offsets[:-1][row_of]
        ids[b, row_of, slot] = r.ids
        probs[b, row_of, slot] = np.exp(r.logprobs)
    return SparseTargets(torch.from_numpy(ids), torch.from_numpy(probs))


def student_log_probs(logits: torch.Tensor) -> torch.Tensor:
    """[B, L, V] float32 log-softmax of the student's logits: computed once per step, shared by both losses."""
    return torch.log_softmax(logits.float(), dim=-1)


def soft_cross_entropy(log_q: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """`ce`: -sum_e p_e log q(id_e) per position; log_q and p [B, L, E]."""
    return -(p * log_q).sum(-1)


def kl_divergence(log_q: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """`kl`: KL(p || q) per position: the cross-entropy minus the targets' entropy (same gradient, reaches 0)."""
    return soft_cross_entropy(log_q, p) + (p * torch.log(torch.where(p > 0, p, torch.ones_like(p)))).sum(-1)


def topk_cross_entropy(log_q: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """`topk`: -sum_e p_e log q(id_e | the row's ids), the student renormalised over the ids the targets hold.

    The stored rows are a teacher's top-k renormalised, so `ce` also teaches that nothing lies outside them and
    drains the student's tail (pure distillation, lambda 0, took the same-tokenizer oracle's student from 2.11 to
    2.45 valid code bpb); here how much mass the ids get as a whole is left to the CLM term, and a one-hot row
    (a position no teacher reaches) adds nothing."""
    held = p > 0  # padding entries (and entries that underflowed to 0) are not in the row's set
    log_set = torch.logsumexp(log_q.masked_fill(~held, float("-inf")), dim=-1, keepdim=True)
    return -(p * (log_q - log_set.clamp(min=torch.finfo(log_q.dtype).min))).sum(-1)


FUSION_LOSSES: dict[FusionLoss, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "ce": soft_cross_entropy, "kl": kl_divergence, "topk": topk_cross_entropy}


def fusion_loss(log_probs: torch.Tensor, targets: SparseTargets, mask: torch.Tensor, kind: FusionLoss = "ce",
                positions: float | None = None) -> torch.Tensor:
    """Mean over masked-in positions of FUSION_LOSSES[kind] between the fused targets and the student at their ids.
    log_probs [B, L, V] (student_log_probs), mask [B, L]. `positions` replaces the local count as the denominator
    (data parallel: the global batch's count)."""
    per_position = lookup(FUSION_LOSSES, kind, "train.fusion_loss")
    log_q = log_probs.gather(-1, targets.ids)  # [B, L, E]
    return masked_mean(per_position(log_q, targets.probs), mask, positions)


def clm_loss(log_probs: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor,
             positions: float | None = None) -> torch.Tensor:
    """Mean next-token cross-entropy over masked-in positions; log_probs [B, L, V] (student_log_probs) already
    aligned with labels [B, L]."""
    per_position = torch.nn.functional.nll_loss(log_probs.flatten(0, 1), labels.flatten(), reduction="none")
    return masked_mean(per_position.view_as(labels), mask, positions)


def masked_mean(values: torch.Tensor, mask: torch.Tensor, positions: float | None) -> torch.Tensor:
    mask = mask.to(values.dtype)
    return (values * mask).sum() / (mask.sum().clamp(min=1) if positions is None else positions)
