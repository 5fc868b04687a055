"""Sparse next-token distributions on the target's vocabulary, one row per target position, and their stored form.

A `SparseRows` is CSR: position i owns entries offsets[i]:offsets[i+1] of `ids` / `logprobs`, most likely first,
with log-probs normalised over the row's entries, or (a store that keeps the tail, align.tail) summing to at most 1:
the rest is the teacher's mass beyond its top k, one more outcome for the loss (train/loss.py). The aligned stores (align@<teacher>) and the fused store (fuse)
keep sequences of these rows; `merge_entries` is the one routine that builds them from loose (row, id, prob)
entries, merging duplicate ids, so translation through a vocabulary map and mixing of sources agree on ties.

Stored columns (per sequence): `counts` (entries per position, uint8: 1..255), `ids` (smallest unsigned type
for the vocabulary) and `codes`: each log-prob as round(-logprob / LOGPROB_STEP) clipped to 0..255, delta-coded
within its row as in codec.py (first entry absolute), so decoding is exact to LOGPROB_STEP / 2.
"""
from __future__ import annotations

from typing import NamedTuple, Sequence

import numpy as np

from fusesoup.logits.codec import LOGPROB_STEP, id_dtype

SPARSE_CODEC = "sparse-uint8-delta-v1"
MAX_ENTRIES = 255  # per position: counts are uint8
NO_RANKS = 255  # rank code of a position without a teacher row to match by rank


class SparseRows(NamedTuple):
    """n rows of a sparse distribution: entries offsets[i]:offsets[i + 1] belong to row i, most likely first."""

    offsets: np.ndarray  # [n + 1] int64
    ids: np.ndarray  # [nnz] int64
    logprobs: np.ndarray  # [nnz] float32, each row's entries sum to probability 1 (at most 1 with a tail)

    @property
    def counts(self) -> np.ndarray:
        return np.diff(self.offsets)

    def rows_of_entries(self) -> np.ndarray:
        """[nnz] the row of each entry."""
        return np.repeat(np.arange(len(self.offsets) - 1), self.counts)

    def take(self, rows: np.ndarray) -> "SparseRows":
        """The rows `rows` (any order, repeats allowed) as a new SparseRows, in time linear in what is taken."""
        rows = np.asarray(rows, np.int64)
        counts = self.offsets[rows + 1] - self.offsets[rows]
        offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        entries = np.repeat(self.offsets[rows] - offsets[:-1], counts) + np.arange(offsets[-1])
        return SparseRows(offsets, self.ids[entries], self.logprobs[entries])


class Chunks(NamedTuple):
    """What rides along with a sequence's fused rows for chunk likelihood matching (fusion.fuse_chunks): the chunks
    every source's tokenization cuts alike, and the fused teacher's CE of each."""

    end: np.ndarray  # [n] uint8: 1 at the last position of each chunk
    ce: np.ndarray  # [n] float: the fused teacher's CE of the position's chunk, split evenly over its positions


class RankRows(NamedTuple):
    """A teacher's top-k log-probs by rank at some positions of a sequence, for rank matching (ULD) where its
    distribution could not be moved onto the target's vocabulary (transfer.py)."""

    at: np.ndarray  # [N] int64: the positions that have one, ascending
    logprobs: np.ndarray  # [N, k] float32: most likely first, as the teacher gave them (not renormalised)

    def take(self, start: int, stop: int) -> "RankRows":
        """The rows at positions start..stop-1, renumbered from 0."""
        low, high = np.searchsorted(self.at, [start, stop])
        return RankRows(self.at[low:high] - start, self.logprobs[low:high])


def no_ranks(k: int) -> RankRows:
    return RankRows(np.zeros(0, np.int64), np.zeros((0, k), np.float32))


def concat_ranks(parts: Sequence[tuple[int, RankRows]]) -> RankRows:
    """(length, rows) of consecutive pieces -> one RankRows over all their positions."""
    starts = np.cumsum([0] + [length for length, _ in parts[:-1]])
    return RankRows(np.concatenate([np.zeros(0, np.int64)] + [r.at + s for s, (_, r) in zip(starts, parts)]),
                    np.concatenate([r.logprobs for _, r in parts]) if parts else np.zeros((0, 0), np.float32))


