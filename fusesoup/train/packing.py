"""Packing documents into blocks of a fixed number of tokens, as pretraining (and FuseLLM) does, for both training
loops: documents are joined as [BOS] doc [EOS] [BOS] doc ... (no EOS where the loop has none to train), cut into
rows of `block` tokens, and a document's remainder runs on into the next row, so no step computes on padding.

Each token carries its position within its document, passed to the model as position_ids: transformers then masks
attention to the token's own document (its packed-sequence mask; it needs use_cache=False and no attention_mask),
and every document starts at position 0 as it does when it is scored alone. The prediction of a document's BOS
from the document before it is not trained, so no loss crosses a document boundary either.
"""
from __future__ import annotations

from typing import NamedTuple, Sequence

import numpy as np
import torch

from fusesoup.logits.sparse import Chunks, RankRows, SparseRows, concat_ranks, concat_rows, empty_rows, no_ranks
from fusesoup.train.recipe import TrainingError

IGNORE = -100  # the label transformers' causal-LM loss skips


class TrainSequence(NamedTuple):
    """One document of continued training."""

    input_ids: np.ndarray  # [n] the target's tokens, no BOS
    targets: SparseRows | None  # n fused rows (row i: the distribution over token i), None for CLM-only training
    chunks: Chunks | None = None  # the fused teacher's chunks over the n tokens (train.chunk_weight), or None
    ranks: RankRows | None = None  # the fused teacher's rank rows over the n tokens (train.uld_weight), or None


class TrainBlock(NamedTuple):
    """One packed row of continued training: inputs tokens[:-1] at positions[:-1], labels tokens[1:]."""

    tokens: np.ndarray  # [m + 1] int64
    positions: np.ndarray  # [m + 1] int64, each token's position in its document (0: a BOS)
    targets: SparseRows | None  # m rows: row j the fused distribution of label j (empty at a BOS label)
    chunks: "BlockChunks | None" = None  # the teacher's chunks that lie whole among the block's labels
    ranks: RankRows | None = None  # the rank rows of the block's labels (none at a BOS label)

    @property
    def width(self) -> int:
        """m: the block's input (and label) positions."""
        return len(self.tokens) - 1

    @property
    def trained(self) -> np.ndarray:
        """[m] bool: the labels that are trained on (not a document's BOS)."""
        return self.positions[1:] != 0


class BlockChunks(NamedTuple):
    """The chunks (fusion.Chunks) whose labels all lie in one block: a chunk a block edge or a document's cut at
    the context splits is left out, as is a BOS label."""

    of: np.ndarray  # [m] int64: label j's chunk (0..C-1, in order), -1 where it has none
    ce: np.ndarray  # [C] float64: the fused teacher's CE of each chunk (its log-likelihood is -ce)


class ChunkStream(NamedTuple):
    """The chunks of join_documents' stream (no EOS), token by token."""

    of: np.ndarray  # [T] int64: each token's chunk, numbered along the stream; -1 at a BOS and on a chunk left open
    ce: np.ndarray  # [T] float64: the token's share of its chunk's CE
    sizes: np.ndarray  # [chunks] int64: each chunk's tokens


def chunk_stream(documents: Sequence[TrainSequence], context: int) -> ChunkStream:
    """The chunks of the documents joined in this order, each cut to context - 1 tokens as join_documents cuts them
    (the chunk a cut leaves open gets -1)."""
    chunk_of, ce, first = [], [], 0
    for document in documents:
        kept = min(len(document.input_ids), context - 1)
        end = document.chunks.end[:kept].astype(bool)
        number = first + np.concatenate([[0], np.cumsum(end[:-1])]).astype(np.int64)
        closed = int(np.count_nonzero(end))
        number[number >= first + closed] = -1  # after the last end: the chunk the cut left open
        chunk_of += [[-1], number]
        ce += [[0.0], document.chunks.ce[:kept]]
        first += closed
    of = np.concatenate(chunk_of).astype(np.int64)
    return ChunkStream(of, np.concatenate(ce).astype(np.float64), np.bincount(of[of >= 0], minlength=first))


def block_chunks(stream: ChunkStream, labels: slice) -> BlockChunks:
    """The chunks of the stream's tokens `labels` (a block's labels) that lie wholly within them (in time linear in
    the block, not the stream)."""
    inside = stream.of[labels]
    numbers, local, counts = np.unique(inside, return_inverse=True, return_counts=True)
    sizes = np.zeros(len(numbers), np.int64)  # -1 (no chunk) has size 0, so it is never whole
    sizes[numbers >= 0] = stream.sizes[numbers[numbers >= 0]]
    whole = counts == sizes
    renumber = np.where(whole, np.cumsum(whole) - 1, -1)
    of = renumber[local]
    return BlockChunks(of, np.bincount(of[of >= 0], weights=stream.ce[labels][of >= 0], minlength=int(whole.sum())))


def join_documents(documents: Sequence[Sequence[int]], bos: int, eos: int | None, context: int
                   ) -> tuple[np.ndarray, np.ndarray]:
    """(tokens, positions) of [BOS] doc [EOS] ... with each document cut to `context` tokens (the model's limit)."""
    lengths = np.array([min(len(d) + 1 + (eos is not None), context) for d in documents], dtype=np.int64)
    tokens = np.empty(int(lengths.sum()), dtype=np.int64)
    at = 0
    for ids, length in zip(documents, lengths):
        piece = np.concatenate([[bos], np.asarray(ids, np.int64)] + ([[eos]] if eos is not None else []))
        tokens[at: at + length] = piece[:length]
        at += length
    starts = np.repeat(np.cumsum(lengths) - lengths, lengths)
    return tokens, np.arange(len(tokens), dtype=np.int64) - starts


