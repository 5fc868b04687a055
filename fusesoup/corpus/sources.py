"""Raw documents from each kind of corpus source, streamed one at a time.

The built-in sources live in builtin.py. Bad user records (invalid UTF-8, malformed JSON, a missing or non-string field, a truncated .zst) either stop
the stage with a `CorpusError` naming file and line, or are skipped and counted by reason, as
`corpus.on_error` says. Built-in data (the running Python's standard library) is always skipped and counted.
"""
from __future__ import annotations

import glob
import itertools
import json
import os
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Literal

import pyarrow as pa
import pyarrow.parquet as pq
import zstandard

from fusesoup.corpus import CorpusError, RawDoc
from fusesoup.corpus.builtin import iter_builtin_code, iter_builtin_prose
from fusesoup.params import BuiltinCodeSource, BuiltinProseSource, CorpusSource, FilesSource, HubSource

FILE_TYPES = (".txt", ".jsonl", ".jsonl.zst", ".parquet")
_READ_BYTES = 1 << 16
_PARQUET_BATCH_ROWS = 1024


class _BadRecord(Exception):
    """Raised by the record parsers: `reason` is the manifest's counter key, the message says what is wrong."""

    def __init__(self, reason: str, problem: str):
        super().__init__(problem)
        self.reason = reason


@dataclass
class _Policy:
    """What to do with a bad record: raise (on_error: fail) or count it under its reason (on_error: skip)."""

    on_error: Literal["fail", "skip"]
    skipped: Counter[str]

    def bad(self, origin: str, error: _BadRecord) -> None:
        if self.on_error == "fail":
            raise CorpusError(f"{origin}: {error}")
        self.skipped[error.reason] += 1


def iter_source(source: CorpusSource, on_error: Literal["fail", "skip"], skipped: Counter[str]) -> Iterator[RawDoc]:
    """The documents of one `corpus.sources` entry, in a deterministic order; bad records go to `skipped`."""
    if isinstance(source, BuiltinCodeSource):
        return iter_builtin_code(source, skipped)
    if isinstance(source, BuiltinProseSource):
        return iter_builtin_prose(source, skipped)
    policy = _Policy(on_error, skipped)
    if isinstance(source, FilesSource):
        return _iter_files(source, policy)
    return _iter_hub(source, policy)


# --- records of user files and datasets --------------------------------------------------------------------

def _field(record: dict[str, Any], dotted: str) -> Any:
    """The value at a dotted path (`meta.pile_set_name`); a missing or null value is a bad record."""
    value: Any = record
    for key in dotted.split("."):
        if not isinstance(value, dict) or key not in value:
            raise _BadRecord("missing_field", f"missing field {dotted!r}")
        value = value[key]
    if value is None:
        raise _BadRecord("missing_field", f"field {dotted!r} is null")
    return value


def _string_field(record: dict[str, Any], dotted: str) -> str:
    value = _field(record, dotted)
    if not isinstance(value, str):
        raise _BadRecord("not_string", f"field {dotted!r} is not a string (got {type(value).__name__})")
    try:
        value.encode("utf-8")  # json.loads accepts lone surrogates ("\ud800"), which UTF-8 cannot hold
    except UnicodeEncodeError:
        raise _BadRecord("undecodable", f"field {dotted!r} holds a lone surrogate, not valid Unicode text") from None
    return value


def domain_name(value: str) -> str:
    """A record's domain value as a params-style domain name: lower case, runs of other characters -> '-'.

    So `Pile-CC` becomes `pile-cc` and `PubMed Central` `pubmed-central`, names that params.yaml can use.
    """
    name = re.sub(r"[^a-z0-9_]+", "-", value.lower()).strip("-_")
    if not name:
        raise _BadRecord("bad_domain", f"domain {value!r} has no letters or digits")
    return name


def _domain_of(record: dict[str, Any], source: FilesSource | HubSource) -> str:
    if source.domain is not None:
        return source.domain
    return domain_name(_string_field(record, source.domain_field))


def _docs_from_records(
    records: Iterable[tuple[str, Any]], source: FilesSource | HubSource, policy: _Policy
) -> Iterator[RawDoc]:
    """(origin, record or _BadRecord) pairs -> documents; a bad record goes to the policy."""
    for origin, record in records:
        try:
            if isinstance(record, _BadRecord):
                raise record
            if not isinstance(record, dict):
                raise _BadRecord("bad_json", f"expected a JSON object, got {type(record).__name__}")
            yield RawDoc(_string_field(record, source.text_field), _domain_of(record, source), None, origin)
        except _BadRecord as error:
            policy.bad(origin, error)


def _resolve_paths(source: FilesSource) -> list[str]:
    """The files the glob patterns match, sorted per pattern, each once; checked before any is read."""
    paths: dict[str, None] = {}
    for pattern in source.paths:
        matches = sorted(path for path in glob.glob(pattern, recursive=True) if os.path.isfile(path))
        if not matches:
            raise CorpusError(f"corpus files: pattern {pattern!r} matches no file (relative to {os.getcwd()})")
        paths.update(dict.fromkeys(matches))
    for path in paths:
        if not path.endswith(FILE_TYPES):
            raise CorpusError(f"{path}: unsupported file type (expected one of {', '.join(FILE_TYPES)})")
        if path.endswith(".txt") and source.domain is None:
            raise CorpusError(f"{path}: a .txt file has no field {source.domain_field!r}; give 'domain' instead")
    return list(paths)


