"""The error every library layer raises for bad input (stages turn it into one line on stderr: cli.run_stage), and
the lookup in a method family's registry whose error for an unknown name lists the known ones."""
from __future__ import annotations

from collections.abc import Mapping
from typing import TypeVar

T = TypeVar("T")


class StageError(RuntimeError):
    """A stage cannot go on because of its input (a bad record, a missing model...); the message says where."""


def lookup(table: Mapping[str, T], name: str, family: str) -> T:
    """table[name]: one entry of a method family's registry, or a StageError that names every entry it has."""
    if name not in table:
        raise StageError(f"unknown {family} {name!r}; known: {', '.join(table)}")
    return table[name]
