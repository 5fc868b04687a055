"""Teacher logit extraction: the codec, the teacher outputs, the sharded store (resume, corruption, workers)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from fusesoup.bootstrap import build_model
from fusesoup.logits.codec import (CE_STEP, LOGPROB_STEP, SequenceLogits, decode, encode, id_dtype,
                                   renormalized_kl)
from fusesoup.logits.extract import (ExtractionError, extract_sequences, output_head, teacher_outputs, top_k_rows,
                                     worker_count)
from fusesoup.logits.store import LogitStore
from fusesoup.params import Extract
from fusesoup.storage import StorageError
from tests.helpers import ASCII_TEXTS, EXTRACT_SPEC, make_tokenizer, run_store, shard_bytes, tiny_spec, write_code_corpus

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer(ASCII_TEXTS)


@pytest.fixture(scope="module")
def model(tokenizer):
    return build_model("llama", tiny_spec(context=256), tokenizer, seed=0).eval()


def random_sequence(rng, n: int, k: int, vocab: int) -> SequenceLogits:
    logits = rng.normal(0, 3, size=(n, vocab))
    logprobs = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    order = np.argsort(-logprobs, axis=1)[:, :k]
    ends = np.cumsum(rng.integers(0, 4, n))
    return SequenceLogits(input_ids=rng.integers(0, vocab, n), starts=ends - rng.integers(0, 2, n), ends=ends,
                          topk_ids=order, topk_logprobs=np.take_along_axis(logprobs, order, 1).astype(np.float32),
                          ce=rng.uniform(0, 20, n).astype(np.float32))


def test_codec_round_trip_is_lossless_for_ids_and_offsets_and_within_a_step_for_logprobs():
    rng = np.random.default_rng(0)
    sequence = random_sequence(rng, n=300, k=10, vocab=5000)
    columns = encode(sequence, vocab_size=5000)
    assert columns["topk_ids"].dtype == np.uint16 and columns["topk_codes"].dtype == np.uint8
    back = decode(columns, k=10)
    for name in ("input_ids", "starts", "ends", "topk_ids"):
        np.testing.assert_array_equal(getattr(back, name), getattr(sequence, name))
    inside = sequence.topk_logprobs > -255 * LOGPROB_STEP
    assert np.abs(back.topk_logprobs - sequence.topk_logprobs)[inside].max() <= LOGPROB_STEP / 2 + 1e-6
    assert np.abs(back.ce - sequence.ce).max() <= CE_STEP / 2 + 1e-6
    assert renormalized_kl(sequence.topk_logprobs, back.topk_logprobs).mean() < 1e-3


def test_codec_keeps_overlapping_offsets_and_rejects_ids_outside_the_vocabulary():
    sequence = SequenceLogits(np.array([1, 2, 3]), np.array([0, 2, 2]), np.array([2, 3, 3]),
                              np.array([[1], [2], [3]]), np.zeros((3, 1), np.float32), np.zeros(3, np.float32))
    back = decode(encode(sequence, 4), k=1)  # two byte tokens of one character share the span (2, 3)
    assert back.starts.tolist() == [0, 2, 2] and back.ends.tolist() == [2, 3, 3]
    with pytest.raises(ValueError, match="an id is >= the vocabulary size 3"):
        encode(sequence, 3)


def test_id_dtype_is_the_smallest_that_holds_the_vocabulary():
    assert [id_dtype(v) for v in (256, 257, 65536, 65537)] == [np.uint8, np.uint16, np.uint16, np.uint32]


@pytest.mark.parametrize("vocab", [1037, 1024, 300])  # a tail after the last block; none; too few blocks for k
def test_blocked_top_k_equals_torch_topk(vocab):
    generator = torch.Generator().manual_seed(vocab)
    values = torch.randn(64, vocab, generator=generator) * 4
    values[0, -5:] += 50  # the whole top-k of a row in the tail
    values[1, :3] += 50  # or in the first block
    values[2, 64:74] += 50  # or filling one block
    got_values, got_ids = top_k_rows(values, 10, block=64)
    expected = torch.topk(values, 10, dim=-1)
    assert torch.equal(got_values, expected.values) and torch.equal(got_ids, expected.indices)


@pytest.mark.parametrize("via_head", [True, False])
def test_teacher_outputs_match_a_full_log_softmax(model, tokenizer, via_head, monkeypatch):
    monkeypatch.setattr("fusesoup.logits.extract.CHUNK_ELEMENTS", 7 * model.config.vocab_size)  # 7-row chunks, the last short
    monkeypatch.setattr("fusesoup.logits.extract.MIN_CHUNK_ROWS", 1)
    ids = torch.tensor([[tokenizer.bos_token_id] + tokenizer.encode(ASCII_TEXTS[3], add_special_tokens=False)])
    head = output_head(model, ids) if via_head else None
    assert (head is not None) == via_head
    top_ids, top_logprobs, ce = teacher_outputs(model, ids, torch.ones_like(ids), k=5, head=head)
    with torch.no_grad():
        full = torch.log_softmax(model(input_ids=ids).logits[:, :-1].double(), dim=-1)
    expected = full.topk(5, dim=-1)
    torch.testing.assert_close(top_logprobs.double(), expected.values, atol=1e-5, rtol=0)
    assert torch.equal(top_ids, expected.indices)
    torch.testing.assert_close(ce.double(), -full.gather(-1, ids[:, 1:, None]).squeeze(-1), atol=1e-5, rtol=0)


def test_a_bf16_teacher_s_log_probs_are_projected_in_float32_from_its_hidden_states(model, tokenizer):
    """bf16 logits are rounded to 8 bits of mantissa (a logit of 4 by up to 0.016); the store keeps the float32
    projection of the bf16 hidden states instead, i.e. the bf16 model's own distribution without that rounding."""
    bf16 = build_model("llama", tiny_spec(context=256), tokenizer, seed=0).eval().to(torch.bfloat16)
    with torch.no_grad():
        bf16.lm_head.weight.mul_(8.0)  # logits of a trained model's size (|logit| up to ~10), not a random init's
    text = ASCII_TEXTS[5]
    got = extract_sequences(bf16, tokenizer, [text], k=6, batch_tokens=10_000)[0]
    assert bf16.lm_head.weight.dtype == torch.bfloat16  # the float32 copy does not replace the model's head
    ids = torch.tensor([[tokenizer.bos_token_id] + tokenizer.encode(text, add_special_tokens=False)])
    with torch.no_grad():
        hidden = bf16.base_model(input_ids=ids).last_hidden_state[0, :-1]
        exact = torch.log_softmax(hidden.double() @ bf16.lm_head.weight.double().t(), dim=-1)
        rounded = torch.log_softmax(bf16(input_ids=ids).logits[0, :-1].double(), dim=-1)
    top = exact.topk(6, dim=-1)
    assert np.array_equal(got.topk_ids, top.indices.numpy())
    np.testing.assert_allclose(got.topk_logprobs, top.values.numpy(), atol=1e-5)
    np.testing.assert_allclose(got.ce, -exact.gather(-1, ids[0, 1:, None]).squeeze(-1).numpy(), atol=1e-5)
    assert (rounded.gather(-1, top.indices) - top.values).abs().max() > 1e-3  # what the bf16 logits would store