def _iter_files(source: FilesSource, policy: _Policy) -> Iterator[RawDoc]:
    paths = _resolve_paths(source)  # now, not on the first next(): settings errors come before any reading
    return (doc for path in paths for doc in _file_docs(path, source, policy))


def _file_docs(path: str, source: FilesSource, policy: _Policy) -> Iterator[RawDoc]:
    if path.endswith(".txt"):
        yield from _txt_docs(path, source, policy)
        return
    if path.endswith(".parquet"):
        records = _parquet_records(path, source, policy)
    else:
        lines = _zst_lines(path, policy) if path.endswith(".zst") else _plain_lines(path)
        records = _jsonl_records(path, lines)
    yield from _docs_from_records(records, source, policy)


def _txt_docs(path: str, source: FilesSource, policy: _Policy) -> Iterator[RawDoc]:
    """A .txt file is one document; invalid UTF-8 is reported at the line that holds it."""
    data = Path(path).read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        line = data.count(b"\n", 0, error.start) + 1
        policy.bad(f"{path}:{line}", _BadRecord("undecodable", "invalid UTF-8"))
        return
    yield RawDoc(text, source.domain, None, path)


def _plain_lines(path: str) -> Iterator[bytes]:
    with open(path, "rb") as handle:
        yield from handle


def _zst_lines(path: str, policy: _Policy) -> Iterator[bytes]:
    """Decompressed lines of a .zst file, streamed frame by frame.

    zstandard's `stream_reader` returns a silent EOF on a truncated frame, so frames are fed to
    `decompressobj`s and the last one must have reached its end; otherwise the unfinished line is reported.
    """
    pending: list[bytes] = []
    lineno = 0
    decoder = None
    try:
        with open(path, "rb") as handle:
            while block := handle.read(_READ_BYTES):
                while block:
                    if decoder is None or decoder.eof:
                        decoder = zstandard.ZstdDecompressor().decompressobj()
                    data = decoder.decompress(block)
                    block = decoder.unused_data if decoder.eof else b""
                    *lines, rest = data.split(b"\n")
                    for line in lines:
                        lineno += 1
                        yield b"".join(pending) + line + b"\n"
                        pending = []
                    if rest:
                        pending.append(rest)
    except zstandard.ZstdError as error:
        policy.bad(f"{path}:{lineno + 1}", _BadRecord("corrupt", f"corrupt zstd data ({error})"))
        return
    if decoder is None or not decoder.eof:
        policy.bad(f"{path}:{lineno + 1}", _BadRecord("truncated", "truncated zstd stream (the file ends mid-frame)"))
        return
    if pending:
        yield b"".join(pending)


def _jsonl_records(path: str, lines: Iterable[bytes]) -> Iterator[tuple[str, Any]]:
    """One JSON value per line (blank lines carry no record and are passed over), numbered from 1."""
    for lineno, raw in enumerate(lines, 1):
        origin = f"{path}:{lineno}"
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as error:
            bad = f"byte 0x{raw[error.start]:02x} at offset {error.start} of the line"
            yield origin, _BadRecord("undecodable", f"invalid UTF-8 ({bad})")
            continue
        if not line.strip():
            continue
        try:
            yield origin, json.loads(line.rstrip("\r\n"))  # so error columns count within this line
        except json.JSONDecodeError as error:
            yield origin, _BadRecord("bad_json", f"malformed JSON ({error.msg} at column {error.colno})")


def _parquet_records(path: str, source: FilesSource, policy: _Policy) -> Iterator[tuple[str, Any]]:
    """Rows as dicts, streamed in batches of only the needed top-level columns; rows numbered from 1.

    A needed column the file lacks is left out of the read, so each row reports the missing field.
    """
    row = 0
    try:
        parquet = pq.ParquetFile(path)
        fields = [source.text_field] + ([source.domain_field] if source.domain_field else [])
        columns = sorted({f.split(".")[0] for f in fields} & set(parquet.schema_arrow.names))
        for batch in parquet.iter_batches(batch_size=_PARQUET_BATCH_ROWS, columns=columns):
            for record in batch.to_pylist():
                row += 1
                yield f"{path}:row {row}", record
    except (pa.ArrowException, OSError) as error:
        policy.bad(f"{path}:row {row + 1}", _BadRecord("corrupt", f"unreadable Parquet ({error})"))


def _iter_hub(source: HubSource, policy: _Policy) -> Iterator[RawDoc]:
    """A `datasets` dataset in streaming mode (nothing is downloaded whole), at most `max_docs` records."""
    import datasets  # slow to import; only hub sources need it

    name = f"{source.dataset}[{source.split}]"
    try:
        stream = iter(datasets.load_dataset(
            source.dataset, source.config, split=source.split, data_files=source.data_files, streaming=True
        ))
    except Exception as error:  # datasets raises many types (network, missing config, bad files)
        raise CorpusError(f"{name}: cannot open the dataset ({type(error).__name__}: {error})") from None

    def records() -> Iterator[tuple[str, Any]]:
        row = 0
        try:
            for row, record in enumerate(itertools.islice(stream, source.max_docs), 1):
                yield f"{name}:row {row}", record
        except Exception as error:  # a stream that fails mid-way cannot be resumed past the bad record
            raise CorpusError(f"{name}:row {row + 1}: cannot read ({type(error).__name__}: {error})") from None

    yield from _docs_from_records(records(), source, policy)
