"""The multimodal soup (SoupLM's LLaMA + Vicuna + LLaVA): a text soup written back into the multimodal ingredient's
own layout, so that it loads as its multimodal class.

Each language-model tensor of the multimodal checkpoint (`language_model.model.*`, `language_model.lm_head.*`)
gets the text soup's coefficients for its text name (`model.*`, `lm_head.*`): the alphas learned on text cover it.
A vocabulary tensor's rows beyond the text models' (e.g. LLaVA's `<image>` token) are copied from the multimodal
ingredient, as are its vision tower and projector: no text-only ingredient has them to mix with.
"""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Sequence

from fusesoup.soup.checkpoint import (INDEX_NAME, SoupError, TensorEntry, is_multimodal, language_model_names,
                                      tensor_index)
from fusesoup.soup.merge import DTYPES, MergeStep, checked_sources, write_merge


def multimodal_position(model_dirs: Sequence[Path]) -> int | None:
    """Which ingredient is multimodal (checkpoint.ingredient_indexes allows at most one), None if none is."""
    return next((position for position, d in enumerate(model_dirs) if is_multimodal(Path(d))), None)


def multimodal_plan(text_plan: Sequence[MergeStep], model_dirs: Sequence[Path]
                    ) -> tuple[list[MergeStep], list[dict[str, TensorEntry]]]:
    """The multimodal checkpoint's tensors, in its stored order and names, each with its coefficients, and where each
    ingredient holds it: language-model tensors weighted as the text soup's, the rest kept (weight 1 on the multimodal
    ingredient, which alone holds them)."""
    position = multimodal_position(model_dirs)
    if position is None:
        raise SoupError(f"soup ingredients {', '.join(map(str, model_dirs))}: none is multimodal")
    directory = Path(model_dirs[position])
    stored = tensor_index(directory)
    text_name = {key: name for name, key in language_model_names(directory, stored).items()}
    text_sources = checked_sources(text_plan, model_dirs)
    text_steps = {step.name: step for step in text_plan}
    kept = tuple(float(i == position) for i in range(len(model_dirs)))
    plan: list[MergeStep] = []
    sources: list[dict[str, TensorEntry]] = [{} for _ in model_dirs]
    for key, entry in stored.items():
        if entry.dtype not in DTYPES:
            raise SoupError(f"tensor {key} in {entry.file} is {entry.dtype}; only floating-point tensors "
                            f"({', '.join(DTYPES)}) can be written")
        name = text_name.get(key)
        if name is not None and name not in text_steps:
            raise SoupError(f"tensor {key} of {directory}'s language model ({name}) is not in the text soup's plan")
        plan.append(MergeStep(key, entry.shape, entry.dtype, text_steps[name].weights if name else kept))
        for ingredient, holds in enumerate(text_sources):
            if ingredient == position:
                sources[ingredient][key] = entry
            elif name is not None:
                sources[ingredient][key] = holds[name]
    return plan, sources


def write_multimodal_merge(text_plan: Sequence[MergeStep], model_dirs: Sequence[Path], out_dir: Path) -> list[Path]:
    """The multimodal soup in `out_dir` (empty; atomicity is the caller's, as for write_linear_merge): its weights,
    and the multimodal ingredient's other files (config, tokenizer, processor) as they are."""
    plan, sources = multimodal_plan(text_plan, model_dirs)
    files = write_merge(plan, sources, out_dir)
    ingredient = Path(model_dirs[multimodal_position(model_dirs)])
    for path in sorted(ingredient.iterdir()):
        if path.is_file() and not path.name.endswith(".safetensors") and path.name != INDEX_NAME:
            shutil.copyfile(path, Path(out_dir) / path.name)  # follows pin@'s links to the files themselves
    return files
