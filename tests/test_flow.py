"""flows/: the Prefect flow runs a DVC project's stages in dependency order, in parallel where it may, leaves
what `dvc repro` leaves, and fails, kills and retries stages as configured. Runs on toy shell-stage projects."""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import yaml

from flows.pipeline import pipeline, stage_graph
from flows.stage_task import StageRunError
from flows.serve import build_deployment
from fusesoup.params import Flow, Schedule
from tests.dvc_project import commit_all, make_stages_project

pytestmark = pytest.mark.usefixtures("prefect_api")

SETTINGS = Flow(retries=0, retry_delay_seconds=0, stage_timeout_seconds=60, max_parallel=2)


def logged(name: str, cmd: str) -> str:
    """`cmd`, bracketed by lines 'NAME start|end TIME' appended to ../runs.log (outside the DVC project)."""
    return f"echo {name} start $(date +%s.%N) >> ../runs.log && {cmd} && echo {name} end $(date +%s.%N) >> ../runs.log"


# a -> b, a -> c, (b, c) -> d. b and c sleep where ../slow exists, so that the flow's copy shows whether they
# overlap while `dvc repro` in the reference copy runs the same commands (same dvc.lock) without the wait.
DIAMOND = {
    "a": {"cmd": logged("a", "echo alpha > a.txt"), "outs": ["a.txt"]},
    "b": {"cmd": logged("b", "(test ! -f ../slow || sleep 2) && tr a-z A-Z < a.txt > b.txt"),
          "deps": ["a.txt"], "outs": ["b.txt"]},
    "c": {"cmd": logged("c", "(test ! -f ../slow || sleep 2) && rev a.txt > c.txt"),
          "deps": ["a.txt"], "outs": ["c.txt"]},
    "d": {"cmd": logged("d", "cat b.txt c.txt > d.txt"), "deps": ["b.txt", "c.txt"], "outs": ["d.txt"]},
}


def runs(repo: Path) -> list[tuple[str, str, float]]:
    """(stage, 'start' | 'end', time) for each line of the project's ../runs.log."""
    log = repo.parent / "runs.log"
    lines = log.read_text().split() if log.exists() else []
    return [(name, event, float(at)) for name, event, at in zip(lines[::3], lines[1::3], lines[2::3])]


@pytest.fixture(scope="module")
def diamond(tmp_path_factory) -> tuple[Path, dict[str, list[str]]]:
    """The diamond project after one flow run, and that run's result."""
    root = tmp_path_factory.mktemp("diamond")
    (root / "slow").touch()
    repo = make_stages_project(root / "repo", DIAMOND)
    return repo, pipeline(str(repo), SETTINGS)


def test_stage_graph_reads_dependencies_from_dvc(tmp_path):
    repo = make_stages_project(tmp_path / "repo", DIAMOND)
    graph = stage_graph(repo)
    assert graph == {"a": [], "b": ["a"], "c": ["a"], "d": ["b", "c"]}
    assert list(graph) == ["a", "b", "c", "d"]

    fit = {"cmd": "cp a.txt ${item}.txt", "deps": ["a.txt"], "outs": ["${item}.txt"]}
    foreach = {"a": DIAMOND["a"], "fit": {"foreach": ["y", "x"], "do": fit}}
    (repo / "dvc.yaml").write_text(yaml.safe_dump({"stages": foreach}))
    assert stage_graph(repo) == {"a": [], "fit@x": ["a"], "fit@y": ["a"]}


def test_flow_runs_each_stage_once_in_order_and_matches_dvc_repro(diamond, tmp_path):
    repo, result = diamond
    order = list(result)
    assert sorted(order) == ["a", "b", "c", "d"]
    for stage, upstream in stage_graph(repo).items():
        assert all(order.index(u) < order.index(stage) for u in upstream), order

    events = runs(repo)
    assert sorted(name for name, event, _ in events if event == "start") == ["a", "b", "c", "d"]
    at = {(name, event): t for name, event, t in events}
    assert at["b", "start"] < at["c", "end"] and at["c", "start"] < at["b", "end"], "b and c did not overlap"

    reference = make_stages_project(tmp_path / "repo", DIAMOND)
    subprocess.run([sys.executable, "-m", "dvc", "repro"], cwd=reference, check=True, capture_output=True)
    # Byte for byte: DVC appends an entry when a stage completes, so b and c, finishing in either order in the
    # flow, would land in completion order; the flow puts new entries in `dvc repro`'s own order.
    assert (repo / "dvc.lock").read_text() == (reference / "dvc.lock").read_text()
    assert (repo / "d.txt").read_text() == "ALPHA\nahpla\n"


