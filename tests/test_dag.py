"""End to end: the DVC DAG on the tiny profile builds every output, reruns nothing when nothing changed,
and reruns exactly the stages whose params changed."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml

from fusesoup.corpus import SPLITS, read_split
from fusesoup.params import load_params
from tests.dvc_project import dvc, make_project, set_param

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    """A tiny-profile copy of the project after one full `dvc repro`."""
    repo = make_project(tmp_path_factory.mktemp("dag") / "project")
    dvc(repo, "repro")
    return repo


def bootstrap_names(repo: Path) -> list[str]:
    return sorted(load_params(repo / "params.yaml").bootstrap)


def test_dag_has_the_contract_stage_names(built):
    dag = dvc(built, "dag", "--md").stdout
    for name in ["prepare_corpus", *(f"bootstrap@{m}" for m in bootstrap_names(built))]:
        assert name in dag


def test_repro_writes_corpus_models_and_metrics(built):
    manifest = json.loads((built / "data/corpus/manifest.json").read_text())
    for split in SPLITS:
        frame = read_split(built / "data/corpus", split)
        assert frame.height == manifest["splits"][split]["chunks"] > 0
        assert set(frame["domain"].unique()) == {"code", "prose"}
    for name in bootstrap_names(built):
        model_dir = built / "data/models" / name
        assert (model_dir / "model.safetensors").is_file()
        assert (model_dir / "tokenizer.json").is_file()
        assert not list(model_dir.glob("*.bin"))
        metrics = json.loads((built / "metrics/bootstrap" / f"{name}.json").read_text())
        for domain in ["code", "prose", "all"]:
            bpb = metrics["domains"][domain]["bpb"]
            assert math.isfinite(bpb) and 0 < bpb < 16
        assert (built / "plots/bootstrap" / f"{name}.csv").read_text().startswith("step,")


def test_second_repro_is_a_no_op(built):
    lock_before = (built / "dvc.lock").read_bytes()
    out = dvc(built, "repro").stdout
    assert "Running stage" not in out
    assert "didn't change, skipping" in out
    assert (built / "dvc.lock").read_bytes() == lock_before


def test_one_specialists_params_mark_only_its_bootstrap_stage(built):
    params_before = (built / "params.yaml").read_text()
    try:
        set_param(built, "bootstrap.code-neox.train.steps", 13)
        status = json.loads(dvc(built, "status", "--json").stdout)
        assert set(status) == {"bootstrap@code-neox"}
        # DVC 3 reports a changed param as a changed dep of params.yaml, naming the key it tracks
        assert status["bootstrap@code-neox"] == [{"changed deps": {"params.yaml": {"bootstrap.code-neox": "modified"}}}]
        dry = dvc(built, "repro", "--dry").stdout
        assert "Running stage 'bootstrap@code-neox'" in dry
        for other in ["prepare_corpus", "bootstrap@target-base", "bootstrap@prose-gpt2"]:
            assert f"Running stage '{other}'" not in dry
    finally:
        (built / "params.yaml").write_text(params_before)
    assert json.loads(dvc(built, "status", "--json").stdout) == {}


def test_corpus_params_mark_the_corpus_stage(built):
    params_before = (built / "params.yaml").read_text()
    try:
        set_param(built, "corpus.max_chunk_bytes", 390)
        status = json.loads(dvc(built, "status", "--json").stdout)
        assert set(status) == {"prepare_corpus"}
        dry = dvc(built, "repro", "--dry").stdout
        assert "Running stage 'prepare_corpus'" in dry
    finally:
        (built / "params.yaml").write_text(params_before)


def test_a_bad_param_stops_the_stage_with_one_line(built, tmp_path):
    repo = make_project(tmp_path / "bad")
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["corpus"]["max_chunk_bytes"] = -1
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    done = dvc(repo, "repro", "-s", "prepare_corpus", check=False)
    assert done.returncode != 0
    assert "error: params.yaml: corpus.max_chunk_bytes: Input should be greater than 0, got -1" in done.stderr + done.stdout
    assert not (repo / "data/corpus").exists()


@pytest.mark.usefixtures("prefect_api")
def test_the_prefect_flow_leaves_the_same_dvc_lock_as_dvc_repro(built, tmp_path):
    from flows.pipeline import pipeline
    from fusesoup.params import Flow

    repo = make_project(tmp_path / "flow")
    ran = pipeline(str(repo), Flow(retries=0, max_parallel=2))
    assert sorted(ran) == sorted(["prepare_corpus", *(f"bootstrap@{m}" for m in bootstrap_names(repo))])
    assert list(ran)[0] == "prepare_corpus"
    assert (repo / "dvc.lock").read_text() == (built / "dvc.lock").read_text()
