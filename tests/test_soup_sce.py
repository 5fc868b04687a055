"""SCE relative to a base (fusesoup.soup.sce): against a dense element-by-element reference, mergekit's edge cases
(select_topk = 1, the 1e-6 floors, a zero sum), streamed to disk, exported to mergekit and replayed by it bit for
bit, and chosen as a strategy."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from fusesoup.params import Soup, TaskVectors
from fusesoup.soup.merge import checked_sources, plan_linear, write_merge
from fusesoup.soup.mergekit import task_vector_config
from fusesoup.soup.recipes import Kitchen, cook
from fusesoup.soup.relative import Settings, lambdas_for, settings_for, task_vector_combine
from fusesoup.soup.sce import sce, select
from tests.helpers import LAYERS, save_model, state_dict

MERGEKIT_YAML = Path(sys.executable).with_name("mergekit-yaml")  # installed with the test dependencies


def random_tensors(count: int, shape=(7, 9), seed: int = 0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=generator, dtype=torch.float64) for _ in range(count)]


def dense_sce(base: np.ndarray, tensors: list[np.ndarray], select_topk: float) -> np.ndarray:
    """SCE one element at a time, as FuseChat-2.0 states it, with mergekit's choices: Select the elements of top
    variance among those of nonzero variance (all for select_topk = 1); Calculate each variant's weight as its sum of
    squares over all variants'; Erase the elements whose sign is not the sum's (0 counts as +); the weighted mean of
    the rest, its divisor floored at 1e-6."""
    deltas = [(tensor - base).ravel() for tensor in tensors]
    size = base.size
    if select_topk < 1:
        variance = [sum((d[j] - sum(e[j] for e in deltas) / len(deltas)) ** 2 for d in deltas) / len(deltas)
                    for j in range(size)]
        keep = int(sum(v != 0 for v in variance) * select_topk)
        chosen = set(sorted(range(size), key=lambda j: -variance[j])[:keep])
        deltas = [np.array([d[j] if j in chosen else 0.0 for j in range(size)]) for d in deltas]
    squares = [sum(x * x for x in d) for d in deltas]
    weights = [s / sum(squares) for s in squares]
    out = base.ravel().copy()
    for j in range(size):
        sign = 1.0 if sum(d[j] for d in deltas) >= 0 else -1.0
        agreeing = [(w, d[j]) for w, d in zip(weights, deltas) if d[j] != 0 and np.sign(d[j]) == sign]
        out[j] += sum(w * x for w, x in agreeing) / max(sum(w for w, _ in agreeing), 1e-6)
    return out.reshape(base.shape)


@pytest.mark.parametrize("count", [2, 3])
@pytest.mark.parametrize("select_topk", [1.0, 0.5, 0.2])
def test_sce_equals_the_dense_reference(count, select_topk):
    base, *tensors = random_tensors(count + 1, seed=count + int(select_topk * 10))
    out = sce(base, tensors, select_topk)
    expected = dense_sce(base.numpy(), [t.numpy() for t in tensors], select_topk)
    np.testing.assert_allclose(out.numpy(), expected, rtol=0, atol=1e-12)
    if select_topk < 1:  # Select changed the result
        assert not np.allclose(expected, dense_sce(base.numpy(), [t.numpy() for t in tensors], 1.0))
    vector = sce(base[0], [t[0] for t in tensors], select_topk)  # a 1-D tensor (a norm's weight)
    np.testing.assert_allclose(vector.numpy(), dense_sce(base[0].numpy(), [t[0].numpy() for t in tensors],
                                                         select_topk), rtol=0, atol=1e-12)


def test_select_counts_only_elements_of_nonzero_variance_and_keeps_all_at_one():
    # elements 0-3: every variant moved alike (variance 0); elements 4-9: variances 1, 4, 9, ... in that order
    deltas = torch.tensor([[1.0, 1.0, -2.0, 0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0],
                           [1.0, 1.0, -2.0, 0.0, -1.0, -2.0, -3.0, -4.0, -5.0, -6.0]])
    assert select(deltas, 0.5).tolist() == [0.0] * 7 + [1.0] * 3  # int(6 * 0.5), not int(10 * 0.5)
    assert select(deltas, 0.99).tolist() == [0.0] * 5 + [1.0] * 5  # int(5.94): never a zero-variance element
    assert select(deltas, 1.0).tolist() == [1.0] * 10  # mergekit's select_topk = 1: no Select at all
    base = torch.zeros(10)
    kept = sce(base, list(deltas), 1.0)
    assert kept[:3].tolist() == [1.0, 1.0, -2.0]  # the shared moves survive at 1 ...
    assert sce(base, list(deltas), 0.99)[:4].tolist() == [0.0] * 4  # ... and are dropped below it


def test_a_zero_sum_elects_the_positive_sign():
    # weights 5/6 and 1/6 (mean squares 5 and 1); element 0 sums to 0, so only the positive delta takes part
    out = sce(torch.zeros(2, dtype=torch.float64), [torch.tensor([1.0, 3.0], dtype=torch.float64),
                                                    torch.tensor([-1.0, 1.0], dtype=torch.float64)])
    assert out[0].item() == 1.0 and out[1].item() == pytest.approx(5 / 6 * 3.0 + 1 / 6 * 1.0, rel=1e-12)


def test_weights_turn_uniform_below_the_floor_and_the_divisor_is_floored():
    base = torch.zeros(4, dtype=torch.float64)
    # mean squares 1e-8 and 4e-8: their sum is under 1e-6, so the weights are 1/2 each, not 1/5 and 4/5
    small = [torch.tensor([1e-4, 1e-4, 1e-4, 1e-4], dtype=torch.float64),
             torch.tensor([2e-4, 2e-4, 2e-4, -2e-4], dtype=torch.float64)]
    torch.testing.assert_close(sce(base, small), torch.tensor([1.5e-4, 1.5e-4, 1.5e-4, -2e-4], dtype=torch.float64),
                               rtol=1e-12, atol=0)
    # a variant of weight ~2e-8 agreeing alone: divided by the 1e-6 floor, not by its own weight
    large = torch.tensor([1.0, 1.0, 0.0, 0.0], dtype=torch.float64)
    tiny = torch.tensor([1e-4, 1e-4, 1e-4, 1e-4], dtype=torch.float64)
    weight = 1e-8 / (0.5 + 1e-8)
    out = sce(base, [large, tiny])
    assert out[2].item() == pytest.approx(weight * 1e-4 / 1e-6, rel=1e-12) and out[2].item() < 1e-5
    assert out[0].item() == pytest.approx(((1 - weight) * 1.0 + weight * 1e-4), rel=1e-12)


def test_half_precision_is_computed_in_float32_and_cast_back():
    halves = [t.to(torch.bfloat16) for t in random_tensors(3, seed=5)]
    out = sce(halves[0], halves[1:], 0.5)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, sce(halves[0].float(), [t.float() for t in halves[1:]], 0.5).to(torch.bfloat16))


def sce_soup(tmp_path: Path, variants: int, select_topk: float, dtype: torch.dtype) -> tuple[list[Path], Path]:
    """Ingredient 0 (the base) and `variants` others as tiny Llamas (tests/test_soup_merge.save_model), merged by
    the stage's streaming writer into tmp_path/ours; returns (ingredient dirs, the mergekit.yaml exported)."""
    dirs = [save_model(tmp_path / f"m{seed}", seed, dtype) for seed in range(variants + 1)]
    plan = plan_linear(dirs, lambda name: (0.0, *[0.7] * variants))  # sce ignores the weights
    write_merge(plan, checked_sources(plan, dirs), tmp_path / "ours",
                combine=task_vector_combine("sce", 0, Settings(select_topk=select_topk)))
    header = {torch.bfloat16: "BF16", torch.float32: "F32"}[dtype]
    config = task_vector_config("sce", str(dirs[0]), [str(d) for d in dirs[1:]], [0.7] * variants,
                                Settings(select_topk=select_topk), header)
    (tmp_path / "mergekit.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return dirs, tmp_path / "mergekit.yaml"


def test_an_sce_merge_streams_to_disk_and_exports_mergekit_sce(tmp_path):
    dirs, exported = sce_soup(tmp_path, 2, 0.3, torch.bfloat16)
    merged = load_file(tmp_path / "ours/model.safetensors")
    states = [load_file(d / "model.safetensors") for d in dirs]
    assert set(merged) == set(states[0])
    for name, value in merged.items():
        assert value.dtype == torch.bfloat16
        assert torch.equal(value, sce(states[0][name], [states[1][name], states[2][name]], 0.3)), name
    assert yaml.safe_load(exported.read_text()) == {
        "merge_method": "sce", "base_model": str(dirs[0]), "dtype": "float32", "out_dtype": "bfloat16",
        "parameters": {"select_topk": 0.3}, "models": [{"model": str(dirs[1])}, {"model": str(dirs[2])}]}


@pytest.mark.parametrize("variants, select_topk, dtype", [(2, 0.5, torch.bfloat16), (3, 0.3, torch.float32),
                                                          (3, 1.0, torch.bfloat16)])
def test_mergekit_replays_the_sce_soup_bit_for_bit(tmp_path, variants, select_topk, dtype):
    """mergekit 0.1.5 (a test dependency) run on the exported mergekit.yaml writes the very tensors we wrote."""
    _, exported = sce_soup(tmp_path, variants, select_topk, dtype)
    done = subprocess.run([str(MERGEKIT_YAML), str(exported), str(tmp_path / "theirs"), "--no-cuda",
                           "--no-copy-tokenizer", "--no-write-model-card", "--quiet"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    ours, theirs = state_dict(tmp_path / "ours"), state_dict(tmp_path / "theirs")
    assert set(ours) == set(theirs) and len(ours) == 9 * LAYERS + 3
    for name, tensor in ours.items():
        assert theirs[name].dtype == dtype and torch.equal(tensor, theirs[name]), name


def test_sce_as_a_strategy_takes_select_topk_and_no_lambda():
    spec = Soup(strategies=["ties", "sce"], task_vectors=TaskVectors(density=0.4, lambdas=[0.5, 1.0],
                                                                     select_topk=0.25))
    assert settings_for("sce", spec.task_vectors, 0.5) == Settings(1.0, 1.0, 0.25)
    assert settings_for("ties", spec.task_vectors, 0.5) == Settings(0.4, 0.5, 1.0)
    assert lambdas_for("sce", spec.task_vectors) == [1.0] and lambdas_for("ties", spec.task_vectors) == [0.5, 1.0]
    calls = []

    def score_merge(method: str, weights: list[float], settings: Settings) -> float:
        calls.append((method, weights, settings))
        return 2.0 - settings.lam / 10
    unused = lambda *args: pytest.fail("only the relative merges are cooked")  # noqa: E731
    soups = cook(Kitchen(spec, ["base", "clm", "fused"], [2.0, 1.9, 1.8], unused, unused, score_merge, unused))
    weights = [0.0, 1.0, 1.0]
    assert calls == [("ties", weights, Settings(0.4, 0.5, 1.0)), ("ties", weights, Settings(0.4, 1.0, 1.0)),
                     ("sce", weights, Settings(1.0, 1.0, 0.25))]
    assert soups["soups"]["soup-sce"] == {"method": "sce", "base": "base", "weights": weights, "density": 1.0,
                                          "lambda": 1.0, "select_topk": 0.25, "valid_bpb": 1.9,
                                          "valid_bpb_by_lambda": {1.0: 1.9}}
    assert "sce" not in Soup().strategies  # opt-in
    for bad in (0.0, 1.5):
        with pytest.raises(ValueError, match="select_topk"):
            TaskVectors(select_topk=bad)
