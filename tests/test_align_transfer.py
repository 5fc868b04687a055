"""Moving a teacher's top-k rows onto the target's tokens: one-to-one transfer, merges, fallbacks, carried CE."""
from __future__ import annotations

import numpy as np
import pytest

from fusesoup.align.token_alignment import byte_ends, offset_align
from fusesoup.align.transfer import (EXACT, FALLBACK, MAPPED, agreement, groups_from_path, transfer_groups,
                                     translate_row)
from fusesoup.logits.codec import SequenceLogits


def teacher(ids: list[int], topk: list[list[int]], probs: list[list[float]], ce: list[float]) -> SequenceLogits:
    n = len(ids)
    return SequenceLogits(np.array(ids), np.zeros(n, np.int64), np.zeros(n, np.int64), np.array(topk),
                          np.log(np.array(probs, dtype=np.float32)), np.array(ce, dtype=np.float32))


def test_translate_row_merges_duplicates_drops_unmapped_and_renormalises():
    vocab_map = np.array([10, 11, 10, -1])
    ids, logprobs = translate_row(np.array([0, 1, 2, 3]), np.log(np.array([0.4, 0.3, 0.2, 0.1])), vocab_map, k=4)
    assert ids.tolist() == [10, 11, -1, -1]  # 0 and 2 both map to 10: 0.4 + 0.2; 3 maps nowhere
    np.testing.assert_allclose(np.exp(logprobs[:2]), [0.6 / 0.9, 0.3 / 0.9], rtol=1e-6)
    assert np.isneginf(logprobs[2:]).all()
    assert translate_row(np.array([3]), np.array([0.0]), vocab_map, k=2)[0].tolist() == [-1, -1]


def test_identical_tokenizations_transfer_every_row_unchanged():
    pieces = [b"def", b" f", b"(x", b"):"]
    groups = offset_align(byte_ends(pieces), byte_ends(pieces))
    assert groups == [(range(i, i + 1), range(i, i + 1)) for i in range(4)]
    source = teacher([0, 1, 2, 3], [[1, 2], [2, 0], [3, 1], [0, 3]], [[0.7, 0.2], [0.5, 0.5], [0.9, 0.05], [0.6, 0.3]],
                     [1.0, 2.0, 0.5, 0.25])
    identity = np.arange(4)
    agree = agreement(source.input_ids, pieces, pieces, np.arange(4), identity, groups)
    result = transfer_groups(groups, source, np.arange(4), identity, agree)
    assert result.status.tolist() == [EXACT] * 4
    assert result.topk_ids.tolist() == source.topk_ids.tolist()
    expected = source.topk_logprobs - np.log(np.exp(source.topk_logprobs).sum(axis=1, keepdims=True))
    np.testing.assert_allclose(result.topk_logprobs, expected, rtol=1e-6)
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
    result = transfer_groups(groups, source, target_ids, vocab_map, agree)
    assert result.status.tolist() == [FALLBACK] * 3
    assert result.topk_ids[:, 0].tolist() == [40, 41, 42]  # the token AT each position, not the one before
    assert (result.topk_ids[:, 1:] == -1).all() and (result.topk_logprobs[:, 0] == 0).all()
    assert result.ce.tolist() == [1.5, 1.5, 1.5]  # 3.0 split over two rows; 1.0 + 0.5 on one
    assert result.ce.sum() == pytest.approx(source.ce.sum())


def test_dtw_pairs_agree_through_the_vocab_map_or_fall_back():
    teacher_pieces, target_pieces = [b"a", b"Xb", b"c"], [b"a", b"b", b"c"]
    path = [(0, 0), (1, 1), (2, 2)]
    groups = groups_from_path(path)
    source = teacher([0, 1, 2], [[0, 1], [1, 2], [2, 0]], [[0.8, 0.2], [0.6, 0.4], [0.9, 0.1]], [1.0, 1.0, 1.0])
    target_ids = np.array([10, 11, 12])
    vocab_map = np.array([10, 11, 12])  # "Xb" maps to "b" through MinED
    agree = agreement(source.input_ids, teacher_pieces, target_pieces, target_ids, vocab_map, groups)
    assert agree.tolist() == [EXACT, MAPPED, EXACT]
    result = transfer_groups(groups, source, target_ids, vocab_map, agree)
    assert result.status.tolist() == [EXACT, MAPPED, EXACT]
    disagreeing = np.array([10, 12, 12])  # now "Xb" maps to "c": the pair disagrees
    agree = agreement(source.input_ids, teacher_pieces, target_pieces, target_ids, disagreeing, groups)
    result = transfer_groups(groups, source, target_ids, disagreeing, agree)
    assert result.status.tolist() == [EXACT, FALLBACK, EXACT] and result.topk_ids[1, 0] == 11


def test_groups_from_a_dtw_path_join_repeated_tokens():
    path = [(0, 0), (1, 1), (2, 1), (3, 2), (3, 3), (4, 4)]
    assert groups_from_path(path) == [(range(0, 1), range(0, 1)), (range(1, 3), range(1, 2)),
                                      (range(3, 4), range(2, 4)), (range(4, 5), range(4, 5))]
