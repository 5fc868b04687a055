"""dvc.yaml's code deps cover what each stage really runs: the import closure of its script inside this repo.

A module counts as its own file (`fusesoup.corpus` is fusesoup/corpus/__init__.py); a dep on a folder covers every
module below it. Imports inside functions count too (ast sees them all).
"""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("fusesoup", "stages")


def module_file(module: str) -> Path | None:
    """The repo file that `module` names, or None for a module outside the repo."""
    if module.split(".")[0] not in PACKAGES:
        return None
    base = REPO.joinpath(*module.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def imported_files(path: Path) -> set[Path]:
    """The repo files `path` imports directly (`from a import b` counts a.b when b is a module, else a)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [f"{node.module}.{alias.name}" if module_file(f"{node.module}.{alias.name}") else node.module
                     for alias in node.names]
        found.update(file for file in map(module_file, names) if file is not None)
    return found


def closure(script: Path) -> set[Path]:
    todo, seen = [script], set()
    while todo:
        path = todo.pop()
        if path not in seen:
            seen.add(path)
            todo.extend(imported_files(path) - seen)
    return seen


def stages() -> list[tuple[str, str, list[str]]]:
    """(stage name, script module, code deps) of every stage in dvc.yaml (foreach stages once, by template)."""
    rows = []
    for name, stage in yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"].items():
        body = stage.get("do", stage)
        script = re.search(r"python -m (stages\.\w+)", body["cmd"]).group(1)
        rows.append((name, script, [d for d in body.get("deps", []) if d.split("/")[0] in PACKAGES]))
    return rows


def uncovered(script: str, deps: list[str]) -> list[str]:
    covered = [REPO / dep for dep in deps]
    return sorted(str(file.relative_to(REPO)) for file in closure(module_file(script))
                  if not any(file == dep or dep in file.parents for dep in covered))


@pytest.mark.parametrize("name, script, deps", stages(), ids=[row[0] for row in stages()])
def test_every_module_a_stage_imports_is_a_dep(name, script, deps):
    missing = uncovered(script, deps)
    assert not missing, f"stage {name!r} ({script}) imports modules dvc.yaml does not list as deps: {missing}"


def test_the_closure_follows_lazy_and_package_imports():
    files = {str(f.relative_to(REPO)) for f in closure(REPO / "stages/prepare_corpus.py")}
    assert {"fusesoup/pin.py", "fusesoup/corpus/prepare.py", "fusesoup/token_bytes.py"} <= files
    assert uncovered("stages.prepare_corpus", ["stages/prepare_corpus.py"])  # a real gap is reported


def superfluous(script: str, deps: list[str]) -> list[str]:
    files = closure(module_file(script))
    return sorted(dep for dep in deps if not any(file == REPO / dep or REPO / dep in file.parents for file in files))


@pytest.mark.parametrize("name, script, deps", stages(), ids=[row[0] for row in stages()])
def test_no_stage_lists_a_module_it_does_not_import(name, script, deps):
    extra = superfluous(script, deps)
    assert not extra, f"stage {name!r} ({script}) lists deps it never imports (a change reruns it for nothing): {extra}"
