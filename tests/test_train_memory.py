"""The memory plan: model states per engine and world size, activations against what autograd really saves, and a
run that cannot fit stopping in one line before its first step."""
from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from fusesoup.train.recipe import TrainingError
from fusesoup.train import loop
from fusesoup.train.loss import clm_loss, student_log_probs
from fusesoup.train.memory import MemoryPlan, check_fits, format_memory_plan, plan_memory
from tests.helpers import UNCHECKPOINTED, blocks, planned, tiny_model


def llama(hidden: int, layers: int, vocab: int) -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(hidden_size=hidden, intermediate_size=hidden * 11 // 4, num_hidden_layers=layers,
                                        num_attention_heads=4, num_key_value_heads=4, vocab_size=vocab))


def saved_bytes(model: torch.nn.Module, tokens: int) -> int:
    """The bytes autograd keeps for backward over one forward pass and the loss (distinct storages), in float32."""
    storages = {}

    def pack(tensor):
        storages[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    ids = torch.randint(0, model.config.vocab_size, (4, tokens // 4), generator=torch.Generator().manual_seed(0))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        log_probs = student_log_probs(model(input_ids=ids).logits[:, :-1])
        clm_loss(log_probs, ids[:, 1:], torch.ones_like(ids[:, 1:]))
    return sum(storages.values())


def test_model_states_follow_the_engine_and_the_world_size():
    model = llama(64, 2, 256)
    count = sum(p.numel() for p in model.parameters())
    single = plan_memory(model, None, 1, 512, 4, False)
    assert (single.engine, single.parameters, single.gradients, single.optimizer, single.gathered) == (
        "single", 4 * count, 4 * count, 8 * count, 0)
    ddp = plan_memory(model, "ddp", 8, 512, 4, False)
    assert ddp._replace(engine="single", world=1) == single  # every rank holds the whole model
    fsdp = plan_memory(model, "fsdp", 8, 512, 4, False)
    assert fsdp.parameters == 4 * -(-count // 8) and fsdp.optimizer == 8 * -(-count // 8)
    layer = sum(p.numel() for p in model.model.layers[0].parameters())
    root = count - 2 * layer  # embeddings, final norm and head
    assert fsdp.gathered == 2 * layer * 4 + layer * 4 + root * 8
    assert fsdp.total < ddp.total and fsdp.activations == ddp.activations


@pytest.mark.parametrize("hidden, layers, vocab", [(64, 2, 256), (128, 4, 1000), (256, 2, 4000)])
def test_the_activation_estimate_is_within_25_percent_of_what_autograd_saves(hidden, layers, vocab):
    """Without checkpointing the estimate is what a forward pass saves plus the logits' gradient (not a saved tensor
    but alive at the start of backward)."""
    model, tokens = llama(hidden, layers, vocab), 1024
    estimate = plan_memory(model, None, 1, tokens, 4, False).activations - tokens * vocab * 4
    assert 0.8 < estimate / saved_bytes(model, tokens) < 1.25
    checkpointed = llama(hidden, layers, vocab)
    checkpointed.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    checkpointed.train()
    estimate = plan_memory(checkpointed, None, 1, tokens, 4, True).activations
    assert saved_bytes(checkpointed, tokens) < estimate < plan_memory(model, None, 1, tokens, 4, False).activations


def test_a_run_that_cannot_fit_stops_before_its_first_step(tmp_path, monkeypatch, capsys):
    plan = MemoryPlan("ddp", 8, 4 * 10**9, 4 * 10**9, 8 * 10**9, 0, 2 * 10**9)
    assert format_memory_plan(plan) == ("memory plan (ddp, 8 devices): parameters 4.00, gradients 4.00, optimizer "
                                        "8.00, gathered 0.00, activations 2.00; total 18.00 GB per device")
    with pytest.raises(TrainingError, match=r"total 18\.00 GB per device: more than the 16\.00 GB of cuda:0; lower "
                                            r"train\.micro_batch_tokens, .* or use train\.distributed: fsdp"):
        check_fits(plan, 16 * 10**9, torch.device("cuda:0"))
    monkeypatch.setattr(loop, "device_memory", lambda device: 1000)
    with pytest.raises(TrainingError, match=r"^memory plan \(single, 1 device\): .* more than the 0\.00 GB of cpu"):
        loop.train_target(tiny_model(), planned(blocks(True)), UNCHECKPOINTED, 0.9, "ce", 0, tmp_path / "ckpt", "k",
                          False)
    assert not (tmp_path / "ckpt").exists()
    assert capsys.readouterr().out.startswith("memory plan (single, 1 device): parameters 0.00")
