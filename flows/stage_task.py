"""One DVC stage as a Prefect task: `dvc repro -s STAGE` (or any command, run_command) in a process group of its
own, its output in the run log at the right level, killed on timeout, cancel or interrupt; and the workspace lock
that keeps two flow runs from racing in one project.
"""
from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from uuid import UUID

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.futures import PrefectFuture
from prefect.runtime import flow_run
from prefect.states import Cancelled, State

KILL_GRACE_SECONDS = 10.0  # between SIGTERM and SIGKILL of a stage's process group
# for a stopped flow run's tasks to end and be marked Cancelled: under the 30 s a Prefect runner waits after its
# SIGTERM before it SIGKILLs the flow run's process
STOP_WAIT_SECONDS = 20.0
TAIL_LINES = 20  # output lines quoted in a failed stage's error
# What `dvc repro` prints after every stage that changed: advice for an interactive user, noise in a run log.
DVC_ADVICE = ("To track the changes with git, run:", "git add ", "To enable auto staging, run:",
              "dvc config core.autostage true", "Use `dvc push` to send your updates to remote storage.")

# Stage processes alive in this process, by flow run id, so that a flow run can kill its own when it is cancelled
# or interrupted; and the flow runs being stopped that way, whose stages start nothing more and are not retried.
_LOCK = threading.Lock()
_LIVE: dict[subprocess.Popen, str] = {}
_STOPPING: set[str] = set()


class StageRunError(RuntimeError):
    """A stage that exited non-zero or ran past its timeout; the message names the stage."""


def _signal_group(process: subprocess.Popen, sig: int) -> bool:
    """Send `sig` to the process group led by `process`; False once the group is empty."""
    process.poll()  # reap the leader: a zombie still counts as a member of its group
    try:
        os.killpg(process.pid, sig)
    except ProcessLookupError:
        return False
    return True


def _kill_group(process: subprocess.Popen, grace_s: float = KILL_GRACE_SECONDS) -> None:
    """SIGTERM the process group led by `process`, then SIGKILL it if anything in it outlives `grace_s`."""
    if _signal_group(process, signal.SIGTERM):
        deadline = time.monotonic() + grace_s
        while _signal_group(process, 0) and time.monotonic() < deadline:
            time.sleep(0.05)
        _signal_group(process, signal.SIGKILL)
    process.wait()


def _display(raw: bytes) -> str:
    """One output line as a terminal would show it: the text after the last carriage return (progress bars)."""
    return raw.decode("utf-8", errors="replace").rstrip("\r\n").rsplit("\r", 1)[-1]


def log_level(line: str) -> int | None:
    """The level a stage's output line is logged at: ERROR for DVC's `ERROR:` and a stage's one-line `error:`,
    WARNING for `WARNING:`, None (not logged) for blank lines and DVC's advice after a stage, else INFO."""
    text = line.strip()
    if not text or text.startswith(DVC_ADVICE):
        return None
    if text.startswith(("ERROR:", "error:")):
        return logging.ERROR
    return logging.WARNING if text.startswith("WARNING:") else logging.INFO


def _not_stopping(task, task_run, state) -> bool:
    """Prefect's retry_condition_fn: a stage of a flow run that is being stopped is never retried."""
    return str(task_run.flow_run_id) not in _STOPPING


def run_dvc(what: str, args: list[str], repo_dir: str, timeout_s: float) -> list[str] | State:
    """`dvc ARGS` for `what` (a stage, the experiment) through run_command."""
    return run_command(what, [sys.executable, "-m", "dvc", "--wait-for-lock", *args], f"dvc {' '.join(args)}",
                       repo_dir, timeout_s)


def run_command(what: str, command: list[str], shown: str, repo_dir: str, timeout_s: float) -> list[str] | State:
    """Run `command` (`shown` in errors) for `what` in `repo_dir`, in its own process group, streaming its output
    into the run log; returns the output lines.

    The group is killed on timeout and on any way out of this function (error, cancellation), since neither
    Prefect's timeout nor its cancellation reaches a child process. In a flow run being stopped (`stop_stages`) it
    ends Cancelled: killed if it was running, never started if not.
    """
    logger = get_run_logger()
    run_id = str(flow_run.get_id())
    # Commands that call `python` or `dvc` get the interpreter that runs this flow.
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    lines: list[str] = []
    expired = threading.Event()
    with _LOCK:  # so that `stop_stages` either sees this process or stops it from starting
        if run_id in _STOPPING:
            return Cancelled(message=f"{what} not started: the flow run was cancelled")
        process = subprocess.Popen(
            command, cwd=repo_dir, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, start_new_session=True,
        )
        _LIVE[process] = run_id

    def expire() -> None:
        expired.set()
        _kill_group(process)

    timer = threading.Timer(timeout_s, expire)
    timer.start()
    try:
        for raw in process.stdout:
            line = _display(raw)
            level = log_level(line)
            if level is not None:
                lines.append(line)
                logger.log(level, "%s", line)
        code = process.wait()
    finally:
        timer.cancel()
        _kill_group(process)
        _LIVE.pop(process, None)
    if run_id in _STOPPING:
        return Cancelled(message=f"{what} cancelled: its process group was killed")
    tail = "\n".join(lines[-TAIL_LINES:])
    if expired.is_set():
        raise StageRunError(f"{what} timed out after {timeout_s:g} s and was killed; last lines:\n{tail}")
    if code != 0:
        raise StageRunError(f"{what} failed: `{shown}` exited with code {code}; last lines:\n{tail}")
    return lines


