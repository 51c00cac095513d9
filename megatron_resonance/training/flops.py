"""Model FLOPs per token and MFU, written out (as nanoGPT's ``estimate_mfu``)."""

from __future__ import annotations

import torch

from megatron_resonance.megatron.llama import LlamaConfig

#: dense bf16 peak TFLOP/s per GPU, by substring of ``torch.cuda.get_device_name()``
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "GH200": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0}


def training_flops_per_token(cfg: LlamaConfig, seq_length: int) -> float:
    """Forward + backward (3x forward) matmul FLOPs per token of a causal LLaMA, 2 FLOPs per multiply-add.

    Per layer: Q and O projections 2*h*h each; K and V 2*h*kv each (kv = groups*head_dim); SwiGLU
    3 matrices 2*h*ffn each; attention scores and weighted sum 2*2*s*h, halved for the causal mask.
    Plus the output layer 2*h*V. Embedding lookups and norms are ignored.
    """
    h, ffn, s = cfg.hidden_size, cfg.ffn_hidden_size, seq_length
    kv = cfg.num_query_groups * cfg.head_dim
    per_layer = 2 * h * (2 * h + 2 * kv) + 3 * 2 * h * ffn + 2 * 2 * s * h / 2
    forward = cfg.num_layers * per_layer + 2 * h * cfg.padded_vocab_size()
    return 3.0 * forward


def peak_tflops() -> float | None:
    """Peak dense bf16 TFLOP/s of this GPU, or None (CPU or unknown GPU)."""
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    for key, value in PEAK_BF16_TFLOPS.items():
        if key in name:
            return value
    return None
