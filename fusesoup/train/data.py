"""The continued-training data of train@<variant>: the train split's documents from the fused store (train@fused) or
the target's own logit store (train@clm), packed into blocks, and the key a run's checkpoints are kept under.
"""
from __future__ import annotations

from pathlib import Path

from fusesoup.errors import StageError
from fusesoup.logits.sparse_store import FUSED_EXTRAS, SparseStore
from fusesoup.logits.store import LogitStore
from fusesoup.models import context_length
from fusesoup.params import Params
from fusesoup.storage import content_key
from fusesoup.train.packing import TrainBlock, TrainSequence, pack_documents
from fusesoup.train.recipe import special_ids


def load_documents(variant: str, fused: Path, target_logits: Path) -> tuple[list[TrainSequence], str]:
    """The train split's documents (with fused targets for `fused`) and the key of the store they come from."""
    if variant == "fused":
        store = SparseStore(fused, FUSED_EXTRAS)
        items = [TrainSequence(s.input_ids, s.rows) for batch in store.iter_batches("train", 256) for s in batch]
    else:
        store = LogitStore(target_logits)
        items = [TrainSequence(s.logits.input_ids, None) for batch in store.iter_batches("train", 256) for s in batch]
    if not items:
        raise StageError(f"no training sequences in the train split of {store.directory} for train@{variant}")
    return items, store.manifest["key"]


def load_blocks(variant: str, params: Params, model, fused: Path, target_logits: Path
                ) -> tuple[list[TrainBlock], str]:
    """load_documents packed into train.block_size blocks for `model`, and the key of their store."""
    items, key = load_documents(variant, fused, target_logits)
    context, block = context_length(model.config), params.train.block_size
    if block > context:
        raise StageError(f"train.block_size {block} is longer than the context of {params.target} ({context} tokens)")
    return pack_documents(items, block, special_ids(model.config).bos, context, params.seed), key


def run_key(variant: str, params: Params, data_key: str, base_fingerprint: dict) -> str:
    """What a run's checkpoints are valid for: a run resumes from a checkpoint only under the same key (the same
    variant, train params, seed, data store and base model)."""
    return content_key({"variant": variant, "train": params.train.model_dump(), "seed": params.seed,
                        "data": data_key, "base": base_fingerprint})
