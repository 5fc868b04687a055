"""Fusing the sources' aligned distributions into one training target per position (FuseLLM section 3.3).

Every source s brings, per target position i, a sparse distribution P_s,i (its softmax(logprob / T), temperature
applied first) and its cross-entropy ce_s,i carried onto the target's tokens (transfer.py keeps the sums, so a
source's CE of a sequence, mean over the target's positions, compares across tokenizers). With r = exp(-CE):
- `min_ce`:        per sequence, P* = P_s of the source with the smallest sequence CE (the paper's default);
- `avg_ce`:        per sequence, P* = sum_s w_s P_s with w = softmax_s(r_s) (as the reference computes it; with CEs
                   of a few nats the r_s are small and alike, so w is close to uniform);
- `min_ce_token`:  per position, the source with the smallest ce_s,i;
- `avg_ce_token`:  per position, w_s,i = softmax_s(r_s,i).
Ties go to the source listed first (the order of `sources` in params.yaml).

Chunks (`fuse_chunks`, for train.chunk_weight): a chunk ends where every source's alignment group ends, so each
chunk is whole groups of every source and a source's CE summed over it is its cost of those bytes, exact whatever
its tokenizer. The fused teacher's chunk log-likelihood is log sum_s w_s,c exp(-CE_s,c), the weights from the same
rule on the chunks' mean CE per position: the chosen source's CE under the min methods, so `min_ce_token` takes the
best source per chunk.

Rank rows (`fuse_ranks`, for train.uld_weight): at each position, the rank rows of the sources that have one there
(transfer.py: where their distribution fell back to a one-hot), mixed by probability with the sources' weights
renormalised over them; a position none of its weighted sources has a row at gets none.
"""
from __future__ import annotations

from typing import Callable, NamedTuple, Sequence

import numpy as np

from fusesoup.errors import lookup
from fusesoup.logits.sparse import Chunks, RankRows, SparseRows, merge_entries, with_temperature
from fusesoup.logits.sparse_store import MIXED
from fusesoup.params import FuseMethod


class SourceRows(NamedTuple):
    """One source's aligned distributions over a sequence's n target positions."""

    rows: SparseRows
    ce: np.ndarray  # [n] per-position CE carried onto the target's tokens


class Fused(NamedTuple):
    rows: SparseRows
    source: np.ndarray  # [n] uint8: index of the source each position took, MIXED where averaged
    weights: np.ndarray  # [S, n] float: each source's weight at each position (one-hot for the min methods)
    chunks: Chunks | None = None  # fuse_chunks' output, where the sources' group ends were given
    ranks: RankRows | None = None  # fuse_ranks' output, where the sources' rank rows were given


def softmax(values: np.ndarray, axis: int = 0) -> np.ndarray:
    shifted = np.exp(values - values.max(axis=axis, keepdims=True))
    return shifted / shifted.sum(axis=axis, keepdims=True)


def min_ce_weights(scores: np.ndarray) -> np.ndarray:
    """[S, n] CE scores -> one-hot weights of the source with the smallest score at each position."""
    return (np.arange(len(scores))[:, None] == scores.argmin(axis=0)).astype(np.float64)


def avg_ce_weights(scores: np.ndarray) -> np.ndarray:
    """[S, n] CE scores -> w = softmax_s(exp(-score)) at each position."""
    return softmax(np.exp(-scores.astype(np.float64)), axis=0)


class FuseRule(NamedTuple):
    """One fusion method: which CE it compares (the sequence's mean, or each position's) and how it weighs."""

    per_token: bool
    weights: Callable[[np.ndarray], np.ndarray]  # [S, n] scores -> [S, n] weights
    chooses: bool  # one source per position (its index is recorded), else a mixture (MIXED)


FUSE_METHODS: dict[FuseMethod, FuseRule] = {
    "min_ce": FuseRule(False, min_ce_weights, True),
    "avg_ce": FuseRule(False, avg_ce_weights, False),
    "min_ce_token": FuseRule(True, min_ce_weights, True),
    "avg_ce_token": FuseRule(True, avg_ce_weights, False),
}


