"""Helpers shared by the corpus tests: write small input files in every supported format and build settings."""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import zstandard

from fusesoup.corpus import RawDoc
from fusesoup.corpus.sources import iter_source
from fusesoup.params import Corpus, FilesSource


def jsonl_bytes(records: list[Any]) -> bytes:
    """One line per record: dicts are JSON-encoded, bytes and str are written as they are (for bad lines)."""
    lines = []
    for record in records:
        if isinstance(record, bytes):
            lines.append(record)
        elif isinstance(record, str):
            lines.append(record.encode())
        else:
            lines.append(json.dumps(record).encode())
    return b"".join(line + b"\n" for line in lines)


def write_jsonl(path: Path, records: list[Any]) -> Path:
    path.write_bytes(jsonl_bytes(records))
    return path


def write_zst(path: Path, records: list[Any], frames: int = 1) -> Path:
    """The records as .jsonl.zst, split over `frames` independent zstd frames."""
    data = jsonl_bytes(records)
    step = -(-len(data) // frames)
    path.write_bytes(b"".join(zstandard.ZstdCompressor().compress(data[i:i + step]) for i in range(0, len(data), step)))
    return path


def write_parquet(path: Path, columns: dict[str, list[Any]], row_group_size: int | None = None) -> Path:
    pq.write_table(pa.table(columns), path, row_group_size=row_group_size)
    return path


def files_source(paths: list[Path | str], **settings: Any) -> FilesSource:
    settings.setdefault("domain", None if "domain_field" in settings else "web")
    return FilesSource(kind="files", paths=[str(p) for p in paths], **settings)


def corpus(sources: list[Any], **settings: Any) -> Corpus:
    return Corpus(sources=sources, **settings)


def read_docs(source: Any, on_error: str = "fail") -> tuple[list[RawDoc], Counter[str]]:
    """All documents of one source and the skip counts."""
    skipped: Counter[str] = Counter()
    return list(iter_source(source, on_error, skipped)), skipped
