"""The teacher-logit store on disk: zstd Parquet shards, a sidecar per finished shard, a manifest when all are done.

    <store>/manifest.json                   written last, only when every shard of every split is complete
    <store>/<split>/shard-00000.parquet     one row per corpus sequence (codec.py's columns + `sequence`)
    <store>/<split>/shard-00000.json        written after its shard: key, rows, positions, sha256

A shard counts as done only when its sidecar carries the store's content key and the Parquet file's sha256;
anything else (a missing or stale sidecar, a truncated or corrupt file, a temp file left by a crash) is redone.
`LogitStore` reads a complete store one batch of sequences at a time and names the file in every error.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import os
from pathlib import Path
from typing import Iterator, NamedTuple

import pyarrow as pa
import pyarrow.parquet as pq

from fusesoup.logits.codec import SequenceLogits, decode, encode, id_dtype
from fusesoup.storage import StorageError, atomic_write_bytes, read_json, sha256_file, write_json

MANIFEST = "manifest.json"
ZSTD_LEVEL = 10
# Byte-stream split puts each byte of the (4-byte physical) values in its own stream, so zstd sees the constant
# high bytes as runs: 25-30% smaller for these columns; plain is smaller for the id columns (measured in bench/).
SPLIT_BYTES = {f"{name}.list.element": "BYTE_STREAM_SPLIT" for name in ("start_gaps", "lengths", "topk_codes", "ce_codes")}


def shard_name(index: int) -> str:
    return f"shard-{index:05d}"


def shard_schema(vocab_size: int) -> pa.Schema:
    ids = pa.from_numpy_dtype(id_dtype(vocab_size))
    return pa.schema([
        ("sequence", pa.uint32()),  # row index in the corpus split
        ("input_ids", pa.list_(ids)), ("start_gaps", pa.list_(pa.int32())), ("lengths", pa.list_(pa.int32())),
        ("topk_ids", pa.list_(ids)), ("topk_codes", pa.list_(pa.uint8())), ("ce_codes", pa.list_(pa.uint16())),
    ])


class ShardRecord(NamedTuple):
    file: str  # relative to the store: <split>/shard-NNNNN.parquet
    rows: int
    positions: int
    sha256: str


def write_shard(store: Path, split: str, index: int, key: str, sequences: list[int],
                outputs: list[SequenceLogits], vocab_size: int) -> ShardRecord:
    """Atomically write one shard and then its sidecar; returns what the manifest records for it."""
    columns = {name: [] for name in shard_schema(vocab_size).names}
    for sequence, output in zip(sequences, outputs, strict=True):
        columns["sequence"].append(sequence)
        for name, values in encode(output, vocab_size).items():
            columns[name].append(values)
    table = pa.table(columns, schema=shard_schema(vocab_size))
    buffer = io.BytesIO()
    pq.write_table(table, buffer, compression="zstd", compression_level=ZSTD_LEVEL, use_dictionary=False,
                   write_statistics=False, column_encoding=SPLIT_BYTES)
    relative, data = f"{split}/{shard_name(index)}.parquet", buffer.getvalue()
    atomic_write_bytes(store / relative, data)
    positions = sum(len(o.input_ids) for o in outputs)
    record = ShardRecord(relative, len(sequences), positions, hashlib.sha256(data).hexdigest())
    write_json(store / split / f"{shard_name(index)}.json", {"key": key, **record._asdict()})
    return record


def finished_shard(store: Path, split: str, index: int, key: str) -> ShardRecord | None:
    """The shard's record if its sidecar matches `key` and its file matches the recorded checksum, else None."""
    sidecar = store / split / f"{shard_name(index)}.json"
    if not sidecar.is_file():
        return None
    try:
        meta = read_json(sidecar)
        record = ShardRecord(meta["file"], meta["rows"], meta["positions"], meta["sha256"])
    except (StorageError, KeyError, TypeError):
        return None
    if meta.get("key") != key or not (store / record.file).is_file() or sha256_file(store / record.file) != record.sha256:
        return None
    return record


def clear_stale(store: Path, split: str, shard_indices: list[int], key: str) -> set[int]:
    """Delete temp files and stale shards (another key, a bad checksum) among the given shards only; returns the
    indices of those that are finished.

    Limited to `shard_indices` so that parallel workers never touch each other's files.
    """
    directory = store / split
    if not directory.is_dir():
        return set()
    finished = set()
    for index in shard_indices:
        name = shard_name(index)
        for temp in directory.glob(f".{name}.*.tmp-*"):
            temp.unlink(missing_ok=True)
        if finished_shard(store, split, index, key) is not None:
            finished.add(index)
        else:
            for path in (directory / f"{name}.json", directory / f"{name}.parquet"):
                path.unlink(missing_ok=True)
    return finished


def write_manifest(store: Path, manifest: dict) -> None:
    write_json(store / MANIFEST, manifest)


def remove_manifest(store: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(store / MANIFEST)


class StoredSequence(NamedTuple):
    sequence: int  # row index in the corpus split
    logits: SequenceLogits


class LogitStore:
    """A complete store, read lazily: `iter_batches(split)` holds one Parquet row group in memory at a time."""

    def __init__(self, directory: Path | str):
        self.directory = Path(directory)
        self.manifest = read_json(self.directory / MANIFEST)
        for key in ("key", "k", "vocab_size", "splits", "codec"):
            if key not in self.manifest:
                raise StorageError(f"{self.directory / MANIFEST}: no '{key}' (not a logit store manifest)")
        self.k: int = self.manifest["k"]
        self.vocab_size: int = self.manifest["vocab_size"]

    def shards(self, split: str) -> list[ShardRecord]:
        if split not in self.manifest["splits"]:
            raise StorageError(f"{self.directory / MANIFEST}: no split {split!r} "
                               f"(stored: {sorted(self.manifest['splits'])})")
        return [ShardRecord(**shard) for shard in self.manifest["splits"][split]["shards"]]

    def _open(self, shard: ShardRecord) -> pq.ParquetFile:
        path = self.directory / shard.file
        if not path.is_file():
            raise StorageError(f"{path}: missing (listed in {self.directory / MANIFEST})")
        if sha256_file(path) != shard.sha256:
            raise StorageError(f"{path}: checksum does not match the manifest (corrupt or changed); "
                               "re-run the extract stage to redo it")
        try:
            parquet = pq.ParquetFile(path)
        except (pa.ArrowException, OSError) as error:
            raise StorageError(f"{path}: not a readable Parquet file ({error})") from None
        expected = shard_schema(self.vocab_size)
        if not parquet.schema_arrow.equals(expected):
            raise StorageError(f"{path}: schema {parquet.schema_arrow} does not match the expected {expected}")
        if parquet.metadata.num_rows != shard.rows:
            raise StorageError(f"{path}: {parquet.metadata.num_rows} rows, manifest says {shard.rows}")
        return parquet

    def iter_batches(self, split: str, batch_sequences: int = 64) -> Iterator[list[StoredSequence]]:
        """Every sequence of `split` in corpus order, `batch_sequences` at a time."""
        for shard in self.shards(split):
            parquet = self._open(shard)
            for batch in parquet.iter_batches(batch_size=batch_sequences):
                columns = {name: batch.column(name) for name in batch.schema.names}
                out = []
                for row in range(batch.num_rows):
                    values = {name: columns[name][row].values.to_numpy(zero_copy_only=False)
                              for name in columns if name != "sequence"}
                    out.append(StoredSequence(columns["sequence"][row].as_py(), decode(values, self.k)))
                yield out

