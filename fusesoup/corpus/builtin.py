"""The offline default's built-in sources: the running Python's standard library as code and as prose.

Built-in data is not user data: files that do not decode or parse are skipped and counted, never fatal.
"""
from __future__ import annotations

import ast
import contextlib
import gc
import hashlib
import os
import sysconfig
from collections import Counter
from pathlib import Path
from typing import Iterator

from fusesoup.corpus import RawDoc
from fusesoup.params import BuiltinCodeSource, BuiltinProseSource


def stdlib_files() -> list[str]:
    """Relative paths of the stdlib's .py files (site-packages excluded), shuffled by hash of the path.

    The shuffle is deterministic, and it makes a byte cap take a uniform sample rather than the
    alphabetically first modules.
    """
    root = sysconfig.get_paths()["stdlib"]
    found = []
    for folder, subdirs, names in os.walk(root):
        subdirs[:] = sorted(d for d in subdirs if d not in ("site-packages", "dist-packages", "__pycache__"))
        rel = os.path.relpath(folder, root)
        found += [Path(rel, name).as_posix() for name in names if name.endswith(".py")]
    return sorted(found, key=lambda path: hashlib.sha256(b"order:" + path.encode()).digest())


def _stdlib_texts(skipped: Counter[str]) -> Iterator[tuple[str, str]]:
    """(relative path, text) of each stdlib file; files that do not exist or decode are counted `undecodable`."""
    root = Path(sysconfig.get_paths()["stdlib"])
    for rel in stdlib_files():
        try:
            yield rel, (root / rel).read_bytes().decode("utf-8")
        except (OSError, UnicodeDecodeError):
            skipped["undecodable"] += 1


# Files whose text the prose source yields itself: pydoc_data/topics.py is a dict literal of the pydoc topic texts
# (about 0.8 MB of English), which builtin_prose yields one topic per split group; as one code file it would put
# English text in the code domain, all of it in one split.
PROSE_FILES = frozenset({"pydoc_data/topics.py"})


def iter_builtin_code(source: BuiltinCodeSource, skipped: Counter[str]) -> Iterator[RawDoc]:
    """Each stdlib .py file as one document, grouped by its path; PROSE_FILES are left to the prose source."""
    for rel, text in _stdlib_texts(skipped):
        if rel not in PROSE_FILES:
            yield RawDoc(text, source.domain, rel, rel)


_DEFS = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
_BLOCKS = (ast.stmt, ast.excepthandler, ast.match_case)  # where a def can be; expressions are not walked


def docstrings(tree: ast.AST) -> list[str]:
    """Module, class and function docstrings (cleaned) of a parsed module, in source order."""
    found, stack = [], [tree]
    while stack:  # explicit stack: deeply nested test modules would overflow recursion
        node = stack.pop()
        if isinstance(node, _DEFS) and (doc := ast.get_docstring(node, clean=True)):
            found.append(doc)
        stack.extend(reversed([child for child in ast.iter_child_nodes(node) if isinstance(child, _BLOCKS)]))
    return found


@contextlib.contextmanager
def _gc_paused() -> Iterator[None]:
    """Parsing allocates millions of acyclic AST nodes; the cycle collector's passes over them cost ~1/3 of the
    time and find nothing (refcounting frees the trees), so it is paused while one module is parsed."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def iter_builtin_prose(source: BuiltinProseSource, skipped: Counter[str]) -> Iterator[RawDoc]:
    """Per stdlib module, its docstrings joined by blank lines (grouped like the module's code), then the
    pydoc topic texts (group `pydoc_topics/<name>`)."""
    for rel, text in _stdlib_texts(skipped):
        try:
            with _gc_paused():
                found = docstrings(ast.parse(text, filename=rel))
        except (SyntaxError, ValueError, RecursionError, MemoryError):
            skipped["unparsable"] += 1
            continue
        yield RawDoc("\n\n".join(found), source.domain, rel, rel)
    try:
        from pydoc_data.topics import topics
    except ImportError:  # some distributions package pydoc_data separately
        skipped["missing"] += 1
        return
    for name in sorted(topics):
        yield RawDoc(topics[name], source.domain, f"pydoc_topics/{name}", f"pydoc_data.topics[{name!r}]")
