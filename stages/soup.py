"""DVC stage soup: soups of the target's variants (SoupLM) scored on the valid split, and the interpolation probe.

Ingredients (params soup.ingredients; default the target base, target-clm and target-fused) must share one
architecture. Strategies: vanilla (uniform), greedy (an ingredient joins only if the valid score improves),
learned (alpha = softmax(logits) per model / layer / module, learned on the valid split with the ingredients
frozen) and regularized (learned + lambda * sum |alpha - 1/N| per soup.l1). Each soup is written by a streaming
merge of the ingredients' safetensors into data/soups/soup-<name>/ (config, tokenizer, soup.json with its alphas
and a mergekit config that replays it); metrics/soup.json holds every valid score; plots/interpolation.csv the
valid and test bits per byte along the line between the two soup.probe models. With a vision-language ingredient
(LLaVA-style) each soup also holds multimodal/: the same mix of the language model, in that ingredient's class.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
import yaml

from fusesoup.cli import StageError, run_stage
from fusesoup.corpus import read_split
from fusesoup.evaluate import bits_per_byte, encode_texts, pad_batch, plan_batches
from fusesoup.models import load_model, load_tokenizer, model_path
from fusesoup.params import Params, load_params
from fusesoup.soup.learn import (greedy_soup, group_of, learn_alphas, load_mix, mapped_ingredients, memory_plan,
                                 uniform)
from fusesoup.soup.checkpoint import SoupError, language_model_prefixes
from fusesoup.soup.merge import (check_ingredients, checked_sources, plan_linear, write_linear_merge,
                                 write_merge)
from fusesoup.soup.mergekit import mergekit_config, task_vector_config
from fusesoup.soup.multimodal import multimodal_position, write_multimodal_merge
from fusesoup.soup.task_vectors import TASK_VECTOR_METHODS, load_task_vector_merge, task_vector_combine
from fusesoup.storage import atomic_dir, write_csv, write_json


def recipes(params: Params, names: list[str], tokenizer, valid: list[str], learn, score, score_merge
            ) -> dict[str, dict]:
    """Every soup the params ask for: name -> {"granularity", "groups" (group -> alpha per ingredient), "valid_bpb"},
    or for a merge relative to the first ingredient {"method", "weights", "density", "lambda", "valid_bpb"}.
    `score(alphas, granularity)` is the valid bpb of a soup; `learn(batches, l1)` fits one (learn_alphas);
    `score_merge(method, weights, lam)` the valid bpb of a task_arithmetic or ties merge."""
    spec, count = params.soup, len(names)
    own = [score(uniform([float(i == j) for j in range(count)]), "model") for i in range(count)]
    soups = {}
    if "vanilla" in spec.strategies:
        weights = [1.0 / count] * count
        soups["soup-vanilla"] = {"granularity": "model", "groups": {"model": weights},
                                 "valid_bpb": score(uniform(weights), "model")}
    if "greedy" in spec.strategies:
        weights, best = greedy_soup(own, lambda members: score(uniform(members), "model"))
        soups["soup-greedy"] = {"granularity": "model", "groups": {"model": weights}, "valid_bpb": best}
    learned = [("soup-learned", 0.0)] if "learned" in spec.strategies else []
    learned += [(f"soup-l1-{lam:g}", lam) for lam in spec.l1] if "regularized" in spec.strategies else []
    if learned:
        sequences = encode_texts(tokenizer, valid)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else sequences[0][0]
        batches = [pad_batch([sequences[i] for i in batch], pad)
                   for batch in plan_batches([len(s) for s in sequences], spec.batch_tokens)]
        order = np.random.default_rng(params.seed).permutation(len(batches))
        batches = [batches[i] for i in order]
    for name, lam in learned:
        fit = learn(batches, lam)
        alphas = {group: torch.tensor(alpha) for group, alpha in fit.alphas.items()}
        soups[name] = {"granularity": spec.granularity, "groups": fit.alphas, "l1": lam,
                       "valid_bpb": score(alphas, spec.granularity), "loss": [row["loss"] for row in fit.log]}
    vectors = spec.task_vectors
    weights = [0.0] + [vectors.weight] * (count - 1)  # the first ingredient is the base
    for method in (m for m in TASK_VECTOR_METHODS if m in spec.strategies):
        trials = {lam: score_merge(method, weights, lam) for lam in vectors.lambdas}
        best = min(trials, key=trials.get)
        soups[f"soup-{method}"] = {"method": method, "base": names[0], "weights": weights,
                                   "density": vectors.density if method == "ties" else 1.0, "lambda": best,
                                   "valid_bpb": trials[best], "valid_bpb_by_lambda": trials}
    return {"ingredients": dict(zip(names, own)), "soups": soups}


def probe_rows(params: Params, names, load, model, tokenizer, valid: list[str], test: list[str]) -> list[dict]:
    """Valid and test bits per byte at soup.probe.points evenly spaced points from probe model a to model b;
    `load(alphas, granularity)` gives `model` a soup's weights."""
    first, second = (names.index(name) for name in params.soup.probe.between)
    rows = []
    for alpha in np.linspace(0.0, 1.0, params.soup.probe.points).round(6).tolist():
        weights = [0.0] * len(names)
        weights[first], weights[second] = 1.0 - alpha, alpha
        load(uniform(weights), "model")
        rows.append({"alpha": alpha, "model_a": names[first], "model_b": names[second],
                     "valid_bpb": bits_per_byte(model, tokenizer, valid, params.soup.batch_tokens).bpb,
                     "test_bpb": bits_per_byte(model, tokenizer, test, params.soup.batch_tokens).bpb})
    return rows


