"""Streaming linear merge of safetensors checkpoints: a plan from the headers, then one tensor at a time to disk.

Planning reads headers only. Merging reads each ingredient's tensor as a zero-copy view of the file's mmap
(safetensors' `get_tensor`) and drops it once the tensor is merged: a live mapping keeps every page it touched in
the process's RSS. Each merged tensor goes straight into its output shard, whose header is known from the plan,
so peak memory is one tensor per ingredient plus the merged one, whatever the model or shard size.
"""
from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch

from fusesoup.soup.checkpoint import (INDEX_NAME, SINGLE_NAME, SoupError, TensorEntry, ingredient_indexes, read_entry,
                                      text_model_type)
from fusesoup.storage import write_json

# Soupable dtypes by safetensors header name -> (stored dtype, dtype the weighted sum accumulates in).
DTYPES = {"F64": (torch.float64, torch.float64), "F32": (torch.float32, torch.float32),
          "F16": (torch.float16, torch.float32), "BF16": (torch.bfloat16, torch.float32)}
# Elements summed per step: 128 KiB of float32 accumulator, and no more than torch's grain size (32768), under
# which an element-wise op does not start its thread pool.
BLOCK = 32768


@dataclass(frozen=True)
class MergeStep:
    """One output tensor: name, shape, dtype (safetensors header name) and one coefficient per ingredient."""
    name: str
    shape: tuple[int, ...]
    dtype: str
    weights: tuple[float, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * DTYPES[self.dtype][0].itemsize


def _describe(shape: tuple[int, ...], dtype: str) -> str:
    return f"shape {list(shape)} {dtype}"


Combine = Callable[[MergeStep, Sequence[dict[str, TensorEntry]]], torch.Tensor]  # one output tensor


def check_ingredients(model_dirs: Sequence[Path]) -> dict[str, tuple[tuple[int, ...], str]]:
    """Name -> (shape, dtype) shared by all ingredients, in the first one's order (a multimodal ingredient's language
    model under the text names: checkpoint.ingredient_indexes); SoupError at the first difference (of architecture,
    from config.json, before any tensor)."""
    if not model_dirs:
        raise SoupError("no ingredients to soup")
    first_dir = Path(model_dirs[0])
    indexes = ingredient_indexes(model_dirs)
    first = indexes[0]
    for other_dir, other in zip(map(Path, model_dirs[1:]), indexes[1:]):
        kinds = text_model_type(first_dir), text_model_type(other_dir)
        if None not in kinds and kinds[0] != kinds[1]:
            raise SoupError(f"soup ingredients {first_dir} ({kinds[0]}) and {other_dir} ({kinds[1]}) are different "
                            "architectures: a soup mixes variants of one base; give soup.ingredients of one architecture")
        for name, entry in first.items():
            if name not in other:
                raise SoupError(f"tensor {name} is in {entry.file} but not in {other_dir}")
            theirs = other[name]
            if (theirs.shape, theirs.dtype) != (entry.shape, entry.dtype):
                raise SoupError(f"tensor {name}: {_describe(entry.shape, entry.dtype)} in {entry.file}, but "
                                f"{_describe(theirs.shape, theirs.dtype)} in {theirs.file}")
        extra = next((name for name in other if name not in first), None)
        if extra is not None:
            raise SoupError(f"tensor {extra} is in {other[extra].file} but not in {first_dir}")
    return {name: (entry.shape, entry.dtype) for name, entry in first.items()}


def coefficient_vector(name: str, coefficients: Callable[[str], Sequence[float]], count: int) -> tuple[float, ...]:
    """coefficients(name) as floats, checked: one finite coefficient per ingredient."""
    vector = tuple(float(weight) for weight in coefficients(name))
    if len(vector) != count:
        raise SoupError(f"tensor {name}: {len(vector)} coefficients {list(vector)} for {count} ingredients")
    if not all(math.isfinite(weight) for weight in vector):
        raise SoupError(f"tensor {name}: coefficients {list(vector)} are not all finite")
    return vector


def plan_linear(model_dirs: Sequence[Path], coefficients: Callable[[str], Sequence[float]]) -> list[MergeStep]:
    """One MergeStep per tensor, in the first ingredient's order, weighted by coefficients(tensor name)."""
    plan = []
    for name, (shape, dtype) in check_ingredients(model_dirs).items():
        if dtype not in DTYPES:
            raise SoupError(f"tensor {name} in {model_dirs[0]} is {dtype}; only floating-point tensors "
                            f"({', '.join(DTYPES)}) can be souped")
        plan.append(MergeStep(name, shape, dtype, coefficient_vector(name, coefficients, len(model_dirs))))
    return plan


def format_plan(plan: Sequence[MergeStep], names: Sequence[str]) -> str:
    """The plan as a printable table: a line per tensor with shape, dtype and each ingredient's coefficient."""
    if any(len(step.weights) != len(names) for step in plan):
        raise SoupError(f"the plan has {len(plan[0].weights)} coefficients per tensor, but {len(names)} names")
    rows = [("tensor", "shape", "dtype", *names)]
    rows += [(step.name, "x".join(map(str, step.shape)) or "scalar", step.dtype,
              *(f"{weight:.6g}" for weight in step.weights)) for step in plan]
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows]
    parameters = sum(math.prod(step.shape) for step in plan)
    lines.append(f"{len(plan)} tensors, {parameters:,} parameters, {sum(s.nbytes for s in plan) / 1e9:.3f} GB; "
                 f"linear soup of {len(names)} ingredients: {', '.join(names)}")
    return "\n".join(lines)


