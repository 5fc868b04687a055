"""Generated teachers for bench/extract.py: random Llama models of a real vocabulary size with real tokenizers, on
chunks of the stdlib's source, and the bf16-vs-float32 comparison of a teacher's next-token distributions."""
from __future__ import annotations

import copy
import sysconfig
from pathlib import Path

import polars as pl
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from fusesoup.corpus.builtin import stdlib_files
from fusesoup.corpus.prepare import chunk_text
from fusesoup.batching import bos_token_id
from fusesoup.evaluate import encode_texts
from fusesoup.logits.codec import renormalized_kl
from fusesoup.storage import write_parquet
from tests.real_tokenizers import gpt2_tokenizer, mistral_tokenizer

LOGIT_STD = 4.0  # the head is scaled to this logit spread (a random init's is ~0.5): top logits near 15-20 as trained


def generated_teacher(vocab_size: int, hidden: int, layers: int, scratch: Path) -> tuple[LlamaForCausalLM, object]:
    """A float32 Llama of `vocab_size` output rows: Mistral-7B's tokenizer at 32000..50256, GPT-2's from 50257 (the
    head padded past the tokenizer, as Qwen2's 151936 rows are past its 151646 tokens)."""
    if vocab_size >= 50257:
        tokenizer = gpt2_tokenizer()
    elif vocab_size >= 32000:
        tokenizer = mistral_tokenizer(scratch / "mistral-tokenizer")
    else:
        raise SystemExit(f"--vocab {vocab_size}: the generated teachers start at 32000 (Mistral-7B's tokenizer)")
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=hidden * 11 // 4 // 64 * 64,
                         num_hidden_layers=layers, num_attention_heads=hidden // 64, num_key_value_heads=hidden // 64,
                         max_position_embeddings=4096, tie_word_embeddings=False,
                         bos_token_id=bos_token_id(tokenizer), eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        probe = model(input_ids=torch.tensor([tokenizer.encode("def main():\n    return 0\n")])).logits
        model.lm_head.weight.mul_(LOGIT_STD / probe.std().item())
    return model, tokenizer


def stdlib_corpus(directory: Path, rows: int, max_bytes: int = 2000) -> Path:
    """A corpus directory whose train split is `rows` chunks (<= max_bytes each) of the stdlib's source files."""
    root, texts = Path(sysconfig.get_paths()["stdlib"]), []
    for name in stdlib_files():
        texts += chunk_text((root / name).read_text(encoding="utf-8", errors="replace"), max_bytes)
        if len(texts) >= rows:
            break
    frame = pl.DataFrame({"doc_id": [f"stdlib-{i}" for i in range(rows)], "domain": ["code"] * rows,
                          "text": texts[:rows]})
    write_parquet(frame, directory / "train.parquet")
    return directory


def kl(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Per-row KL(p || q) of two [L, V] log-prob tensors."""
    return (p.exp() * (p - q)).sum(dim=-1)


@torch.inference_mode()
def bf16_fidelity(model, tokenizer, texts: list[str], k: int) -> dict:
    """The bf16 copy of `model` against the float32 model over whole vocabularies, per position of `texts`:
    kl_full for the store's path (bf16 hidden states, float32 head), kl_full_bf16_logits for bf16 logits,
    kl_topk (KL between the two runs' top-k of the float32 run, each renormalised), top1_agree, topk_overlap."""
    half = copy.deepcopy(model).to(torch.bfloat16)
    head = half.lm_head.weight.float()
    rows: dict[str, list[torch.Tensor]] = {key: [] for key in ("store", "logits", "topk", "top1", "overlap", "entropy")}
    for text in texts:
        ids = torch.tensor(encode_texts(tokenizer, [text]))
        exact = torch.log_softmax(model(input_ids=ids).logits[0, :-1].double(), dim=-1)
        store = torch.log_softmax(half.base_model(input_ids=ids).last_hidden_state[0, :-1].float() @ head.t(), -1)
        rounded = torch.log_softmax(half(input_ids=ids).logits[0, :-1].float(), dim=-1)
        top, store_top = exact.topk(k, dim=-1).indices, store.topk(k, dim=-1).indices
        rows["store"].append(kl(exact, store.double()))
        rows["logits"].append(kl(exact, rounded.double()))
        rows["topk"].append(torch.from_numpy(renormalized_kl(exact.gather(-1, top).numpy(),
                                                             store.gather(-1, top).numpy())))
        rows["top1"].append((top[:, 0] == store_top[:, 0]).double())
        rows["overlap"].append((top[:, :, None] == store_top[:, None, :]).any(-1).double().mean(-1))
        rows["entropy"].append(-(exact.exp() * exact).sum(-1))
    mean = {key: torch.cat(values).mean().item() for key, values in rows.items()}
    return {"positions": sum(len(v) for v in rows["store"]), "kl_full": mean["store"],
            "kl_full_max": torch.cat(rows["store"]).max().item(), "kl_full_bf16_logits": mean["logits"],
            "kl_topk": mean["topk"], "top1_agree": mean["top1"], "topk_overlap": mean["overlap"],
            "float32_entropy": mean["entropy"]}
