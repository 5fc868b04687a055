"""Benchmark of teacher logit extraction on the offline default (run `make repro` first); prints JSON.

Per teacher, on --sequences rows of the train split (a fixed shuffle: both domains):
- bytes_per_position: shard bytes on disk / token positions (target: < 20 at k = 10);
- mean_kl: mean over positions of KL(exact top-k || stored top-k), both renormalised (target: < 1e-3 nats);
- ids_identical: the stored top-k ids equal the exact ones;
- forward_tok_s, extract_tok_s, time_ratio: the bare forward pass over the same batches vs the whole extraction
  (read corpus, tokenize, forward, top-k, encode, write shards), best of --repeats each (target: ratio <= 1.15);
- peak_rss_mb at --sequences, 4x --sequences and the whole train split, each in a fresh process (memory must not
  grow with the corpus; the first few shards warm the allocators up; Linux only: read from /proc/self/status).

With --vocab, generated Llama teachers of those vocabulary sizes instead (nothing to run first but `make test`'s
tokenizer fetch): Mistral-7B's tokenizer for 32000, GPT-2's with its head padded to the size (as Qwen2's 151936
is) above 50257, on chunks of the stdlib's source. The same figures, plus the bf16 run against the float32 one
(see generated_teachers.py): kl_full (mean over positions of KL(float32 || bf16) over the whole vocabulary, nats), for the
store's path and for bf16 logits (what a bf16 head would give), top1_agree, topk_overlap, and the bf16 time ratio.

    python bench/extract.py [--teachers code-neox] [--sequences 512]
    python bench/extract.py --params P --models DIR --corpus C --teachers NAME   # a model pinned by pin@ into
        DIR/NAME (a path, hub or GGUF model of P's `models`; C: a corpus directory whose train split it reads)
    python bench/extract.py --vocab 32000 151936 [--hidden 512 --layers 4 --sequences 48]
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
from fusesoup.batching import bos_token_id, pad_batch, plan_batches  # noqa: E402
from fusesoup.evaluate import encode_texts  # noqa: E402
from fusesoup.logits.codec import renormalized_kl  # noqa: E402
from fusesoup.logits.extract import extract_sequences, extract_store, key_parts  # noqa: E402
from fusesoup.logits.store import LogitStore  # noqa: E402
from fusesoup.models import load_model  # noqa: E402
from fusesoup.params import load_params  # noqa: E402
from fusesoup.storage import write_parquet  # noqa: E402
from bench.generated_teachers import bf16_fidelity, generated_teacher, stdlib_corpus  # noqa: E402


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
    sequences = encode_texts(tokenizer, texts)
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


def bench_model(model, tokenizer, corpus: Path, spec, repeats: int, scratch: Path) -> dict:
    """Timing (best of `repeats`), bytes per position and the store's fidelity for one model on corpus's train split."""
    texts = pl.read_parquet(corpus / "train.parquet")["text"].to_list()
    forward_seconds(model, tokenizer, texts[:16], spec.batch_tokens)  # warm-up
    forward, extract, manifest = [], [], None
    for repeat in range(repeats):
        forward.append(forward_seconds(model, tokenizer, texts, spec.batch_tokens))
        seconds, manifest = run_extraction(model, tokenizer, corpus, scratch / f"store-{repeat}", spec)
        extract.append(seconds)
    split = manifest["splits"]["train"]
    exact = extract_sequences(model, tokenizer, texts, spec.k, spec.batch_tokens)
    stored = [item.logits for batch in LogitStore(scratch / "store-0").iter_batches("train") for item in batch]
    kl = np.concatenate([renormalized_kl(e.topk_logprobs, s.topk_logprobs) for e, s in zip(exact, stored)])
    positions = split["positions"]
    return {
        "vocab_size": model.config.vocab_size, "sequences": split["sequences"], "positions": positions,
        "bytes_per_position": split["bytes"] / positions, "mean_kl": float(kl.mean()), "max_kl": float(kl.max()),
        "ids_identical": all(np.array_equal(e.topk_ids, s.topk_ids) and np.array_equal(e.input_ids, s.input_ids)
                             for e, s in zip(exact, stored)),
        "forward_tok_s": positions / min(forward), "extract_tok_s": positions / min(extract),
        "time_ratio": min(extract) / min(forward),
    }


def bench_teacher(name: str, params, args, scratch: Path) -> dict:
    model, tokenizer = load_model(name, params, args.models)
    corpus = small_corpus(Path(args.corpus), args.sequences, scratch / f"{name}-corpus")
    result = bench_model(model, tokenizer, corpus, train_only(params), args.repeats, scratch / name)
    sizes = rss_sizes(args.sequences, len(read_split(Path(args.corpus), "train")))
    rss = {str(n): peak_rss_mb(name, small_corpus(Path(args.corpus), n, scratch / f"{name}-rss-{n}"), args)
           for n in sizes}
    texts = pl.read_parquet(corpus / "train.parquet")["text"].to_list()[: args.fidelity_sequences]
    return {**result, "peak_rss_mb": rss, "bf16": bf16_fidelity(model, tokenizer, texts, params.extract.k)}


def bench_generated(vocab_size: int, params, args, scratch: Path) -> dict:
    """A generated teacher of `vocab_size` rows in float32, then its bf16 copy: timing, and bf16 vs float32."""
    scratch.mkdir(parents=True)
    model, tokenizer = generated_teacher(vocab_size, args.hidden, args.layers, scratch)
    corpus = stdlib_corpus(scratch / "corpus", args.sequences)
    spec = train_only(params)
    result = bench_model(model, tokenizer, corpus, spec, args.repeats, scratch / "float32")
    texts = pl.read_parquet(corpus / "train.parquet")["text"].to_list()[: args.fidelity_sequences]
    fidelity = bf16_fidelity(model, tokenizer, texts, spec.k)
    half = bench_model(model.to(torch.bfloat16), tokenizer, corpus, spec, args.repeats, scratch / "bfloat16")
    timing = ("forward_tok_s", "extract_tok_s", "time_ratio")
    return {"hidden": args.hidden, "layers": args.layers, **result,
            "bf16": {**fidelity, **{key: half[key] for key in timing}}}


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


def teacher_parser(description: str, sequences: int) -> argparse.ArgumentParser:
    """The arguments every teacher bench shares: the project's params, models and corpus, the teachers, the rows."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default=str(ROOT / "params.yaml"))
    parser.add_argument("--models", default=str(ROOT / "data/models"))
    parser.add_argument("--corpus", default=str(ROOT / "data/corpus"))
    parser.add_argument("--teachers", nargs="*", help="default: every source in params")
    parser.add_argument("--sequences", type=int, default=sequences, help=f"train rows to extract (default: {sequences})")
    return parser


