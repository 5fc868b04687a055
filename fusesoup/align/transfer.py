"""A teacher's stored top-k distributions moved onto the target's tokens and vocabulary, one sequence at a time.

Convention (as in the logit store): row i is the distribution over the token AT position i given the tokens
before it, so a target row that cannot take a teacher's distribution falls back to a one-hot on target token i
itself, the token that row predicts (FuseLLM's reference puts it on the token before: issue #27 there).

Rules per alignment group (from `offset_align` or a DTW path):
- one teacher token <-> one target token: the teacher's top-k ids go through the vocabulary map, ids that map to
  the same target id are merged (probabilities added), unmapped ids (-1) dropped, the rest renormalised;
- one teacher token -> several target tokens, several -> one, or several -> several (a span): with `spans`
  (align.spans: expand) the teacher's distribution over the span's byte strings, cut into target tokens (spans.py);
  else a one-hot on each target token. The teacher's CE is carried so that sums are kept: a span's CE (the
  teacher's cost of producing those bytes) is split evenly over its target positions, so per-sequence CE compares
  across teachers and per-token CE stays usable.
- the text's first token: where one tokenizer puts a word-start space in front of the text (SentencePiece's `▁`)
  and the other does not (byte-level BPE), the teacher's candidates there stand for their bytes without its space
  and are spelled with the target's: `first_map` (Leads.first_row_bytes through the same vocabulary mapping) takes
  the place of the vocabulary map on row 0, and a span at the start reads its strings the same way (spans.py).
- where a group's first target row falls back to a one-hot, the teacher's top-k log-probs at the group's first
  teacher row (the same text before both, so both predict how it goes on) are kept by rank (`ranks`), for rank
  matching (ULD, train.uld_weight), which needs no shared vocabulary.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

from fusesoup.align.spans import Leads, Segmenter, expand_span
from fusesoup.logits.codec import SequenceLogits
from fusesoup.logits.sparse import RankRows, SparseRows, fill_empty_rows, merge_entries

# status of a target position: same bytes, agreed through the vocab map, one-hot, expanded from a span
EXACT, MAPPED, FALLBACK, SPAN = 0, 1, 2, 3


class AlignedSequence(NamedTuple):
    """A teacher's distributions on the target's n tokens."""

    rows: SparseRows  # n rows of target ids, most likely first, renormalised over the kept entries
    ce: np.ndarray  # [n] float32: the teacher's cross-entropy carried onto target positions
    status: np.ndarray  # [n] uint8: EXACT, MAPPED, FALLBACK or SPAN
    group_end: np.ndarray  # [n] uint8: 1 at the last target position of each alignment group (a chunk both
    #                        tokenizations cut the same way: the unit of chunk-level likelihood matching)
    ranks: RankRows  # the teacher's top-k by rank at the group starts that fell back (module docstring)


class SpanInputs(NamedTuple):
    """What `expand_span` needs besides the stored rows (see spans.py)."""

    teacher_pieces: Sequence[bytes]  # the bytes of each teacher token in this text (text_token_bytes)
    teacher_bytes: Sequence[bytes]  # the teacher's vocabulary (token_bytes)
    segmenter: Segmenter  # over the target tokens a target tokenization can emit
    leads: Leads = Leads()  # the word-start spaces in front of this text


def mapped_entries(positions: np.ndarray, topk_ids: np.ndarray, topk_logprobs: np.ndarray, vocab_map: np.ndarray,
                   first_map: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Teacher top-k rows [m, k] as loose entries (target row from `positions` [m], ascending; mapped id,
    probability); target row 0 maps through `first_map` if given; unmapped ids (-1) dropped. merge_entries then
    merges duplicates and renormalises."""
    mapped = vocab_map[topk_ids]
    if first_map is not None and len(positions) and positions[0] == 0:
        mapped[0] = first_map[topk_ids[0]]
    keep = mapped >= 0
    rows = np.broadcast_to(np.asarray(positions)[:, None], mapped.shape)
    return rows[keep], mapped[keep], np.exp(topk_logprobs[keep].astype(np.float64))


