"""Benchmark of cross-tokenizer alignment on stdlib text (no pipeline outputs needed); prints JSON.

- dtw: `dtw_align` against the plain pure-Python reference of tests/test_align_tokens.py on pairs of up to 2048
  tokens: one stdlib text tokenized by two repo tokenizer families (the pipeline's code-neox and target-base kinds
  and sizes), cut where both tokenizations cut, so both sides spell the same bytes. The reference runs on the first
  pair only; speedup = its time / dtw's best time on that pair (target: >= 100 on one core), identical = same path.
- offsets: `offset_align` tokens per second (source + target tokens) over all pairs.
- vocab_map: seconds for the full `min_ed` map between a 32k SentencePiece BPE and a 50k byte-level BPE vocabulary,
  each way (target: < 60 s on 2 cores), trained on disjoint halves of the stdlib so that many tokens match nothing.
Everything runs in one thread (numpy's element-wise kernels are single-threaded).

    python bench/align.py [--pairs 4] [--corpus-mb 8]
"""
from __future__ import annotations

import argparse
import json
import sys
import sysconfig
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fusesoup.align.token_alignment import byte_ends, dtw_align, offset_align  # noqa: E402
from fusesoup.align.vocab_map import map_vocab  # noqa: E402
from fusesoup.batching import encode_text  # noqa: E402
from fusesoup.corpus.builtin import stdlib_files  # noqa: E402
from fusesoup.token_bytes import text_token_bytes, token_bytes  # noqa: E402
from fusesoup.tokenizer_families import train_tokenizer  # noqa: E402
from tests.helpers import reference_dtw  # noqa: E402

DTW_SOURCE, DTW_TARGET = ("byte_level_bpe", 8000), ("sentencepiece_bpe", 3072)  # params.yaml: code-neox, target-base
VOCAB_PAIR = (("sentencepiece_bpe", 32000), ("byte_level_bpe", 50000))
BLOCK = 2048


def stdlib_texts(half: int, max_bytes: float) -> list[str]:
    """Every other stdlib file (`half` 0 or 1, in the corpus's deterministic order) up to `max_bytes` of text."""
    root, texts, size = Path(sysconfig.get_paths()["stdlib"]), [], 0
    for rel in stdlib_files()[half::2]:
        try:
            texts.append((root / rel).read_bytes().decode("utf-8"))
        except (OSError, UnicodeDecodeError):
            continue
        size += len(texts[-1])
        if size > max_bytes:
            break
    return texts


def spelled(kind_size: tuple[str, int], train: list[str], text: str) -> list[bytes]:
    """`text` as the token bytes of a freshly trained `kind_size` tokenizer."""
    kind, vocab_size = kind_size
    tokenizer = train_tokenizer(kind, iter(train), vocab_size)
    return text_token_bytes(token_bytes(tokenizer), encode_text(tokenizer, [text])["input_ids"][0], text)


def block_pairs(source: list[bytes], target: list[bytes], count: int) -> list[tuple[list[bytes], list[bytes]]]:
    """Consecutive (source, target) blocks of the same bytes, each as long as both stay within BLOCK tokens."""
    pairs, start = [], (0, 0)
    groups = offset_align(byte_ends(source), byte_ends(target))
    for (left, right), following in zip(groups, groups[1:] + [None]):
        if following is None or max(following[0].stop - start[0], following[1].stop - start[1]) > BLOCK:
            pairs.append((source[start[0]: left.stop], target[start[1]: right.stop]))
            start = (left.stop, right.stop)
            if len(pairs) == count:
                break
    return pairs


def best_seconds(run, repeats: int) -> float:
    """Best of `repeats` timed calls, after one untimed call (numba's compiled kernels load on first use)."""
    run()
    timings = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        timings.append(time.perf_counter() - started)
    return min(timings)


def bench_dtw(pairs, repeats: int) -> dict:
    source, target = pairs[0]
    started = time.perf_counter()
    expected = reference_dtw(source, target)
    reference = time.perf_counter() - started
    fast = best_seconds(lambda: dtw_align(source, target), repeats)
    per_pair = [best_seconds(lambda pair=pair: dtw_align(*pair), repeats) for pair in pairs]
    return {
        "source": "/".join(map(str, DTW_SOURCE)), "target": "/".join(map(str, DTW_TARGET)),
        "first_pair_tokens": [len(source), len(target)], "reference_s": reference,
        "reference_us_per_cell": reference / (len(source) * len(target)) * 1e6, "dtw_ms": fast * 1e3,
        "speedup": reference / fast, "identical": dtw_align(source, target) == expected,
        "pairs": len(pairs), "dtw_ms_per_pair": [round(seconds * 1e3, 1) for seconds in per_pair],
    }


def bench_offsets(pairs, repeats: int) -> dict:
    ends = [(byte_ends(source), byte_ends(target)) for source, target in pairs]
    seconds = best_seconds(lambda: [offset_align(*pair) for pair in ends], repeats)
    tokens = sum(len(source) + len(target) for source, target in pairs)
    return {"tokens": tokens, "tokens_per_s": tokens / seconds}


def bench_vocab_map(corpus_bytes: float) -> dict:
    (source_kind, source_size), (target_kind, target_size) = VOCAB_PAIR
    first = token_bytes(train_tokenizer(source_kind, iter(stdlib_texts(0, corpus_bytes)), source_size))
    second = token_bytes(train_tokenizer(target_kind, iter(stdlib_texts(1, corpus_bytes)), target_size))
    results = {}
    for (source_name, source), (target_name, target) in [((source_kind, first), (target_kind, second)),
                                                           ((target_kind, second), (source_kind, first))]:
        started = time.perf_counter()
        mapping = map_vocab(source, target, "min_ed")
        seconds = time.perf_counter() - started
        unmatched = int((map_vocab(source, target, "exact")[[bool(token) for token in source]] < 0).sum())
        results[f"{source_name}/{len(source)} -> {target_name}/{len(target)}"] = {
            "seconds": seconds, "unmatched_source_tokens": unmatched, "mapped": int((mapping >= 0).sum())}
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=4, help="2048-token pairs to align (default: 4)")
    parser.add_argument("--corpus-mb", type=float, default=8.0, help="stdlib text per tokenizer training (MB)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each fast call; the best counts")
    args = parser.parse_args()
    train = stdlib_texts(0, args.corpus_mb * 1e6 / 4)
    text = "\n".join(stdlib_texts(1, args.pairs * BLOCK * 8))
    source, target = spelled(DTW_SOURCE, train, text), spelled(DTW_TARGET, train, text)
    pairs = block_pairs(source, target, args.pairs)
    print(json.dumps({"dtw": bench_dtw(pairs, args.repeats), "offsets": bench_offsets(pairs, args.repeats),
                      "vocab_map": bench_vocab_map(args.corpus_mb * 1e6)}, indent=2))


if __name__ == "__main__":
    main()
