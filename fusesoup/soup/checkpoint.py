"""What a soup reads of an ingredient: its tensors' names, shapes and dtypes from the safetensors headers, and, for a
vision-language checkpoint (LLaVA-style), its language model seen under the text model's names.

A multimodal ingredient joins a text soup through `ingredient_indexes`: each language-model tensor is listed under
the name the text model gives it (`language_model.model.layers.0...` as `model.layers.0...`), and a vocabulary
tensor with extra rows (LLaVA's `<image>` and padding tokens) is read as its first rows, those the text models
share. Its vision tower and projector are not part of the text soup; `multimodal.py` writes them back as they are.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import NamedTuple, Sequence

import torch
from safetensors import SafetensorError, safe_open

from fusesoup.errors import StageError
from fusesoup.storage import read_json

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
# The language model's names in a multimodal checkpoint -> in the text model, per known layout: what save_pretrained
# writes for LLaVA (transformers 4.x and 5.x, and the llava-hf hub checkpoints), then the in-memory layout of 4.52+.
LANGUAGE_MODEL_LAYOUTS = ({"language_model.model.": "model.", "language_model.lm_head.": "lm_head."},
                          {"model.language_model.": "model.", "lm_head.": "lm_head."})


class SoupError(StageError, ValueError):
    """Ingredients that cannot be souped together; the message names the tensor and the files."""


class TensorEntry(NamedTuple):
    """Where one tensor of an ingredient lives: its file, its name there (`key`), and the shape and dtype a soup
    reads (the first shape[0] rows where the stored tensor has more)."""

    file: Path
    shape: tuple[int, ...]
    dtype: str  # safetensors header name
    key: str


def weight_files(model_dir: Path) -> list[Path]:
    """The safetensors files of a save_pretrained directory: those its index names if sharded, else *.safetensors."""
    model_dir = Path(model_dir)
    index = model_dir / INDEX_NAME
    if index.is_file():
        content = read_json(index)
        weight_map = content.get("weight_map") if isinstance(content, dict) else None
        if not isinstance(weight_map, dict):
            raise SoupError(f"{index}: no weight_map; not a safetensors index")
        files = [model_dir / name for name in sorted(set(weight_map.values()))]
        missing = [file.name for file in files if not file.is_file()]
        if missing:
            raise SoupError(f"{index} names {', '.join(missing)}, which {model_dir} does not hold")
    else:
        files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise SoupError(f"{model_dir}: no safetensors weights (*.safetensors); save the model with save_pretrained")
    return files


def tensor_index(model_dir: Path) -> dict[str, TensorEntry]:
    """Tensor name -> entry, from the safetensors headers alone, in file order, then storage order."""
    index: dict[str, TensorEntry] = {}
    for file in weight_files(model_dir):
        try:
            with safe_open(file, framework="pt") as handle:
                for name in handle.offset_keys():
                    if name in index:
                        raise SoupError(f"tensor {name} is stored twice: in {index[name].file} and {file}")
                    view = handle.get_slice(name)
                    index[name] = TensorEntry(file, tuple(view.get_shape()), view.get_dtype(), name)
        except SafetensorError as error:
            raise SoupError(f"{file}: not a readable safetensors file ({error})") from None
    return index


def read_tensor(file: Path, name: str) -> torch.Tensor:
    """Tensor `name` as a zero-copy view of `file`'s mmap, which the view keeps alive (and closes when dropped)."""
    try:
        with safe_open(file, framework="pt") as handle:
            return handle.get_tensor(name)
    except SafetensorError as error:
        raise SoupError(f"{file}: cannot read tensor {name} ({error})") from None


def read_entry(entry: TensorEntry) -> torch.Tensor:
    """The tensor an entry describes, zero-copy: the stored one, or its first entry.shape[0] rows."""
    tensor = read_tensor(entry.file, entry.key)
    return tensor if tuple(tensor.shape) == entry.shape else tensor[: entry.shape[0]]


