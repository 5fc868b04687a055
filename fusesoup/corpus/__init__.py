"""The corpus: sources -> cleaned, deduplicated, split and chunked documents in zstd Parquet."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, NamedTuple

import polars as pl

from fusesoup.errors import StageError
from fusesoup.storage import read_parquet

SPLITS = ("train", "valid", "test")
CORPUS_SCHEMA = {"doc_id": pl.String, "domain": pl.String, "text": pl.String}


def split_path(corpus_dir: Path | str, split: str) -> Path:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    return Path(corpus_dir) / f"{split}.parquet"


def read_split(corpus_dir: Path | str, split: str, domains: list[str] | None = None) -> pl.DataFrame:
    """One split as a DataFrame (doc_id, domain, text), optionally only the given domains, in stored order."""
    frame = read_parquet(split_path(corpus_dir, split), CORPUS_SCHEMA)
    return frame if domains is None else frame.filter(pl.col("domain").is_in(domains))


def read_texts(path: Path, start: int, stop: int) -> list[str]:
    """Rows [start, stop) of a corpus split's text column, without reading the rest of the file."""
    return pl.scan_parquet(path).slice(start, stop - start).select("text").collect()["text"].to_list()


def largest_group_parts(frame: pl.DataFrame, domain: str) -> tuple[str, dict[str, pl.DataFrame]]:
    """(largest document group, {"largest group": its rows, "rest": the others}) of one domain of a split.

    A doc_id is <group>-<chunk> and splits are cut by group, so one big source file can dominate a domain's share of
    a split (valid prose on the offline default: 96 of 218 rows); analyses report the two parts apart."""
    rows = frame.filter(pl.col("domain") == domain).with_columns(pl.col("doc_id").str.split("-").list.first()
                                                                 .alias("group"))
    if rows.is_empty():
        raise ValueError(f"no {domain!r} rows in this split")
    largest = rows["group"].value_counts().sort(["count", "group"], descending=[True, False])["group"][0]
    return largest, {"largest group": rows.filter(pl.col("group") == largest).drop("group"),
                     "rest": rows.filter(pl.col("group") != largest).drop("group")}


class TokenLimit(NamedTuple):
    """A tokenizer that every corpus chunk must fit: chunks are cut until count_tokens(chunk) <= max_tokens."""

    model: str
    count_tokens: Callable[[str], int]
    max_tokens: int


class CorpusError(StageError):
    """Bad corpus input or settings; the message names the file and line (or row) and the problem."""


@dataclass(frozen=True)
class RawDoc:
    """One document as a source yields it, before cleaning.

    `group` is the split key: documents with the same group always land in the same split. None means
    "the document's own content" (records of user files and datasets).
    """

    text: str
    domain: str
    group: str | None
    origin: str  # "file:line" or "file:row N", for messages
