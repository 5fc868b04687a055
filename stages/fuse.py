"""DVC stage fuse: every source's aligned distributions -> one fused training target per target position.

Reads data/aligned/<source> for each of params.yaml's sources (the target's own included); writes data/fused (a
sparse store, DVC `persist`), metrics/fusion.json (who wins where, per domain) and metrics/alignment.json (each
source's alignment statistics, gathered from the aligned stores' manifests into one table).
"""
from __future__ import annotations

from pathlib import Path

from fusesoup.cli import run_stage, stage_parser
from fusesoup.fusion_store import fuse_store, fusion_stats
from fusesoup.logits.sparse_store import ALIGNED_EXTRAS, SparseStore
from fusesoup.logits.store import available_cores
from fusesoup.params import load_params
from fusesoup.storage import StorageError, write_json


def main(argv: list[str] | None = None) -> None:
    args = stage_parser("stages.fuse", __doc__, ["corpus", "aligned", "out", "metrics"]).parse_args(argv)
    params = load_params(args.params)
    stores = [SparseStore(Path(args.aligned) / name, ALIGNED_EXTRAS) for name in params.sources]
    manifest = fuse_store(stores, args.out, params.fuse.method, params.fuse.temperature,
                          processes=params.fuse.workers or available_cores())

    splits = sorted(manifest["splits"])
    fusion = {"method": params.fuse.method, "temperature": params.fuse.temperature, "sources": params.sources,
              "splits": {split: fusion_stats(stores, params.sources, args.corpus, split, params.fuse.method)
                         for split in splits}}
    alignment = {}
    for name, store in zip(params.sources, stores):
        if "stats" not in store.manifest:
            raise StorageError(f"{store.directory / 'manifest.json'}: no 'stats'; re-run the align@{name} stage")
        alignment[name] = store.manifest["stats"]
    write_json(Path(args.metrics) / "fusion.json", fusion)
    write_json(Path(args.metrics) / "alignment.json", alignment)
    wins = fusion["splits"][splits[0]]
    print(f"{args.out}: complete ({params.fuse.method}); sequences won on {splits[0]}: "
          + ", ".join(f"{domain} " + "/".join(f"{name} {v['sequence_wins']:.0%}" for name, v in by.items())
                      for domain, by in wins.items()))


if __name__ == "__main__":
    run_stage(main)
