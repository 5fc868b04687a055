"""One loader for every model reference in params.yaml: bootstrapped, local path or hub id.

Weights are read as safetensors only and remote code is off unless the reference turns it on. Every problem a
user can cause (a missing directory, pickle-only weights, a vocabulary smaller than its tokenizer) is a
`ModelError`, which the stage scripts print as one line.
"""
from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedConfig, PreTrainedModel

from fusesoup.cli import StageError
from fusesoup.corpus import TokenLimit
from fusesoup.params import BootstrapRef, HubRef, ModelRef, Params, PathRef, Runtime

DEFAULT_MODELS_DIR = "data/models"

# Config attributes that hold the longest sequence a model accepts, most common first.
_CONTEXT_ATTRIBUTES = ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length", "n_ctx",
                       "max_sequence_length")
# Special tokens every model sequence carries around the text: BOS in front (and EOS at the end in training).
SPECIAL_TOKENS_PER_SEQUENCE = 2


class ModelError(StageError):
    """A model or tokenizer cannot be loaded or does not fit its use; the message names the model."""


def model_reference(name: str, params: Params, data_dir: Path | str = DEFAULT_MODELS_DIR) -> ModelRef:
    """`name`'s entry under params `models`, or, for a model the pipeline made (target-clm, a soup), its directory
    `<data_dir>/<name>` as a local path (remote code off)."""
    if name in params.models:
        return params.models[name]
    if (Path(data_dir) / name).is_dir():
        return PathRef(source="path", path=str(Path(data_dir) / name))
    raise ModelError(f"model {name!r} is neither defined under 'models' in the params (defined: "
                     f"{sorted(params.models)}) nor a pipeline output at {Path(data_dir) / name}")


def model_dir(name: str, params: Params, data_dir: Path | str = DEFAULT_MODELS_DIR) -> str:
    """Where `name` loads from: `<data_dir>/<name>` for a bootstrap or pipeline model, its path, or its hub id."""
    ref = model_reference(name, params, data_dir)
    if isinstance(ref, BootstrapRef):
        return str(Path(data_dir) / name)
    if isinstance(ref, PathRef):
        return ref.path
    return ref.id


def local_dir(name: str, params: Params, data_dir: Path | str = DEFAULT_MODELS_DIR) -> Path:
    """A directory holding `name`'s files: its local directory, or for a hub model the local snapshot of its
    safetensors weights, config and tokenizer files (downloaded once into the Hugging Face cache)."""
    ref = model_reference(name, params, data_dir)
    if isinstance(ref, HubRef):
        from huggingface_hub import snapshot_download
        return Path(snapshot_download(ref.id, revision=ref.revision,
                                      allow_patterns=["*.safetensors", "*.json", "*.model", "*.txt"]))
    return Path(_source(name, params, data_dir)[0])


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
    """(location, from_pretrained kwargs shared by tokenizer, config and model), after checking local paths."""
    ref = model_reference(name, params, data_dir)
    location = model_dir(name, params, data_dir)
    if isinstance(ref, HubRef):
        return location, {"revision": ref.revision, "trust_remote_code": ref.trust_remote_code}
    if not Path(location).is_dir():
        if isinstance(ref, BootstrapRef):
            how = f"it is built by the DVC stage bootstrap@{name} (python -m stages.bootstrap {name})"
        else:
            how = f"models.{name}.path in params.yaml must name a save_pretrained directory"
        raise ModelError(f"model {name!r}: directory {location} does not exist; {how}")
    trust = ref.trust_remote_code if isinstance(ref, PathRef) else False
    return location, {"trust_remote_code": trust}


def _describe(name: str, location: str, kwargs: dict) -> str:
    revision = kwargs.get("revision")
    return f"model {name!r} ({location}{'@' + revision if revision else ''})"


def _from_pretrained(what: str, auto_class, name: str, params: Params, data_dir: Path | str):
    location, kwargs = _source(name, params, data_dir)
    try:
        return auto_class.from_pretrained(location, **kwargs)
    except (OSError, ValueError) as error:
        raise ModelError(f"{_describe(name, location, kwargs)}: cannot load its {what}: "
                         f"{' '.join(str(error).split())}") from None


def load_tokenizer(name: str, params: Params, data_dir: Path | str = DEFAULT_MODELS_DIR):
    """The tokenizer saved with model `name` (AutoTokenizer)."""
    return _from_pretrained("tokenizer", AutoTokenizer, name, params, data_dir)


def load_config(name: str, params: Params, data_dir: Path | str = DEFAULT_MODELS_DIR) -> PreTrainedConfig:
    """The model's config alone (no weights)."""
    return _from_pretrained("config", AutoConfig, name, params, data_dir)


def _check_safetensors(name: str, location: str) -> None:
    """A local directory must hold safetensors weights: pickled .bin/.pt files are refused, not executed."""
    directory = Path(location)
    if any(directory.glob("*.safetensors")):
        return
    pickled = sorted(p.name for p in directory.iterdir() if p.suffix in {".bin", ".pt", ".pth", ".ckpt"})
    found = f"found only {', '.join(pickled)}; " if pickled else ""
    raise ModelError(f"model {name!r}: {location} has no safetensors weights (*.safetensors); {found}"
                     "only safetensors are loaded: re-save the model with save_pretrained")


def load_model(name: str, params: Params, data_dir: Path | str = DEFAULT_MODELS_DIR) -> tuple[PreTrainedModel, object]:
    """(model, tokenizer) for `name`: safetensors weights in runtime's dtype, on runtime's device, in eval mode."""
    location, kwargs = _source(name, params, data_dir)
    if not isinstance(model_reference(name, params, data_dir), HubRef):
        _check_safetensors(name, location)
    tokenizer = load_tokenizer(name, params, data_dir)
    device, dtype = resolve_device_dtype(params.runtime)
    try:
        model = AutoModelForCausalLM.from_pretrained(location, use_safetensors=True, dtype=dtype, **kwargs)
    except (OSError, ValueError) as error:
        raise ModelError(f"{_describe(name, location, kwargs)}: cannot load its weights: "
                         f"{' '.join(str(error).split())}") from None
    rows = model.get_input_embeddings().weight.shape[0]
    if rows < len(tokenizer):
        raise ModelError(f"{_describe(name, location, kwargs)}: the model's vocabulary has {rows} rows "
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


def _token_counter(tokenizer):
    def count_tokens(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False).input_ids)

    return count_tokens


def external_token_limits(params: Params, data_dir: Path | str = DEFAULT_MODELS_DIR) -> list[TokenLimit]:
    """A TokenLimit for every path or hub model (tokenizer and config only, no weights), in params order.

    max_tokens leaves room for BOS and EOS. Bootstrap models need none: their tokenizers are trained on the
    corpus and the schema makes their context hold max_chunk_bytes + TOKENS_OVER_BYTES.
    """
    limits = []
    for name, ref in params.models.items():
        if isinstance(ref, BootstrapRef):
            continue
        tokenizer = load_tokenizer(name, params, data_dir)
        max_tokens = context_length(load_config(name, params, data_dir)) - SPECIAL_TOKENS_PER_SEQUENCE
        if max_tokens <= 0:
            raise ModelError(f"model {name!r}: context length {max_tokens + SPECIAL_TOKENS_PER_SEQUENCE} "
                             "leaves no room for text")
        limits.append(TokenLimit(model=name, count_tokens=_token_counter(tokenizer), max_tokens=max_tokens))
    return limits
