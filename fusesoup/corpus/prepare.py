"""The prepare_corpus stage: sources -> cleaned, deduplicated, capped, split and chunked zstd Parquet + manifest.

Everything streams: memory holds the set of seen document hashes and one write batch per split, never the
corpus. Output bytes depend only on the input, so DVC sees an unchanged corpus as unchanged.
"""
from __future__ import annotations

import bisect
import hashlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import pyarrow as pa
import pyarrow.parquet as pq

from fusesoup.corpus import SPLITS, CorpusError, RawDoc, TokenLimit, split_path
from fusesoup.corpus.sources import iter_source
from fusesoup.params import Corpus, Split
from fusesoup.storage import atomic_dir, sha256_file, write_json

ARROW_SCHEMA = pa.schema([("doc_id", pa.string()), ("domain", pa.string()), ("text", pa.string())])
_BATCH_ROWS = 2048


def normalise_newlines(text: str) -> str:
    """`\\r\\n` and lone `\\r` -> `\\n`, so the same text hashes and chunks the same whatever its origin."""
    return text.replace("\r\n", "\n").replace("\r", "\n")


@dataclass
class SourceStats:
    """What happened to one source's documents: read = kept + empty + duplicate + capped (bad records,
    which never become documents, are counted apart in `skipped`)."""

    read: int = 0
    kept: int = 0
    empty: int = 0
    duplicate: int = 0
    capped: int = 0
    skipped: Counter[str] = field(default_factory=Counter)
    stopped_at_cap: bool = False  # the source's fixed domain was full, so its remaining documents were not read

    def to_json(self) -> dict[str, Any]:
        counts = {k: getattr(self, k) for k in ("read", "kept", "empty", "duplicate", "capped", "stopped_at_cap")}
        return counts | {"skipped": dict(sorted(self.skipped.items()))}


@dataclass(frozen=True)
class CleanDoc:
    text: str  # newline-normalised
    domain: str
    group: str  # split key: the source's group, or the text's sha256 for per-record sources
    digest: bytes  # sha256 of the UTF-8 text
    size: int  # UTF-8 bytes


@dataclass(frozen=True)
class SourceStream:
    docs: Iterable[RawDoc]
    stats: SourceStats
    fixed_domain: str | None  # every document's domain, when the source fixes it


def clean_documents(streams: Iterable[SourceStream], domain_max_bytes: Mapping[str, int]) -> Iterator[CleanDoc]:
    """Normalise newlines, drop empty documents, exact duplicates (first occurrence in source order wins) and
    documents over their domain's byte cap, counting each in the stream's stats.

    Caps apply in stream order. Once a document would push its domain past the cap, the domain is full
    and every later document of it is dropped, even a smaller one that would still fit: simple and
    deterministic. A capped document does not enter the seen set, so its copy in another domain is kept;
    hence a source whose fixed domain is full can stop reading without changing the output.
    """
    seen: set[bytes] = set()
    used: Counter[str] = Counter()
    full: set[str] = set()
    for stream in streams:
        stats = stream.stats
        if stream.fixed_domain in full:
            stats.stopped_at_cap = True
            continue
        for raw in stream.docs:
            stats.read += 1
            if raw.domain in full:
                stats.capped += 1
                continue
            text = normalise_newlines(raw.text)
            if not text.strip():
                stats.empty += 1
                continue
            data = text.encode("utf-8")
            digest = hashlib.sha256(data).digest()
            if digest in seen:
                stats.duplicate += 1
                continue
            cap = domain_max_bytes.get(raw.domain)
            if cap is not None and used[raw.domain] + len(data) > cap:
                stats.capped += 1
                full.add(raw.domain)
                if raw.domain == stream.fixed_domain:
                    stats.stopped_at_cap = True
                    break
                continue
            seen.add(digest)
            used[raw.domain] += len(data)
            stats.kept += 1
            yield CleanDoc(text, raw.domain, raw.group or digest.hex(), digest, len(data))


def split_for(group: str, split: Split) -> str:
    """sha256(group) as a number in [0, 1): below `valid` -> valid, below valid+test -> test, else train."""
    position = int.from_bytes(hashlib.sha256(group.encode("utf-8")).digest()[:8], "big") / 2**64
    if position < split.valid:
        return "valid"
    return "test" if position < split.valid + split.test else "train"


