"""Alignments between two tokenizations of one text: FuseLLM's DTW, computed fast, and exact byte-offset spans.

- `dtw_align` gives exactly the warping path of FuseLLM's pure-Python DTW (cost = Levenshtein distance of the two
  tokens' byte strings) in numpy: all distinct token pairs at once, then one vectorised row per source token.
- `offset_align` is the alignment tokenkit uses: the minimal spans where both tokenizations cut the text at the same
  byte offset, in one linear pass, so one-to-many and many-to-one spans come out exactly.
"""
from __future__ import annotations

from collections.abc import Sequence
from itertools import accumulate

import numpy as np

from fusesoup.align.edit_distance import PaddedBytes, pairwise_edit_distances


def dtw_align(source: Sequence[bytes], target: Sequence[bytes]) -> list[tuple[int, int]]:
    """The DTW warping path from (0, 0) to (len(source) - 1, len(target) - 1) as (source index, target index) pairs.

    Semantics of FuseLLM's `dtw(blending_tokens, base_tokens)`: acc[i, j] = cost(i, j) + min(acc[i-1, j-1],
    acc[i-1, j], acc[i, j-1]), and the path is traced back from the end, moving at each cell to the predecessor with
    the smallest acc; on ties the diagonal (i-1, j-1) wins, then (i-1, j) (a source step), then (i, j-1).
    Memory: one int64 per cell, 32 MiB for 2048 x 2048.
    """
    if not source or not target:
        raise ValueError("DTW needs two non-empty token sequences")
    source_ids, source_tokens = _distinct(source)
    target_ids, target_tokens = _distinct(target)
    costs = pairwise_edit_distances(PaddedBytes.of(source_tokens), PaddedBytes.of(target_tokens))
    if len(source) <= len(target):
        return _warping_path(_accumulated_costs(costs.take(target_ids, axis=1), source_ids))
    # The recurrence is symmetric: fewer, longer rows are cheaper (numpy's per-call cost dominates a row).
    return _warping_path(_accumulated_costs(costs.T.take(source_ids, axis=1), target_ids).T)


def offset_align(source_ends: Sequence[int], target_ends: Sequence[int]) -> list[tuple[range, range]]:
    """The minimal groups (source token range, target token range) that end at the same byte offset, in order.

    `*_ends` are each token's cumulative byte end offset over the same text (see `byte_ends`). A group with one token
    on each side is a one-to-one match; the others are one-to-many or many-to-one spans. A token of no bytes (a
    lone prepended `▁` after `text_token_bytes`) joins the group that follows it, or the last group at the end.
    Raises ValueError if the two tokenizations do not cover the same number of bytes.
    """
    source_ends, target_ends = np.asarray(source_ends).tolist(), np.asarray(target_ends).tolist()
    if not source_ends or not target_ends or source_ends[-1] != target_ends[-1]:
        raise ValueError("both tokenizations must be non-empty and end at the same byte offset")
    groups: list[tuple[range, range]] = []
    source_start = target_start = i = j = 0
    while i < len(source_ends) and j < len(target_ends):
        if source_ends[i] < target_ends[j]:
            i += 1
        elif target_ends[j] < source_ends[i]:
            j += 1
        else:
            i, j = i + 1, j + 1
            groups.append((range(source_start, i), range(target_start, j)))
            source_start, target_start = i, j
    last_source, last_target = groups[-1]
    groups[-1] = (range(last_source.start, len(source_ends)), range(last_target.start, len(target_ends)))
    return groups


def byte_ends(pieces: Sequence[bytes]) -> list[int]:
    """Cumulative byte end offset of each token, from the tokens' byte strings."""
    return list(accumulate(map(len, pieces)))


def _distinct(tokens: Sequence[bytes]) -> tuple[np.ndarray, list[bytes]]:
    """(index of each token in the distinct list, the distinct tokens in order of first appearance)."""
    index: dict[bytes, int] = {}
    ids = np.fromiter((index.setdefault(token, len(index)) for token in tokens), np.int64, len(tokens))
    return ids, list(index)


def _accumulated_costs(cost_rows: np.ndarray, row_ids: np.ndarray) -> np.ndarray:
    """DTW's accumulated cost matrix, one numpy row per token of the first sequence.

    `cost_rows[s]` holds the costs of the first sequence's distinct token s against the second sequence. With P the
    prefix sums of row i's costs, acc[i, j] = min over k <= j of (via[k] + P[j] - P[k]), where via[k] = cost(i, k) +
    min(acc[i-1, k], acc[i-1, k-1]) enters row i from above: a running minimum of via - P, plus P. All integer: exact.
    """
    prefix = np.cumsum(cost_rows, axis=1)
    via_offset = cost_rows - prefix
    # int64: numpy's running minimum is 4x faster on it than on int32. Column 0 is an infinite border, so that
    # min(acc[i-1, k], acc[i-1, k-1]) needs no special case at k = 0.
    acc = np.empty((len(row_ids), cost_rows.shape[1] + 1), np.int64)
    acc[:, 0] = np.iinfo(np.int64).max // 2
    acc[0, 1:] = prefix[row_ids[0]]
    via = np.empty(cost_rows.shape[1], np.int64)
    for i, token in enumerate(row_ids[1:].tolist(), start=1):
        above, row = acc[i - 1], acc[i, 1:]
        np.minimum(above[1:], above[:-1], out=via)
        via += via_offset[token]
        np.minimum.accumulate(via, out=row)
        row += prefix[token]
    return acc[:, 1:]


def _warping_path(acc: np.ndarray) -> list[tuple[int, int]]:
    """Trace back from the last cell: diagonal, then (i-1, j), then (i, j-1) on ties; straight along an edge."""
    i, j = acc.shape[0] - 1, acc.shape[1] - 1
    path = [(i, j)]
    value = acc.item
    while i and j:
        diagonal, up, left = value(i - 1, j - 1), value(i - 1, j), value(i, j - 1)
        if diagonal <= up and diagonal <= left:
            i, j = i - 1, j - 1
        elif up <= left:
            i -= 1
        else:
            j -= 1
        path.append((i, j))
    path.extend((k, 0) for k in range(i - 1, -1, -1))
    path.extend((0, k) for k in range(j - 1, -1, -1))
    path.reverse()
    return path
