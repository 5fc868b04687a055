"""Edit-distance kernel and vocabulary map against plain-Python brute force (bench/align.py times 32k x 50k)."""
from __future__ import annotations

import random

import numpy as np
import pytest

from fusesoup.align.edit_distance import PaddedBytes, pairwise_edit_distances
from fusesoup.align.vocab_map import map_vocab
from fusesoup.errors import StageError
from fusesoup.token_bytes import token_bytes
from fusesoup.tokenizer_families import train_tokenizer
from tests.helpers import reference_edit_distance, sample_texts




def brute_force_nearest(query: bytes, target_bytes: list[bytes]) -> int:
    """FuseLLM's scan: every non-empty target in id order, the first minimum wins. A target whose length differs by at
    least the best distance so far cannot beat it, so it is skipped (that bound holds for any edit distance)."""
    best_distance, best_id = None, -1
    for target_id, token in enumerate(target_bytes):
        if not token or (best_distance is not None and abs(len(token) - len(query)) >= best_distance):
            continue
        distance = reference_edit_distance(query, token)
        if best_distance is None or distance < best_distance:
            best_distance, best_id = distance, target_id
    return best_id


def random_tokens(rng: random.Random, count: int) -> list[bytes]:
    """Byte strings over a small alphabet (many near ties) of lengths around the 64-byte word of the kernel."""
    lengths = [0, 1, 2, 3, 4, 6, 9, 17, 32, 63, 64, 65, 90]
    return [bytes(rng.choice(b"ab \n\xe4") for _ in range(rng.choice(lengths))) for _ in range(count)]


def test_pairwise_edit_distances_equal_the_textbook_dp():
    rng = random.Random(1)
    left, right = random_tokens(rng, 70), random_tokens(rng, 50)
    got = pairwise_edit_distances(PaddedBytes.of(left), PaddedBytes.of(right))
    assert got.tolist() == [[reference_edit_distance(a, b) for b in right] for a in left]
    assert pairwise_edit_distances(PaddedBytes.of([b"kitten"]), PaddedBytes.of([b"sitting", b"", b"kitten"])).tolist() \
        == [[3, 6, 0]]


def test_exact_and_min_ed_on_hand_made_vocabularies():
    target = [b"", b"cat", b"dog", b"cat", b"cart", b"cot", b"", b"c"]
    source = [b"", b"dog", b"cat", b"cut", b"dig", b"cast", b"zzzzzzzz", b"ca", b"cxrt"]
    assert map_vocab(source, target, "exact").tolist() == [-1, 2, 1, -1, -1, -1, -1, -1, -1]
    # Ties go to the smaller id: cut -> cat (1) before cot (5); cast -> cat before cart (4); ca -> cat before c (7);
    # zzzzzzzz is 8 edits from every target, whatever its length. Duplicates: cat -> 1, not 3.
    assert map_vocab(source, target, "min_ed").tolist() == [-1, 2, 1, 1, 2, 1, 1, 1, 4]
    assert map_vocab([b"x"], [b"", b""], "min_ed").tolist() == [-1]  # nothing to map to
    # prefix: the longest target token the source bytes start with: cut, cast, ca, cxrt -> c; dig, zzzzzzzz -> none
    assert map_vocab(source, target, "prefix").tolist() == [-1, 2, 1, 7, -1, 7, -1, 7, 7]
    assert map_vocab([b" selfish", b" shelf"], [b" s", b" self", b" shelf", b" sel"], "prefix").tolist() == [1, 2]
    known = r"unknown vocabulary mapping \(align.vocab\) 'fuzzy'; known: exact, min_ed, prefix"
    with pytest.raises(StageError, match=known):
        map_vocab(source, target, "fuzzy")


def test_min_ed_equals_brute_force_on_random_vocabularies_with_long_tokens():
    rng = random.Random(2)
    source, target = random_tokens(rng, 80), random_tokens(rng, 120)
    mapping = map_vocab(source, target, "min_ed")
    assert mapping.tolist() == [brute_force_nearest(token, target) if token else -1 for token in source]


@pytest.fixture(scope="module")
def trained_vocabularies():
    """A 2k unigram vocabulary and a 3k byte-level one, trained on different halves of the sample texts."""
    texts = sample_texts()
    source = token_bytes(train_tokenizer("unigram", iter(texts[0::2]), 2000))
    target = token_bytes(train_tokenizer("byte_level_bpe", iter(texts[1::2]), 3000))
    return source, target


def test_min_ed_equals_brute_force_on_a_sample_of_trained_vocabularies(trained_vocabularies):
    source, target = trained_vocabularies
    mapping = map_vocab(source, target, "min_ed")
    exact = map_vocab(source, target, "exact")
    target_ids = {token: index for index, token in reversed(list(enumerate(target))) if token}
    unmatched = [index for index, token in enumerate(source) if token and token not in target_ids]
    matched = [index for index, token in enumerate(source) if token in target_ids]
    assert len(unmatched) > 300 and len(matched) > 300
    assert all(exact[index] == mapping[index] == target_ids[source[index]] for index in matched)
    assert (exact[unmatched] == -1).all() and (mapping[unmatched] >= 0).all()
    rng = random.Random(3)
    sample = rng.sample(unmatched, 200) + rng.sample(matched, 50)
    assert mapping[sample].tolist() == [brute_force_nearest(source[index], target) for index in sample]
    specials = [index for index, token in enumerate(source) if not token]
    assert specials and (mapping[specials] == -1).all()
    assert mapping.dtype == np.int64 and len(mapping) == len(source)
