"""The pipeline's Markdown report: a baselines table, findings computed from the numbers, and PNG figures.

Built from what the evaluate stage holds (metrics/eval.json, plots/interpolation.csv, plots/train/<variant>.csv and
the learned soups' alphas) and swapped in as one directory, so a reader never sees half a report.
"""
from __future__ import annotations

import math
import re
from pathlib import Path

import polars as pl

from fusesoup import report_figures as figures
from fusesoup.compare import LEVEL, RESAMPLES
from fusesoup.errors import StageError
from fusesoup.params import TRAINED_MODELS
from fusesoup.storage import atomic_dir, atomic_write_bytes

EVAL_FILE = "metrics/eval.json"
INTERPOLATION_FILE = "plots/interpolation.csv"
INTERPOLATION_COLUMNS = ("alpha", "model_a", "model_b", "valid_bpb", "test_bpb")
TRAINING_COLUMNS = ("step", "loss", "clm", "fusion")
GRANULARITIES = ("module", "layer", "model")
# (metric key in eval.json, column heading, best of a column)
METRICS = (("bpb", "bpb", min), ("accuracy", "acc", max))
LEGEND = ("Lower bpb (bits per byte) is better, higher acc (next-token accuracy) is better; the best value of each "
          "column is **bold**, — means not measured. Bits per byte do not depend on the tokenizer, so teachers and "
          "targets compare fairly; accuracy is only comparable on the target's tokenizer, so only those models have it.")
CI_LEGEND = (f"Each difference is bpb(model) - bpb(other) on the same test documents, with a {LEVEL:.0%} paired "
             f"bootstrap confidence interval (CI): the resampling unit is the test document (all chunks of a document "
             f"together), {RESAMPLES} resamples with replacement, each resample's bpb its total bits / total bytes. A "
             "model beats another only when the whole interval is below zero; an interval that holds zero is a tie.")
VERDICTS = {"better": "win", "worse": "loss", "tie": "tie (CI holds 0)"}


def write_report(out_dir: Path, evaluation: dict, interpolation: pl.DataFrame,
                 training: dict[str, pl.DataFrame], alphas: dict[str, dict], target: str,
                 missing: dict[str, list[str]], comparisons: dict[str, dict[str, dict]]) -> Path:
    """Write out_dir/report.md and out_dir/figures/*.png, replacing out_dir at once; returns the report's path.

    `evaluation` is eval.json's models section; `alphas` maps a learned soup's model name to its {"ingredients",
    "granularity", "groups"} dict; `target` is the model the trained variants (params.TRAINED_MODELS) continue from;
    `missing` is eval.json's missing_domains (split -> domains the corpus has but that split lacks); `comparisons` its
    comparisons ("A vs B" -> domain -> {diff, low, high, verdict}: compare.compare), the findings' only source of wins.
    """
    _check_evaluation(evaluation)
    _check_comparisons(comparisons)
    _check_columns(interpolation, INTERPOLATION_COLUMNS, INTERPOLATION_FILE)
    for variant, frame in training.items():
        _check_columns(frame, TRAINING_COLUMNS, f"plots/train/{variant}.csv")
    for soup, soup_alphas in alphas.items():
        _check_alphas(soup, soup_alphas)

    pngs: dict[str, bytes] = {}
    lines = ["# fusesoup report", "", "## Baselines", "", LEGEND, *missing_notes(missing), "",
             *baselines_table(evaluation, target), "",
             "## Findings", "", CI_LEGEND, "", *(f"- {finding}" for finding in findings(evaluation, comparisons, target))]
    if comparisons:
        lines += ["", "## Comparisons", "", *comparisons_table(comparisons)]
    if interpolation.height:
        pngs["interpolation.png"] = figures.interpolation_png(interpolation)
        lines += _figure_section("Interpolation", "interpolation.png", (
            "Bits per byte along the straight line between two models' weights (alpha = weight of the second): a dip "
            "below both ends means a mix beats both, a bump above them is a loss barrier between the two."))
    if training:
        pngs["training.png"] = figures.training_png(training)
        lines += _figure_section("Training", "training.png", (
            "Loss per step of each variant: the total and its CLM and fusion parts (the CLM-only variant has no "
            "fusion part); curves that fall and flatten mean training converged."))
    if alphas:
        lines += ["", "## Learned soups"]
    for soup in sorted(alphas):
        png = figures.alphas_png(soup, alphas[soup])
        if png is not None:
            pngs[f"alphas-{soup}.png"] = png
        lines += _alphas_section(soup, alphas[soup], f"alphas-{soup}.png" if png is not None else None)

    with atomic_dir(out_dir) as tmp:
        for name, data in pngs.items():
            atomic_write_bytes(tmp / "figures" / name, data)
        atomic_write_bytes(tmp / "report.md", ("\n".join(lines) + "\n").encode())
    return Path(out_dir) / "report.md"


