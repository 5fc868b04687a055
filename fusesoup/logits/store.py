"""Sharded stores on disk: zstd Parquet shards, a sidecar per finished shard, a manifest when all are done.

    <store>/manifest.json                   written last, only when every shard of every split is complete
    <store>/<split>/shard-00000.parquet     one row per corpus sequence
    <store>/<split>/shard-00000.json        written after its shard: key, rows, positions, sha256

A shard counts as done only when its sidecar carries the store's content key and the Parquet file's sha256;
anything else (a missing or stale sidecar, a truncated or corrupt file, a temp file left by a crash) is redone.
The teacher-logit store (`LogitStore`, codec.py's columns) and the aligned and fused stores (sparse_store.py) share
this discipline; readers hold one Parquet row group at a time and name the file in every error.
"""
from __future__ import annotations

import abc
import contextlib
import errno
import hashlib
import io
import multiprocessing
import os
import shutil
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Callable, Iterator, NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from fusesoup.logits.codec import SequenceLogits, decode, encode, id_dtype
from fusesoup.storage import StorageError, atomic_write_bytes, read_json, sha256_file, write_json

MANIFEST = "manifest.json"
ZSTD_LEVEL = 6  # teacher logits, measured: 18.1 bytes/position at level 6 and 17.9 at 10, in half the time
# Byte-stream split puts each byte of the (4-byte physical) values in its own stream, so zstd sees the constant
# high bytes as runs: 25-30% smaller for these columns; plain is smaller for the id columns (measured in bench/).
SPLIT_COLUMNS = {"start_gaps", "lengths", "topk_codes", "ce_codes", "counts", "codes", "status", "source"}


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


def logit_table(sequences: list[int], outputs: list[SequenceLogits], vocab_size: int) -> pa.Table:
    """One shard of the teacher-logit store as a table: a row per sequence, codec.py's columns."""
    columns = {name: [] for name in shard_schema(vocab_size).names}
    for sequence, output in zip(sequences, outputs, strict=True):
        columns["sequence"].append(sequence)
        for name, values in encode(output, vocab_size).items():
            columns[name].append(values)
    return pa.table(columns, schema=shard_schema(vocab_size))


def write_shard(store: Path, split: str, index: int, key: str, table: pa.Table, positions: int) -> ShardRecord:
    """Atomically write one shard and then its sidecar; returns what the manifest records for it."""
    buffer = io.BytesIO()
    encodings = {f"{name}.list.element": "BYTE_STREAM_SPLIT" for name in table.column_names if name in SPLIT_COLUMNS}
    pq.write_table(table, buffer, compression="zstd", compression_level=ZSTD_LEVEL, use_dictionary=False,
                   write_statistics=False, column_encoding=encodings)
    relative, data = f"{split}/{shard_name(index)}.parquet", buffer.getvalue()
    record = ShardRecord(relative, table.num_rows, positions, hashlib.sha256(data).hexdigest())
    try:
        atomic_write_bytes(store / relative, data)
        write_json(store / split / f"{shard_name(index)}.json", {"key": key, **record._asdict()})
    except OSError as error:
        if error.errno != errno.ENOSPC:
            raise
        raise StorageError(f"{store}: no space left on the device writing {relative} ({len(data) / 2**20:.1f} MiB); "
                           "the finished shards are kept: free space and run the stage again, it resumes with "
                           "this shard") from None
    return record


