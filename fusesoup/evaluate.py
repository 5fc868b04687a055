"""Bits per byte: a language-model score that does not depend on the tokenizer.

Every text is scored as [BOS] + its tokens; the NLL of each text token given its prefix is summed and divided by
the text's UTF-8 bytes (and ln 2), so models with different tokenizers and vocabularies compare fairly.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Sequence

import torch
import torch.nn.functional as F

from fusesoup.batching import bos_token_id, encode_text, pad_batch, plan_batches
from fusesoup.errors import StageError
from fusesoup.models import context_length


class BpbResult(NamedTuple):
    nll_nats: float  # summed over every scored token
    tokens: int  # scored tokens (the text's tokens; BOS is context, not scored)
    bytes: int  # UTF-8 bytes of the texts
    bpb: float  # nll_nats / ln 2 / bytes
    correct: int = 0  # scored tokens that were the model's most likely next token
    text_nats: tuple[float, ...] = ()  # each text's summed NLL, in input order (paired comparisons resample these)

    @property
    def accuracy(self) -> float:
        """Next-token accuracy: only comparable between models that share a tokenizer."""
        return self.correct / self.tokens if self.tokens else math.nan

    @staticmethod
    def total(results: Sequence["BpbResult"]) -> "BpbResult":
        """The result over the union of the texts of several results (e.g. every domain -> `all`)."""
        nll, tokens, size = sum(r.nll_nats for r in results), sum(r.tokens for r in results), sum(r.bytes for r in results)
        return BpbResult(nll, tokens, size, nll / math.log(2) / size if size else math.nan,
                         sum(r.correct for r in results), tuple(n for r in results for n in r.text_nats))


class ContextError(StageError):
    """A text does not fit the model's context (the corpus is chunked so that this does not happen)."""


def encode_texts(tokenizer, texts: Sequence[str]) -> list[list[int]]:
    """Each text as [BOS] + its tokens (no other special tokens): the sequences every score is computed on."""
    bos = bos_token_id(tokenizer)
    return [[bos] + list(ids) for ids in encode_text(tokenizer, texts)["input_ids"]]


def bits_per_byte(model, tokenizer, texts: Sequence[str], batch_tokens: int) -> BpbResult:
    """Summed NLL of `texts` under `model`, in nats and in bits per UTF-8 byte (see the module docstring), and how
    many next tokens were the model's argmax."""
    if batch_tokens <= 0:
        raise ValueError(f"batch_tokens must be positive, got {batch_tokens}")
    texts = list(texts)
    size = sum(len(text.encode("utf-8")) for text in texts)
    if not texts:
        return BpbResult(0.0, 0, 0, math.nan)
    sequences = encode_texts(tokenizer, texts)
    bos = sequences[0][0]
    context = context_length(model.config)
    longest = max(range(len(sequences)), key=lambda i: len(sequences[i]))
    if len(sequences[longest]) > context:
        raise ContextError(
            f"text {longest} is {len(sequences[longest])} tokens with BOS ({len(texts[longest].encode())} bytes) but "
            f"the model context is {context} ({getattr(model.config, '_name_or_path', '') or model.config.model_type})")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else bos
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    nll, correct, text_nats = torch.zeros((), dtype=torch.float64), 0, [0.0] * len(texts)
    try:
        with torch.inference_mode():
            for batch in plan_batches([len(s) for s in sequences], batch_tokens):
                input_ids, mask = pad_batch([sequences[i] for i in batch], pad)
                input_ids, mask = input_ids.to(device), mask.to(device)
                logits = model(input_ids=input_ids, attention_mask=mask).logits[:, :-1].float()
                targets = input_ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
                # cross_entropy's own two steps, so that the sum is the same number and the per-text split is free
                logp = F.log_softmax(logits.reshape(-1, logits.shape[-1]), dim=1)
                nll += F.nll_loss(logp, targets.reshape(-1), ignore_index=-100, reduction="sum").double().cpu()
                per_text = F.nll_loss(logp, targets.reshape(-1), ignore_index=-100, reduction="none")
                for i, value in zip(batch, per_text.view(len(batch), -1).double().sum(1).tolist()):
                    text_nats[i] = value
                correct += int(((logits.argmax(-1) == targets) & (targets >= 0)).sum())
    finally:
        model.train(was_training)
    tokens = sum(len(s) - 1 for s in sequences)
    nll_nats = float(nll)
    return BpbResult(nll_nats, tokens, size, nll_nats / math.log(2) / size if size else math.nan, correct,
                     tuple(text_nats))


def score_by_domain(model, tokenizer, frame, batch_tokens: int) -> dict[str, BpbResult]:
    """Scores of a corpus split frame (doc_id, domain, text) per domain, in domain order, plus `all`."""
    results = {domain: bits_per_byte(model, tokenizer, frame.filter(frame["domain"] == domain)["text"].to_list(),
                                     batch_tokens)
               for domain in sorted(frame["domain"].unique().to_list())}
    results["all"] = BpbResult.total(list(results.values()))
    return results
