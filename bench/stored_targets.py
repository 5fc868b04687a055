"""What each stored-target scheme keeps of a teacher's distribution, per byte (issue: where the signal goes); JSON.

Per teacher and scheme (`topk:K`: the K most likely ids, renormalised when trained on; `sample:K[:T]`: K draws at
proposal temperature T, each weighted p / q, logits/sampling.py), on --sequences rows of the train split (a fixed
shuffle, both domains), extracted as the extract stage would into a scratch store:
- bytes_per_position: shard bytes / positions;
- mass: the teacher's probability on the row's distinct ids (what a top-k row renormalises away: 1 - mass);
- kl_to_teacher: mean over positions of KL(row || teacher), the row as the loss reads it (normalised over its ids)
  against the teacher's whole softmax: -log(mass) for a top-k row; for a row of draws, how far one row is from the
  teacher (noise, not bias: the mean of many rows is the teacher).

    python bench/stored_targets.py --teachers code-neox prose-gpt2 --schemes topk:10 topk:32 sample:12 sample:24
"""
from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import stages  # noqa: E402,F401  (before torch: the stages' oneDNN setting, see stages/__init__.py)
import numpy as np  # noqa: E402
import polars as pl  # noqa: E402
import torch  # noqa: E402

from bench.extract import run_extraction, small_corpus, teacher_parser, train_only  # noqa: E402
from fusesoup.evaluate import encode_texts  # noqa: E402
from fusesoup.logits.store import LogitStore  # noqa: E402
from fusesoup.models import load_model  # noqa: E402
from fusesoup.params import load_params  # noqa: E402


@torch.inference_mode()
def teacher_logprobs(model, tokenizer, text: str) -> np.ndarray:
    """[n, V] float64 log-probs of the text's n tokens, after BOS, as extraction scores them."""
    [ids] = encode_texts(tokenizer, [text])
    logits = model(input_ids=torch.tensor([ids])).logits[0, :-1].double()
    return torch.log_softmax(logits, dim=-1).numpy()


def row_fidelity(ids: np.ndarray, weights: np.ndarray, dense: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per position: the teacher's mass on the row's distinct ids, and KL(row || teacher) with the row's weights
    (duplicates added, normalised); ids and weights [n, k], dense [n, V] log-probs."""
    n, vocab = dense.shape
    row = np.zeros((n, vocab))
    np.add.at(row, (np.repeat(np.arange(n), ids.shape[1]), ids.ravel()), weights.ravel())
    row /= row.sum(axis=1, keepdims=True)
    held = row > 0
    mass = np.where(held, np.exp(dense), 0.0).sum(axis=1)
    kl = np.where(held, row * (np.log(np.where(held, row, 1.0)) - dense), 0.0).sum(axis=1)
    return mass, kl


def bench_scheme(model, tokenizer, corpus: Path, spec, scheme: str, scratch: Path) -> dict:
    kind, k, *temperature = scheme.split(":")
    spec = spec.model_copy(update={"k": int(k), "targets": "sample" if kind == "sample" else "topk",
                                   "sample_temperature": float(temperature[0]) if temperature else 1.0})
    _, manifest = run_extraction(model, tokenizer, corpus, scratch, spec)
    texts = pl.read_parquet(corpus / "train.parquet")["text"].to_list()
    stored = [item.logits for batch in LogitStore(scratch).iter_batches("train") for item in batch]
    fidelity = [row_fidelity(s.topk_ids, np.exp(s.topk_logprobs.astype(np.float64)),
                             teacher_logprobs(model, tokenizer, text)) for s, text in zip(stored, texts)]
    mass, kl = (np.concatenate(values) for values in zip(*fidelity))
    split = manifest["splits"]["train"]
    return {"bytes_per_position": split["bytes"] / split["positions"], "mass": float(mass.mean()),
            "kl_to_teacher": float(kl.mean())}


def main() -> None:
    parser = teacher_parser(__doc__, 256)
    parser.add_argument("--schemes", nargs="+", default=["topk:10", "topk:32", "topk:64", "sample:12", "sample:24"])
    args = parser.parse_args()
    params = load_params(args.params)
    results = {}
    with tempfile.TemporaryDirectory() as scratch:
        for name in args.teachers or params.sources:
            model, tokenizer = load_model(name, params, args.models)
            model.float().eval()
            corpus = small_corpus(Path(args.corpus), args.sequences, Path(scratch) / f"{name}-corpus")
            results[name] = {scheme: bench_scheme(model, tokenizer, corpus, train_only(params), scheme,
                                                  Path(scratch) / name / scheme.replace(":", "-"))
                             for scheme in args.schemes}
    print(json.dumps({"sequences": args.sequences, "teachers": results}, indent=2))


if __name__ == "__main__":
    main()
