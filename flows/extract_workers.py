"""One teacher's logit store filled by N extraction workers on other machines, dispatched through a work pool:
`python -m flows.extract_workers --teacher T --workers N --pool P [--repo DIR]`.

`extract-worker` runs one worker of `extract@T`: the stage's command as dvc.yaml gives it (read from there, not
written twice) plus `--num-workers N --worker-index I`, which makes it fill the shards with index % N == I of the
one store (fusesoup/logits/extract.py). `extract-across` starts N runs of that flow's deployment, so each is
picked up by whichever machine's `prefect worker` polls the pool (`--limit 1`: one run per machine or GPU), waits
for all, and then runs `dvc repro -s extract@T` itself, which finds every shard done and writes the manifest.

The project directory must be on a filesystem that every worker mounts at the same path: the workers write their
shards into it, and the parent passes its own path to them.
"""
from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from pathlib import Path
from uuid import UUID

from prefect import flow, get_client, get_run_logger
from prefect.client.schemas.objects import FlowRun
from prefect.deployments import run_deployment
from prefect.settings import PREFECT_API_URL
from prefect.states import Cancelling

from flows.deploy import CODE_ROOT, deploy_flow
from flows.stage_task import StageRunError, run_command, run_stage, workspace_lock
from fusesoup.params import load_params

WORKER_FLOW = "extract-worker"
WORKER_DEPLOYMENT = "fusesoup-extract-worker"
WORKER_ENTRYPOINT = "flows/extract_workers.py:extract_worker"
WORKER_RUN_NAME = "extract@{teacher} worker {worker_index} of {num_workers}"
POLL_SECONDS = 2.0  # between two reads of the workers' runs


def stage_command(repo_dir: str | os.PathLike, teacher: str) -> list[str]:
    """The command of stage `extract@TEACHER` as the project's dvc.yaml (its foreach over `sources`) gives it.

    ValueError, in one line, where the project is not there (the shared filesystem is not mounted at that path on
    this machine) or the teacher is not one of its sources."""
    from dvc.repo import Repo
    from dvc.stage.exceptions import StageNotFound

    if not (Path(repo_dir) / "dvc.yaml").is_file():
        raise ValueError(f"{repo_dir}: no dvc.yaml on this machine; extraction workers need the project on a "
                         "filesystem that every machine mounts at the same path")
    with Repo(os.fspath(repo_dir)) as repo:
        try:
            [stage] = repo.stage.collect(f"extract@{teacher}")
        except StageNotFound:
            raise ValueError(f"extract@{teacher}: no such stage in {repo_dir}/dvc.yaml; is {teacher!r} one of "
                             "params.yaml's sources?") from None
        return shlex.split(stage.cmd)


@flow(name=WORKER_FLOW, flow_run_name=WORKER_RUN_NAME)
def extract_worker(teacher: str, num_workers: int, worker_index: int, repo_dir: str, timeout_s: float) -> list[str]:
    """Fill worker `worker_index`'s share of `num_workers` of teacher's store in `repo_dir`: the stage's command in
    its own process group (stage_task.run_command: its output in the run log, killed on timeout, cancel or
    interrupt); its output lines."""
    what = WORKER_RUN_NAME.format(teacher=teacher, worker_index=worker_index, num_workers=num_workers)
    command = [*stage_command(repo_dir, teacher), "--num-workers", str(num_workers), "--worker-index",
               str(worker_index), "--no-progress"]
    return run_command(what, command, shlex.join(command), repo_dir, timeout_s)


def _wait(runs: list[FlowRun]) -> list[FlowRun]:
    """The runs, read again until each is in a final state (Completed, Failed, Crashed, Cancelled)."""
    with get_client(sync_client=True) as client:
        while True:
            runs = [run if run.state and run.state.is_final() else client.read_flow_run(run.id) for run in runs]
            if all(run.state and run.state.is_final() for run in runs):
                return runs
            time.sleep(POLL_SECONDS)


def _cancel(run_ids: list[UUID]) -> None:
    """Ask each run to cancel, as `prefect flow-run cancel` does (a run already final refuses; that is fine): its
    worker kills it, and extract_worker's process group with it."""
    with get_client(sync_client=True) as client:
        for run_id in run_ids:
            client.set_flow_run_state(run_id, Cancelling(message="extract-across was stopped"))


