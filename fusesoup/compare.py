"""Paired bootstrap confidence intervals for "model A has lower bits per byte than model B" on the same documents.

Both models score the same test documents, so a document's difficulty cancels in the difference: resampling
documents with replacement and recomputing each resample's bpb difference (total bits / total bytes, as bpb itself
is computed) gives an interval for the difference that a single number cannot. A win is called only when the interval
excludes zero.
"""
from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

from fusesoup.params import TRAINED_MODELS

RESAMPLES = 1000
LEVEL = 0.95
SEED = 0
UNIT = "test documents"
_BLOCK = 64  # resamples drawn at once: memory is _BLOCK x documents indices


class Interval(NamedTuple):
    """bpb(A) - bpb(B) on all the documents, and the bootstrap interval around it (negative: A is better)."""

    diff: float
    low: float
    high: float

    def verdict(self) -> str:
        """'better' or 'worse' when the interval excludes zero, else 'tie' (the difference may be noise)."""
        if self.high < 0:
            return "better"
        return "worse" if self.low > 0 else "tie"


def paired_bootstrap(bits_a: np.ndarray, bits_b: np.ndarray, sizes: np.ndarray, resamples: int = RESAMPLES,
                     level: float = LEVEL, seed: int = SEED) -> Interval:
    """Percentile interval at `level` of bpb(A) - bpb(B) over `resamples` resamples of the documents with replacement.

    `bits_a[i]`, `bits_b[i]`: document i's summed NLL in bits under A and B; `sizes[i]`: its UTF-8 bytes. Each
    resample draws len(sizes) document indices; its difference is (sum bits_a - sum bits_b) / sum sizes over them.
    """
    bits_a, bits_b, sizes = (np.asarray(v, dtype=np.float64) for v in (bits_a, bits_b, sizes))
    if not (bits_a.shape == bits_b.shape == sizes.shape) or bits_a.ndim != 1 or not len(sizes):
        raise ValueError(f"need one non-empty row of bits per model and of sizes, got shapes {bits_a.shape}, "
                         f"{bits_b.shape}, {sizes.shape}")
    if not 0 < level < 1 or resamples < 1:
        raise ValueError(f"level must be in (0, 1) and resamples positive, got {level}, {resamples}")
    gap, count = bits_a - bits_b, len(sizes)
    rng = np.random.default_rng(seed)
    diffs = np.empty(resamples)
    for start in range(0, resamples, _BLOCK):
        rows = rng.integers(0, count, size=(min(_BLOCK, resamples - start), count))
        diffs[start:start + len(rows)] = gap[rows].sum(axis=1) / sizes[rows].sum(axis=1)
    tail = (1 - level) / 2
    low, high = np.quantile(diffs, [tail, 1 - tail])
    return Interval(float(gap.sum() / sizes.sum()), float(low), float(high))


def document_totals(doc_ids: list[str], nats: list[float] | tuple[float, ...], sizes: list[int]
                    ) -> tuple[np.ndarray, np.ndarray]:
    """Per-chunk NLL (nats) and UTF-8 bytes -> per-document bits and bytes, documents in first-seen order.

    A chunk's doc_id is `<document hash>-<chunk index>` (corpus/prepare.py:doc_id): chunks of one document are
    resampled together, since they are not independent of each other.
    """
    if not len(doc_ids) == len(nats) == len(sizes):
        raise ValueError(f"{len(doc_ids)} doc_ids, {len(nats)} scores and {len(sizes)} sizes: one each per chunk")
    documents = list(dict.fromkeys(doc_id.rsplit("-", 1)[0] for doc_id in doc_ids))
    index = {document: i for i, document in enumerate(documents)}
    rows = np.array([index[doc_id.rsplit("-", 1)[0]] for doc_id in doc_ids], dtype=np.int64)
    bits = np.bincount(rows, weights=np.asarray(nats, dtype=np.float64), minlength=len(documents)) / np.log(2)
    return bits, np.bincount(rows, weights=np.asarray(sizes, dtype=np.float64), minlength=len(documents))


def document_scores(frame, results: dict[str, Any]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """evaluate.score_by_domain's results for `frame` (doc_id, domain, text) as each document's bits and bytes per
    domain and `all` (the unit the paired bootstrap resamples), documents in the order the texts were scored."""
    domains = [domain for domain in results if domain != "all"]
    rows = {domain: frame.filter(frame["domain"] == domain) for domain in domains}
    ids = {domain: rows[domain]["doc_id"].to_list() for domain in domains}
    sizes = {domain: rows[domain]["text"].str.len_bytes().to_list() for domain in domains}
    ids["all"] = [doc_id for domain in domains for doc_id in ids[domain]]
    sizes["all"] = [size for domain in domains for size in sizes[domain]]
    return {domain: document_totals(ids[domain], results[domain].text_nats, sizes[domain]) for domain in results}


def comparison_pairs(models: list[str], target: str, soups: dict[str, list[str]]) -> list[tuple[str, str, str | None]]:
    """(A, B, domain) of every claim the report makes: target-fused against target-clm and the target on each domain
    (domain None: every domain), each soup against each of its ingredients on `all`. Only pairs of `models`."""
    clm, fused = TRAINED_MODELS
    pairs = [(fused, baseline, None) for baseline in (clm, target)]
    pairs += [(soup, ingredient, "all") for soup, ingredients in soups.items() for ingredient in ingredients]
    return [(a, b, domain) for a, b, domain in pairs if a in models and b in models and a != b]


def compare(documents: dict[str, dict[str, tuple[np.ndarray, np.ndarray]]],
            pairs: list[tuple[str, str, str | None]]) -> dict[str, dict[str, dict[str, float | str]]]:
    """`"A vs B"` -> domain -> {diff, low, high, verdict} for each pair, from model -> domain -> (bits, bytes) per
    document (the same documents, in the same order, for every model)."""
    out: dict[str, dict[str, dict[str, float | str]]] = {}
    for a, b, domain in pairs:
        for name in [domain] if domain is not None else list(documents[a]):
            (bits_a, sizes), (bits_b, sizes_b) = documents[a][name], documents[b][name]
            if not np.array_equal(sizes, sizes_b):
                raise ValueError(f"{a} and {b} were scored on different documents of {name!r}")
            interval = paired_bootstrap(bits_a, bits_b, sizes)
            out.setdefault(f"{a} vs {b}", {})[name] = interval._asdict() | {"verdict": interval.verdict()}
    return out


def bootstrap_settings() -> dict[str, float | int | str]:
    """How the intervals were made, for metrics and the report."""
    return {"level": LEVEL, "resamples": RESAMPLES, "unit": UNIT, "seed": SEED,
            "statistic": "bpb(A) - bpb(B), total bits / total bytes of each resample"}
