"""Benchmark of teacher logit extraction on the offline default (run `make repro` first); prints JSON.

Per teacher, on --sequences rows of the train split (a fixed shuffle: both domains):
- bytes_per_position: shard bytes on disk / token positions (target: < 20 at k = 10);
- mean_kl: mean over positions of KL(exact top-k || stored top-k), both renormalised (target: < 1e-3 nats);
- ids_identical: the stored top-k ids equal the exact ones;
- forward_tok_s, extract_tok_s, time_ratio: the bare forward pass over the same batches vs the whole extraction
  (read corpus, tokenize, forward, top-k, encode, write shards), best of --repeats each (target: ratio <= 1.15);
- peak_rss_mb at --sequences, 4x --sequences and the whole train split, each in a fresh process (memory must not
  grow with the corpus; the first few shards warm the allocators up; Linux only: read from /proc/self/status).

    python bench/extract.py [--teachers code-neox] [--sequences 512]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import stages  # noqa: E402,F401  (before torch: the stages' oneDNN setting, see stages/__init__.py)
import numpy as np  # noqa: E402
import polars as pl  # noqa: E402
import torch  # noqa: E402

from fusesoup.corpus import read_split  # noqa: E402
from fusesoup.evaluate import bos_token_id, pad_batch, plan_batches  # noqa: E402
from fusesoup.logits.codec import renormalized_kl  # noqa: E402
from fusesoup.logits.extract import extract_sequences, extract_store, key_parts  # noqa: E402
from fusesoup.logits.store import LogitStore  # noqa: E402
from fusesoup.models import load_model  # noqa: E402
from fusesoup.params import load_params  # noqa: E402
from fusesoup.storage import write_parquet  # noqa: E402


def train_only(params):
    return params.extract.model_copy(update={"splits": ["train"]})


def small_corpus(corpus: Path, rows: int, directory: Path) -> Path:
    """A corpus directory whose train split is `rows` rows of the real one: the first of one fixed shuffle, so
    every size has the same mix of domains (the split itself is ordered code first, then prose)."""
    write_parquet(read_split(corpus, "train").sample(fraction=1.0, shuffle=True, seed=0).head(rows),
                  directory / "train.parquet")
    return directory


@torch.inference_mode()
def forward_seconds(model, tokenizer, texts: list[str], batch_tokens: int) -> float:
    """Tokenize + the model's forward pass over the same length-sorted batches extraction uses, nothing else."""
    started = time.perf_counter()
    bos = bos_token_id(tokenizer)
    sequences = [[bos] + ids for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]
    for batch in plan_batches([len(s) for s in sequences], batch_tokens):
        input_ids, mask = pad_batch([sequences[i] for i in batch], pad=bos)
        model(input_ids=input_ids, attention_mask=mask).logits
    return time.perf_counter() - started


def run_extraction(model, tokenizer, corpus: Path, store: Path, spec) -> tuple[float, dict]:
    parts = key_parts({"bench": "model"}, corpus, spec, torch.float32)
    started = time.perf_counter()
    manifest = extract_store(lambda: (model, tokenizer), model.config.vocab_size, corpus, store, spec, parts,
                             progress=False)
    return time.perf_counter() - started, manifest


def bench_teacher(name: str, params, args, scratch: Path) -> dict:
    model, tokenizer = load_model(name, params, args.models)
    spec = train_only(params)
    corpus = small_corpus(Path(args.corpus), args.sequences, scratch / f"{name}-corpus")
    texts = pl.read_parquet(corpus / "train.parquet")["text"].to_list()
    forward_seconds(model, tokenizer, texts[:16], spec.batch_tokens)  # warm-up
    forward, extract, manifest = [], [], None
    for repeat in range(args.repeats):
        forward.append(forward_seconds(model, tokenizer, texts, spec.batch_tokens))
        seconds, manifest = run_extraction(model, tokenizer, corpus, scratch / f"{name}-store-{repeat}", spec)
        extract.append(seconds)
    split = manifest["splits"]["train"]
    exact = extract_sequences(model, tokenizer, texts, spec.k, spec.batch_tokens)
    stored = [item.logits for batch in LogitStore(scratch / f"{name}-store-0").iter_batches("train") for item in batch]
    kl = np.concatenate([renormalized_kl(e.topk_logprobs, s.topk_logprobs) for e, s in zip(exact, stored)])
    positions = split["positions"]
    return {
        "vocab_size": model.config.vocab_size, "sequences": split["sequences"], "positions": positions,
        "bytes_per_position": split["bytes"] / positions, "mean_kl": float(kl.mean()), "max_kl": float(kl.max()),
        "ids_identical": all(np.array_equal(e.topk_ids, s.topk_ids) and np.array_equal(e.input_ids, s.input_ids)
                             for e, s in zip(exact, stored)),
        "forward_tok_s": positions / min(forward), "extract_tok_s": positions / min(extract),
        "time_ratio": min(extract) / min(forward),
        "peak_rss_mb": {str(n): peak_rss_mb(name, small_corpus(Path(args.corpus), n, scratch / f"{name}-rss-{n}"), args)
                        for n in rss_sizes(args.sequences, len(read_split(Path(args.corpus), "train")))},
    }


def rss_sizes(sequences: int, train_rows: int) -> list[int]:
    return sorted({min(sequences, train_rows), min(4 * sequences, train_rows), train_rows})


def peak_rss_mb(name: str, corpus: Path, args) -> float:
    """Peak RSS of a fresh process that extracts `corpus` for `name` (and does nothing else)."""
    done = subprocess.run([sys.executable, __file__, "--rss-child", name, "--params", args.params,
                           "--models", args.models, "--corpus", str(corpus)], capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"the RSS child for {name} failed:\n{done.stderr}")
    return float(done.stdout.strip().splitlines()[-1])


def rss_child(name: str, params, args) -> None:
    model, tokenizer = load_model(name, params, args.models)
    with tempfile.TemporaryDirectory() as scratch:
        run_extraction(model, tokenizer, Path(args.corpus), Path(scratch) / "store", train_only(params))
    # VmHWM, not getrusage's ru_maxrss: Linux carries ru_maxrss across fork + exec, so a child would report
    # the parent's peak (the bench process holding every model) whenever that is larger.
    status = Path("/proc/self/status").read_text()
    print(int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM:"))) / 1024)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default=str(ROOT / "params.yaml"))
    parser.add_argument("--models", default=str(ROOT / "data/models"))
    parser.add_argument("--corpus", default=str(ROOT / "data/corpus"))
    parser.add_argument("--teachers", nargs="*", help="default: every source in params")
    parser.add_argument("--sequences", type=int, default=512, help="train rows to extract (default: 512)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each side; the best counts")
    parser.add_argument("--rss-child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    params = load_params(args.params)
    if params.runtime.threads:
        torch.set_num_threads(params.runtime.threads)
    if args.rss_child:
        rss_child(args.rss_child, params, args)
        return
    with tempfile.TemporaryDirectory() as scratch:
        results = {name: bench_teacher(name, params, args, Path(scratch)) for name in args.teachers or params.sources}
    print(json.dumps({"k": params.extract.k, "batch_tokens": params.extract.batch_tokens,
                      "torch_threads": torch.get_num_threads(), "teachers": results}, indent=2))


if __name__ == "__main__":
    main()
