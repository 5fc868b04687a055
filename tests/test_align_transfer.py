"""Moving a teacher's top-k rows onto the target's tokens: one-to-one transfer, merges, fallbacks, carried CE."""
from __future__ import annotations

import numpy as np
import pytest

from fusesoup.align.token_alignment import byte_ends, offset_align
from fusesoup.align.transfer import (EXACT, FALLBACK, MAPPED, agreement, groups_from_path, mapped_entries,
                                     transfer_groups)
from fusesoup.logits.codec import SequenceLogits
from fusesoup.logits.sparse import SparseRows, merge_entries


def row(rows: SparseRows, i: int) -> tuple[list[int], np.ndarray]:
    """(ids, probabilities) of row i."""
    a, b = rows.offsets[i], rows.offsets[i + 1]
    return rows.ids[a:b].tolist(), np.exp(rows.logprobs[a:b])


def teacher(ids: list[int], topk: list[list[int]], probs: list[list[float]], ce: list[float]) -> SequenceLogits:
    n = len(ids)
    return SequenceLogits(np.array(ids), np.zeros(n, np.int64), np.zeros(n, np.int64), np.array(topk),
                          np.log(np.array(probs, dtype=np.float32)), np.array(ce, dtype=np.float32))


def test_mapped_entries_merge_duplicates_drop_unmapped_and_renormalise():
    vocab_map = np.array([10, 11, 10, -1])
    topk = np.array([[0, 1, 2, 3], [3, 3, 3, 3], [1, 0, 3, 3]])
    logprobs = np.log(np.array([[0.4, 0.3, 0.2, 0.1], [0.25] * 4, [0.5, 0.5, 1e-9, 1e-9]]))
    rows = merge_entries(*mapped_entries(np.array([2, 0, 1]), topk, logprobs, vocab_map), 4, 12, max_entries=4)
    ids, probs = row(rows, 2)
    assert ids == [10, 11]  # 0 and 2 both map to 10: 0.4 + 0.2; 3 maps nowhere
    np.testing.assert_allclose(probs, [0.6 / 0.9, 0.3 / 0.9], rtol=1e-6)
    assert row(rows, 0)[0] == [] and row(rows, 3)[0] == []  # nothing maps; no teacher row
    assert row(rows, 1)[0] == [11, 10]  # a tie keeps the teacher's order


def test_identical_tokenizations_transfer_every_row_unchanged():
    pieces = [b"def", b" f", b"(x", b"):"]
    groups = offset_align(byte_ends(pieces), byte_ends(pieces))
    assert groups == [(range(i, i + 1), range(i, i + 1)) for i in range(4)]
    source = teacher([0, 1, 2, 3], [[1, 2], [2, 0], [3, 1], [0, 3]], [[0.7, 0.2], [0.5, 0.5], [0.9, 0.05], [0.6, 0.3]],
                     [1.0, 2.0, 0.5, 0.25])
    identity = np.arange(4)
    agree = agreement(source.input_ids, pieces, pieces, np.arange(4), identity, groups)
    result = transfer_groups(groups, source, np.arange(4), identity, agree, target_vocab_size=4)
    assert result.status.tolist() == [EXACT] * 4
    probabilities = np.exp(source.topk_logprobs)
    for i in range(4):
        ids, probs = row(result.rows, i)
        assert ids == source.topk_ids[i].tolist()
        np.testing.assert_allclose(probs, probabilities[i] / probabilities[i].sum(), rtol=1e-6)
    assert result.ce.tolist() == [1.0, 2.0, 0.5, 0.25]


def test_spans_fall_back_to_a_one_hot_on_the_token_each_row_predicts_and_keep_ce_sums():
    teacher_pieces = [b"hello", b" wor", b"ld"]  # " wor" + "ld" -> " world": many-to-one
    target_pieces = [b"hel", b"lo", b" world"]  # "hel" + "lo" <- "hello": one-to-many
    groups = offset_align(byte_ends(teacher_pieces), byte_ends(target_pieces))
    assert groups == [(range(0, 1), range(0, 2)), (range(1, 3), range(2, 3))]
    source = teacher([5, 6, 7], [[1, 2], [2, 3], [3, 4]], [[0.5, 0.5]] * 3, [3.0, 1.0, 0.5])
    target_ids = np.array([40, 41, 42])
    vocab_map = np.arange(10)
    agree = agreement(source.input_ids, teacher_pieces, target_pieces, target_ids, vocab_map, groups)
    result = transfer_groups(groups, source, target_ids, vocab_map, agree, target_vocab_size=50)
    assert result.status.tolist() == [FALLBACK] * 3
    assert result.rows.offsets.tolist() == [0, 1, 2, 3] and (result.rows.logprobs == 0).all()
    assert result.rows.ids.tolist() == [40, 41, 42]  # the token AT each position, not the one before
    assert result.ce.tolist() == [1.5, 1.5, 1.5]  # 3.0 split over two rows; 1.0 + 0.5 on one
    assert result.ce.sum() == pytest.approx(source.ce.sum())
    assert result.group_end.tolist() == [0, 1, 1]  # "hel"+"lo" one chunk, " world" another
    # each group start fell back: the teacher's top-k there (same text before both) is kept by rank
    assert result.ranks.at.tolist() == [0, 2]
    np.testing.assert_array_equal(result.ranks.logprobs, source.topk_logprobs[[0, 1]])


