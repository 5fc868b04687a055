"""A vision-language ingredient (a small random LLaVA built here) in a soup with text Llamas: its language model
mixed under the text names, the multimodal soup written back in its own layout and loaded as LLaVA."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import CLIPVisionConfig, LlamaConfig, LlamaForCausalLM, LlavaConfig, LlavaForConditionalGeneration

from fusesoup.soup.checkpoint import SoupError, ingredient_indexes
from fusesoup.soup.learn import learn_alphas, mapped_ingredients
from fusesoup.soup.merge import check_ingredients, plan_linear, write_linear_merge
from fusesoup.soup.multimodal import write_multimodal_merge

TEXT_VOCAB, EXTRA = 40, 2  # LLaVA adds <image> and a padding row to its language model's vocabulary
IMAGE_TOKEN = TEXT_VOCAB
PATCHES = (32 // 8) ** 2  # image features per image: 32-pixel images in 8-pixel patches


def text_config(vocab_size: int = TEXT_VOCAB, hidden_size: int = 16) -> LlamaConfig:
    return LlamaConfig(hidden_size=hidden_size, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                       num_key_value_heads=2, vocab_size=vocab_size, max_position_embeddings=64)


def llava(seed: int, hidden_size: int = 16) -> LlavaForConditionalGeneration:
    torch.manual_seed(seed)
    vision = CLIPVisionConfig(hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2,
                              image_size=32, patch_size=8)
    config = LlavaConfig(vision_config=vision, text_config=text_config(TEXT_VOCAB + EXTRA, hidden_size),
                         image_token_index=IMAGE_TOKEN, image_seq_length=PATCHES,
                         vision_feature_select_strategy="default")  # the CLS feature dropped
    return LlavaForConditionalGeneration(config).eval()


def llama(seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(text_config()).eval()


@pytest.fixture(scope="module")
def ingredients(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("multimodal")
    dirs = {"llama": root / "llama", "llava": root / "llava", "vicuna": root / "vicuna"}
    llama(0).save_pretrained(dirs["llama"])
    llava(1).save_pretrained(dirs["llava"])
    llama(2).save_pretrained(dirs["vicuna"])
    return dirs


def language_model(llava_dir: Path) -> dict[str, torch.Tensor]:
    """The LLaVA checkpoint's language-model tensors under the text names, as save_pretrained stored them."""
    stored = load_file(llava_dir / "model.safetensors")
    renames = {"language_model.model.": "model.", "language_model.lm_head.": "lm_head."}
    return {renames[prefix] + key[len(prefix):]: value for key, value in stored.items()
            for prefix in renames if key.startswith(prefix)}


def test_the_language_model_joins_the_text_soup_under_the_text_names(ingredients, tmp_path):
    dirs = [ingredients["llama"], ingredients["llava"], ingredients["vicuna"]]
    specs = check_ingredients(dirs)
    assert set(specs) == set(load_file(dirs[0] / "model.safetensors"))
    assert specs["model.embed_tokens.weight"][0] == (TEXT_VOCAB, 16)
    weights = (0.5, 0.3, 0.2)
    write_linear_merge(plan_linear(dirs, lambda name: weights), dirs, tmp_path)
    soup = load_file(tmp_path / "model.safetensors")
    a, c = load_file(dirs[0] / "model.safetensors"), load_file(dirs[2] / "model.safetensors")
    b = language_model(dirs[1])
    for name in ("model.embed_tokens.weight", "lm_head.weight", "model.layers.1.self_attn.q_proj.weight"):
        expected = 0.5 * a[name] + 0.3 * b[name][: a[name].shape[0]] + 0.2 * c[name]
        torch.testing.assert_close(soup[name], expected, rtol=0, atol=1e-6)
    text_config().save_pretrained(tmp_path)
    assert LlamaForCausalLM.from_pretrained(tmp_path).lm_head.weight.shape == (TEXT_VOCAB, 16)


