"""Profiles: every one validates against the schema, applies with the CLI, and `dvc repro --dry` plans its DAG."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from fusesoup.cli import run_stage
from fusesoup.params import load_params
from fusesoup.profiles import main, with_profile
from tests.dvc_project import dvc, make_project

REPO = Path(__file__).resolve().parents[1]
REAL = ["fusellm-7b", "small-real"]


@pytest.mark.parametrize("profile", sorted(p.stem for p in (REPO / "profiles").glob("*.yaml")))
def test_every_profile_is_valid(profile):
    with_profile(REPO / "params.yaml", REPO / "profiles" / f"{profile}.yaml")


def test_the_cli_writes_the_merged_params_and_refuses_a_bad_profile(tmp_path, capsys):
    out = tmp_path / "params.yaml"
    main(["profiles/fusellm-7b.yaml", "--params", str(REPO / "params.yaml"), "--out", str(out)])
    params = load_params(out)
    assert params.bootstrap == {} and params.target == "llama-2-7b"  # `bootstrap: {}` clears, it does not merge
    assert params.train.lr == 1e-5 and params.train.lam == 0.9 and params.extract.k == 10
    assert params.corpus.domain_max_bytes == {} and params.seed == 0  # untouched keys come from params.yaml
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"target": "nobody"}))
    with pytest.raises(SystemExit):
        run_stage(lambda: main([str(bad), "--params", str(REPO / "params.yaml"), "--out", str(tmp_path / "x.yaml")]))
    assert capsys.readouterr().err.startswith(f"error: {bad}: target: model 'nobody' is defined neither")
    assert not (tmp_path / "x.yaml").exists()


@pytest.mark.parametrize("profile", REAL)
def test_dvc_plans_the_real_profiles_with_a_pin_per_model_and_no_bootstrap(profile, tmp_path):
    repo = make_project(tmp_path / "project", profile)
    # --force: on a fresh workspace everything runs anyway, and plain --dry stops at the first output that does not
    # exist yet (treeverse/dvc#9021)
    planned = re.findall(r"Running stage '([^']+)'", dvc(repo, "repro", "--dry", "--force").stdout)
    params = load_params(repo / "params.yaml")
    assert not [stage for stage in planned if stage.startswith("bootstrap@")]
    assert {f"pin@{name}" for name in params.models} <= set(planned)
    assert {f"extract@{name}" for name in params.sources} | {"fuse", "train@fused", "soup", "evaluate"} <= set(planned)
    assert planned.index(f"pin@{params.target}") < planned.index("train@clm")
