"""Sequences into batches under a token budget: the scoring, extraction and soup passes all run this way.

Every sequence starts with the tokenizer's BOS (or EOS where a family has none); batches are planned longest first so
each one's padded size (count x longest) stays within the budget, then right-padded with an attention mask.
"""
from __future__ import annotations

from typing import Sequence

import torch

from fusesoup.errors import StageError


def bos_token_id(tokenizer) -> int:
    """The id put in front of every sequence: BOS, or EOS for families without one (GPT-2 style)."""
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if bos is None:
        raise StageError(f"tokenizer {type(tokenizer).__name__} ({tokenizer.name_or_path}) has neither a BOS nor "
                         "an EOS token to start sequences with")
    return bos


def encode_text(tokenizer, texts: Sequence[str], **options):
    """The tokenizer's encoding of corpus `texts` as text: no special token added, and a special token spelled in the
    text (`<|endoftext|>` or `<s>` in code about language models) encoded as the characters it is, not as its id, so
    special ids appear only where the pipeline puts them (bos_token_id). `options` go to the tokenizer's call."""
    return tokenizer(list(texts), add_special_tokens=False, split_special_tokens=True, **options)


def plan_batches(lengths: Sequence[int], batch_tokens: int) -> list[list[int]]:
    """Indices grouped so that each batch's padded size (count x longest) stays within batch_tokens.

    Longest first, so every batch's first sequence is its longest; a sequence longer than the budget goes alone.
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches: list[list[int]] = []
    for i in order:
        if batches and (len(batches[-1]) + 1) * lengths[batches[-1][0]] <= batch_tokens:
            batches[-1].append(i)
        else:
            batches.append([i])
    return batches


def pad_batch(sequences: Sequence[Sequence[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask), both [len(sequences), longest], right-padded with `pad` / 0."""
    width = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), width), pad, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, sequence in enumerate(sequences):
        input_ids[row, : len(sequence)] = torch.tensor(sequence, dtype=torch.long)
        mask[row, : len(sequence)] = 1
    return input_ids, mask