def test_the_multimodal_soup_loads_as_llava_with_the_mix_in_its_language_model(ingredients, tmp_path):
    dirs = [ingredients["llama"], ingredients["llava"]]
    weights = {"model.layers.0.mlp.up_proj.weight": (1.0, 0.0)}
    coefficients = lambda name: weights.get(name, (0.25, 0.75))  # noqa: E731
    plan = plan_linear(dirs, coefficients)
    write_linear_merge(plan, dirs, tmp_path / "text")
    (tmp_path / "multimodal").mkdir()
    write_multimodal_merge(plan, dirs, tmp_path / "multimodal")
    assert json.loads((tmp_path / "multimodal/config.json").read_text())["model_type"] == "llava"

    soup = LlavaForConditionalGeneration.from_pretrained(tmp_path / "multimodal").eval()
    original = llava(1)
    text = load_file(tmp_path / "text/model.safetensors")
    mixed = {f"model.{k}": v for k, v in soup.model.language_model.state_dict().items()}
    mixed["lm_head.weight"] = soup.lm_head.weight.detach()
    for name, value in text.items():  # every language-model tensor is the text soup's, on the text rows
        assert torch.equal(mixed[name][: value.shape[0]], value), name
    assert torch.equal(mixed["model.layers.0.mlp.up_proj.weight"],
                       load_file(dirs[0] / "model.safetensors")["model.layers.0.mlp.up_proj.weight"])
    for name in ("model.embed_tokens.weight", "lm_head.weight"):  # <image> and padding rows: LLaVA's own
        own = language_model(dirs[1])[name]
        assert mixed[name].shape == own.shape and torch.equal(mixed[name][TEXT_VOCAB:], own[TEXT_VOCAB:])
    for kept, theirs in ((soup.model.vision_tower, original.model.vision_tower),
                         (soup.model.multi_modal_projector, original.model.multi_modal_projector)):
        for (name, value), (_, expected) in zip(kept.state_dict().items(), theirs.state_dict().items(), strict=True):
            assert torch.equal(value, expected), name

    ids = torch.tensor([[1] + [IMAGE_TOKEN] * PATCHES + [5, 7]])
    pixels = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    out = soup.generate(input_ids=ids, pixel_values=pixels, max_new_tokens=4, do_sample=False)
    assert out.shape == (1, ids.shape[1] + 4)


def test_alphas_learn_over_the_multimodal_language_model(ingredients):
    dirs = [ingredients["llama"], ingredients["llava"]]
    model = llama(5)
    mapped = mapped_ingredients(dirs, model, torch.device("cpu"))
    b = language_model(dirs[1])
    assert torch.equal(mapped["model.embed_tokens.weight"][1], b["model.embed_tokens.weight"][:TEXT_VOCAB])
    batch = (torch.randint(0, TEXT_VOCAB, (2, 12), generator=torch.Generator().manual_seed(0)),
             torch.ones(2, 12, dtype=torch.long))
    fit = learn_alphas(model, mapped, [batch], "model", l1=0.0, steps=3, lr=0.1)
    assert fit.log[-1]["loss"] < fit.log[0]["loss"]


def test_what_cannot_be_souped_is_named(ingredients, tmp_path):
    llava(3).save_pretrained(tmp_path / "second")
    with pytest.raises(SoupError, match="are all multimodal; a soup takes at most one"):
        ingredient_indexes([ingredients["llama"], ingredients["llava"], tmp_path / "second"])
    with pytest.raises(SoupError, match="none is a text-only model"):
        ingredient_indexes([ingredients["llava"]])
    llava(4, hidden_size=24).save_pretrained(tmp_path / "wide")
    with pytest.raises(SoupError, match=r"tensor lm_head\.weight: shape \[40, 16\] F32 in .*llama.*"
                                        r"shape \[42, 24\] F32 in .*wide"):
        check_ingredients([ingredients["llama"], tmp_path / "wide"])
    odd = tmp_path / "odd"
    odd.mkdir()
    (odd / "config.json").write_text((ingredients["llava"] / "config.json").read_text())
    save_file({key.replace("language_model.", "text_model."): value
               for key, value in load_file(ingredients["llava"] / "model.safetensors").items()}, odd / "model.safetensors")
    with pytest.raises(SoupError, match=r"odd: a multimodal checkpoint, but no tensors under a known language-model "
                                        r"prefix .*; it holds multi_modal_projector, text_model, vision_tower"):
        check_ingredients([ingredients["llama"], odd])