def _last_line(message: str | None) -> str:
    """A failed run's message in one line: its last non-blank line (a stage's `error:` or exception line)."""
    return next((line.strip() for line in reversed((message or "").splitlines()) if line.strip()), "no message")


@flow(name="extract-across", flow_run_name="extract@{teacher} across {workers} workers")
def extract_across(teacher: str, workers: int, repo_dir: str = ".",
                   deployment: str = f"{WORKER_FLOW}/{WORKER_DEPLOYMENT}") -> list[str]:
    """Fill teacher's store with `workers` runs of `deployment` (extract_worker, worker indexes 0..N-1), then
    complete it with `dvc repro -s extract@TEACHER` (run_stage); returns that stage's output lines.

    The last step is DVC's, not a last `--num-workers 1` run of the stage's command: the command alone would write
    the manifest too, but only `dvc repro` records the store's hash in dvc.lock, so `dvc status` stays clean and
    the next `dvc repro` skips the stage (its output is `persist`, so DVC keeps the shards and the command finds them
    all done). The flow holds the workspace lock throughout, so that no pipeline run in this workspace races the
    workers; if it is cancelled or interrupted, the workers' runs not finished are cancelled too. A worker that
    fails fails this flow with one line naming its index, and the store is left as the workers left it (a rerun
    redoes only the missing shards)."""
    if workers < 1:
        raise ValueError(f"extract@{teacher}: --workers must be at least 1, not {workers}")
    repo_dir = str(Path(repo_dir).resolve())
    stage_command(repo_dir, teacher)  # an unknown teacher stops here, before any run is started
    timeout_s = load_params(Path(repo_dir) / "params.yaml").flow.stage_timeout_seconds
    logger = get_run_logger()
    with workspace_lock(repo_dir):
        runs: list[FlowRun] = []
        try:
            for index in range(workers):
                parameters = {"teacher": teacher, "num_workers": workers, "worker_index": index,
                              "repo_dir": repo_dir, "timeout_s": timeout_s}
                runs.append(run_deployment(deployment, parameters=parameters, timeout=0,
                                           flow_run_name=WORKER_RUN_NAME.format(**parameters)))
            logger.info("started %d runs of %s; waiting for workers of its pool to run them", workers, deployment)
            runs = _wait(runs)
        except BaseException:
            _cancel([run.id for run in runs if not (run.state and run.state.is_final())])
            raise
        failed = [f"worker {index} of {workers} {run.state.name}: {_last_line(run.state.message)}"
                  for index, run in enumerate(runs) if not run.state.is_completed()]
        if failed:
            raise StageRunError(f"extract@{teacher}: " + "; ".join(failed))
        return run_stage(f"extract@{teacher}", repo_dir, timeout_s)


def main(argv: list[str] | None = None) -> int:
    """Deploy extract-worker to the pool (created as a process pool if missing), run extract-across once;
    non-zero, with its one-line error, if it fails."""
    parser = argparse.ArgumentParser(prog="python -m flows.extract_workers", description=__doc__.split("\n\n")[0])
    parser.add_argument("--teacher", required=True, help="the source whose store to fill (extract@TEACHER)")
    parser.add_argument("--workers", type=int, required=True, help="how many workers share its shards")
    parser.add_argument("--pool", required=True, help="the work pool the workers' machines poll")
    parser.add_argument("--repo", default=".", help="the DVC project's root, at the same path on every machine")
    parser.add_argument("--source", default=str(CODE_ROOT), help="where workers read the flow's code from")
    args = parser.parse_args(argv)
    if not PREFECT_API_URL.value():
        print("error: PREFECT_API_URL is not set: workers on other machines need a Prefect server they can reach "
              "(see README, Prefect)", file=sys.stderr)
        return 2
    deploy_flow(WORKER_ENTRYPOINT, WORKER_DEPLOYMENT, args.pool, args.source, tags=["fusesoup", "extract"])
    state = extract_across(teacher=args.teacher, workers=args.workers, repo_dir=args.repo, return_state=True)
    if state.is_completed():
        return 0
    print(f"error: {state.result(raise_on_failure=False)}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
