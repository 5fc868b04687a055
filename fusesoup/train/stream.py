"""Which blocks each training step takes: planned over blocks in memory, or streamed from a store a window at a time.

Both plans are fixed by the seed and the lengths alone, so every rank of a data-parallel run and every resumed run
plan the same steps. In memory (`PlannedBatches`, tests and benchmarks): the blocks in a seeded order, a new order
each epoch, cut into batches of at least `batch_tokens` tokens. Streamed (`TrainStream`, the train stage): the train
split's shards are visited in windows of `window_shards` shards (each epoch the shards in a seeded order, cut into
windows; one window of every shard, in order, when the split has no more), a window's documents packed in a seeded
order (packing.pack_documents) and its blocks taken as above. Only the documents' lengths are read up front; a
window's tokens and fused rows are read when a step first needs them and dropped after the last step that does (a
batch that runs on into the next window keeps only its own blocks of the last one), so memory holds one window,
however large the corpus. When the split fits one window the steps are exactly the in-memory plan of the split.
Data parallel, rank r of `world` trains every world-th block of each step (the loop's `batch[rank::world]`): it
keeps the fused rows of the documents its own blocks hold and drops the others' as each shard is read, so a rank
holds its share of a window's rows (the tokens, a few bytes a position, of all of it).
"""
from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import NamedTuple, Protocol

import numpy as np

from fusesoup.logits.sparse import empty_rows, no_ranks
from fusesoup.train.packing import (TrainBlock, TrainSequence, documents_of_blocks, pack_documents, packed_widths,
                                    packing_order)
from fusesoup.train.recipe import TrainingError

Step = list[tuple[int, int]]  # (visit, block) pairs: the blocks one step takes


class StepBatches(Protocol):
    """What the training loop reads: `batches[step]`, every block of that step (all ranks')."""

    def __getitem__(self, step: int) -> list[TrainBlock]: ...


def cut_into_steps(visits: Iterator[tuple[int, Sequence[int]]], batch_tokens: int, steps: int,
                   rng: np.random.Generator) -> list[Step]:
    """`steps` batches of at least batch_tokens tokens: each visit's blocks (its id and the blocks' widths, visits in
    order) are taken in a seeded order (rng.permutation), a batch running on into the next visit."""
    plan, batch, tokens, order, widths = [], [], 0, [], {}
    while len(plan) < steps:
        if not order:
            visit, widths[visit] = next(visits)
            if not len(widths[visit]):
                raise TrainingError(f"no training blocks in visit {visit} of the data")
            order = [(visit, int(block)) for block in rng.permutation(len(widths[visit]))]
        visit, block = order.pop()
        batch.append((visit, block))
        tokens += widths[visit][block]
        if tokens >= batch_tokens:
            plan.append(batch)
            batch, tokens = [], 0
    return plan


def plan_steps(widths: Sequence[int], batch_tokens: int, steps: int, seed: int) -> list[list[int]]:
    """Block indices for each step: a seeded permutation of the blocks (a new one each epoch), cut into batches of at
    least batch_tokens tokens."""
    forever = ((0, widths) for _ in iter(int, 1))
    return [[block for _, block in step]
            for step in cut_into_steps(forever, batch_tokens, steps, np.random.default_rng(seed))]


class PlannedBatches:
    """Each step's blocks (`batches[step]`) from blocks in memory, planned by plan_steps."""

    def __init__(self, blocks: Sequence[TrainBlock], batch_tokens: int, steps: int, seed: int):
        self.blocks = blocks
        self.plan = plan_steps([block.width for block in blocks], batch_tokens, steps, seed)

    def __getitem__(self, step: int) -> list[TrainBlock]:
        return [self.blocks[index] for index in self.plan[step]]


class Visit(NamedTuple):
    """One window of shards as one epoch visits it: its documents (the shards' rows, in this shard order, of these
    `lengths`) are packed in `order`, into blocks of `widths`."""

    shards: tuple[int, ...]
    lengths: np.ndarray
    order: np.ndarray
    widths: list[int]


