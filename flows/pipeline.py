"""The DVC pipeline as a Prefect flow: one task per DVC stage, run in dependency order.

Prefect schedules, retries, times out and logs; DVC decides what is up to date (`dvc repro -s STAGE` skips a
stage whose deps, params and outs did not change), so the tasks use no Prefect cache.
"""
from __future__ import annotations

import argparse
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.futures import PrefectFuture, as_completed
from prefect.task_runners import ThreadPoolTaskRunner

from fusesoup.params import Flow, load_params

KILL_GRACE_SECONDS = 10.0  # between SIGTERM and SIGKILL of a stage's process group
TAIL_LINES = 20  # output lines quoted in a failed stage's error
# What `dvc repro` prints after every stage that changed: advice for an interactive user, noise in a run log.
DVC_ADVICE = ("To track the changes with git, run:", "git add ", "To enable auto staging, run:",
              "dvc config core.autostage true", "Use `dvc push` to send your updates to remote storage.")

# Every stage process alive in this process, so that the flow can kill them when it is interrupted or cancelled.
_LIVE: set[subprocess.Popen] = set()


class StageRunError(RuntimeError):
    """A stage that exited non-zero or ran past its timeout; the message names the stage."""


def stage_graph(repo_dir: str | os.PathLike = ".") -> dict[str, list[str]]:
    """Each pipeline stage of the DVC project -> the stages it depends on, read from DVC's own graph.

    Keys come in a topological order (upstream first, ties by name); `.dvc` files (data DVC only tracks) are
    left out, as they have nothing to run.
    """
    import networkx as nx
    from dvc.repo import Repo
    from dvc.stage import PipelineStage

    with Repo(os.fspath(repo_dir)) as repo:
        graph = repo.index.graph  # an edge stage -> upstream stage for each output the stage depends on
        stages = graph.subgraph(s for s in graph if isinstance(s, PipelineStage))
        name = {s: _address(s, repo.root_dir) for s in stages}
        upstream = {name[s]: sorted(name[d] for d in stages.successors(s)) for s in stages}
    order = nx.lexicographical_topological_sort(nx.DiGraph(upstream).reverse())
    return {stage: upstream[stage] for stage in order}


def lock_stage_names(repo_dir: str | os.PathLike) -> list[str]:
    """The stage entries of the project's root dvc.lock, in file order (none when there is no lock yet)."""
    from dvc.utils.serialize import load_yaml

    lock = Path(repo_dir) / "dvc.lock"
    return list(load_yaml(lock).get("stages", {})) if lock.exists() else []


def match_repro_lock_order(repo_dir: str | os.PathLike, existing: list[str]) -> None:
    """Order dvc.lock's entries as one `dvc repro` would leave them: entries that existed before keep their
    places, new ones follow in DVC's own execution order (`plan_repro`).

    DVC appends a stage's entry when the stage first completes, so stages run concurrently by the flow would
    otherwise land in completion order; with this the flow leaves a byte-identical dvc.lock.
    """
    from dvc.repo import Repo
    from dvc.repo.reproduce import collect_stages, get_active_graph, plan_repro
    from dvc.utils.serialize import modify_yaml

    with Repo(os.fspath(repo_dir)) as repo:  # the plan exactly as `dvc repro` (no targets) makes it
        root_dvcfile = os.path.join(repo.root_dir, "dvc.yaml")
        steps = plan_repro(get_active_graph(repo.index.graph), collect_stages(repo, [root_dvcfile]))
        planned = [stage.name for stage in steps if stage.path == root_dvcfile]
    current = lock_stage_names(repo_dir)
    wanted = [n for n in existing if n in current] + [n for n in planned if n in current and n not in existing]
    wanted += [n for n in current if n not in wanted]
    if wanted == current:
        return  # nothing to move: leave the file (and its mtime) alone
    with modify_yaml(Path(repo_dir) / "dvc.lock") as data:
        for name in wanted:
            data["stages"].move_to_end(name)


def _address(stage, root_dir: str) -> str:
    """How `dvc repro` run in `root_dir` names the stage: `name` (`name@item` for foreach), or
    `path/dvc.yaml:name` outside the root's dvc.yaml. (DVC's own `addressing` is relative to the cwd.)"""
    dvcfile = os.path.relpath(stage.path, root_dir)
    return stage.name if dvcfile == "dvc.yaml" else f"{dvcfile}:{stage.name}"


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


@task(name="dvc-stage", task_run_name="{stage}", cache_policy=NO_CACHE)
def run_stage(stage: str, repo_dir: str, timeout_s: float) -> list[str]:
    """Run `dvc repro -s STAGE` in its own process group, streaming its output into the run log.

    Returns the output lines. The group is killed on timeout and on any way out of this function (error,
    cancellation), since neither Prefect's timeout nor its cancellation reaches a child process.
    """
    logger = get_run_logger()
    command = [sys.executable, "-m", "dvc", "--wait-for-lock", "repro", "-s", stage]
    # Stage commands that call `python` or `dvc` get the interpreter that runs this flow.
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    lines: list[str] = []
    expired = threading.Event()
    process = subprocess.Popen(
        command, cwd=repo_dir, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, start_new_session=True,
    )
    _LIVE.add(process)

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
        _LIVE.discard(process)
    tail = "\n".join(lines[-TAIL_LINES:])
    if expired.is_set():
        raise StageRunError(f"stage {stage!r} timed out after {timeout_s:g} s and was killed; last lines:\n{tail}")
    if code != 0:
        raise StageRunError(f"stage {stage!r} failed: `dvc repro -s {stage}` exited with code {code}; last lines:\n{tail}")
    return lines