def checked_sources(plan: Sequence[MergeStep], model_dirs: Sequence[Path]) -> list[dict[str, TensorEntry]]:
    """Each ingredient's entry per tensor, after checking that the files still hold what the plan expects."""
    if any(len(step.weights) != len(model_dirs) for step in plan):
        raise SoupError(f"the plan has {len(plan[0].weights)} coefficients per tensor, but {len(model_dirs)} "
                        "ingredients were given")
    sources = ingredient_indexes(model_dirs)
    for model_dir, index in zip(model_dirs, sources):
        for step in plan:
            if step.name not in index:
                raise SoupError(f"tensor {step.name} is in the plan but not in {model_dir}")
            entry = index[step.name]
            if (entry.shape, entry.dtype) != (step.shape, step.dtype):
                raise SoupError(f"tensor {step.name}: planned as {_describe(step.shape, step.dtype)}, but "
                                f"{entry.file} holds {_describe(entry.shape, entry.dtype)}")
    return sources


def _shards(plan: Sequence[MergeStep], shard_bytes: int) -> list[list[MergeStep]]:
    """The plan cut, in order, into shards of at most shard_bytes (a larger tensor gets a shard of its own)."""
    shards: list[list[MergeStep]] = []
    size = 0
    for step in plan:
        if not shards or size + step.nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(step)
        size += step.nbytes
    return shards


def linear_combine(step: MergeStep, sources: Sequence[dict[str, TensorEntry]]) -> torch.Tensor:
    """sum_i w_i * t_i accumulated in float32 (float64 for F64) and cast back to the tensor's dtype.

    An ingredient without the tensor must have weight 0. Where the ingredients' tensors hold fewer rows than the
    step (the text models' vocabulary inside a multimodal one's), those rows are mixed and the rest are copied from
    the one ingredient that holds them all. The sum runs over blocks of BLOCK elements: the accumulator stays in
    cache, each step is one pass over each ingredient, and ops this small run on the calling thread (a 2-thread
    pool on a busy machine stalls for seconds). Same float32 operations as mergekit's linear merge: its outputs
    were bit-identical in bench/soup.py.
    """
    stored, accumulate = DTYPES[step.dtype]
    terms = []
    for position, (entries, weight) in enumerate(zip(sources, step.weights)):
        if step.name in entries:
            terms.append((read_entry(entries[step.name]).reshape(-1), weight))
        elif weight != 0.0:
            raise SoupError(f"tensor {step.name}: ingredient {position} lacks it but has weight {weight}")
    out = torch.empty(math.prod(step.shape), dtype=stored)
    mixed = min(tensor.numel() for tensor, _ in terms)
    if mixed < out.numel():
        out[mixed:].copy_(next(tensor for tensor, _ in terms if tensor.numel() == out.numel())[mixed:])
    buffer = torch.empty(min(BLOCK, mixed), dtype=accumulate)
    for start in range(0, mixed, BLOCK):
        stop = min(start + BLOCK, mixed)
        total = buffer[: stop - start]
        total.copy_(terms[0][0][start:stop]).mul_(terms[0][1])
        for tensor, weight in terms[1:]:
            total.add_(tensor[start:stop], alpha=weight)
        out[start:stop].copy_(total)
    return out


