"""The streamed step plan (fusesoup.train.stream): the store read a window of shards at a time, exactly the in-memory
plan when the split fits one window, every document once per epoch otherwise, at most two windows in memory."""
from __future__ import annotations

import numpy as np
import pytest

from fusesoup.train.packing import pack_documents, packed_widths, packing_order
from fusesoup.train.recipe import TrainingError
from fusesoup.train.stream import PlannedBatches, TrainStream, plan_steps
from tests.helpers import sequences

BLOCK, BOS, CONTEXT = 16, 1, 24


def shards_of(documents, sizes):
    """The documents cut into shards of these sizes, as a store holds them."""
    cuts = np.cumsum([0, *sizes])
    return [documents[a:b] for a, b in zip(cuts[:-1], cuts[1:])]


class Reader:
    """read_shard over in-memory shards, counting what it reads."""

    def __init__(self, shards):
        self.shards, self.reads = shards, []

    def __call__(self, index):
        self.reads.append(index)
        return self.shards[index]


def stream_of(shards, window_shards, steps, seed=0, batch_tokens=40, rank=0, world=1, block=BLOCK):
    reader = Reader(shards)
    lengths = [np.array([len(d.input_ids) for d in shard]) for shard in shards]
    return TrainStream(reader, lengths, window_shards, block, BOS, CONTEXT, batch_tokens, steps, seed, rank,
                       world), reader


def same_blocks(left, right):
    assert len(left) == len(right)
    for a, b in zip(left, right):
        assert np.array_equal(a.tokens, b.tokens) and np.array_equal(a.positions, b.positions)
        assert np.array_equal(a.targets.ids, b.targets.ids) and np.array_equal(a.targets.offsets, b.targets.offsets)


def documents_with_an_empty_one(n=30):
    documents = sequences(with_targets=True, n=n)  # some longer than CONTEXT: cut as the stage cuts them
    empty = documents[3]._replace(input_ids=documents[3].input_ids[:0],
                                  targets=documents[3].targets.take(np.arange(0)))
    return documents[:3] + [empty] + documents[4:]


def test_a_split_in_one_window_streams_exactly_the_in_memory_plan():
    documents = documents_with_an_empty_one()
    blocks = pack_documents(documents, BLOCK, BOS, CONTEXT,
                            packing_order([len(d.input_ids) for d in documents], np.random.default_rng(7)))
    memory = PlannedBatches(blocks, 40, 25, 7)  # 25 steps: past one epoch of the blocks
    stream, reader = stream_of(shards_of(documents, [8, 8, 8, 6]), window_shards=4, steps=25, seed=7)
    for step in range(25):
        same_blocks(stream[step], memory[step])
    assert reader.reads == [0, 1, 2, 3]  # read once: every epoch visits the same packed window


def test_windows_visit_every_document_once_an_epoch_with_two_windows_in_memory_at_most():
    documents = documents_with_an_empty_one(n=40)
    shards = shards_of(documents, [6, 6, 6, 6, 6, 6, 4])
    stream, reader = stream_of(shards, window_shards=3, steps=60)
    epoch = stream.visits[:3]  # 7 shards in windows of 3: 3 visits an epoch
    assert sorted(s for visit in epoch for s in visit.shards) == list(range(7))
    assert {visit.shards for visit in stream.visits[3:6]} != {visit.shards for visit in epoch}  # a new order
    held = []
    for step in range(60):
        stream[step]
        held.append(sorted(len(blocks) for blocks in stream.loaded.values()))
    assert max(map(len, held)) == 2  # a batch ran on into the next window: only its blocks of the last one stay
    assert all(len(step) == 1 or step[0] <= 3 for step in held)  # (40 tokens a step: at most 3 blocks of 16)
    assert len(reader.reads) == sum(len(visit.shards) for visit in stream.visits)  # each visit reads its shards once
    for number, visit in enumerate(epoch):  # a visit's blocks spell its documents, each once, in its packing order
        window = [d for shard in visit.shards for d in shards[shard]]
        packed = stream.pack(number)
        stream_tokens = np.concatenate([packed[0].tokens] + [b.tokens[1:] for b in packed[1:]])
        expected = np.concatenate([np.concatenate([[BOS], window[i].input_ids])[:CONTEXT] for i in visit.order])
        assert np.array_equal(stream_tokens, expected)
        assert [b.width for b in packed] == visit.widths == packed_widths(
            [len(window[i].input_ids) for i in visit.order], BLOCK, CONTEXT)
        assert sorted(visit.order) == [i for i, d in enumerate(window) if len(d.input_ids)]


def test_the_plan_is_fixed_by_the_seed_so_a_resumed_or_other_rank_reads_the_same_steps():
    shards = shards_of(documents_with_an_empty_one(n=40), [6, 6, 6, 6, 6, 6, 4])
    first, _ = stream_of(shards, window_shards=3, steps=40)
    again, reader = stream_of(shards, window_shards=3, steps=40)
    for step in range(25, 40):  # resumed at step 25: no earlier window is read
        same_blocks(again[step], first[step])
    assert set(reader.reads) <= {s for step in range(25, 40) for v, _ in again.plan[step]
                                 for s in again.visits[v].shards}
    other, _ = stream_of(shards, window_shards=3, steps=40, seed=1)
    assert other.plan != first.plan
    assert all(sum(first.visits[v].widths[b] for v, b in step) >= 40 for step in first.plan)


def test_each_rank_keeps_the_fused_rows_of_its_own_blocks_only():
    """World 3, an epoch of 64-token blocks (about 5 documents each): rank r's blocks, every third of each step,
    are exactly the single process's, while it holds the rows of its own blocks' documents only: about a third of
    the window's, plus the documents its blocks share with the others'."""
    documents = sequences(with_targets=True, n=210)
    shards = shards_of(documents, [30] * 7)
    order = packing_order([len(d.input_ids) for d in documents], np.random.default_rng(0))
    whole = PlannedBatches(pack_documents(documents, 64, BOS, CONTEXT, order), 192, 14, 0)  # one window: the same
    ranks = [stream_of(shards, window_shards=7, steps=14, batch_tokens=192, rank=r, world=3, block=64)[0]
             for r in range(3)]
    for step in range(14):
        batch = whole[step]
        for rank, stream in enumerate(ranks):
            same_blocks(stream[step][rank::3], batch[rank::3])  # with their fused rows
    window = sum(len(d.targets.ids) for shard in shards for d in shard)
    held = [sum(len(block.targets.ids) for block in stream.pack(0)) for stream in ranks]
    assert max(held) < 0.45 * window and sum(held) > 0.95 * window, (held, window)


def test_a_shard_that_no_longer_matches_its_planned_lengths_is_named():
    shards = shards_of(sequences(with_targets=True, n=12), [6, 6])
    stream, _ = stream_of(shards, window_shards=1, steps=4)
    stream.read_shard = lambda index: shards[index][:-1]  # a document lost since the lengths were read
    with pytest.raises(TrainingError, match=r"shards \[\d\] do not hold the documents their lengths were planned"):
        stream[0]


def test_the_in_memory_plan_is_fixed_by_seed_and_fills_the_token_budget():
    lengths = [5, 9, 3, 12, 7, 4]
    plan = plan_steps(lengths, batch_tokens=10, steps=8, seed=0)
    assert plan == plan_steps(lengths, batch_tokens=10, steps=8, seed=0) != plan_steps(lengths, 10, 8, seed=1)
    assert len(plan) == 8 and all(sum(lengths[i] for i in batch) >= 10 for batch in plan)
