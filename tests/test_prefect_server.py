"""Schedules that fire: a real `prefect server start` (localhost, temp PREFECT_HOME, analytics off), the flow served
by `python -m flows.serve` on a cron of every minute, and the server's own scheduler creating the run that the
served flow then completes; runs through process work pools and `prefect worker start` (the pipeline, and one
teacher's extraction spread over two workers). Nothing here is mocked: the server, its scheduler service, the runner
and the workers are Prefect's."""
from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil
import pytest
import yaml

from flows.extract_workers import WORKER_DEPLOYMENT, stage_command
from flows.serve import DEPLOYMENT
from tests import dvc_project
from tests.dvc_project import REPO, make_stages_project, subprocess_env

pytestmark = pytest.mark.e2e
STAGES = {"hello": {"cmd": "echo scheduled > hello.txt", "outs": ["hello.txt"]}}
FIRES_WITHIN_S = 150  # the next minute boundary, the scheduler's loop and the runner's poll, with room


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def prefect_env(home: Path, api_url: str) -> dict[str, str]:
    return {**subprocess_env(), "PREFECT_HOME": str(home), "PREFECT_API_URL": api_url,
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS": "5",
            "PREFECT_RUNNER_POLL_FREQUENCY": "2", "PREFECT_SERVER_UI_ENABLED": "false"}


@pytest.fixture(scope="module")
def live_server(tmp_path_factory):
    """A Prefect server on a free localhost port for this module; yields (API URL, its log file, env)."""
    home = tmp_path_factory.mktemp("prefect-server")
    port, log = free_port(), home / "server.log"
    env = prefect_env(home / "prefect-home", f"http://127.0.0.1:{port}/api")
    with log.open("w") as out:
        process = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
                                    "--port", str(port), "--analytics-off", "--no-ui"],
                                   env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/api/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert process.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.5)
        yield env["PREFECT_API_URL"], log, env
    finally:
        os.killpg(process.pid, 15)
        process.wait(timeout=30)


@pytest.fixture
def server(live_server):
    """The module's server, left as new after each test: its deployments (with their scheduled runs) and flow
    runs deleted, since every test deploys under the same name."""
    yield live_server
    api_url = live_server[0]
    for kind in ("deployments", "flow_runs"):
        for item in api(api_url, f"{kind}/filter"):
            httpx.delete(f"{api_url}/{kind}/{item['id']}", timeout=10).raise_for_status()


def api(api_url: str, path: str, body: dict | None = None):
    """POST `body` to the server's REST API; the decoded answer. A 503 (the server busy with its SQLite database
    under load) is asked again, as Prefect's own client does."""
    for attempt in range(5):
        response = httpx.post(f"{api_url}/{path}", json=body or {}, timeout=30)
        if response.status_code != 503:
            break
        time.sleep(1 + attempt)
    response.raise_for_status()
    return response.json() if response.content else None


def deployment_runs(api_url: str) -> list[dict]:
    """The flow runs of the served deployment, straight from the server's REST API."""
    return api(api_url, "flow_runs/filter", {"deployments": {"name": {"any_": [DEPLOYMENT]}}})


def project_with_flow_params(root: Path, stages: dict, **flow) -> Path:
    """A toy DVC project holding `stages`, with the project's params.yaml, its `flow` section updated."""
    repo = make_stages_project(root / "repo", stages)
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["flow"].update(flow)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return repo


@contextlib.contextmanager
def running(command: list[str], cwd: Path, env: dict[str, str], log: Path):
    """`command` running in its own process group, its output in `log`, until the block ends; yields the process."""
    with log.open("w") as out:
        process = subprocess.Popen(command, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT,
                                   start_new_session=True)
    try:
        yield process
    finally:
        os.killpg(process.pid, 15)
        process.wait(timeout=30)


def served(repo: Path, env: dict[str, str], log: Path):
    """`python -m flows.serve --repo REPO` running until the block ends; yields the process."""
    return running([sys.executable, "-m", "flows.serve", "--repo", str(repo)], REPO, env, log)


