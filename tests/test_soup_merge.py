"""The streaming linear merge (fusesoup.soup.merge) and its mergekit replay, on tiny Llama models built here."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import LlamaForCausalLM

from fusesoup.soup.checkpoint import INDEX_NAME, SoupError, tensor_index, weight_files
from fusesoup.soup.merge import check_ingredients, format_plan, plan_linear, write_linear_merge
from fusesoup.soup.mergekit import mergekit_config
from fusesoup.storage import atomic_dir
from tests.helpers import LAYERS, save_model, state_dict, tiny_config







@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ingredients")
    return {"a": save_model(root / "a", 1), "b": save_model(root / "b", 2),
            "c": save_model(root / "c", 3, max_shard_size="20KB"),  # sharded, with an index
            "a16": save_model(root / "a16", 1, torch.float16), "b16": save_model(root / "b16", 2, torch.float16),
            "abf": save_model(root / "abf", 1, torch.bfloat16), "bbf": save_model(root / "bbf", 2, torch.bfloat16),
            "wide": save_model(root / "wide", 4, intermediate_size=48)}


def per_tensor(names) -> dict[str, tuple[float, float, float]]:
    """Three coefficients that differ from tensor to tensor (one of them negative)."""
    return {name: (0.1 + 0.05 * i, 0.7 - 0.02 * i, -0.3 + 0.01 * i) for i, name in enumerate(names)}




def merge_into(directory: Path, plan, dirs, **kwargs) -> list[Path]:
    """The documented use: weights and config written inside one atomic_dir."""
    with atomic_dir(directory) as tmp:
        files = write_linear_merge(plan, dirs, tmp, **kwargs)
        tiny_config().save_pretrained(tmp)
    return [directory / file.name for file in files]


def test_merge_is_the_weighted_sum_per_tensor(models, tmp_path):
    dirs = [models["a"], models["b"], models["c"]]
    weights = per_tensor(check_ingredients(dirs))
    files = merge_into(tmp_path / "soup", plan_linear(dirs, weights.__getitem__), dirs)
    assert [file.name for file in files] == ["model.safetensors"]
    merged, inputs = load_file(files[0]), [state_dict(d) for d in dirs]
    assert set(merged) == set(inputs[0]) and len(merged) == 9 * LAYERS + 3
    for name, tensor in merged.items():
        expected = sum(w * source[name].double() for w, source in zip(weights[name], inputs))
        assert tensor.dtype == torch.float32
        torch.testing.assert_close(tensor.double(), expected, rtol=0, atol=1e-6)
    with safe_open(files[0], framework="pt") as handle:
        assert handle.metadata() == {"format": "pt"}


def test_sharded_output_loads_and_equals_the_single_file(models, tmp_path):
    dirs = [models["a"], models["c"]]
    plan = plan_linear(dirs, lambda name: (0.25, 0.75) if "mlp" in name else (0.6, 0.4))
    single = load_file(merge_into(tmp_path / "single", plan, dirs)[0])
    files = merge_into(tmp_path / "sharded", plan, dirs, shard_bytes=20_000)
    shards = [file.name for file in files if file.name != INDEX_NAME]
    assert len(shards) > 2 and shards == [f"model-{i:05d}-of-{len(shards):05d}.safetensors"
                                          for i in range(1, len(shards) + 1)]
    index = json.loads((tmp_path / "sharded" / INDEX_NAME).read_text())
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in single.values())
    assert sorted(index["weight_map"]) == sorted(single) and set(index["weight_map"].values()) == set(shards)
    loaded = LlamaForCausalLM.from_pretrained(tmp_path / "sharded").state_dict()
    assert set(loaded) == set(single)
    for name, tensor in single.items():
        assert torch.equal(loaded[name], tensor), name


def test_half_precision_ingredients_keep_their_dtype(models, tmp_path):
    for pair, dtype, header, tolerance in ((("a16", "b16"), torch.float16, "F16", 2**-10),
                                           (("abf", "bbf"), torch.bfloat16, "BF16", 2**-7)):
        dirs = [models[name] for name in pair]
        merged = load_file(merge_into(tmp_path / pair[0], plan_linear(dirs, lambda _: (0.3, 0.7)), dirs)[0])
        inputs = [state_dict(d) for d in dirs]
        assert {tensor.dtype for tensor in merged.values()} == {dtype}
        assert {entry[2] for entry in tensor_index(tmp_path / pair[0]).values()} == {header}
        for name, tensor in merged.items():
            expected = (0.3 * inputs[0][name].double() + 0.7 * inputs[1][name].double()).to(dtype)
            torch.testing.assert_close(tensor, expected, rtol=tolerance, atol=1e-7)


def test_mismatched_shapes_name_the_tensor_and_both_files(models):
    with pytest.raises(SoupError, match=r"mlp\.down_proj\.weight: shape \[32, 64\] F32 in .*/a/model\.safetensors, "
                                        r"but shape \[32, 48\] F32 in .*/wide/model\.safetensors"):
        check_ingredients([models["a"], models["wide"]])


def test_ingredients_of_different_architectures_are_refused_before_any_tensor(models, tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=100)).save_pretrained(tmp_path / "gpt2")
    with pytest.raises(SoupError, match=r"^soup ingredients .*/a \(llama\) and .*/gpt2 \(gpt2\) are different "
                                        r"architectures: a soup mixes variants of one base"):
        check_ingredients([models["a"], tmp_path / "gpt2"])


def test_missing_tensor_is_named_either_way(models, tmp_path):
    tensors = load_file(models["b"] / "model.safetensors")
    del tensors["model.norm.weight"]
    (tmp_path / "lacking").mkdir()
    save_file(tensors, tmp_path / "lacking" / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(SoupError, match=r"tensor model\.norm\.weight is in .*/a/model\.safetensors but not in "
                                        r".*/lacking$"):
        check_ingredients([models["a"], tmp_path / "lacking"])
    with pytest.raises(SoupError, match=r"tensor model\.norm\.weight is in .*/a/model\.safetensors but not in "
                                        r".*/lacking$"):
        check_ingredients([tmp_path / "lacking", models["a"]])


def test_a_directory_without_weights_is_named(tmp_path):
    with pytest.raises(SoupError, match=re.escape(f"{tmp_path}: no safetensors weights")):
        weight_files(tmp_path)


def test_bad_coefficients_name_the_tensor(models):
    dirs = [models["a"], models["b"]]
    with pytest.raises(SoupError, match=r"tensor lm_head\.weight: 1 coefficients \[0\.5\] for 2 ingredients"):
        plan_linear(dirs, lambda _: [0.5])
    with pytest.raises(SoupError, match=r"tensor model\.norm\.weight: coefficients \[nan, 0\.5\] are not all finite"):
        plan_linear(dirs, lambda name: [float("nan") if name == "model.norm.weight" else 0.5, 0.5])


def test_a_plan_must_fit_the_files_and_an_empty_directory(models, tmp_path):
    plan = plan_linear([models["a"], models["b"]], lambda _: (0.5, 0.5))
    with pytest.raises(SoupError, match=r"tensor model\.layers\.0\.mlp\.down_proj\.weight: planned as shape "
                                        r"\[32, 64\] F32, but .*/wide/model\.safetensors holds shape \[32, 48\]"):
        write_linear_merge(plan, [models["a"], models["wide"]], tmp_path / "out")
    with pytest.raises(SoupError, match="3 ingredients were given"):
        write_linear_merge(plan, [models["a"], models["b"], models["c"]], tmp_path / "out")
    assert not (tmp_path / "out").exists()
    write_linear_merge(plan, [models["a"], models["b"]], tmp_path / "out")
    with pytest.raises(SoupError, match=r"already holds weights \(model\.safetensors\)"):
        write_linear_merge(plan, [models["a"], models["b"]], tmp_path / "out")


def test_format_plan_names_every_ingredient_and_tensor(models):
    dirs = [models["a"], models["b"], models["c"]]
    plan = plan_linear(dirs, per_tensor(check_ingredients(dirs)).__getitem__)
    text = format_plan(plan, ["alpha", "beta", "gamma"])
    lines = text.splitlines()
    assert len(lines) == len(plan) + 2 and lines[0].split() == ["tensor", "shape", "dtype", "alpha", "beta", "gamma"]
    assert lines[1].split() == ["lm_head.weight", "100x32", "F32", "0.1", "0.7", "-0.3"]
    assert all(step.name in text for step in plan)
    assert lines[-1].startswith(f"{len(plan)} tensors, ") and lines[-1].endswith("ingredients: alpha, beta, gamma")


def test_mergekit_config_weights_each_layer_and_module():
    names = ["model.embed_tokens.weight", "model.layers.0.input_layernorm.weight",
             "model.layers.0.self_attn.q_proj.weight", "model.layers.1.input_layernorm.weight",
             "model.layers.1.self_attn.q_proj.weight", "model.norm.weight", "lm_head.weight"]

    def coefficients(name: str) -> tuple[float, float]:
        if "q_proj" in name:
            layer = int(name.split(".")[2])
            return 0.25 + 0.5 * layer, 0.75 - 0.5 * layer
        return {"model.embed_tokens.weight": (1.0, 0.0), "lm_head.weight": (0.0, 1.0)}.get(name, (0.5, 0.5))

    def weights(embed, q_proj, norm, head):
        return {"weight": [{"filter": "model.embed_tokens.weight", "value": embed},
                           {"filter": "self_attn.q_proj.weight", "value": q_proj},
                           {"filter": "input_layernorm.weight", "value": [0.5, 0.5]},
                           {"filter": "model.norm.weight", "value": norm},
                           {"filter": "lm_head.weight", "value": head},
                           {"value": 0.5}]}

    assert mergekit_config(["org/a", "org/b"], coefficients, names, num_layers=2, dtype="BF16") == {
        "merge_method": "linear", "dtype": "bfloat16", "parameters": {"normalize": False},
        "models": [{"model": "org/a", "parameters": weights(1.0, [0.25, 0.75], 0.5, 0.0)},
                   {"model": "org/b", "parameters": weights(0.0, [0.75, 0.25], 0.5, 1.0)}]}


def test_mergekit_config_refuses_what_it_cannot_replay():
    even = lambda _: (0.5, 0.5)  # noqa: E731
    with pytest.raises(SoupError, match=r"tensor model\.layers\.0\.attn\.weight: mergekit would weight it by filter "
                                        r"'model\.layers', not 'attn\.weight'"):
        mergekit_config(["a", "b"], even, ["model.layers", "model.layers.0.attn.weight"], num_layers=1)
    with pytest.raises(SoupError, match=r"\*\.mlp\.weight: found for layers \[0\], but the model has 2 layers"):
        mergekit_config(["a", "b"], even, ["model.layers.0.mlp.weight"], num_layers=2)
    with pytest.raises(SoupError, match="listed twice"):
        mergekit_config(["a", "a"], even, ["lm_head.weight"], num_layers=2)
    with pytest.raises(SoupError, match=r"tensor lm_head\.weight: 3 coefficients"):
        mergekit_config(["a", "b"], lambda _: (1, 2, 3), ["lm_head.weight"], num_layers=2)
