"""Fusion of aligned distributions: MinCE / AvgCE per sequence and per token, temperature, and the weights."""
from __future__ import annotations

import numpy as np
import pytest

from fusesoup.fusion import SourceRows, fuse_chunks, fuse_ranks, fuse_sequence, source_weights
from fusesoup.logits.sparse import RankRows, SparseRows, decode_ranks, encode_ranks, merge_entries, one_hot_rows
from fusesoup.logits.sparse_store import MIXED

VOCAB = 8


def rows(*distributions: dict[int, float]) -> SparseRows:
    entries = [(i, token, p) for i, d in enumerate(distributions) for token, p in d.items()]
    r, t, p = map(np.array, zip(*entries))
    return merge_entries(r, t, p, len(distributions), VOCAB)


def dense(fused: SparseRows) -> np.ndarray:
    out = np.zeros((len(fused.offsets) - 1, VOCAB))
    np.add.at(out, (fused.rows_of_entries(), fused.ids), np.exp(fused.logprobs.astype(np.float64)))
    return out


@pytest.fixture
def sources() -> list[SourceRows]:
    a = SourceRows(rows({1: 0.5, 2: 0.5}, {3: 1.0}), np.array([1.0, 3.0], np.float32))  # mean CE 2.0
    b = SourceRows(rows({1: 1.0}, {4: 0.75, 3: 0.25}), np.array([2.0, 1.5], np.float32))  # mean CE 1.75
    return [a, b]


def test_min_ce_takes_the_source_with_the_smallest_sequence_ce(sources):
    fused = fuse_sequence(sources, "min_ce", 1.0, VOCAB)
    np.testing.assert_allclose(dense(fused.rows), dense(sources[1].rows), atol=1e-6)
    assert fused.source.tolist() == [1, 1]


def test_min_ce_token_chooses_per_position(sources):
    fused = fuse_sequence(sources, "min_ce_token", 1.0, VOCAB)
    assert fused.source.tolist() == [0, 1]  # CE 1.0 < 2.0 at position 0; 1.5 < 3.0 at position 1
    np.testing.assert_allclose(dense(fused.rows)[0], dense(sources[0].rows)[0], atol=1e-6)
    np.testing.assert_allclose(dense(fused.rows)[1], dense(sources[1].rows)[1], atol=1e-6)


def test_avg_ce_weights_are_a_softmax_of_exp_minus_ce(sources):
    fused = fuse_sequence(sources, "avg_ce", 1.0, VOCAB)
    r = np.exp(-np.array([2.0, 1.75]))
    w = np.exp(r) / np.exp(r).sum()
    expected = w[0] * dense(sources[0].rows) + w[1] * dense(sources[1].rows)
    np.testing.assert_allclose(dense(fused.rows), expected, atol=1e-6)
    assert fused.source.tolist() == [MIXED, MIXED]
    np.testing.assert_allclose(fused.weights[:, 0], w)
    token = source_weights(np.array([[1.0, 3.0], [2.0, 1.5]]), "avg_ce_token")
    np.testing.assert_allclose(token[:, 1], np.exp(np.exp(-np.array([3.0, 1.5]))) / np.exp(np.exp(-np.array([3.0, 1.5]))).sum())


def test_ties_go_to_the_first_source_and_temperature_flattens(sources):
    tied = [SourceRows(one_hot_rows(np.array([2])), np.array([1.0])), SourceRows(one_hot_rows(np.array([5])), np.array([1.0]))]
    assert fuse_sequence(tied, "min_ce", 1.0, VOCAB).rows.ids.tolist() == [2]
    hot = fuse_sequence(sources, "min_ce", 2.0, VOCAB)
    p = np.sqrt([0.75, 0.25]) / np.sqrt([0.75, 0.25]).sum()
    np.testing.assert_allclose(dense(hot.rows)[1, [4, 3]], p, atol=1e-6)


