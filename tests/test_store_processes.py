"""Align and fuse over a store's shards in parallel processes: the same bytes as one process writes, and an error in
a worker reaches the stage as its one line, with the shards finished so far kept for the next run."""
from __future__ import annotations

import pytest

from fusesoup.align.align_store import align_store, alignment
from fusesoup.bootstrap import build_model
from fusesoup.fusion_store import fuse_store
from fusesoup.logits.sparse_store import ALIGNED_EXTRAS, SparseStore
from fusesoup.logits.store import LogitStore, finished_shard
from fusesoup.params import Align
from fusesoup.storage import StorageError
from tests.helpers import ASCII_TEXTS, make_tokenizer, run_store, shard_bytes, tiny_spec, write_code_corpus


@pytest.fixture(scope="module")
def logits(tmp_path_factory):
    """A corpus and the logit store of a tiny Llama over it: 40 sequences in 5 shards of 8."""
    tokenizer = make_tokenizer(ASCII_TEXTS)
    model = build_model("llama", tiny_spec(context=256), tokenizer, seed=0).eval()
    root = tmp_path_factory.mktemp("processes")
    corpus = write_code_corpus(root / "corpus")
    run_store(model, tokenizer, corpus, root / "logits")
    return corpus, LogitStore(root / "logits"), tokenizer


def align_self(logits, out, processes: int) -> dict:
    corpus, store, tokenizer = logits
    setup = alignment(tokenizer, tokenizer, store.vocab_size, store.vocab_size, Align())
    return align_store(store, store, corpus, out, setup, processes)


def test_three_processes_align_and_fuse_the_same_bytes_as_one(logits, tmp_path):
    for processes in (1, 3):
        manifest = align_self(logits, tmp_path / f"aligned-{processes}", processes)
        assert len(manifest["splits"]["train"]["shards"]) == 5
        aligned = SparseStore(tmp_path / f"aligned-{processes}", ALIGNED_EXTRAS)
        fuse_store([aligned, aligned], tmp_path / f"fused-{processes}", "avg_ce", 1.0, processes)
    for name in ("aligned", "fused"):
        one, three = shard_bytes(tmp_path / f"{name}-1"), shard_bytes(tmp_path / f"{name}-3")
        assert "manifest.json" in one and one == three  # shards, sidecars and the manifest (workers is not in the key)


def test_a_worker_s_error_is_the_stage_s_one_line_and_the_finished_shards_stay(logits, tmp_path):
    corpus, store, tokenizer = logits
    broken = tmp_path / "logits"
    broken.mkdir()
    for name, data in shard_bytes(store.directory).items():
        (broken / name).parent.mkdir(parents=True, exist_ok=True)
        (broken / name).write_bytes(data[:-10] if name == "train/shard-00003.parquet" else data)
    teacher = LogitStore(broken)
    setup = alignment(tokenizer, tokenizer, store.vocab_size, store.vocab_size, Align())
    with pytest.raises(StorageError) as failure:
        align_store(teacher, store, corpus, tmp_path / "aligned", setup, processes=2)
    message = str(failure.value)
    assert "\n" not in message and message.endswith("shard-00003.parquet: checksum does not match the manifest "
                                                    "(corrupt or changed); re-run the stage that writes it to redo it")
    assert finished_shard(tmp_path / "aligned", "train", 3, teacher.manifest["key"]) is None
    assert not (tmp_path / "aligned/manifest.json").exists()
    kept = [i for i in range(5) if (tmp_path / f"aligned/train/shard-{i:05d}.json").exists()]
    assert 3 not in kept and kept  # the other worker's shards were written and are kept for the next run
