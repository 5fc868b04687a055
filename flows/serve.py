"""Serve the pipeline flow on params.yaml's cron schedule: `python -m flows.serve [--repo DIR]`.

Needs a Prefect server for the schedule and the UI (`prefect server start`, then PREFECT_API_URL pointing at it).
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

from prefect import serve
from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy
from prefect.deployments.runner import RunnerDeployment
from prefect.schedules import Cron

from flows.pipeline import pipeline
from fusesoup.params import Flow, load_params

DEPLOYMENT = "fusesoup-pipeline"


def deployment_options(repo_dir: str | os.PathLike, settings: Flow) -> dict:
    """What every deployment of the pipeline carries, served or on a work pool: `settings.schedule` (cron in its
    timezone), the project to run, one run at a time (a cron run and a manual one queue, ENQUEUE), the tags."""
    return {"schedule": Cron(settings.schedule.cron, timezone=settings.schedule.timezone),
            "parameters": {"repo_dir": str(Path(repo_dir).resolve())}, "tags": ["fusesoup", "dvc"],
            "concurrency_limit": ConcurrencyLimitConfig(limit=1, collision_strategy=ConcurrencyLimitStrategy.ENQUEUE)}


def build_deployment(repo_dir: str | os.PathLike, settings: Flow) -> RunnerDeployment:
    """The pipeline as a deployment served by this process, run on `repo_dir`.

    Each run reloads the flow settings from params.yaml; the schedule itself is read once, when serving starts.
    """
    return pipeline.to_deployment(name=DEPLOYMENT, **deployment_options(repo_dir, settings))


def main(argv: list[str] | None = None) -> None:
    """Serve the deployment until interrupted."""
    parser = argparse.ArgumentParser(
        prog="python -m flows.serve", description="Serve the pipeline flow on params.yaml's cron schedule."
    )
    parser.add_argument("--repo", default=".", help="the DVC project's root (default: .)")
    args = parser.parse_args(argv)
    settings = load_params(Path(args.repo) / "params.yaml").flow
    serve(build_deployment(args.repo, settings))


if __name__ == "__main__":
    main()
