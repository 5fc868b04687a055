"""A mergekit config that replays a linear soup, so anyone can redo the merge with `mergekit-yaml`.

Semantics relied on (mergekit 0.1.5: mergekit/config.py `evaluate_setting`, plan.py, merge_methods/linear.py):
- `merge_method: linear` with `normalize: false` loads every tensor in `dtype`, sums weight_i * tensor_i in
  float32 (float64 for float64) and casts the sum back to `dtype`, as `write_linear_merge` does;
- a model's `weight` given as a list of {filter, value} conditions takes the first one whose `filter` is a
  substring of the tensor name; a condition without a filter matches every tensor (the default, listed last);
- a list `value` is a gradient over a model's layers: layer i of n gets t = i / (n - 1) and the value at
  t * (len - 1), linearly interpolated, so a list of exactly n values gives layer i its own (up to rounding of t);
- tensors outside the layers (embeddings, final norm, head) are merged with t = 0, so they get scalars here.
"""
from __future__ import annotations

import re
from collections import Counter
from typing import Callable, Sequence

from fusesoup.soup.checkpoint import SoupError
from fusesoup.soup.merge import DTYPES, coefficient_vector
from fusesoup.soup.relative import Settings

# A layer tensor: `<stack>.<layer index>.<module>`, e.g. model.layers.3.self_attn.q_proj.weight.
_LAYER = re.compile(r"^(?P<stack>.+?)\.(?P<layer>\d+)\.(?P<module>.+)$")
MERGEKIT_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16"}


def _filter_groups(tensor_names: Sequence[str], num_layers: int) -> dict[str, str | list[str]]:
    """mergekit filter -> the tensor it selects (name filters) or its tensor per layer (module filters)."""
    groups: dict[str, str | list[str]] = {}
    layered: dict[str, dict[int, str]] = {}
    for name in tensor_names:
        match = _LAYER.match(name)
        if match is None:
            groups[name] = name
            continue
        by_layer = layered.setdefault(match["module"], {})
        layer = int(match["layer"])
        if layer in by_layer:
            raise SoupError(f"tensors {by_layer[layer]} and {name}: one mergekit filter ({match['module']}) "
                            "cannot tell them apart")
        by_layer[layer] = name
    for module, by_layer in layered.items():
        if sorted(by_layer) != list(range(num_layers)):
            raise SoupError(f"tensors *.{module}: found for layers {sorted(by_layer)}, but the model has "
                            f"{num_layers} layers; a mergekit gradient needs one value per layer")
        groups[module] = [by_layer[layer] for layer in range(num_layers)]
    # Longer filters first, so that one contained in another cannot catch the other's tensors.
    return dict(sorted(groups.items(), key=lambda item: -len(item[0])))


def _check_first_match(groups: dict[str, str | list[str]]) -> None:
    """Every tensor's first matching filter, in mergekit's order, must be its own group's."""
    for own, selected in groups.items():
        for name in [selected] if isinstance(selected, str) else selected:
            first = next(candidate for candidate in groups if candidate in name)
            if first != own:
                raise SoupError(f"tensor {name}: mergekit would weight it by filter {first!r}, not {own!r}")


def mergekit_config(model_refs: Sequence[str], coefficients: Callable[[str], Sequence[float]],
                    tensor_names: Sequence[str], num_layers: int, dtype: str = "F32") -> dict:
    """The mergekit YAML config (as a dict, for yaml.safe_dump) of the linear soup coefficients(tensor name).

    `dtype` is the ingredients' safetensors dtype (as `check_ingredients` reports it). Each model's weight is
    one filter per non-layer tensor (by name, a scalar), one per layer module (by module suffix, a value per
    layer) and, last, a default: the model's most frequent coefficient.
    """
    if dtype not in MERGEKIT_DTYPES:
        raise SoupError(f"dtype {dtype}: mergekit replays only {', '.join(MERGEKIT_DTYPES)}")
    if not tensor_names:
        raise SoupError("no tensors to weight in the mergekit config")
    if len(set(model_refs)) != len(model_refs):
        raise SoupError(f"models {list(model_refs)}: mergekit tells models apart by reference; one is listed twice")
    vectors = {name: coefficient_vector(name, coefficients, len(model_refs)) for name in tensor_names}
    groups = _filter_groups(tensor_names, num_layers)
    _check_first_match(groups)
    models = []
    for position, ref in enumerate(model_refs):
        conditions: list[dict] = [
            {"filter": key, "value": vectors[selected][position] if isinstance(selected, str)
             else [vectors[name][position] for name in selected]}
            for key, selected in groups.items()]
        default = Counter(vector[position] for vector in vectors.values()).most_common(1)[0][0]
        models.append({"model": ref, "parameters": {"weight": conditions + [{"value": default}]}})
    return {"merge_method": "linear", "dtype": MERGEKIT_DTYPES[dtype], "parameters": {"normalize": False},
            "models": models}


def task_vector_config(method: str, base_ref: str, model_refs: Sequence[str], weights: Sequence[float],
                       settings: Settings, dtype: str = "F32") -> dict:
    """The mergekit config of a merge relative to `base_ref` (relative.METHODS) of `model_refs` (weights w_i).
    mergekit computes these in its `dtype`; float32 with `out_dtype` the ingredients' own gives the float32
    arithmetic and final cast of task_vectors.py and sce.py. sce takes no weight and no lambda, only select_topk."""
    if dtype not in MERGEKIT_DTYPES:
        raise SoupError(f"dtype {dtype}: mergekit replays only {', '.join(MERGEKIT_DTYPES)}")
    if method == "sce":
        parameters: dict = {"select_topk": settings.select_topk}
        models: list[dict] = [{"model": ref} for ref in model_refs]
    else:
        parameters = {"normalize": method == "ties", "lambda": settings.lam}
        models = [{"model": ref, "parameters": {"weight": float(w), **(
            {"density": settings.density} if method == "ties" else {})}}
                  for ref, w in zip(model_refs, weights, strict=True)]
    accumulate = str(DTYPES[dtype][1]).removeprefix("torch.")  # what merge.py sums in
    config = {"merge_method": method, "base_model": base_ref, "dtype": accumulate, "parameters": parameters,
              "models": models}
    if MERGEKIT_DTYPES[dtype] != accumulate:
        config["out_dtype"] = MERGEKIT_DTYPES[dtype]
    return config
