"""Teacher logit extraction: corpus split -> per-position top-k log-probs, ids, offsets and CE, in shards.

The corpus is streamed one shard of sequences at a time (memory does not grow with the corpus); each shard is
tokenized with offsets, run in length-sorted batches under a padded-token budget, and written by a background
thread while the next shard computes. Shards already finished under the same content key are kept, so a killed
run resumes, and N workers (`worker_index` of `num_workers`) fill disjoint shards of the same store.
"""
from __future__ import annotations

import math
import os
import subprocess
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import polars as pl
import pyarrow.parquet as pq
import torch
from tqdm.auto import tqdm

from fusesoup.batching import bos_token_id, encode_text, pad_batch, plan_batches
from fusesoup.corpus import CORPUS_SCHEMA, read_texts, split_path
from fusesoup.errors import StageError
from fusesoup.logits import store as shards
from fusesoup.logits.codec import CODEC, SequenceLogits
from fusesoup.logits.sampling import row_uniforms, sample_rows
from fusesoup.models import context_length
from fusesoup.params import Extract
from fusesoup.storage import content_key, sha256_file


class ExtractionError(StageError):
    """The teacher cannot be run over the corpus as asked; the message names the file, split or row."""


def key_parts(model_fingerprint: dict, corpus_dir: Path | str, spec: Extract, dtype: torch.dtype) -> dict:
    """What the store depends on: model + tokenizer files, each split's bytes, the extraction settings.

    batch_tokens is left out: it changes speed, not the stored values beyond float rounding.
    """
    sampled = {"targets": spec.targets, "sample_temperature": spec.sample_temperature} if spec.targets == "sample" else {}
    return {"codec": CODEC, "model": model_fingerprint, "dtype": str(dtype).removeprefix("torch."),
            "k": spec.k, **sampled, "shard_sequences": spec.shard_sequences,
            "splits": {split: sha256_file(split_path(corpus_dir, split)) for split in sorted(set(spec.splits))}}


CHUNK_ELEMENTS = 1 << 21  # logits made at once (8 MB in float32): [CHUNK_ELEMENTS // V, V], never [B, L, V]
MIN_CHUNK_ROWS = 256  # ...but at least this many positions: each chunk reads the whole [V, H] head once
TOPK_BLOCK = 64  # ids per block of the blocked top-k


