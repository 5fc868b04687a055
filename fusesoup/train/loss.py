"""FuseLLM's objective, L = lambda * L_CLM + (1 - lambda) * L_fuse (+ mu * L_chunk + nu * L_ULD), the fusion term on
the stored entries only.

The fused targets are sparse (at most a few dozen target ids per position), so the fusion loss gathers the
student's log-softmax at those ids: a [B, L, E] gather, never a [B, L, V] target tensor (FuseLLM's collator builds
a dense [B, 2048, 32000] one in a Python loop).

L_chunk (train.chunk_weight mu): approximate likelihood matching of chunks (ALM, Minixhofer et al. 2025). A chunk
is text both tokenizations cut alike (fusion.fuse_chunks), so the teacher's log-likelihood of it, t = -CE, and the
student's, s = the sum of its labels' log-probs, are probabilities of the same event, whatever the tokenizers. Each
is read as a Bernoulli exp(x / tau) (tau: train.chunk_temperature) and the loss is their KL, weighted by the chunk's
tokens: it reaches the spans where the token-level transfer falls back to a one-hot.

L_ULD (train.uld_weight nu): universal logit distillation (Boizard et al. 2024) where a teacher's row could not be
moved onto the target's vocabulary: sum over ranks r < k of |p_teacher(r) - q_student(r)|, both distributions'
probabilities sorted, so no token needs a counterpart: how sure the teacher is of what follows, not what it is.
"""
from __future__ import annotations

import math
from typing import Callable, NamedTuple

import numpy as np
import torch

from fusesoup.errors import lookup
from fusesoup.logits.sparse import RankRows, SparseRows
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


class ChunkTargets(NamedTuple):
    """The whole chunks of a batch (packing.BlockChunks of each row), numbered across the batch."""

    of: torch.Tensor  # [B, L] int64: each label's chunk, -1 where it has none (and on padding)
    ce: torch.Tensor  # [C] float32: the teacher's CE of each chunk


def pad_chunks(chunk_of: list[np.ndarray], chunk_ce: list[np.ndarray], width: int) -> ChunkTargets:
    """Per row b, each label's chunk (-1: none) and the chunks' CEs (packing.BlockChunks) -> [B, width] chunk numbers
    (row b's after rows 0..b-1's) and their [C] CEs."""
    of = np.full((len(chunk_of), width), -1, np.int64)
    first = 0
    for b, (row, ce) in enumerate(zip(chunk_of, chunk_ce, strict=True)):
        of[b, : len(row)] = np.where(row >= 0, row + first, -1)
        first += len(ce)
    ce = np.concatenate([np.zeros(0), *chunk_ce]).astype(np.float32)
    return ChunkTargets(torch.from_numpy(of), torch.from_numpy(ce))


class RankTargets(NamedTuple):
    """The rank rows of a batch (packing.TrainBlock.ranks of each row)."""

    rows: torch.Tensor  # [N] int64: the flat index b * width + j of each label with a rank row
    logprobs: torch.Tensor  # [N, k] float32: the teacher's top-k log-probs, most likely first


def pad_ranks(ranks: list[RankRows], width: int) -> RankTargets:
    """Per row b, its rank rows -> their flat label indices in a [B, width] batch and their log-probs."""
    rows = np.concatenate([np.zeros(0, np.int64)] + [b * width + r.at for b, r in enumerate(ranks)])
    return RankTargets(torch.from_numpy(rows), torch.from_numpy(np.concatenate([r.logprobs for r in ranks])))


