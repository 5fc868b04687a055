"""A teacher's stored top-k distributions moved onto the target's tokens and vocabulary, one sequence at a time.

Convention (as in the logit store): row i is the distribution over the token AT position i given the tokens
before it, so a target row that cannot take a teacher's distribution falls back to a one-hot on target token i
itself, the token that row predicts (FuseLLM's reference puts it on the token before: issue #27 there).

Rules per alignment group (from `offset_align` or a DTW path):
- one teacher token <-> one target token: the teacher's top-k ids go through the vocabulary map, ids that map to
  the same target id are merged (probabilities added), unmapped ids (-1) dropped, the rest renormalised;
- one teacher token -> several target tokens, or several -> one: one-hot on each target token. The teacher's CE
  is carried so that sums are kept: a span's CE (the teacher's cost of producing those bytes) is split evenly
  over its target positions, so per-sequence CE compares across teachers and per-token CE stays usable.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

from fusesoup.logits.codec import SequenceLogits

EXACT, MAPPED, FALLBACK = 0, 1, 2  # status of a target position: same bytes, agreed through the vocab map, one-hot


class AlignedSequence(NamedTuple):
    """A teacher's distributions on the target's n tokens; k = the teacher's top-k."""

    topk_ids: np.ndarray  # [n, k] target ids, most likely first, -1 padding
    topk_logprobs: np.ndarray  # [n, k] log-probs renormalised over the kept entries, -inf padding
    ce: np.ndarray  # [n] float32: the teacher's cross-entropy carried onto target positions
    status: np.ndarray  # [n] uint8: EXACT, MAPPED or FALLBACK


def translate_row(ids: np.ndarray, logprobs: np.ndarray, vocab_map: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """One teacher top-k row in target ids: mapped, duplicates merged, renormalised, sorted, padded to k.

    Returns empty-padded rows (all -1) when no id maps.
    """
    mapped = vocab_map[ids]
    keep = mapped >= 0
    out_ids = np.full(k, -1, dtype=np.int64)
    out_logprobs = np.full(k, -np.inf, dtype=np.float32)
    if not keep.any():
        return out_ids, out_logprobs
    unique, first, inverse = np.unique(mapped[keep], return_index=True, return_inverse=True)
    probabilities = np.zeros(len(unique))
    np.add.at(probabilities, inverse, np.exp(logprobs[keep].astype(np.float64)))
    order = np.lexsort((first, -probabilities))  # most likely first; ties keep the teacher's order
    out_ids[: len(unique)] = unique[order]
    out_logprobs[: len(unique)] = np.log(probabilities[order] / probabilities.sum())
    return out_ids, out_logprobs


def _one_hot(result: AlignedSequence, position: int, token: int) -> None:
    result.topk_ids[position] = -1
    result.topk_logprobs[position] = -np.inf
    result.topk_ids[position, 0] = token
    result.topk_logprobs[position, 0] = 0.0
    result.status[position] = FALLBACK


def _empty(n: int, k: int) -> AlignedSequence:
    return AlignedSequence(np.full((n, k), -1, np.int64), np.full((n, k), -np.inf, np.float32),
                           np.zeros(n, np.float32), np.zeros(n, np.uint8))


def transfer_groups(groups: Sequence[tuple[range, range]], teacher: SequenceLogits, target_ids: np.ndarray,
                    vocab_map: np.ndarray, agree: np.ndarray) -> AlignedSequence:
    """Apply the rules above to alignment groups (teacher token range, target token range).

    `agree[j]` says whether teacher token j, when it is alone in its group opposite a single target token, stands
    for that target token (EXACT if the bytes are equal, MAPPED if only through the vocabulary map, -1 if not):
    a disagreeing one-to-one pair falls back to a one-hot too.
    """
    n, k = len(target_ids), teacher.topk_ids.shape[1]
    result = _empty(n, k)
    for teacher_range, target_range in groups:
        span_ce = float(teacher.ce[teacher_range.start : teacher_range.stop].sum())
        for i in target_range:
            result.ce[i] = span_ce / len(target_range)
        if len(teacher_range) == 1 and len(target_range) == 1 and agree[teacher_range.start] >= 0:
            j, i = teacher_range.start, target_range.start
            ids, logprobs = translate_row(teacher.topk_ids[j], teacher.topk_logprobs[j], vocab_map, k)
            if ids[0] >= 0:
                result.topk_ids[i], result.topk_logprobs[i] = ids, logprobs
                result.status[i] = agree[j]
                continue
        for i in target_range:
            _one_hot(result, i, int(target_ids[i]))
    return result


def groups_from_path(path: Sequence[tuple[int, int]]) -> list[tuple[range, range]]:
    """DTW path pairs (teacher j, target i) -> groups: connected runs where a token repeats on either side."""
    groups: list[tuple[range, range]] = []
    for j, i in path:
        if groups:
            last_teacher, last_target = groups[-1]
            if j == last_teacher.stop - 1 or i == last_target.stop - 1:
                groups[-1] = (range(last_teacher.start, j + 1), range(last_target.start, i + 1))
                continue
        groups.append((range(j, j + 1), range(i, i + 1)))
    return groups


def agreement(teacher_ids: np.ndarray, teacher_bytes: Sequence[bytes], target_bytes: Sequence[bytes],
              target_ids: np.ndarray, vocab_map: np.ndarray, groups: Sequence[tuple[range, range]]) -> np.ndarray:
    """Per teacher token: EXACT / MAPPED if it stands for the target token opposite it in a one-to-one group, else -1."""
    agree = np.full(len(teacher_ids), -1, dtype=np.int8)
    for teacher_range, target_range in groups:
        if len(teacher_range) == 1 and len(target_range) == 1:
            j, i = teacher_range.start, target_range.start
            if teacher_bytes[j] == target_bytes[i]:
                agree[j] = EXACT
            elif vocab_map[teacher_ids[j]] == target_ids[i]:
                agree[j] = MAPPED
    return agree
