"""The report's PNG figures, drawn headless on matplotlib's Agg canvas.

Fixed size and dpi, and no Software/date metadata in the PNG, so unchanged inputs give byte-identical files and
DVC sees no change.
"""
from __future__ import annotations

import io
import re
from typing import NamedTuple, Sequence

import numpy as np
import polars as pl
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

DPI = 100
# SoupLM's row order for per-module alphas; kinds not listed follow, sorted.
MODULE_ORDER = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
                "input_layernorm", "post_attention_layernorm")
_LAYER_GROUP = re.compile(r"(?:.+?\.)?layers\.(\d+)(?:\.(.+))?")


class SplitGroups(NamedTuple):
    """A soup's alpha groups: per layer ((layer, part) -> alphas; part "" for a whole layer), and the others."""

    layers: dict[tuple[int, str], list[float]]
    other: dict[str, list[float]]


def split_groups(groups: dict[str, Sequence[float]]) -> SplitGroups:
    """Split group names like `model.layers.3.self_attn.q_proj` / `model.layers.3` from `model.embed_tokens`."""
    layers: dict[tuple[int, str], list[float]] = {}
    other: dict[str, list[float]] = {}
    for name, values in groups.items():
        match = _LAYER_GROUP.fullmatch(name)
        if match:
            layers[(int(match[1]), match[2] or "")] = list(values)
        else:
            other[name] = list(values)
    return SplitGroups(layers, other)


def _figure(width: float, height: float) -> Figure:
    figure = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _png(figure: Figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=DPI, metadata={"Software": None})
    return buffer.getvalue()


def _row_of_axes(figure: Figure, count: int) -> list[Axes]:
    return list(figure.subplots(1, count, squeeze=False)[0])


def interpolation_png(frame: pl.DataFrame) -> bytes:
    """Valid and test bpb against alpha, one panel per (model_a, model_b) path."""
    pairs = sorted(set(zip(frame["model_a"].to_list(), frame["model_b"].to_list())))
    figure = _figure(5.0 * len(pairs), 4.0)
    for axes, (a, b) in zip(_row_of_axes(figure, len(pairs)), pairs):
        path = frame.filter((pl.col("model_a") == a) & (pl.col("model_b") == b)).sort("alpha")
        for split in ("valid", "test"):
            axes.plot(path["alpha"].to_numpy(), path[f"{split}_bpb"].to_numpy(), marker="o", label=f"{split} bpb")
        axes.set_xlabel(f"alpha (0 = {a}, 1 = {b})")
        axes.set_ylabel("bits per byte (lower is better)")
        axes.set_title(f"{a} → {b}")
        axes.legend()
    return _png(figure)


def training_png(training: dict[str, pl.DataFrame]) -> bytes:
    """Total, CLM, fusion, chunk and ULD loss against step, one panel per variant (a term that is all 0 or absent is
    left out)."""
    variants = sorted(training)
    figure = _figure(5.0 * len(variants), 4.0)
    for axes, variant in zip(_row_of_axes(figure, len(variants)), variants):
        frame = training[variant].sort("step")
        for column, label, style in (("loss", "total", "-"), ("clm", "clm", "--"), ("fusion", "fusion", ":"),
                                     ("chunk", "chunk", "-."), ("uld", "uld", (0, (1, 3)))):
            if column in ("loss", "clm") or (column in frame.columns and (frame[column] != 0).any()):
                axes.plot(frame["step"].to_numpy(), frame[column].to_numpy(), style, label=label)
        axes.set_xlabel("step")
        axes.set_ylabel("loss")
        axes.set_title(variant)
        axes.legend()
    return _png(figure)


def alphas_png(soup: str, alphas: dict) -> bytes | None:
    """The learned alphas of a soup as SoupLM draws them; None where there is nothing per layer to draw."""
    ingredients, granularity = alphas["ingredients"], alphas["granularity"]
    if granularity == "model":
        return _alpha_bars(soup, ingredients, alphas["groups"])
    layers = split_groups(alphas["groups"]).layers
    if not layers:
        return None
    if granularity == "layer":
        return _alpha_lines(soup, ingredients, layers)
    return _alpha_heatmaps(soup, ingredients, layers)


def _alpha_bars(soup: str, ingredients: list[str], groups: dict[str, Sequence[float]]) -> bytes:
    names = sorted(groups)
    figure = _figure(max(5.0, 1.5 * len(names) * len(ingredients)), 3.5)
    axes = figure.subplots()
    width = 0.8 / len(ingredients)
    for i, ingredient in enumerate(ingredients):
        axes.bar(np.arange(len(names)) + (i - (len(ingredients) - 1) / 2) * width,
                 [groups[name][i] for name in names], width, label=ingredient)
    axes.set_xticks(np.arange(len(names)), names)
    axes.set_ylabel("alpha")
    axes.set_title(f"{soup}: learned alphas")
    axes.legend()
    return _png(figure)


def _alpha_lines(soup: str, ingredients: list[str], layers: dict[tuple[int, str], list[float]]) -> bytes:
    figure = _figure(6.0, 4.0)
    axes = figure.subplots()
    for part in sorted({part for _, part in layers}):
        indices = sorted(layer for layer, p in layers if p == part)
        for i, ingredient in enumerate(ingredients):
            axes.plot(indices, [layers[(layer, part)][i] for layer in indices], marker="o",
                      label=f"{ingredient} ({part})" if part else ingredient)
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.set_xlabel("layer")
    axes.set_ylabel("alpha")
    axes.set_title(f"{soup}: learned alpha per layer")
    axes.legend()
    return _png(figure)


def _module_rows(parts: set[str]) -> tuple[list[str], list[str]]:
    """Parts (e.g. `self_attn.q_proj`) in SoupLM's order and their labels (the last name, unless ambiguous)."""
    last = {part: part.rsplit(".", 1)[-1] for part in parts}
    rank = {kind: i for i, kind in enumerate(MODULE_ORDER)}
    ordered = sorted(parts, key=lambda part: (rank.get(last[part], len(MODULE_ORDER)), part))
    ambiguous = {kind for kind in last.values() if list(last.values()).count(kind) > 1}
    return ordered, [part if last[part] in ambiguous else (last[part] or "(layer)") for part in ordered]


def _alpha_heatmaps(soup: str, ingredients: list[str], layers: dict[tuple[int, str], list[float]]) -> bytes:
    parts, labels = _module_rows({part for _, part in layers})
    columns = sorted({layer for layer, _ in layers})
    grid = np.full((len(ingredients), len(parts), len(columns)), np.nan)
    for (layer, part), values in layers.items():
        grid[:, parts.index(part), columns.index(layer)] = values
    figure = _figure(max(5.0, 0.4 * len(columns) + 3.0), len(ingredients) * max(2.5, 0.3 * len(parts) + 1.0))
    panels = list(figure.subplots(len(ingredients), 1, squeeze=False)[:, 0])
    for axes, ingredient, matrix in zip(panels, ingredients, grid):
        axes.imshow(matrix, aspect="auto", interpolation="nearest", cmap="viridis",
                    vmin=np.nanmin(grid), vmax=np.nanmax(grid))
        axes.set_xticks(range(len(columns)), [str(layer) for layer in columns])
        axes.set_yticks(range(len(parts)), labels)
        axes.set_xlabel("layer")
        axes.set_title(f"{soup}: alpha of {ingredient}")
    figure.colorbar(panels[0].images[0], ax=panels, label="alpha")
    return _png(figure)
