"""Sampled teacher rows (random-sampling KD, Anshumann et al., ACL 2025): k ids drawn per position from the teacher's
softmax, each weighted so that the stored row is an unbiased estimate of the whole distribution.

Why: a top-k row renormalised is a biased target. Its soft-label CE is minimised by a student that puts all its mass
on those k ids, and the teacher's uncertainty (the mass beyond them) is lost. A row of draws is not: with the
proposal q = p (temperature 1) each draw weighs 1/k, the row is the empirical distribution p_hat of the draws, and
E[p_hat] = p, so the soft-label CE against it with the student's full softmax, -sum_v p_hat(v) log s(v), has the
expectation of full KD's CE, and its gradient in the logits, s - p_hat, the expectation of s - p. With a proposal
temperature T != 1 the draws come from q ~ p^(1/T) (T > 1 reaches further into the tail) and each draw weighs
p / q, normalised over the row's k draws (self-normalised importance sampling: consistent, biased by O(1/k)).

The draws of corpus row r use uniforms seeded by r alone, so a store does not depend on batching or workers.
"""
from __future__ import annotations

import numpy as np
import torch

SAMPLE_SEED = 20250701  # fixes every store's draws; part of the store's key through the codec name


def row_uniforms(row: int, positions: int, draws: int) -> np.ndarray:
    """[positions, draws] float32 uniforms in [0, 1) of corpus row `row`."""
    return np.random.default_rng([SAMPLE_SEED, row]).random((positions, draws)).astype(np.float32)


def sample_rows(logprobs: torch.Tensor, uniforms: torch.Tensor, temperature: float = 1.0
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """[R, V] full log-probs and [R, k] uniforms -> (log importance weights, ids), each [R, k]: the ids drawn by
    inverse CDF from softmax(logprobs / temperature), the weights p / q normalised over each row (log(1 / k) each at
    temperature 1), a row's draws sorted by weight (most first), equal weights by id, so repeats sit together."""
    proposal = logprobs if temperature == 1.0 else torch.log_softmax(logprobs / temperature, dim=-1)
    cdf = proposal.exp().cumsum(dim=-1)  # [R, V]
    ids = torch.searchsorted(cdf, uniforms * cdf[:, -1:], right=True).clamp(max=logprobs.shape[-1] - 1)
    log_weights = logprobs.gather(-1, ids) - proposal.gather(-1, ids)
    log_weights = log_weights - log_weights.logsumexp(dim=-1, keepdim=True)
    ids, by_id = ids.sort(dim=-1)
    log_weights, by_weight = log_weights.gather(-1, by_id).sort(dim=-1, descending=True, stable=True)
    return log_weights, ids.gather(-1, by_weight)