@pytest.mark.parametrize("method", ["min_ce", "avg_ce", "min_ce_token", "avg_ce_token"])
def test_chunks_are_whole_groups_of_every_source_and_carry_the_fused_teachers_likelihood(method):
    # the target's own store (every token a group) and two teachers cutting the 6 tokens differently
    ends = np.array([[1, 1, 1, 1, 1, 1], [0, 1, 1, 0, 0, 1], [1, 1, 0, 1, 0, 1]])
    ce = np.array([[1.0] * 6, [0.5, 0.5, 2.0, 1.0, 1.0, 1.2], [0.2, 0.2, 0.3, 0.3, 3.0, 3.0]])
    chunks = fuse_chunks(ends, ce, method)
    assert chunks.end.tolist() == [0, 1, 0, 0, 0, 1]  # where all three groups end: tokens 0-1 and 2-5
    # dense reference: each source's likelihood of each chunk, weighted as the method weighs whole sequences or
    # (per token) the chunk's mean CE per position, mixed as probabilities
    spans = [range(0, 2), range(2, 6)]
    sums = np.array([[ce[s, list(span)].sum() for span in spans] for s in range(3)])  # [S, C]
    if method in ("min_ce", "avg_ce"):
        scores = np.repeat(ce.mean(axis=1, keepdims=True), 2, axis=1)
    else:
        scores = sums / np.array([len(span) for span in spans])
    r = np.exp(-scores)
    weights = (scores == scores.min(axis=0)).astype(float) if method.startswith("min") else np.exp(r) / np.exp(r).sum(0)
    assert (weights.sum(axis=0) > 0).all() and (not method.startswith("min") or (weights.sum(axis=0) == 1).all())
    likelihood = (weights * np.exp(-sums)).sum(axis=0)
    for c, span in enumerate(spans):
        np.testing.assert_allclose(chunks.ce[list(span)], -np.log(likelihood[c]) / len(span), rtol=1e-9)
    if method == "min_ce_token":  # the best source per chunk: the third on tokens 0-1 (0.4), the target on 2-5 (4.0)
        np.testing.assert_allclose([chunks.ce[:2].sum(), chunks.ce[2:].sum()], [0.4, 4.0])


def test_fused_sequences_carry_chunks_when_given_group_ends(sources):
    fused = fuse_sequence(sources, "min_ce", 1.0, VOCAB, group_ends=np.array([[1, 1], [0, 1]]))
    assert fused.chunks.end.tolist() == [0, 1]
    np.testing.assert_allclose(fused.chunks.ce, [1.75, 1.75])  # source 1 (mean CE 1.75) over its one 2-token chunk
    assert fuse_sequence(sources, "min_ce", 1.0, VOCAB).chunks is None


def test_rank_rows_mix_the_weighted_sources_that_have_one_and_round_trip_through_the_store():
    a = RankRows(np.array([0, 2]), np.log(np.array([[0.5, 0.3, 0.1], [0.7, 0.2, 0.05]], np.float32)))
    b = RankRows(np.array([2, 3]), np.log(np.array([[0.4, 0.4], [0.9, 0.05]], np.float32)))  # k = 2
    weights = np.array([[1.0, 0.0, 0.25, 0.0], [0.0, 1.0, 0.75, 1.0]])
    mixed = fuse_ranks([a, b], weights)
    assert mixed.at.tolist() == [0, 2, 3]  # position 1: its one weighted source has no row there
    dense = np.exp(mixed.logprobs)
    np.testing.assert_allclose(dense, [[0.5, 0.3, 0.1], [0.25 * 0.7 + 0.75 * 0.4, 0.25 * 0.2 + 0.75 * 0.4, 0.25 * 0.05],
                                       [0.9, 0.05, 0.0]], rtol=1e-6)
    assert fuse_ranks([a, b], np.array([[0.0] * 4, [1.0] * 4])).at.tolist() == [2, 3]  # min_ce chose b
    back = decode_ranks(encode_ranks(a, 4), 4)
    assert back.at.tolist() == [0, 2] and np.abs(back.logprobs - a.logprobs).max() <= 1 / 32


def test_sources_that_keep_their_tails_mix_them_with_the_same_weights():
    """align.tail: AvgCE of rows summing to 0.6 and 0.9 sums to the weighted mix of the two (the fused tail is the
    sources' tails mixed); MinCE keeps the chosen source's row, tail included."""
    a = SourceRows(merge_entries(np.array([0, 0]), np.array([1, 2]), np.array([0.4, 0.2]), 1, VOCAB, keep_tail=True),
                   np.array([1.0], np.float32))
    b = SourceRows(merge_entries(np.array([0]), np.array([1]), np.array([0.9]), 1, VOCAB, keep_tail=True),
                   np.array([2.0], np.float32))
    averaged = fuse_sequence([a, b], "avg_ce", 1.0, VOCAB, keep_tail=True)
    w = averaged.weights[:, 0]
    np.testing.assert_allclose(dense(averaged.rows)[0, [1, 2]], [0.4 * w[0] + 0.9 * w[1], 0.2 * w[0]], rtol=1e-6)
    np.testing.assert_allclose(dense(fuse_sequence([a, b], "min_ce", 1.0, VOCAB, keep_tail=True).rows).sum(), 0.6,
                               rtol=1e-6)
    np.testing.assert_allclose(dense(fuse_sequence([a, b], "min_ce", 1.0, VOCAB).rows).sum(), 1.0, rtol=1e-6)
