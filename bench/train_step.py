"""Benchmark of a continued-training step, fused vs CLM, on the offline default (run `make repro` first); prints JSON.

Both variants train a fresh copy of the target base for --steps steps on the same batches (the first --steps of the
plan train@* uses), with the stage's params; best of --repeats, alternating the variants so that machine noise
hits both. Reported: seconds per step of each, their ratio (target: fused / clm <= 1.2), each variant's peak RSS,
measured in a fresh process per variant (Linux: VmHWM from /proc/self/status), and train@fused's trained tokens per
second packed (the stage's blocks) against unpacked (one document per row, batches padded to their longest, as
training ran before packing) on the same documents.

    python bench/train_step.py [--steps 20] [--repeats 3]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fusesoup.models import context_length, load_model  # noqa: E402
from fusesoup.params import load_params  # noqa: E402
from fusesoup.train.loop import train_target  # noqa: E402
from fusesoup.train.packing import pack_documents  # noqa: E402
from fusesoup.train.recipe import special_ids  # noqa: E402
from fusesoup.train.data import load_blocks, load_documents  # noqa: E402


def seconds_per_step(variant: str, params, args, scratch: Path, packed: bool = True) -> tuple[float, float]:
    """(seconds per step, trained tokens per second) of `variant` over --steps steps."""
    model, _ = load_model(params.target, params, args.models)
    model.float()
    if packed:
        blocks, _ = load_blocks(variant, params, model, Path(args.fused), Path(args.logits) / params.target)
    else:  # each document a block of its own: rows padded to the longest of their batch
        documents, _ = load_documents(variant, Path(args.fused), Path(args.logits) / params.target)
        context, bos = context_length(model.config), special_ids(model.config).bos
        blocks = [block for document in documents for block in pack_documents([document], context, bos, context, 0)]
    spec = params.train.model_copy(update={"steps": args.steps, "checkpoint_every": args.steps + 1})
    lam = params.train.lam if variant == "fused" else 1.0
    started = time.perf_counter()  # loading data and model is not part of a step
    log = train_target(model, blocks, spec, lam, spec.fusion_loss, params.seed, scratch / f"{variant}-{packed}",
                       "bench", progress=False)
    seconds = time.perf_counter() - started
    return seconds / args.steps, log[-1]["tokens"] / seconds


def peak_rss_mb(variant: str, args) -> float:
    done = subprocess.run([sys.executable, __file__, "--rss-child", variant, "--steps", str(args.steps),
                           "--params", args.params, "--models", args.models, "--fused", args.fused,
                           "--logits", args.logits], capture_output=True, text=True, check=True)
    return float(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--models", default="data/models")
    parser.add_argument("--fused", default="data/fused")
    parser.add_argument("--logits", default="data/logits")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rss-child", choices=["clm", "fused"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    params = load_params(args.params)
    if params.runtime.threads:
        torch.set_num_threads(params.runtime.threads)
    with tempfile.TemporaryDirectory() as scratch:
        if args.rss_child:
            seconds_per_step(args.rss_child, params, args, Path(scratch))
            status = Path("/proc/self/status").read_text()
            print(int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM:"))) / 1024)
            return
        times, throughput = {"clm": [], "fused": []}, {"packed": [], "unpacked": []}
        for _ in range(args.repeats):
            for variant in times:
                times[variant].append(seconds_per_step(variant, params, args, Path(scratch))[0])
            for kind in throughput:
                throughput[kind].append(seconds_per_step("fused", params, args, Path(scratch), kind == "packed")[1])
    best = {variant: min(values) for variant, values in times.items()}
    fastest = {kind: max(values) for kind, values in throughput.items()}
    print(json.dumps({
        "steps": args.steps, "batch_tokens": params.train.batch_tokens, "threads": torch.get_num_threads(),
        "clm_s_per_step": best["clm"], "fused_s_per_step": best["fused"],
        "time_ratio": best["fused"] / best["clm"],
        "peak_rss_mb": {variant: peak_rss_mb(variant, args) for variant in ("clm", "fused")},
        "fused_tokens_per_s": {kind: round(value) for kind, value in fastest.items()},
        "packed_over_unpacked": fastest["packed"] / fastest["unpacked"],
    }, indent=2))


if __name__ == "__main__":
    main()
