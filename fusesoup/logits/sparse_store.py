"""Stores of sparse distributions on the target's tokens: aligned (align@<teacher>) and fused (fuse).

One row per corpus sequence: `sequence`, the target's `input_ids`, the rows' `counts` / `ids` / `codes`
(sparse.py) and a few per-position extras:
- aligned: `ce_codes` (the teacher's CE carried onto target positions, codec.py's CE quantisation), `status`
  (EXACT / MAPPED / FALLBACK / SPAN, transfer.py), `group_end` (1 at the last position of each alignment group) and
  `rank_codes` (n x k: the teacher's top-k by rank where the row fell back, sparse.encode_ranks);
- fused: `source` (the index in the manifest's `sources` of the source each position took; MIXED where several
  were averaged), `chunk_end` (1 at the last position of each chunk: where every source's group ends) and
  `chunk_ce_codes` (the fused teacher's CE of each chunk, split evenly over its positions; fusion.fuse_chunks) and
  `rank_codes` (the sources' rank rows mixed by their weights; fusion.fuse_ranks).
Shards, sidecars, checksums and manifest follow store.py, so writes are atomic and a killed stage resumes.
"""
from __future__ import annotations

from typing import Iterator, NamedTuple

import numpy as np
import pyarrow as pa

from fusesoup.logits.codec import id_dtype
from fusesoup.logits.sparse import SPARSE_CODEC, SparseRows, decode_rows, encode_rows
from fusesoup.logits.store import ShardedStore, list_rows
from fusesoup.storage import StorageError

ALIGNED_EXTRAS = {"ce_codes": np.dtype(np.uint16), "status": np.dtype(np.uint8), "group_end": np.dtype(np.uint8),
                  "rank_codes": np.dtype(np.uint8)}
FUSED_EXTRAS = {"source": np.dtype(np.uint8), "chunk_end": np.dtype(np.uint8), "chunk_ce_codes": np.dtype(np.uint16),
                "rank_codes": np.dtype(np.uint8)}
MIXED = 255  # `source` of a fused position that averages several sources


def sparse_schema(vocab_size: int, extras: dict[str, np.dtype]) -> pa.Schema:
    ids = pa.from_numpy_dtype(id_dtype(vocab_size))
    return pa.schema([("sequence", pa.uint32()), ("input_ids", pa.list_(ids)), ("counts", pa.list_(pa.uint8())),
                      ("ids", pa.list_(ids)), ("codes", pa.list_(pa.uint8())),
                      *((name, pa.list_(pa.from_numpy_dtype(kind))) for name, kind in extras.items())])


class SparseSequence(NamedTuple):
    sequence: int  # row index in the corpus split
    input_ids: np.ndarray  # [n] the target's tokens
    rows: SparseRows  # n rows: the distribution over the token at each position
    extras: dict[str, np.ndarray]  # [n] each ([n * k] for rank_codes), raw stored values (module docstring)


def sparse_table(items: list[SparseSequence], vocab_size: int, extras: dict[str, np.dtype]) -> pa.Table:
    """One shard as a table."""
    schema = sparse_schema(vocab_size, extras)
    columns: dict[str, list] = {name: [] for name in schema.names}
    ids = id_dtype(vocab_size)
    for item in items:
        if set(item.extras) != set(extras):
            raise ValueError(f"sequence {item.sequence}: extras {sorted(item.extras)}, expected {sorted(extras)}")
        if len(item.input_ids) != len(item.rows.offsets) - 1:
            raise ValueError(f"sequence {item.sequence}: {len(item.input_ids)} tokens but "
                             f"{len(item.rows.offsets) - 1} rows")
        columns["sequence"].append(item.sequence)
        columns["input_ids"].append(np.asarray(item.input_ids).astype(ids))
        for name, values in encode_rows(item.rows, vocab_size).items():
            columns[name].append(values)
        for name, kind in extras.items():
            columns[name].append(np.asarray(item.extras[name]).astype(kind))
    return pa.table(columns, schema=schema)


class SparseStore(ShardedStore):
    """An aligned or fused store, read lazily; `extras` names the per-position columns it must have."""

    def __init__(self, directory, extras: dict[str, np.dtype]):
        super().__init__(directory)
        self.extras = extras
        if self.manifest["codec"] != SPARSE_CODEC:
            raise StorageError(f"{self.directory}: codec {self.manifest['codec']!r}, expected {SPARSE_CODEC!r}")
        self.keeps_tail: bool = self.manifest.get("tail", False)  # rows sum to at most 1 (sparse.py)

    def schema(self) -> pa.Schema:
        return sparse_schema(self.vocab_size, self.extras)

    def iter_batches(self, split: str, batch_sequences: int = 64, shard: int | None = None) -> Iterator[list[SparseSequence]]:
        """Every sequence of `split` (or of one shard of it) in corpus order, `batch_sequences` at a time."""
        names = [name for name in self.schema().names if name != "sequence"]
        for batch in self.record_batches(split, batch_sequences, shard):
            out = []
            for sequence, values in zip(batch.column("sequence").to_pylist(), list_rows(batch, names), strict=True):
                rows = decode_rows(values["counts"], values["ids"], values["codes"], self.keeps_tail)
                out.append(SparseSequence(sequence, values["input_ids"].astype(np.int64), rows,
                                          {name: values[name] for name in self.extras}))
            yield out
