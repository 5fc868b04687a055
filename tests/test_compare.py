"""Paired bootstrap intervals: against a direct numpy reference, an interval that must hold zero and one that must
not, per-document totals from chunks, which pairs are compared, and the eval.json entries."""
from __future__ import annotations

import math

import numpy as np
import polars as pl
import pytest

from fusesoup.compare import (
    Interval, compare, comparison_pairs, document_scores, document_totals, paired_bootstrap,
)
from fusesoup.evaluate import BpbResult


def reference_interval(bits_a, bits_b, sizes, resamples=1000, level=0.95, seed=0) -> tuple[float, float, float]:
    """One resample at a time: n document indices drawn with replacement, (bits A - bits B) / bytes over them."""
    rng = np.random.default_rng(seed)
    diffs = []
    for _ in range(resamples):
        rows = rng.integers(0, len(sizes), size=len(sizes))
        diffs.append((bits_a[rows].sum() - bits_b[rows].sum()) / sizes[rows].sum())
    low, high = np.quantile(diffs, [(1 - level) / 2, (1 + level) / 2])
    return (bits_a.sum() - bits_b.sum()) / sizes.sum(), low, high


def documents(count: int, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Bytes per document and model B's bits: documents of very different sizes and difficulty."""
    rng = np.random.default_rng(seed)
    sizes = rng.integers(50, 5000, size=count).astype(float)
    return sizes * rng.uniform(0.5, 3.0, size=count), sizes


def test_the_interval_is_the_direct_computation():
    bits_b, sizes = documents(300)
    bits_a = bits_b + np.random.default_rng(2).normal(0, 20, size=300)
    for resamples, level, seed in [(1000, 0.95, 0), (130, 0.9, 7)]:  # 130: the last block of resamples is short
        got = paired_bootstrap(bits_a, bits_b, sizes, resamples, level, seed)
        assert got == pytest.approx(reference_interval(bits_a, bits_b, sizes, resamples, level, seed), rel=1e-12)


def test_noise_that_averages_out_is_a_tie_and_a_steady_gain_is_a_win():
    bits_b, sizes = documents(400)
    noise = np.random.default_rng(3).normal(0, 0.05, size=400) * sizes  # +-5% per document, no bias
    noise -= noise.sum() * sizes / sizes.sum()  # exactly zero over all documents
    tie = paired_bootstrap(bits_b + noise, bits_b, sizes)
    assert tie.diff == pytest.approx(0, abs=1e-12)
    assert tie.low < 0 < tie.high and tie.high - tie.low > 0.002 and tie.verdict() == "tie"
    gain = paired_bootstrap(bits_b + noise - 0.02 * sizes, bits_b, sizes)  # 0.02 bits per byte better everywhere
    assert gain.diff == pytest.approx(-0.02, abs=1e-12)
    assert gain.low < -0.02 < gain.high < 0 and gain.verdict() == "better"
    assert paired_bootstrap(bits_b, bits_b + noise - 0.02 * sizes, sizes).verdict() == "worse"


def test_pairing_removes_what_both_models_find_hard():
    """Documents differ far more in difficulty than the models do: the paired interval is narrow and excludes zero;
    the same numbers taken as two unrelated samples would not."""
    bits_b, sizes = documents(200)
    bits_a = bits_b - 0.01 * sizes
    paired = paired_bootstrap(bits_a, bits_b, sizes)
    assert paired == Interval(pytest.approx(-0.01), pytest.approx(-0.01), pytest.approx(-0.01))
    rng = np.random.default_rng(0)
    unpaired = [(bits_a[rng.integers(0, 200, 200)].sum() / sizes[rows := rng.integers(0, 200, 200)].sum()
                 - bits_b[rows].sum() / sizes[rows].sum()) for _ in range(200)]
    assert min(unpaired) < 0 < max(unpaired)


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match=r"one non-empty row of bits per model and of sizes, got shapes \(2,\), \(3,\)"):
        paired_bootstrap(np.ones(2), np.ones(3), np.ones(3))
    with pytest.raises(ValueError, match="level must be in"):
        paired_bootstrap(np.ones(2), np.ones(2), np.ones(2), level=1.0)


def test_chunks_of_a_document_are_one_unit():
    bits, sizes = document_totals(["aa-0000", "bb-0000", "aa-0001", "cc-0000"], [math.log(2) * v for v in (1, 2, 3, 4)],
                                  [10, 20, 30, 40])
    assert bits.tolist() == pytest.approx([4, 2, 4]) and sizes.tolist() == [40, 20, 40]
    with pytest.raises(ValueError, match="2 doc_ids, 1 scores and 2 sizes"):
        document_totals(["a-0000", "b-0000"], [1.0], [1, 2])


def test_document_scores_follow_the_order_texts_were_scored_in():
    frame = pl.DataFrame({"doc_id": ["p1-0000", "c1-0000", "p1-0001", "c2-0000"],
                          "domain": ["prose", "code", "prose", "code"], "text": ["ab", "cde", "é", "f"]})
    ln2 = math.log(2)
    results = {"code": BpbResult(0, 0, 4, 0, 0, (3 * ln2, 1 * ln2)), "prose": BpbResult(0, 0, 4, 0, 0, (2 * ln2, 5 * ln2))}
    results["all"] = BpbResult.total(list(results.values()))
    scores = document_scores(frame, results)
    assert {domain: (b.tolist(), s.tolist()) for domain, (b, s) in scores.items()} == {
        "code": ([3, 1], [3, 1]), "prose": ([7], [4]), "all": ([3, 1, 7], [3, 1, 4])}


def test_the_report_claims_are_the_pairs_compared():
    models = ["target-base", "teacher", "target-clm", "target-fused", "soup-vanilla", "soup-greedy"]
    soups = {"soup-vanilla": ["target-base", "target-clm", "target-fused"], "soup-greedy": ["target-clm", "ghost"]}
    assert comparison_pairs(models, "target-base", soups) == [
        ("target-fused", "target-clm", None), ("target-fused", "target-base", None),
        ("soup-vanilla", "target-base", "all"), ("soup-vanilla", "target-clm", "all"),
        ("soup-vanilla", "target-fused", "all"), ("soup-greedy", "target-clm", "all")]


def test_compare_writes_each_pair_per_domain_and_refuses_other_documents():
    bits_b, sizes = documents(50)
    scores = {"a": {"code": (bits_b - 0.1 * sizes, sizes), "all": (bits_b - 0.1 * sizes, sizes)},
              "b": {"code": (bits_b, sizes), "all": (bits_b, sizes)}}
    out = compare(scores, [("a", "b", None), ("b", "a", "all")])
    assert list(out) == ["a vs b", "b vs a"] and list(out["a vs b"]) == ["code", "all"] and list(out["b vs a"]) == ["all"]
    assert out["a vs b"]["all"] == {"diff": pytest.approx(-0.1), "low": pytest.approx(-0.1), "high": pytest.approx(-0.1),
                                    "verdict": "better"}
    assert out["b vs a"]["all"]["verdict"] == "worse"
    scores["b"]["code"] = (bits_b, sizes + 1)
    with pytest.raises(ValueError, match="a and b were scored on different documents of 'code'"):
        compare(scores, [("a", "b", "code")])
