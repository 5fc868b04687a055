"""One loader for every model the pipeline uses, from data/models/<name>: bootstrapped, pinned (path or hub), trained.

Weights are read as safetensors only and remote code is off unless the reference turns it on. Every problem a
user can cause (a missing directory, pickle-only weights, a vocabulary smaller than its tokenizer) is a
`ModelError`, which the stage scripts print as one line.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch
from transformers import AutoConfig, AutoTokenizer, PreTrainedConfig

if TYPE_CHECKING:  # the modelling half of transformers costs seconds to import; align and fuse never need it
    from transformers import PreTrainedModel

from fusesoup.errors import StageError
from fusesoup.params import Params, Runtime

DEFAULT_MODELS_DIR = "data/models"
# Weights that load by unpickling (code execution) or that transformers does not read: never loaded, linked or fetched.
UNSAFE_WEIGHTS = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl", "*.h5", "*.msgpack", "*.ot", "*.onnx", "*.gguf")

# Config attributes that hold the longest sequence a model accepts, most common first.
_CONTEXT_ATTRIBUTES = ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length", "n_ctx",
                       "max_sequence_length")
# Special tokens every model sequence carries around the text: BOS in front (and EOS at the end in training).
SPECIAL_TOKENS_PER_SEQUENCE = 2


class ModelError(StageError):
    """A model or tokenizer cannot be loaded or does not fit its use; the message names the model."""


def model_path(name: str, data_dir: Path | str = DEFAULT_MODELS_DIR) -> Path:
    """Where every model loads from: `<data_dir>/<name>`, written by bootstrap@, pin@ (path and hub models, linked),
    train@ or soup."""
    return Path(data_dir) / name


def resolve_device_dtype(runtime: Runtime) -> tuple[torch.device, torch.dtype]:
    """runtime.device/dtype -> torch objects; `auto` is CUDA + bfloat16 when CUDA is available, else CPU + float32."""
    if runtime.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(runtime.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ModelError(f"runtime.device is {runtime.device!r} but CUDA is not available on this machine")
    if runtime.dtype == "auto":
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    else:
        dtype = getattr(torch, runtime.dtype)
    return device, dtype


def _source(name: str, params: Params, data_dir: Path | str) -> tuple[str, dict]:
    """(location, from_pretrained kwargs shared by tokenizer, config and model), after checking the directory."""
    location = model_path(name, data_dir)
    if not location.is_dir():
        if name in params.bootstrap:
            how = f"it is built by the DVC stage bootstrap@{name}"
        elif name in params.models:
            how = f"it is linked there by the DVC stage pin@{name} (dvc repro pin@{name})"
        else:
            how = "it is neither under 'models' nor 'bootstrap' in the params, nor written by an earlier stage"
        raise ModelError(f"model {name!r}: directory {location} does not exist; {how}")
    ref = params.models.get(name)
    return str(location), {"trust_remote_code": bool(ref and ref.trust_remote_code)}


def load_from(what: str, auto_class, name: str, location: str, kwargs: dict):
    """auto_class.from_pretrained(location, **kwargs); a failure is a ModelError naming the model and the part."""
    try:
        return auto_class.from_pretrained(location, **kwargs)
    except (OSError, ValueError) as error:
        raise ModelError(f"model {name!r} ({location}): cannot load its {what}: "
                         f"{' '.join(str(error).split())}") from None


def _from_pretrained(what: str, auto_class, name: str, params: Params, data_dir: Path | str):
    return load_from(what, auto_class, name, *_source(name, params, data_dir))


def load_tokenizer(name: str, params: Params, data_dir: Path | str = DEFAULT_MODELS_DIR):
    """The tokenizer saved with model `name` (AutoTokenizer)."""
    return _from_pretrained("tokenizer", AutoTokenizer, name, params, data_dir)


def load_config(name: str, params: Params, data_dir: Path | str = DEFAULT_MODELS_DIR) -> PreTrainedConfig:
    """The model's config alone (no weights)."""
    return _from_pretrained("config", AutoConfig, name, params, data_dir)


def is_unsafe_weights(path: Path) -> bool:
    return any(path.match(pattern) for pattern in UNSAFE_WEIGHTS)


def check_safetensors(name: str, location: str | Path) -> None:
    """A local directory must hold safetensors weights: pickled .bin/.pt files are refused, not executed."""
    directory = Path(location)
    if any(directory.glob("*.safetensors")):
        return
    pickled = sorted(p.name for p in directory.iterdir() if is_unsafe_weights(p))
    found = f"found only {', '.join(pickled)}; " if pickled else ""
    raise ModelError(f"model {name!r}: {location} has no safetensors weights (*.safetensors); {found}"
                     "only safetensors are loaded: re-save the model with save_pretrained")


def stored_dtype(directory: Path | str) -> torch.dtype:
    """The dtype most of a model directory's floating-point weights are stored in (safetensors headers only)."""
    from safetensors import safe_open

    counts: dict[str, int] = {}
    for file in sorted(Path(directory).glob("*.safetensors")):
        with safe_open(file, framework="pt") as handle:
            for name in handle.keys():
                dtype = handle.get_slice(name).get_dtype()
                counts[dtype] = counts.get(dtype, 0) + 1
    floating = {"F64": torch.float64, "F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}
    found = sorted((n, d) for d, n in counts.items() if d in floating)
    if not found:
        raise ModelError(f"{directory}: no floating-point safetensors weights")
    return floating[found[-1][1]]


def load_model(name: str, params: Params, data_dir: Path | str = DEFAULT_MODELS_DIR) -> tuple[PreTrainedModel, object]:
    """(model, tokenizer) for `name`: safetensors weights in runtime's dtype, on runtime's device, in eval mode."""
    from transformers import AutoModelForCausalLM

    location, kwargs = _source(name, params, data_dir)
    check_safetensors(name, location)
    tokenizer = load_tokenizer(name, params, data_dir)
    device, dtype = resolve_device_dtype(params.runtime)
    try:
        model = AutoModelForCausalLM.from_pretrained(location, use_safetensors=True, dtype=dtype, **kwargs)
    except (OSError, ValueError) as error:
        raise ModelError(f"model {name!r} ({location}): cannot load its weights: "
                         f"{' '.join(str(error).split())}") from None
    rows = model.get_input_embeddings().weight.shape[0]
    if rows < len(tokenizer):
        raise ModelError(f"model {name!r} ({location}): the model's vocabulary has {rows} rows "
                         f"(input embeddings) but its tokenizer has {len(tokenizer)} tokens; they do not belong "
                         "together")
    model.eval()
    return model.to(device), tokenizer


def context_length(config: PreTrainedConfig) -> int:
    """The longest sequence (in tokens) the model accepts, from whichever attribute its family uses."""
    for candidate in (config, getattr(config, "text_config", None)):
        if candidate is None:
            continue
        for attribute in _CONTEXT_ATTRIBUTES:
            value = getattr(candidate, attribute, None)
            if isinstance(value, int) and value > 0:
                return value
    raise ModelError(f"{type(config).__name__} ({getattr(config, 'model_type', '?')}): no context length found "
                     f"(looked for {', '.join(_CONTEXT_ATTRIBUTES)})")
