"""Profiles: overrides of params.yaml (profiles/*.yaml), applied with `python -m fusesoup.profiles PROFILE`.

A profile's mappings merge into params.yaml key by key; anything else, and an empty mapping (`bootstrap: {}`),
replaces. The result is validated before anything is written, then written atomically.
"""
from __future__ import annotations

import argparse
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
