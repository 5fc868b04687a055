"""Token alignment: DTW against a plain pure-Python reference, and byte-offset spans on edge cases and real text."""
from __future__ import annotations

import itertools
import random

import pytest

import numpy as np

from fusesoup.align.token_alignment import (GROUP_KINDS, _warping_path, byte_ends, cost_by_group_kind, dtw_align,
                                           offset_align)
from fusesoup.token_bytes import text_token_bytes, token_bytes
from fusesoup.tokenizer_families import FAMILIES, train_tokenizer
from tests.helpers import reference_dtw, sample_texts

TEXT = sample_texts()[0][:1500] + "\n中文 👍 naïve\tcafé\n"




@pytest.fixture(scope="module")
def tokenized():
    """TEXT as each family's token bytes (the prepended space dropped), so all three spell the same bytes."""
    texts = sample_texts()
    pieces = {}
    for kind in FAMILIES:
        tokenizer = train_tokenizer(kind, iter(texts), 800)
        pieces[kind] = text_token_bytes(token_bytes(tokenizer), tokenizer.encode(TEXT, add_special_tokens=False), TEXT)
    return pieces


def test_dtw_equals_the_reference_on_random_token_lists():
    """Few distinct short tokens: many cells tie, so the tie order is exercised everywhere."""
    rng = random.Random(0)
    alphabet = [b"", b"a", b"b", b"ab", b"ba", b" a", b"aab", b"\n"]
    for _ in range(300):
        source = rng.choices(alphabet, k=rng.randint(1, 25))
        target = rng.choices(alphabet, k=rng.randint(1, 25))
        assert dtw_align(source, target) == reference_dtw(source, target), (source, target)


@pytest.mark.parametrize("source_kind, target_kind", list(itertools.permutations(FAMILIES, 2)))
def test_dtw_equals_the_reference_on_real_tokenizations(source_kind, target_kind, tokenized):
    source, target = tokenized[source_kind], tokenized[target_kind]
    assert len(source) > 300 and len(target) > 300
    assert dtw_align(source, target) == reference_dtw(source, target)


def test_dtw_kernel_gives_one_path_in_int32_and_int64():
    """dtw_align runs the compiled kernel in int32 unless a path could overflow it; both widths trace one path."""
    rng = np.random.default_rng(0)
    cost_rows = rng.integers(0, 4, size=(5, 300))
    row_ids = rng.integers(0, 5, size=200)
    wide = _warping_path(cost_rows.astype(np.int64), row_ids)
    assert wide.tolist() == _warping_path(cost_rows.astype(np.int32), row_ids).tolist()
    expected = reference_dtw(row_ids.tolist(), list(range(300)), lambda row, column: int(cost_rows[row, column]))
    assert list(map(tuple, wide.tolist())) == expected


def test_dtw_tie_order_and_edges():
    assert dtw_align([b"a", b"b"], [b"a", b"b"]) == [(0, 0), (1, 1)]
    assert dtw_align([b"a", b"a", b"b"], [b"a", b"b"]) == [(0, 0), (1, 0), (2, 1)]
    # at (2, 2) the source step (1, 2) ties with the target step (2, 1), both below the diagonal: the source step wins
    assert dtw_align([b"a", b"b", b"a"], [b"b", b"a", b"b"]) == [(0, 0), (0, 1), (1, 2), (2, 2)]
    assert dtw_align([b"x"], [b"p", b"q", b"r"]) == [(0, 0), (0, 1), (0, 2)]
    with pytest.raises(ValueError):
        dtw_align([], [b"a"])


def test_identical_tokenizations_align_as_the_identity(tokenized):
    pieces = tokenized["byte_level_bpe"]
    assert dtw_align(pieces, pieces) == [(i, i) for i in range(len(pieces))]
    ends = byte_ends(pieces)
    assert offset_align(ends, ends) == [(range(i, i + 1), range(i, i + 1)) for i in range(len(pieces))]


