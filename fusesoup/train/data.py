"""The continued-training data of train@<variant>: the train split's documents from the fused store (train@fused) or
the target's own logit store (train@clm), streamed into packed blocks, and the key a run's checkpoints are kept under.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from fusesoup.errors import StageError
from fusesoup.logits.codec import dequantize_ce
from fusesoup.logits.sparse import Chunks, decode_ranks
from fusesoup.logits.sparse_store import FUSED_EXTRAS, SparseStore
from fusesoup.logits.store import LogitStore, ShardedStore
from fusesoup.models import context_length
from fusesoup.params import ContinuedTraining, Params, train_keys
from fusesoup.storage import content_key
from fusesoup.train.engine import rank_and_world
from fusesoup.train.packing import TrainSequence
from fusesoup.train.recipe import special_ids
from fusesoup.train.stream import TrainStream

SPLIT = "train"


def training_store(variant: str, fused: Path, target_logits: Path) -> ShardedStore:
    """train@fused reads the fused store, train@clm the target's logit store (its tokens only)."""
    return SparseStore(fused, FUSED_EXTRAS) if variant == "fused" else LogitStore(target_logits)


def read_documents(store: ShardedStore, shard: int | None = None, spec: ContinuedTraining | None = None
                   ) -> list[TrainSequence]:
    """The train split's documents (or one shard's), in stored order, with their fused rows from a fused store, and
    their chunks and rank rows where `spec` turns the chunk or ULD term on (else neither is decoded or held)."""
    if isinstance(store, SparseStore):
        chunked, ranked = spec is not None and spec.chunk_weight > 0, spec is not None and spec.uld_weight > 0
        def document(s):
            chunks = Chunks(s.extras["chunk_end"], dequantize_ce(s.extras["chunk_ce_codes"])) if chunked else None
            return TrainSequence(s.input_ids, s.rows, chunks,
                                 decode_ranks(s.extras["rank_codes"], len(s.input_ids)) if ranked else None)
        return [document(s) for batch in store.iter_batches(SPLIT, 256, shard) for s in batch]
    return [TrainSequence(s.logits.input_ids, None) for batch in store.iter_batches(SPLIT, 256, shard) for s in batch]


def document_lengths(store: ShardedStore) -> list[np.ndarray]:
    """Per shard of the train split, its documents' token counts (the input_ids column alone is read)."""
    return [np.concatenate([batch.column("input_ids").value_lengths().to_numpy(zero_copy_only=False)
                            for batch in store.record_batches(SPLIT, 4096, shard, columns=["input_ids"])]
                           or [np.zeros(0, dtype=np.int32)])
            for shard in range(len(store.shards(SPLIT)))]


def train_stream(variant: str, params: Params, model, fused: Path, target_logits: Path) -> tuple[TrainStream, str]:
    """The stage's steps: the store streamed a window of train.window_shards shards at a time into
    train.block_size blocks for `model` (this rank's fused rows only, under torch.distributed), and the key of the
    store."""
    store = training_store(variant, fused, target_logits)
    lengths = document_lengths(store)
    if not sum(int(shard.sum()) for shard in lengths):
        raise StageError(f"no training tokens in the {SPLIT} split of {store.directory} for train@{variant}")
    spec, context = params.train, context_length(model.config)
    if spec.block_size > context:
        raise StageError(f"train.block_size {spec.block_size} is longer than the context of {params.target} "
                         f"({context} tokens)")
    stream = TrainStream(lambda shard: read_documents(store, shard, spec), lengths, spec.window_shards, spec.block_size,
                         special_ids(model.config).bos, context, spec.batch_tokens, spec.steps, params.seed,
                         *rank_and_world())
    return stream, store.manifest["key"]


def run_key(variant: str, params: Params, data_key: str, base_fingerprint: dict) -> str:
    """What a run's checkpoints are valid for: a run resumes from a checkpoint only under the same key (the same
    variant, the train params it reads (params.train_keys: train@clm's leave the fusion terms out), seed, data store
    and base model)."""
    every = params.train.model_dump(by_alias=True)
    train = {key: every[key] for key in train_keys(variant)}
    return content_key({"variant": variant, "train": train, "seed": params.seed, "data": data_key,
                        "base": base_fingerprint})
