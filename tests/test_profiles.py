"""Profiles: every one validates against the schema, applies with the CLI, and `dvc repro --dry` plans its DAG."""
from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from fusesoup.cli import run_stage
from fusesoup.params import load_params, parse_params, read_mapping
from fusesoup.profiles import as_overrides, main, with_profile
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


@pytest.mark.parametrize("name", ["tiny", "fusellm-7b", "small-real"])
def test_a_profile_as_experiment_overrides_gives_the_params_the_profile_gives(name, tmp_path):
    """DVC's own `dvc exp run -S` (Hydra's grammar) on params.yaml with the profile's overrides leaves exactly the
    params `with_profile` computes, empty mappings included."""
    base = read_mapping(REPO / "params.yaml")
    profile = read_mapping(REPO / "profiles" / f"{name}.yaml")
    repo = tmp_path / "repo"
    repo.mkdir()
    shutil.copyfile(REPO / "params.yaml", repo / "params.yaml")
    (repo / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"copy": {
        "cmd": "cp params.yaml applied.yaml", "params": ["seed"], "outs": ["applied.yaml"]}}}))
    for command in (["git", "init", "-q"], [sys.executable, "-m", "dvc", "init", "-q"], ["git", "add", "-A"],
                    ["git", "-c", "user.name=t", "-c", "user.email=t@localhost", "commit", "-qm", "s"]):
        subprocess.run(command, cwd=repo, check=True, capture_output=True)
    overrides = [arg for item in as_overrides(profile, base) for arg in ("-S", item)]
    done = subprocess.run([sys.executable, "-m", "dvc", "exp", "run", *overrides], cwd=repo, capture_output=True,
                          text=True)
    assert done.returncode == 0, done.stderr
    # compared as the stages read them (DVC writes 1e-05, which PyYAML reads as a string and the schema as 1e-05)
    applied = parse_params(read_mapping(repo / "applied.yaml"), "applied")
    assert applied == parse_params(with_profile(REPO / "params.yaml", REPO / "profiles" / f"{name}.yaml"), name)