def compare_checkpoints(first: Path, second: Path) -> dict:
    """How many tensors of two checkpoints are bit-identical and the largest absolute difference, one tensor at a time
    (or the names in only one of them)."""
    left, right = tensor_index(first), tensor_index(second)
    if set(left) != set(right):
        return {"same_names": False, "only_in_one": sorted(set(left) ^ set(right))[:5]}
    identical, largest = 0, 0.0
    for name in left:
        x, y = read_entry(left[name]), read_entry(right[name])
        identical += torch.equal(x, y)
        largest = max(largest, (x.double() - y.double()).abs().max().item() if x.shape == y.shape else math.inf)
    return {"identical_tensors": identical, "tensors": len(left), "max_abs_diff": largest}


def config_of(model_dir: Path) -> dict:
    """config.json, or {} for a bare directory of safetensors."""
    config = Path(model_dir) / "config.json"
    return json.loads(config.read_text(encoding="utf-8")) if config.is_file() else {}


def is_multimodal(model_dir: Path) -> bool:
    """A vision-language checkpoint: its config nests the language model's (`text_config`) beside a vision model's."""
    config = config_of(model_dir)
    return isinstance(config.get("text_config"), dict) and isinstance(config.get("vision_config"), dict)


def text_model_type(model_dir: Path) -> str | None:
    """The language model's model_type (the text_config's for a multimodal checkpoint), None if no config says."""
    config = config_of(model_dir)
    return (config["text_config"] if is_multimodal(model_dir) else config).get("model_type")


def language_model_prefixes(model_dir: Path, index: dict[str, TensorEntry] | None = None) -> dict[str, str]:
    """The multimodal checkpoint's layout (stored prefix -> text prefix): the first known one that holds its
    language model's layers; SoupError naming the directory if none does."""
    index = tensor_index(model_dir) if index is None else index
    for layout in LANGUAGE_MODEL_LAYOUTS:
        body = next(stored for stored, text in layout.items() if text == "model.")
        if any(key.startswith(body) for key in index):
            return dict(layout)
    prefixes = ", ".join(sorted({key.split(".")[0] for key in index}))
    raise SoupError(f"{model_dir}: a multimodal checkpoint, but no tensors under a known language-model prefix "
                    f"({' or '.join(', '.join(layout) for layout in LANGUAGE_MODEL_LAYOUTS)}); it holds {prefixes}")


def language_model_names(model_dir: Path, index: dict[str, TensorEntry]) -> dict[str, str]:
    """The multimodal checkpoint's language-model tensors: text model name -> stored name."""
    layout = language_model_prefixes(model_dir, index)
    return {text + key[len(stored):]: key for key in index for stored, text in layout.items() if key.startswith(stored)}


def text_view(model_dir: Path, reference: dict[str, TensorEntry]) -> dict[str, TensorEntry]:
    """A multimodal checkpoint's language model as a text ingredient like `reference` (a text ingredient's index):
    its tensors under the text names, a vocabulary tensor with more rows than the reference's cut to them."""
    index = tensor_index(model_dir)
    vocab_rows = config_of(model_dir)["text_config"].get("vocab_size")
    view = {}
    for name, key in language_model_names(model_dir, index).items():
        entry, wanted = index[key], reference.get(name)
        shape = entry.shape
        if (wanted is not None and shape and shape[0] == vocab_rows and shape[0] > wanted.shape[0]
                and shape[1:] == wanted.shape[1:]):
            shape = wanted.shape  # the extra tokens of the multimodal vocabulary stay out of the text soup
        view[name] = entry._replace(shape=shape)
    return view


def ingredient_indexes(model_dirs: Sequence[Path]) -> list[dict[str, TensorEntry]]:
    """Every ingredient's tensors under the text model's names: text checkpoints as stored, at most one multimodal
    checkpoint through text_view against the first text ingredient."""
    multimodal = [Path(d) for d in model_dirs if is_multimodal(d)]
    if len(multimodal) > 1:
        raise SoupError(f"soup ingredients {', '.join(map(str, multimodal))} are all multimodal; a soup takes at most "
                        "one (its vision tower and projector are kept, not mixed)")
    text = [Path(d) for d in model_dirs if not is_multimodal(d)]
    if not text:
        raise SoupError(f"soup ingredients {', '.join(map(str, model_dirs))}: none is a text-only model; the text "
                        "soup takes its architecture from one")
    reference = tensor_index(text[0])
    return [text_view(Path(d), reference) if is_multimodal(d) else
            reference if Path(d) == text[0] else tensor_index(Path(d)) for d in model_dirs]
