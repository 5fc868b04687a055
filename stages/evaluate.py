"""DVC stage evaluate: every model on the test split, per domain and overall, and the report.

Models: each source (the teachers and the target base), target-clm, target-fused and each soup. Bits per byte for
all of them (tokenizer-independent); next-token accuracy for those on the target's tokenizer. Writes
metrics/eval.json ({"models": model -> domain -> metric, "comparisons": "A vs B" -> domain -> the bpb difference
and its paired bootstrap interval over test documents, "bootstrap": how, "missing_domains": split -> domains the
corpus has but that split lacks}), plots/eval.csv (one row per model and domain) and reports/
(report.md with PNG figures: baselines, interpolation probe, training curves, learned alphas). With
evaluate.harness_tasks, the models on the target's tokenizer also run lm-evaluation-harness into
metrics/harness.json (model -> task -> metric); without, that file is `{}` (DVC needs every declared metric).
"""
from __future__ import annotations

from pathlib import Path

import polars as pl

from fusesoup.cli import run_stage, stage_parser, torch_runtime
from fusesoup.compare import bootstrap_settings, compare, comparison_pairs, document_scores
from fusesoup.corpus import read_split
from fusesoup.evaluate import score_by_domain
from fusesoup.harness import run_harness
from fusesoup.models import load_model, model_path, resolve_device_dtype
from fusesoup.params import TRAINED_VARIANTS, load_params
from fusesoup.report import write_report
from fusesoup.storage import read_json, write_csv, write_json


def evaluate_models(locations: dict[str, str], params, corpus: str) -> tuple[dict, dict]:
    """model -> domain -> {"bpb", and "accuracy" where the model shares the target's tokenizer}, on the test split;
    and model -> domain -> each test document's (bits, bytes), for the paired comparisons."""
    test = read_split(corpus, "test")
    target_vocab, evaluation, documents = None, {}, {}
    for name, models_dir in locations.items():
        model, tokenizer = load_model(name, params, models_dir)
        if name == params.target:
            target_vocab = tokenizer.get_vocab()
        comparable = tokenizer.get_vocab() == target_vocab
        scores = score_by_domain(model, tokenizer, test, params.evaluate.batch_tokens)
        documents[name] = document_scores(test, scores)
        evaluation[name] = {domain: {"bpb": r.bpb, **({"accuracy": r.accuracy} if comparable else {})}
                            for domain, r in scores.items()}
        print(f"evaluate: {name}: test bpb " + ", ".join(f"{d} {m['bpb']:.3f}" for d, m in evaluation[name].items()),
              flush=True)
    return evaluation, documents


def harness_models(evaluation: dict, locations: dict[str, str], params, params_dir: Path) -> dict:
    """model -> task -> metric from lm-evaluation-harness for every model with next-token accuracy (those on the
    target's tokenizer); {} when evaluate.harness_tasks is empty. harness_include is relative to the params file."""
    settings = params.evaluate
    if not settings.harness_tasks:
        return {}
    include = params_dir / settings.harness_include if settings.harness_include is not None else None
    device = str(resolve_device_dtype(params.runtime)[0])
    results = {}
    for name, domains in evaluation.items():
        if any("accuracy" in metrics for metrics in domains.values()):
            results[name] = run_harness(model_path(name, locations[name]), list(settings.harness_tasks),
                                        include, settings.harness_limit, settings.harness_batch_size, device)
            print(f"evaluate: {name}: harness " + ", ".join(
                f"{task} {m['acc']:.3f}" if "acc" in m else task for task, m in results[name].items()), flush=True)
    return results


def main(argv: list[str] | None = None) -> None:
    paths = ["corpus", "models", "soups", "plots", "metrics", "report", "harness"]  # plots: reads train/, writes eval.csv
    args = stage_parser("stages.evaluate", __doc__, paths).parse_args(argv)
    params = load_params(args.params)
    torch_runtime(params)
    locations = {name: args.models for name in params.evaluated_models()}
    locations.update({soup: args.soups for soup in params.soup.soup_names()})
    evaluation, documents = evaluate_models(locations, params, args.corpus)
    soups = {soup: params.soup_ingredients() for soup in params.soup.soup_names()}
    comparisons = compare(documents, comparison_pairs(list(evaluation), params.target, soups))
    missing = read_json(Path(args.corpus) / "manifest.json")["missing_domains"]
    for domain in missing["test"]:
        print(f"evaluate: warning: domain {domain!r} has no test documents: it shaped the models but has no score",
              flush=True)
    write_json(args.metrics, {"models": evaluation, "comparisons": comparisons, "bootstrap": bootstrap_settings(),
                              "missing_domains": missing})
    rows = [{"model": model, "domain": domain, "bpb": m["bpb"], "accuracy": m.get("accuracy", "")}
            for model, domains in evaluation.items() for domain, m in domains.items()]
    write_csv(Path(args.plots) / "eval.csv", rows, ["model", "domain", "bpb", "accuracy"])
    write_json(args.harness, harness_models(evaluation, locations, params, Path(args.params).parent))

    plots = Path(args.plots)
    training = {variant: pl.read_csv(plots / "train" / f"{variant}.csv") for variant in TRAINED_VARIANTS}
    alphas = {}
    for soup in params.soup.soup_names():
        recipe = read_json(Path(args.soups) / soup / "soup.json")
        if "l1" in recipe:  # the learned ones (soup-learned has l1 0)
            alphas[soup] = {key: recipe[key] for key in ("ingredients", "granularity", "groups")}
    report = write_report(Path(args.report), evaluation, pl.read_csv(plots / "interpolation.csv"), training, alphas,
                          params.target, missing, comparisons)
    print(f"evaluate: {len(evaluation)} models; report at {report}", flush=True)


if __name__ == "__main__":
    run_stage(main)
