"""Deploy the pipeline to a Prefect work pool, for stages that outgrow the serving machine:
`python -m flows.deploy --pool NAME [--repo DIR] [--source PATH_OR_GIT_URL]`, then `prefect worker start --pool NAME`
where the runs should happen.

The pool is created as a `process` pool if it does not exist (a docker or kubernetes pool, made with `prefect
work-pool create --type docker|kubernetes`, is used as it is). The flow's code is read from `--source` at each run:
this checkout by default, or a git URL the workers can clone; the data come from the DVC project at `--repo` on the
worker's machine (`dvc pull` from the project's remote first, where the worker has no copy).
"""
from __future__ import annotations

import argparse
from pathlib import Path

from prefect import Flow, get_client

from flows.serve import DEPLOYMENT, deployment_options
from fusesoup.params import load_params

CODE_ROOT = Path(__file__).resolve().parents[1]
ENTRYPOINT = "flows/pipeline.py:pipeline"


def ensure_pool(name: str) -> str:
    """The work pool's type, after creating it as a process pool if it does not exist."""
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            return client.read_work_pool(name).type
        except ObjectNotFound:
            return client.create_work_pool(WorkPoolCreate(name=name, type="process")).type


def deploy_flow(entrypoint: str, name: str, pool: str, source: str | Path = CODE_ROOT, **options) -> str:
    """Register the flow at `entrypoint` (`path.py:function`, read from `source` at each run) as deployment `name`
    on `pool`, created as a process pool if missing; `options` as Flow.deploy takes them. Its id."""
    ensure_pool(pool)
    flow = Flow.from_source(source=str(source), entrypoint=entrypoint)
    return str(flow.deploy(name=name, work_pool_name=pool, build=False, push=False, print_next_steps=False,
                           **options))


def deploy(pool: str, repo_dir: str | Path, source: str | Path = CODE_ROOT) -> str:
    """Register the pipeline on `pool` (flow code from `source`, run on the project `repo_dir`); its id."""
    settings = load_params(Path(repo_dir) / "params.yaml").flow
    return deploy_flow(ENTRYPOINT, DEPLOYMENT, pool, source, **deployment_options(repo_dir, settings))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m flows.deploy", description=__doc__.split("\n\n")[0])
    parser.add_argument("--pool", required=True, help="the work pool (created as a process pool if missing)")
    parser.add_argument("--repo", default=".", help="the DVC project's root on the workers (default: .)")
    parser.add_argument("--source", default=str(CODE_ROOT), help="where workers read the flow's code from")
    args = parser.parse_args(argv)
    deployment_id = deploy(args.pool, args.repo, args.source)
    print(f"deployment {DEPLOYMENT} ({deployment_id}) on work pool {args.pool!r}; "
          f"start a worker: prefect worker start --pool {args.pool}")


if __name__ == "__main__":
    main()
