"""What a flow run leaves in Prefect's Artifacts tab: which stages ran and which DVC skipped, the evaluation table,
and the report with its figures. Where those files live is read from dvc.yaml (the `evaluate` stage's metrics and
outs), never restated here.
"""
from __future__ import annotations

import base64
import json
import os
import re
from pathlib import Path

from prefect.artifacts import create_markdown_artifact, create_table_artifact

REPORT_STAGE = "evaluate"
_IMAGE = re.compile(r"!\[([^\]]*)\]\(([^)\s]+\.png)\)")


def stage_outcome(lines: list[str]) -> str:
    """How `dvc repro -s` dealt with a stage, from its output: ran, skipped (unchanged) or restored (run cache)."""
    if any(line.startswith("Running stage") for line in lines):
        return "ran"
    if any("is cached - skipping run" in line for line in lines):
        return "restored from the run cache"
    return "skipped: unchanged"


def stages_markdown(done: dict[str, list[str]]) -> str:
    """A markdown table of the run's stages (completion order) and their outcome."""
    rows = [f"| {stage} | {stage_outcome(lines)} |" for stage, lines in done.items()]
    ran = sum(stage_outcome(lines) == "ran" for lines in done.values())
    return "\n".join([f"{ran} of {len(done)} stages ran; DVC skipped the rest.", "", "| stage | outcome |",
                      "|---|---|", *rows])


def metrics_table(metrics: dict) -> list[dict]:
    """{model: {domain: {metric: value}}} (metrics/harness.json, and metrics/eval.json's `models` section) as rows:
    model, then one column per domain/metric."""
    rows = []
    for model, domains in metrics.get("models", metrics).items():
        row = {"model": model}
        for domain, values in domains.items():
            row.update({f"{domain} {name}": round(value, 4) for name, value in values.items()
                        if isinstance(value, (int, float))})
        rows.append(row)
    return rows


def inline_figures(markdown: str, directory: Path) -> str:
    """The report with its PNG figures inlined as data URIs, so the Artifacts tab shows them."""
    def inline(match: re.Match) -> str:
        figure = directory / match.group(2)
        if not figure.is_file():
            return match.group(0)
        return f"![{match.group(1)}](data:image/png;base64,{base64.b64encode(figure.read_bytes()).decode()})"

    return _IMAGE.sub(inline, markdown)


def evaluation_outputs(repo_dir: str) -> tuple[list[Path], list[Path]]:
    """(metrics JSON files, markdown reports) of the project's REPORT_STAGE, as dvc.yaml declares them."""
    from dvc.repo import Repo

    with Repo(repo_dir) as repo:
        stages = [stage for stage in repo.index.stages if getattr(stage, "name", None) == REPORT_STAGE]
        outs = [out for stage in stages for out in stage.outs]
    metrics = [Path(out.fs_path) for out in outs if out.metric and out.fs_path.endswith(".json")]
    reports = [path for out in outs if not out.metric and not out.plot and Path(out.fs_path).is_dir()
               for path in sorted(Path(out.fs_path).glob("*.md"))]
    return metrics, reports


def publish(repo_dir: str, done: dict[str, list[str]]) -> list[str]:
    """Create the run's artifacts; returns their keys."""
    keys = ["fusesoup-stages"]
    create_markdown_artifact(stages_markdown(done), key=keys[0], description="stages run and skipped")
    metrics, reports = evaluation_outputs(repo_dir)
    for path in metrics:
        values = json.loads(path.read_text()) if path.is_file() else None
        if isinstance(values, dict) and values and all(isinstance(v, dict) for v in values.values()):
            key = f"fusesoup-{_slug(path.stem)}"
            create_table_artifact(metrics_table(values), key=key, description=os.path.relpath(path, repo_dir))
            keys.append(key)
    for path in reports:
        key = f"fusesoup-{_slug(path.stem)}"
        create_markdown_artifact(inline_figures(path.read_text(), path.parent), key=key,
                                 description=os.path.relpath(path, repo_dir))
        keys.append(key)
    return keys


def _slug(name: str) -> str:
    """An artifact key part: lowercase letters, digits and dashes."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
