"""Benchmark of a continued-training step, fused vs CLM, on the offline default (run `make repro` first); prints JSON.

Both variants train a fresh copy of the target base for --steps steps on the same batches (the first --steps of the
plan train@* uses), with the stage's params; best of --repeats, alternating the variants so that machine noise
hits both. Reported: seconds per step of each, their ratio (target: fused / clm <= 1.2), each variant's peak RSS,
measured in a fresh process per variant (Linux: VmHWM from /proc/self/status), and train@fused's trained tokens per
second packed (the stage's blocks) against unpacked (one document per row, batches padded to their longest, as
training ran before packing) on the same documents.

Streaming: train@fused's peak RSS over --rss-steps steps on the fused store at 1x and at --scale x the corpus (the
store's train shards listed --scale times over: the same files, a corpus that many times longer), streamed in
windows of --window-shards shards (so the run crosses windows), against the whole store packed in memory, as
training read it before streaming; each in a fresh process. The same runs time the read up to the first step: a
streamed window costs the same at any corpus size, the whole store in memory --scale times as much (linear
packing: a packing step that scans its window per block makes that ratio grow with the square of --scale).

    python bench/train_step.py [--steps 20] [--repeats 3] [--scale 4 --window-shards 2 --rss-steps 90]
"""
from __future__ import annotations

import argparse
import contextlib
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fusesoup.logits.store import MANIFEST  # noqa: E402
from fusesoup.models import context_length, load_model  # noqa: E402
from fusesoup.params import load_params  # noqa: E402
from fusesoup.storage import read_json  # noqa: E402
from fusesoup.train.data import read_documents, train_stream, training_store  # noqa: E402
from fusesoup.train.loop import ExtraTerms, train_target  # noqa: E402
from fusesoup.train.packing import pack_documents, packing_order  # noqa: E402
from fusesoup.train.recipe import special_ids  # noqa: E402
from fusesoup.train.stream import PlannedBatches  # noqa: E402


def scaled_store(store: Path, scale: int, directory: Path) -> Path:
    """A view of `store` whose train split lists its shards `scale` times over (links to the same files)."""
    directory.mkdir(parents=True)
    for entry in store.iterdir():
        (directory / entry.name).symlink_to(entry.resolve())
    manifest = read_json(store / MANIFEST)
    manifest["splits"]["train"]["shards"] = manifest["splits"]["train"]["shards"] * scale
    (directory / MANIFEST).unlink()
    (directory / MANIFEST).write_text(json.dumps(manifest))
    return directory


def batches_of(variant: str, params, model, fused: Path, logits: Path, layout: str):
    """The steps `layout` gives: `streamed` (the stage's), `in-memory` (the whole store packed up front, as before
    streaming) or `unpacked` (each document a block of its own, padded to the longest of its batch)."""
    spec = params.train
    if layout == "streamed":
        return train_stream(variant, params, model, fused, logits)[0]
    documents = read_documents(training_store(variant, fused, logits), spec=spec)
    context, bos = context_length(model.config), special_ids(model.config).bos
    if layout == "in-memory":
        order = packing_order([len(d.input_ids) for d in documents], np.random.default_rng(params.seed))
        blocks = pack_documents(documents, spec.block_size, bos, context, order)
    else:
        blocks = [block for document in documents for block in pack_documents([document], context, bos, context, [0])]
    return PlannedBatches(blocks, spec.batch_tokens, spec.steps, params.seed)


def seconds_per_step(variant: str, params, args, scratch: Path, layout: str = "streamed", fused: str | None = None
                     ) -> tuple[float, float, float]:
    """(seconds per step, trained tokens per second, seconds to read the data) of `variant` over --steps steps; the
    data's reading up to the first step's blocks (a streamed window) is not part of a step."""
    model, _ = load_model(params.target, params, args.models)
    model.float()
    spec = params.train.model_copy(update={"steps": args.steps, "checkpoint_every": args.steps + 1})
    params = params.model_copy(update={"train": spec})
    reading = time.perf_counter()
    batches = batches_of(variant, params, model, Path(fused or args.fused), Path(args.logits) / params.target, layout)
    batches[0]
    lam = params.train.lam if variant == "fused" else 1.0
    started = time.perf_counter()  # loading data and model is not part of a step
    with contextlib.redirect_stdout(sys.stderr):  # the run's memory plan: stdout is the JSON alone
        log = train_target(model, batches, spec, lam, spec.fusion_loss, params.seed, scratch / f"{variant}-{layout}",
                           "bench", progress=False, extra=ExtraTerms.of(spec) if variant == "fused" else ExtraTerms())
    seconds = time.perf_counter() - started
    return seconds / args.steps, log[-1]["tokens"] / seconds, started - reading


