"""Benchmark of align@ and fuse over a store's shards in parallel processes, on a project `make repro` has built;
prints JSON.

For each worker count, the align stage of one source and the fuse stage run as they do in the DAG (`python -m
stages.align` / `stages.fuse` with params.yaml's align.workers / fuse.workers set), into temporary outputs, each
in a fresh process. Reported: wall seconds, speedup over the first worker count, the peak RSS of the largest single
process of the run (the stage or one of its workers: what one worker needs must not grow with the worker count),
and whether the stores are byte-identical to the first count's.

    python bench/shard_processes.py [--repo .] [--source code-neox] [--workers 1 2]
"""
from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fusesoup.logits.store import available_cores  # noqa: E402

# The stage in a child whose own children's peak RSS it reports: ru_maxrss of RUSAGE_CHILDREN is the largest one.
MEASURED = """
import resource, subprocess, sys
done = subprocess.run(sys.argv[1:])
print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024 if done.returncode == 0 else -1)
"""


def run_measured(command: list[str], cwd: Path) -> tuple[float, int]:
    """(wall seconds, peak RSS in bytes of the largest process) of one stage run."""
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", MEASURED, *command], cwd=cwd, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    peak = int(done.stdout.strip().splitlines()[-1]) if done.stdout.strip() else -1
    if done.returncode != 0 or peak < 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stderr[-2000:]}")
    return seconds, peak


def digest(directory: Path) -> str:
    """One hash over every file's relative path and bytes."""
    hashed = hashlib.sha256()
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        hashed.update(str(path.relative_to(directory)).encode() + b"\0" + path.read_bytes())
    return hashed.hexdigest()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repo", type=Path, default=ROOT, help="a project after make repro (default: this one)")
    parser.add_argument("--source", default="code-neox", help="the source whose align@ stage runs")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args()
    repo = args.repo.resolve()
    raw = yaml.safe_load((repo / "params.yaml").read_text())
    rows, first = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for workers in args.workers:
            raw["align"]["workers"] = raw["fuse"]["workers"] = workers
            params = Path(tmp) / f"params-{workers}.yaml"
            params.write_text(yaml.safe_dump(raw))
            aligned, fused = Path(tmp) / f"aligned-{workers}", Path(tmp) / f"fused-{workers}"
            align = [sys.executable, "-m", "stages.align", args.source, "--params", str(params), "--corpus",
                     "data/corpus", "--models", "data/models", "--logits", "data/logits",
                     "--out", str(aligned / args.source), "--metrics", str(Path(tmp) / "align.json")]
            aligned.mkdir()
            for name in raw["sources"]:  # fuse reads every source: the others from the project's own stores
                if name != args.source:
                    (aligned / name).symlink_to(repo / "data/aligned" / name)
            fuse = [sys.executable, "-m", "stages.fuse", "--params", str(params), "--corpus", "data/corpus",
                    "--aligned", str(aligned),
                    "--out", str(fused), "--metrics", str(Path(tmp) / f"metrics-{workers}")]
            for stage, command, out in (("align", align, aligned / args.source), ("fuse", fuse, fused)):
                seconds, peak = run_measured(command, repo)
                first.setdefault(stage, (seconds, digest(out)))
                rows.append({"stage": stage, "workers": workers, "seconds": round(seconds, 2),
                             "speedup": round(first[stage][0] / seconds, 2), "peak_rss_mb": round(peak / 2**20, 1),
                             "identical": digest(out) == first[stage][1]})
    shards = json.loads((repo / "data/fused/manifest.json").read_text())["splits"]
    print(json.dumps({"source": args.source, "cores": available_cores(),
                      "shards": {split: len(s["shards"]) for split, s in shards.items()}, "runs": rows}, indent=1))


if __name__ == "__main__":
    main()