def source_weights(ce: np.ndarray, method: FuseMethod) -> np.ndarray:
    """[S, n] per-position CE of each source -> [S, n] weights of each source (see the module docstring)."""
    rule = lookup(FUSE_METHODS, method, "fuse.method")
    return rule.weights(ce if rule.per_token else np.broadcast_to(ce.mean(axis=1, keepdims=True), ce.shape))


def mix(sources: Sequence[SparseRows], weights: np.ndarray, vocab_size: int, keep_tail: bool = False) -> SparseRows:
    """sum_s weights[s, i] * P_s,i for every row i, merged over equal ids, sorted; zero-weight entries dropped; with
    `keep_tail` the mixture of the sources' tails stays the row's tail (the weights sum to 1)."""
    rows, ids, probs = [], [], []
    for s, source in enumerate(sources):
        row_of = source.rows_of_entries()
        weight = weights[s, row_of]
        keep = weight > 0
        rows.append(row_of[keep])
        ids.append(source.ids[keep])
        probs.append(np.exp(source.logprobs[keep].astype(np.float64)) * weight[keep])
    return merge_entries(np.concatenate(rows), np.concatenate(ids), np.concatenate(probs), weights.shape[1],
                         vocab_size, keep_tail=keep_tail)


def fuse_chunks(group_ends: np.ndarray, ce: np.ndarray, method: FuseMethod) -> Chunks:
    """[S, n] each source's group ends (1 at a group's last position) and per-position CE (sums kept within
    groups) -> the chunks every source's groups tile, and the fused teacher's CE of each (module docstring)."""
    end = np.logical_and.reduce(np.asarray(group_ends) > 0, axis=0)
    end[-1] = True  # a sequence's last position closes every group
    starts = np.flatnonzero(np.concatenate([[True], end[:-1]]))
    lengths = np.diff(np.append(starts, len(end)))
    sums = np.add.reduceat(np.asarray(ce, np.float64), starts, axis=1)  # [S, C] each source's CE of each chunk
    weights = source_weights(np.repeat(sums / lengths, lengths, axis=1), method)[:, starts]  # [S, C]
    with np.errstate(divide="ignore"):  # log 0 for a source of weight 0
        chunk_ce = -np.logaddexp.reduce(np.log(weights) - sums, axis=0)
    return Chunks(end.astype(np.uint8), np.repeat(chunk_ce / lengths, lengths))


def fuse_ranks(ranks: Sequence[RankRows], weights: np.ndarray) -> RankRows:
    """S sources' rank rows over n positions and their [S, n] weights -> the mixed rank rows (module docstring);
    a source with fewer ranks than another counts as 0 beyond its own."""
    n, k = weights.shape[1], max(r.logprobs.shape[1] for r in ranks)
    mixed, total = np.zeros((n, k)), np.zeros(n)
    for source, rows in enumerate(ranks):
        weight = weights[source, rows.at]
        mixed[rows.at, : rows.logprobs.shape[1]] += weight[:, None] * np.exp(rows.logprobs.astype(np.float64))
        total[rows.at] += weight
    at = np.flatnonzero(total > 0)
    with np.errstate(divide="ignore"):  # rank 0 of a source with fewer ranks: log 0
        return RankRows(at, np.log(mixed[at] / total[at, None]).astype(np.float32))


def fuse_sequence(sources: Sequence[SourceRows], method: FuseMethod, temperature: float, vocab_size: int,
                  group_ends: np.ndarray | None = None, ranks: Sequence[RankRows] | None = None,
                  keep_tail: bool = False) -> Fused:
    """The fused target distribution of one sequence from S sources' aligned rows (and its chunks, given the
    sources' [S, n] group ends; its rank rows, given theirs); `keep_tail`: the rows keep their tails (align.tail)."""
    ce = np.stack([source.ce for source in sources])
    weights = source_weights(ce, method)
    scaled = [with_temperature(source.rows, temperature) for source in sources]
    chosen = weights.argmax(axis=0) if FUSE_METHODS[method].chooses else np.full(ce.shape[1], MIXED)
    chunks = None if group_ends is None else fuse_chunks(group_ends, ce, method)
    ranked = None if ranks is None else fuse_ranks(ranks, weights)
    return Fused(mix(scaled, weights, vocab_size, keep_tail), chosen.astype(np.uint8), weights, chunks, ranked)
