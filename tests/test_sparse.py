"""Sparse rows on the target vocabulary: merging, temperature, fallbacks and the stored (quantised) form."""
from __future__ import annotations

import numpy as np
import pytest

from fusesoup.logits.codec import LOGPROB_STEP
from fusesoup.logits.sparse import (SparseRows, decode_rows, encode_rows, fill_empty_rows, merge_entries,
                                    one_hot_rows, with_temperature)


def dense(rows: SparseRows, vocab_size: int) -> np.ndarray:
    out = np.zeros((len(rows.offsets) - 1, vocab_size))
    np.add.at(out, (rows.rows_of_entries(), rows.ids), np.exp(rows.logprobs.astype(np.float64)))
    return out


def test_merge_adds_duplicates_sorts_truncates_and_leaves_missing_rows_empty():
    rows = merge_entries(np.array([0, 0, 0, 2, 2, 2]), np.array([5, 3, 5, 1, 2, 4]),
                         np.array([0.1, 0.3, 0.1, 0.2, 0.5, 0.3]), n_rows=3, vocab_size=6, max_entries=2)
    assert rows.offsets.tolist() == [0, 2, 2, 4]
    assert rows.ids.tolist() == [3, 5, 2, 4]  # row 0: 3 (0.3) before 5 (0.1 + 0.1); row 2 keeps its top 2
    np.testing.assert_allclose(np.exp(rows.logprobs), [0.6, 0.4, 0.625, 0.375], rtol=1e-6)
    tie = merge_entries(np.array([0, 0]), np.array([4, 1]), np.array([0.5, 0.5]), 1, 6)
    assert tie.ids.tolist() == [4, 1]  # equal mass: the order the entries came in


def test_fill_empty_rows_and_take():
    rows = merge_entries(np.array([1, 1]), np.array([2, 3]), np.array([0.75, 0.25]), n_rows=3, vocab_size=4)
    filled = fill_empty_rows(rows, np.array([0, 9, 1]))
    assert filled.offsets.tolist() == [0, 1, 3, 4] and filled.ids.tolist() == [0, 2, 3, 1]
    np.testing.assert_allclose(np.exp(filled.logprobs), [1, 0.75, 0.25, 1], rtol=1e-6)
    picked = filled.take(np.array([2, 1, 1]))
    assert picked.offsets.tolist() == [0, 1, 3, 5] and picked.ids.tolist() == [1, 2, 3, 2, 3]


def test_temperature_is_softmax_of_scaled_logprobs_per_row():
    rows = merge_entries(np.array([0, 0, 1]), np.array([0, 1, 2]), np.array([0.8, 0.2, 1.0]), 2, 3)
    hot = with_temperature(rows, 2.0)
    expected = np.sqrt([0.8, 0.2]) / np.sqrt([0.8, 0.2]).sum()
    np.testing.assert_allclose(np.exp(hot.logprobs), [*expected, 1.0], rtol=1e-6)
    assert with_temperature(rows, 1.0) is rows


def test_stored_rows_round_trip_within_half_a_step_and_stay_normalised():
    rng = np.random.default_rng(0)
    n, vocab = 200, 3000
    counts = rng.integers(1, 31, n)
    rows_of = np.repeat(np.arange(n), counts)
    rows = merge_entries(rows_of, rng.integers(0, vocab, len(rows_of)), rng.dirichlet(np.ones(3), len(rows_of))[:, 0],
                         n, vocab)
    columns = encode_rows(rows, vocab)
    assert columns["ids"].dtype == np.uint16 and columns["codes"].dtype == np.uint8
    back = decode_rows(columns["counts"], columns["ids"], columns["codes"])
    assert back.offsets.tolist() == rows.offsets.tolist() and back.ids.tolist() == rows.ids.tolist()
    visible = rows.logprobs > -15  # entries above the clip of code 255
    shift = back.logprobs - rows.logprobs  # renormalisation adds one constant per row
    per_row = shift - np.repeat(shift[back.offsets[:-1]], back.counts)
    assert np.abs(per_row[visible]).max() <= LOGPROB_STEP + 1e-6
    np.testing.assert_allclose(dense(back, vocab).sum(axis=1), 1.0, rtol=1e-5)
    assert decode_rows(*encode_rows(one_hot_rows(np.array([7, 7])), vocab).values()).logprobs.tolist() == [0, 0]