def doc_id(digest: bytes, chunk: int) -> str:
    """First 16 hex chars of the document's sha256, then the 4-digit chunk index: `3fa2...c1-0003`."""
    return f"{digest.hex()[:16]}-{chunk:04d}"


def _fits_checker(max_bytes: int, token_limits: Sequence[TokenLimit]) -> Callable[[str], bool]:
    def fits(chunk: str) -> bool:
        if len(chunk.encode("utf-8")) > max_bytes:
            return False
        return all(limit.count_tokens(chunk) <= limit.max_tokens for limit in token_limits)

    return fits


def _longest_fitting(count: int, fits_first: Callable[[int], bool]) -> int:
    """The largest k in [1, count] with fits_first(k), by bisection (0 when even k=1 does not fit)."""
    return bisect.bisect_left(range(1, count + 1), True, key=lambda k: not fits_first(k))


def _cut_long_line(line: str, size: int, max_bytes: int, fits: Callable[[str], bool],
                   token_limits: Sequence[TokenLimit], chunks: list[str]) -> tuple[str, int]:
    """Append to `chunks` the longest fitting prefixes (<= max_bytes chars each) of a line that fits no chunk alone,
    once and then while the rest is over max_bytes bytes; return the rest and its size in bytes.

    The rest is tracked as an offset and sliced once at the end, so a line costs time linear in its length.
    """
    pos = 0
    while True:
        cut = _longest_fitting(min(len(line) - pos - 1, max_bytes), lambda k: fits(line[pos:pos + k]))
        if cut == 0:
            raise CorpusError(f"character {line[pos]!r} alone exceeds the chunk limits (max_chunk_bytes={max_bytes}"
                              f"{''.join(f', {t.model} max_tokens={t.max_tokens}' for t in token_limits)}); raise "
                              "corpus.max_chunk_bytes, or give models with longer contexts")
        chunks.append(line[pos:pos + cut])
        pos += cut
        size -= len(chunks[-1].encode("utf-8"))
        if size <= max_bytes:
            return line[pos:], size


def chunk_text(text: str, max_bytes: int, token_limits: Sequence[TokenLimit] = ()) -> list[str]:
    """Cut `text` into chunks within `max_bytes` UTF-8 bytes and every token limit, greedily at line ends.

    A chunk takes whole lines while they fit; a line that fits no chunk alone is cut between characters
    (never inside one). Tokens are counted only on candidate chunks (the longest run of lines within the
    byte limit, then a bisection if that has too many tokens); with no token limits no tokenizer runs.
    `"".join(chunks) == text` and every chunk is non-empty.
    """
    fits = _fits_checker(max_bytes, token_limits)
    units = text.split("\n")
    units = [line + "\n" for line in units[:-1]] + ([units[-1]] if units[-1] else [])
    sizes = [len(unit.encode("utf-8")) for unit in units]
    chunks: list[str] = []
    start = 0
    while start < len(units):
        end, total = start, 0
        while end < len(units) and total + sizes[end] <= max_bytes:
            total += sizes[end]
            end += 1
        take = end - start
        if take and token_limits and not fits("".join(units[start:end])):
            take = _longest_fitting(take - 1, lambda k: fits("".join(units[start:start + k])))
        if take:
            chunks.append("".join(units[start:start + take]))
            start += take
            continue
        rest, sizes[start] = _cut_long_line(units[start], sizes[start], max_bytes, fits, token_limits, chunks)
        units[start] = rest
    return chunks


def content_hash(splits: Mapping[str, Mapping[str, Any]]) -> str:
    """sha256 over the split files' hashes: one value that changes when any split's bytes do."""
    return hashlib.sha256("".join(f"{name}:{splits[name]['sha256']}\n" for name in SPLITS).encode()).hexdigest()