def test_dtw_pairs_agree_through_the_vocab_map_or_fall_back():
    teacher_pieces, target_pieces = [b"a", b"Xb", b"c"], [b"a", b"b", b"c"]
    path = [(0, 0), (1, 1), (2, 2)]
    groups = groups_from_path(path)
    source = teacher([0, 1, 2], [[0, 1], [1, 2], [2, 0]], [[0.8, 0.2], [0.6, 0.4], [0.9, 0.1]], [1.0, 1.0, 1.0])
    target_ids = np.array([10, 11, 12])
    vocab_map = np.array([10, 11, 12])  # "Xb" maps to "b" through MinED
    agree = agreement(source.input_ids, teacher_pieces, target_pieces, target_ids, vocab_map, groups)
    assert agree.tolist() == [EXACT, MAPPED, EXACT]
    result = transfer_groups(groups, source, target_ids, vocab_map, agree, target_vocab_size=13)
    assert result.status.tolist() == [EXACT, MAPPED, EXACT]
    assert row(result.rows, 1)[0] == [11, 12]
    disagreeing = np.array([10, 12, 12])  # now "Xb" maps to "c": the pair disagrees
    agree = agreement(source.input_ids, teacher_pieces, target_pieces, target_ids, disagreeing, groups)
    result = transfer_groups(groups, source, target_ids, disagreeing, agree, target_vocab_size=13)
    assert result.status.tolist() == [EXACT, FALLBACK, EXACT] and row(result.rows, 1)[0] == [11]
    with pytest.raises(ValueError, match="do not cover the 3 target tokens"):
        transfer_groups(groups[:2], source, target_ids, vocab_map, agree, target_vocab_size=13)


def test_groups_from_a_dtw_path_join_repeated_tokens():
    path = [(0, 0), (1, 1), (2, 1), (3, 2), (3, 3), (4, 4)]
    assert groups_from_path(path) == [(range(0, 1), range(0, 1)), (range(1, 3), range(1, 2)),
                                      (range(3, 4), range(2, 4)), (range(4, 5), range(4, 5))]


def test_align_tail_keeps_the_teachers_probabilities_and_leaves_the_rest_as_the_row_s_tail():
    """align.tail: a row keeps the teacher's absolute probabilities (the mass beyond its top k, and that of ids
    that map nowhere, stays out as the tail); without it the same row is renormalised; a fallback is a one-hot."""
    pieces = [b"ab", b"c", b"d"]
    groups = offset_align(byte_ends(pieces), byte_ends(pieces))
    source = teacher([0, 1, 2], [[1, 2, 3], [2, 0, 3], [0, 1, 2]], [[0.5, 0.2, 0.1], [0.3, 0.3, 0.2], [0.6, 0.1, 0.1]],
                     [1.0, 2.0, 0.5])
    vocab_map = np.array([0, 1, 2, -1])  # teacher id 3 has no target counterpart
    agree = np.array([EXACT, -1, EXACT], np.int8)  # the middle pair disagrees: a one-hot
    kept = transfer_groups(groups, source, np.arange(3), vocab_map, agree, 4, keep_tail=True)
    ids, probs = row(kept.rows, 0)
    assert ids == [1, 2]
    np.testing.assert_allclose(probs, [0.5, 0.2], rtol=1e-6)  # 0.3 of tail: beyond the top 3 and unmapped id 3
    assert row(kept.rows, 1) == ([1], np.array([1.0], np.float32))
    np.testing.assert_allclose(row(kept.rows, 2)[1], [0.6, 0.1, 0.1], rtol=1e-6)
    renormalised = transfer_groups(groups, source, np.arange(3), vocab_map, agree, 4)
    np.testing.assert_allclose(row(renormalised.rows, 0)[1], [0.5 / 0.7, 0.2 / 0.7], rtol=1e-6)
