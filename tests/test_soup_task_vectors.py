"""Task arithmetic and TIES relative to a base: against dense element-by-element references, and streamed to disk."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM

from fusesoup.soup.checkpoint import SoupError
from fusesoup.soup.merge import checked_sources, plan_linear, write_merge
from fusesoup.soup.mergekit import task_vector_config
from fusesoup.soup.relative import Settings, task_vector_combine
from fusesoup.soup.task_vectors import task_arithmetic, ties, trim


def random_tensors(count: int, shape=(7, 9), seed: int = 0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=generator, dtype=torch.float64) for _ in range(count)]


def dense_ties(base: np.ndarray, tensors: list[np.ndarray], weights: list[float], density: float) -> np.ndarray:
    """TIES one element at a time: trim each task vector, elect each element's sign, average the agreeing ones."""
    deltas = []
    for tensor in tensors:
        delta = (tensor - base).ravel()
        keep = max(1, int(density * delta.size))
        kept = np.zeros_like(delta)
        order = sorted(range(delta.size), key=lambda j: -abs(delta[j]))[:keep]
        kept[order] = delta[order]
        deltas.append(kept)
    out = base.ravel().copy()
    for j in range(out.size):
        weighted = [w * d[j] for w, d in zip(weights, deltas)]
        sign = 1.0 if sum(weighted) >= 0 else -1.0
        agreeing = [(w, x) for w, x in zip(weights, weighted) if x != 0 and np.sign(x) == sign]
        total = sum(w for w, _ in agreeing)
        out[j] += sum(x for _, x in agreeing) / (total if total != 0 else 1.0)
    return out.reshape(base.shape)


def test_trim_keeps_the_largest_magnitudes():
    delta = torch.tensor([0.1, -3.0, 2.0, -0.5, 0.0, 1.0])
    assert trim(delta, 0.5).tolist() == [0.0, -3.0, 2.0, 0.0, 0.0, 1.0]
    assert trim(delta, 0.01).tolist() == [0.0, -3.0, 0.0, 0.0, 0.0, 0.0]  # at least one element
    assert torch.equal(trim(delta, 1.0), delta)


def test_task_arithmetic_is_the_weighted_sum_of_task_vectors():
    base, *tensors = random_tensors(4)
    out = task_arithmetic(base, tensors, [0.5, 0.3, -0.2], lam=0.8)
    expected = base + 0.8 * sum(w * (t - base) for w, t in zip([0.5, 0.3, -0.2], tensors))
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-12)
    normalized = task_arithmetic(base, tensors, [0.5, 0.3, -0.2], normalize=True)
    torch.testing.assert_close(normalized, base + sum(w * (t - base) for w, t in zip([0.5, 0.3, -0.2], tensors)) / 0.6,
                               rtol=0, atol=1e-12)


@pytest.mark.parametrize("density", [1.0, 0.5, 0.2])
def test_ties_equals_the_dense_reference(density):
    base, *tensors = random_tensors(4, seed=int(density * 10))
    weights = [1.0, 0.6, 0.3]
    out = ties(base, tensors, weights, density)
    expected = dense_ties(base.numpy(), [t.numpy() for t in tensors], weights, density)
    np.testing.assert_allclose(out.numpy(), expected, rtol=0, atol=1e-12)
    half = ties(base.to(torch.bfloat16), [t.to(torch.bfloat16) for t in tensors], weights, density)
    assert half.dtype == torch.bfloat16


def test_a_ties_merge_streams_to_disk_tensor_by_tensor(tmp_path):
    config = LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=2, vocab_size=40)
    dirs = []
    for seed in range(3):
        torch.manual_seed(seed)
        dirs.append(tmp_path / f"m{seed}")
        LlamaForCausalLM(config).save_pretrained(dirs[-1])
    plan = plan_linear(dirs, lambda name: (0.0, 0.7, 0.4))
    write_merge(plan, checked_sources(plan, dirs), tmp_path / "out",
                combine=task_vector_combine("ties", 0, Settings(density=0.3)))
    merged = load_file(tmp_path / "out/model.safetensors")
    states = [load_file(d / "model.safetensors") for d in dirs]
    for name, value in merged.items():
        assert torch.equal(value, ties(states[0][name], [states[1][name], states[2][name]], [0.7, 0.4], 0.3)), name
    assert task_vector_config("ties", "m0", ["m1", "m2"], [0.7, 0.4], Settings(density=0.3), "BF16") == {
        "merge_method": "ties", "base_model": "m0", "dtype": "float32", "out_dtype": "bfloat16",
        "parameters": {"normalize": True, "lambda": 1.0},
        "models": [{"model": "m1", "parameters": {"weight": 0.7, "density": 0.3}},
                   {"model": "m2", "parameters": {"weight": 0.4, "density": 0.3}}]}
    with pytest.raises(SoupError, match="merge method 'dare': not one of task_arithmetic, ties, sce"):
        task_vector_combine("dare", 0)