@pytest.mark.parametrize("architecture", ["llama", "gpt_neox", "gpt2"])
def test_the_output_head_shortcut_is_taken_only_when_it_gives_the_model_s_logits(architecture, tokenizer):
    model = build_model(architecture, tiny_spec(), tokenizer, seed=0).eval()
    probe = torch.tensor([[tokenizer.bos_token_id, 40, 41, 42]])
    assert output_head(model, probe) is model.get_output_embeddings()
    forward = model.forward

    def soft_capped(*args, **kwargs):  # as Gemma-2 does: logits no longer equal lm_head(hidden)
        out = forward(*args, **kwargs)
        out.logits = 3.0 * torch.tanh(out.logits / 3.0)
        return out

    model.forward = soft_capped
    assert output_head(model, probe) is None


def test_extracted_sequences_do_not_depend_on_batching_and_keep_offsets(model, tokenizer):
    texts = ASCII_TEXTS[:12]
    alone = [extract_sequences(model, tokenizer, [t], k=4, batch_tokens=10_000)[0] for t in texts]
    batched = extract_sequences(model, tokenizer, texts, k=4, batch_tokens=400)
    for text, one, many in zip(texts, alone, batched):
        np.testing.assert_array_equal(one.input_ids, many.input_ids)
        np.testing.assert_array_equal(one.topk_ids, many.topk_ids)
        np.testing.assert_allclose(one.topk_logprobs, many.topk_logprobs, atol=1e-4)
        np.testing.assert_allclose(one.ce, many.ce, atol=1e-4)
        assert "".join(text[s:e] for s, e in zip(one.starts, one.ends)) == text
        assert [tokenizer.decode([i]) for i in one.input_ids] == [text[s:e] for s, e in zip(one.starts, one.ends)]