def transfer_groups(groups: Sequence[tuple[range, range]], teacher: SequenceLogits, target_ids: np.ndarray,
                    vocab_map: np.ndarray, agree: np.ndarray, target_vocab_size: int,
                    spans: SpanInputs | None = None, first_map: np.ndarray | None = None,
                    keep_tail: bool = False) -> AlignedSequence:
    """Apply the rules above to alignment groups (teacher token range, target token range) covering both sides.

    `agree[j]` says whether teacher token j, when it is alone in its group opposite a single target token, stands
    for that target token (EXACT if the bytes are equal, MAPPED if only through the vocabulary map, -1 if not):
    a disagreeing one-to-one pair falls back to a one-hot too. Rows keep at most k entries (the teacher's k);
    with `keep_tail` (align.tail) they keep the teacher's probabilities as they are, so the mass beyond the top k
    and that of unmapped ids stays out of the row, as its tail.
    """
    n = len(target_ids)
    bounds = np.array([(a.start, a.stop, b.start, b.stop) for a, b in groups], np.int64).reshape(-1, 4)
    teacher_start, teacher_stop, target_start, target_stop = bounds.T
    if n == 0 or target_start[0] != 0 or target_stop[-1] != n or (target_start[1:] != target_stop[:-1]).any():
        raise ValueError(f"the alignment groups do not cover the {n} target tokens in order")
    one_to_one = (teacher_stop - teacher_start == 1) & (target_stop - target_start == 1)
    j, i = teacher_start[one_to_one], target_start[one_to_one]
    agreeing = agree[j] >= 0
    j, i = j[agreeing], i[agreeing]
    entries = [mapped_entries(i, teacher.topk_ids[j], teacher.topk_logprobs[j], vocab_map, first_map)]
    span_rows = np.zeros(0, np.int64)
    if spans is not None:
        span_groups = [group for group, alone in zip(groups, one_to_one) if not alone]
        entries += [expand_span(teacher, span, targets, target_ids, spans.teacher_pieces, spans.teacher_bytes,
                                spans.segmenter, spans.leads) for span, targets in span_groups]
        span_rows = np.array([row for _, targets in span_groups for row in targets], np.int64)
    rows = merge_entries(*(np.concatenate(column) for column in zip(*entries)), n, target_vocab_size,
                         max_entries=teacher.topk_ids.shape[1], keep_tail=keep_tail)
    status = np.full(n, FALLBACK, np.uint8)
    translated = rows.counts[i] > 0
    status[i[translated]] = agree[j[translated]]
    status[span_rows[rows.counts[span_rows] > 1]] = SPAN  # one entry: only the realised token, a one-hot

    ce_sums = np.concatenate([[0.0], np.cumsum(teacher.ce, dtype=np.float64)])
    lengths = target_stop - target_start
    ce = np.repeat((ce_sums[teacher_stop] - ce_sums[teacher_start]) / lengths, lengths).astype(np.float32)
    group_end = np.zeros(n, np.uint8)
    group_end[target_stop - 1] = 1
    fell_back = status[target_start] == FALLBACK
    ranks = RankRows(target_start[fell_back], teacher.topk_logprobs[teacher_start[fell_back]].astype(np.float32))
    return AlignedSequence(fill_empty_rows(rows, target_ids), ce, status, group_end, ranks)


def groups_from_path(path: Sequence[tuple[int, int]]) -> list[tuple[range, range]]:
    """DTW path pairs (teacher j, target i) -> groups: connected runs where a token repeats on either side."""
    groups: list[tuple[range, range]] = []
    for j, i in path:
        if groups:
            last_teacher, last_target = groups[-1]
            if j == last_teacher.stop - 1 or i == last_target.stop - 1:
                groups[-1] = (range(last_teacher.start, j + 1), range(last_target.start, i + 1))
                continue
        groups.append((range(j, j + 1), range(i, i + 1)))
    return groups


def agreement(teacher_ids: np.ndarray, teacher_bytes: Sequence[bytes], target_bytes: Sequence[bytes],
              target_ids: np.ndarray, vocab_map: np.ndarray, groups: Sequence[tuple[range, range]],
              first_map: np.ndarray | None = None) -> np.ndarray:
    """Per teacher token: EXACT / MAPPED if it stands for the target token opposite it in a one-to-one group, else -1
    (the first token through `first_map` if given)."""
    agree = np.full(len(teacher_ids), -1, dtype=np.int8)
    for teacher_range, target_range in groups:
        if len(teacher_range) == 1 and len(target_range) == 1:
            j, i = teacher_range.start, target_range.start
            if teacher_bytes[j] == target_bytes[i]:
                agree[j] = EXACT
            elif (vocab_map if first_map is None or j else first_map)[teacher_ids[j]] == target_ids[i]:
                agree[j] = MAPPED
    return agree