def test_encoding_refuses_empty_rows_and_foreign_ids():
    empty = merge_entries(np.array([1]), np.array([0]), np.array([1.0]), n_rows=2, vocab_size=4)
    with pytest.raises(ValueError, match="1..255 entries"):
        encode_rows(empty, 4)
    with pytest.raises(ValueError, match="outside the vocabulary 0..3"):
        encode_rows(one_hot_rows(np.array([4])), 4)


def _sequences(first: int, count: int) -> list:
    from fusesoup.logits.sparse_store import SparseSequence
    out = []
    for sequence in range(first, first + count):
        ids = np.arange(sequence % 5 + 1) + sequence
        rows = merge_entries(np.repeat(np.arange(len(ids)), 2), np.stack([ids, ids + 1], 1).ravel(),
                             np.tile([0.7, 0.3], len(ids)), len(ids), 100)
        out.append(SparseSequence(sequence, ids, rows, {"source": np.zeros(len(ids), np.uint8),
                                                        "chunk_end": np.ones(len(ids), np.uint8),
                                                        "chunk_ce_codes": np.arange(len(ids), dtype=np.uint16),
                                                        "rank_codes": np.full(2 * len(ids), 255, np.uint8)}))
    return out


def test_sparse_store_resumes_after_a_crash_and_reads_back(tmp_path):
    from fusesoup.logits.sparse_store import FUSED_EXTRAS, SparseStore, sparse_table
    from fusesoup.logits.store import fill_store, write_manifest
    from fusesoup.storage import StorageError

    built = []

    def build(split, index, crash_at=None):
        if index == crash_at:
            raise KeyboardInterrupt("killed")
        built.append(index)
        items = _sequences(index * 3, 3)
        return sparse_table(items, 100, FUSED_EXTRAS), sum(len(i.input_ids) for i in items)

    def write(store, **crash):
        splits = fill_store(store, "key-1", {"train": 4}, lambda s, i: build(s, i, **crash))
        write_manifest(store, {"key": "key-1", "codec": "sparse-uint8-delta-v1", "vocab_size": 100, "splits": splits})

    with pytest.raises(KeyboardInterrupt):
        write(tmp_path / "resumed", crash_at=2)
    assert not (tmp_path / "resumed/manifest.json").exists() and built == [0, 1]
    built.clear()
    write(tmp_path / "resumed")
    assert built == [2, 3]  # finished shards are kept
    write(tmp_path / "straight")
    for index in range(4):
        name = f"train/shard-{index:05d}.parquet"
        assert (tmp_path / "resumed" / name).read_bytes() == (tmp_path / "straight" / name).read_bytes()

    store = SparseStore(tmp_path / "resumed", FUSED_EXTRAS)
    read = [item for batch in store.iter_batches("train", batch_sequences=2) for item in batch]
    assert [item.sequence for item in read] == list(range(12))
    assert read[4].input_ids.tolist() == [4, 5, 6, 7, 8] and read[4].rows.ids[:2].tolist() == [4, 5]
    np.testing.assert_allclose(np.exp(read[4].rows.logprobs[:2]), [0.7, 0.3], atol=0.05)

    shard = tmp_path / "resumed/train/shard-00001.parquet"
    shard.write_bytes(shard.read_bytes()[:-10])
    with pytest.raises(StorageError, match="shard-00001.parquet: checksum does not match"):
        list(store.iter_batches("train"))
    built.clear()
    write(tmp_path / "resumed")
    assert built == [1]  # the corrupt shard is redone, nothing else


def test_rows_that_keep_their_tail_round_trip_without_renormalising():
    """align.tail: rows summing to less than 1 decode to the same sums (within the codec's step); a row whose
    rounding took it above 1 is scaled back to 1; merge_entries keeps absolute probabilities the same way."""
    rows = merge_entries(np.array([0, 0, 1, 1, 2]), np.array([4, 5, 6, 7, 8]), np.array([0.5, 0.2, 0.9, 0.3, 0.4]),
                         3, 10, keep_tail=True)
    np.testing.assert_allclose(dense(rows, 10).sum(axis=1), [0.7, 1.0, 0.4], rtol=1e-6)
    np.testing.assert_allclose(dense(rows, 10)[1, [6, 7]], [0.75, 0.25], rtol=1e-6)  # 1.2 scaled back to 1
    columns = encode_rows(rows, 10)
    back = decode_rows(columns["counts"], columns["ids"], columns["codes"], keep_tail=True)
    np.testing.assert_allclose(dense(back, 10).sum(axis=1), [0.7, 1.0, 0.4], rtol=LOGPROB_STEP)
    np.testing.assert_allclose(dense(decode_rows(*columns.values()), 10).sum(axis=1), 1.0, rtol=1e-5)
