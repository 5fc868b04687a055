"""Bootstrapping small models: build_model, the training loop and the bootstrap stage on a synthetic corpus."""
from __future__ import annotations

import csv
import json

import polars as pl
import pytest
import torch
import yaml

from fusesoup.bootstrap import build_model, train_causal_lm
from fusesoup.corpus import CORPUS_SCHEMA
from fusesoup.errors import StageError
from fusesoup.models import load_model
from fusesoup.params import Bootstrap, TrainSpec, load_params
from fusesoup.storage import write_parquet
from fusesoup.train.packing import IGNORE, BlockPacker
from fusesoup.train.recipe import TrainingError, lr_at
from tests.helpers import TEXTS, tiny_spec

ARCHITECTURES = ["llama", "gpt_neox", "gpt2"]


@pytest.fixture(scope="module")
def sequences(tokenizer) -> dict[str, list[list[int]]]:
    ids = [tokenizer.encode(t, add_special_tokens=False) for t in TEXTS[:6]]
    return {"code": [ids[0], ids[2], ids[5]], "prose": [ids[1], ids[3], ids[4]]}


def short_spec(**changes) -> TrainSpec:
    return TrainSpec(**{"steps": 3, "batch_tokens": 96, "block_size": 32, "lr": 3e-3, "warmup_steps": 1,
                             **changes})


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_build_model(architecture, tokenizer):
    model = build_model(architecture, tiny_spec(context=96), tokenizer, seed=0)
    config = model.config
    assert len(tokenizer) == 300 and config.vocab_size == 320
    assert model.get_input_embeddings().weight.shape == (320, 32)
    assert (config.bos_token_id, config.eos_token_id, config.pad_token_id) == (
        tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id)
    tied = model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    assert tied == (architecture == "gpt2")
    assert model.config._attn_implementation == "sdpa"
    assert model.dtype == torch.float32
    ids = torch.tensor([[tokenizer.bos_token_id] + tokenizer.encode(TEXTS[0], add_special_tokens=False)])
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    assert logits.shape == (1, ids.shape[1], 320) and torch.isfinite(logits).all()
    same = build_model(architecture, tiny_spec(context=96), tokenizer, seed=0)
    other = build_model(architecture, tiny_spec(context=96), tokenizer, seed=1)
    first = model.get_input_embeddings().weight
    assert torch.equal(first, same.get_input_embeddings().weight)
    assert not torch.equal(first, other.get_input_embeddings().weight)


def test_unknown_architecture(tokenizer):
    with pytest.raises(StageError, match="unknown bootstrap architecture 'bert'; known: llama, gpt_neox, gpt2"):
        build_model("bert", tiny_spec(), tokenizer, seed=0)


def test_lr_schedule_warms_up_then_decays_to_a_tenth():
    spec = TrainSpec(steps=20, batch_tokens=1, block_size=1, lr=1.0, warmup_steps=4)
    lrs = [lr_at(step, spec) for step in range(spec.steps)]
    assert lrs[:4] == [0.25, 0.5, 0.75, 1.0]
    assert all(a >= b for a, b in zip(lrs[3:], lrs[4:]))
    assert lrs[-1] == pytest.approx(0.1)
    assert lr_at(0, TrainSpec(steps=5, batch_tokens=1, block_size=1, lr=2.0, warmup_steps=0)) == 2.0


def test_training_is_deterministic(tokenizer, sequences):
    def run():
        model = build_model("llama", tiny_spec(), tokenizer, seed=7)
        log = train_causal_lm(model, sequences, {"code": 1.0, "prose": 2.0}, short_spec(), seed=11, progress=False)
        return model.state_dict(), log

    (first, first_log), (second, second_log) = run(), run()
    assert first_log == second_log
    assert first.keys() == second.keys()
    assert all(torch.equal(first[key], second[key]) for key in first)
    untrained = build_model("llama", tiny_spec(), tokenizer, seed=7).state_dict()
    assert not all(torch.equal(first[key], untrained[key]) for key in first)


def test_log_counts_packed_tokens_and_follows_the_schedule(tokenizer, sequences):
    model = build_model("gpt2", tiny_spec(), tokenizer, seed=0)
    spec = short_spec(steps=4, warmup_steps=2)
    log = train_causal_lm(model, sequences, {"code": 1.0}, spec, seed=0, progress=False)
    assert [entry["step"] for entry in log] == [0, 1, 2, 3]
    assert [entry["lr"] for entry in log] == [lr_at(step, spec) for step in range(4)]
    assert [entry["tokens"] for entry in log] == [96, 192, 288, 384]  # every step exactly batch_tokens, no padding
    assert not model.training