class ShardProgress:
    """The shards this run writes, timed: after the first, the bytes and time the rest will take are reported (at
    its size and pace), and a disk that cannot hold them is refused before hours are spent filling it."""

    def __init__(self, store: Path, shards: int, processes: int = 1, report: Callable[[str], None] = print):
        self.store, self.shards, self.processes, self.report = store, shards, processes, report
        self.done, self.bytes, self.started = 0, 0, time.monotonic()

    def shard_written(self, record: ShardRecord) -> None:
        self.done += 1
        self.bytes += (self.store / record.file).stat().st_size
        left = self.shards - self.done
        if self.done != 1 or left == 0:
            return
        seconds = -(-left // self.processes) * (time.monotonic() - self.started)  # `processes` shards at a time
        need, free = left * self.bytes, _free_bytes(self.store)
        self.report(f"{self.store}: {left} more shards to write, about {_size(need)} and {_duration(seconds)} at "
                    f"the first one's size and pace; {_size(free)} free")
        if need > free:
            raise StorageError(f"{self.store}: the {left} shards left need about {need / 2**20:.1f} MiB at the first "
                               f"one's size, but the disk has {free / 2**20:.1f} MiB free; free space or move the "
                               "store to a larger disk (the finished shard is kept)")


def _free_bytes(path: Path) -> int:
    return shutil.disk_usage(path).free


def _size(n: float) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def _duration(seconds: float) -> str:
    return f"{seconds / 3600:.1f} h" if seconds >= 3600 else f"{seconds / 60:.1f} min"


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


def remove_foreign(store: Path, plan: dict[str, int]) -> None:
    """Shards beyond the plan {split: shard count} and splits it does not list (left by other settings)."""
    if not store.is_dir():
        return
    for directory in (p for p in store.iterdir() if p.is_dir()):
        keep = plan.get(directory.name, 0)
        for path in directory.glob("shard-*.*"):
            if int(path.name[len("shard-"):].split(".")[0]) >= keep:
                path.unlink()


def split_records(store: Path, key: str, plan: dict[str, int]) -> dict | None:
    """The manifest's `splits` entry if every planned shard is finished under `key`, else None."""
    splits = {}
    for split, count in plan.items():
        records = [finished_shard(store, split, i, key) for i in range(count)]
        if any(record is None for record in records):
            return None
        splits[split] = {"sequences": sum(r.rows for r in records), "positions": sum(r.positions for r in records),
                         "bytes": sum((store / r.file).stat().st_size for r in records),
                         "shards": [r._asdict() for r in records]}
    return splits


def fill_store(store: Path, key: str, plan: dict[str, int],
               build_shard: Callable[[str, int], tuple[pa.Table, int]], processes: int = 1) -> dict:
    """Build every shard of `plan` not already finished under `key` (build_shard(split, index) -> (table,
    positions)); returns the manifest's `splits` entry. A killed run resumes at its first missing shard.

    With `processes` > 1 the shards are built and written by that many spawned processes, one shard at a time each
    (`build_shard` must pickle: a module-level function or an object's method); the files are the same bytes as
    one process writes, since a shard depends on its index only.
    """
    store.mkdir(parents=True, exist_ok=True)
    remove_manifest(store)
    remove_foreign(store, plan)
    todo = []
    for split, count in plan.items():
        finished = clear_stale(store, split, list(range(count)), key)
        todo += [(split, index) for index in range(count) if index not in finished]
    processes = max(1, min(processes, len(todo)))
    progress = ShardProgress(store, len(todo), processes)
    if processes == 1:
        for split, index in todo:
            progress.shard_written(build_and_write_shard(build_shard, store, split, index, key))
    else:
        # build_shard travels once per worker (the initializer), not once per shard: a builder's caches filled by
        # its first shard (e.g. an alignment's first-row vocabulary maps) then serve every later shard of that worker
        with ProcessPoolExecutor(processes, mp_context=multiprocessing.get_context("spawn"),
                                 initializer=_set_worker_builder, initargs=(build_shard,)) as pool:
            futures = [pool.submit(_worker_build_and_write, store, split, index, key) for split, index in todo]
            try:
                for future in as_completed(futures):
                    progress.shard_written(future.result())
            except BaseException:  # the shards already written stay; those not started are not
                pool.shutdown(wait=True, cancel_futures=True)
                raise
    splits = split_records(store, key, plan)
    assert splits is not None, "every shard was just written"
    return splits


def build_and_write_shard(build_shard: Callable[[str, int], tuple[pa.Table, int]], store: Path, split: str,
                          index: int, key: str) -> ShardRecord:
    """One shard of fill_store: built, written, its record returned (not its table)."""
    return write_shard(store, split, index, key, *build_shard(split, index))


_worker_builder: Callable[[str, int], tuple[pa.Table, int]] | None = None  # fill_store's build_shard, in a worker


def _set_worker_builder(build_shard: Callable[[str, int], tuple[pa.Table, int]]) -> None:
    global _worker_builder
    _worker_builder = build_shard


def _worker_build_and_write(store: Path, split: str, index: int, key: str) -> ShardRecord:
    assert _worker_builder is not None, "the pool's initializer sets the builder"
    return build_and_write_shard(_worker_builder, store, split, index, key)


def available_cores() -> int:
    """The CPU cores this process may run on (its affinity mask where the OS has one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


class StoredSequence(NamedTuple):
    sequence: int  # row index in the corpus split
    logits: SequenceLogits


class ShardedStore(abc.ABC):
    """A complete store: its manifest, checked; shards opened one at a time and checked against it."""

    REQUIRED: tuple[str, ...] = ("key", "splits", "codec", "vocab_size")

    def __init__(self, directory: Path | str):
        self.directory = Path(directory)
        self.manifest = read_json(self.directory / MANIFEST)
        for key in self.REQUIRED:
            if key not in self.manifest:
                raise StorageError(f"{self.directory / MANIFEST}: no '{key}' (not a {type(self).__name__} manifest)")
        self.vocab_size: int = self.manifest["vocab_size"]

    @abc.abstractmethod
    def schema(self) -> pa.Schema:
        """The schema every shard must have."""

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
                               "re-run the stage that writes it to redo it")
        try:
            parquet = pq.ParquetFile(path)
        except (pa.ArrowException, OSError) as error:
            raise StorageError(f"{path}: not a readable Parquet file ({error})") from None
        expected = self.schema()
        if not parquet.schema_arrow.equals(expected):
            raise StorageError(f"{path}: schema {parquet.schema_arrow} does not match the expected {expected}")
        if parquet.metadata.num_rows != shard.rows:
            raise StorageError(f"{path}: {parquet.metadata.num_rows} rows, manifest says {shard.rows}")
        return parquet

    def record_batches(self, split: str, batch_sequences: int = 64, shard: int | None = None,
                       columns: list[str] | None = None) -> Iterator[pa.RecordBatch]:
        """The rows of `split` (or of one of its shards) in corpus order, `batch_sequences` at a time; all
        columns or only `columns`."""
        records = self.shards(split) if shard is None else [self.shards(split)[shard]]
        for record in records:
            yield from self._open(record).iter_batches(batch_size=batch_sequences, columns=columns)


def list_rows(batch: pa.RecordBatch, names: list[str]) -> list[dict[str, np.ndarray]]:
    """Per row of the batch, its list columns `names` as numpy arrays (views into one array per column)."""
    flat = {}
    for name in names:
        column = batch.column(name)
        flat[name] = (column.values.to_numpy(zero_copy_only=False), column.offsets.to_numpy())
    return [{name: values[offsets[row]:offsets[row + 1]] for name, (values, offsets) in flat.items()}
            for row in range(batch.num_rows)]


class LogitStore(ShardedStore):
    """A teacher-logit store: `iter_batches(split)` yields decoded sequences, one row group in memory at a time."""

    REQUIRED = ShardedStore.REQUIRED + ("k",)

    def __init__(self, directory: Path | str):
        super().__init__(directory)
        self.k: int = self.manifest["k"]

    def schema(self) -> pa.Schema:
        return shard_schema(self.vocab_size)

    def iter_batches(self, split: str, batch_sequences: int = 64, shard: int | None = None) -> Iterator[list[StoredSequence]]:
        """Every sequence of `split` (or of one shard of it) in corpus order, `batch_sequences` at a time."""
        names = [name for name in self.schema().names if name != "sequence"]
        for batch in self.record_batches(split, batch_sequences, shard):
            sequences = batch.column("sequence").to_pylist()
            yield [StoredSequence(sequence, decode(values, self.k))
                   for sequence, values in zip(sequences, list_rows(batch, names), strict=True)]
