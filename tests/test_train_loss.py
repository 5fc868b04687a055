"""The sparse fusion loss and the chunk likelihood loss against dense references, and the CLM term."""
from __future__ import annotations

import numpy as np
import torch

import math

import pytest

from fusesoup.logits.sampling import sample_rows
from fusesoup.logits.sparse import merge_entries
from fusesoup.logits.sparse import RankRows
from fusesoup.train.loss import (binary_kl, chunk_likelihood_loss, clm_loss, dense_fusion_loss, fusion_loss,
                                 pad_chunks, pad_ranks, pad_targets, rank_matching_loss, student_log_probs)


def test_sparse_fusion_loss_equals_the_dense_soft_label_cross_entropy():
    torch.manual_seed(0)
    vocab, width = 11, 4
    first = merge_entries(np.array([0, 0, 1, 2, 2, 2]), np.array([3, 4, 5, 1, 2, 3]),
                          np.array([0.6, 0.4, 1.0, 0.2, 0.3, 0.5]), 3, vocab)
    second = merge_entries(np.array([0, 1, 1, 2, 3]), np.array([7, 8, 9, 10, 0]), np.array([1.0, 0.5, 0.5, 1.0, 1.0]),
                           4, vocab)
    targets = pad_targets([first, second], width)
    assert targets.ids.shape == (2, width, 3)
    logits = torch.randn(2, width, vocab, requires_grad=True)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 1]])
    dense = torch.zeros(2, width, vocab)
    for b, rows in enumerate([first, second]):
        for entry, row in enumerate(rows.rows_of_entries()):
            dense[b, row, rows.ids[entry]] = float(np.exp(rows.logprobs[entry]))
    log_q = torch.log_softmax(logits, -1)
    expected = (-(dense * log_q).sum(-1) * mask).sum() / mask.sum()
    torch.testing.assert_close(fusion_loss(student_log_probs(logits), targets, mask), expected)
    entropy = -(dense * torch.log(dense.clamp(min=1e-30))).sum(-1)
    torch.testing.assert_close(fusion_loss(student_log_probs(logits), targets, mask, "kl"), expected - (entropy * mask).sum() / mask.sum())
    # a student equal to the targets has zero KL
    perfect = torch.log(dense.clamp(min=1e-12))
    assert fusion_loss(student_log_probs(perfect), targets, mask, "kl").abs() < 1e-5
    # topk: the student renormalised over each row's ids (a one-hot row adds nothing)
    held = dense > 0
    conditional = torch.log_softmax(logits.masked_fill(~held, float("-inf")), -1)
    within = -(dense * torch.where(held, conditional, torch.zeros_like(conditional))).sum(-1)
    assert within[0, 1] == 0 and within[1, 3] == 0  # the one-hot rows
    topk = fusion_loss(student_log_probs(logits), targets, mask, "topk")
    torch.testing.assert_close(topk, (within * mask).sum() / mask.sum())
    # its gradient leaves the rows' total mass alone: the same loss for logits shifted on the held ids
    shifted = logits.detach() + 5.0 * held
    torch.testing.assert_close(fusion_loss(student_log_probs(shifted), targets, mask, "topk"), topk.detach())


