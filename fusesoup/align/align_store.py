"""align@<teacher>: a teacher's logit store moved onto the target's tokens and vocabulary, shard by shard.

Both logit stores were cut into shards of the same corpus rows, so aligned shard i is made from teacher shard i,
target shard i and those rows' texts (the tokens' bytes must spell the text exactly, or the row is named in the
error). The output is a sparse store (sparse_store.py, ALIGNED_EXTRAS) with the same shards, keyed by the two
logit stores' keys and the alignment settings; finished shards are kept, so a killed run resumes.
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import NamedTuple

import numpy as np
import polars as pl
import pyarrow as pa

from transformers import PreTrainedTokenizerBase

from fusesoup.align.spans import Leads, Segmenter
from fusesoup.align.token_alignment import byte_ends, dtw_align, offset_align
from fusesoup.align.vocab_map import padded_map
from fusesoup.align.transfer import (EXACT, FALLBACK, MAPPED, SPAN, AlignedSequence, SpanInputs, agreement,
                                     groups_from_path, transfer_groups)
from fusesoup.corpus import read_texts, split_path
from fusesoup.errors import StageError
from fusesoup.logits.codec import SequenceLogits, quantize_ce
from fusesoup.logits.sparse import SPARSE_CODEC, encode_ranks
from fusesoup.logits.sparse_store import ALIGNED_EXTRAS, SparseSequence, SparseStore, sparse_table
from fusesoup.logits.store import LogitStore, fill_store, write_manifest
from fusesoup.params import Align
from fusesoup.storage import content_key
from fusesoup.token_bytes import prepended_space, shadowed_fallbacks, text_token_bytes, token_bytes

# part of the key: a change of the transfer rules re-aligns
TRANSFER_RULES = "one-to-one-merge-spans-first-row-groups-ranks-v5"


class AlignmentError(StageError):
    """A teacher's store cannot be aligned to the target's; the message names the store, split and row."""


class Alignment(NamedTuple):
    """What stays fixed while one teacher is aligned to the target (`alignment` builds it)."""

    teacher_bytes: list[bytes]  # token_bytes of the teacher's tokenizer
    target_bytes: list[bytes]
    mappable: list[bytes]  # target_bytes without the ids a target tokenization never emits (shadowed fallbacks)
    vocab_map: np.ndarray  # [teacher model vocab] target id or -1 (padded_map)
    settings: Align
    target_vocab_size: int
    segmenter: Segmenter  # over the mappable target tokens
    first_maps: dict[Leads, np.ndarray]  # vocab maps for a text's first row, by its leads (filled on first use)

    def first_map(self, leads: Leads) -> np.ndarray | None:
        """The vocabulary map for row 0 of a text with these `leads`: None where both sides agree (vocab_map)."""
        if leads.teacher == leads.target:
            return None
        if leads not in self.first_maps:
            self.first_maps[leads] = padded_map(leads.first_row_bytes(self.teacher_bytes), self.mappable,
                                                len(self.vocab_map), self.settings.vocab)
        return self.first_maps[leads]


def alignment(teacher: PreTrainedTokenizerBase, target: PreTrainedTokenizerBase, teacher_vocab_size: int,
              target_vocab_size: int, settings: Align) -> Alignment:
    """The setup for aligning `teacher`'s stores onto `target`'s (model vocabulary sizes as the stores say)."""
    teacher_bytes, target_bytes = token_bytes(teacher), token_bytes(target)
    # the target never emits a byte-fallback id whose byte is also a regular piece: no teacher id may map there
    mappable = list(target_bytes)
    for index in shadowed_fallbacks(target, target_bytes):
        mappable[index] = b""
    vocab_map = padded_map(teacher_bytes, mappable, teacher_vocab_size, settings.vocab)
    return Alignment(teacher_bytes, target_bytes, mappable, vocab_map, settings, target_vocab_size,
                     Segmenter(mappable), {})


def align_sequence(teacher: SequenceLogits, target: SequenceLogits, text: str, setup: Alignment) -> AlignedSequence:
    """One text's teacher distributions on the target's positions (transfer.py's rules)."""
    teacher_ids, target_ids = teacher.input_ids.tolist(), target.input_ids.tolist()
    teacher_pieces = text_token_bytes(setup.teacher_bytes, teacher_ids, text)
    target_pieces = text_token_bytes(setup.target_bytes, target_ids, text)
    leads = Leads(prepended_space(setup.teacher_bytes, teacher_ids, text),
                  prepended_space(setup.target_bytes, target_ids, text))
    if setup.settings.method == "offsets":
        groups = offset_align(byte_ends(teacher_pieces), byte_ends(target_pieces))
    else:
        groups = groups_from_path(dtw_align(teacher_pieces, target_pieces))
    first_map = setup.first_map(leads)
    agree = agreement(teacher.input_ids, teacher_pieces, target_pieces, target.input_ids, setup.vocab_map, groups,
                      first_map)
    spans = (SpanInputs(teacher_pieces, setup.teacher_bytes, setup.segmenter, leads)
             if setup.settings.spans == "expand" else None)
    return transfer_groups(groups, teacher, target.input_ids, setup.vocab_map, agree, setup.target_vocab_size, spans,
                           first_map, setup.settings.tail)


class ShardAligner(NamedTuple):
    """fill_store's build_shard for one teacher: aligned shard i from teacher shard i, target shard i and those rows'
    texts. A picklable object, so that shards can be aligned in parallel processes."""

    teacher: LogitStore
    target: LogitStore
    corpus_dir: Path
    setup: Alignment

    def __call__(self, split: str, index: int) -> tuple[pa.Table, int]:
        items, positions, corpus = [], 0, split_path(self.corpus_dir, split)
        for teacher_batch, target_batch in zip(self.teacher.iter_batches(split, shard=index),
                                               self.target.iter_batches(split, shard=index), strict=True):
            first = target_batch[0].sequence
            texts = read_texts(corpus, first, first + len(target_batch))
            for mine, theirs, text in zip(teacher_batch, target_batch, texts, strict=True):
                if mine.sequence != theirs.sequence:
                    raise AlignmentError(f"{self.teacher.directory}: {split} shard {index} holds row {mine.sequence} "
                                         f"where {self.target.directory} holds row {theirs.sequence}")
                try:
                    aligned = align_sequence(mine.logits, theirs.logits, text, self.setup)
                except ValueError as error:
                    raise AlignmentError(f"{corpus} row {theirs.sequence}: {error}") from None
                items.append(SparseSequence(theirs.sequence, theirs.logits.input_ids, aligned.rows,
                                            {"ce_codes": quantize_ce(aligned.ce), "status": aligned.status,
                                             "group_end": aligned.group_end,
                                             "rank_codes": encode_ranks(aligned.ranks, len(aligned.status))}))
                positions += len(aligned.status)
        return sparse_table(items, self.setup.target_vocab_size, ALIGNED_EXTRAS), positions


def align_store(teacher: LogitStore, target: LogitStore, corpus_dir: Path | str, out: Path | str,
                setup: Alignment, processes: int = 1) -> dict:
    """Write the aligned store `out` (every split the target store has, shards in `processes` processes); returns
    its manifest. Its key covers both stores, the settings and the vocabulary map itself, so a change in how the map
    is built re-aligns."""
    out = Path(out)
    parts = {"codec": SPARSE_CODEC, "rules": TRANSFER_RULES, "teacher": teacher.manifest["key"],
             "target": target.manifest["key"], **setup.settings.model_dump(exclude={"workers"}),
             "vocab_map": hashlib.sha256(np.ascontiguousarray(setup.vocab_map, np.int64).tobytes()).hexdigest()}
    key = content_key(parts)
    splits = sorted(target.manifest["splits"])
    for split in splits:
        if [s.rows for s in teacher.shards(split)] != [s.rows for s in target.shards(split)]:
            raise AlignmentError(f"{teacher.directory} and {target.directory}: the {split} shards hold different "
                                 "corpus rows; extract both with the same extract params and corpus")
    plan = {split: len(target.shards(split)) for split in splits}
    build = ShardAligner(teacher, target, Path(corpus_dir), setup)
    manifest = {"key": key, "key_parts": parts, "codec": SPARSE_CODEC, "vocab_size": setup.target_vocab_size,
                "extras": sorted(ALIGNED_EXTRAS), "tail": setup.settings.tail,
                "splits": fill_store(out, key, plan, build, processes)}
    write_manifest(out, manifest)
    return manifest


def vocab_stats(teacher_bytes: list[bytes], target_bytes: list[bytes], vocab_map: np.ndarray) -> dict:
    """Shares of the teacher's (non-special) tokens with an exact byte match, mapped to another token, unmapped."""
    target = set(target_bytes)
    real = [i for i, token in enumerate(teacher_bytes) if token]
    exact = sum(teacher_bytes[i] in target for i in real)
    mapped = sum(int(vocab_map[i] >= 0) for i in real) - exact
    return {"tokens": len(real), "exact": exact / len(real), "nearest": mapped / len(real),
            "unmapped": (len(real) - exact - mapped) / len(real)}


def position_stats(store: SparseStore, corpus_dir: Path | str, split: str) -> dict:
    """Per domain (and `all`): positions and the shares transferred EXACT, MAPPED, expanded from a SPAN, and
    fallen back to a one-hot."""
    names, domain_of_row = np.unique(pl.read_parquet(split_path(corpus_dir, split), columns=["domain"])["domain"]
                                     .to_numpy().astype(str), return_inverse=True)
    counts = np.zeros((len(names), 4), np.int64)
    for batch in store.record_batches(split, batch_sequences=1024, columns=["sequence", "status"]):
        status = batch.column("status")
        domains = np.repeat(domain_of_row[batch.column("sequence").to_numpy()], np.diff(status.offsets.to_numpy()))
        np.add.at(counts, (domains, status.values.to_numpy().astype(np.int64)), 1)
    by_domain = {**dict(zip(names.tolist(), counts)), "all": counts.sum(axis=0)}
    return {domain: {"positions": int(c.sum()), "exact": c[EXACT] / c.sum(), "mapped": c[MAPPED] / c.sum(),
                     "span": c[SPAN] / c.sum(), "fallback": c[FALLBACK] / c.sum()}
            for domain, c in sorted(by_domain.items()) if c.sum()}
