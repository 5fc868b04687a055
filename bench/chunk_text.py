"""Time of `chunk_text` on one-line documents, against the quadratic algorithm it replaced; prints JSON.

Times are CPU seconds of this process (time.process_time), so that they hold on a machine other jobs share.

- sizes: one line of N MB (ASCII with a few 2- and 4-byte characters, no newline) at max_chunk_bytes 1024; the old
  algorithm (tests/test_corpus_prepare.py:reference_chunk_text) and chunk_text each time it, and the chunks must be
  identical. old_growth / new_growth: time at each size over time at the first (linear: 2x, 4x; quadratic: 4x, 16x).
- prepare_corpus: the stage's whole path on one `--big-mb` document with no newline (a .txt files source), new only
  (the old one took 10 min 51 s on a 50 MB document).

    python bench/chunk_text.py [--sizes-mb 1 2 4] [--big-mb 50]
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fusesoup.corpus.prepare import chunk_text, prepare_corpus  # noqa: E402
from fusesoup.params import Corpus, FilesSource  # noqa: E402
from tests.helpers import reference_chunk_text  # noqa: E402

MAX_BYTES = 1024


def one_line(megabytes: float) -> str:
    """About `megabytes` MB of UTF-8 with no newline: ASCII runs broken by é (2 bytes) and 😀 (4 bytes)."""
    unit = "the quick brown fox jumps over the lazy dog " * 20 + "é😀"
    return unit * int(megabytes * 2**20 / len(unit.encode("utf-8")))


def timed(function, *args):
    start = time.process_time()
    result = function(*args)
    return time.process_time() - start, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes-mb", type=float, nargs="+", default=[1, 2, 4])
    parser.add_argument("--big-mb", type=float, default=50)
    args = parser.parse_args()
    rows = []
    for megabytes in args.sizes_mb:
        text = one_line(megabytes)
        old_s, old = timed(reference_chunk_text, text, MAX_BYTES)
        new_s, new = timed(chunk_text, text, MAX_BYTES)
        rows.append({"mb": megabytes, "chunks": len(new), "identical": old == new, "old_s": round(old_s, 3),
                     "new_s": round(new_s, 3), "speedup": round(old_s / new_s, 1)})
    for row in rows:
        row["old_growth"] = round(row["old_s"] / rows[0]["old_s"], 2)
        row["new_growth"] = round(row["new_s"] / rows[0]["new_s"], 2)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "big.txt"
        path.write_text(one_line(args.big_mb), encoding="utf-8")
        corpus = Corpus(sources=[FilesSource(kind="files", paths=[str(path)], domain="web")], max_chunk_bytes=MAX_BYTES)
        big_s, manifest = timed(prepare_corpus, corpus, Path(tmp) / "corpus")
    print(json.dumps({"max_chunk_bytes": MAX_BYTES, "one_line": rows, "prepare_corpus": {
        "mb": args.big_mb, "bytes": manifest["totals"]["bytes"], "chunks": manifest["totals"]["chunks"],
        "seconds": round(big_s, 1)}}, indent=1))


if __name__ == "__main__":
    main()