def _write_shard(path: Path, steps: Sequence[MergeStep], sources: Sequence[dict[str, TensorEntry]],
                 combine: Combine) -> None:
    """One safetensors file: the header (offsets known from the plan), then each tensor as soon as it is merged."""
    # Widest items first, as safetensors orders its own files: every tensor then starts aligned to its item size.
    steps = sorted(steps, key=lambda step: -DTYPES[step.dtype][0].itemsize)
    header: dict[str, dict] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for step in steps:
        header[step.name] = {"dtype": step.dtype, "shape": list(step.shape),
                             "data_offsets": [offset, offset + step.nbytes]}
        offset += step.nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the data then starts 8-byte aligned
    with open(path, "xb") as handle:
        handle.write(struct.pack("<Q", len(encoded)) + encoded)
        for step in steps:
            handle.write(combine(step, sources).reshape(-1).view(torch.uint8).numpy())
        handle.flush()
        os.fsync(handle.fileno())


def write_linear_merge(plan: Sequence[MergeStep], model_dirs: Sequence[Path], out_dir: Path,
                       shard_bytes: int = 2 * 1024**3) -> list[Path]:
    """Stream the soup's weights into `out_dir` as `from_pretrained` reads them; returns the files written.

    One shard is `model.safetensors`; several are `model-0000i-of-0000n.safetensors` plus
    `model.safetensors.index.json`. Atomicity is the caller's: `out_dir` is the temporary directory of an
    `atomic_dir` it holds (config and tokenizer saved beside the weights), so a failed merge leaves nothing behind.
    A directory that already holds weights is refused, so stale shards can never mix in.
    """
    return write_merge(plan, checked_sources(plan, model_dirs), out_dir, shard_bytes)


def write_merge(plan: Sequence[MergeStep], sources: Sequence[dict[str, TensorEntry]], out_dir: Path,
                shard_bytes: int = 2 * 1024**3, combine: Combine = linear_combine) -> list[Path]:
    """write_linear_merge over checked `sources` (per ingredient, step name -> where that ingredient holds it), each
    tensor made by `combine(step, sources)` (linear by default; task_vectors.py's merges relative to a base)."""
    out_dir = Path(out_dir)
    if not plan:
        raise SoupError(f"nothing to merge into {out_dir}: the plan is empty")
    stale = sorted(path.name for path in out_dir.glob("*.safetensors*"))
    if stale:
        raise SoupError(f"{out_dir} already holds weights ({', '.join(stale)}); merge into an empty directory")
    shards = _shards(plan, shard_bytes)
    names = [SINGLE_NAME] if len(shards) == 1 else [
        f"model-{number:05d}-of-{len(shards):05d}.safetensors" for number in range(1, len(shards) + 1)]
    out_dir.mkdir(parents=True, exist_ok=True)
    files = []
    for name, steps in zip(names, shards):
        files.append(out_dir / name)
        _write_shard(files[-1], steps, sources, combine)
    if len(shards) > 1:
        weight_map = {step.name: name for name, steps in zip(names, shards) for step in steps}
        write_json(out_dir / INDEX_NAME, {"metadata": {"total_size": sum(step.nbytes for step in plan)},
                                          "weight_map": weight_map})
        files.append(out_dir / INDEX_NAME)
    return files
