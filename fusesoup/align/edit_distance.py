"""Levenshtein distances between every byte string of one list and every one of another, in numpy: the shared
kernel of the vocabulary map (one token against candidate tokens) and of DTW (every token against every token).

Myers' bit-parallel algorithm (1999, Hyyrö's formulation for whole strings) keeps the DP column of a pattern of up
to 64 bytes in two 64-bit words of vertical deltas, so a pair costs ~18 word operations per byte of its text, and
numpy runs each operation over all pairs at once. At the end, distance = text length + (+1 deltas) - (-1 deltas).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

WORD_BITS = 64
_ONE = np.uint64(1)


@dataclass(frozen=True)
class PaddedBytes:
    """Byte strings as one zero-padded (n, longest) uint8 matrix and their lengths, for vectorised gathers."""

    matrix: np.ndarray
    lengths: np.ndarray

    @classmethod
    def of(cls, strings: Sequence[bytes]) -> PaddedBytes:
        """Pack `strings`, in order."""
        lengths = np.fromiter(map(len, strings), np.int64, len(strings))
        matrix = np.zeros((len(strings), max(int(lengths.max(initial=0)), 1)), np.uint8)
        matrix[np.arange(matrix.shape[1]) < lengths[:, None]] = np.frombuffer(b"".join(strings), np.uint8)
        return cls(matrix, lengths)

    def take(self, ids: np.ndarray) -> PaddedBytes:
        """The strings at `ids`, in that order."""
        return PaddedBytes(self.matrix[ids], self.lengths[ids])

    def __len__(self) -> int:
        return len(self.lengths)


def pairwise_edit_distances(left: PaddedBytes, right: PaddedBytes) -> np.ndarray:
    """(len(left), len(right)) int64 matrix of Levenshtein distances (unit insert, delete and substitute).

    A left string of up to 64 bytes is the pattern against every right string; a longer one is the text for the right
    strings that fit a word, and the pairs where both exceed 64 bytes (rare among tokens) take a numpy row DP.
    """
    distances = np.empty((len(left), len(right)), np.int64)
    short_left, short_right = left.lengths <= WORD_BITS, right.lengths <= WORD_BITS
    long_left, long_right = np.flatnonzero(~short_left), np.flatnonzero(~short_right)
    distances[short_left] = _myers_grid(left.take(np.flatnonzero(short_left)), right)
    if len(long_left):
        short_right_ids = np.flatnonzero(short_right)
        distances[np.ix_(long_left, short_right_ids)] = _myers_grid(right.take(short_right_ids), left.take(long_left)).T
    for row in long_left:
        for column in long_right:
            distances[row, column] = _row_dp(left.matrix[row, : left.lengths[row]],
                                             right.matrix[column, : right.lengths[column]])
    return distances


def _myers_grid(patterns: PaddedBytes, texts: PaddedBytes) -> np.ndarray:
    """(len(patterns), len(texts)) distances for patterns of at most 64 bytes.

    Pairs are laid out text by text, longest text first: the pairs still running at step k are a prefix of every
    array (each step slices, nothing is compacted), and a text's pairs read one contiguous row of match masks.
    """
    n_patterns = len(patterns)
    order = np.argsort(-texts.lengths, kind="stable")
    text_len = texts.lengths[order]
    steps = int(text_len[0]) if len(order) else 0
    running_texts = len(order) - np.searchsorted(text_len[::-1], np.arange(steps), side="right")
    text_bytes = np.ascontiguousarray(texts.matrix[order, :steps].T)  # [step, text]
    masks_by_byte = np.ascontiguousarray(_match_masks(patterns).T)  # [byte, pattern]
    plus = np.full(n_patterns * len(order), np.iinfo(np.uint64).max, np.uint64)  # +1 vertical deltas, all at first
    minus = np.zeros_like(plus)  # -1 vertical deltas
    scratch = np.empty((4, len(plus)), np.uint64)  # reused: fresh megabyte temporaries would page-fault every step
    for step, n_texts in enumerate(running_texts.tolist()):
        n = n_texts * n_patterns
        pv, mv = plus[:n], minus[:n]
        eq, xv, xh, ph = scratch[:, :n]
        np.take(masks_by_byte, text_bytes[step, :n_texts], axis=0, out=eq.reshape(n_texts, n_patterns))
        np.bitwise_or(eq, mv, out=xv)
        np.bitwise_and(eq, pv, out=xh)
        xh += pv
        xh ^= pv
        xh |= eq
        np.bitwise_or(xh, pv, out=ph)
        np.invert(ph, out=ph)
        ph |= mv
        mh = np.bitwise_and(pv, xh, out=xh)
        ph <<= _ONE
        ph |= _ONE
        mh <<= _ONE
        np.bitwise_or(xv, ph, out=pv)
        np.invert(pv, out=pv)
        pv |= mh
        np.bitwise_and(ph, xv, out=mv)
    in_pattern = np.tile(np.array([(1 << int(length)) - 1 for length in patterns.lengths], np.uint64), len(order))
    deltas = np.bitwise_count(plus & in_pattern).astype(np.int64) - np.bitwise_count(minus & in_pattern)
    distances = np.empty((n_patterns, len(order)), np.int64)
    distances[:, order] = (text_len[:, None] + deltas.reshape(len(order), n_patterns)).T
    return distances


def _match_masks(patterns: PaddedBytes) -> np.ndarray:
    """(len(patterns), 256) uint64: bit i of [p, c] is set where byte i of pattern p is c."""
    masks = np.zeros((len(patterns), 256), np.uint64)
    rows = np.arange(len(patterns))
    for position in range(int(patterns.lengths.max(initial=0))):
        inside = patterns.lengths > position
        masks[rows[inside], patterns.matrix[inside, position]] |= _ONE << np.uint64(position)
    return masks


def _row_dp(a: np.ndarray, b: np.ndarray) -> int:
    """Levenshtein distance of two long byte arrays, one DP row per byte of `b` (insertions by a running minimum)."""
    columns = np.arange(len(a) + 1)
    row = columns.copy()
    for index, byte in enumerate(b.tolist(), start=1):
        best = np.empty_like(row)
        best[0] = index
        best[1:] = np.minimum(row[:-1] + (a != byte), row[1:] + 1)
        row = np.minimum.accumulate(best - columns) + columns
    return int(row[-1])
