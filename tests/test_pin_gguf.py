"""`source: gguf` models: the params entry, and the one-line refusals for what transformers cannot load from a GGUF,
found from the file's header before any weight is read (tiny GGUF files written with the gguf package's writer).
The real GGUF, pinned and run through the DAG, is tests/test_real_weights.py."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
import yaml

from fusesoup.gguf import GgufError
from fusesoup.params import GgufRef, ParamsError, parse_params
from fusesoup.pin import pin_model

REPO = Path(__file__).resolve().parents[1]


def write_gguf(path: Path, architecture: str = "llama", tensor_type=gguf.GGMLQuantizationType.F32,
               tokenizer: bool = True) -> Path:
    """A GGUF of one 32 x 32 tensor (of `tensor_type`, raw zero bytes) and a llama-shaped header; with a
    three-token BPE vocabulary when `tokenizer`."""
    writer = gguf.GGUFWriter(path, architecture)
    writer.add_block_count(1)
    writer.add_context_length(64)
    writer.add_embedding_length(32)
    writer.add_head_count(2)
    if tokenizer:
        writer.add_tokenizer_model("gpt2")
        writer.add_token_list(["a", "b", "ab"])
        writer.add_token_merges(["a b"])
    block_elements, block_bytes = gguf.GGML_QUANT_SIZES[tensor_type]
    raw = np.zeros((32, 32 // block_elements * block_bytes), dtype=np.uint8)
    writer.add_tensor("token_embd.weight", raw, raw_dtype=tensor_type)  # a 32 x 32 tensor as its bytes
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def pin(tmp_path: Path, **ref) -> dict:
    return pin_model("mine", GgufRef(source="gguf", **ref), tmp_path / "models/mine")


def test_a_gguf_entry_parses_and_refuses_remote_code_and_a_file_with_a_directory_in_it():
    base = {"target": "m", "sources": ["m"], "corpus": {"sources": [{"kind": "builtin_code"}]}}
    params = parse_params({**base, "models": {"m": {"source": "gguf", "path": "/models", "file": "m.Q4_1.gguf"}}})
    ref = params.models["m"]
    assert isinstance(ref, GgufRef) and (ref.path, ref.file, ref.dtype, ref.trust_remote_code) == (
        "/models", "m.Q4_1.gguf", "float32", False)
    with pytest.raises(ParamsError, match=r"^p.yaml: models\.m\.trust_remote_code: unknown key$"):
        parse_params({**base, "models": {"m": {"source": "gguf", "path": "/m.gguf", "trust_remote_code": True}}},
                     "p.yaml")
    with pytest.raises(ParamsError, match=r"^p.yaml: models\.m\.file: String should match pattern"):
        parse_params({**base, "models": {"m": {"source": "gguf", "path": "/models", "file": "a/m.gguf"}}}, "p.yaml")
    with pytest.raises(ParamsError, match=r"^p.yaml: models\.m\.dtype: Input should be 'float32', 'bfloat16' or "):
        parse_params({**base, "models": {"m": {"source": "gguf", "path": "/m.gguf", "dtype": "int8"}}}, "p.yaml")


def test_a_file_that_is_not_gguf_or_not_there_is_refused_in_one_line(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")
    with pytest.raises(GgufError, match=r"^model 'mine': .*/model\.safetensors is not a GGUF file \(it starts with "
                                        r"b'\\x08\\x00\\x00\\x00', not b'GGUF'\)$"):
        pin(tmp_path, path=str(tmp_path / "model.safetensors"))
    with pytest.raises(GgufError, match=r"^model 'mine': .*/none\.gguf is not a file; models\.mine\.path must name"):
        pin(tmp_path, path=str(tmp_path), file="none.gguf")
    with pytest.raises(GgufError, match=r"^model 'mine': models\.mine\.path .*/model\.safetensors is not a directory; "
                                        r"with models\.mine\.file"):
        pin(tmp_path, path=str(tmp_path / "model.safetensors"), file="m.gguf")
    assert not (tmp_path / "models/mine").exists()  # nothing half-made


def test_an_architecture_transformers_cannot_load_from_gguf_is_refused(tmp_path):
    write_gguf(tmp_path / "rwkv.gguf", architecture="rwkv6")
    with pytest.raises(GgufError, match=r"^model 'mine': .*/rwkv\.gguf is a GGUF of architecture 'rwkv6', which "
                                        r"transformers cannot load \(it loads .*\bllama\b.*\)$"):
        pin(tmp_path, path=str(tmp_path), file="rwkv.gguf")
    assert not (tmp_path / "models/mine").exists()


def test_a_quantisation_transformers_cannot_dequantise_is_refused(tmp_path):
    write_gguf(tmp_path / "q81.gguf", tensor_type=gguf.GGMLQuantizationType.Q8_1)
    with pytest.raises(GgufError, match=r"^model 'mine': .*/q81\.gguf holds Q8_1 tensors, a quantisation "
                                        r"transformers cannot dequantise; quantise the model again"):
        pin(tmp_path, path=str(tmp_path / "q81.gguf"))
    assert not (tmp_path / "models/mine").exists()


def test_a_gguf_without_a_tokenizer_is_refused_by_the_stage_in_one_line(tmp_path):
    write_gguf(tmp_path / "bare.gguf", tokenizer=False)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({
        "models": {"bare": {"source": "gguf", "path": str(tmp_path / "bare.gguf")}}, "target": "bare",
        "sources": ["bare"], "corpus": {"sources": [{"kind": "builtin_code"}]}}))
    done = subprocess.run([sys.executable, "-m", "stages.pin", "bare", "--params", str(tmp_path / "params.yaml"),
                           "--out", str(tmp_path / "models/bare")], capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
    assert done.stderr == (f"error: model 'bare': {tmp_path / 'bare.gguf'} has no tokenizer (tokenizer.ggml.tokens "
                           "is not in its metadata); convert the model again with llama.cpp's convert_hf_to_gguf.py, "
                           "which embeds it\n")
    assert not (tmp_path / "models/bare").exists()
