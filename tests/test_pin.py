"""pin@<model>: path and hub models linked into data/models/<name>, with their record; hub models offline from a
cache laid out as huggingface_hub lays it out."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from transformers import GPT2Config, LlamaConfig

from fusesoup.models import ModelError, load_model, stored_dtype
from fusesoup.params import PathRef, parse_params
from fusesoup.pin import PIN_FILE, PinError, pin_model
from tests.hub_cache import add_snapshot, save_checkpoint

REPO = Path(__file__).resolve().parents[1]
COMMIT_A, COMMIT_B = "a" * 40, "b" * 40


def tiny_llama() -> LlamaConfig:
    return LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                       max_position_embeddings=128)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return save_checkpoint(tmp_path_factory.mktemp("ckpt") / "llama", tiny_llama(), "sentencepiece_bpe",
                           dtype=torch.bfloat16)


def params_for(models: dict):
    return parse_params({"models": models, "target": next(iter(models)), "sources": list(models),
                         "corpus": {"sources": [{"kind": "builtin_code"}]}}, "test")


def test_a_path_model_is_linked_not_copied_and_loads_from_data_models(checkpoint, tmp_path):
    (checkpoint / "pytorch_model.bin").write_bytes(b"a pickle is never linked")
    try:
        record = pin_model("mine", PathRef(source="path", path=str(checkpoint)), tmp_path / "models/mine")
    finally:
        (checkpoint / "pytorch_model.bin").unlink()
    out = tmp_path / "models/mine"
    assert "pytorch_model.bin" not in record["files"] and not (out / "pytorch_model.bin").exists()
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(record["files"])
    for name in record["files"]:
        assert (out / name).is_symlink() and (out / name).resolve() == (checkpoint / name).resolve()
    assert json.loads((out / PIN_FILE).read_text()) == record
    assert record["source"] == "path" and record["commit"] is None and record["trust_remote_code"] is False
    assert stored_dtype(out) == torch.bfloat16
    params = params_for({"mine": {"source": "path", "path": str(checkpoint)}})
    model, tokenizer = load_model("mine", params, data_dir=tmp_path / "models")
    assert model.config.model_type == "llama" and len(tokenizer) == model.config.vocab_size


def test_a_path_without_safetensors_or_config_is_refused_in_one_line(checkpoint, tmp_path):
    (tmp_path / "config.json").write_bytes((checkpoint / "config.json").read_bytes())
    (tmp_path / "pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(ModelError, match=r"^model 'old': .* no safetensors weights .*found only pytorch_model\.bin"):
        pin_model("old", PathRef(source="path", path=str(tmp_path)), tmp_path / "out")
    with pytest.raises(PinError, match=r"^model 'gone': models\.gone\.path /nowhere is not a directory"):
        pin_model("gone", PathRef(source="path", path="/nowhere"), tmp_path / "out")
    assert not (tmp_path / "out").exists()  # nothing half-made


def run_pin(root: Path, name: str, cache: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "stages.pin", name, "--params", str(root / "params.yaml"),
                           "--out", str(root / "models" / name)], env=env, capture_output=True, text=True)


def test_a_hub_branch_resolves_to_its_commit_offline_and_stays_there(checkpoint, tmp_path):
    cache = tmp_path / "hub"
    add_snapshot(cache, "org/tiny-llama", checkpoint, COMMIT_A)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({
        "models": {"hubby": {"source": "hub", "id": "org/tiny-llama"}, "ghost": {"source": "hub", "id": "org/none"}},
        "target": "hubby", "sources": ["hubby", "ghost"], "corpus": {"sources": [{"kind": "builtin_code"}]}}))
    done = run_pin(tmp_path, "hubby", cache)
    assert done.returncode == 0, done.stderr
    assert f"hub org/tiny-llama@main = commit {COMMIT_A}" in done.stdout
    record = json.loads((tmp_path / "models/hubby" / PIN_FILE).read_text())
    assert (record["revision"], record["commit"]) == ("main", COMMIT_A)
    weights = tmp_path / "models/hubby/model.safetensors"
    assert weights.is_symlink() and COMMIT_A not in str(weights.resolve())  # the blob itself, not the snapshot link
    assert weights.read_bytes() == (checkpoint / "model.safetensors").read_bytes()

    missing = run_pin(tmp_path, "ghost", cache)
    assert missing.returncode == 2 and missing.stderr.count("\n") == 1
    assert missing.stderr.startswith("error: model 'ghost' (hub org/none@main): not in the local Hugging Face cache")


def test_a_gpt2_checkpoint_with_tied_embeddings_pins_and_loads(tmp_path):
    config = GPT2Config(n_embd=32, n_layer=1, n_head=2, n_positions=128)
    directory = save_checkpoint(tmp_path / "gpt2", config, "byte_level_bpe", dtype=torch.float16)
    pin_model("g", PathRef(source="path", path=str(directory)), tmp_path / "models/g")
    model, _ = load_model("g", params_for({"g": {"source": "path", "path": str(directory)}}), tmp_path / "models")
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()
    assert stored_dtype(tmp_path / "models/g") == torch.float16


def test_a_tokenizer_that_does_not_give_back_its_text_is_refused_at_pin_time(checkpoint, tmp_path):
    from tokenizers import normalizers
    from transformers import AutoTokenizer

    lossy = tmp_path / "lossy"
    lossy.mkdir()
    for path in checkpoint.iterdir():
        (lossy / path.name).write_bytes(path.read_bytes())
    tokenizer = AutoTokenizer.from_pretrained(lossy)
    tokenizer.backend_tokenizer.normalizer = normalizers.Sequence([normalizers.Lowercase()])
    tokenizer.save_pretrained(lossy)
    with pytest.raises(PinError, match=r"^model 'lossy': its tokenizer does not give back the text it encodes "
                                       r"\(the tokens spell b'def f\(x\):\\n\\treturn x  \+ 1  # na"):
        pin_model("lossy", PathRef(source="path", path=str(lossy)), tmp_path / "out")
    assert not (tmp_path / "out").exists()