class _SplitWriter:
    """Streams one split's rows to zstd Parquet in row groups of about _BATCH_ROWS rows, counting what it writes."""

    def __init__(self, path: Path):
        self.path = path
        self._writer = pq.ParquetWriter(
            path, ARROW_SCHEMA, compression="zstd", compression_level=9, use_dictionary=["domain"],
            write_statistics=False,
        )
        self._rows: dict[str, list[str]] = {name: [] for name in ARROW_SCHEMA.names}
        self.documents = self.chunks = self.bytes = 0
        self.domains: dict[str, Counter[str]] = {}
        self.group_bytes: dict[str, Counter[str]] = {}  # per domain: bytes of each split group

    def write(self, doc: CleanDoc, chunks: list[str]) -> None:
        self.documents += 1
        self.chunks += len(chunks)
        self.bytes += doc.size
        counts = self.domains.setdefault(doc.domain, Counter())
        counts.update(chunks=len(chunks), bytes=doc.size)
        self.group_bytes.setdefault(doc.domain, Counter())[doc.group] += doc.size
        self._rows["doc_id"] += [doc_id(doc.digest, index) for index in range(len(chunks))]
        self._rows["domain"] += [doc.domain] * len(chunks)
        self._rows["text"] += chunks
        if len(self._rows["text"]) >= _BATCH_ROWS:
            self._flush()

    def _flush(self) -> None:
        if self._rows["text"]:
            self._writer.write_table(pa.table(self._rows, schema=ARROW_SCHEMA))
            self._rows = {name: [] for name in ARROW_SCHEMA.names}

    def close(self) -> dict[str, Any]:
        self._flush()
        self._writer.close()
        return {
            "documents": self.documents, "chunks": self.chunks, "bytes": self.bytes,
            "domains": {name: {**counts, "groups": len(self.group_bytes[name]),
                               "largest_group_share": max(self.group_bytes[name].values()) / max(counts["bytes"], 1)}
                        for name, counts in sorted(self.domains.items())},
            "sha256": sha256_file(self.path),
        }


def missing_domains(splits: Mapping[str, Mapping[str, Any]]) -> dict[str, list[str]]:
    """valid and test -> the domains the corpus has but that split does not: trained on, never scored (test) or
    never used to tune the soups (valid)."""
    every = {domain for split in splits.values() for domain in split["domains"]}
    return {name: sorted(every - set(splits[name]["domains"])) for name in SPLITS if name != "train"}


def prepare_corpus(
    corpus: Corpus, out_dir: Path | str = "data/corpus", token_limits: Sequence[TokenLimit] = ()
) -> dict[str, Any]:
    """Build the corpus into `out_dir` ({train,valid,test}.parquet + manifest.json) and return the manifest.

    The directory is swapped in whole at the end, so a failure leaves the previous corpus (or nothing). The token
    limits shape the chunks but are not recorded: a model whose limits cut nothing leaves the output byte-identical,
    so adding it reruns nothing downstream.
    """
    stats = [SourceStats() for _ in corpus.sources]
    streams = [  # opened up front, so a pattern that matches nothing stops the stage before any reading
        SourceStream(iter_source(source, corpus.on_error, stat.skipped), stat, getattr(source, "domain", None))
        for source, stat in zip(corpus.sources, stats)
    ]
    with atomic_dir(out_dir) as tmp:
        writers = {name: _SplitWriter(split_path(tmp, name)) for name in SPLITS}
        for doc in clean_documents(streams, corpus.domain_max_bytes):
            writers[split_for(doc.group, corpus.split)].write(
                doc, chunk_text(doc.text, corpus.max_chunk_bytes, token_limits)
            )
        splits = {name: writer.close() for name, writer in writers.items()}
        if not any(split["documents"] for split in splits.values()):
            raise CorpusError(f"the corpus is empty after cleaning (per source: {[s.to_json() for s in stats]})")
        manifest = {
            "splits": splits,
            "missing_domains": missing_domains(splits),
            "totals": {key: sum(split[key] for split in splits.values()) for key in ("documents", "chunks", "bytes")},
            "sources": [{"kind": source.kind} | stat.to_json() for source, stat in zip(corpus.sources, stats)],
            "content_hash": content_hash(splits),
            "corpus": corpus.model_dump(mode="json"),
        }
        write_json(Path(tmp) / "manifest.json", manifest)
    return manifest
