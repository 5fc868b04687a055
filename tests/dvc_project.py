"""Helpers to make a throwaway copy of this DVC project (optionally on the tiny profile), or a small DVC project of
shell stages, and drive DVC in it."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml
from dvc.repo import Repo

from fusesoup.profiles import dump, with_profile

REPO = Path(__file__).resolve().parents[1]
PROJECT_FILES = ["dvc.yaml", "params.yaml", "fusesoup", "stages", "flows", "profiles", ".dvcignore", ".gitignore"]


def subprocess_env() -> dict[str, str]:
    """The environment for DVC and the stages it runs: `python` must be this interpreter (the venv's)."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.pop("PYTHONPATH", None)
    return env


def run(cmd: list[str], cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run(cmd, cwd=cwd, env=subprocess_env(), capture_output=True, text=True)
    if check and done.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({done.returncode}) in {cwd}:\n{done.stdout}\n{done.stderr}")
    return done


def dvc(repo: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    return run([sys.executable, "-m", "dvc", *args], repo, check)


def make_project(dest: Path, profile: str | None = "tiny") -> Path:
    """Copy the project into `dest` as a fresh git + DVC repo, with `profiles/<profile>.yaml` applied."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in PROJECT_FILES:
        source = REPO / name
        if source.is_dir():
            shutil.copytree(source, dest / name, ignore=shutil.ignore_patterns("__pycache__"))
        elif source.exists():
            shutil.copy2(source, dest / name)
    if profile:
        (dest / "params.yaml").write_text(dump(with_profile(REPO / "params.yaml", REPO / "profiles" / f"{profile}.yaml")))
    run(["git", "init", "-q"], dest)
    dvc(dest, "init", "-q")
    dvc(dest, "config", "core.analytics", "false")
    commit_all(dest, "project")
    return dest


def make_stages_project(dest: Path, stages: dict) -> Path:
    """A fresh git + DVC repo at `dest` whose dvc.yaml holds `stages` (the flow's tests: a small DAG of shell
    commands, not this project's)."""
    dest.mkdir(parents=True)
    run(["git", "init", "-q"], dest)
    Repo.init(str(dest)).close()  # in process: the flow's tests make many of these
    (dest / ".dvc" / "config").write_text("[core]\n    analytics = false\n")
    (dest / "dvc.yaml").write_text(yaml.safe_dump({"stages": stages}, sort_keys=False))
    return dest


def git_status(repo: Path) -> str:
    """`git status --porcelain`: empty when every tracked file is as committed and nothing new is unignored."""
    return run(["git", "status", "--porcelain"], repo).stdout


def commit_all(repo: Path, message: str = "state") -> None:
    """Commit everything in `repo` (as a test user: CI has no git identity)."""
    run(["git", "add", "-A"], repo)
    run(["git", "-c", "user.name=test", "-c", "user.email=test@localhost", "commit", "-qm", message], repo)


def set_param(repo: Path, dotted_key: str, value) -> None:
    """Change one key of the project's params.yaml in place."""
    path = repo / "params.yaml"
    params = yaml.safe_load(path.read_text())
    *parents, last = dotted_key.split(".")
    node = params
    for key in parents:
        node = node[key]
    node[last] = value
    path.write_text(yaml.safe_dump(params, sort_keys=False, allow_unicode=True))