def missing_notes(missing: dict[str, list[str]]) -> list[str]:
    """A paragraph naming the domains a held-out split lacks (none when every split has every domain)."""
    why = {"test": "trained on but not scored: no column below", "valid": "the soups were tuned without it"}
    notes = [f"**Domain `{domain}` has no {split} documents**: {why[split]}."
             for split in ("test", "valid") for domain in missing.get(split, [])]
    return ["", " ".join(notes)] if notes else []


def _check_evaluation(evaluation: dict) -> None:
    for model, domains in evaluation.items():
        if not isinstance(domains, dict) or not domains:
            raise StageError(f"{EVAL_FILE}: model {model!r} has no domains")
        for domain, metrics in domains.items():
            if not isinstance(metrics, dict) or "bpb" not in metrics:
                raise StageError(f"{EVAL_FILE}: model {model!r}, domain {domain!r} has no 'bpb'")
            for metric, value in metrics.items():
                if isinstance(value, bool) or not isinstance(value, (int, float)):
                    raise StageError(f"{EVAL_FILE}: model {model!r}, domain {domain!r}: {metric!r} is {value!r}, "
                                     "not a number")


def _check_comparisons(comparisons: dict) -> None:
    for pair, domains in comparisons.items():
        for domain, interval in domains.items():
            for key in ("diff", "low", "high"):
                if not isinstance(interval.get(key), (int, float)) or isinstance(interval.get(key), bool):
                    raise StageError(f"{EVAL_FILE}: comparisons: {pair!r}, domain {domain!r}: {key!r} is "
                                     f"{interval.get(key)!r}, not a number")
            if interval.get("verdict") not in VERDICTS:
                raise StageError(f"{EVAL_FILE}: comparisons: {pair!r}, domain {domain!r}: 'verdict' is "
                                 f"{interval.get('verdict')!r}, not one of {sorted(VERDICTS)}")


def _check_columns(frame: pl.DataFrame, columns: tuple[str, ...], name: str) -> None:
    missing = [column for column in columns if column not in frame.columns]
    if missing:
        raise StageError(f"{name}: missing column(s) {', '.join(map(repr, missing))} (has {frame.columns})")


def _check_alphas(soup: str, alphas: dict) -> None:
    where = f"alphas of {soup!r}"
    if not re.fullmatch(r"[\w.-]+", soup):
        raise StageError(f"{where}: the name cannot be a figure's file name")
    for key in ("ingredients", "granularity", "groups"):
        if key not in alphas:
            raise StageError(f"{where}: missing key {key!r}")
    if alphas["granularity"] not in GRANULARITIES:
        raise StageError(f"{where}: 'granularity' is {alphas['granularity']!r}, not one of {GRANULARITIES}")
    if not alphas["ingredients"]:
        raise StageError(f"{where}: 'ingredients' is empty")
    for group, values in alphas["groups"].items():
        if len(values) != len(alphas["ingredients"]):
            raise StageError(f"{where}: group {group!r} has {len(values)} alphas for "
                             f"{len(alphas['ingredients'])} ingredients")


def model_order(models: list[str], target: str) -> list[str]:
    """Teachers, then the target and its trained variants (target-clm, target-fused), then soups."""
    targets = (target, *TRAINED_MODELS)

    def key(model: str) -> tuple:
        if model.startswith("soup-"):
            return (2, 0, model)
        if model in targets:
            return (1, targets.index(model), model)
        return (0, 0, model)
    return sorted(models, key=key)


def _domains(evaluation: dict) -> list[str]:
    """Every domain measured, `all` last."""
    found = {domain for domains in evaluation.values() for domain in domains}
    return sorted(found - {"all"}) + (["all"] if "all" in found else [])


def baselines_table(evaluation: dict, target: str) -> list[str]:
    """Markdown rows: one per model, bpb per domain then accuracy per domain, the best of each column in bold."""
    domains = _domains(evaluation)
    models = model_order(list(evaluation), target)
    columns = [(metric, heading, best, domain) for metric, heading, best in METRICS for domain in domains
               if any(metric in evaluation[model].get(domain, {}) for model in models)]
    cells = {model: [evaluation[model].get(domain, {}).get(metric) for metric, _, _, domain in columns]
             for model in models}
    bests = []
    for index, (_, _, best, _) in enumerate(columns):
        finite = [cells[model][index] for model in models
                  if cells[model][index] is not None and math.isfinite(cells[model][index])]
        bests.append(best(finite) if finite else None)
    rows = ["| model | " + " | ".join(f"{heading} {domain}" for _, heading, _, domain in columns) + " |",
            "| --- |" + " ---: |" * len(columns)]
    for model in models:
        shown = ["—" if value is None else f"**{value:.3f}**" if value == bests[i] else f"{value:.3f}"
                 for i, value in enumerate(cells[model])]
        rows.append(f"| {model} | " + " | ".join(shown) + " |")
    return rows


