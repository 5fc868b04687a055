"""Continued training: the step plan, checkpoint/resume to identical weights, and a clear stop on a bad loss."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from fusesoup.logits.sparse import Chunks, RankRows
from fusesoup.train.loop import ExtraTerms, LiveTeacher, make_batch, micro_batches, train_target
from fusesoup.train.packing import TrainBlock, TrainSequence, pack_documents
from fusesoup.train.stream import plan_steps
from fusesoup.train.recipe import TrainingError
from tests.helpers import TRAIN_SPEC, UNCHECKPOINTED, blocks, order_of, planned, sequences, tiny_model













def widths(data: list[TrainBlock]) -> list[int]:
    return [block.width for block in data]




class Killed(Exception):
    pass


class KilledAfter(list):
    """The training blocks, which kill the run when `limit` of them have been read."""

    def __init__(self, items, limit):
        super().__init__(items)
        self.left = limit

    def __getitem__(self, index):
        self.left -= 1
        if self.left < 0:
            raise Killed
        return super().__getitem__(index)


def test_killed_run_resumes_to_the_same_weights(tmp_path):
    data = blocks(with_targets=True)
    straight = tiny_model()
    log = train_target(straight, planned(data), TRAIN_SPEC, 0.9, "ce", 0, tmp_path / "a", "key", False)
    assert [row["step"] for row in log] == list(range(6)) and all(row["fusion"] != "" for row in log)
    assert all(row["tok_s"] > 0 for row in log)  # throughput of each step, for the plots and the progress bar

    resumed = tiny_model()
    plan = plan_steps(widths(data), TRAIN_SPEC.batch_tokens, TRAIN_SPEC.steps, 0)
    with pytest.raises(Killed):  # dies inside step 4, after the checkpoint at step 4
        train_target(resumed, planned(KilledAfter(data, sum(map(len, plan[:4])) + 1)), TRAIN_SPEC, 0.9, "ce", 0,
                     tmp_path / "b", "key", False)
    assert (tmp_path / "b/state.json").is_file()
    resumed = tiny_model()
    log_resumed = train_target(resumed, planned(data), TRAIN_SPEC, 0.9, "ce", 0, tmp_path / "b", "key", False)
    assert [row["loss"] for row in log_resumed] == [row["loss"] for row in log]
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    # a checkpoint of another run (another key) is not resumed from
    other = tiny_model()
    assert len(train_target(other, planned(data), TRAIN_SPEC, 0.9, "ce", 0, tmp_path / "b", "other", False)) == 6


def test_clm_and_fused_see_the_same_tokens_and_differ_only_by_the_fusion_term(tmp_path):
    fused, clm = blocks(with_targets=True), blocks(with_targets=False)
    fused_log = train_target(tiny_model(), planned(fused), UNCHECKPOINTED, 1.0, "ce", 0, tmp_path / "f", "k", False)
    clm_log = train_target(tiny_model(), planned(clm), UNCHECKPOINTED, 1.0, "ce", 0, tmp_path / "c", "k", False)
    assert [r["tokens"] for r in fused_log] == [r["tokens"] for r in clm_log]
    assert [r["loss"] for r in fused_log] == [r["loss"] for r in clm_log]  # lambda = 1: the fusion term is off


def test_a_live_teacher_s_kl_starts_at_zero_for_a_copy_of_the_student_and_grows_as_it_moves(tmp_path):
    """train@fused's --live-teacher: the fusion term is the KL to the teacher's whole distribution, computed on the
    same packed blocks (a teacher identical to the student at step 0 gives 0) and needs no fused rows."""
    teacher = LiveTeacher(tiny_model().eval().requires_grad_(False))
    log = train_target(tiny_model(), planned(blocks(with_targets=False)), UNCHECKPOINTED, 0.5, "kl", 0,
                       tmp_path / "live", "k", False, teacher=teacher)
    assert abs(log[0]["fusion"]) < 1e-5
    assert log[-1]["fusion"] > 1e-3
    assert log[0]["loss"] == pytest.approx(0.5 * log[0]["clm"] + 0.5 * log[0]["fusion"], rel=1e-5)


def test_a_non_finite_loss_stops_with_the_step_and_saves_nothing(tmp_path):
    data = blocks(with_targets=True)
    data[0] = data[0]._replace(targets=data[0].targets._replace(logprobs=np.full_like(data[0].targets.logprobs, np.nan)))
    plan = plan_steps(widths(data), TRAIN_SPEC.batch_tokens, TRAIN_SPEC.steps, 0)
    first_bad = next(step for step, batch in enumerate(plan) if 0 in batch)
    with pytest.raises(TrainingError, match=f"loss is nan at step {first_bad} "):
        train_target(tiny_model(), planned(data), UNCHECKPOINTED, 0.9, "ce", 0, tmp_path / "n", "k", False)
    assert not (tmp_path / "n").exists()


def _rank(rank: int, world: int, init: str, out: str, engine: str, kill_after: int | None) -> None:
    """One rank of a `world`-process run with engine `engine` in `out`; rank 0 saves the log and the gathered
    weights to out/result.pt, unless the data kills the run after `kill_after` sequences (every rank alike)."""
    import torch.distributed as dist

    from fusesoup.train.engine import full_state_dict
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        model, data = tiny_model(), blocks(with_targets=True)
        spec = TRAIN_SPEC.model_copy(update={"distributed": engine})
        try:
            batches = planned(data if kill_after is None else KilledAfter(data, kill_after))
            log = train_target(model, batches, spec, 0.9, "ce", 0, Path(out) / "ckpt", "k", False)
        except Killed:
            return
        weights = full_state_dict(model)
        if rank == 0:
            torch.save({"log": log, "weights": weights}, Path(out) / "result.pt")
    finally:
        dist.destroy_process_group()


def run_ranks(out: Path, world: int, engine: str, kill_after: int | None = None) -> dict | None:
    """A run of `world` processes (gloo on the CPU) in `out`; its result.pt, None for a killed run."""
    out.mkdir(exist_ok=True)
    rendezvous = out / f"rendezvous-{len(list(out.glob('rendezvous-*')))}"
    torch.multiprocessing.spawn(_rank, args=(world, f"file://{rendezvous}", str(out), engine, kill_after),
                                nprocs=world)
    return None if kill_after is not None else torch.load(out / "result.pt", weights_only=True)


def assert_same_trajectory(result: dict, log: list[dict], weights: dict, atol: float) -> None:
    assert [r["tokens"] for r in result["log"]] == [r["tokens"] for r in log]
    np.testing.assert_allclose([r["loss"] for r in result["log"]], [r["loss"] for r in log], rtol=1e-5)
    np.testing.assert_allclose([r["fusion"] for r in result["log"]], [r["fusion"] for r in log], rtol=1e-5)
    assert set(result["weights"]) <= set(weights) and "model.layers.0.mlp.up_proj.weight" in result["weights"]
    for name, weight in result["weights"].items():
        torch.testing.assert_close(weight, weights[name], atol=atol, rtol=0)


@pytest.fixture(scope="module")
def fsdp_two_processes(tmp_path_factory) -> dict:
    """An unkilled 2-process FSDP run: the reference of the trajectory and resume tests below."""
    return run_ranks(tmp_path_factory.mktemp("fsdp-straight"), 2, "fsdp")


@pytest.mark.parametrize("engine", ["ddp", "fsdp"])
def test_two_processes_follow_the_single_process_trajectory(tmp_path, engine, request):
    """2 CPU processes (gloo; DDP, or FSDP2 sharding params, grads and optimizer state), each half of every global
    batch, against 1 process on the same global batches. Tolerance: 1e-5 relative on the losses and 1e-4 absolute
    on the weights (float summation order differs)."""
    torch.set_num_threads(1)
    single = tiny_model()
    log = train_target(single, planned(blocks(with_targets=True)), TRAIN_SPEC, 0.9, "ce", 0, tmp_path / "one", "k", False)
    two = request.getfixturevalue("fsdp_two_processes") if engine == "fsdp" else run_ranks(tmp_path / "two", 2, engine)
    assert_same_trajectory(two, log, single.state_dict(), atol=1e-4)


def test_a_killed_fsdp_run_resumes_to_the_same_weights_on_two_processes_and_on_one(tmp_path, fsdp_two_processes):
    """Killed inside step 4 (after the sharded checkpoint of step 4): resumed on 2 processes it ends bit-identical to
    an unkilled 2-process run; resumed on 1 process (DCP reshards the same checkpoint) within 1e-4 of it."""
    straight = fsdp_two_processes
    plan = plan_steps(widths(blocks(True)), TRAIN_SPEC.batch_tokens, TRAIN_SPEC.steps, 0)
    killed = tmp_path / "killed"
    run_ranks(killed, 2, "fsdp", kill_after=sum(map(len, plan[:4])) + 1)
    assert (killed / "ckpt/state.json").is_file() and list((killed / "ckpt").glob("*.distcp"))
    shutil.copytree(killed / "ckpt", tmp_path / "ckpt-for-one")

    result = run_ranks(killed, 2, "fsdp")
    assert [r["loss"] for r in result["log"]] == [r["loss"] for r in straight["log"]]
    for name, weight in straight["weights"].items():
        assert torch.equal(result["weights"][name], weight), name

    model = tiny_model()
    log = train_target(model, planned(blocks(True)), TRAIN_SPEC.model_copy(update={"distributed": "fsdp"}), 0.9, "ce", 0,
                       tmp_path / "ckpt-for-one", "k", False)
    assert [r["step"] for r in log] == list(range(6))
    np.testing.assert_allclose([r["loss"] for r in log[:4]], [r["loss"] for r in straight["log"][:4]], rtol=0)
    assert_same_trajectory(straight, log, model.state_dict(), atol=1e-4)


def test_micro_batches_fit_the_budget_in_order_and_a_long_block_goes_alone():
    batch = [TrainBlock(np.arange(n + 1), np.arange(n + 1), None) for n in (4, 6, 3, 20, 2)]
    cut = micro_batches(batch, 14)  # padded size: count x longest
    assert [[block.width for block in micro] for micro in cut] == [[4, 6], [3], [20], [2]]
    assert all(len(m) * max(block.width for block in m) <= 14 for m in cut if len(m) > 1)
    assert micro_batches(batch, None) == [batch]


def test_packing_joins_documents_in_a_seeded_order_and_keeps_each_token_with_its_fused_row():
    documents = sequences(with_targets=True, n=5)
    packed = pack_documents(documents, 16, 1, 64, order_of(documents))
    order = np.random.default_rng(0).permutation(5)
    stream = np.concatenate([[1, *documents[i].input_ids] for i in order])
    assert np.array_equal(np.concatenate([packed[0].tokens] + [b.tokens[1:] for b in packed[1:]]), stream)
    assert widths(packed)[:-1] == [16] * (len(packed) - 1) and sum(widths(packed)) == len(stream) - 1
    labels = np.concatenate([b.tokens[1:] for b in packed])
    trained = np.concatenate([b.trained for b in packed])
    assert np.array_equal(labels[~trained], [1] * 4)  # each later document's BOS: not a prediction
    def entries(rows, j):
        return rows.ids[rows.offsets[j]:rows.offsets[j + 1]].tolist()
    got = [entries(b.targets, j) for b in packed for j in range(b.width)]
    want = [entry for i in order for entry in [[]] + [entries(documents[i].targets, t)
                                                      for t in range(len(documents[i].input_ids))]][1:]
    assert got == want  # each label's fused row, none for a BOS
    positions = np.concatenate([packed[0].positions] + [b.positions[1:] for b in packed[1:]])
    assert np.array_equal(positions, np.concatenate([np.arange(len(documents[i].input_ids) + 1) for i in order]))


def test_packing_keeps_the_chunks_that_lie_whole_in_a_block():
    rows = sequences(with_targets=True, n=2)
    documents = [TrainSequence(np.arange(3, 8), rows[0].targets.take(np.arange(5)),
                               Chunks(np.array([0, 1, 1, 0, 1], np.uint8), np.array([1.0, 1.0, 2.0, 3.0, 3.0]))),
                 TrainSequence(np.arange(3, 7), rows[1].targets.take(np.arange(4)),
                               Chunks(np.array([1, 0, 1, 1], np.uint8), np.array([1.0, 2.0, 2.0, 1.0])))]
    packed = pack_documents(documents, 4, 1, 64, [0, 1])
    # labels 3 4 5 6 | 7 BOS 3 4 | 5 6: chunks (3 4) (5) (6 7) | (3) (4 5) (6); a block edge splits (6 7) and (4 5)
    assert [b.chunks.of.tolist() for b in packed] == [[0, 0, 1, -1], [-1, -1, 0, -1], [-1, 0]]
    assert [b.chunks.ce.tolist() for b in packed] == [[2.0, 2.0], [1.0], [1.0]]  # each chunk's CE, summed
    # cut at the context (3 tokens each kept): the chunk the cut leaves open is left out, the next BOS closes none
    cut = pack_documents(documents, 8, 1, 4, [0, 1])
    assert [b.chunks.of.tolist() for b in cut] == [[0, 0, 1, -1, 2, 3, 3]]
    assert cut[0].chunks.ce.tolist() == [2.0, 2.0, 1.0, 4.0]


def test_packing_keeps_each_rank_row_with_its_label():
    rows = sequences(with_targets=True, n=2)
    documents = [TrainSequence(np.arange(3, 8), rows[0].targets.take(np.arange(5)), None,
                               RankRows(np.array([0, 2, 4]), np.log(np.array([[0.5], [0.6], [0.7]], np.float32)))),
                 TrainSequence(np.arange(3, 7), rows[1].targets.take(np.arange(4)), None,
                               RankRows(np.array([1]), np.log(np.array([[0.8]], np.float32))))]
    # labels 3 4 5 6 | 7 BOS 3 4 | 5 6: rows at doc 0's 3, 5, 7 and doc 1's 4
    packed = pack_documents(documents, 4, 1, 64, [0, 1])
    assert [b.ranks.at.tolist() for b in packed] == [[0, 2], [0, 3], []]
    np.testing.assert_allclose(np.exp(np.concatenate([b.ranks.logprobs[:, 0] for b in packed])), [0.5, 0.6, 0.7, 0.8],
                               rtol=1e-6)
    cut = pack_documents(documents, 8, 1, 4, [0, 1])  # 3 tokens each kept: doc 0's row at 4 goes with its token
    assert cut[0].ranks.at.tolist() == [0, 2, 5]


def test_the_chunk_term_adds_mu_times_chunk_likelihood_matching(tmp_path):
    rng = np.random.default_rng(5)
    documents = [d._replace(chunks=Chunks((rng.random(len(d.input_ids)) < 0.5).astype(np.uint8) | np.eye(
        1, len(d.input_ids), len(d.input_ids) - 1, dtype=np.uint8)[0], rng.random(len(d.input_ids)) * 3))
        for d in sequences(with_targets=True)]
    data = pack_documents(documents, TRAIN_SPEC.block_size, 1, 64, order_of(documents))
    assert sum(int((b.chunks.of >= 0).sum()) for b in data) > 100
    log = train_target(tiny_model(), planned(data), UNCHECKPOINTED, 0.9, "ce", 0, tmp_path / "a", "k", False,
                       extra=ExtraTerms(chunk_weight=0.5))
    for row in log:
        assert row["chunk"] > 0 and row["loss"] == pytest.approx(0.9 * row["clm"] + 0.1 * row["fusion"]
                                                                 + 0.5 * row["chunk"], rel=1e-5)
    plain = train_target(tiny_model(), planned(data), UNCHECKPOINTED, 0.9, "ce", 0, tmp_path / "b", "k", False)
    assert all(row["chunk"] == "" for row in plain) and plain[0]["loss"] == pytest.approx(
        0.9 * log[0]["clm"] + 0.1 * log[0]["fusion"], rel=1e-5)  # the same first step, without the chunk term


def test_the_uld_term_adds_nu_times_rank_matching(tmp_path):
    rng = np.random.default_rng(6)
    documents = []
    for d in sequences(with_targets=True):
        at = np.flatnonzero(rng.random(len(d.input_ids)) < 0.3)
        probs = np.sort(rng.dirichlet(np.ones(4), len(at)), axis=1)[:, ::-1]
        documents.append(d._replace(ranks=RankRows(at, np.log(probs).astype(np.float32))))
    data = pack_documents(documents, TRAIN_SPEC.block_size, 1, 64, order_of(documents))
    log = train_target(tiny_model(), planned(data), UNCHECKPOINTED, 0.9, "ce", 0, tmp_path / "a", "k", False,
                       extra=ExtraTerms(uld_weight=2.0))
    for row in log:
        assert row["uld"] > 0 and row["chunk"] == "" and row["loss"] == pytest.approx(
            0.9 * row["clm"] + 0.1 * row["fusion"] + 2.0 * row["uld"], rel=1e-5)


def test_a_packed_document_is_seen_as_it_would_be_alone():
    """Attention stays within each document and positions restart at its BOS: the logits of a block's second
    document are the ones the document gets alone."""
    model = tiny_model().eval()
    documents = sequences(with_targets=False, n=2)
    both = pack_documents(documents, 64, 1, 64, order_of(documents))
    assert len(both) == 1
    input_ids, position_ids, labels, mask, *_ = make_batch(both, pad=0)
    with torch.no_grad():
        packed = model(input_ids=input_ids, position_ids=position_ids, use_cache=False).logits
        order = np.random.default_rng(0).permutation(2)
        second = documents[order[1]].input_ids
        alone = model(input_ids=torch.tensor([[1, *second]])).logits
    start = len(documents[order[0]].input_ids) + 1  # the second document's BOS
    assert position_ids[0, start] == 0 and bool(mask[0, start - 1]) is False  # its BOS is not predicted
    torch.testing.assert_close(packed[0, start:], alone[0, :len(second)], atol=1e-5, rtol=0)


def test_the_trajectory_does_not_depend_on_the_micro_batch_size(tmp_path):
    """One forward pass per step against micro-batches of at most 20 padded tokens (4 or more per step here):
    losses within 1e-5 relative, weights within 1e-5 absolute after 6 steps (float summation order differs)."""
    torch.set_num_threads(1)
    data, spec = blocks(with_targets=True, n=24), UNCHECKPOINTED.model_copy(update={"batch_tokens": 96})
    plan = plan_steps(widths(data), spec.batch_tokens, spec.steps, 0)
    assert min(len(micro_batches([data[i] for i in step], 20)) for step in plan) >= 4
    whole, split = tiny_model(), tiny_model()
    log = train_target(whole, planned(data, spec), spec, 0.9, "ce", 0, tmp_path / "whole", "k", False)
    micro_log = train_target(split, planned(data, spec), spec.model_copy(update={"micro_batch_tokens": 20}), 0.9,
                             "ce", 0, tmp_path / "micro", "k", False)
    np.testing.assert_allclose([r["loss"] for r in micro_log], [r["loss"] for r in log], rtol=1e-5)
    np.testing.assert_allclose([r["fusion"] for r in micro_log], [r["fusion"] for r in log], rtol=1e-5)
    for name, weight in whole.state_dict().items():
        torch.testing.assert_close(split.state_dict()[name], weight, atol=1e-5, rtol=0)


def test_activation_checkpointing_keeps_the_trajectory(tmp_path):
    """Each decoder layer recomputed in backward: the same losses and weights within 1e-6 after 6 steps."""
    torch.set_num_threads(1)
    plain, recomputed = tiny_model(), tiny_model()
    log = train_target(plain, planned(blocks(True)), UNCHECKPOINTED, 0.9, "ce", 0, tmp_path / "a", "k", False)
    spec = UNCHECKPOINTED.model_copy(update={"activation_checkpointing": True})
    checkpointed_log = train_target(recomputed, planned(blocks(True)), spec, 0.9, "ce", 0, tmp_path / "b", "k", False)
    np.testing.assert_allclose([r["loss"] for r in checkpointed_log], [r["loss"] for r in log], rtol=1e-6)
    for name, weight in plain.state_dict().items():
        torch.testing.assert_close(recomputed.state_dict()[name], weight, atol=1e-6, rtol=0)