def child_run(variant: str, args, *extra: str) -> tuple[float, float]:
    """(peak RSS in MB, seconds to read the data up to the first step) of `variant` run in a fresh process."""
    done = subprocess.run([sys.executable, __file__, "--rss-child", variant, "--steps", str(args.steps),
                           "--params", args.params, "--models", args.models, "--fused", args.fused,
                           "--logits", args.logits, *extra], capture_output=True, text=True, check=True)
    rss, read = done.stdout.strip().splitlines()[-1].split()
    return float(rss), float(read)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--models", default="data/models")
    parser.add_argument("--fused", default="data/fused")
    parser.add_argument("--logits", default="data/logits")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--scale", type=int, default=4, help="streaming: the larger corpus, x the store")
    parser.add_argument("--window-shards", type=int, default=2, help="streaming: train.window_shards of its runs")
    parser.add_argument("--rss-steps", type=int, default=90, help="streaming: steps of each run (0: skip)")
    parser.add_argument("--rss-child", choices=["clm", "fused"], help=argparse.SUPPRESS)
    parser.add_argument("--layout", default="streamed", help=argparse.SUPPRESS)
    parser.add_argument("--child-scale", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args()
    params = load_params(args.params)
    if params.runtime.threads:
        torch.set_num_threads(params.runtime.threads)
    with tempfile.TemporaryDirectory() as scratch:
        if args.rss_child:
            fused = scaled_store(Path(args.fused), args.child_scale, Path(scratch) / "fused")
            params = params.model_copy(update={"train": params.train.model_copy(
                update={"window_shards": args.window_shards})})
            read = seconds_per_step(args.rss_child, params, args, Path(scratch), args.layout, str(fused))[2]
            status = Path("/proc/self/status").read_text()
            print(int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM:"))) / 1024, read)
            return
        times, throughput = {"clm": [], "fused": []}, {"packed": [], "unpacked": []}
        reading = {"clm": [], "fused": []}
        for _ in range(args.repeats):
            for variant in times:
                step_seconds, _, read_seconds = seconds_per_step(variant, params, args, Path(scratch))
                times[variant].append(step_seconds)
                reading[variant].append(read_seconds)
            for kind in throughput:
                layout = "streamed" if kind == "packed" else "unpacked"
                throughput[kind].append(seconds_per_step("fused", params, args, Path(scratch), layout)[1])
    best = {variant: min(values) for variant, values in times.items()}
    fastest = {kind: max(values) for kind, values in throughput.items()}
    rss_args = argparse.Namespace(**{**vars(args), "steps": args.rss_steps})
    window = ["--window-shards", str(args.window_shards)]
    runs = {f"{layout} {scale}x": child_run("fused", rss_args, "--layout", layout, "--child-scale", str(scale), *window)
            for layout in ("streamed", "in-memory") for scale in (1, args.scale)} if args.rss_steps else {}
    streaming = {name: rss for name, (rss, _) in runs.items()}
    reads = {name: read for name, (_, read) in runs.items()}
    print(json.dumps({
        "steps": args.steps, "batch_tokens": params.train.batch_tokens, "threads": torch.get_num_threads(),
        "clm_s_per_step": best["clm"], "fused_s_per_step": best["fused"],
        "time_ratio": best["fused"] / best["clm"],
        "data_read_s": {variant: round(min(values), 2) for variant, values in reading.items()},
        "peak_rss_mb": {variant: child_run(variant, args)[0] for variant in ("clm", "fused")},
        "fused_tokens_per_s": {kind: round(value) for kind, value in fastest.items()},
        "packed_over_unpacked": fastest["packed"] / fastest["unpacked"],
        "fused_peak_rss_mb_over_corpus": {
            "train_shards": len(read_json(Path(args.fused) / MANIFEST)["splits"]["train"]["shards"]),
            "window_shards": args.window_shards, "steps": args.rss_steps, **streaming,
            f"streamed {args.scale}x / 1x": streaming[f"streamed {args.scale}x"] / streaming["streamed 1x"],
            f"in-memory {args.scale}x / 1x": streaming[f"in-memory {args.scale}x"] / streaming["in-memory 1x"],
        } if streaming else "not measured (--rss-steps 0)",
        "fused_first_read_s_over_corpus": {
            **{name: round(seconds, 2) for name, seconds in reads.items()},
            f"streamed {args.scale}x / 1x": reads[f"streamed {args.scale}x"] / reads["streamed 1x"],
            f"in-memory {args.scale}x / 1x": reads[f"in-memory {args.scale}x"] / reads["in-memory 1x"],
        } if reads else "not measured (--rss-steps 0)",
    }, indent=2))


if __name__ == "__main__":
    main()