def _bpb(evaluation: dict, model: str, domain: str) -> float | None:
    return evaluation.get(model, {}).get(domain, {}).get("bpb")


def findings(evaluation: dict, comparisons: dict[str, dict[str, dict]], target: str) -> list[str]:
    """Sentences read off the numbers: the best `all` bpb, then each compared pair (target-fused against its baselines
    per domain, each soup against its ingredients on `all`) as a win, a loss or a tie by its bootstrap interval."""
    out = []
    overall = {model: _bpb(evaluation, model, "all") for model in model_order(list(evaluation), target)}
    overall = {model: value for model, value in overall.items() if value is not None}
    if overall:
        best = min(overall, key=overall.__getitem__)
        out.append(f"Lowest `all` bpb: {best} ({overall[best]:.3f}).")
    soups: dict[str, list[tuple[str, dict]]] = {}
    for pair, domains in comparisons.items():
        model, other = pair.split(" vs ")
        if model.startswith("soup-"):
            soups.setdefault(model, []).append((other, domains["all"]))
            continue
        for domain in _domains({model: domains}):
            out.append(f"On `{domain}`, {model} {_versus(domains[domain], other)} "
                       f"({_bpb(evaluation, model, domain):.3f} vs {_bpb(evaluation, other, domain):.3f}).")
    for soup in [model for model in overall if model in soups]:
        out.append(_soup_sentence(soup, overall[soup], soups[soup]))
    return out


def _interval(interval: dict) -> str:
    return f"CI [{interval['low']:+.4f}, {interval['high']:+.4f}]"


def _versus(interval: dict, name: str) -> str:
    gap = abs(interval["diff"])
    if interval["verdict"] == "better":
        return f"beats {name} by {gap:.4f} bpb ({_interval(interval)})"
    if interval["verdict"] == "worse":
        return f"does not beat {name}: {gap:.4f} bpb worse ({_interval(interval)})"
    return f"ties {name}: a difference of {interval['diff']:+.4f} bpb is within noise ({_interval(interval)})"


def _soup_sentence(soup: str, value: float, compared: list[tuple[str, dict]]) -> str:
    """`compared` holds (ingredient, interval of soup bpb - ingredient bpb on `all`); a win needs the verdict
    `better` (the whole interval below zero)."""
    beaten = [f"{name} by {-i['diff']:.4f} ({_interval(i)})" for name, i in compared if i["verdict"] == "better"]
    kept = [f"{name} ({i['diff']:+.4f}, {_interval(i)})" for name, i in compared if i["verdict"] != "better"]
    head = f"{soup} ({value:.3f} `all` bpb) beats"
    if not kept:
        return f"{head} every ingredient: {', '.join(beaten)}."
    if not beaten:
        return f"{head} none of its ingredients: {', '.join(kept)}."
    return f"{head} {', '.join(beaten)} but not {', '.join(kept)}."


def comparisons_table(comparisons: dict[str, dict[str, dict]]) -> list[str]:
    """Markdown rows: one per compared pair and domain, the difference, its interval and the verdict."""
    rows = [f"| model | vs | domain | bpb difference | {LEVEL:.0%} CI | verdict |",
            "| --- | --- | --- | ---: | ---: | --- |"]
    for pair, domains in comparisons.items():
        model, other = pair.split(" vs ")
        for domain in _domains({model: domains}):
            i = domains[domain]
            rows.append(f"| {model} | {other} | {domain} | {i['diff']:+.4f} | [{i['low']:+.4f}, {i['high']:+.4f}] "
                        f"| {VERDICTS[i['verdict']]} |")
    return rows


def _figure_section(title: str, name: str, caption: str) -> list[str]:
    return ["", f"## {title}", "", f"![{title}](figures/{name})", "", f"*{caption}*"]


def _alphas_section(soup: str, alphas: dict, figure: str | None) -> list[str]:
    """A learned soup's figure (if any) and a table of its groups outside the layers (embeddings, norm, lm_head)."""
    ingredients, granularity = alphas["ingredients"], alphas["granularity"]
    lines = ["", f"### {soup}", "", f"Granularity `{granularity}`, ingredients: {', '.join(ingredients)}."]
    if figure is not None:
        how = {"module": "each panel is one ingredient's alpha per module kind (row) and layer (column), on a "
                         "shared colour scale",
               "layer": "each line is one ingredient's alpha per layer",
               "model": "each bar is one ingredient's alpha for the whole model"}[granularity]
        lines += ["", f"![alphas of {soup}](figures/{figure})", "",
                  f"*Learned alphas of {soup}: {how}; a higher alpha means more of that ingredient's weights.*"]
    other = figures.split_groups(alphas["groups"]).other
    if other:
        lines += ["", "| group | " + " | ".join(ingredients) + " |", "| --- |" + " ---: |" * len(ingredients)]
        lines += [f"| `{group}` | " + " | ".join(f"{value:.3f}" for value in other[group]) + " |"
                  for group in sorted(other)]
    return lines
