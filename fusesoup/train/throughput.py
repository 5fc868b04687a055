"""Model FLOPs utilisation: the FLOPs a step's tokens need by the model's shape, over what the devices could do.

Per trained token a causal LM needs 6 N + 12 L d T FLOPs forward and backward (PaLM, appendix B; nanoGPT's
estimate_mfu): N the parameters that multiply (every weight but the embedding lookups, the head counted even when it
shares the embedding's tensor), L layers of width d attending over T positions (the block). Peak bf16 dense tensor
FLOPs per GPU come from its name for the GPUs listed, or from `runtime.peak_tflops`; on the CPU there is none.
"""
from __future__ import annotations

import torch

# dense bf16 tensor-core peaks (no sparsity), TFLOPs per GPU, from the vendors' data sheets; first match wins
PEAK_BF16_TFLOPS = (("H200", 989.4), ("H100 PCIe", 756.0), ("H100", 989.4), ("GH200", 989.4), ("A100", 312.0),
                    ("L40S", 362.1), ("L40", 181.0), ("L4", 121.0), ("A10", 125.0), ("RTX 4090", 165.2),
                    ("RTX 3090", 71.0), ("MI300X", 1307.4), ("MI250X", 383.0))


def flops_per_token(model: torch.nn.Module, block: int) -> float:
    """6 N + 12 L d T for a causal LM of transformers' config (num_hidden_layers, hidden_size) at T = block."""
    lookups = {id(p) for module in model.modules() if isinstance(module, torch.nn.Embedding)
               for p in module.parameters(recurse=False)}
    head = model.get_output_embeddings()
    tied = head is not None and any(id(p) in lookups for p in head.parameters(recurse=False))
    multiplying = sum(p.numel() for p in model.parameters() if id(p) not in lookups)
    if tied:
        multiplying += sum(p.numel() for p in head.parameters(recurse=False))
    config = model.config
    return 6.0 * multiplying + 12.0 * config.num_hidden_layers * config.hidden_size * block


def peak_flops(device: torch.device, override_tflops: float | None = None) -> float | None:
    """Peak bf16 FLOPs per second of one `device`: the override, else by the GPU's name; None on the CPU or an
    unlisted GPU (the MFU column then stays empty)."""
    if override_tflops is not None:
        return override_tflops * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((tflops * 1e12 for key, tflops in PEAK_BF16_TFLOPS if key in name), None)


def model_flops_utilisation(tokens_per_second: float, per_token: float, peak: float | None, world: int
                            ) -> float | None:
    """The share of `world` devices' peak that `tokens_per_second` (the global batch's) uses; None without a peak."""
    return None if peak is None else tokens_per_second * per_token / (peak * world)