def pool_worker(pool: str, name: str, env: dict[str, str], log: Path, *options: str):
    """`prefect worker start --pool POOL --name NAME [OPTIONS]` (polling every 2 s) until the block ends, in the
    log's folder; yields the process."""
    return running([sys.executable, "-m", "prefect", "worker", "start", "--pool", pool, "--name", name, *options],
                   log.parent, {**env, "PREFECT_WORKER_QUERY_SECONDS": "2"}, log)


def wait_for(condition, timeout_s: float, what: str, process: subprocess.Popen, log: Path):
    """Poll `condition()` every second until it is truthy; fails naming `what` (with the log's tail)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        found = condition()
        if found:
            return found
        assert process.poll() is None, log.read_text()[-3000:]
        time.sleep(1)
    raise AssertionError(f"no {what} within {timeout_s} s\n{log.read_text()[-3000:]}")


def test_the_server_schedules_a_cron_run_and_the_served_flow_completes_it(server, tmp_path):
    api_url, server_log, env = server
    repo = project_with_flow_params(tmp_path, STAGES, schedule={"cron": "* * * * *", "timezone": "UTC"})
    log = tmp_path / "serve.log"
    with served(repo, env, log) as process:
        completed = wait_for(lambda: [run for run in deployment_runs(api_url) if run["state"]["type"] == "COMPLETED"],
                             FIRES_WITHIN_S, f"completed run of {DEPLOYMENT}", process, log)
    assert completed[0]["auto_scheduled"]  # created by the server's scheduler, not by hand
    assert (repo / "hello.txt").read_text() == "scheduled\n"
    text = server_log.read_text()
    assert "Traceback" not in text and "InvalidRequestError" not in text, text[-3000:]


SLOW = {  # `slow` records each start and its sleep's pid, then sleeps while ../hold exists; `after` needs its output
    "slow": {"cmd": "echo start >> ../starts.log && (test ! -f ../hold || sleep 60 & echo $! > ../sleep.pid; wait) "
                    "&& touch slow.txt", "outs": ["slow.txt"]},
    "after": {"cmd": "cp slow.txt after.txt", "deps": ["slow.txt"], "outs": ["after.txt"]},
}


def test_a_cancelled_run_kills_its_stage_and_is_not_retried(server, tmp_path):
    api_url, _, env = server
    repo = project_with_flow_params(tmp_path, SLOW, retries=1, retry_delay_seconds=0)
    (tmp_path / "hold").touch()
    log = tmp_path / "serve.log"
    with served(repo, env, log) as process:
        [deployment] = wait_for(lambda: api(api_url, "deployments/filter",
                                            {"deployments": {"name": {"any_": [DEPLOYMENT]}}}),
                                60, "deployment", process, log)
        run = api(api_url, f"deployments/{deployment['id']}/create_flow_run")
        sleep_pid = int(wait_for(lambda: (tmp_path / "sleep.pid").exists() and (tmp_path / "sleep.pid").read_text(),
                                 60, "running stage", process, log))
        api(api_url, f"flow_runs/{run['id']}/set_state", {"state": {"type": "CANCELLING"}, "force": True})
        wait_for(lambda: api(api_url, "flow_runs/filter", {"flow_runs": {"id": {"any_": [run["id"]]}}})[0]["state"]
                 ["type"] == "CANCELLED", 60, "cancelled flow run", process, log)
        time.sleep(3)  # a retry, had there been one, would have started by now
        tasks = api(api_url, "task_runs/filter", {"flow_runs": {"id": {"any_": [run["id"]]}}})
    assert not psutil.pid_exists(sleep_pid) or psutil.Process(sleep_pid).status() == psutil.STATUS_ZOMBIE
    assert (tmp_path / "starts.log").read_text() == "start\n"  # started once: the cancel was not retried
    states = {task["name"]: (task["state"]["type"], task["state"]["name"]) for task in tasks}
    assert states["slow"] == ("CANCELLED", "Cancelled"), states  # not Crashed, not Failed and retried
    assert states["after"] == ("CANCELLED", "Cancelled"), states  # never started: Cancelled, not left NotReady
    assert not (repo / "slow.txt").exists() and not (repo / "after.txt").exists()
    (tmp_path / "hold").unlink()  # the next run goes through, and leaves the project as `dvc repro` would
    rerun = subprocess.run([sys.executable, "-m", "flows.pipeline", "--repo", str(repo)], cwd=REPO, env=env,
                           capture_output=True, text=True, timeout=120)
    assert rerun.returncode == 0, rerun.stdout[-3000:]
    status = subprocess.run([sys.executable, "-m", "dvc", "status", "--json"], cwd=repo, env=env, capture_output=True,
                            text=True, check=True)
    assert json.loads(status.stdout) == {} and (repo / "after.txt").exists()


DIAMOND_SLOW = {  # a -> (b, c) -> d, each a second long
    "a": {"cmd": "sleep 1 && echo alpha > a.txt", "outs": ["a.txt"]},
    "b": {"cmd": "sleep 1 && tr a-z A-Z < a.txt > b.txt", "deps": ["a.txt"], "outs": ["b.txt"]},
    "c": {"cmd": "sleep 1 && rev a.txt > c.txt", "deps": ["a.txt"], "outs": ["c.txt"]},
    "d": {"cmd": "cat b.txt c.txt > d.txt", "deps": ["b.txt", "c.txt"], "outs": ["d.txt"]},
}


def test_two_runs_started_together_in_one_workspace_both_end_well(server, tmp_path):
    _, _, env = server
    repo = project_with_flow_params(tmp_path, DIAMOND_SLOW)
    command = [sys.executable, "-m", "flows.pipeline", "--repo", str(repo)]
    runs = [subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            for _ in range(2)]
    outputs = [run.communicate(timeout=240)[0] for run in runs]
    assert [run.returncode for run in runs] == [0, 0], outputs
    assert sum("waiting for the flow run already running in" in out for out in outputs) == 1, outputs
    assert "is busy" not in "".join(outputs)  # DVC's lock was never contended
    reference = make_stages_project(tmp_path / "reference", DIAMOND_SLOW)
    subprocess.run([sys.executable, "-m", "dvc", "repro"], cwd=reference, env=env, check=True, capture_output=True)
    assert (repo / "dvc.lock").read_text() == (reference / "dvc.lock").read_text()


def test_a_run_through_a_process_work_pool_and_worker(server, tmp_path):
    api_url, _, env = server
    repo = project_with_flow_params(tmp_path, STAGES)
    done = subprocess.run([sys.executable, "-m", "flows.deploy", "--pool", "fusesoup-local", "--repo", str(repo)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "on work pool 'fusesoup-local'" in done.stdout
    [pool] = api(api_url, "work_pools/filter", {"work_pools": {"name": {"any_": ["fusesoup-local"]}}})
    assert pool["type"] == "process"
    [deployment] = api(api_url, "deployments/filter", {"deployments": {"name": {"any_": [DEPLOYMENT]}}})
    assert deployment["work_pool_name"] == "fusesoup-local" and deployment["parameters"] == {"repo_dir": str(repo)}
    log = tmp_path / "worker.log"
    with pool_worker("fusesoup-local", "worker", env, log) as worker:
        run = api(api_url, f"deployments/{deployment['id']}/create_flow_run")
        state = lambda: api(api_url, "flow_runs/filter", {"flow_runs": {"id": {"any_": [run["id"]]}}})[0]["state"]
        wait_for(lambda: state()["type"] in ("COMPLETED", "FAILED", "CRASHED"), 120, "finished run", worker, log)
    assert state()["type"] == "COMPLETED", log.read_text()[-3000:]
    assert (repo / "hello.txt").read_text() == "scheduled\n"


TEACHER = "prose-gpt2"  # the smallest of the tiny profile's sources


def store_files(store: Path) -> dict[str, bytes]:
    """Every file under `store` (shards, sidecars, manifest) by its path in the store: its bytes."""
    return {str(path.relative_to(store)): path.read_bytes() for path in sorted(store.rglob("*")) if path.is_file()}


def test_extract_across_two_pool_workers_fills_the_store_one_process_fills(server, tmp_path):
    api_url, _, env = server
    repo = dvc_project.make_project(tmp_path / "repo")  # the tiny profile, on a quarter of its corpus
    dvc_project.set_param(repo, "corpus.domain_max_bytes", {"code": 30000, "prose": 30000})
    dvc_project.set_param(repo, "extract.shard_sequences", 16)  # 6 shards of train: 3 for each worker
    dvc_project.dvc(repo, "repro", f"bootstrap@{TEACHER}")
    with pytest.raises(ValueError, match=r"^extract@nope: no such stage in .*dvc.yaml; is 'nope' one of"):
        stage_command(repo, "nope")  # extract-across stops there, before it starts any worker
    reference = tmp_path / "reference"
    dvc_project.run([sys.executable, "-m", "stages.extract", TEACHER, "--params", "params.yaml", "--corpus",
                     "data/corpus", "--models", "data/models", "--out", str(reference / "store"), "--metrics",
                     str(reference / "metrics.json"), "--num-workers", "1", "--no-progress"], repo)
    command = [sys.executable, "-m", "flows.extract_workers", "--teacher", TEACHER, "--workers", "2",
               "--pool", "fusesoup-extract", "--repo", str(repo)]
    machines = {name: tmp_path / name / "worker.log" for name in ("machine-a", "machine-b")}
    for log in machines.values():
        log.parent.mkdir()
    with contextlib.ExitStack() as stack:  # two workers of one pool, one run at a time each: two machines
        for name, log in machines.items():
            stack.enter_context(pool_worker("fusesoup-extract", name, env, log, "--limit", "1"))
        done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        children = api(api_url, "flow_runs/filter", {"deployments": {"name": {"any_": [WORKER_DEPLOYMENT]}}})
        assert sorted((run["parameters"]["worker_index"], run["parameters"]["num_workers"], run["name"],
                       run["state"]["type"]) for run in children) == [
            (i, 2, f"extract@{TEACHER} worker {i} of 2", "COMPLETED") for i in (0, 1)]
        [parent] = api(api_url, "flow_runs/filter", {"flow_runs": {"name": {"any_": [
            f"extract@{TEACHER} across 2 workers"]}}})
        assert {run["parent_task_run_id"] for run in children} <= {
            task["id"] for task in api(api_url, "task_runs/filter", {"flow_runs": {"id": {"any_": [parent["id"]]}}})}
        # each machine ran one (a worker that loses a race for a run logs its aborted submission, not this line)
        ran = {name: re.findall(r"Flow run '(.+?)' submitted to infrastructure", log.read_text())
               for name, log in machines.items()}
        assert sorted(names for names in ran.values()) == [[f"extract@{TEACHER} worker {i} of 2"] for i in (0, 1)], ran

        store = repo / "data" / "logits" / TEACHER
        files = store_files(store)
        assert files == store_files(reference / "store")  # byte for byte what one process writes
        assert {"train/shard-00000.parquet", "train/shard-00001.parquet", "manifest.json"} <= files.keys()
        metrics = repo / "metrics" / "extract" / f"{TEACHER}.json"
        assert metrics.read_bytes() == (reference / "metrics.json").read_bytes()
        status = dvc_project.dvc(repo, "status", f"extract@{TEACHER}", "--json")
        assert json.loads(status.stdout) == {}  # dvc.lock records the store: `dvc repro` would skip the stage

        # worker 1's first shard blocked by a directory where its sidecar goes: worker 1 fails, worker 0 finds its
        # shards done; the parent fails naming worker 1 only, and never completes the store
        (store / "train" / "shard-00001.json").unlink()
        (store / "train" / "shard-00001.json").mkdir()
        failed = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert failed.returncode == 1, failed.stdout[-3000:]
    [line] = [line for line in failed.stderr.splitlines() if line.startswith("error:")]
    assert line.startswith(f"error: extract@{TEACHER}: worker 1 of 2 Failed: ") and "worker 0 of" not in line, line
    assert "shard-00001.json" in line, line
    assert not (store / "manifest.json").exists()
    states = {run["parameters"]["worker_index"]: run["state"]["type"] for run in api(
        api_url, "flow_runs/filter", {"deployments": {"name": {"any_": [WORKER_DEPLOYMENT]}}})
        if run["id"] not in {child["id"] for child in children}}
    assert states == {0: "COMPLETED", 1: "FAILED"}