class BlockPacker:
    """The bootstrap loop's stream: documents go in one at a time, [rows, block] batches come out."""

    def __init__(self, bos: int, eos: int, block: int, context: int):
        if block < 2:
            raise ValueError(f"block must hold at least 2 tokens, got {block}")
        self.bos, self.eos, self.block, self.context = bos, eos, block, context
        self._tokens = np.zeros(0, dtype=np.int64)
        self._positions = np.zeros(0, dtype=np.int64)

    def buffered(self) -> int:
        """Tokens waiting in the stream."""
        return len(self._tokens)

    def add(self, ids: Sequence[int]) -> None:
        """Append one document (token ids without specials) to the stream."""
        tokens, positions = join_documents([ids], self.bos, self.eos, self.context)
        self._tokens = np.concatenate([self._tokens, tokens])
        self._positions = np.concatenate([self._positions, positions])

    def take(self, rows: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(input_ids, labels, position_ids), each [rows, block], from the front of the stream; labels are the input
        ids with every BOS masked (transformers shifts them). The stream must hold rows * block tokens."""
        size = rows * self.block
        if len(self._tokens) < size:
            raise ValueError(f"the stream holds {len(self._tokens)} tokens, fewer than {rows} x {self.block}")
        tokens, positions = self._tokens[:size].reshape(rows, self.block), self._positions[:size].reshape(rows, self.block)
        self._tokens, self._positions = self._tokens[size:], self._positions[size:]
        input_ids = torch.from_numpy(tokens.copy())
        return input_ids, input_ids.masked_fill(torch.from_numpy(positions == 0), IGNORE), torch.from_numpy(positions.copy())


def packing_order(lengths: Sequence[int], rng: np.random.Generator) -> np.ndarray:
    """The documents in a seeded order, the empty ones left out: the order pack_documents joins them in."""
    order = rng.permutation(len(lengths))
    return order[np.asarray(lengths, dtype=np.int64)[order] > 0]


def joined_lengths(lengths: Sequence[int], context: int) -> np.ndarray:
    """Each document's tokens in pack_documents' stream: [BOS] doc, cut to `context`."""
    return np.minimum(np.asarray(lengths, dtype=np.int64) + 1, context)


def packed_widths(lengths: Sequence[int], block: int, context: int) -> list[int]:
    """The widths of the blocks pack_documents cuts from documents of these lengths (in packing order), unread."""
    tokens = int(joined_lengths(lengths, context).sum())
    return [min(start + block, tokens - 1) - start for start in range(0, tokens - 1, block)]


def documents_of_blocks(lengths: Sequence[int], block: int, context: int) -> list[range]:
    """For each block pack_documents cuts from documents of these lengths (in packing order), the documents (their
    places in that order) whose tokens it holds, unread."""
    ends = np.cumsum(joined_lengths(lengths, context))
    total = int(ends[-1]) if len(ends) else 0
    starts = np.arange(0, max(total - 1, 0), block)
    first = np.searchsorted(ends, starts, side="right")  # the document of a block's first token
    last = np.searchsorted(ends, np.minimum(starts + block, total - 1), side="right")  # of its last label
    return [range(int(a), int(b) + 1) for a, b in zip(first, last)]


def pack_documents(documents: Sequence[TrainSequence], block: int, bos: int, context: int, order: Sequence[int]
                   ) -> list[TrainBlock]:
    """Continued training's stream: the documents in `order` (packing_order) joined as [BOS] doc [BOS] doc ... (no
    EOS: the fused store has no distribution for one), cut into blocks of `block` labels; consecutive blocks share
    one token, so every token after the first BOS is a label exactly once; the last block may be shorter."""
    kept = [int(i) for i in order]
    tokens, positions = join_documents([documents[i].input_ids for i in kept], bos, None, context)
    rows = None  # row i: the fused distribution over tokens[i] (none for a BOS)
    if kept and documents[kept[0]].targets is not None:
        parts = []
        for index in kept:
            document = documents[index]
            if len(document.targets.offsets) - 1 != len(document.input_ids):
                raise TrainingError(f"train sequence {index}: {len(document.input_ids)} tokens but "
                                    f"{len(document.targets.offsets) - 1} fused rows")
            cut = len(document.input_ids) >= context  # join_documents kept context - 1 of its tokens
            parts += [empty_rows(1), document.targets.take(np.arange(context - 1)) if cut else document.targets]
        rows = concat_rows(parts)
    chunked = bool(kept) and documents[kept[0]].chunks is not None
    chunks = chunk_stream([documents[i] for i in kept], context) if chunked else None
    ranked = bool(kept) and documents[kept[0]].ranks is not None
    if ranked:  # row i: the rank row of tokens[i], as for the fused rows
        k = documents[kept[0]].ranks.logprobs.shape[1]
        lengths = [min(len(documents[i].input_ids), context - 1) for i in kept]  # as join_documents cuts them
        ranks = concat_ranks([piece for i, n in zip(kept, lengths) for piece in
                              ((1, no_ranks(k)), (n, documents[i].ranks.take(0, n)))])
    blocks = []
    for start in range(0, len(tokens) - 1, block):
        end = min(start + block, len(tokens) - 1)  # labels tokens[start + 1 : end + 1]
        blocks.append(TrainBlock(tokens[start: end + 1], positions[start: end + 1],
                                 None if rows is None else rows.take(np.arange(start + 1, end + 1)),
                                 block_chunks(chunks, slice(start + 1, end + 1)) if chunked else None,
                                 ranks.take(start + 1, end + 1) if ranked else None))
    return blocks