def encode_ranks(ranks: RankRows, n: int) -> np.ndarray:
    """RankRows of a sequence of n positions -> its stored `rank_codes`: n x k uint8, row-major, each log-prob as
    round(-logprob / LOGPROB_STEP) clipped to 0..254, NO_RANKS on every entry of a position without a row."""
    codes = np.full((n, ranks.logprobs.shape[1]), NO_RANKS, np.uint8)
    codes[ranks.at] = np.clip(np.rint(-ranks.logprobs.astype(np.float64) / LOGPROB_STEP), 0, NO_RANKS - 1)
    return codes.reshape(-1)


def decode_ranks(codes: np.ndarray, n: int) -> RankRows:
    """The inverse of `encode_ranks` (to LOGPROB_STEP / 2)."""
    codes = np.asarray(codes).reshape(n, -1) if n else np.zeros((0, 0), np.uint8)
    at = np.flatnonzero(codes[:, 0] != NO_RANKS) if codes.shape[1] else np.zeros(0, np.int64)
    return RankRows(at.astype(np.int64), (codes[at].astype(np.float32) * -LOGPROB_STEP).astype(np.float32))


def empty_rows(n: int) -> SparseRows:
    """n rows without entries (no mass: positions that are not trained on)."""
    return SparseRows(np.zeros(n + 1, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32))


def concat_rows(parts: Sequence[SparseRows]) -> SparseRows:
    """The rows of `parts`, one after the other, as one SparseRows."""
    counts = np.concatenate([part.counts for part in parts])
    return SparseRows(np.concatenate([[0], np.cumsum(counts)]).astype(np.int64),
                      np.concatenate([part.ids for part in parts]).astype(np.int64),
                      np.concatenate([part.logprobs for part in parts]).astype(np.float32))


def one_hot_rows(ids: np.ndarray) -> SparseRows:
    """Row i puts all its mass on ids[i]."""
    n = len(ids)
    return SparseRows(np.arange(n + 1, dtype=np.int64), np.asarray(ids, np.int64), np.zeros(n, np.float32))


def fill_empty_rows(rows: SparseRows, fallback_ids: np.ndarray) -> SparseRows:
    """Every row without entries becomes a one-hot on fallback_ids[row]; the other rows are kept as they are."""
    counts = rows.counts
    empty = counts == 0
    offsets = np.concatenate([[0], np.cumsum(counts + empty)]).astype(np.int64)
    ids = np.empty(offsets[-1], np.int64)
    logprobs = np.empty(offsets[-1], np.float32)
    row_of = rows.rows_of_entries()
    destination = offsets[:-1][row_of] + np.arange(len(rows.ids)) - rows.offsets[:-1][row_of]
    ids[destination], logprobs[destination] = rows.ids, rows.logprobs
    ids[offsets[:-1][empty]], logprobs[offsets[:-1][empty]] = np.asarray(fallback_ids)[empty], 0.0
    return SparseRows(offsets, ids, logprobs)


def merge_entries(rows: np.ndarray, ids: np.ndarray, probs: np.ndarray, n_rows: int, vocab_size: int,
                  max_entries: int = MAX_ENTRIES, keep_tail: bool = False) -> SparseRows:
    """Loose entries (row, id, unnormalised probability) -> SparseRows with each (row, id) once.

    Probabilities of equal (row, id) are added; each row is sorted by probability, ties kept in the order the
    entries came (so a teacher's own order decides), truncated to `max_entries` and renormalised, or with
    `keep_tail` (the probabilities are absolute) scaled down only where they sum to more than 1. Rows without
    entries come out empty (count 0): the caller decides what they fall back to.
    """
    rows, ids = np.asarray(rows, np.int64), np.asarray(ids, np.int64)
    unique, first, inverse = np.unique(rows * vocab_size + ids, return_index=True, return_inverse=True)
    sums = np.bincount(inverse, weights=np.asarray(probs, np.float64), minlength=len(unique))
    unique_rows = unique // vocab_size
    order = np.lexsort((first, -sums, unique_rows))
    unique_rows, unique_ids, sums = unique_rows[order], unique[order] % vocab_size, sums[order]
    counts = np.bincount(unique_rows, minlength=n_rows)
    rank = np.arange(len(unique_rows)) - np.repeat(np.cumsum(counts) - counts, counts)
    keep = rank < max_entries
    unique_rows, unique_ids, sums = unique_rows[keep], unique_ids[keep], sums[keep]
    totals = np.bincount(unique_rows, weights=sums, minlength=n_rows)
    if keep_tail:
        totals = np.maximum(totals, 1.0)
    counts = np.bincount(unique_rows, minlength=n_rows)
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    return SparseRows(offsets, unique_ids, np.log(sums / totals[unique_rows]).astype(np.float32))


