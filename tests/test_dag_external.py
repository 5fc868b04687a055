"""End to end with no bootstrap at all: the tiny DAG on path and hub models only (the hub one from an offline cache
laid out as huggingface_hub lays it out), and DVC rerunning exactly what a change to one of them affects."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import polars as pl
import pytest
import torch
import yaml
from safetensors import safe_open
from transformers import AutoTokenizer, GPT2Config, GPTNeoXConfig, MistralConfig, Qwen2Config

from fusesoup.corpus import read_split
from fusesoup.logits.store import LogitStore
from fusesoup.models import stored_dtype
from tests.dvc_project import dvc, make_project, set_param
from tests.hub_cache import add_snapshot, save_checkpoint
from tests.real_tokenizers import gpt2_tokenizer, mistral_tokenizer

pytestmark = pytest.mark.e2e
COMMIT_A, COMMIT_B = "1" * 40, "2" * 40
SOURCES = ("base-qwen", "code-neox", "prose-mistral", "code-gpt2")
SMALL = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
         "max_position_embeddings": 512}


def qwen2() -> Qwen2Config:  # tied input/output embeddings, as Qwen2.5-0.5B ships
    return Qwen2Config(**SMALL, num_key_value_heads=1, tie_word_embeddings=True)


# Corpus text that spells the special tokens of these models (code and prose about language models has them): the
# text must reach every model as text, never as a special id (one of them used to stop align@)
SPECIAL_TEXTS = [f"{text} # {index}" for index in range(12) for text in (
    "print('<|endoftext|>')", "<|im_start|>user\nhi<|im_end|>", "<s>[INST] 2+2? [/INST] 4</s>",
    "vocab = ['<unk>', '<s>', '</s>', '<pad>']")]
CHAT_TEMPLATE = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"


def prose_mistral(directory: Path, seed: int) -> Path:
    """fp16, untied, Mistral-7B's own SentencePiece tokenizer (Llama-2's scheme: 32000 pieces, byte fallback, `▁`
    prepended) with two added special tokens, the embedding padded past them to 32064."""
    return save_checkpoint(directory, MistralConfig(**SMALL, num_key_value_heads=1),
                           mistral_tokenizer(directory.parent / f"{directory.name}-tokenizer"), dtype=torch.float16,
                           seed=seed, added_tokens=("<|im_start|>", "<|im_end|>"), pad_vocab_to=32064)


def code_gpt2(directory: Path) -> Path:
    """GPT-2's architecture (learned positions, tied embeddings) and its own tokenizer: BOS == EOS, no max length."""
    config = GPT2Config(n_embd=32, n_layer=1, n_head=2, n_positions=512)
    return save_checkpoint(directory, config, gpt2_tokenizer())


@pytest.fixture(scope="module")
def external(tmp_path_factory):
    """A tiny-profile project whose target (qwen2, bf16, tied) and sources (gpt_neox from the hub cache, mistral
    fp16, gpt2) are all given models, after one `dvc repro`."""
    root = tmp_path_factory.mktemp("external")
    # tokenizer families as these architectures ship them where transformers insists (AutoTokenizer builds
    # Qwen2Tokenizer, byte-level, for any qwen2 checkpoint whatever its tokenizer_config says)
    target = save_checkpoint(root / "given/base-qwen", qwen2(), "byte_level_bpe", 400, torch.bfloat16, no_bos=True,
                             pad_vocab_to=448, chat_template=CHAT_TEMPLATE, padding_side="left")
    mistral = prose_mistral(root / "given/prose-mistral", seed=0)
    gpt2 = code_gpt2(root / "given/code-gpt2")
    for commit, seed in ((COMMIT_B, 1), (COMMIT_A, 0)):  # main ends at COMMIT_A
        neox_dir = save_checkpoint(root / f"given/neox-{seed}", GPTNeoXConfig(**SMALL), "sentencepiece_bpe", 450,
                                   seed=seed, shard_bytes=40_000)
        add_snapshot(root / "hf-cache", "org/tiny-neox", neox_dir, commit)
    repo = make_project(root / "project")
    params = yaml.safe_load((repo / "params.yaml").read_text())
    specials = root / "given/specials.jsonl"
    specials.write_text("".join(json.dumps({"text": text}) + "\n" for text in SPECIAL_TEXTS))
    params["corpus"]["sources"].append({"kind": "files", "paths": [str(specials)], "domain": "specials"})
    params.update(bootstrap={}, target="base-qwen", sources=[*SOURCES], models={
        "base-qwen": {"source": "path", "path": str(target)},
        "code-neox": {"source": "hub", "id": "org/tiny-neox"},
        "prose-mistral": {"source": "path", "path": str(mistral)},
        "code-gpt2": {"source": "path", "path": str(gpt2)}})
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    with pytest.MonkeyPatch.context() as env:
        env.setenv("HF_HUB_CACHE", str(root / "hf-cache"))
        env.setenv("HF_HUB_OFFLINE", "1")
        dvc(repo, "repro")
        yield repo, root