def main() -> None:
    parser = teacher_parser(__doc__, 512)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each side; the best counts")
    parser.add_argument("--vocab", type=int, nargs="*", help="generated teachers of these vocabulary sizes instead")
    parser.add_argument("--hidden", type=int, default=512, help="--vocab: hidden size (default: 512)")
    parser.add_argument("--layers", type=int, default=4, help="--vocab: layers (default: 4)")
    parser.add_argument("--fidelity-sequences", type=int, default=8, help="rows of the bf16 comparison (default: 8)")
    parser.add_argument("--rss-child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    params = load_params(args.params)
    if params.runtime.threads:
        torch.set_num_threads(params.runtime.threads)
    if args.rss_child:
        rss_child(args.rss_child, params, args)
        return
    with tempfile.TemporaryDirectory() as scratch:
        if args.vocab:
            results = {f"generated-{size}": bench_generated(size, params, args, Path(scratch) / str(size))
                       for size in args.vocab}
        else:
            results = {name: bench_teacher(name, params, args, Path(scratch))
                       for name in args.teachers or params.sources}
    print(json.dumps({"k": params.extract.k, "batch_tokens": params.extract.batch_tokens,
                      "torch_threads": torch.get_num_threads(), "teachers": results}, indent=2))


if __name__ == "__main__":
    main()
