"""How one sequence's teacher outputs become a compact row, and back: pure numpy, no I/O.

Per text token j (the position that predicts it from [BOS] + tokens < j) a row keeps:
- `input_ids`: the token ids, in the smallest unsigned type that holds the vocabulary (lossless);
- `start_gaps`, `lengths`: the token's character span in the text (the fast tokenizer's offsets), stored as
  start - previous end (int32: 0 or small; negative where two byte tokens share a character) and end - start;
- `topk_ids`: the k most likely ids, most likely first (lossless, same type as input_ids);
- `topk_codes`: their log-probs quantised as code = round(-logprob / LOGPROB_STEP), clipped to 0..255, then
  delta-coded along k (first code absolute, then the non-negative steps down the sorted list) so zstd sees
  small numbers. Decoding gives logprob = -code * LOGPROB_STEP: absolute error <= LOGPROB_STEP / 2 for
  log-probs above -255 * LOGPROB_STEP (about -15.9 nats; below that the entry holds < 1.2e-7 of the mass);
- `ce_codes`: the cross-entropy of the realised token, -log p(token j), quantised at CE_STEP in uint16
  (error <= CE_STEP / 2 up to CE_MAX nats, clipped above).
Measured on the offline default (k = 10): about 17 bytes per position after zstd, mean KL ~1e-4 nats.
The renormalised top-k distribution changes by about LOGPROB_STEP**2 / 24 nats of KL (measured in bench/).
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

CODEC = "topk-uint8-delta-v1"  # part of the store's content key: a new scheme never reads old shards
LOGPROB_STEP = 1 / 16  # nats per uint8 code step
CE_STEP = 1 / 256  # nats per uint16 code step
CE_MAX = 65535 * CE_STEP  # 256 nats


class SequenceLogits(NamedTuple):
    """One sequence's teacher outputs; n = number of text tokens, k = top-k."""

    input_ids: np.ndarray  # [n] int64
    starts: np.ndarray  # [n] int64, character offsets into the text
    ends: np.ndarray  # [n] int64
    topk_ids: np.ndarray  # [n, k] int64, most likely first
    topk_logprobs: np.ndarray  # [n, k] float32, log-probs over the full vocabulary, descending
    ce: np.ndarray  # [n] float32, -log p(input_ids[j] | prefix)


def id_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned integer type that holds every id below vocab_size."""
    for dtype in (np.uint8, np.uint16, np.uint32):
        if vocab_size - 1 <= np.iinfo(dtype).max:
            return np.dtype(dtype)
    raise ValueError(f"vocabulary of {vocab_size} ids does not fit uint32")


def quantize_logprobs(logprobs: np.ndarray) -> np.ndarray:
    """[n, k] descending log-probs -> [n, k] uint8 delta codes (see the module docstring)."""
    codes = np.clip(np.rint(-np.asarray(logprobs, dtype=np.float64) / LOGPROB_STEP), 0, 255).astype(np.int16)
    codes = np.maximum.accumulate(codes, axis=1)  # guards against ties broken the other way by rounding
    deltas = np.diff(codes, axis=1, prepend=0)
    return deltas.astype(np.uint8)


def dequantize_logprobs(deltas: np.ndarray) -> np.ndarray:
    """[n, k] uint8 delta codes -> [n, k] float32 log-probs."""
    return (np.cumsum(deltas.astype(np.int32), axis=1) * -LOGPROB_STEP).astype(np.float32)


def quantize_ce(ce: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(np.asarray(ce, dtype=np.float64) / CE_STEP), 0, 65535).astype(np.uint16)


def dequantize_ce(codes: np.ndarray) -> np.ndarray:
    return (codes.astype(np.float32) * CE_STEP).astype(np.float32)


def encode(sequence: SequenceLogits, vocab_size: int) -> dict[str, np.ndarray]:
    """A sequence -> the flat column arrays of its stored row (top-k arrays flattened row-major)."""
    n, k = sequence.topk_ids.shape
    ids = id_dtype(vocab_size)
    if n and (sequence.topk_ids.max() >= vocab_size or sequence.input_ids.max() >= vocab_size):
        raise ValueError(f"an id is >= the vocabulary size {vocab_size}")
    return {
        "input_ids": sequence.input_ids.astype(ids),
        "start_gaps": (sequence.starts - np.concatenate([[0], sequence.ends[:-1]])).astype(np.int32),
        "lengths": (sequence.ends - sequence.starts).astype(np.int32),
        "topk_ids": sequence.topk_ids.astype(ids).reshape(n * k),
        "topk_codes": quantize_logprobs(sequence.topk_logprobs).reshape(n * k),
        "ce_codes": quantize_ce(sequence.ce),
    }


def decode(columns: dict[str, np.ndarray], k: int) -> SequenceLogits:
    """The inverse of `encode` (log-probs and CE up to their quantisation steps)."""
    n = len(columns["input_ids"])
    lengths = np.asarray(columns["lengths"], dtype=np.int64)
    ends = np.cumsum(np.asarray(columns["start_gaps"], dtype=np.int64) + lengths)
    return SequenceLogits(
        input_ids=np.asarray(columns["input_ids"], dtype=np.int64),
        starts=ends - lengths,
        ends=ends,
        topk_ids=np.asarray(columns["topk_ids"], dtype=np.int64).reshape(n, k),
        topk_logprobs=dequantize_logprobs(np.asarray(columns["topk_codes"]).reshape(n, k)),
        ce=dequantize_ce(np.asarray(columns["ce_codes"])),
    )


def renormalized_kl(exact_logprobs: np.ndarray, stored_logprobs: np.ndarray) -> np.ndarray:
    """Per-position KL(exact || stored) in nats between the two top-k distributions, each renormalised."""
    def log_normalize(logprobs: np.ndarray) -> np.ndarray:
        logprobs = np.asarray(logprobs, dtype=np.float64)
        top = logprobs.max(axis=1, keepdims=True)
        return logprobs - top - np.log(np.exp(logprobs - top).sum(axis=1, keepdims=True))

    p, q = log_normalize(exact_logprobs), log_normalize(stored_logprobs)
    return (np.exp(p) * (p - q)).sum(axis=1)