def top_k_rows(values: torch.Tensor, k: int, block: int = TOPK_BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """torch.topk(values, k, dim=-1) of a [R, V] tensor (same values, sorted descending), 2-3x faster for V >> k.

    Only the k blocks of `block` ids with the largest maxima can hold a top-k entry: any other entry is at most its
    block's maximum, which is at most each of those k maxima (k distinct entries). So top-k runs over k * block
    candidates (plus the tail of V % block ids) instead of V. Among exactly equal values the ids may differ.
    """
    rows, vocab = values.shape
    main = vocab // block * block
    if main // block <= k:
        return torch.topk(values, k, dim=-1)
    block_max = values[:, :main].view(rows, main // block, block).amax(dim=-1)
    blocks = torch.topk(block_max, k, dim=-1, sorted=False).indices  # [R, k]
    candidates = (blocks[:, :, None] * block + torch.arange(block, device=values.device)).view(rows, k * block)
    if main < vocab:
        tail = torch.arange(main, vocab, device=values.device).expand(rows, vocab - main)
        candidates = torch.cat([candidates, tail], dim=1)
    top = torch.topk(values.gather(1, candidates), k, dim=-1)
    return top.values, candidates.gather(1, top.indices)


@torch.inference_mode()
def output_head(model, probe: torch.Tensor):
    """The model's output embedding if its logits are exactly that applied to base_model's last hidden state
    (checked on `probe`, a [1, L] batch), else None. Families with soft-capping or logit scaling fail the check
    and go through the full forward instead."""
    head = model.get_output_embeddings()
    base = getattr(model, "base_model", None)
    if head is None or base is None or base is model:
        return None
    try:
        via_head = head(base(input_ids=probe).last_hidden_state).float()
    except (TypeError, AttributeError):
        return None
    logits = model(input_ids=probe).logits.float()
    return head if torch.allclose(via_head, logits, atol=1e-3, rtol=1e-3) else None


def chunk_rows(vocab: int) -> int:
    """Positions projected at once: 8 MB of logits, or MIN_CHUNK_ROWS rows for a big vocabulary (155 MB at 152k),
    since a chunk of 13 rows would spend its time reading the head's weights rather than multiplying."""
    return max(MIN_CHUNK_ROWS, CHUNK_ELEMENTS // vocab)


def float32_head(head):
    """A float32 copy of a bf16/fp16 Linear head (else the head itself), so a low-precision teacher's logits are
    projected and kept in float32: rounding them to bf16 moves a logit of 16 by up to 0.06 nats. Costs V x H x 4
    bytes (2.2 GB for a 152k x 3584 head); bf16 and fp16 values are exact in TF32, so CUDA keeps tensor cores."""
    if not isinstance(head, torch.nn.Linear) or head.weight.dtype == torch.float32:
        return head
    copy = torch.nn.Linear(head.in_features, head.out_features, bias=head.bias is not None,
                           device=head.weight.device, dtype=torch.float32)
    copy.load_state_dict({name: value.float() for name, value in head.state_dict().items()})
    return copy


@contextmanager
def tf32_matmuls(enabled: bool):
    """TF32 matmuls inside the block when `enabled`: exact for inputs upcast from bf16/fp16 (fp32 accumulation),
    so only a head copied by float32_head uses them; a float32 teacher keeps full float32 matmuls."""
    if not enabled:
        yield
        return
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(previous)


def _project(head, rows: torch.Tensor, out: torch.Tensor, tf32: bool) -> torch.Tensor:
    """head(rows), written into `out` when the head is a plain Linear (most output embeddings are)."""
    if not isinstance(head, torch.nn.Linear):
        return head(rows)
    with tf32_matmuls(tf32):
        if head.bias is None:
            return torch.mm(rows, head.weight.t(), out=out)
        return torch.addmm(head.bias, rows, head.weight.t(), out=out)


@torch.inference_mode()
def teacher_outputs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, k: int, head=None,
                    uniforms: torch.Tensor | None = None, sample_temperature: float = 1.0):
    """For a [B, L] batch starting with BOS: top-k ids and log-probs [B, L-1, k] and CE [B, L-1] of each next token;
    with `uniforms` ([B * (L-1), k]) k draws and their log importance weights instead of the top k (sampling.py).

    Log-probs are over the full vocabulary (log-softmax in float32). With `head` (see output_head; a float32 head
    projects the hidden states in float32) the logits are made a chunk of positions at a time from the hidden
    states, so the [B, L, V] tensor never exists. Each chunk's logits and log-probs go to two buffers allocated
    once per batch: fresh vocab-sized tensors per chunk cost more in page faults than the log-softmax and top-k
    themselves (measured 2x on CPU).
    """
    batch, length = input_ids.shape
    positions = batch * (length - 1)
    targets = input_ids[:, 1:].reshape(-1)
    if head is not None:
        hidden = model.base_model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        rows = hidden[:, :-1].reshape(positions, -1)
        upcast = isinstance(head, torch.nn.Linear) and rows.dtype != head.weight.dtype
        if isinstance(head, torch.nn.Linear):
            rows, vocab = rows.to(head.weight.dtype), head.weight.shape[0]
        else:
            vocab = model.config.vocab_size
        step = chunk_rows(vocab)
        logits_buffer = rows.new_empty(min(step, positions), vocab)
        tf32 = upcast and rows.device.type == "cuda"
        chunks = (_project(head, chunk, logits_buffer[: len(chunk)], tf32) for chunk in rows.split(step))
    else:
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
        vocab = logits.shape[-1]
        step = chunk_rows(vocab)
        chunks = logits[:, :-1].reshape(positions, -1).split(step)
    logprob_buffer = torch.empty(min(step, positions), vocab, device=input_ids.device)
    ids, logprobs, ce = [], [], []
    for start, chunk in zip(range(0, positions, step), chunks):
        chunk = torch.log_softmax(chunk, dim=-1, dtype=torch.float32, out=logprob_buffer[: len(chunk)])
        if uniforms is None:
            values, indices = top_k_rows(chunk, k)  # sorted, most likely first
        else:
            values, indices = sample_rows(chunk, uniforms[start : start + len(chunk)], sample_temperature)
        ids.append(indices)
        logprobs.append(values)
        ce.append(-chunk.gather(-1, targets[start : start + len(chunk), None]).squeeze(-1))
    shape = (batch, length - 1)
    return (torch.cat(ids).view(*shape, k), torch.cat(logprobs).view(*shape, k), torch.cat(ce).view(shape))


def extract_sequences(model, tokenizer, texts: Sequence[str], k: int, batch_tokens: int, first_row: int = 0,
                      sample_temperature: float | None = None) -> list[SequenceLogits]:
    """Teacher outputs for each text (tokenized without specials, scored after BOS), in the order given: the top k of
    each position, or (`sample_temperature` given) k draws with their log weights, from uniforms of the text's corpus
    row (first_row + its index)."""
    if not tokenizer.is_fast:
        raise ExtractionError(f"tokenizer {type(tokenizer).__name__} is not a fast tokenizer: character offsets "
                              "for the alignment stage need one (tokenizer.json)")
    vocab_size = model.config.vocab_size
    if k > vocab_size:
        raise ExtractionError(f"extract.k is {k} but the model has only {vocab_size} ids")
    encoded = encode_text(tokenizer, texts, return_offsets_mapping=True)
    bos = bos_token_id(tokenizer)
    sequences = [[bos] + ids for ids in encoded["input_ids"]]
    context = context_length(model.config)
    for row, sequence in enumerate(sequences):
        if len(sequence) > context or len(sequence) < 2:
            raise ExtractionError(f"corpus row {first_row + row}: {len(sequence) - 1} tokens do not fit 1..{context - 1} "
                                  "(the model context with BOS); re-run prepare_corpus with this model in params")
    device = next(model.parameters()).device
    head = output_head(model, torch.tensor([sequences[0][:16]], device=device)) if sequences else None
    head = float32_head(head)
    results: list[SequenceLogits | None] = [None] * len(texts)
    for batch in plan_batches([len(s) for s in sequences], batch_tokens):
        input_ids, mask = pad_batch([sequences[i] for i in batch], pad=bos)
        uniforms = None
        if sample_temperature is not None:
            uniforms = np.full((len(batch), input_ids.shape[1] - 1, k), 0.5, np.float32)  # padding draws anything
            for row, i in enumerate(batch):
                uniforms[row, : len(sequences[i]) - 1] = row_uniforms(first_row + i, len(sequences[i]) - 1, k)
            uniforms = torch.from_numpy(uniforms).view(-1, k).to(device)
        outputs = teacher_outputs(model, input_ids.to(device), mask.to(device), k, head, uniforms,
                                  sample_temperature or 1.0)
        ids, logprobs, ce = (t.cpu().numpy() for t in outputs)
        for row, i in enumerate(batch):
            n = len(sequences[i]) - 1
            offsets = np.array(encoded["offset_mapping"][i], dtype=np.int64).reshape(n, 2)
            results[i] = SequenceLogits(input_ids=input_ids[row, 1 : n + 1].numpy(), starts=offsets[:, 0],
                                        ends=offsets[:, 1], topk_ids=ids[row, :n], topk_logprobs=logprobs[row, :n],
                                        ce=ce[row, :n])
    return results


def split_rows(path: Path) -> int:
    """Row count of a corpus split, after checking its schema; errors name the file."""
    if not path.is_file():
        raise ExtractionError(f"{path}: missing; run the prepare_corpus stage first")
    try:
        schema = dict(pl.read_parquet_schema(path))
    except Exception as error:  # polars raises several types for unreadable files
        raise ExtractionError(f"{path}: not a readable Parquet file ({error})") from None
    if schema != CORPUS_SCHEMA:
        raise ExtractionError(f"{path}: schema {schema} does not match the corpus schema {CORPUS_SCHEMA}")
    return pq.read_metadata(path).num_rows


def extract_store(load_teacher: Callable[[], tuple[object, object]], vocab_size: int, corpus_dir: Path | str,
                  store: Path | str, spec: Extract, parts: dict, num_workers: int = 1, worker_index: int = 0,
                  progress: bool = True) -> dict | None:
    """Fill this worker's shards of `store`; returns the manifest once every shard is done (else None).

    `load_teacher()` -> (model, tokenizer) is called only if some shard is left to do; `vocab_size` is the
    model's (config.vocab_size), known without loading weights.
    """
    if not 0 <= worker_index < num_workers:
        raise ExtractionError(f"--worker-index {worker_index} is not in 0..{num_workers - 1}")
    store, key, splits = Path(store), content_key(parts), sorted(set(spec.splits))
    counts = {split: split_rows(split_path(corpus_dir, split)) for split in splits}
    plan = {split: math.ceil(rows / spec.shard_sequences) for split, rows in counts.items()}
    shards.remove_manifest(store)  # rewritten below when (and only when) every shard checks out
    if worker_index == 0:
        shards.remove_foreign(store, plan)
    todo = []
    for split in splits:
        mine = [i for i in range(plan[split]) if i % num_workers == worker_index]
        finished = shards.clear_stale(store, split, mine, key)
        todo += [(split, i) for i in mine if i not in finished]

    if todo:
        model, tokenizer = load_teacher()
        if model.config.vocab_size != vocab_size:
            raise ExtractionError(f"the loaded model has {model.config.vocab_size} ids, its config {vocab_size}")
        total = sum(min(counts[s], (i + 1) * spec.shard_sequences) - i * spec.shard_sequences for s, i in todo)
        # progress=True shows the bar on a terminal only (tqdm's None), so logs piped to Prefect stay readable
        bar = tqdm(total=total, desc="extract", unit="seq", disable=None if progress else True, dynamic_ncols=True)
        tokens = 0
        written = shards.ShardProgress(store, len(todo))
        with ThreadPoolExecutor(max_workers=1) as writer:
            pending: Future | None = None
            for split, index in todo:
                start, stop = index * spec.shard_sequences, min(counts[split], (index + 1) * spec.shard_sequences)
                outputs = extract_sequences(model, tokenizer, read_texts(split_path(corpus_dir, split), start, stop),
                                            spec.k, spec.batch_tokens, first_row=start,
                                            sample_temperature=spec.sample_temperature if spec.targets == "sample"
                                            else None)
                if pending is not None:
                    written.shard_written(pending.result())  # at most one shard waits: memory stays bounded
                positions = sum(len(o.input_ids) for o in outputs)
                pending = writer.submit(_write_logit_shard, store, split, index, key, start, outputs, vocab_size,
                                        positions)
                tokens += positions
                bar.update(stop - start)
                bar.set_postfix(tok_s=f"{tokens / max(bar.format_dict['elapsed'], 1e-9):.0f}", refresh=False)
            if pending is not None:
                written.shard_written(pending.result())
        bar.close()
    return _finish(store, key, parts, spec, plan, vocab_size)


def worker_count(requested: int, device: torch.device) -> int:
    """extract.workers, with 0 resolved: one worker per GPU on CUDA, else one per CPU core (on 2 cores, two
    single-threaded workers of a small model fill a store 1.14x faster than one process on both: params.yaml)."""
    if requested:
        return requested
    return max(1, torch.cuda.device_count()) if device.type == "cuda" else shards.available_cores()


def run_workers(command: list[str], workers: int, threads: int | None) -> None:
    """Run the extract stage's `command` with `--num-workers N --worker-index I` for every I at once and wait:
    worker I takes the shards with index % N == I (so the store is the same as one process's), GPU I where there
    are N GPUs, else 1/N of the CPU threads. ExtractionError names the first worker that failed, with its error."""
    gpus = torch.cuda.device_count()
    share = max(1, (threads or shards.available_cores()) // workers)
    processes = []
    for index in range(workers):
        env = {**os.environ, **({"CUDA_VISIBLE_DEVICES": str(index)} if gpus >= workers else {})}
        worker = [*command, "--num-workers", str(workers), "--worker-index", str(index), "--threads", str(share)]
        processes.append(subprocess.Popen(worker, env=env, stderr=subprocess.PIPE, text=True))
    errors = [(index, process.communicate()[1], process.returncode) for index, process in enumerate(processes)]
    for index, stderr, code in errors:
        if code != 0:
            last = next((line for line in reversed(stderr.splitlines()) if line.strip()), "no output")
            raise ExtractionError(f"extract worker {index} of {workers} failed (exit {code}): {last}")


def _write_logit_shard(store: Path, split: str, index: int, key: str, start: int, outputs: list[SequenceLogits],
                       vocab_size: int, positions: int) -> shards.ShardRecord:
    """Encode and write one shard (in the writer thread, while the next shard computes)."""
    table = shards.logit_table(list(range(start, start + len(outputs))), outputs, vocab_size)
    return shards.write_shard(store, split, index, key, table, positions)


def _finish(store: Path, key: str, parts: dict, spec: Extract, plan: dict[str, int], vocab_size: int) -> dict | None:
    splits = shards.split_records(store, key, plan)
    if splits is None:
        return None
    manifest = {"key": key, "key_parts": parts, "codec": CODEC, "k": spec.k, "targets": spec.targets,
                "vocab_size": vocab_size,
                "splits": splits}
    shards.write_manifest(store, manifest)
    return manifest