def with_temperature(rows: SparseRows, temperature: float) -> SparseRows:
    """softmax(logprob / T) within each row: FuseLLM's softmax(logits / T), as log-probs differ from logits by a
    per-row constant."""
    if temperature == 1.0:
        return rows
    return _log_normalised(rows.offsets, rows.ids, rows.logprobs.astype(np.float64) / temperature)


def _log_normalised(offsets: np.ndarray, ids: np.ndarray, scores: np.ndarray) -> SparseRows:
    """Rows whose log-probs are `scores` shifted so that each row sums to probability 1 (a log-softmax per row)."""
    counts = np.diff(offsets)
    row_of = np.repeat(np.arange(len(counts)), counts)
    top = np.full(len(counts), -np.inf)
    np.maximum.at(top, row_of, scores)
    shifted = scores - top[row_of]
    totals = np.bincount(row_of, weights=np.exp(shifted), minlength=len(counts))
    return SparseRows(offsets, ids, (shifted - np.log(totals[row_of])).astype(np.float32))


def encode_rows(rows: SparseRows, vocab_size: int) -> dict[str, np.ndarray]:
    """SparseRows -> the `counts`, `ids`, `codes` columns of one stored sequence."""
    counts = rows.counts
    if len(counts) and (counts.min() < 1 or counts.max() > MAX_ENTRIES):
        raise ValueError(f"every position needs 1..{MAX_ENTRIES} entries, got {counts.min()}..{counts.max()}")
    if len(rows.ids) and (rows.ids.min() < 0 or rows.ids.max() >= vocab_size):
        raise ValueError(f"an id is outside the vocabulary 0..{vocab_size - 1}")
    codes = np.clip(np.rint(-rows.logprobs.astype(np.float64) / LOGPROB_STEP), 0, 255).astype(np.int64)
    starts = rows.offsets[:-1]
    # running maximum within each row (rounding may break a tie the other way): offset each row above the last
    level = np.repeat(np.arange(len(counts)) * 256, counts)
    codes = np.maximum.accumulate(codes + level) - level
    deltas = np.diff(codes, prepend=0)
    deltas[starts] = codes[starts]
    return {"counts": counts.astype(np.uint8), "ids": rows.ids.astype(id_dtype(vocab_size)),
            "codes": deltas.astype(np.uint8)}


def decode_rows(counts: np.ndarray, ids: np.ndarray, codes: np.ndarray, keep_tail: bool = False) -> SparseRows:
    """The inverse of `encode_rows`: log-probs to about LOGPROB_STEP / 2, renormalised so each row sums to 1, or
    with `keep_tail` as stored (scaled down only where rounding took a row's sum above 1)."""
    counts = np.asarray(counts, np.int64)
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    running = np.cumsum(np.asarray(codes, np.int64))
    before_row = np.concatenate([[0], running])[offsets[:-1]]
    logprobs = (running - np.repeat(before_row, counts)) * -LOGPROB_STEP
    ids = np.asarray(ids, np.int64)
    if not keep_tail:
        return _log_normalised(offsets, ids, logprobs)
    totals = np.bincount(np.repeat(np.arange(len(counts)), counts), weights=np.exp(logprobs), minlength=len(counts))
    return SparseRows(offsets, ids, (logprobs - np.repeat(np.log(np.maximum(totals, 1.0)), counts)).astype(np.float32))
