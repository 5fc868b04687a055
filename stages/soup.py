"""DVC stage soup: soups of the target's variants (SoupLM) scored on the valid split, and the interpolation probe.

Ingredients (params soup.ingredients; default the target base, target-clm and target-fused) must share one
architecture. Strategies: vanilla (uniform), greedy (an ingredient joins only if the valid score improves),
learned (alpha = softmax(logits) per model / layer / module, learned on the valid split with the ingredients
frozen) and regularized (learned + lambda * sum |alpha - 1/N| per soup.l1); opt-in, mergekit's task_arithmetic, ties
and sce relative to the first ingredient (fusesoup.soup.relative). Each soup is written by a streaming
merge of the ingredients' safetensors into data/soups/soup-<name>/ (config, tokenizer, soup.json with its alphas
and a mergekit config that replays it); metrics/soup.json holds every valid score; plots/interpolation.csv the
valid and test bits per byte along the line between the two soup.probe models. With a vision-language ingredient
(LLaVA-style) each soup also holds multimodal/: the same mix of the language model, in that ingredient's class.
"""
from __future__ import annotations

import functools
from pathlib import Path

import yaml

from fusesoup.cli import run_stage, stage_parser, torch_runtime
from fusesoup.corpus import read_split
from fusesoup.errors import StageError
from fusesoup.evaluate import bits_per_byte, encode_texts
from fusesoup.models import load_model, load_tokenizer, model_path
from fusesoup.params import load_params
from fusesoup.soup.checkpoint import language_model_prefixes
from fusesoup.soup.learn import learn_alphas, load_mix, mapped_ingredients, memory_plan, uniform
from fusesoup.soup.merge import (check_ingredients, checked_sources, plan_linear, write_linear_merge,
                                 write_merge)
from fusesoup.soup.mergekit import mergekit_config, task_vector_config
from fusesoup.soup.multimodal import multimodal_position, write_multimodal_merge
from fusesoup.soup.recipes import Kitchen, coefficients, cook, learning_batches, probe_rows
from fusesoup.soup.relative import TASK_VECTOR_METHODS, Settings, load_task_vector_merge, task_vector_combine
from fusesoup.storage import atomic_dir, write_csv, write_json


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
    args = stage_parser("stages.soup", __doc__, ["corpus", "models", "out", "metrics", "plots"]).parse_args(argv)
    params = load_params(args.params)
    torch_runtime(params)
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
    print(memory_plan(ingredients, model, params.soup.granularity, params.soup.recompute), flush=True)
    spec = params.soup
    valid = read_split(args.corpus, "valid")["text"].to_list()
    test = read_split(args.corpus, "test")["text"].to_list()
    bpb = lambda scored, texts: bits_per_byte(scored, tokenizer, texts, spec.batch_tokens).bpb  # noqa: E731
    load = lambda alphas, granularity: load_mix(model, ingredients, alphas, granularity)  # noqa: E731
    score = lambda alphas, granularity: bpb(load(alphas, granularity), valid)  # noqa: E731
    learn = lambda batches, l1: learn_alphas(model, ingredients, batches, spec.granularity, l1,  # noqa: E731
                                             spec.steps, spec.lr, spec.recompute)

    def score_merge(method: str, weights: list[float], settings: Settings) -> float:
        return bpb(load_task_vector_merge(model, directories, method, weights, settings), valid)

    @functools.cache
    def batches():
        sequences = encode_texts(tokenizer, valid)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else sequences[0][0]
        return learning_batches(sequences, pad, spec.batch_tokens, params.seed)
    own = [score(uniform([float(i == j) for j in range(len(names))]), "model") for i in range(len(names))]
    scores = cook(Kitchen(spec, names, own, score, learn, score_merge, batches))
    rows = probe_rows(spec, names, load, lambda: bpb(model, valid), lambda: bpb(model, test))

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
                settings = Settings(recipe["density"], recipe["lambda"], recipe["select_topk"])
                write_merge(plan, checked_sources(plan, directories), directory,
                            combine=task_vector_combine(recipe["method"], 0, settings))
                replay = yaml.safe_dump(task_vector_config(
                    recipe["method"], str(directories[0]), [str(d) for d in directories[1:]], recipe["weights"][1:],
                    settings, dtype=dtype), sort_keys=False)
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