def test_sampled_rows_weigh_each_draw_alike_and_do_not_depend_on_batching(model, tokenizer):
    """extract.targets: sample: k draws per position from uniforms of the corpus row, so batching changes nothing;
    at temperature 1 each draw weighs 1/k; drawing at temperature 2 reaches more distinct ids than at 1."""
    texts = ASCII_TEXTS[:8]
    alone = [extract_sequences(model, tokenizer, [t], k=6, batch_tokens=10_000, first_row=3 + i,
                               sample_temperature=1.0)[0] for i, t in enumerate(texts)]
    batched = extract_sequences(model, tokenizer, texts, k=6, batch_tokens=400, first_row=3, sample_temperature=1.0)
    for one, many in zip(alone, batched):
        np.testing.assert_array_equal(one.topk_ids, many.topk_ids)
        np.testing.assert_allclose(one.topk_logprobs, np.log(1 / 6), atol=1e-6)
    hot = extract_sequences(model, tokenizer, texts, k=6, batch_tokens=400, first_row=3, sample_temperature=2.0)
    assert sum(len(set(r)) for s in hot for r in s.topk_ids) > sum(len(set(r)) for s in batched for r in s.topk_ids)
    weights = np.exp(hot[0].topk_logprobs)
    np.testing.assert_allclose(weights.sum(axis=1), 1, atol=1e-5)
    assert (np.diff(hot[0].topk_logprobs, axis=1) <= 0).all()  # most weight first, as the codec needs


def test_a_sequence_longer_than_the_context_names_its_row(tokenizer):
    short = build_model("gpt2", tiny_spec(context=8), tokenizer, seed=0)
    with pytest.raises(ExtractionError, match=r"corpus row 7: \d+ tokens do not fit 1\.\.7"):
        extract_sequences(short, tokenizer, [ASCII_TEXTS[5]], k=2, batch_tokens=100, first_row=7)


# --- the store ------------------------------------------------------------------------------------------------------









