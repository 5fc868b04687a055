"""DVC stage align@<teacher>: the teacher's stored top-k moved onto the target's tokens and vocabulary.

Reads data/logits/<teacher> and data/logits/<target> and both tokenizers; writes data/aligned/<teacher> (a
sparse store, DVC `persist`: a killed run resumes) and metrics/align/<teacher>.json: the share of the teacher's
vocabulary matched exactly or by minimum edit distance, and per domain the share of target positions that took
the teacher's distribution (EXACT bytes, MAPPED through the vocabulary map, or from a SPAN) or fell back to a one-hot.
"""
from __future__ import annotations

from pathlib import Path

from fusesoup.align.align_store import align_store, alignment, position_stats, vocab_stats
from fusesoup.cli import run_stage, stage_parser
from fusesoup.errors import StageError
from fusesoup.logits.sparse_store import ALIGNED_EXTRAS, SparseStore
from fusesoup.logits.store import LogitStore, available_cores, write_manifest
from fusesoup.models import load_tokenizer
from fusesoup.params import load_params
from fusesoup.storage import write_json


def main(argv: list[str] | None = None) -> None:
    parser = stage_parser("stages.align", __doc__, ["corpus", "models", "logits", "out", "metrics"])
    parser.add_argument("teacher", help="the model: one of params.yaml's sources")
    args = parser.parse_args(argv)
    params = load_params(args.params)
    teacher, target = args.teacher, params.target
    if teacher not in params.sources:
        raise StageError(f"{args.params}: {teacher!r} is not in sources {params.sources}")
    out = Path(args.out)
    teacher_store, target_store = LogitStore(Path(args.logits) / teacher), LogitStore(Path(args.logits) / target)

    setup = alignment(load_tokenizer(teacher, params, args.models), load_tokenizer(target, params, args.models),
                      teacher_store.vocab_size, target_store.vocab_size, params.align)
    manifest = align_store(teacher_store, target_store, args.corpus, out, setup,
                           processes=params.align.workers or available_cores())

    store = SparseStore(out, ALIGNED_EXTRAS)
    vocab = vocab_stats(setup.teacher_bytes, setup.target_bytes, setup.vocab_map)
    metrics = {**params.align.model_dump(exclude={"workers"}), "vocab_map": vocab,
               "positions": {split: position_stats(store, args.corpus, split) for split in manifest["splits"]}}
    write_manifest(out, {**manifest, "stats": metrics})  # the fuse stage gathers these into metrics/alignment.json
    write_json(args.metrics, metrics)
    shares = metrics["positions"][sorted(manifest["splits"])[0]]["all"]
    print(f"{out}: complete; {shares['exact']:.1%} exact, {shares['mapped']:.1%} mapped, {shares['span']:.1%} "
          f"from spans, {shares['fallback']:.1%} one-hot of {shares['positions']} positions")


if __name__ == "__main__":
    run_stage(main)
