"""The corpus: sources -> cleaned, deduplicated, split and chunked documents in zstd Parquet."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, NamedTuple

import polars as pl

from fusesoup.cli import StageError
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