def groups_as_bytes(source: list[bytes], target: list[bytes]) -> list[tuple[list[bytes], list[bytes]]]:
    groups = offset_align(byte_ends(source), byte_ends(target))
    return [([source[i] for i in left], [target[j] for j in right]) for left, right in groups]


def test_offset_edge_cases():
    # `Ġreturn` / `▁return` and `Ċ` / `<0x0A>` as bytes: one-to-one
    assert groups_as_bytes([b"x", b"\n", b" return", b" y"], [b"x", b"\n", b" return", b" y"]) == [
        ([b"x"], [b"x"]), ([b"\n"], [b"\n"]), ([b" return"], [b" return"]), ([b" y"], [b" y"])]
    # one-to-many, many-to-one, and a CJK character split into different byte pieces
    middle = "中".encode()
    assert groups_as_bytes([b" foo", b"bar", b" baz"], [b" foobar", b" ba", b"z"]) == [
        ([b" foo", b"bar"], [b" foobar"]), ([b" baz"], [b" ba", b"z"])]
    assert groups_as_bytes([middle[:2], middle[2:], b"!"], [middle[:1], middle[1:], b"!"]) == [
        ([middle[:2], middle[2:]], [middle[:1], middle[1:]]), ([b"!"], [b"!"])]
    # a token of no bytes joins the group after it, or the last group at the end
    assert groups_as_bytes([b"", b"a", b"b", b""], [b"a", b"b"]) == [([b"", b"a"], [b"a"]), ([b"b", b""], [b"b"])]
    assert byte_ends([b"ab", b"", b"c"]) == [2, 2, 3]
    with pytest.raises(ValueError, match="same byte offset"):
        offset_align([1, 3], [1, 2])


@pytest.mark.parametrize("source_kind, target_kind", list(itertools.combinations(FAMILIES, 2)))
def test_offset_groups_are_the_minimal_common_cuts_of_real_tokenizations(source_kind, target_kind, tokenized):
    source, target = tokenized[source_kind], tokenized[target_kind]
    groups = offset_align(byte_ends(source), byte_ends(target))
    assert [i for left, _ in groups for i in left] == list(range(len(source)))
    assert [j for _, right in groups for j in right] == list(range(len(target)))
    for left, right in groups:
        assert b"".join(source[i] for i in left) == b"".join(target[j] for j in right)
        inner_cuts = set(itertools.accumulate(len(source[i]) for i in left[:-1]))
        assert not inner_cuts & set(itertools.accumulate(len(target[j]) for j in right[:-1]))
    one_to_one = [group for group in groups if len(group[0]) == len(group[1]) == 1]
    assert len(groups) / 2 < len(one_to_one) < len(groups)  # mostly one-to-one, and some spans are not
    # what each family calls a newline (`Ċ` or `<0x0A>`) is the same byte, so it aligns one-to-one
    assert ([b"\n"], [b"\n"]) in [([source[i] for i in left], [target[j] for j in right]) for left, right in groups]


def test_cost_by_group_kind_splits_both_sides_costs_and_the_bytes_between_one_to_one_groups_and_spans():
    source = [b"def", b" fun", b"c", b"(", b"):"]  # source tokens
    target = [b"def", b" func", b"(", b")", b":"]
    groups = offset_align(byte_ends(source), byte_ends(target))  # def | fun+c = func | ( | ): = ) + :
    source_ce = np.array([1.0, 2.0, 0.5, 0.25, 3.0])
    target_ce = np.array([1.5, 4.0, 0.125, 1.0, 1.0])
    costs = cost_by_group_kind(groups, source_ce, target_ce, byte_ends(target))
    assert GROUP_KINDS == ("one_to_one", "span")
    np.testing.assert_allclose(costs, [[1.0 + 0.25, 1.5 + 0.125, 3 + 1],  # "def", "("
                                       [2.0 + 0.5 + 3.0, 4.0 + 1.0 + 1.0, 5 + 2]])  # " func", "):"