def test_the_packer_joins_documents_masks_each_bos_and_restarts_positions():
    packer = BlockPacker(bos=1, eos=2, block=4, context=5)
    packer.add([10, 11, 12, 13, 14])  # [BOS] + 5 + [EOS] is cut to the context, 5 tokens
    packer.add([20])
    packer.add([30, 31])
    assert packer.buffered() == 12
    input_ids, labels, positions = packer.take(rows=2)
    assert input_ids.tolist() == [[1, 10, 11, 12], [13, 1, 20, 2]]
    assert labels.tolist() == [[IGNORE, 10, 11, 12], [13, IGNORE, 20, 2]]  # EOS -> next BOS is not a prediction
    assert positions.tolist() == [[0, 1, 2, 3], [4, 0, 1, 2]]  # transformers attends within each document
    assert packer.buffered() == 4  # BOS, 30, 31, EOS wait for the next batch
    input_ids, labels, positions = packer.take(rows=1)
    assert input_ids.tolist() == [[1, 30, 31, 2]] and positions.tolist() == [[0, 1, 2, 3]]
    with pytest.raises(ValueError, match="the stream holds 0 tokens, fewer than 1 x 4"):
        packer.take(rows=1)


def test_block_size_must_divide_the_batch_and_fit_the_context():
    with pytest.raises(ValueError, match="batch_tokens 100 is not a multiple of block_size 32"):
        short_spec(batch_tokens=100)
    entry = {"architecture": "llama", "tokenizer": {"kind": "unigram", "vocab_size": 300}, "domains": {"code": 1.0},
             "model": {"hidden_size": 32, "layers": 1, "heads": 2, "intermediate_size": 64, "context": 16},
             "train": {"steps": 1, "batch_tokens": 64, "block_size": 32, "lr": 1e-3}}
    with pytest.raises(ValueError, match="train.block_size 32 is longer than model.context 16"):
        Bootstrap(**entry)


def test_loss_decreases_on_a_repetitive_corpus(tokenizer):
    ids = tokenizer.encode("abc abd abe " * 6, add_special_tokens=False)
    model = build_model("gpt_neox", tiny_spec(), tokenizer, seed=0)
    spec = TrainSpec(steps=40, batch_tokens=128, block_size=64, lr=1e-2, warmup_steps=4)
    log = train_causal_lm(model, {"toy": [ids]}, {"toy": 1.0}, spec, seed=0, progress=False)
    assert log[-1]["loss"] < 0.3 * log[0]["loss"]


def test_documents_longer_than_a_block_run_on_into_the_next_row(tokenizer, sequences):
    model = build_model("gpt2", tiny_spec(context=16), tokenizer, seed=0)
    assert max(len(s) for s in sequences["code"]) > 16
    log = train_causal_lm(model, sequences, {"code": 1.0}, short_spec(steps=1, block_size=16), seed=0, progress=False)
    assert len(log) == 1 and log[0]["tokens"] == 96


def test_divergence_stops_with_the_step(tokenizer, sequences):
    model = build_model("llama", tiny_spec(), tokenizer, seed=0)
    with pytest.raises(TrainingError, match=r"loss is (nan|inf) at step [12] \(lr "):
        train_causal_lm(model, sequences, {"code": 1.0}, short_spec(lr=1e30, warmup_steps=0), seed=0, progress=False)


def test_patched_nan_loss_is_caught_at_its_step(tokenizer, sequences, monkeypatch):
    model = build_model("gpt2", tiny_spec(), tokenizer, seed=0)
    forward, calls = model.forward, []

    def poisoned(*args, **kwargs):
        out = forward(*args, **kwargs)
        calls.append(1)
        if len(calls) == 3:
            out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(model, "forward", poisoned)
    with pytest.raises(TrainingError, match="loss is nan at step 2 "):
        train_causal_lm(model, sequences, {"code": 1.0}, short_spec(steps=5), seed=0, progress=False)


def test_domain_without_sequences_is_an_error(tokenizer, sequences):
    model = build_model("llama", tiny_spec(), tokenizer, seed=0)
    with pytest.raises(TrainingError, match="domain 'web' has weight 1.0 but no training sequences"):
        train_causal_lm(model, sequences, {"code": 1.0, "web": 1.0}, short_spec(), seed=0, progress=False)


# --- the stage, end to end on a synthetic corpus --------------------------------------------------------------------

def write_corpus(directory):
    code = ["def f%d(x):\n    return x * %d + 1\n" % (i, i) for i in range(40)]
    prose = ["Sentence number %d says that the value is returned unchanged." % i for i in range(40)]
    for split, part in (("train", slice(0, 30)), ("valid", slice(30, 40))):
        rows = [("c%d" % i, "code", t) for i, t in enumerate(code[part])]
        rows += [("p%d" % i, "prose", t) for i, t in enumerate(prose[part])]
        frame = pl.DataFrame(rows, schema=CORPUS_SCHEMA, orient="row")
        write_parquet(frame, directory / f"{split}.parquet")


BOOTSTRAP_PATHS = ["--params", "params.yaml", "--corpus", "corpus", "--out", "data/models/spec",
                   "--metrics", "metrics/bootstrap/spec.json", "--plots", "plots/bootstrap/spec.csv"]