@task(name="dvc-stage", task_run_name="{stage}", cache_policy=NO_CACHE, retry_condition_fn=_not_stopping)
def run_stage(stage: str, repo_dir: str, timeout_s: float, force: bool = False) -> list[str] | State:
    """`dvc repro -s STAGE` (with `force`, even if nothing changed) through run_dvc."""
    return run_dvc(f"stage {stage!r}", ["repro", "-s", stage, *(["--force"] if force else [])], repo_dir, timeout_s)


@task(name="dvc-experiment", task_run_name="experiment", cache_policy=NO_CACHE, retry_condition_fn=_not_stopping)
def run_experiment(repo_dir: str, overrides: list[str], targets: list[str], single: bool, force: bool,
                   timeout_s: float) -> list[str] | State:
    """`dvc exp run --temp -S KEY=VALUE ... [TARGET ...]`: the pipeline (or TARGETs and what they need; `single`:
    them alone) as a DVC experiment in a temporary copy, so the workspace, params.yaml included, stays as it was;
    the results are in `dvc exp show` and `dvc exp apply NAME` brings them in."""
    args = ["exp", "run", "--temp", *(arg for item in overrides for arg in ("-S", item)),
            *(["--single-item"] if single else []), *(["--force"] if force else []), *targets]
    return run_dvc("the experiment", args, repo_dir, timeout_s)


def stop_stages(run_id: str, futures: list[PrefectFuture]) -> None:
    """Stop flow run `run_id`'s stages (it is cancelled or interrupted): none starts from now on, each running one's
    process group is killed, and each ends Cancelled before the task runner is shut down (which would mark it
    Crashed); a stage still waiting for its upstream (NotReady) is marked Cancelled too."""
    with _LOCK:
        _STOPPING.add(run_id)
        live = [process for process, owner in _LIVE.items() if owner == run_id]
    for process in live:
        _kill_group(process)
    # every task's thread must have made its last state (a stage after a killed one makes Pending/NotReady once its
    # upstream ends) before it is marked Cancelled, so that ours is the newest; one deadline for all, not one each
    deadline = time.monotonic() + STOP_WAIT_SECONDS
    for future in futures:
        future.wait(timeout=max(0.0, deadline - time.monotonic()))
    _cancel_unfinished([future.task_run_id for future in futures], deadline)


def _cancel_unfinished(task_run_ids: list[UUID], deadline: float) -> None:
    """Mark Cancelled each of these task runs whose recorded state is not final, by `deadline`.

    A task's own states reach the API as events that the server records later, so a task run may not be recorded
    yet (polled until it is) or show an older state than its thread last made; the server keeps the state with the
    newest timestamp, so the Cancelled set here after the thread ended is the one that stays.
    """
    from prefect import get_client
    from prefect.exceptions import ObjectNotFound

    waiting = list(task_run_ids)
    with get_client(sync_client=True) as client:
        while waiting and time.monotonic() < deadline:
            for task_run_id in list(waiting):
                try:
                    state = client.read_task_run(task_run_id).state
                except ObjectNotFound:
                    continue  # its first event is not recorded yet
                if state is not None and state.is_final():
                    waiting.remove(task_run_id)
                else:  # checked again on the next pass
                    client.set_task_run_state(task_run_id, Cancelled(message="the flow run was cancelled"),
                                             force=True)
            if waiting:
                time.sleep(0.2)


@contextlib.contextmanager
def workspace_lock(repo_dir: str) -> Iterator[None]:
    """Hold the project's flow lock (.dvc/tmp/fusesoup-flow.lock): a second flow run in the same workspace waits
    here for the first to end, instead of racing it for DVC's lock and the same outputs."""
    path = Path(repo_dir) / ".dvc" / "tmp" / "fusesoup-flow.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as handle:
        waited = False
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if not waited:
                    get_run_logger().info("waiting for the flow run already running in %s to end", repo_dir)
                    waited = True
                time.sleep(1)  # polled, so that a cancel interrupts the wait
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
