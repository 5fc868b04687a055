"""The DVC pipeline as a Prefect flow: one task per DVC stage (stage_task.py), run in dependency order.

Prefect schedules, retries, times out and logs; DVC decides what is up to date (`dvc repro -s STAGE` skips a
stage whose deps, params and outs did not change), so the tasks use no Prefect cache.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

from prefect import flow
from prefect.futures import PrefectFuture, as_completed
from prefect.runtime import flow_run
from prefect.task_runners import ThreadPoolTaskRunner

from flows.artifacts import publish
from flows.stage_task import StageRunError, run_experiment, run_stage, stop_stages, workspace_lock
from fusesoup.params import Flow, load_params, read_mapping
from fusesoup.profiles import as_overrides, with_profile


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


def run_name() -> str:
    """A flow run's name: when it started (UTC) and the project's git revision, e.g. `2026-12-02 03:00 ab12cd3`
    (`+` when the work tree has changes, `no-commit` before the first commit)."""
    repo_dir = str(flow_run.parameters.get("repo_dir", "."))
    git = ["git", "-C", repo_dir]
    head = subprocess.run([*git, "rev-parse", "--short=7", "HEAD"], capture_output=True, text=True)
    revision = head.stdout.strip() if head.returncode == 0 else "no-commit"
    if head.returncode == 0:
        changes = subprocess.run([*git, "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                                 text=True)
        revision += "+" if changes.stdout.strip() else ""
    return f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} {revision}"


@flow(name="fusesoup-pipeline", flow_run_name=run_name)
def pipeline(
    repo_dir: str = ".", settings: Flow | None = None, stages: list[str] | None = None, single: bool = False,
    force: bool = False, overrides: list[str] | None = None, profile: str | None = None,
) -> dict[str, list[str]]:
    """Run the DVC pipeline, each stage after the stages it depends on, at most `settings.max_parallel` at once.

    `stages` as `dvc repro TARGET...` takes them: those stages and every stage they need (DVC skipping what is
    current); with `single`, those stages alone (`dvc repro -s`); `force` reruns them even if nothing changed.
    `overrides` (`KEY=VALUE`, as `dvc exp run -S` takes them) run the selection as one DVC experiment instead
    (stage_task.run_experiment), leaving params.yaml as it is; `profile` (profiles/<profile>.yaml) is applied the
    same way, before `overrides`. Returns each stage's (or the experiment's) output lines, in completion order."""
    repo_dir = str(Path(repo_dir).resolve())
    settings = settings or load_params(Path(repo_dir) / "params.yaml").flow
    if profile:
        profile_path, params_path = Path(repo_dir) / "profiles" / f"{profile}.yaml", Path(repo_dir) / "params.yaml"
        with_profile(params_path, profile_path)  # validated first: a bad profile stops here in one line
        overrides = as_overrides(read_mapping(profile_path), read_mapping(params_path)) + list(overrides or [])
    graph = stage_graph(repo_dir)
    unknown = sorted(set(stages or []) - set(graph))
    if unknown:
        raise ValueError(f"unknown stage(s) {unknown}; the DVC project has {list(graph)}")
    wanted = set(graph if stages is None else stages)
    if not single:
        wanted |= {upstream for name in wanted for upstream in _ancestors(graph, name)}
    selected = [name for name in graph if name in wanted]
    with workspace_lock(repo_dir):
        if overrides:
            return _run_experiment(repo_dir, settings, stages or [], single, force, overrides)
        return _run_stages(repo_dir, settings, graph, selected, wanted, force)


def _run_experiment(repo_dir: str, settings: Flow, targets: list[str], single: bool, force: bool,
                    overrides: list[str]) -> dict[str, list[str]]:
    """The pipeline as one DVC experiment task (a stage-level view is `dvc exp show`'s, not the flow's)."""
    experiment = run_experiment.with_options(retries=settings.retries,
                                             retry_delay_seconds=settings.retry_delay_seconds)
    try:
        return {"experiment": experiment(repo_dir, overrides, targets, single, force, settings.stage_timeout_seconds)}
    except BaseException:
        stop_stages(str(flow_run.get_id()), [])
        raise


def _run_stages(repo_dir: str, settings: Flow, graph: dict[str, list[str]], selected: list[str],
                wanted: set[str], force: bool) -> dict[str, list[str]]:
    """The body of `pipeline`, inside the workspace lock: `selected` stages as tasks, each after its upstream."""
    existing_lock_entries = lock_stage_names(repo_dir)
    stage_task = run_stage.with_options(retries=settings.retries, retry_delay_seconds=settings.retry_delay_seconds)
    # Submitted in topological order to a FIFO pool, a stage only ever waits for stages that hold a worker
    # or are done, so the pool bounds the parallelism without deadlock.
    with ThreadPoolTaskRunner(max_workers=settings.max_parallel) as runner:
        futures: dict[str, PrefectFuture] = {}
        try:
            for name in selected:
                upstream = [futures[d] for d in sorted(_nearest_selected(graph, name, wanted))]
                parameters = {"stage": name, "repo_dir": repo_dir, "timeout_s": settings.stage_timeout_seconds,
                              "force": force}
                futures[name] = runner.submit(stage_task, parameters, wait_for=upstream)
            done = _collect(futures)
            match_repro_lock_order(repo_dir, existing_lock_entries)
            publish(repo_dir, done)
            return done
        except StageRunError:
            raise  # every stage has ended: the failed ones, and those after them not run (NotReady)
        except BaseException:  # a cancel or an interrupt
            stop_stages(str(flow_run.get_id()), list(futures.values()))
            raise


def main(argv: list[str] | None = None) -> int:
    """`python -m flows.pipeline [--repo DIR] [--stage NAME ...]`: run the flow once; non-zero if it fails."""
    parser = argparse.ArgumentParser(
        prog="python -m flows.pipeline", description="Run the DVC pipeline once as a Prefect flow."
    )
    parser.add_argument("--repo", default=".", help="the DVC project's root (default: .)")
    parser.add_argument("--stage", action="append", dest="stages", metavar="NAME",
                        help="run this stage and what it needs (repeatable; default: every stage)")
    parser.add_argument("--single", action="store_true", help="run the --stage stages alone (dvc repro -s)")
    parser.add_argument("--force", action="store_true", help="rerun stages even if nothing changed")
    parser.add_argument("-S", "--set", action="append", dest="overrides", metavar="KEY=VALUE",
                        help="run as a DVC experiment with this param set (repeatable; params.yaml is not edited)")
    parser.add_argument("--profile", help="run as a DVC experiment with profiles/PROFILE.yaml applied")
    args = parser.parse_args(argv)
    state = pipeline(repo_dir=args.repo, stages=args.stages, single=args.single, force=args.force,
                     overrides=args.overrides, profile=args.profile, return_state=True)
    return 0 if state.is_completed() else 1


if __name__ == "__main__":
    sys.exit(main())
