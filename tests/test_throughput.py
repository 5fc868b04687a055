"""Model FLOPs utilisation: FLOPs per token from the model's shape, peaks by GPU name, the MFU column of the log."""
from __future__ import annotations

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from fusesoup.train import throughput
from fusesoup.train.loop import train_target
from fusesoup.train.throughput import flops_per_token, model_flops_utilisation, peak_flops
from tests.helpers import UNCHECKPOINTED, blocks, planned, tiny_model


def test_flops_per_token_count_every_multiplying_weight_once_and_attention_over_the_block():
    config = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=100)
    untied = LlamaForCausalLM(LlamaConfig(**config, tie_word_embeddings=False))
    layer = 32 * 32 + 2 * 32 * 16 + 32 * 32 + 3 * 32 * 64 + 2 * 32  # q, k and v (2 kv heads of 8), o, mlp, norms
    multiplying = 3 * layer + 32 + 100 * 32  # final norm and head; the embedding is a lookup
    assert flops_per_token(untied, 128) == 6 * multiplying + 12 * 3 * 32 * 128
    tied = LlamaForCausalLM(LlamaConfig(**config, tie_word_embeddings=True))  # the head still multiplies
    assert flops_per_token(tied, 128) == flops_per_token(untied, 128)
    gpt2 = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=100, n_positions=64))
    # wte and wpe are lookups, wte again as the tied head
    expected = sum(p.numel() for p in gpt2.parameters()) - 64 * 32
    assert flops_per_token(gpt2, 64) == 6 * expected + 12 * 2 * 32 * 64


def test_peak_flops_by_gpu_name_or_override_and_none_on_the_cpu(monkeypatch):
    cuda = torch.device("cuda", 0)
    for name, tflops in [("NVIDIA H100 80GB HBM3", 989.4), ("NVIDIA H100 PCIe", 756.0), ("NVIDIA H200", 989.4),
                         ("NVIDIA A100-SXM4-80GB", 312.0), ("NVIDIA L40S", 362.1), ("NVIDIA L4", 121.0)]:
        monkeypatch.setattr(throughput.torch.cuda, "get_device_name", lambda device, name=name: name)
        assert peak_flops(cuda) == pytest.approx(tflops * 1e12)
    monkeypatch.setattr(throughput.torch.cuda, "get_device_name", lambda device: "Some Future GPU")
    assert peak_flops(cuda) is None and peak_flops(cuda, 500.0) == 500e12
    assert peak_flops(torch.device("cpu")) is None
    assert model_flops_utilisation(1000.0, 6e9, 989.4e12, 8) == pytest.approx(1000 * 6e9 / (8 * 989.4e12))
    assert model_flops_utilisation(1000.0, 6e9, None, 8) is None


def test_the_log_has_an_mfu_column_empty_without_a_peak(tmp_path):
    log = train_target(tiny_model(), planned(blocks(True)), UNCHECKPOINTED, 0.9, "ce", 0, tmp_path / "a", "k", False)
    assert all(row["mfu"] == "" for row in log)
    model = tiny_model()
    per_token = flops_per_token(model, UNCHECKPOINTED.block_size)
    log = train_target(model, planned(blocks(True)), UNCHECKPOINTED, 0.9, "ce", 0, tmp_path / "b", "k", False,
                       peak_tflops=0.001)
    for row in log:
        assert row["mfu"] == pytest.approx(row["tok_s"] * per_token / 1e9, rel=1e-3, abs=1e-4)