def snapshot(repo: Path) -> dict[str, tuple[bytes, int]]:
    """Content and mtime of the project's outputs and dvc.lock."""
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in [*repo.glob("*.txt"), repo / "dvc.lock"]}


def test_second_run_is_a_no_op_for_dvc(diamond):
    repo, _ = diamond
    before = snapshot(repo)
    started = len(runs(repo))

    result = pipeline(str(repo), SETTINGS)

    for stage, lines in result.items():
        assert f"Stage '{stage}' didn't change, skipping" in lines, lines
    assert len(runs(repo)) == started
    assert snapshot(repo) == before


def test_failed_stage_fails_the_flow_and_skips_its_downstream(tmp_path):
    repo = make_stages_project(tmp_path / "repo", {
        "bad": {"cmd": "echo about to fail && exit 1", "outs": ["bad.txt"]},
        "after": {"cmd": logged("after", "cp bad.txt after.txt"), "deps": ["bad.txt"], "outs": ["after.txt"]},
        "fine": {"cmd": "echo fine > fine.txt", "outs": ["fine.txt"]},
    })
    with pytest.raises(StageRunError) as failure:
        pipeline(str(repo), SETTINGS)
    message = str(failure.value)
    assert "stage 'bad' failed" in message and "about to fail" in message
    assert "exited with 1" in message  # DVC quotes the stage command's own exit status
    assert "not run: after" in message
    assert runs(repo) == [] and not (repo / "after.txt").exists()
    assert (repo / "fine.txt").read_text() == "fine\n"  # an independent stage still completes


def group_of(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except ProcessLookupError:
        return None


def test_timeout_kills_the_stage_process_group(tmp_path):
    # The shell records its background sleep's pid, its own and its process group's, then waits. The timeout leaves
    # `dvc repro` time to start the command (about 2 s on 2 busy cores: a 2 s timeout killed DVC before it ran it).
    cmd = "sleep 60 & echo $! $$ $(cut -d' ' -f5 /proc/$$/stat) > ../pids; wait"
    repo = make_stages_project(tmp_path / "repo", {"slow": {"cmd": cmd, "outs": ["slow.txt"]}})
    started = time.monotonic()
    with pytest.raises(StageRunError, match="stage 'slow' timed out after 8 s"):
        pipeline(str(repo), SETTINGS.model_copy(update={"stage_timeout_seconds": 8}))
    assert time.monotonic() - started < 20

    sleep_pid, shell_pid, group = map(int, (tmp_path / "pids").read_text().split())
    assert group != os.getpgrp()  # the stage ran in a process group of its own
    survivors = [p.info for p in psutil.process_iter(["pid", "status", "cmdline"])
                 if p.info["status"] != psutil.STATUS_ZOMBIE and group_of(p.info["pid"]) == group]
    assert survivors == []
    for pid in (sleep_pid, shell_pid):
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE


def test_retries_rerun_a_failed_stage(tmp_path):
    cmd = "if [ ! -f ../tried ]; then touch ../tried; exit 1; fi; echo ok > flaky.txt"
    repo = make_stages_project(tmp_path / "repo", {"flaky": {"cmd": cmd, "outs": ["flaky.txt"]}})
    result = pipeline(str(repo), SETTINGS.model_copy(update={"retries": 1}))
    assert list(result) == ["flaky"]
    assert (tmp_path / "tried").exists() and (repo / "flaky.txt").read_text() == "ok\n"


def test_unknown_stage_is_refused(tmp_path):
    repo = make_stages_project(tmp_path / "repo", DIAMOND)
    with pytest.raises(ValueError, match="unknown stage"):
        pipeline(str(repo), SETTINGS, stages=["nope"])


def test_deployment_carries_the_schedule(tmp_path):
    settings = Flow(schedule=Schedule(cron="30 4 * * 1", timezone="Europe/Paris"))
    deployment = build_deployment(tmp_path, settings)
    assert deployment.name == "fusesoup-pipeline"
    [schedule] = [s.schedule for s in deployment.schedules]
    assert (schedule.cron, schedule.timezone) == ("30 4 * * 1", "Europe/Paris")
    assert deployment.parameters == {"repo_dir": str(tmp_path.resolve())}
    assert set(deployment.tags) == {"fusesoup", "dvc"}
    # one run at a time: a cron run and a manual run queue
    assert (deployment.concurrency_limit, deployment.concurrency_options.collision_strategy.value) == (1, "ENQUEUE")


def test_named_stages_run_with_what_they_need_and_single_runs_them_alone(tmp_path):
    repo = make_stages_project(tmp_path / "repo", DIAMOND)
    assert sorted(pipeline(str(repo), SETTINGS, stages=["b"])) == ["a", "b"]  # as `dvc repro b`
    assert (repo / "b.txt").exists() and not (repo / "c.txt").exists() and not (repo / "d.txt").exists()
    assert list(pipeline(str(repo), SETTINGS, stages=["c"], single=True)) == ["c"]  # as `dvc repro -s c`
    assert not (repo / "d.txt").exists()


def flow_run_records(state) -> tuple[list, list]:
    """The task runs and the log records (flushed) of the flow run that ended in `state`, from the API."""
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, LogFilter, LogFilterFlowRunId
    from prefect.logging.handlers import APILogWorker

    APILogWorker.drain_all(timeout=10)
    flow_run_id = state.state_details.flow_run_id
    with get_client(sync_client=True) as client:
        tasks = client.read_task_runs(flow_run_filter=FlowRunFilter(id={"any_": [flow_run_id]}))
        logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))
    return tasks, logs