def test_clm_loss_is_the_masked_mean_cross_entropy():
    torch.manual_seed(1)
    logits, labels = torch.randn(2, 3, 5), torch.tensor([[1, 2, 3], [4, 0, 0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    each = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="none")
    torch.testing.assert_close(clm_loss(student_log_probs(logits), labels, mask), each[mask.flatten().bool()].mean())


@pytest.mark.parametrize("temperature", [1.0, 10.0])
def test_chunk_likelihood_loss_equals_the_dense_bernoulli_kl_of_each_chunk(temperature):
    torch.manual_seed(2)
    vocab, width = 7, 6
    rows = [(np.array([0, 0, 1, -1, 2, 2]), np.array([1.5, 0.7, 4.0])),  # a label without a chunk
            (np.array([-1, 0, 0, 0]), np.array([2.5]))]  # a shorter row: padded
    chunks = pad_chunks(*zip(*rows), width)
    assert chunks.of.tolist() == [[0, 0, 1, -1, 2, 2], [-1, 3, 3, 3, -1, -1]]
    logits = torch.randn(2, width, vocab, requires_grad=True)
    labels = torch.randint(0, vocab, (2, width))
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]], dtype=torch.bool)
    loss = chunk_likelihood_loss(student_log_probs(logits), labels, chunks, mask, temperature)
    # reference, one chunk at a time in float64: p = exp(-ce / tau), q = prod q(label)^(1 / tau)
    log_q = torch.log_softmax(logits.detach().double(), -1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    total = 0.0
    for b, (of, ces) in enumerate(rows):
        for c, ce in enumerate(ces):
            where = np.flatnonzero(of == c)
            p, q = math.exp(-ce / temperature), math.exp(float(log_q[b, where].sum()) / temperature)
            total += len(where) * (p * math.log(p / q) + (1 - p) * math.log((1 - p) / (1 - q)))
    assert loss.item() == pytest.approx(total / 10, rel=1e-5)  # over the 10 masked-in positions
    loss.backward()
    assert logits.grad[0, 3].abs().sum() == 0 and logits.grad[1, 0].abs().sum() == 0  # no chunk, no gradient
    # a chunk with a masked label is left out whole; a silent micro-batch adds nothing
    partly = mask.clone()
    partly[1, 2] = False
    left = chunk_likelihood_loss(student_log_probs(logits), labels, chunks, partly, temperature, positions=10.0)
    first_row = chunk_likelihood_loss(student_log_probs(logits[:1]), labels[:1], pad_chunks(*zip(*rows[:1]), width),
                                      mask[:1], temperature, positions=10.0)
    torch.testing.assert_close(left, first_row)
    silent = chunk_likelihood_loss(student_log_probs(logits), labels, chunks, torch.zeros_like(mask), temperature, 10.0)
    assert silent.item() == 0


def test_binary_kl_is_zero_at_equal_likelihoods_and_finite_at_the_ends():
    log_p = torch.tensor([-1e-9, -0.1, -3.0, -80.0], dtype=torch.float64)
    torch.testing.assert_close(binary_kl(log_p, log_p), torch.zeros(4, dtype=torch.float64))
    assert torch.isfinite(binary_kl(log_p, torch.tensor([0.0, -50.0, -1e-12, -1.0], dtype=torch.float64))).all()


def test_rank_matching_loss_equals_the_dense_l1_between_sorted_distributions():
    torch.manual_seed(3)
    vocab, width, k = 9, 5, 4
    teacher = np.log(np.array([[0.6, 0.2, 0.1, 0.05], [0.3, 0.3, 0.2, 0.1], [0.9, 0.05, 0.01, 0.0]], np.float32))
    rows = [RankRows(np.array([1, 4]), teacher[:2]), RankRows(np.array([0]), teacher[2:])]
    ranks = pad_ranks(rows, width)
    assert ranks.rows.tolist() == [1, 4, 5]  # b * width + j
    logits = torch.randn(2, width, vocab, requires_grad=True)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]], dtype=torch.bool)
    loss = rank_matching_loss(student_log_probs(logits), ranks, mask)
    student = torch.softmax(logits.detach().double(), -1)
    total = 0.0
    for (b, j), p in zip([(0, 1), (0, 4), (1, 0)], np.exp(teacher.astype(np.float64))):
        q = np.sort(student[b, j].numpy())[::-1][:k]  # the student's probabilities, largest first
        total += np.abs(p - q).sum()
    assert loss.item() == pytest.approx(total / 8, rel=1e-5)  # over the 8 masked-in positions
    loss.backward()
    assert logits.grad[0, 0].abs().sum() == 0 and logits.grad[0, 1].abs().sum() > 0  # only rows with a teacher row
    # a masked label adds nothing; a student that matches the teacher's sorted top-k exactly has no loss there
    assert rank_matching_loss(student_log_probs(logits), ranks, torch.zeros_like(mask)).item() == 0
    exact = torch.full((1, 1, vocab), -30.0)
    exact[0, 0, [7, 2, 5]] = torch.log(torch.tensor([0.5, 0.3, 0.2]))
    one = RankRows(np.array([0]), np.log(np.array([[0.5, 0.3, 0.2]], np.float32)))
    assert rank_matching_loss(student_log_probs(exact), pad_ranks([one], 1), torch.ones(1, 1, dtype=torch.bool)) < 1e-5


def sampled_targets(teacher: torch.Tensor, draws: int, seed: int, temperature: float = 1.0):
    """[R, V] teacher log-probs -> their sampled rows (logits/sampling.py) as one sequence's padded SparseTargets."""
    rows, vocab = teacher.shape
    uniforms = torch.from_numpy(np.random.default_rng(seed).random((rows, draws)).astype(np.float32))
    log_weights, ids = sample_rows(teacher, uniforms, temperature)
    sparse = merge_entries(np.repeat(np.arange(rows), draws), ids.numpy().ravel(), log_weights.exp().numpy().ravel(),
                           rows, vocab)
    return pad_targets([sparse], rows)


