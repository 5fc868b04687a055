"""Teacher distributions for target positions inside a span: an alignment group that is not one-to-one.

Where the teacher's tokens i..i+m-1 and the target's tokens t_1..t_n cover the same bytes with m > 1 or n > 1, no
teacher row predicts a target token on its own. FuseLLM (and `align.spans: onehot`) puts a one-hot on the realised
target token there: on the offline default that is 30-40% of positions without any teacher knowledge. `expand`
instead reads the span as the teacher's distribution over byte strings, along the realised path:

    string                     probability
    prefix_d + bytes(x)        p(r_1 .. r_d) * p(x | r_1 .. r_d)   x in top-k of teacher row i+d, x != r_(d+1)
    bytes(r_1 .. r_m)          p(r_1 .. r_m)                       the realised span, spelled t_1 .. t_n

(prefix_d = bytes of the realised r_1..r_d, their probabilities from the stored CE). Each string is cut into target
tokens by greedy longest match (`Segmenter`), the realised one into t_1..t_n. Target position q of the span then
gets, over the strings whose tokens start with t_1..t_(q-1), the mass of their q-th token: the teacher's
marginal over the target's next token there. Strings that end before token q carry no information and drop out.

A span at the start of the text reads every string with the target's word-start space in front (`Leads`), the
teacher's own dropped from its first row's candidates, so it is cut into the tokens the target emits there.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

from fusesoup.logits.codec import SequenceLogits


class Leads(NamedTuple):
    """The word-start space (b" " or b"") each tokenizer put in front of a text's first token (prepended_space)."""

    teacher: bytes = b""
    target: bytes = b""

    def first_row_bytes(self, teacher_bytes: Sequence[bytes]) -> list[bytes]:
        """The teacher's vocabulary as it reads at the start of this text, spelled as the target would spell it
        there: its own space dropped, the target's put in front (special tokens stay b"")."""
        return [self.target + token.removeprefix(self.teacher) if token else b"" for token in teacher_bytes]


class Segmenter:
    """Greedy longest-match segmentation of byte strings into target token ids (memoised)."""

    def __init__(self, target_bytes: Sequence[bytes]):
        self.ids: dict[bytes, int] = {}
        for index, token in enumerate(target_bytes):
            if token:
                self.ids.setdefault(token, index)
        self.longest = max(map(len, self.ids), default=0)
        self.memo: dict[bytes, tuple[int, ...] | None] = {}

    def longest_token(self, text: bytes, start: int = 0) -> tuple[int, int] | None:
        """(id, end) of the longest target token that `text[start:]` starts with; None if there is none."""
        for end in range(min(len(text), start + self.longest), start, -1):
            found = self.ids.get(text[start:end])
            if found is not None:
                return found, end
        return None

    def segment(self, text: bytes) -> tuple[int, ...] | None:
        """Target ids whose bytes join to `text`, each the longest token that fits; None if some byte has none."""
        if text not in self.memo:
            ids, start = [], 0
            while start < len(text) and (token := self.longest_token(text, start)) is not None:
                ids.append(token[0])
                start = token[1]
            self.memo[text] = tuple(ids) if start == len(text) else None
        return self.memo[text]


def span_strings(teacher: SequenceLogits, span: range, teacher_pieces: Sequence[bytes],
                 teacher_bytes: Sequence[bytes], leads: Leads = Leads()) -> tuple[list[bytes], np.ndarray]:
    """The strings of the table above except the realised one, with their log-probabilities; then the realised
    span's log-probability as the last entry of the array (a span at row 0 read as `Leads` says)."""
    strings, logprobs = [], []
    recast = span.start == 0 and leads.teacher != leads.target
    prefix, prefix_logprob = leads.target if recast else b"", 0.0
    for row in span:
        realised = teacher.input_ids[row]
        dropped = leads.teacher if recast and row == 0 else b""
        for token, logprob in zip(teacher.topk_ids[row].tolist(), teacher.topk_logprobs[row].tolist()):
            if token != realised and token < len(teacher_bytes) and teacher_bytes[token]:
                strings.append(prefix + teacher_bytes[token].removeprefix(dropped))
                logprobs.append(prefix_logprob + logprob)
        prefix += teacher_pieces[row]
        prefix_logprob -= float(teacher.ce[row])
    return strings, np.array(logprobs + [prefix_logprob], np.float64)


def expand_span(teacher: SequenceLogits, span: range, targets: range, target_ids: np.ndarray,
                teacher_pieces: Sequence[bytes], teacher_bytes: Sequence[bytes],
                segmenter: Segmenter, leads: Leads = Leads()) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Loose entries (target row, target id, unnormalised probability) for the target rows `targets` of a span;
    every row gets at least its realised token. Rows are renormalised later (transfer.merge_entries)."""
    strings, logprobs = span_strings(teacher, span, teacher_pieces, teacher_bytes, leads)
    realised = tuple(target_ids[targets.start : targets.stop].tolist())
    probs = np.exp(logprobs - logprobs.max())
    rows, ids, masses = [], [], []
    for tokens, mass in zip([segmenter.segment(s) for s in strings] + [realised], probs.tolist()):
        if tokens is None:
            continue
        for q in range(min(len(tokens), len(realised))):
            rows.append(targets.start + q)
            ids.append(tokens[q])
            masses.append(mass)
            if tokens[q] != realised[q]:
                break  # later target rows condition on the realised token here: this string leaves them
    return np.array(rows, np.int64), np.array(ids, np.int64), np.array(masses, np.float64)
