"""The model loader (fusesoup.models) and bits per byte (fusesoup.evaluate) on tiny models built here."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import GPT2Config, LlamaConfig, PreTrainedConfig

from fusesoup.bootstrap import build_model
from fusesoup.batching import pad_batch, plan_batches
from fusesoup.evaluate import BpbResult, ContextError, bits_per_byte, encode_texts
from fusesoup.models import ModelError, context_length, load_model, load_tokenizer, model_path, resolve_device_dtype
from fusesoup.params import Runtime, parse_params
from fusesoup.pin import external_token_limits
from tests.helpers import TEXTS, tiny_spec







def make_params(models_section: dict, bootstrap: dict | None = None):
    names = [*(bootstrap or {}), *models_section]
    raw = {"models": models_section, "bootstrap": bootstrap or {}, "target": names[0], "sources": names,
           "corpus": {"sources": [{"kind": "builtin_code"}], "max_chunk_bytes": 64}}
    return parse_params(raw, "test")


BOOTSTRAP_ENTRY = {"architecture": "llama", "tokenizer": {"kind": "byte_level_bpe", "vocab_size": 300},
                   "domains": {"code": 1.0},
                   "model": {"hidden_size": 32, "layers": 1, "heads": 2, "intermediate_size": 64, "context": 80},
                   "train": {"steps": 1, "batch_tokens": 64, "block_size": 64, "lr": 1e-3}}


@pytest.fixture(scope="module")
def saved(tmp_path_factory, tokenizer) -> tuple[Path, torch.nn.Module]:
    """A llama saved with its tokenizer the way the bootstrap stage saves it."""
    directory = tmp_path_factory.mktemp("models") / "tiny"
    model = build_model("llama", tiny_spec(), tokenizer, seed=1)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory, model


# --- where models come from ---------------------------------------------------------------------------------------

def test_every_model_loads_from_its_data_models_directory():
    assert model_path("boot") == Path("data/models/boot")
    assert model_path("hub", data_dir="/x") == Path("/x/hub")


def test_resolve_device_dtype():
    cuda = torch.cuda.is_available()
    device, dtype = resolve_device_dtype(Runtime())
    assert (device.type, dtype) == (("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32))
    assert resolve_device_dtype(Runtime(device="cpu", dtype="bfloat16")) == (torch.device("cpu"), torch.bfloat16)
    assert resolve_device_dtype(Runtime(device="cpu"))[1] == torch.float32
    if not cuda:
        with pytest.raises(ModelError, match="CUDA is not available"):
            resolve_device_dtype(Runtime(device="cuda:0"))


def test_round_trip_through_save_pretrained(saved, tokenizer):
    directory, original = saved
    assert (directory / "model.safetensors").is_file()
    assert not list(directory.glob("*.bin"))
    params = make_params({"tiny": {"source": "path", "path": "/elsewhere"}})  # loaded from data_dir, where pin@ links it
    model, loaded_tokenizer = load_model("tiny", params, data_dir=directory.parent)
    assert not model.training
    assert model.dtype == torch.float32 and model.device.type == resolve_device_dtype(params.runtime)[0].type
    assert len(loaded_tokenizer) == len(tokenizer)
    assert loaded_tokenizer(TEXTS[1]).input_ids == tokenizer(TEXTS[1]).input_ids
    saved_state, loaded_state = original.state_dict(), model.state_dict()
    assert saved_state.keys() == loaded_state.keys()
    for key, value in saved_state.items():
        assert torch.equal(value, loaded_state[key].cpu()), key
    assert load_tokenizer("tiny", params, data_dir=directory.parent).bos_token == "<s>"


def test_missing_bootstrap_model_names_the_stage_that_builds_it(tmp_path):
    params = make_params({}, {"boot": BOOTSTRAP_ENTRY})
    with pytest.raises(ModelError) as caught:
        load_model("boot", params, data_dir=tmp_path)
    message = str(caught.value)
    assert "'boot'" in message and str(tmp_path / "boot") in message and "bootstrap@boot" in message


def test_unpinned_path_model_names_the_stage_that_links_it(tmp_path):
    params = make_params({"mine": {"source": "path", "path": str(tmp_path / "nowhere")}})
    for load in (load_model, load_tokenizer):
        with pytest.raises(ModelError, match=r"model 'mine': directory .*mine does not exist; it is linked there by "
                                             r"the DVC stage pin@mine"):
            load("mine", params, data_dir=tmp_path)


def test_vocab_smaller_than_tokenizer_is_refused(tmp_path, tokenizer):
    from transformers import AutoModelForCausalLM

    config = LlamaConfig(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=64)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    params = make_params({tmp_path.name: {"source": "path", "path": str(tmp_path)}})
    with pytest.raises(ModelError) as caught:
        load_model(tmp_path.name, params, data_dir=tmp_path.parent)
    assert "256 rows" in str(caught.value) and f"{len(tokenizer)} tokens" in str(caught.value)


def test_pickle_only_directory_is_refused(tmp_path, saved):
    directory, model = saved
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (tmp_path / name).write_bytes((directory / name).read_bytes())
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    params = make_params({tmp_path.name: {"source": "path", "path": str(tmp_path)}})
    with pytest.raises(ModelError, match=r"no safetensors weights.*pytorch_model\.bin"):
        load_model(tmp_path.name, params, data_dir=tmp_path.parent)


def test_context_length_of_each_family():
    assert context_length(LlamaConfig(max_position_embeddings=777)) == 777
    assert context_length(GPT2Config(n_positions=333)) == 333
    with pytest.raises(ModelError, match="no context length"):
        context_length(PreTrainedConfig())


def test_external_token_limits_read_tokenizer_and_config_only(tmp_path, saved, tokenizer):
    directory, _ = saved
    no_weights = tmp_path / "no-weights"  # proves that no weights are loaded
    no_weights.mkdir()
    for path in directory.iterdir():
        if path.suffix != ".safetensors":
            (no_weights / path.name).write_bytes(path.read_bytes())
    params = make_params({"ext": {"source": "path", "path": str(no_weights)}}, {"boot": BOOTSTRAP_ENTRY})
    limits = external_token_limits(params)  # read where the model lives: pin@ may not have run yet
    assert [limit.model for limit in limits] == ["ext"]
    assert limits[0].max_tokens == tiny_spec().context - 2
    for text in TEXTS[:6]:
        assert limits[0].count_tokens(text) == len(tokenizer.encode(text, add_special_tokens=False))
    assert limits[0].count_tokens("") == 0


# --- bits per byte -----------------------------------------------------------------------------------------------

def direct_nll(model, tokenizer, text: str) -> tuple[float, int]:
    """NLL in nats of `text` as [bos] + ids, one text at a time, log_softmax in float64."""
    ids = [tokenizer.bos_token_id] + tokenizer.encode(text, add_special_tokens=False)
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0].double()
    logprobs = torch.log_softmax(logits[:-1], dim=-1)
    return -float(logprobs[torch.arange(len(ids) - 1), torch.tensor(ids[1:])].sum()), len(ids) - 1


@pytest.mark.parametrize("architecture", ["llama", "gpt_neox", "gpt2"])
def test_bits_per_byte_matches_direct_computation_and_ignores_padding(architecture, tokenizer):
    model = build_model(architecture, tiny_spec(), tokenizer, seed=3).eval()
    texts = TEXTS[:6]
    expected_nll, expected_tokens = map(sum, zip(*(direct_nll(model, tokenizer, t) for t in texts)))
    expected_bytes = sum(len(t.encode("utf-8")) for t in texts)
    assert expected_bytes > sum(len(t) for t in texts)  # the non-ASCII text counts bytes, not characters

    batched = bits_per_byte(model, tokenizer, texts, batch_tokens=10_000)  # one padded batch
    alone = bits_per_byte(model, tokenizer, texts, batch_tokens=1)  # one text per batch: no padding
    for result in (batched, alone):
        assert result.tokens == expected_tokens and result.bytes == expected_bytes
        assert result.nll_nats == pytest.approx(expected_nll, rel=1e-5)
        assert result.bpb == pytest.approx(result.nll_nats / math.log(2) / expected_bytes, rel=1e-12)
    assert batched.nll_nats == pytest.approx(alone.nll_nats, rel=1e-5)
    assert 0 < batched.bpb < 20
    assert model.training is False
    per_text = [direct_nll(model, tokenizer, t)[0] for t in texts]  # each text's own NLL, in input order
    for result in (batched, alone):
        assert result.text_nats == pytest.approx(per_text, rel=1e-5)
    # the sum is what cross_entropy(reduction="sum") gives, bit for bit, as before texts were scored one by one
    sequences = encode_texts(tokenizer, texts)
    (batch,) = plan_batches([len(ids) for ids in sequences], 10_000)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else sequences[0][0]
    ids = pad_batch([sequences[i] for i in batch], pad)
    with torch.no_grad():
        logits = model(input_ids=ids[0], attention_mask=ids[1]).logits[:, :-1].float()
    targets = ids[0][:, 1:].masked_fill(ids[1][:, 1:] == 0, -100)
    summed = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum")
    assert batched.nll_nats == float(summed.double())


def test_batches_respect_the_padded_token_budget():
    lengths = [5, 50, 7, 30, 30, 2, 100]
    batches = plan_batches(lengths, batch_tokens=64)
    assert sorted(i for batch in batches for i in batch) == list(range(len(lengths)))
    for batch in batches:
        longest = max(lengths[i] for i in batch)
        assert lengths[batch[0]] == longest
        assert len(batch) == 1 or len(batch) * longest <= 64
    assert [6] in batches  # longer than the budget: alone


def test_total_over_domains_equals_bpb_over_all_texts(tokenizer):
    model = build_model("gpt2", tiny_spec(), tokenizer, seed=0)
    first, second = (bits_per_byte(model, tokenizer, TEXTS[i:i + 3], 512) for i in (0, 3))
    together = bits_per_byte(model, tokenizer, TEXTS[:6], 512)
    total = BpbResult.total([first, second])
    assert (total.tokens, total.bytes) == (together.tokens, together.bytes)
    assert total.bpb == pytest.approx(together.bpb, rel=1e-5)


def test_text_longer_than_the_context_is_an_error(tokenizer):
    model = build_model("llama", tiny_spec(context=16), tokenizer, seed=0)
    text = "some words that go on and on " * 4
    length = 1 + len(tokenizer.encode(text, add_special_tokens=False))
    with pytest.raises(ContextError, match=rf"is {length} tokens with BOS .* the model context is 16"):
        bits_per_byte(model, tokenizer, ["short", text], batch_tokens=256)