@pytest.mark.parametrize("temperature, draws, tolerance", [(1.0, 12, 0.01), (2.0, 64, 0.02)])
def test_sampled_rows_estimate_the_dense_kd_gradient_without_bias(temperature, draws, tolerance):
    """The soft-label CE against a row of draws, the student's full softmax: its mean gradient over many seeds is
    the gradient of the CE against the whole teacher distribution (temperature 1: exactly unbiased; 2:
    self-normalised weights, biased O(1 / draws)); the renormalised top-k's is not."""
    torch.manual_seed(0)
    rows, vocab = 6, 40
    teacher = torch.log_softmax(torch.randn(rows, vocab) * 1.5, dim=-1)
    logits = torch.randn(1, rows, vocab, requires_grad=True)
    mask = torch.ones(1, rows, dtype=torch.bool)

    def gradient(targets) -> torch.Tensor:
        logits.grad = None
        fusion_loss(student_log_probs(logits), targets, mask).backward()
        return logits.grad.clone()

    dense = torch.softmax(logits.detach(), -1) - teacher.exp()  # d CE(p, softmax(z)) / dz, per position
    mean = torch.stack([gradient(sampled_targets(teacher, draws, seed, temperature)) for seed in range(2000)]).mean(0)
    assert (mean * rows - dense).abs().max() < tolerance  # the loss is a mean over the rows
    top = teacher.topk(10, dim=-1)
    truncated = merge_entries(np.repeat(np.arange(rows), 10), top.indices.numpy().ravel(),
                              top.values.exp().numpy().ravel(), rows, vocab)
    assert (gradient(pad_targets([truncated], rows)) * rows - dense).abs().max() > 5 * tolerance


def test_a_live_teacher_s_fusion_term_is_the_dense_soft_label_cross_entropy():
    """dense_fusion_loss over the whole vocabulary equals -sum_v p_v log q_v averaged over the masked-in positions."""
    torch.manual_seed(1)
    teacher = torch.softmax(torch.randn(2, 5, 13), -1)
    logits = torch.randn(2, 5, 13)
    mask = torch.tensor([[1, 1, 0, 1, 1], [0, 1, 1, 1, 0]], dtype=torch.bool)
    log_q = student_log_probs(logits)
    expected = (-(teacher * log_q).sum(-1) * mask).sum() / mask.sum()
    torch.testing.assert_close(dense_fusion_loss(log_q, teacher, mask), expected)
    entropy = (teacher * teacher.log()).sum(-1)
    torch.testing.assert_close(dense_fusion_loss(log_q, teacher, mask, "kl"), expected + (entropy * mask).sum() / mask.sum())


def test_a_row_that_keeps_its_tail_is_a_cross_entropy_over_k_plus_one_outcomes():
    """ce against a row summing to m < 1: -sum_e p_e log q_e - (1 - m) log(1 - sum_e q_e), float64 reference; its
    gradient is full KD's against a teacher whose tail is spread like the student's own; a renormalised row (or a
    row that sums to 1 within rounding) has no tail term."""
    torch.manual_seed(2)
    vocab = 9
    rows = merge_entries(np.array([0, 0, 1]), np.array([2, 5, 7]), np.array([0.5, 0.2, 1.0]), 2, vocab, keep_tail=True)
    targets = pad_targets([rows], 2)
    logits = torch.randn(1, 2, vocab, dtype=torch.float64, requires_grad=True)
    log_q = torch.log_softmax(logits, -1)
    held = torch.log_softmax(logits, -1)[0, 0, [2, 5]]
    expected = (-(0.5 * held[0] + 0.2 * held[1]) - 0.3 * torch.log1p(-held.exp().sum())  # row 0: tail 0.3
                - log_q[0, 1, 7]) / 2  # row 1 sums to 1: no tail
    loss = fusion_loss(log_q.float(), targets, torch.ones(1, 2, dtype=torch.bool))
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-6)
    loss.backward()
    q = torch.softmax(logits.detach(), -1)[0, 0]
    teacher = q * 0.3 / (1 - q[[2, 5]].sum())  # the tail spread like the student's own
    teacher[[2, 5]] = torch.tensor([0.5, 0.2], dtype=torch.float64)
    torch.testing.assert_close(logits.grad[0, 0], (q - teacher) / 2, rtol=1e-4, atol=1e-6)