@pytest.fixture(scope="module")
def reference_store(model, tokenizer, tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("store")
    corpus = write_code_corpus(root / "corpus")
    run_store(model, tokenizer, corpus, root / "logits")
    return corpus, root / "logits"


def test_store_reads_back_every_sequence_in_order(reference_store, tokenizer):
    corpus, store_dir = reference_store
    store = LogitStore(store_dir)
    assert store.k == 5 and len(store.shards("train")) == 5  # 40 sequences, 8 per shard
    seen = [item for batch in store.iter_batches("train", batch_sequences=3) for item in batch]
    assert [item.sequence for item in seen] == list(range(40))
    for item in seen:
        text = ASCII_TEXTS[item.sequence]
        assert item.logits.input_ids.tolist() == tokenizer.encode(text, add_special_tokens=False)
        assert "".join(text[s:e] for s, e in zip(item.logits.starts, item.logits.ends)) == text
        assert item.logits.topk_ids.shape == (len(item.logits.input_ids), 5)
    manifest = json.loads((store_dir / "manifest.json").read_text())
    assert manifest["splits"]["train"]["sequences"] == 40
    assert manifest["splits"]["train"]["positions"] == sum(len(i.logits.input_ids) for i in seen)
    with pytest.raises(StorageError, match=r"manifest.json: no split 'valid' \(stored: \['train'\]\)"):
        store.shards("valid")


def test_same_key_does_nothing_and_changing_k_re_extracts(reference_store, model, tokenizer, tmp_path):
    corpus, reference = reference_store
    store = tmp_path / "logits"
    run_store(model, tokenizer, corpus, store)
    before = shard_bytes(store)
    manifest, loads = run_store(model, tokenizer, corpus, store)
    assert loads == 0 and shard_bytes(store) == before  # the model is not even loaded
    manifest, loads = run_store(model, tokenizer, corpus, store, Extract(**{**EXTRACT_SPEC.model_dump(), "k": 3}))
    assert loads == 1 and manifest["k"] == 3 and LogitStore(store).k == 3
    assert next(LogitStore(store).iter_batches("train"))[0].logits.topk_ids.shape[1] == 3
    manifest, loads = run_store(model, tokenizer, corpus, store, Extract(**{**EXTRACT_SPEC.model_dump(), "k": 3,
                                                                           "targets": "sample"}))
    assert loads == 1 and manifest["targets"] == "sample" and manifest["key_parts"]["sample_temperature"] == 1.0
    first = next(LogitStore(store).iter_batches("train"))[0].logits
    np.testing.assert_allclose(first.topk_logprobs, -LOGPROB_STEP * np.rint(np.log(3) / LOGPROB_STEP))


def test_corpus_change_re_extracts(reference_store, model, tokenizer, tmp_path):
    corpus, reference = reference_store
    store = tmp_path / "logits"
    run_store(model, tokenizer, corpus, store)
    changed = write_code_corpus(tmp_path / "corpus", ASCII_TEXTS[:20])
    manifest, loads = run_store(model, tokenizer, changed, store)
    assert loads == 1 and manifest["splits"]["train"]["sequences"] == 20
    assert sorted(p.name for p in (store / "train").iterdir()) == [
        f"shard-0000{i}.{ext}" for i in range(3) for ext in ("json", "parquet")]  # shards 3 and 4 are gone


def test_a_corrupt_shard_is_refused_by_the_reader_and_redone_by_the_next_run(reference_store, model, tokenizer, tmp_path):
    corpus, reference = reference_store
    store = tmp_path / "logits"
    run_store(model, tokenizer, corpus, store)
    victim = store / "train/shard-00002.parquet"
    victim.write_bytes(victim.read_bytes()[:-100])  # truncated
    with pytest.raises(StorageError, match=r"shard-00002.parquet: checksum does not match the manifest"):
        for _ in LogitStore(store).iter_batches("train"):
            pass
    untouched = (store / "train/shard-00001.parquet").stat().st_mtime_ns
    manifest, loads = run_store(model, tokenizer, corpus, store)
    assert loads == 1 and shard_bytes(store) == shard_bytes(reference)
    assert (store / "train/shard-00001.parquet").stat().st_mtime_ns == untouched


def test_two_workers_fill_the_same_store_as_one(reference_store, model, tokenizer, tmp_path):
    corpus, reference = reference_store
    store = tmp_path / "logits"
    first, _ = run_store(model, tokenizer, corpus, store, num_workers=2, worker_index=1)
    assert first is None and not (store / "manifest.json").exists()
    assert sorted(p.name for p in (store / "train").glob("*.parquet")) == ["shard-00001.parquet", "shard-00003.parquet"]
    second, _ = run_store(model, tokenizer, corpus, store, num_workers=2, worker_index=0)
    assert second is not None and shard_bytes(store) == shard_bytes(reference)
    with pytest.raises(ExtractionError, match=r"--worker-index 2 is not in 0\.\.1"):
        run_store(model, tokenizer, corpus, store, num_workers=2, worker_index=2)


def test_zero_workers_means_one_per_gpu_or_one_per_core(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2}, raising=False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    assert worker_count(0, torch.device("cpu")) == 3
    assert worker_count(0, torch.device("cuda")) == 4
    assert worker_count(2, torch.device("cuda")) == 2  # asked for: as given


# --- the stage, killed mid-run --------------------------------------------------------------------------------------

KILL_AFTER_SHARDS = """
import os, signal, sys
from fusesoup.logits import store
from fusesoup.storage import write_json
written = []
def write_json_then_die(path, obj):
    write_json(path, obj)
    written.append(path)
    if len(written) == 2:
        os.kill(os.getpid(), signal.SIGKILL)  # a real kill, right after the second shard is complete
store.write_json = write_json_then_die
from stages.extract import main
main(sys.argv[1:])
"""


@pytest.fixture(scope="module")
def stage_project(model, tokenizer, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("stage")
    write_code_corpus(root / "corpus")
    model.save_pretrained(root / "models/teacher")
    tokenizer.save_pretrained(root / "models/teacher")
    raw = {"models": {"teacher": {"source": "path", "path": str(root / "models/teacher")}}, "target": "teacher",
           "sources": ["teacher"], "corpus": {"sources": [{"kind": "builtin_code"}]},
           "runtime": {"device": "cpu", "threads": 1}, "extract": EXTRACT_SPEC.model_dump()}
    (root / "params.yaml").write_text(yaml.safe_dump(raw))
    return root


def stage_cmd(root: Path, out: str, *extra: str) -> list[str]:
    return ["teacher", "--params", str(root / "params.yaml"), "--corpus", str(root / "corpus"),
            "--models", str(root / "models"), "--out",
            str(root / out), "--metrics", str(root / f"{out}.json"), "--no-progress", *extra]


def test_a_killed_extraction_resumes_and_matches_an_uninterrupted_run(stage_project):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    killed = subprocess.run([sys.executable, "-c", KILL_AFTER_SHARDS, *stage_cmd(stage_project, "resumed")],
                            env=env, capture_output=True, text=True)
    assert killed.returncode == -signal.SIGKILL
    store = stage_project / "resumed"
    assert sorted(p.name for p in (store / "train").glob("shard-*")) == [
        "shard-00000.json", "shard-00000.parquet", "shard-00001.json", "shard-00001.parquet"]
    assert not (store / "manifest.json").exists()
    (store / "train/.shard-00002.parquet.tmp-crash").write_bytes(b"half a shard")  # as a crash mid-write leaves
    first_shard = (store / "train/shard-00000.parquet").stat().st_mtime_ns

    for out in ("resumed", "whole"):
        done = subprocess.run([sys.executable, "-m", "stages.extract", *stage_cmd(stage_project, out)],
                              env=env, cwd=REPO, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
    assert (store / "train/shard-00000.parquet").stat().st_mtime_ns == first_shard  # kept, not redone
    assert shard_bytes(store) == shard_bytes(stage_project / "whole")
    metrics = json.loads((stage_project / "resumed.json").read_text())
    assert metrics["k"] == 5 and metrics["splits"]["train"]["sequences"] == 40
    assert 0 < metrics["splits"]["train"]["bytes_per_position"] < 40


def test_the_stage_with_two_workers_writes_the_store_one_process_writes(stage_project):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    raw = yaml.safe_load((stage_project / "params.yaml").read_text())
    for workers in (1, 2):
        raw["extract"]["workers"] = workers
        params = stage_project / f"params-{workers}.yaml"
        params.write_text(yaml.safe_dump(raw))
        command = [*stage_cmd(stage_project, f"workers-{workers}"), "--params", str(params)]
        done = subprocess.run([sys.executable, "-m", "stages.extract", *command], env=env, cwd=REPO,
                              capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
    assert "worker 1 of 2 done" in done.stdout or "worker 0 of 2 done" in done.stdout  # both ran, one finished
    store = stage_project / "workers-2"
    assert len(list((store / "train").glob("*.parquet"))) >= 2  # each worker had shards to write
    assert shard_bytes(store) == shard_bytes(stage_project / "workers-1")
    assert (store / "manifest.json").read_bytes() == (stage_project / "workers-1/manifest.json").read_bytes()
