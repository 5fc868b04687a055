"""Vocabulary map from a source tokenizer to a target tokenizer, on the tokens' bytes (see token_bytes).

`exact`: the target token with the same bytes. `min_ed` (FuseLLM's): the exact match if there is one, else the
target token at minimum Levenshtein distance over bytes. Ties go to the smallest target id, which is what FuseLLM's
brute force gives when it scans the vocabulary in id order and keeps the first minimum. `prefix` (this project's):
the exact match, else the longest target token that the source token's bytes start with, i.e. the piece a target
tokenization of those bytes most likely starts with, so a teacher's probability that the text continues with
" selfish" goes to the target's " self" and never to a look-alike such as " shelf". Tokens without bytes (special
tokens) neither map nor are mapped to: their entry is -1.

FuseLLM scans the whole target vocabulary for every source token (64 processes). Here a token is searched by rising
lower bound instead: the bag distance max(|a|, |b|) - (bytes the two have in common, as multisets) never exceeds the
edit distance, costs a few vector operations over the whole vocabulary, and the exact distances are only computed for
targets whose bound is at most the best distance found so far, level by level.
"""
from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence

import numpy as np

from fusesoup.align.edit_distance import PaddedBytes, pairwise_edit_distances
from fusesoup.align.spans import Segmenter
from fusesoup.errors import lookup
from fusesoup.params import VocabMethod


def no_fallback(unmatched: Sequence[bytes], targets: Segmenter, target_bytes: Sequence[bytes]) -> list[int]:
    """`exact`: a source token without a same-bytes target token maps to nothing."""
    return [-1] * len(unmatched)


def longest_prefix(unmatched: Sequence[bytes], targets: Segmenter, target_bytes: Sequence[bytes]) -> list[int]:
    """`prefix`: the longest target token each source token's bytes start with (an exact match is already taken)."""
    found = [targets.longest_token(token) for token in unmatched]
    return [-1 if match is None else match[0] for match in found]


def nearest_bytes(unmatched: Sequence[bytes], targets: Segmenter, target_bytes: Sequence[bytes]) -> list[int]:
    """`min_ed`: the target token at the smallest byte edit distance (ties: the smallest id)."""
    nearest = NearestTokens(target_bytes)
    return [nearest.find(token) for token in unmatched]


# method -> the target id of each source token without an exact match
VOCAB_MAPS: dict[VocabMethod, Callable[[Sequence[bytes], Segmenter, Sequence[bytes]], list[int]]] = {
    "exact": no_fallback, "min_ed": nearest_bytes, "prefix": longest_prefix}


def map_vocab(
    source_bytes: Sequence[bytes], target_bytes: Sequence[bytes], method: VocabMethod = "min_ed"
) -> np.ndarray:
    """int64 array of len(source_bytes): the target id of each source id, -1 where there is none (see module doc)."""
    fallback = lookup(VOCAB_MAPS, method, "vocabulary mapping (align.vocab)")
    targets = Segmenter(target_bytes)  # .ids: each non-empty target token's bytes -> its smallest id
    mapping = np.fromiter((targets.ids.get(token, -1) for token in source_bytes), np.int64, len(source_bytes))
    unmatched = [source_id for source_id, token in enumerate(source_bytes) if token and mapping[source_id] < 0]
    if unmatched and targets.ids:
        mapping[unmatched] = fallback([source_bytes[source_id] for source_id in unmatched], targets, target_bytes)
    return mapping


def padded_map(source_bytes: Sequence[bytes], target_bytes: Sequence[bytes], vocab_size: int,
               method: VocabMethod) -> np.ndarray:
    """map_vocab over the source tokenizer's ids, -1 for the model's extra (padding) ids up to its `vocab_size`."""
    mapping = np.full(vocab_size, -1, np.int64)
    known = map_vocab(source_bytes, target_bytes, method)[:vocab_size]
    mapping[: len(known)] = known
    return mapping


class NearestTokens:
    """Index of a target vocabulary for `find`: the smallest id among the non-empty tokens nearest to a byte string."""

    def __init__(self, target_bytes: Sequence[bytes]):
        self.ids = np.array([index for index, token in enumerate(target_bytes) if token], np.int64)
        self.tokens = PaddedBytes.of([target_bytes[index] for index in self.ids])
        # byte_counts[b, t]: how often byte b occurs in token t (uint16: no token repeats a byte 65536 times).
        lengths = self.tokens.lengths
        inside = np.arange(self.tokens.matrix.shape[1]) < lengths[:, None]
        token_of_byte = np.broadcast_to(np.arange(len(self.ids))[:, None], inside.shape)[inside]
        self.byte_counts = np.zeros((256, len(self.ids)), np.uint16)
        np.add.at(self.byte_counts, (self.tokens.matrix[inside], token_of_byte), 1)

    def find(self, query: bytes) -> int:
        """Target id at minimum edit distance from `query` (non-empty); the smallest such id on ties."""
        bound = self._bag_distance(query)
        query_tokens = PaddedBytes.of([query])
        best_distance, best_id = np.iinfo(np.int64).max, -1
        level = int(bound.min())
        while level <= best_distance:  # a target at the next level may still tie with a smaller id
            candidates = np.flatnonzero(bound == level)  # ascending, so argmin below is the smallest id
            if len(candidates):
                distances = pairwise_edit_distances(query_tokens, self.tokens.take(candidates))[0]
                nearest = int(distances.argmin())
                candidate_id = int(self.ids[candidates[nearest]])
                if (distances[nearest], candidate_id) < (best_distance, best_id):
                    best_distance, best_id = int(distances[nearest]), candidate_id
            level += 1  # every target left has a bound, so a distance, of at least `level`
        return best_id

    def _bag_distance(self, query: bytes) -> np.ndarray:
        """max(|query|, |target|) - shared bytes (as multisets), for every target: a lower bound of edit distance."""
        shared = np.zeros(len(self.ids), np.int64)
        for byte, count in Counter(query).items():
            shared += np.minimum(self.byte_counts[byte], count)
        return np.maximum(self.tokens.lengths, len(query)) - shared
