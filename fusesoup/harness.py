"""lm-evaluation-harness on a local save_pretrained directory: the optional benchmark backend of the evaluate stage.

`run_harness` scores a model with lm-eval's `hf` backend on tasks found among lm-eval's built-in task YAMLs and an
optional directory of the user's own. It runs offline (the Hub and `datasets` in offline mode for the call), with
remote code off and fixed seeds, so the same model, tasks and data give the same numbers. lm_eval is imported
here only, on first use: it takes seconds to import and index its tasks.
"""
from __future__ import annotations

import difflib
import math
import os
from contextlib import ExitStack, contextmanager
from functools import lru_cache
from pathlib import Path
from typing import Iterator
from unittest.mock import patch

from fusesoup.errors import StageError

SEED = 1234  # python, numpy, torch and few-shot sampling seeds (lm-eval's own defaults, fixed here explicitly)
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
DEFAULT_FILTER = ",none"  # lm-eval keys results "<metric>,<filter>"; tasks without filters use "none"


class HarnessError(StageError):
    """A harness run cannot start (an unknown task, a missing directory); the message names the task or path."""


def run_harness(model_dir: Path, tasks: list[str], include_path: Path | None, limit: int | None,
                batch_size: int, device: str) -> dict[str, dict[str, float]]:
    """task (or group) -> {metric: value} of the model saved in `model_dir` on lm-eval `tasks`, each task with its
    own few-shot setting (zero unless its YAML sets `num_fewshot`).

    Tasks are looked up by name among lm-eval's built-in tasks and the YAMLs under `include_path`. `limit` caps
    the examples per task. Weights load in float32 on CPU and in the checkpoint's dtype elsewhere. Only finite
    numbers are kept: `acc`, `acc_stderr` (lm-eval's `<metric>_stderr` names), `sample_len` (examples scored);
    a metric behind a filter other than the default keeps lm-eval's `<metric>,<filter>` key.
    """
    model_dir = Path(model_dir).resolve()  # absolute: never mistaken for a Hub id such as "models/x"
    if not model_dir.is_dir():
        raise HarnessError(f"harness: model directory {model_dir} does not exist")
    if include_path is not None and not Path(include_path).is_dir():
        raise HarnessError(f"harness: task directory {include_path} (evaluate.harness_include) does not exist")
    if not tasks:
        raise HarnessError("harness: no tasks given (evaluate.harness_tasks is empty)")
    manager = _task_manager(None if include_path is None else str(Path(include_path).resolve()))
    for task in tasks:
        if task not in manager.all_tasks:
            where = "lm-eval's built-in tasks" + (f" and the YAMLs under {include_path}" if include_path else "")
            close = difflib.get_close_matches(task, manager.all_tasks, n=3)
            raise HarnessError(f"harness: unknown task {task!r}: not among {where}"
                               + (f" (did you mean {', '.join(close)}?)" if close else ""))

    from lm_eval import simple_evaluate

    model_args = {"pretrained": str(model_dir), "trust_remote_code": False,
                  "dtype": "float32" if device.startswith("cpu") else "auto"}
    with _offline():
        results = simple_evaluate(model="hf", model_args=model_args, tasks=list(tasks), batch_size=batch_size,
                                  device=device, limit=limit, task_manager=manager, log_samples=False,
                                  random_seed=SEED, numpy_random_seed=SEED, torch_random_seed=SEED,
                                  fewshot_random_seed=SEED)
    return {task: _numeric(metrics) for task, metrics in results["results"].items()}


@lru_cache(maxsize=4)
def _task_manager(include_path: str | None):
    """lm-eval's task index (built-ins plus `include_path`), built once per process: indexing takes seconds."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=include_path)


def _numeric(metrics: dict) -> dict[str, float]:
    """lm-eval's per-task entry without its alias, "N/A" stderrs and non-finite values; ",none" dropped from keys."""
    return {key.removesuffix(DEFAULT_FILTER): float(value) for key, value in metrics.items()
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)}


@contextmanager
def _offline() -> Iterator[None]:
    """Hub and `datasets` offline for the duration: both read HF_HUB_OFFLINE once at import, so besides the
    environment (for anything imported later) their module flags are switched too, and everything is restored."""
    import datasets.config
    import huggingface_hub.constants

    with ExitStack() as stack:
        stack.enter_context(patch.dict(os.environ, OFFLINE_ENV))
        stack.enter_context(patch.object(huggingface_hub.constants, "HF_HUB_OFFLINE", True))
        stack.enter_context(patch.object(datasets.config, "HF_HUB_OFFLINE", True))
        yield
