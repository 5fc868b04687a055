"""Spans (alignment groups that are not one-to-one): the teacher's distribution over the span's byte strings."""
from __future__ import annotations

import numpy as np
import pytest

from fusesoup.align.spans import Segmenter, expand_span
from fusesoup.align.token_alignment import byte_ends, offset_align
from fusesoup.align.transfer import EXACT, FALLBACK, SPAN, SpanInputs, agreement, transfer_groups
from fusesoup.logits.codec import SequenceLogits

TARGET = [b"hel", b"lo", b"p", b"h", b"i", b"l", b"o", b"e", b"", b"x", b" world", b" the", b" w", b"ide", b" "]
TEACHER = [b"hello", b"help", b"hi", b" ", b" the", b"world", b"wide", b"z"]


def row(rows, i: int) -> dict[int, float]:
    a, b = rows.offsets[i], rows.offsets[i + 1]
    return dict(zip(rows.ids[a:b].tolist(), np.exp(rows.logprobs[a:b]).tolist()))


def sequence(ids, topk, probs, realised_probs) -> SequenceLogits:
    n = len(ids)
    return SequenceLogits(np.array(ids), np.zeros(n, np.int64), np.zeros(n, np.int64), np.array(topk),
                          np.log(np.array(probs, np.float32)), -np.log(np.array(realised_probs, np.float32)))


def test_segmenter_takes_the_longest_token_that_fits_and_gives_up_on_a_byte_without_one():
    segmenter = Segmenter(TARGET)
    assert segmenter.segment(b"help") == (0, 2)  # "hel" + "p", not "h" + "e" + "l" + "p"
    assert segmenter.segment(b"hello") == (0, 1)
    assert segmenter.segment(b" wide") == (12, 13)
    assert segmenter.segment(b"hez") is None
    assert segmenter.segment(b"") == ()


def test_one_teacher_token_over_two_target_tokens_gives_each_its_marginal():
    teacher = sequence([0], [[0, 1, 2]], [[0.5, 0.3, 0.2]], [0.5])  # "hello" 0.5, "help" 0.3, "hi" 0.2
    rows, ids, masses = expand_span(teacher, range(0, 1), range(0, 2), np.array([0, 1]), [b"hello"], TEACHER,
                                    Segmenter(TARGET))
    first = {token: masses[(rows == 0) & (ids == token)].sum() / masses[rows == 0].sum() for token in set(ids[rows == 0])}
    assert first == pytest.approx({0: 0.8, 3: 0.2})  # "hel": hello + help; "h": hi
    second = {token: masses[(rows == 1) & (ids == token)].sum() / masses[rows == 1].sum() for token in set(ids[rows == 1])}
    assert second == pytest.approx({1: 0.5 / 0.8, 2: 0.3 / 0.8})  # given "hel": "lo" (hello) or "p" (help)


def test_a_lone_space_token_is_expanded_with_the_next_teacher_row():
    # teacher " " + "world" (p 0.4, then 0.6) against the target's one token " world"; " the" competes at 0.5;
    # "z" (and " z") has no target segmentation and drops out
    teacher = sequence([3, 5], [[4, 3, 7], [5, 6, 7]], [[0.5, 0.4, 0.05], [0.6, 0.3, 0.05]], [0.4, 0.6])
    pieces = [b" ", b"world"]
    groups = offset_align(byte_ends(pieces), byte_ends([b" world"]))
    target_ids = np.array([10])
    agree = agreement(teacher.input_ids, pieces, [b" world"], target_ids, np.full(8, -1), groups)
    result = transfer_groups(groups, teacher, target_ids, np.full(8, -1), agree, len(TARGET),
                             SpanInputs(pieces, TEACHER, Segmenter(TARGET)))
    total = 0.5 + 0.4 * 0.6 + 0.4 * 0.3
    assert row(result.rows, 0) == pytest.approx({11: 0.5 / total, 10: 0.24 / total, 12: 0.12 / total}, rel=1e-5)
    assert result.status.tolist() == [SPAN]
    one_hot = transfer_groups(groups, teacher, target_ids, np.full(8, -1), agree, len(TARGET))
    assert row(one_hot.rows, 0) == {10: 1.0} and one_hot.status.tolist() == [FALLBACK]


def test_a_span_whose_strings_all_leave_the_realised_path_is_a_one_hot_and_rows_keep_k_entries():
    # "hello" certain: row 0 "hel" alone; "hi" splits off at row 0, so row 1 has only the realised "lo"
    teacher = sequence([0, 7], [[0, 2], [7, 0]], [[0.9, 0.1], [0.5, 0.5]], [0.9, 0.5])
    pieces = [b"hello", b"z"]
    target_pieces = [b"hel", b"lo", b"z"]
    groups = offset_align(byte_ends(pieces), byte_ends(target_pieces))
    target_ids = np.array([0, 1, 9])
    vocab_map = np.array([-1, -1, -1, -1, -1, -1, -1, 9])
    agree = agreement(teacher.input_ids, pieces, target_pieces, target_ids, vocab_map, groups)
    result = transfer_groups(groups, teacher, target_ids, vocab_map, agree, len(TARGET),
                             SpanInputs(pieces, TEACHER, Segmenter(TARGET)))
    assert result.status.tolist() == [SPAN, FALLBACK, EXACT]
    assert row(result.rows, 0) == pytest.approx({0: 0.9, 3: 0.1}) and row(result.rows, 1) == {1: 1.0}
    assert all(count <= 2 for count in result.rows.counts)
