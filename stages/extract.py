"""DVC stage extract@<teacher>: the teacher's top-k next-token log-probs over the corpus, as a logit store.

The store (data/logits/<teacher>, a DVC `persist` output) is keyed by a content hash of the model and
tokenizer files, the corpus splits and the extraction params: a re-run with the same key does nothing, a
killed run resumes at its first unfinished shard, and N workers may fill one store in parallel.
"""
from __future__ import annotations

import sys

from fusesoup.cli import run_stage, stage_parser, torch_runtime
from fusesoup.errors import StageError
from fusesoup.logits.extract import extract_store, key_parts, run_workers, worker_count
from fusesoup.models import load_config, load_model, model_path, resolve_device_dtype
from fusesoup.params import load_params
from fusesoup.storage import directory_fingerprint, write_json


def main(argv: list[str] | None = None) -> None:
    parser = stage_parser("stages.extract", __doc__, ["corpus", "models", "out", "metrics"])
    parser.add_argument("teacher", help="the model: one of params.yaml's sources")
    parser.add_argument("--num-workers", type=int, default=1, help="processes filling this store (default: 1)")
    parser.add_argument("--worker-index", type=int, default=0, help="this process's index, 0..N-1 (default: 0)")
    parser.add_argument("--threads", type=int, help="CPU threads of this process (default: runtime.threads)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    teacher, out = args.teacher, args.out
    params = load_params(args.params)
    if teacher not in params.sources:
        raise StageError(f"{args.params}: {teacher!r} is not in sources {params.sources}")
    torch_runtime(params, args.threads)
    device, dtype = resolve_device_dtype(params.runtime)
    config = load_config(teacher, params, args.models)
    parts = key_parts(directory_fingerprint(model_path(teacher, args.models)), args.corpus, params.extract, dtype)

    workers = worker_count(params.extract.workers, device)
    if workers > 1 and args.num_workers == 1:  # the stage runs its workers, then checks the store
        command = [sys.executable, "-m", "stages.extract", *(argv if argv is not None else sys.argv[1:])]
        run_workers(command, workers, params.runtime.threads)
    manifest = extract_store(lambda: load_model(teacher, params, args.models), config.vocab_size, args.corpus, out,
                             params.extract, parts, args.num_workers, args.worker_index,
                             progress=not args.no_progress)
    if manifest is None:
        print(f"{out}: worker {args.worker_index} of {args.num_workers} done; other workers' shards remain")
        return
    metrics = {split: {"sequences": s["sequences"], "positions": s["positions"], "bytes": s["bytes"],
                       "bytes_per_position": s["bytes"] / max(1, s["positions"])}
               for split, s in manifest["splits"].items()}
    write_json(args.metrics, {"k": manifest["k"], "splits": metrics})
    print(f"{out}: complete, key {manifest['key'][:12]}; "
          + ", ".join(f"{split} {m['positions']} positions, {m['bytes_per_position']:.2f} bytes/position"
                      for split, m in metrics.items()))


if __name__ == "__main__":
    run_stage(main)
