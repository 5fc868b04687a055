"""Schedules that fire: a real `prefect server start` (localhost, temp PREFECT_HOME, analytics off), the flow served
by `python -m flows.serve` on a cron of every minute, and the server's own scheduler creating the run that the
served flow then completes. Nothing here is mocked: the server, its scheduler service and the runner are Prefect's."""
from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil
import pytest
import yaml

from flows.serve import DEPLOYMENT
from tests.dvc_project import REPO, subprocess_env
from tests.test_flow import make_project

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
    repo = make_project(root / "repo", stages)
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["flow"].update(flow)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return repo


@contextlib.contextmanager
def served(repo: Path, env: dict[str, str], log: Path):
    """`python -m flows.serve --repo REPO` running until the block ends; yields the process."""
    with log.open("w") as out:
        process = subprocess.Popen([sys.executable, "-m", "flows.serve", "--repo", str(repo)], cwd=REPO, env=env,
                                   stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        yield process
    finally:
        os.killpg(process.pid, 15)
        process.wait(timeout=30)


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
    reference = make_project(tmp_path / "reference", DIAMOND_SLOW)
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
    with log.open("w") as out:
        worker = subprocess.Popen([sys.executable, "-m", "prefect", "worker", "start", "--pool", "fusesoup-local"],
                                  cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        run = api(api_url, f"deployments/{deployment['id']}/create_flow_run")
        state = lambda: api(api_url, "flow_runs/filter", {"flow_runs": {"id": {"any_": [run["id"]]}}})[0]["state"]
        wait_for(lambda: state()["type"] in ("COMPLETED", "FAILED", "CRASHED"), 120, "finished run", worker, log)
    finally:
        os.killpg(worker.pid, 15)
        worker.wait(timeout=30)
    assert state()["type"] == "COMPLETED", log.read_text()[-3000:]
    assert (repo / "hello.txt").read_text() == "scheduled\n"
