"""Schedules that fire: a real `prefect server start` (localhost, temp PREFECT_HOME, analytics off), the flow served
by `python -m flows.serve` on a cron of every minute, and the server's own scheduler creating the run that the
served flow then completes. Nothing here is mocked: the server, its scheduler service and the runner are Prefect's."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml

from flows.serve import DEPLOYMENT
from tests.dvc_project import REPO, subprocess_env
from tests.test_flow import make_project

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


@pytest.fixture
def server(tmp_path):
    """A Prefect server on a free localhost port; yields (API URL, its log file, env)."""
    port, log = free_port(), tmp_path / "server.log"
    env = prefect_env(tmp_path / "prefect-home", f"http://127.0.0.1:{port}/api")
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


def deployment_runs(api_url: str) -> list[dict]:
    """The flow runs of the served deployment, straight from the server's REST API."""
    response = httpx.post(f"{api_url}/flow_runs/filter", json={"deployments": {"name": {"any_": [DEPLOYMENT]}}},
                          timeout=10)
    response.raise_for_status()
    return response.json()


def test_the_server_schedules_a_cron_run_and_the_served_flow_completes_it(server, tmp_path):
    api_url, server_log, env = server
    repo = make_project(tmp_path / "repo", STAGES)
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["flow"]["schedule"] = {"cron": "* * * * *", "timezone": "UTC"}
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    serve_log = tmp_path / "serve.log"
    with serve_log.open("w") as out:
        served = subprocess.Popen([sys.executable, "-m", "flows.serve", "--repo", str(repo)], cwd=REPO, env=env,
                                  stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline, runs = time.monotonic() + FIRES_WITHIN_S, []
        while time.monotonic() < deadline:
            runs = deployment_runs(api_url)
            if any(run["state"]["type"] == "COMPLETED" for run in runs):
                break
            assert served.poll() is None, serve_log.read_text()[-3000:]
            time.sleep(2)
    finally:
        os.killpg(served.pid, 15)
        served.wait(timeout=30)
    completed = [run for run in runs if run["state"]["type"] == "COMPLETED"]
    assert completed, (f"no completed run of {DEPLOYMENT} in {FIRES_WITHIN_S} s: "
                       f"{[(run['name'], run['state']['type']) for run in runs]}\n{server_log.read_text()[-3000:]}")
    assert completed[0]["auto_scheduled"]  # created by the server's scheduler, not by hand
    assert (repo / "hello.txt").read_text() == "scheduled\n"
    log = server_log.read_text()
    assert "Traceback" not in log and "InvalidRequestError" not in log, log[-3000:]