def rank_matching_loss(log_probs: torch.Tensor, ranks: RankTargets, mask: torch.Tensor,
                       positions: float | None = None) -> torch.Tensor:
    """L_ULD (module docstring) summed over the masked-in labels with a rank row, over the masked-in positions (or
    `positions`); log_probs [B, L, V], mask [B, L]."""
    student = log_probs.flatten(0, 1)[ranks.rows]  # [N, V]
    k = min(ranks.logprobs.shape[1], student.shape[-1])
    distance = (ranks.logprobs[:, :k].exp() - student.topk(k, dim=-1).values.exp()).abs().sum(-1)  # [N]
    total = torch.where(mask.flatten()[ranks.rows], distance, torch.zeros_like(distance)).sum()
    return total / (mask.sum().clamp(min=1).to(total.dtype) if positions is None else positions)


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, accurate at both ends (log1p near -inf, expm1 near 0)."""
    return torch.where(x < -math.log(2), torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def binary_kl(log_p: torch.Tensor, log_q: torch.Tensor, floor: float = 1e-6) -> torch.Tensor:
    """KL(Bernoulli(p) || Bernoulli(q)) from log p and log q, each kept at most -floor (so 1 - p > 0)."""
    log_p, log_q = log_p.clamp(max=-floor), log_q.clamp(max=-floor)
    return log_p.exp() * (log_p - log_q) + (-torch.expm1(log_p)) * (log1mexp(log_p) - log1mexp(log_q))


def chunk_likelihood_loss(log_probs: torch.Tensor, labels: torch.Tensor, chunks: ChunkTargets, mask: torch.Tensor,
                          temperature: float = 1.0, positions: float | None = None) -> torch.Tensor:
    """L_chunk (module docstring): sum over chunks of tokens * binary_kl(-ce / tau, s / tau), over the masked-in
    positions (or `positions`). log_probs [B, L, V], labels and mask [B, L]; a chunk with a masked label is left out."""
    label_log_probs = log_probs.gather(-1, labels.unsqueeze(-1)).squeeze(-1)  # [B, L]
    index, zeros = chunks.of.clamp(min=0).flatten(), label_log_probs.new_zeros(len(chunks.ce))
    inside = (chunks.of >= 0) & mask
    student = zeros.index_add(0, index, torch.where(inside, label_log_probs, 0.0).flatten())  # [C] log q(chunk)
    tokens = zeros.index_add(0, index, inside.flatten().to(zeros.dtype))
    sizes = zeros.index_add(0, index, (chunks.of >= 0).flatten().to(zeros.dtype))
    whole = (tokens == sizes) & (tokens > 0)
    divergence = binary_kl(-chunks.ce.to(student.dtype) / temperature, student / temperature)
    total = torch.where(whole, divergence * tokens, torch.zeros_like(divergence)).sum()
    return total / (mask.sum().clamp(min=1).to(total.dtype) if positions is None else positions)


def student_log_probs(logits: torch.Tensor) -> torch.Tensor:
    """[B, L, V] float32 log-softmax of the student's logits: computed once per step, shared by both losses."""
    return torch.log_softmax(logits.float(), dim=-1)


TAIL_FLOOR = 1e-4  # a row's missing mass below this is rounding (renormalised rows sum to 1 within ~1e-6), not a tail


def tail_mass(p: torch.Tensor) -> torch.Tensor:
    """[B, L] the teacher's mass beyond each row's ids, 1 - sum_e p_e (a store that keeps the tail, align.tail; 0 for
    renormalised rows): the row's (k+1)-th outcome."""
    tail = 1 - p.sum(-1)
    return torch.where(tail > TAIL_FLOOR, tail, torch.zeros_like(tail))


def tail_outcome(log_q: torch.Tensor, p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A row's (k+1)-th outcome, everything but its ids: tail_mass(p), and the student's log-mass there,
    log(1 - sum_e q(id_e)). log_q and p [B, L, E] (padding entries have p = 0); both results [B, L]."""
    held = torch.logsumexp(log_q.masked_fill(p <= 0, float("-inf")), dim=-1)
    return tail_mass(p), log1mexp(held.clamp(max=-1e-6))


def p_log_p(p: torch.Tensor) -> torch.Tensor:
    """p log p elementwise, 0 where p = 0."""
    return p * torch.log(torch.where(p > 0, p, torch.ones_like(p)))


def soft_cross_entropy(log_q: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """`ce`: -sum_e p_e log q(id_e) - p_tail log q_tail per position (the tail term only where rows keep their tail,
    tail_outcome: a CE over k + 1 outcomes, so the student keeps the mass the teacher leaves beyond its top k);
    log_q and p [B, L, E]."""
    tail, log_q_tail = tail_outcome(log_q, p)
    return -(p * log_q).sum(-1) - tail * log_q_tail


def kl_divergence(log_q: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """`kl`: KL(p || q) per position: the cross-entropy minus the targets' entropy (same gradient, reaches 0)."""
    return soft_cross_entropy(log_q, p) + p_log_p(p).sum(-1) + p_log_p(tail_mass(p))


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
    return dense_fusion_loss(log_probs.gather(-1, targets.ids), targets.probs, mask, kind, positions)  # [B, L, E]


def dense_fusion_loss(log_q: torch.Tensor, p: torch.Tensor, mask: torch.Tensor, kind: FusionLoss = "ce",
                      positions: float | None = None) -> torch.Tensor:
    """fusion_loss against targets p given on the same last axis as the student's log_q: E gathered ids, or the whole
    vocabulary of a live teacher on the target's tokenizer (the dense ceiling: nothing lost in storage)."""
    per_position = lookup(FUSION_LOSSES, kind, "train.fusion_loss")
    return masked_mean(per_position(log_q, p), mask, positions)


def clm_loss(log_probs: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor,
             positions: float | None = None) -> torch.Tensor:
    """Mean next-token cross-entropy over masked-in positions; log_probs [B, L, V] (student_log_probs) already
    aligned with labels [B, L]."""
    per_position = torch.nn.functional.nll_loss(log_probs.flatten(0, 1), labels.flatten(), reduction="none")
    return masked_mean(per_position.view_as(labels), mask, positions)


def masked_mean(values: torch.Tensor, mask: torch.Tensor, positions: float | None) -> torch.Tensor:
    mask = mask.to(values.dtype)
    return (values * mask).sum() / (mask.sum().clamp(min=1) if positions is None else positions)