def test_bootstrap_stage(tmp_path, monkeypatch):
    from stages.bootstrap import main

    monkeypatch.chdir(tmp_path)
    write_corpus(tmp_path / "corpus")
    entry = {"architecture": "gpt2", "tokenizer": {"kind": "unigram", "vocab_size": 300},
             "domains": {"code": 1.0},
             "model": {"hidden_size": 32, "layers": 1, "heads": 2, "intermediate_size": 64, "context": 259},
             "train": {"steps": 3, "batch_tokens": 256, "block_size": 128, "lr": 3e-3, "warmup_steps": 1}}
    raw = {"target": "spec", "sources": ["spec"],
           "corpus": {"sources": [{"kind": "builtin_code"}], "max_chunk_bytes": 256},
           "runtime": {"device": "cpu", "threads": torch.get_num_threads()}, "bootstrap": {"spec": entry}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    main(["spec", *BOOTSTRAP_PATHS])

    out = tmp_path / "data/models/spec"
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    assert not list(out.glob("*.bin"))
    metrics = json.loads((tmp_path / "metrics/bootstrap/spec.json").read_text())
    assert set(metrics["domains"]) == {"code", "prose", "all"}  # every valid domain, trained on or not
    for scores in metrics["domains"].values():
        assert scores["bpb"] > 0 and scores["tokens"] > 0 and scores["bytes"] > 0
    assert metrics["domains"]["all"]["bytes"] == metrics["domains"]["code"]["bytes"] + metrics["domains"]["prose"]["bytes"]
    assert set(metrics["train"]) == {"steps", "final_loss", "tokens"}  # no wall time: metrics must be reproducible
    assert metrics["train"]["steps"] == 3 and metrics["train"]["final_loss"] > 0
    with open(tmp_path / "plots/bootstrap/spec.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [row["step"] for row in rows] == ["0", "1", "2"] and set(rows[0]) == {"step", "loss", "lr", "tokens"}

    model, tokenizer = load_model("spec", load_params(tmp_path / "params.yaml"))
    assert model.config.model_type == "gpt2" and model.config.vocab_size % 64 == 0
    assert tokenizer.decode(tokenizer.encode("return x", add_special_tokens=False)) == "return x"


def test_a_teacher_learns_the_target_tokenizer_from_the_domains_it_names(tmp_path, monkeypatch):
    """tokenizer.domains: a code-only model whose tokenizer learns from code and prose has the tokenizer of a model
    trained on both (the same-vocabulary oracle teacher); without it, its tokenizer is learnt from code alone."""
    from stages.bootstrap import main

    monkeypatch.chdir(tmp_path)
    write_corpus(tmp_path / "corpus")
    model = {"hidden_size": 32, "layers": 1, "heads": 2, "intermediate_size": 64, "context": 259}
    train = {"steps": 1, "batch_tokens": 256, "block_size": 128, "lr": 3e-3}
    tokenizer = {"kind": "sentencepiece_bpe", "vocab_size": 320}
    entries = {"base": {"domains": {"code": 1.0, "prose": 1.0}, "tokenizer": tokenizer},
               "oracle": {"domains": {"code": 1.0}, "tokenizer": {**tokenizer, "domains": ["code", "prose"]}},
               "code": {"domains": {"code": 1.0}, "tokenizer": tokenizer}}
    raw = {"target": "base", "sources": ["base"], "corpus": {"sources": [{"kind": "builtin_code"}, {"kind": "builtin_prose"}],
                                                             "max_chunk_bytes": 256},
           "runtime": {"device": "cpu", "threads": torch.get_num_threads()},
           "bootstrap": {name: {"architecture": "llama", "model": model, "train": train, **entry}
                         for name, entry in entries.items()}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    vocab = {}
    for name in entries:
        main([name, "--params", "params.yaml", "--corpus", "corpus", "--out", f"data/models/{name}",
              "--metrics", f"metrics/{name}.json", "--plots", f"plots/{name}.csv"])
        vocab[name] = json.loads((tmp_path / f"data/models/{name}/tokenizer.json").read_text())["model"]["vocab"]
    assert vocab["oracle"] == vocab["base"]
    assert vocab["code"] != vocab["base"]


def test_bootstrap_stage_unknown_model_exits_with_one_line(tmp_path, monkeypatch, capsys):
    from fusesoup.cli import run_stage
    from stages.bootstrap import main

    monkeypatch.chdir(tmp_path)
    raw = {"models": {"m": {"source": "path", "path": "/x"}}, "target": "m", "sources": ["m"],
           "corpus": {"sources": [{"kind": "builtin_code"}]}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    with pytest.raises(SystemExit) as caught:
        run_stage(lambda: main(["nope", *BOOTSTRAP_PATHS]))
    assert caught.value.code == 2
    assert capsys.readouterr().err.strip() == "error: params.yaml: no bootstrap.nope entry (bootstrap models: [])"
