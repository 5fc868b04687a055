"""The fuse stage's I/O: every source's aligned store in, one fused store out (shard by shard, resumable), and
the statistics of who wins where for metrics/fusion.json."""
from __future__ import annotations

from pathlib import Path
from typing import NamedTuple, Sequence

import numpy as np
import polars as pl
import pyarrow as pa

from fusesoup.corpus import split_path
from fusesoup.errors import StageError
from fusesoup.fusion import SourceRows, fuse_sequence, source_weights
from fusesoup.logits.codec import dequantize_ce, quantize_ce
from fusesoup.logits.sparse import SPARSE_CODEC, decode_ranks, encode_ranks
from fusesoup.logits.sparse_store import FUSED_EXTRAS, SparseSequence, SparseStore, sparse_table
from fusesoup.logits.store import fill_store, list_rows, write_manifest
from fusesoup.params import FuseMethod
from fusesoup.storage import content_key


class FusionError(StageError):
    """The aligned stores do not fit together; the message names the stores, split and row."""


def check_compatible(stores: Sequence[SparseStore]) -> None:
    first = stores[0]
    for store in stores[1:]:
        if store.vocab_size != first.vocab_size:
            raise FusionError(f"{store.directory}: vocabulary {store.vocab_size}, but {first.directory} has "
                              f"{first.vocab_size}; every aligned store must be on the same target")
        if store.keeps_tail != first.keeps_tail:
            raise FusionError(f"{store.directory}: align.tail {store.keeps_tail}, but {first.directory} was aligned "
                              f"with {first.keeps_tail}; align every source with the same params")
        for split in first.manifest["splits"]:
            if [s.rows for s in store.shards(split)] != [s.rows for s in first.shards(split)]:
                raise FusionError(f"{store.directory} and {first.directory}: the {split} shards hold different rows")


class ShardFuser(NamedTuple):
    """fill_store's build_shard: fused shard i from shard i of every source's aligned store (in `sources` order).
    A picklable object, so that shards can be fused in parallel processes."""

    stores: Sequence[SparseStore]
    method: FuseMethod
    temperature: float

    def __call__(self, split: str, index: int) -> tuple[pa.Table, int]:
        items, positions, (first, *others), vocab_size = [], 0, self.stores, self.stores[0].vocab_size
        for batches in zip(*(s.iter_batches(split, shard=index) for s in self.stores), strict=True):
            for sequences in zip(*batches, strict=True):
                head = sequences[0]
                for other, store in zip(sequences[1:], others):
                    if other.sequence != head.sequence or not np.array_equal(other.input_ids, head.input_ids):
                        raise FusionError(f"{store.directory}: {split} row {other.sequence} does not hold the "
                                          f"target tokens of {first.directory} row {head.sequence}")
                sources = [SourceRows(s.rows, dequantize_ce(s.extras["ce_codes"])) for s in sequences]
                n = len(head.input_ids)
                group_ends = np.stack([s.extras["group_end"] for s in sequences])
                ranks = [decode_ranks(s.extras["rank_codes"], n) for s in sequences]
                fused = fuse_sequence(sources, self.method, self.temperature, vocab_size, group_ends, ranks,
                                      first.keeps_tail)
                items.append(SparseSequence(head.sequence, head.input_ids, fused.rows,
                                            {"source": fused.source, "chunk_end": fused.chunks.end,
                                             "chunk_ce_codes": quantize_ce(fused.chunks.ce),
                                             "rank_codes": encode_ranks(fused.ranks, n)}))
                positions += n
        return sparse_table(items, vocab_size, FUSED_EXTRAS), positions


def fuse_store(stores: Sequence[SparseStore], out: Path | str, method: FuseMethod, temperature: float,
               processes: int = 1) -> dict:
    """Write the fused store `out` from the sources' aligned stores (in `sources` order, shards in `processes`
    processes); returns its manifest."""
    check_compatible(stores)
    out, first, vocab_size = Path(out), stores[0], stores[0].vocab_size
    if first.keeps_tail and temperature != 1.0:
        raise FusionError(f"{first.directory} keeps each row's tail (align.tail): fuse.temperature {temperature} "
                          "would need the tail's shape; use 1.0")
    parts = {"codec": SPARSE_CODEC, "extras": sorted(FUSED_EXTRAS), "sources": [s.manifest["key"] for s in stores],
             "method": method, "temperature": temperature}
    key = content_key(parts)
    plan = {split: len(first.shards(split)) for split in sorted(first.manifest["splits"])}
    build = ShardFuser(list(stores), method, temperature)
    manifest = {"key": key, "key_parts": parts, "codec": SPARSE_CODEC, "vocab_size": vocab_size,
                "extras": sorted(FUSED_EXTRAS), "method": method, "temperature": temperature, "tail": first.keeps_tail,
                "splits": fill_store(out, key, plan, build, processes)}
    write_manifest(out, manifest)
    return manifest


def fusion_stats(stores: Sequence[SparseStore], names: Sequence[str], corpus_dir: Path | str, split: str,
                 method: FuseMethod) -> dict:
    """Per domain (and `all`), for each source: the share of sequences it wins (smallest sequence CE), of positions
    it wins (smallest per-token CE), and its mean weight under `method`; from the stored CE columns only."""
    domains = pl.read_parquet(split_path(corpus_dir, split), columns=["domain"])["domain"].to_list()
    totals: dict[str, np.ndarray] = {}  # domain -> [3, S]: sequence wins, token wins, weight sums; plus counts
    counts: dict[str, np.ndarray] = {}  # domain -> [sequences, positions]
    readers = [s.record_batches(split, batch_sequences=1024, columns=["sequence", "ce_codes"]) for s in stores]
    for batches in zip(*readers, strict=True):
        per_source = [list_rows(batch, ["ce_codes"]) for batch in batches]
        for row, sequence in enumerate(batches[0].column("sequence").to_pylist()):
            ce = np.stack([dequantize_ce(rows[row]["ce_codes"]) for rows in per_source])
            sequence_winner = ce.mean(axis=1).argmin()
            token_wins = np.bincount(ce.argmin(axis=0), minlength=len(stores))
            weights = source_weights(ce, method).sum(axis=1)
            for domain in (domains[sequence], "all"):
                tally = totals.setdefault(domain, np.zeros((3, len(stores))))
                tally[0, sequence_winner] += 1
                tally[1] += token_wins
                tally[2] += weights
                counts[domain] = counts.get(domain, np.zeros(2)) + (1, ce.shape[1])
    return {domain: {name: {"sequence_wins": tally[0, s] / counts[domain][0],
                            "token_wins": tally[1, s] / counts[domain][1],
                            "mean_weight": tally[2, s] / counts[domain][1]} for s, name in enumerate(names)}
            for domain, tally in sorted(totals.items())}
