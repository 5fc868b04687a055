"""Who reads what: dvc.yaml's `params` lists are params.STAGE_PARAMS, and train@'s run key hashes exactly the train
keys of its variant (params.train_keys). tests/test_dag.py checks on a built project that `dvc status` agrees."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from fusesoup.params import (FUSED_ONLY_TRAIN_KEYS, STAGE_PARAMS, TRAINED_VARIANTS, ContinuedTraining, load_params,
                             train_keys)
from fusesoup.train.data import run_key

REPO = Path(__file__).resolve().parents[1]


def dvc_yaml_params() -> dict[str, list[str]]:
    """Each stage's `params` as dvc.yaml writes them (foreach templates by their stage name), as `name@item` where an
    entry comes from the foreach item (`${item.params}`)."""
    lists = {}
    for name, stage in yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"].items():
        body = stage.get("do", stage)
        if "${item.params}" in body.get("params", []):
            lists.update({f"{name}@{item}": [values["params"] if key == "${item.params}" else key
                                             for key in body["params"]] for item, values in stage["foreach"].items()})
        else:
            lists[name] = body.get("params", [])
    return lists


def leaves(entries: list[str], raw: dict) -> set[str]:
    """The keys of params.yaml (`raw`) that `entries` cover: a key, or every key below a section (an empty one
    or one that names a foreach item stays as it is)."""
    covered = set()
    for entry in entries:
        node = raw
        for part in entry.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict) and node:
            covered |= leaves([f"{entry}.{key}" for key in node], raw)
        else:
            covered.add(entry)
    return covered


def test_dvc_yaml_lists_the_keys_of_the_table():
    lists, raw = dvc_yaml_params(), yaml.safe_load((REPO / "params.yaml").read_text())
    assert set(lists) == set(STAGE_PARAMS)
    for stage, keys in STAGE_PARAMS.items():
        assert len(set(keys)) == len(keys), stage
        assert leaves(lists[stage], raw) == leaves(keys, raw), stage
    assert leaves(STAGE_PARAMS["train@fused"], raw) - leaves(STAGE_PARAMS["train@clm"], raw) == {
        f"train.{key}" for key in FUSED_ONLY_TRAIN_KEYS}


def test_train_clm_reads_every_train_key_but_the_fusion_terms():
    every = [field.alias or name for name, field in ContinuedTraining.model_fields.items()]
    assert set(FUSED_ONLY_TRAIN_KEYS) < set(every)  # no typo: each names a key of params.yaml's train section
    assert train_keys("fused") == every
    assert sorted(train_keys("clm") + list(FUSED_ONLY_TRAIN_KEYS)) == sorted(every)


def another_value(value):
    """A valid value other than `value` for the train keys below (numbers, flags, fusion_loss)."""
    if isinstance(value, bool):
        return not value
    if isinstance(value, str):
        return {"ce": "kl", "ddp": "fsdp"}[value]
    if value is None:
        return 1024
    if isinstance(value, float):
        return value / 2 if value else 0.5
    return value * 2 or 1  # ints doubled: batch_tokens stays a multiple of block_size


@pytest.mark.parametrize("key", train_keys("fused"))
def test_the_run_key_of_each_variant_changes_with_the_keys_it_reads(key):
    params = load_params(REPO / "params.yaml")
    raw = params.train.model_dump(by_alias=True)
    train = ContinuedTraining.model_validate({**raw, key: another_value(raw[key])})
    changed = params.model_copy(update={"train": train})
    for variant in TRAINED_VARIANTS:
        same = run_key(variant, params, "data", {}) == run_key(variant, changed, "data", {})
        assert same == (key not in train_keys(variant)), (variant, key)
