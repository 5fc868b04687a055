"""The lm-evaluation-harness backend on a local multiple-choice task file and a tiny Llama saved in the test."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
import yaml
from transformers import LlamaConfig, LlamaForCausalLM

from fusesoup.bootstrap import padded_vocab_size
from fusesoup.harness import HarnessError, run_harness
from fusesoup.params import deep_merge, parse_params
from fusesoup.tokenizer_families import train_tokenizer

TASK = "fusesoup_tiny_mc"
DOCS = [
    {"question": "Which one is a fruit?", "choices": ["apple", "hammer", "river"], "label": 0},
    {"question": "What colour is the sky on a clear day?", "choices": ["green", "blue", "red"], "label": 1},
    {"question": "How many legs does a cat have?", "choices": ["two", "six", "four", "eight"], "label": 2},
    {"question": "Which one can fly?", "choices": ["stone", "bird"], "label": 1},
    {"question": "What do bees make?", "choices": ["honey", "steel", "paper"], "label": 0},
    {"question": "Which is the largest?", "choices": ["mouse", "ant", "whale"], "label": 2},
]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A randomly initialised one-layer Llama with a trained SentencePiece-BPE tokenizer, saved together."""
    texts = [f"Question: {d['question']}\nAnswer: {' '.join(d['choices'])}" for d in DOCS] * 20
    tokenizer = train_tokenizer("sentencepiece_bpe", iter(texts), 300)
    config = LlamaConfig(vocab_size=padded_vocab_size(tokenizer), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                         max_position_embeddings=128, initializer_range=0.5, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    directory = tmp_path_factory.mktemp("model")
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory) -> Path:
    """A task YAML reading DOCS from a local JSON-lines file (datasets cache under the test's tmp dir)."""
    root = tmp_path_factory.mktemp("task")
    (root / "docs.jsonl").write_text("".join(json.dumps(d) + "\n" for d in DOCS), encoding="utf-8")
    (root / "tasks").mkdir()
    task = {"task": TASK, "output_type": "multiple_choice", "dataset_path": "json",
            "dataset_kwargs": {"data_files": {"test": str(root / "docs.jsonl")}, "cache_dir": str(root / "cache")},
            "test_split": "test", "doc_to_text": "Question: {{question}}\nAnswer:", "doc_to_choice": "choices",
            "doc_to_target": "label", "metric_list": [{"metric": "acc"}]}
    (root / "tasks" / f"{TASK}.yaml").write_text(yaml.safe_dump(task), encoding="utf-8")
    return root / "tasks"


def choice_loglikelihoods(model_dir: Path, doc: dict) -> list[float]:
    """Sum of log-probs of each " <choice>" given the prompt: the prompt with BOS, then the tokens the whole string
    adds after the prompt's tokens (lm-eval's causal-LM scoring, recomputed here one sequence at a time)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = LlamaForCausalLM.from_pretrained(model_dir).eval()
    context = f"Question: {doc['question']}\nAnswer:"
    scores = []
    for choice in doc["choices"]:
        context_ids = tokenizer.encode(context)
        continuation = tokenizer.encode(context + " " + choice)[len(context_ids):]
        ids = torch.tensor([context_ids + continuation[:-1]])
        with torch.no_grad():
            logprobs = model(ids).logits[0, -len(continuation):].log_softmax(-1)
        scores.append(logprobs.gather(-1, torch.tensor(continuation)[:, None]).sum().item())
    return scores


@pytest.fixture(scope="module")
def hits(model_dir) -> list[bool]:
    """Per document: whether the model's most likely choice is the labelled one (no near ties, or the test is moot)."""
    hits = []
    for doc in DOCS:
        scores = choice_loglikelihoods(model_dir, doc)
        first, second = sorted(scores, reverse=True)[:2]
        assert first - second > 1e-3, f"near tie in {doc['question']!r}: {scores}"
        hits.append(scores.index(first) == doc["label"])
    return hits


def test_accuracy_matches_the_models_own_choice_loglikelihoods(model_dir, task_dir, hits):
    results = run_harness(model_dir, [TASK], task_dir, limit=None, batch_size=4, device="cpu")
    assert set(results) == {TASK}
    assert results[TASK]["acc"] == pytest.approx(sum(hits) / len(DOCS))
    assert 0 < results[TASK]["acc"] < 1  # some hits, some misses: a scoring mix-up would show
    assert results[TASK]["sample_len"] == len(DOCS) and results[TASK]["acc_stderr"] > 0
    assert run_harness(model_dir, [TASK], task_dir, limit=None, batch_size=2, device="cpu") == results


@pytest.mark.parametrize("limit", [1, 2, 3])
def test_limit_scores_the_first_documents_only(model_dir, task_dir, hits, limit):
    results = run_harness(model_dir, [TASK], task_dir, limit=limit, batch_size=1, device="cpu")[TASK]
    assert results["sample_len"] == limit and results["acc"] == pytest.approx(sum(hits[:limit]) / limit)


def test_unknown_task_names_the_task_and_where_it_was_looked_up(model_dir, task_dir):
    where = re.escape(f"YAMLs under {task_dir}")
    with pytest.raises(HarnessError, match=rf"unknown task 'fusesoup_tiny_mcq'.*{where}.*did you mean {TASK}"):
        run_harness(model_dir, ["fusesoup_tiny_mcq"], task_dir, limit=None, batch_size=1, device="cpu")


def test_evaluate_stage_runs_the_harness_on_the_targets_tokenizer_only(model_dir, task_dir, hits):
    from stages.evaluate import harness_models

    raw = yaml.safe_load((Path(__file__).resolve().parents[1] / "params.yaml").read_text())
    models = task_dir.parent / "models"
    models.mkdir(exist_ok=True)
    (models / "target-base").symlink_to(model_dir, target_is_directory=True)
    evaluation = {"target-base": {"all": {"bpb": 2.0, "accuracy": 0.3}}, "code-neox": {"all": {"bpb": 2.5}}}
    locations = {name: str(models) for name in evaluation}  # code-neox has no directory: it must not be touched
    off = parse_params(deep_merge(raw, {"runtime": {"device": "cpu"}}))
    assert harness_models(evaluation, locations, off, task_dir.parent) == {}
    on = parse_params(deep_merge(raw, {"runtime": {"device": "cpu"}, "evaluate": {
        "harness_tasks": [TASK], "harness_include": task_dir.name, "harness_limit": 2, "harness_batch_size": 2}}))
    results = harness_models(evaluation, locations, on, task_dir.parent)
    assert list(results) == ["target-base"] and list(results["target-base"]) == [TASK]
    assert results["target-base"][TASK]["acc"] == pytest.approx(sum(hits[:2]) / 2)