def test_each_task_waits_for_its_direct_dependencies_only(tmp_path):
    repo = make_stages_project(tmp_path / "repo", DIAMOND)
    tasks, _ = flow_run_records(pipeline(str(repo), SETTINGS, return_state=True))
    ids = {task.name: task.id for task in tasks}
    waits = {task.name: sorted(name for name, i in ids.items()
                               for wait in task.task_inputs.get("wait_for", []) if wait.id == i) for task in tasks}
    assert waits == {"a": [], "b": ["a"], "c": ["a"], "d": ["b", "c"]}  # d waits for b and c, not a too


def test_a_stage_error_is_logged_at_error_and_dvc_advice_not_at_all(tmp_path):
    repo = make_stages_project(tmp_path / "repo", {
        "fine": {"cmd": "echo fine > fine.txt", "outs": ["fine.txt"]},
        "bad": {"cmd": "echo 'error: data/x.jsonl row 3: no text' >&2 && exit 2", "deps": ["fine.txt"],
                "outs": ["bad.txt"]}})
    state = pipeline(str(repo), SETTINGS, return_state=True)
    assert state.is_failed()
    _, logs = flow_run_records(state)
    errors = [log.message for log in logs if log.level == logging.ERROR]
    assert "error: data/x.jsonl row 3: no text" in errors  # the stage's one line, where the UI's Error filter looks
    assert any(message.startswith("ERROR: failed to reproduce 'bad'") for message in errors), errors
    messages = [log.message for log in logs]
    assert not any(m.startswith(("To track the changes with git", "Use `dvc push`")) or not m.strip()
                   for m in messages), messages
    assert "Running stage 'fine':" in messages


PNG = bytes.fromhex("89504e470d0a1a0a0000000d49484452000000010000000108060000001f15c4890000000d4944415478da63f8cf"
                    "c0f01f0005000201e2d6c2d90000000049454e44ae426082")  # a 1x1 PNG
EVAL = {"models": {"target-fused": {"all": {"bpb": 2.140412}, "code": {"bpb": 2.0751}},
                   "target-clm": {"all": {"bpb": 2.1416}}},
        "missing_domains": {"valid": [], "test": ["web"]}}  # as metrics/eval.json: the table shows its models
REPORTING = {  # as dvc.yaml's evaluate: a metrics JSON and a reports/ directory with a markdown report and figures
    "score": {"cmd": "echo scored > scores.txt", "outs": ["scores.txt"]},
    "evaluate": {"cmd": "mkdir -p metrics reports/figures && cp ../eval.json metrics/eval.json && "
                        "cp ../figure.png reports/figures/f.png && "
                        "printf '# Report\\n\\n![Interpolation](figures/f.png)\\n' > reports/report.md",
                 "deps": ["scores.txt"], "outs": [{"reports": {"cache": False}}],
                 "metrics": [{"metrics/eval.json": {"cache": False}}]},
}


