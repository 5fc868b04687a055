"""Packing documents into blocks of a fixed number of tokens, as pretraining (and FuseLLM) does: documents are
joined as [BOS] doc [EOS] [BOS] doc ..., cut into rows of `block` tokens, and a document's remainder carries into
the next row, so no step computes on padding. The prediction of a document's BOS from the previous document is not
trained (its label is -100): no loss crosses a document boundary."""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

IGNORE = -100  # the label transformers' causal-LM loss skips


class BlockPacker:
    """A stream of documents cut into [rows, block] batches; what does not fill a batch waits for the next one."""

    def __init__(self, bos: int, eos: int, block: int):
        if block < 2:
            raise ValueError(f"block must hold at least 2 tokens, got {block}")
        self.bos, self.eos, self.block = bos, eos, block
        self._tokens = np.zeros(0, dtype=np.int64)
        self._starts = np.zeros(0, dtype=bool)  # True at each document's BOS

    def buffered(self) -> int:
        """Tokens waiting in the stream."""
        return len(self._tokens)

    def add(self, ids: Sequence[int]) -> None:
        """Append one document (token ids without specials) to the stream."""
        document = np.asarray([self.bos, *ids, self.eos], dtype=np.int64)
        starts = np.zeros(len(document), dtype=bool)
        starts[0] = True
        self._tokens = np.concatenate([self._tokens, document])
        self._starts = np.concatenate([self._starts, starts])

    def take(self, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(input_ids, labels), both [rows, block], from the front of the stream; labels are the input ids with
        every document's BOS masked. The stream must hold rows * block tokens."""
        size = rows * self.block
        if len(self._tokens) < size:
            raise ValueError(f"the stream holds {len(self._tokens)} tokens, fewer than {rows} x {self.block}")
        tokens, starts = self._tokens[:size], self._starts[:size]
        self._tokens, self._starts = self._tokens[size:], self._starts[size:]
        input_ids = torch.from_numpy(tokens.reshape(rows, self.block).copy())
        labels = input_ids.masked_fill(torch.from_numpy(starts.reshape(rows, self.block).copy()), IGNORE)
        return input_ids, labels
