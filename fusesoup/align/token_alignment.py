"""Alignments between two tokenizations of one text: FuseLLM's DTW, computed fast, and exact byte-offset spans.

- `dtw_align` gives exactly the warping path of FuseLLM's pure-Python DTW (cost = Levenshtein distance of the two
  tokens' byte strings): all distinct token pairs at once in numpy, then the O(N*M) DP compiled with numba.
- `offset_align` is the alignment tokenkit uses: the minimal spans where both tokenizations cut the text at the same
  byte offset, in one linear pass, so one-to-many and many-to-one spans come out exactly.
"""
from __future__ import annotations

from collections.abc import Sequence
from itertools import accumulate

import numba
import numpy as np

from fusesoup.align.edit_distance import PaddedBytes, pairwise_edit_distances


def dtw_align(source: Sequence[bytes], target: Sequence[bytes]) -> list[tuple[int, int]]:
    """The DTW warping path from (0, 0) to (len(source) - 1, len(target) - 1) as (source index, target index) pairs.

    Semantics of FuseLLM's `dtw(blending_tokens, base_tokens)`: acc[i, j] = cost(i, j) + min(acc[i-1, j-1],
    acc[i-1, j], acc[i, j-1]), and the path is traced back from the end, moving at each cell to the predecessor with
    the smallest acc; on ties the diagonal (i-1, j-1) wins, then (i-1, j) (a source step), then (i, j-1).
    Memory: one int32 per cell, 16 MiB for 2048 x 2048. The DP and the traceback are compiled with numba (cached).
    """
    if not source or not target:
        raise ValueError("DTW needs two non-empty token sequences")
    source_ids, source_tokens = _distinct(source)
    target_ids, target_tokens = _distinct(target)
    costs = pairwise_edit_distances(PaddedBytes.of(source_tokens), PaddedBytes.of(target_tokens))
    # int32 whenever no path can overflow it (half the memory traffic of int64), which is any realistic pair.
    fits = int(costs.max()) * (len(source) + len(target)) < np.iinfo(np.int32).max
    cost_rows = costs.take(target_ids, axis=1).astype(np.int32 if fits else np.int64)
    return list(map(tuple, _warping_path(cost_rows, source_ids).tolist()))


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


@numba.njit(cache=True, nogil=True)
def _warping_path(cost_rows: np.ndarray, row_ids: np.ndarray) -> np.ndarray:
    """(path length, 2) int64 (source index, target index) path, compiled: accumulated costs, then the traceback.

    `cost_rows[s, j]` is the cost of the source's distinct token s against target token j; `row_ids` are the source's
    tokens as distinct ids. Traced back from the last cell: diagonal, then (i-1, j), then (i, j-1) on ties; straight
    along an edge.
    """
    n, m = len(row_ids), cost_rows.shape[1]
    acc = np.empty((n, m), cost_rows.dtype)
    acc[0] = np.cumsum(cost_rows[row_ids[0]])
    for i in range(1, n):
        costs, above = cost_rows[row_ids[i]], acc[i - 1]
        left = above[0] + costs[0]
        acc[i, 0] = left
        for j in range(1, m):
            left = min(above[j - 1], above[j], left) + costs[j]
            acc[i, j] = left
    path = np.empty((n + m - 1, 2), np.int64)
    i, j, length = n - 1, m - 1, 0
    while True:
        path[length] = i, j
        length += 1
        if i == 0 and j == 0:
            break
        if i == 0:
            j -= 1
        elif j == 0:
            i -= 1
        elif acc[i - 1, j - 1] <= acc[i - 1, j] and acc[i - 1, j - 1] <= acc[i, j - 1]:
            i, j = i - 1, j - 1
        elif acc[i - 1, j] <= acc[i, j - 1]:
            i -= 1
        else:
            j -= 1
    return path[:length][::-1]


GROUP_KINDS = ("one_to_one", "span")


def cost_by_group_kind(groups: Sequence[tuple[range, range]], source_ce: np.ndarray, target_ce: np.ndarray,
                       target_ends: Sequence[int]) -> np.ndarray:
    """[2, 3] float64: over the one-to-one groups, then over the spans (GROUP_KINDS), the nats the source and the
    target spend on their tokens there (per-token CE) and the bytes those groups cover. Where a source's bits-per-byte
    advantage over the target sits: FuseLLM's transfer reaches the one-to-one groups only (spans get a one-hot)."""
    bounds = np.array([(a.start, a.stop, b.start, b.stop) for a, b in groups], np.int64).reshape(-1, 4)
    source_start, source_stop, target_start, target_stop = bounds.T
    source_sums = np.concatenate([[0.0], np.cumsum(source_ce, dtype=np.float64)])
    target_sums = np.concatenate([[0.0], np.cumsum(target_ce, dtype=np.float64)])
    ends = np.concatenate([[0], np.asarray(target_ends, np.int64)])
    per_group = np.stack([source_sums[source_stop] - source_sums[source_start],
                          target_sums[target_stop] - target_sums[target_start],
                          ends[target_stop] - ends[target_start]], axis=1)
    span = (source_stop - source_start != 1) | (target_stop - target_start != 1)
    return np.stack([per_group[~span].sum(axis=0), per_group[span].sum(axis=0)])
