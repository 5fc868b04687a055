"""`source: gguf` models: a local GGUF checkpoint (llama.cpp, Ollama, LM Studio) dequantised once for pin@.

transformers reads GGUF (through the gguf package) and dequantises every tensor to torch; `dequantise` saves the
result with save_pretrained (safetensors, config) and the tokenizer the GGUF embeds, so every later stage loads it
as it loads any other model, from data/models/<name>. The weights written are the quantised model's, exactly: a
teacher pinned from a Q4 file gives the Q4 model's distribution, not the original checkpoint's.

What transformers cannot do is found before any weight is read, from the file's header, and said in one line
naming the model and the file: a file that is not GGUF, an architecture or a quantisation type it cannot load,
a GGUF without an embedded tokenizer.
"""
from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import torch

from fusesoup.models import ModelError, load_from, stored_dtype
from fusesoup.params import GgufRef

GGUF_MAGIC = b"GGUF"
TOKENIZER_KEY = "tokenizer.ggml.tokens"  # the vocabulary; llama.cpp's converters write it with the tokenizer model


class GgufError(ModelError):
    """A GGUF model that cannot be pinned; the message names the model, the file and what to change."""


def gguf_file(name: str, ref: GgufRef) -> Path:
    """The GGUF file `ref` names (`path`, or `path`/`file`), checked to be a GGUF file by its magic bytes."""
    path = Path(ref.path).expanduser()
    file = path / ref.file if ref.file else path
    if ref.file and not path.is_dir():
        raise GgufError(f"model {name!r}: models.{name}.path {ref.path} is not a directory; with models.{name}.file "
                        "it must name the directory that holds the file")
    if not file.is_file():
        raise GgufError(f"model {name!r}: {file} is not a file; models.{name}.path must name a .gguf file, or a "
                        f"directory with models.{name}.file naming one in it")
    with open(file, "rb") as handle:
        magic = handle.read(len(GGUF_MAGIC))
    if magic != GGUF_MAGIC:
        raise GgufError(f"model {name!r}: {file} is not a GGUF file (it starts with {magic!r}, not {GGUF_MAGIC!r})")
    return file


def _dequantisable(qtype) -> bool:
    """Whether the gguf package (what transformers dequantises with) turns a block of this type into floats."""
    from gguf import GGML_QUANT_SIZES
    from gguf.quants import dequantize

    _, block_bytes = GGML_QUANT_SIZES[qtype]
    try:
        dequantize(np.zeros((1, block_bytes), dtype=np.uint8), qtype)
    except NotImplementedError:
        return False
    return True


def inspect_gguf(name: str, file: Path) -> dict:
    """The header's facts (architecture, file type, tensor types), or a GgufError for what transformers refuses."""
    import gguf
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    try:
        reader = gguf.GGUFReader(file)
    except (ValueError, OSError) as error:
        raise GgufError(f"model {name!r}: {file} is not a readable GGUF file ({' '.join(str(error).split())})") from None
    fields = reader.fields
    architecture = fields["general.architecture"].contents() if "general.architecture" in fields else None
    if architecture not in GGUF_SUPPORTED_ARCHITECTURES:
        raise GgufError(f"model {name!r}: {file} is a GGUF of architecture {architecture!r}, which transformers "
                        f"cannot load (it loads {', '.join(sorted(GGUF_SUPPORTED_ARCHITECTURES))})")
    types = Counter(tensor.tensor_type for tensor in reader.tensors)
    refused = sorted(qtype.name for qtype in types if not _dequantisable(qtype))
    if refused:
        raise GgufError(f"model {name!r}: {file} holds {', '.join(refused)} tensors, a quantisation transformers "
                        "cannot dequantise; quantise the model again to another type (Q8_0, Q4_K_M, ...)")
    if TOKENIZER_KEY not in fields:
        raise GgufError(f"model {name!r}: {file} has no tokenizer ({TOKENIZER_KEY} is not in its metadata); convert "
                        "the model again with llama.cpp's convert_hf_to_gguf.py, which embeds it")
    file_type = fields["general.file_type"].contents() if "general.file_type" in fields else None
    return {"architecture": architecture,
            "quantization": gguf.LlamaFileType(file_type).name.removeprefix("MOSTLY_") if file_type is not None
            else max(types, key=types.get).name,
            "tensor_types": {qtype.name: count for qtype, count in sorted(types.items(), key=lambda t: t[0].name)}}


def gguf_location(name: str, ref: GgufRef) -> tuple[str, dict]:
    """(directory, from_pretrained kwargs) that load the GGUF's tokenizer or config where the file lives."""
    file = gguf_file(name, ref)
    return str(file.parent), {"gguf_file": file.name}


def dequantise(name: str, file: Path, dtype: str, into: Path) -> dict:
    """Write the GGUF's model (safetensors in `dtype`) and its tokenizer into `into`; return the model type and the
    dtype written, for pin.json. `file` has passed inspect_gguf."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    location, kwargs = str(file.parent), {"gguf_file": file.name}
    tokenizer = load_from("tokenizer", AutoTokenizer, name, location, kwargs)
    # dequantize=True: every weight unpacked to a plain dense tensor whatever kernels are installed, and the GGUF
    # quantization_config dropped once loaded (transformers refuses to save a model it marks as GGUF-quantized)
    try:
        model = AutoModelForCausalLM.from_pretrained(location, dtype=getattr(torch, dtype),
                                                     quantization_config=GgufConfig(dequantize=True), **kwargs)
    except (OSError, ValueError, NotImplementedError) as error:
        raise GgufError(f"model {name!r}: {file}: transformers cannot load its weights: "
                        f"{' '.join(str(error).split())}") from None
    model.save_pretrained(into)
    tokenizer.save_pretrained(into)
    return {"model_type": model.config.model_type, "dtype": str(stored_dtype(into)).removeprefix("torch.")}