def plan_visits(lengths: Sequence[np.ndarray], window_shards: int, block: int, context: int, seed: int
                ) -> Iterator[Visit]:
    """The windows every epoch visits, in order, from each shard's document lengths: one visit of every shard (the
    same packing every epoch) when they fit one window, else per epoch the shards in a seeded order cut into
    windows, each packed anew."""
    pack_rng, shard_rng = np.random.default_rng(seed), np.random.default_rng([seed, 1])

    def visit(shards: Sequence[int]) -> Visit:
        joined = np.concatenate([lengths[shard] for shard in shards])
        order = packing_order(joined, pack_rng)
        return Visit(tuple(int(shard) for shard in shards), joined, order, packed_widths(joined[order], block, context))

    if len(lengths) <= window_shards:
        whole = visit(range(len(lengths)))
        while True:
            yield whole
    while True:
        shuffled = shard_rng.permutation(len(lengths))
        for start in range(0, len(shuffled), window_shards):
            yield visit(shuffled[start: start + window_shards])


class TrainStream:
    """Each step's blocks (`stream[step]`) read from a store a window of shards at a time (module docstring).
    `read_shard(index)` gives a shard's documents in stored order; `lengths[index]` their token counts."""

    def __init__(self, read_shard: Callable[[int], list[TrainSequence]], lengths: Sequence[np.ndarray],
                 window_shards: int, block: int, bos: int, context: int, batch_tokens: int, steps: int, seed: int,
                 rank: int = 0, world: int = 1):
        self.read_shard, self.block, self.bos, self.context = read_shard, block, bos, context
        visits = plan_visits(lengths, window_shards, block, context, seed)
        self.visits: list[Visit] = []

        def numbered() -> Iterator[tuple[int, list[int]]]:
            for visit in visits:
                if not self.visits or visit is not self.visits[-1]:  # one window visited again: the same packing
                    self.visits.append(visit)
                yield len(self.visits) - 1, visit.widths

        self.plan = cut_into_steps(numbered(), batch_tokens, steps, np.random.default_rng(seed))
        self.last_step = {visit: step for step, batch in enumerate(self.plan) for visit, _ in batch}
        self.mine = {pair for batch in self.plan for pair in batch[rank::world]}  # the (visit, block)s this rank trains
        self.loaded: dict[int, dict[int, TrainBlock]] = {}  # visit -> its blocks still to be taken

    def __getitem__(self, step: int) -> list[TrainBlock]:
        wanted = {(visit, block) for visit, block in self.plan[step]}
        for visit in list(self.loaded):
            if self.last_step[visit] < step:  # no later step needs it
                del self.loaded[visit]
            elif self.last_step[visit] == step:  # only this step's blocks, before the next window is read
                self.loaded[visit] = {b: block for b, block in self.loaded[visit].items() if (visit, b) in wanted}
        for visit, _ in self.plan[step]:
            if visit not in self.loaded:
                self.loaded[visit] = dict(enumerate(self.pack(visit)))
        return [self.loaded[visit][block] for visit, block in self.plan[step]]

    def pack(self, number: int) -> list[TrainBlock]:
        """Visit `number`'s blocks, read from its shards, with fused rows only where this rank's blocks are (module
        docstring); TrainingError if its documents are not the planned ones."""
        visit = self.visits[number]
        held = documents_of_blocks(visit.lengths[visit.order], self.block, self.context)
        needed = {int(visit.order[place]) for block, places in enumerate(held) if (number, block) in self.mine
                  for place in places}
        documents = []
        for shard in visit.shards:
            for document in self.read_shard(shard):
                keep = len(documents) in needed
                documents.append(document if keep or document.targets is None else document._replace(
                    targets=empty_rows(len(document.input_ids)),
                    ranks=None if document.ranks is None else no_ranks(document.ranks.logprobs.shape[1])))
        if [len(document.input_ids) for document in documents] != visit.lengths.tolist():
            raise TrainingError(f"shards {list(visit.shards)} do not hold the documents their lengths were planned "
                                "from (the store changed during training?)")
        try:
            return pack_documents(documents, self.block, self.bos, self.context, visit.order)
        except TrainingError as error:  # it names a document by its place among the window's
            raise TrainingError(f"shards {list(visit.shards)} (their rows in this order): {error}") from None