def test_the_dag_runs_on_given_models_only(external):
    repo, _ = external
    dag = dvc(repo, "dag", "--md").stdout
    assert "bootstrap@" not in dag
    for stage in [*(f"pin@{name}" for name in SOURCES), "extract@code-neox", "align@code-gpt2", "soup", "evaluate"]:
        assert stage in dag
    record = json.loads((repo / "data/models/code-neox/pin.json").read_text())
    assert (record["id"], record["revision"], record["commit"]) == ("org/tiny-neox", "main", COMMIT_A)
    assert "model.safetensors.index.json" in record["files"] and len(
        [f for f in record["files"] if f.endswith(".safetensors")]) > 1  # sharded, as 7B checkpoints ship
    for name in SOURCES:  # aligned onto the target, not only loaded
        aligned = json.loads((repo / "metrics/align" / f"{name}.json").read_text())
        positions = aligned["positions"]["train"]["all"]
        assert positions["positions"] > 0 and aligned["vocab_map"]["nearest"] == 0  # align.vocab: exact
        # the real 32k and 50k vocabularies against a 400-token target: mostly spans (one-hot in the tiny profile);
        # a row takes the teacher's top-k only, and an untrained 50k-token teacher's top-k rarely holds a token the
        # small target has, so few of its one-to-one rows translate (min_ed filled them with nearest tokens: 5-50%)
        expected = {"base-qwen": (1.0, 1.0), "code-neox": (0.5, 0.99)}.get(name, (0.01, 0.5))
        assert expected[0] <= positions["exact"] <= expected[1], name
    evaluation = json.loads((repo / "metrics/eval.json").read_text())["models"]
    for name in (*SOURCES, "target-clm", "target-fused", "soup-vanilla"):
        assert math.isfinite(evaluation[name]["all"]["bpb"]), name


def test_text_that_spells_a_special_token_reaches_every_model_as_text(external):
    """No model's stored ids of the corpus hold a special id (the BOS the pipeline puts first is not stored), and
    the documents that spell them were aligned and scored like any other (align@ used to stop on them)."""
    repo, _ = external
    splits = {split: read_split(repo / "data/corpus", split) for split in ("train", "valid", "test")}
    assert sum(frame.filter(pl.col("domain") == "specials").height for frame in splits.values()) == len(SPECIAL_TEXTS)
    assert splits["train"].filter(pl.col("domain") == "specials").height > 0
    for name in SOURCES:
        tokenizer = AutoTokenizer.from_pretrained(repo / "data/models" / name)
        special = set(tokenizer.all_special_ids)
        assert special, name
        store = LogitStore(repo / "data/logits" / name)
        stored = [item.logits.input_ids for batch in store.iter_batches("train") for item in batch]
        assert len(stored) == splits["train"].height
        assert not any(special & set(ids.tolist()) for ids in stored), name
    scores = json.loads((repo / "metrics/eval.json").read_text())["models"]
    assert all(math.isfinite(scores[name]["specials"]["bpb"]) for name in SOURCES)


def test_a_bf16_tied_target_trains_and_soups_in_its_own_dtype(external):
    repo, _ = external
    for name in ("target-clm", "target-fused"):
        directory = repo / "data/models" / name
        assert stored_dtype(directory) == torch.bfloat16
        with safe_open(directory / "model.safetensors", framework="pt") as handle:
            assert "lm_head.weight" not in handle.keys()  # tied: saved once, as the base is
    assert stored_dtype(repo / "data/soups/soup-vanilla") == torch.bfloat16


def test_dvc_reruns_exactly_what_a_model_change_affects(external):
    repo, root = external
    assert json.loads(dvc(repo, "status", "--json").stdout) == {}
    weights = root / "given/prose-mistral/model.safetensors"
    os.utime(weights)  # touched, same bytes: nothing to rerun
    assert json.loads(dvc(repo, "status", "--json").stdout) == {}
    refs = root / "hf-cache/models--org--tiny-neox/refs/main"
    refs.write_text(COMMIT_B)  # the branch moves on the hub: the pinned commit stays
    assert json.loads(dvc(repo, "status", "--json").stdout) == {}

    prose_mistral(root / "given/prose-mistral", seed=5)  # the user edits the local model's weights
    status = json.loads(dvc(repo, "status", "--json").stdout)
    # its own stages, and evaluate, which scores every source (the rest follows once these have rerun)
    assert set(status) == {"pin@prose-mistral", "extract@prose-mistral", "align@prose-mistral", "evaluate"}
    set_param(repo, "models.code-neox.revision", COMMIT_B)
    assert "pin@code-neox" in json.loads(dvc(repo, "status", "--json").stdout)