def coefficients(recipe: dict):
    """tensor name -> alpha per ingredient, from a recipe's groups."""
    def lookup(tensor: str) -> list[float]:
        group = group_of(tensor, recipe["granularity"])
        if group not in recipe["groups"]:
            raise SoupError(f"tensor {tensor!r}: no learned alpha for its group {group!r} (it is not a parameter of "
                            "the loaded model)")
        return recipe["groups"][group]
    return lookup


NO_MERGEKIT_REPLAY = """\
# No mergekit replay: ingredient {0!r} is a vision-language checkpoint, and mergekit (0.1.5 and its
# architecture list) has no LLaVA-style architecture, nor a way to read one model's tensors under another's names.
# The text soup here is the linear merge of soup.json's coefficients over the ingredients' language models; the
# multimodal soup in multimodal/ is the same mix written back under the multimodal names.
"""


def check_same_tokens(text: str, vocab: dict[str, int], name: str, other: dict[str, int], extra_allowed: bool) -> None:
    """A soup mixes weights token by token: every ingredient must give each token the text model's id; a multimodal
    ingredient may add tokens of its own (LLaVA's <image>) after them."""
    same = other == vocab or (extra_allowed and all(other.get(token) == index for token, index in vocab.items()))
    if not same:
        kind = "do not give the text tokens the same ids" if extra_allowed else "have different tokenizers"
        raise StageError(f"soup ingredients {text!r} and {name!r} {kind}; a soup mixes weights token by token, so "
                         "they must share one")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m stages.soup", description=__doc__)
    parser.add_argument("--params", default="params.yaml", help="the params file (default: params.yaml)")
    parser.add_argument("--corpus", default="data/corpus", help="the corpus directory (default: data/corpus)")
    parser.add_argument("--models", default="data/models", help="where models live (default: data/models)")
    parser.add_argument("--out", default="data/soups", help="where the soups go (default: data/soups)")
    parser.add_argument("--metrics", default="metrics/soup.json", help="valid scores (default: metrics/soup.json)")
    parser.add_argument("--plots", default="plots/interpolation.csv", help="the probe (default: plots/interpolation.csv)")
    args = parser.parse_args(argv)
    params = load_params(args.params)
    torch.manual_seed(params.seed)
    if params.runtime.threads:
        torch.set_num_threads(params.runtime.threads)
    names = params.soup_ingredients()
    directories = [model_path(name, args.models) for name in names]
    dtype = next(iter(check_ingredients(directories).values()))[1]  # shapes, dtypes and names checked first
    multimodal = multimodal_position(directories)
    if multimodal is not None and set(TASK_VECTOR_METHODS) & set(params.soup.strategies):
        raise StageError(f"{args.params}: soup.strategies {', '.join(TASK_VECTOR_METHODS)} do not take a multimodal "
                         f"ingredient ({names[multimodal]!r}); the linear strategies do")
    text = next(name for position, name in enumerate(names) if position != multimodal)
    model, tokenizer = load_model(text, params, args.models)  # the working model: architecture, buffers, dtype
    for position, name in enumerate(names):
        check_same_tokens(text, tokenizer.get_vocab(), name, load_tokenizer(name, params, args.models).get_vocab(),
                          extra_allowed=position == multimodal)
    ingredients = mapped_ingredients(directories, model, next(model.parameters()).device)
    print(memory_plan(ingredients, model, params.soup.granularity), flush=True)
    valid = read_split(args.corpus, "valid")["text"].to_list()
    test = read_split(args.corpus, "test")["text"].to_list()
    load = lambda alphas, granularity: load_mix(model, ingredients, alphas, granularity)  # noqa: E731
    score = lambda alphas, granularity: bits_per_byte(load(alphas, granularity), tokenizer, valid,  # noqa: E731
                                                      params.soup.batch_tokens).bpb
    learn = lambda batches, l1: learn_alphas(model, ingredients, batches, params.soup.granularity, l1,  # noqa: E731
                                             params.soup.steps, params.soup.lr)
    density = params.soup.task_vectors.density

    def score_merge(method: str, weights: list[float], lam: float) -> float:
        merged = load_task_vector_merge(model, directories, method, weights, density if method == "ties" else 1.0, lam)
        return bits_per_byte(merged, tokenizer, valid, params.soup.batch_tokens).bpb
    scores = recipes(params, names, tokenizer, valid, learn, score, score_merge)
    rows = probe_rows(params, names, load, model, tokenizer, valid, test)

    num_layers = getattr(model.config, "num_hidden_layers", 0)
    with atomic_dir(args.out) as tmp:
        for soup, recipe in scores["soups"].items():
            directory = Path(tmp) / soup
            directory.mkdir()
            extra = {}
            model.config.save_pretrained(directory)
            tokenizer.save_pretrained(directory)
            if "method" in recipe:  # relative to the first ingredient: mergekit replays its own method
                plan = plan_linear(directories, lambda _: recipe["weights"])
                write_merge(plan, checked_sources(plan, directories), directory, combine=task_vector_combine(
                    recipe["method"], 0, recipe["density"], recipe["lambda"]))
                replay = yaml.safe_dump(task_vector_config(
                    recipe["method"], str(directories[0]), [str(d) for d in directories[1:]], recipe["weights"][1:],
                    recipe["density"], recipe["lambda"], dtype=dtype), sort_keys=False)
            else:
                plan = plan_linear(directories, coefficients(recipe))
                write_linear_merge(plan, directories, directory)
                replay = NO_MERGEKIT_REPLAY.format(names[multimodal]) if multimodal is not None else yaml.safe_dump(
                    mergekit_config([str(d) for d in directories], coefficients(recipe), [step.name for step in plan],
                                    num_layers, dtype=dtype), sort_keys=False)
            (directory / "mergekit.yaml").write_text(replay)
            if multimodal is not None:  # linear strategies only (checked above)
                (directory / "multimodal").mkdir()
                write_multimodal_merge(plan, directories, directory / "multimodal")
                extra["multimodal"] = {"ingredient": names[multimodal], "directory": "multimodal",
                                       "language_model": language_model_prefixes(directories[multimodal])}
            write_json(directory / "soup.json", {"ingredients": names, **recipe, **extra})
    write_json(args.metrics, {"ingredients": scores["ingredients"],
                              "soups": {soup: {"valid_bpb": r["valid_bpb"]} for soup, r in scores["soups"].items()}})
    write_csv(args.plots, rows, list(rows[0]))
    best = min(scores["soups"].items(), key=lambda item: item[1]["valid_bpb"])
    print(f"soup: {len(scores['soups'])} soups of {', '.join(names)}; valid bpb " +
          ", ".join(f"{n} {b:.3f}" for n, b in {**scores["ingredients"],
                                                 **{s: r["valid_bpb"] for s, r in scores["soups"].items()}}.items())
          + f"; best soup {best[0]}", flush=True)


if __name__ == "__main__":
    run_stage(main)
