"""What every stage script shares: its command line, its params and runtime, and expected failures that end in one
clear line on stderr instead of a traceback.

Every path a stage reads or writes is a required argument that dvc.yaml passes, so dvc.yaml alone says where files
live (its deps and outs are the same paths).
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Callable

from fusesoup.errors import StageError
from fusesoup.params import Params, ParamsError
from fusesoup.storage import StorageError

EXPECTED_ERRORS = (ParamsError, StorageError, StageError)

PATHS = {  # every path option a stage may take, and what it is
    "corpus": "the corpus directory (data/corpus)",
    "models": "the model directories (data/models)",
    "logits": "the logit stores (data/logits)",
    "aligned": "the aligned stores (data/aligned)",
    "fused": "the fused store (data/fused)",
    "soups": "the soup directories (data/soups)",
    "checkpoints": "the checkpoints of a running train@ (kept when it is killed, removed once it is done)",
    "out": "the stage's output",
    "metrics": "the stage's metrics: a JSON file, or the directory its JSON files go to",
    "plots": "the stage's plot data: a CSV file, or the directory its CSV files go to",
    "throughput": "train@'s per-step tokens per second and MFU (CSV): a log, not a DVC output, as wall-clock "
                  "figures differ between identical runs",
    "report": "the report directory",
    "harness": "lm-evaluation-harness results (JSON; {} when harness_tasks is empty)",
}


def stage_parser(module: str, description: str | None, paths: Sequence[str]) -> argparse.ArgumentParser:
    """The command line of `python -m <module>`: --params and each of `paths` (keys of PATHS), all required; the
    stage adds its own positional argument and flags."""
    parser = argparse.ArgumentParser(prog=f"python -m {module}", description=description)
    parser.add_argument("--params", required=True, help="the params file (params.yaml)")
    for name in paths:
        parser.add_argument(f"--{name}", required=True, help=PATHS[name])
    return parser


def torch_runtime(params: Params, threads: int | None = None) -> None:
    """A torch stage's runtime: CPU threads (`threads`, a worker's share, else runtime.threads; 0 keeps torch's
    default) and the seed."""
    import torch  # only the stages that run a model pay for importing torch

    if threads or params.runtime.threads:
        torch.set_num_threads(threads or params.runtime.threads)
    torch.manual_seed(params.seed)


def run_stage(main: Callable[[], None]) -> None:
    """Run a stage's main(); on an expected error print `error: <message>` and exit with status 2."""
    try:
        main()
    except EXPECTED_ERRORS as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
