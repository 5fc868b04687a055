"""Stores on a disk that fills up: refused after the first shard when the rest cannot fit, one line when the disk
fills mid-run, and the next run resuming with the shard that failed. On a real (tmpfs) filesystem of 1 MiB."""
from __future__ import annotations

import os
import subprocess

import pyarrow as pa
import pytest

from fusesoup.logits.store import fill_store, finished_shard
from fusesoup.storage import StorageError


@pytest.fixture
def small_disk(tmp_path):
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], capture_output=True,
                          text=True)
    if done.returncode != 0:
        pytest.skip(f"a real full disk needs a tmpfs mount here: {done.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def random_shards(sizes: list[int], built: list[int]):
    """build_shard for fill_store: shard i holds sizes[i] incompressible bytes; records which shards it built."""
    def build(split: str, index: int):
        built.append(index)
        return pa.table({"blob": [os.urandom(sizes[index])]}), 1
    return build


def test_a_disk_too_small_for_the_rest_is_refused_after_the_first_shard(small_disk):
    store, built = small_disk / "store", []
    with pytest.raises(StorageError, match=r"store: the 9 shards left need about 1\.[0-9] MiB at the first one's "
                                           r"size, but the disk has 0\.[0-9] MiB free"):
        fill_store(store, "k", {"train": 10}, random_shards([200_000] * 10, built))
    assert built == [0] and finished_shard(store, "train", 0, "k") is not None  # the first one is kept


def test_a_disk_full_mid_run_is_one_line_and_the_next_run_resumes_with_that_shard(small_disk, capsys):
    store, built = small_disk / "store", []
    filler = small_disk / "filler"
    filler.write_bytes(os.urandom(600_000))
    sizes = [20_000, 20_000, 300_000, 300_000]  # at the first one's size the rest fits: the plan lets it start
    with pytest.raises(StorageError) as failure:
        fill_store(store, "k", {"train": 4}, random_shards(sizes, built))
    message = str(failure.value)
    assert "\n" not in message and "no space left on the device writing train/shard-00003.parquet" in message
    assert "the finished shards are kept: free space and run the stage again" in message
    assert "3 more shards to write, about 0.1 MiB" in capsys.readouterr().out  # the plan, before the work
    assert not [p for p in (store / "train").iterdir() if p.name.startswith(".")]  # no partial temp file left
    filler.unlink()
    built.clear()
    splits = fill_store(store, "k", {"train": 4}, random_shards(sizes, built))
    assert built == [3] and len(splits["train"]["shards"]) == 4