def _nearest_selected(graph: dict[str, list[str]], stage: str, selected: set[str]) -> set[str]:
    """The stages `stage` waits for: its direct dependencies, or, for one that is not selected, the nearest
    selected stages above it (so that a subset still runs in dependency order)."""
    nearest: set[str] = set()
    for upstream in graph[stage]:
        nearest |= {upstream} if upstream in selected else _nearest_selected(graph, upstream, selected)
    return nearest


def _ancestors(graph: dict[str, list[str]], stage: str) -> set[str]:
    """Every stage that `stage` depends on, directly or not."""
    seen: set[str] = set()
    todo = list(graph[stage])
    while todo:
        name = todo.pop()
        if name not in seen:
            seen.add(name)
            todo.extend(graph[name])
    return seen


def _collect(futures: dict[str, PrefectFuture]) -> dict[str, list[str]]:
    """Wait for every stage; their output lines in completion order, or an error naming the failed stages."""
    names = {future.task_run_id: name for name, future in futures.items()}
    done: dict[str, list[str]] = {}
    failed: dict[str, str] = {}
    for future in as_completed(list(futures.values())):
        name = names[future.task_run_id]
        future.wait()  # records the final state: `state` before that may be the API's, which lags
        if future.state.is_completed():
            done[name] = future.result()
        elif future.state.is_failed() or future.state.is_crashed():
            failed[name] = str(future.result(raise_on_failure=False))
    if len(done) < len(futures):
        not_run = [name for name in futures if name not in done and name not in failed]
        raise StageRunError("\n".join([*failed.values(), f"not run: {', '.join(not_run) or 'none'}"]))
    return done


@flow(name="fusesoup-pipeline")
def pipeline(
    repo_dir: str = ".", settings: Flow | None = None, stages: list[str] | None = None, single: bool = False
) -> dict[str, list[str]]:
    """Run the DVC pipeline, each stage after the stages it depends on, at most `settings.max_parallel` at once.

    `stages` as `dvc repro TARGET...` takes them: those stages and every stage they need (DVC skipping what is
    current); with `single`, those stages alone (`dvc repro -s`). Returns each stage's output lines, in
    completion order."""
    repo_dir = str(Path(repo_dir).resolve())
    settings = settings or load_params(Path(repo_dir) / "params.yaml").flow
    graph = stage_graph(repo_dir)
    unknown = sorted(set(stages or []) - set(graph))
    if unknown:
        raise ValueError(f"unknown stage(s) {unknown}; the DVC project has {list(graph)}")
    wanted = set(graph if stages is None else stages)
    if not single:
        wanted |= {upstream for name in wanted for upstream in _ancestors(graph, name)}
    selected = [name for name in graph if name in wanted]
    existing_lock_entries = lock_stage_names(repo_dir)
    stage_task = run_stage.with_options(retries=settings.retries, retry_delay_seconds=settings.retry_delay_seconds)
    # Submitted in topological order to a FIFO pool, a stage only ever waits for stages that hold a worker
    # or are done, so the pool bounds the parallelism without deadlock.
    with ThreadPoolTaskRunner(max_workers=settings.max_parallel) as runner:
        futures: dict[str, PrefectFuture] = {}
        try:
            for name in selected:
                upstream = [futures[d] for d in sorted(_nearest_selected(graph, name, wanted))]
                parameters = {"stage": name, "repo_dir": repo_dir, "timeout_s": settings.stage_timeout_seconds}
                futures[name] = runner.submit(stage_task, parameters, wait_for=upstream)
            done = _collect(futures)
            match_repro_lock_order(repo_dir, existing_lock_entries)
            return done
        finally:
            for process in list(_LIVE):  # only left when the flow is interrupted or cancelled
                _kill_group(process)


def main(argv: list[str] | None = None) -> int:
    """`python -m flows.pipeline [--repo DIR] [--stage NAME ...]`: run the flow once; non-zero if it fails."""
    parser = argparse.ArgumentParser(
        prog="python -m flows.pipeline", description="Run the DVC pipeline once as a Prefect flow."
    )
    parser.add_argument("--repo", default=".", help="the DVC project's root (default: .)")
    parser.add_argument("--stage", action="append", dest="stages", metavar="NAME",
                        help="run this stage and what it needs (repeatable; default: every stage)")
    parser.add_argument("--single", action="store_true", help="run the --stage stages alone (dvc repro -s)")
    args = parser.parse_args(argv)
    state = pipeline(repo_dir=args.repo, stages=args.stages, single=args.single, return_state=True)
    return 0 if state.is_completed() else 1


if __name__ == "__main__":
    sys.exit(main())
