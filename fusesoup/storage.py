"""Atomic writes and validated reads: a crash never leaves a half-written file that a later stage would trust."""
from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

import polars as pl


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# mkstemp/mkdtemp create private (0600/0700) entries; outputs get the modes a plain open()/mkdir() would give.
_FILE_MODE = 0o666 & ~_current_umask()
_DIR_MODE = 0o777 & ~_current_umask()


class StorageError(RuntimeError):
    """A stored file is missing, corrupt or of the wrong schema; the message names the file."""


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path | str, data: bytes) -> None:
    """Write `data` to a temp file beside `path`, fsync it, then rename it over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.tmp-")
    try:
        with os.fdopen(fd, "wb") as handle:
            os.fchmod(handle.fileno(), _FILE_MODE)
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def write_json(path: Path | str, obj: Any) -> None:
    """Atomically write `obj` as indented, key-sorted JSON (stable bytes for DVC hashes)."""
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n").encode())


def write_csv(path: Path | str, rows: list[dict], fieldnames: list[str]) -> None:
    """The `fieldnames` columns of `rows` as a CSV table with a header line (`\n` line ends), written atomically (DVC
    plots read these)."""
    table = io.StringIO()
    writer = csv.DictWriter(table, fieldnames=fieldnames, lineterminator="\n", extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_bytes(path, table.getvalue().encode())


def read_json(path: Path | str) -> Any:
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise StorageError(f"{path}: missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise StorageError(f"{path}: not valid JSON ({error})") from None


@contextlib.contextmanager
def atomic_dir(path: Path | str) -> Iterator[Path]:
    """Build a directory in a temp sibling and swap it in only if the block finishes without error."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.tmp-"))
    os.chmod(tmp, _DIR_MODE)
    try:
        yield tmp
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_parquet(frame: pl.DataFrame, path: Path | str) -> None:
    """Atomically write a zstd-compressed Parquet file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.tmp-")
    os.close(fd)
    try:
        frame.write_parquet(tmp, compression="zstd", compression_level=9, statistics=False)
        os.chmod(tmp, _FILE_MODE)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def read_parquet(path: Path | str, schema: dict[str, pl.DataType]) -> pl.DataFrame:
    """Read a Parquet file and check that it has exactly the columns and types of `schema`."""
    path = Path(path)
    if not path.is_file():
        raise StorageError(f"{path}: missing")
    try:
        frame = pl.read_parquet(path)
    except Exception as error:  # polars raises several error types for corrupt files
        raise StorageError(f"{path}: not a readable Parquet file ({type(error).__name__}: {error})") from None
    found = dict(frame.schema)
    if found != schema:
        raise StorageError(f"{path}: schema {found} does not match the expected {schema}")
    return frame


def sha256_file(path: Path | str, chunk_bytes: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


def content_key(parts: dict) -> str:
    """sha256 of the canonical JSON of everything the stored values depend on."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def directory_fingerprint(directory: Path | str) -> dict[str, str]:
    """{relative path: sha256} of every file of a model directory (weights, config, tokenizer files)."""
    root = Path(directory)
    return {str(p.relative_to(root)): sha256_file(p) for p in sorted(root.rglob("*"))
            if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts)}
