"""Profiles: overrides of params.yaml (profiles/*.yaml), applied with `python -m fusesoup.profiles PROFILE`.

A profile's mappings merge into params.yaml key by key; anything else, and an empty mapping (`bootstrap: {}`),
replaces. The result is validated before anything is written, then written atomically.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import yaml

from fusesoup.cli import run_stage
from fusesoup.params import deep_merge, parse_params, read_mapping
from fusesoup.storage import atomic_write_bytes


def with_profile(params_path: Path | str, profile_path: Path | str) -> dict:
    """params.yaml with the profile applied, validated (errors name the profile and the key)."""
    merged = deep_merge(read_mapping(params_path), read_mapping(profile_path))
    parse_params(merged, profile_path)
    return merged


def as_overrides(profile: dict, base: dict, prefix: str = "") -> list[str]:
    """The profile as `dvc exp run -S` overrides (Hydra's grammar) that turn `base` into deep_merge(base, profile):
    mappings merge key by key; a value, or a mapping where base has none, replaces (`++key=value`); an empty mapping
    empties one (`~key`, then `+key={}`), since Hydra merges a mapping given as a value."""
    overrides = []
    for key, value in profile.items():
        name, below = f"{prefix}{key}", base.get(key)
        if isinstance(value, dict) and isinstance(below, dict):
            overrides += as_overrides(value, below, f"{name}.") if value else [f"~{name}", f"+{name}={{}}"]
        else:
            overrides.append(f"++{name}={_hydra_value(value)}")
    return overrides


def _hydra_value(value) -> str:
    """A YAML value in Hydra's override grammar: quoted strings, [lists], {key: value} mappings."""
    if isinstance(value, dict):
        return "{" + ", ".join(f"{key}: {_hydra_value(item)}" for key, item in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(_hydra_value(item) for item in value) + "]"
    return json.dumps(value)  # strings double-quoted, true/false, null, numbers


def dump(params: dict) -> str:
    """params as YAML in their own key order (what with_profile returns, ready to write)."""
    return yaml.safe_dump(params, sort_keys=False, allow_unicode=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m fusesoup.profiles", description=__doc__)
    parser.add_argument("profile", help="a profile, e.g. profiles/small-real.yaml")
    parser.add_argument("--params", default="params.yaml", help="the params file to start from (default: params.yaml)")
    parser.add_argument("--out", help="where the result goes (default: over --params; '-' prints it)")
    args = parser.parse_args(argv)
    text = dump(with_profile(args.params, args.profile))
    if args.out == "-":
        print(text, end="")
        return
    out = args.out or args.params
    atomic_write_bytes(out, text.encode("utf-8"))
    print(f"{out}: {args.params} with {args.profile} applied (comments are not kept: git diff shows the change)")


if __name__ == "__main__":
    run_stage(main)
