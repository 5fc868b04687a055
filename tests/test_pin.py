"""pin@<model>: path and hub models linked into data/models/<name>, with their record; hub models offline from a
cache laid out as huggingface_hub lays it out."""
from __future__ import annotations

import http.server
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoTokenizer, GPT2Config, LlamaConfig

from fusesoup.models import ModelError, load_model, stored_dtype
from fusesoup.params import PathRef, parse_params
from fusesoup.pin import PIN_FILE, PinError, pin_model
from tests.hub_cache import add_snapshot, save_checkpoint
from tests.real_tokenizers import mistral_tokenizer

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


class HubErrors(http.server.BaseHTTPRequestHandler):
    """A localhost stand-in for the hub's API that answers every request as the hub answers these cases: with the
    status and X-Error-Code header that huggingface_hub's own error mapping reads."""

    ANSWERS = {"org/gated": (403, "GatedRepo"), "org/tiny": (404, "RevisionNotFound"),
               "org/gone": (404, "RepoNotFound")}

    def do_GET(self):  # noqa: N802 (http.server's name)
        repo = next((r for r in self.ANSWERS if f"/{r}/" in self.path or self.path.endswith(f"/{r}")), None)
        status, code = self.ANSWERS.get(repo, (500, "Unknown"))
        self.send_response(status)
        self.send_header("X-Error-Code", code)
        self.send_header("X-Error-Message", f"{code} for {repo}")
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(json.dumps({"error": f"{code} for {repo}"}).encode())

    do_HEAD = do_GET

    def log_message(self, *args):
        pass


@pytest.mark.parametrize("ref, expected", [
    ({"id": "org/gated"}, "error: model 'm' (hub org/gated@main): the repo is gated: accept its license"),
    ({"id": "org/tiny", "revision": "v9"},
     "error: model 'm' (hub org/tiny@v9): revision 'v9' does not exist; set models.m.revision to a branch"),
    ({"id": "org/gone"}, "error: model 'm' (hub org/gone@main): no such repo, or it is private"),
])
def test_hub_refusals_name_the_model_and_what_to_change(ref, expected, tmp_path):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), HubErrors)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        (tmp_path / "params.yaml").write_text(yaml.safe_dump({
            "models": {"m": {"source": "hub", **ref}}, "target": "m", "sources": ["m"],
            "corpus": {"sources": [{"kind": "builtin_code"}]}}))
        env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "0",
               "HF_ENDPOINT": f"http://127.0.0.1:{server.server_port}", "HF_HUB_DISABLE_TELEMETRY": "1"}
        done = subprocess.run([sys.executable, "-m", "stages.pin", "m", "--params", str(tmp_path / "params.yaml"),
                               "--out", str(tmp_path / "models/m")], env=env, capture_output=True, text=True)
    finally:
        server.shutdown()
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
    assert done.stderr.startswith(expected), done.stderr
    assert not (tmp_path / "models/m").exists()


def test_a_sentencepiece_file_without_its_tokenizer_class_is_refused(tmp_path):
    directory = save_checkpoint(tmp_path / "given", tiny_llama(), mistral_tokenizer(tmp_path / "spm"))
    for generated in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (directory / generated).unlink(missing_ok=True)
    (directory / "tokenizer.model").write_bytes((tmp_path / "spm/tokenizer.model").read_bytes())
    with pytest.raises(PinError, match=r"model 'spm': .* has a tokenizer.model but no tokenizer_config.json naming"):
        pin_model("spm", PathRef(source="path", path=str(directory)), tmp_path / "models/spm")
    (directory / "tokenizer_config.json").write_text('{"tokenizer_class": "LlamaTokenizer"}')
    pin_model("spm", PathRef(source="path", path=str(directory)), tmp_path / "models/spm")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "models/spm")
    assert tokenizer.tokenize("The quick")[0] == "▁The"  # read as Mistral was trained: a word-start piece first