def test_a_run_leaves_artifacts_the_stage_outcomes_the_evaluation_table_and_the_report(tmp_path):
    from prefect import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    (tmp_path / "figure.png").write_bytes(PNG)
    (tmp_path / "eval.json").write_text(json.dumps(EVAL))
    repo = make_stages_project(tmp_path / "repo", REPORTING)
    runs = [pipeline(str(repo), SETTINGS, return_state=True) for _ in range(2)]  # the second: DVC skips both
    found = []
    with get_client(sync_client=True) as client:
        for state in runs:
            artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(
                flow_run_id=ArtifactFilterFlowRunId(any_=[state.state_details.flow_run_id])))
            found.append({artifact.key: artifact for artifact in artifacts})
    assert found[0]["fusesoup-stages"].data.startswith("2 of 2 stages ran")
    assert "| evaluate | ran |" in found[0]["fusesoup-stages"].data
    assert found[1]["fusesoup-stages"].data.startswith("0 of 2 stages ran")
    assert "| score | skipped: unchanged |" in found[1]["fusesoup-stages"].data
    assert json.loads(found[1]["fusesoup-eval"].data) == [
        {"model": "target-fused", "all bpb": 2.1404, "code bpb": 2.0751}, {"model": "target-clm", "all bpb": 2.1416}]
    report = found[1]["fusesoup-report"].data
    assert report.startswith("# Report") and "![Interpolation](data:image/png;base64," in report


def test_a_run_is_named_by_its_start_and_the_projects_git_revision(tmp_path):
    from prefect import get_client

    def run_name(repo: Path) -> str:
        state = pipeline(str(repo), SETTINGS, return_state=True)
        with get_client(sync_client=True) as client:
            return client.read_flow_run(state.state_details.flow_run_id).name

    repo = make_stages_project(tmp_path / "repo", {"a": DIAMOND["a"]})
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d no-commit", run_name(repo))
    commit_all(repo)
    head = subprocess.run(["git", "rev-parse", "--short=7", "HEAD"], cwd=repo, capture_output=True, text=True)
    assert re.fullmatch(rf"\d{{4}}-\d\d-\d\d \d\d:\d\d {head.stdout.strip()}", run_name(repo))


def test_force_reruns_a_stage_that_did_not_change(tmp_path):
    repo = make_stages_project(tmp_path / "repo", DIAMOND)
    pipeline(str(repo), SETTINGS, stages=["a"])
    again = pipeline(str(repo), SETTINGS, stages=["a"], force=True)
    assert any(line.startswith("Running stage 'a'") for line in again["a"])
    assert [name for name, event, _ in runs(repo) if event == "start"] == ["a", "a"]


def test_overrides_and_profiles_run_as_a_dvc_experiment_and_leave_params_yaml_alone(tmp_path):
    repo = make_stages_project(tmp_path / "repo", {"echo": {"cmd": "echo seed=${seed} > seed.txt", "params": ["seed"],
                                                     "outs": ["seed.txt"]}})
    shutil.copyfile(Path(__file__).resolve().parents[1] / "params.yaml", repo / "params.yaml")
    (repo / "profiles").mkdir()
    (repo / "profiles/lucky.yaml").write_text("seed: 13\n")
    commit_all(repo)  # a DVC experiment starts from a commit
    params_before = (repo / "params.yaml").read_bytes()

    def experiment_names() -> set[str]:
        return set(subprocess.run([sys.executable, "-m", "dvc", "exp", "ls", "--name-only"], cwd=repo, text=True,
                                  capture_output=True, check=True).stdout.split())

    done = pipeline(str(repo), SETTINGS, overrides=["seed=7"])
    assert list(done) == ["experiment"] and any("Running stage 'echo'" in line for line in done["experiment"])
    [overridden] = experiment_names()
    pipeline(str(repo), SETTINGS, profile="lucky")
    [profiled] = experiment_names() - {overridden}
    assert (repo / "params.yaml").read_bytes() == params_before and not (repo / "seed.txt").exists()
    for name, seed in ((overridden, 7), (profiled, 13)):
        subprocess.run([sys.executable, "-m", "dvc", "exp", "apply", name], cwd=repo, check=True, capture_output=True)
        assert (repo / "seed.txt").read_text() == f"seed={seed}\n"
