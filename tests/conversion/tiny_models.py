"""Tiny random Hugging Face LLaMA models for the conversion tests, in every on-disk layout the importer reads.

GQA (4 heads, 2 key/value heads, head_dim 16), a vocabulary of 300 (not a multiple of 128: the Megatron
side pads it), weights drawn larger than transformers' init so that attention and logits are far from
uniform (logits of order 1: an absolute tolerance of 1e-5 means something).
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import torch

VOCAB = 300
SEQ = 64
ARCH = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    rms_norm_eps=1e-5,
    bos_token_id=1,
    eos_token_id=2,
)
LLAMA3 = {
    "rope_type": "llama3",
    "factor": 8.0,
    "original_max_position_embeddings": 16,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "rope_theta": 10000.0,
}
YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16, "rope_theta": 10000.0}

#: name -> (config overrides, layout). Layouts: safetensors | safetensors_sharded | bin_sharded
SOURCES = {
    "gqa": (dict(tie_word_embeddings=False), "safetensors_sharded"),
    "tied_llama3_bin": (
        dict(tie_word_embeddings=True, rope_parameters=LLAMA3, max_position_embeddings=128),
        "bin_sharded",
    ),
    "yarn": (dict(tie_word_embeddings=False, rope_parameters=YARN), "safetensors"),
}
#: stand-ins for tokenizer files: the converters copy them byte for byte
TOKENIZER_FILES = {
    "tokenizer.model": bytes(range(256)) * 4,
    "tokenizer_config.json": b'{"model_max_length": 64, "tokenizer_class": "LlamaTokenizer"}\n',
    "special_tokens_map.json": b'{"bos_token": "<s>", "eos_token": "</s>"}\n',
}


def hf_model(name: str, seed: int = 0):
    import transformers

    overrides, _ = SOURCES[name]
    config = transformers.LlamaConfig(**{**ARCH, **copy.deepcopy(overrides)})
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(config).float().eval()
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if pname.endswith("norm.weight"):
                p.copy_(1 + 0.2 * torch.randn_like(p))
            else:
                p.normal_(0, 0.1)
    return model


def save_bin_sharded(model, path: Path, shards: int = 3) -> None:
    """Old-style sharded ``pytorch_model-*.bin`` + index (tied models keep a duplicate ``lm_head.weight``)."""
    model.config.save_pretrained(path)
    state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    keys = list(state)
    per = -(-len(keys) // shards)
    weight_map = {}
    for i in range(shards):
        file = f"pytorch_model-{i + 1:05d}-of-{shards:05d}.bin"
        chunk = {k: state[k] for k in keys[i * per : (i + 1) * per]}
        torch.save(chunk, path / file)
        weight_map.update({k: file for k in chunk})
    total = sum(v.numel() * v.element_size() for v in state.values())
    (path / "pytorch_model.bin.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2)
    )


def write_source(name: str, path: Path, seed: int = 0):
    """Save source ``name`` under ``path`` in its layout, with tokenizer stand-ins. Returns the model."""
    model = hf_model(name, seed)
    _, layout = SOURCES[name]
    os.makedirs(path, exist_ok=True)
    if layout == "bin_sharded":
        save_bin_sharded(model, path)
    else:
        model.save_pretrained(path, max_shard_size="100KB" if layout == "safetensors_sharded" else "1GB")
    for file, data in TOKENIZER_FILES.items():
        (path / file).write_bytes(data)
    return model


def tokens(seq: int, seed: int = 1, batch: int = 2) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


def read_hf_tensors(path: Path) -> dict:
    """Every tensor of a Hugging Face directory (safetensors or .bin, sharded or not)."""
    from safetensors.torch import load_file

    out = {}
    for file in sorted(os.listdir(path)):
        if file.endswith(".safetensors"):
            out.update(load_file(path / file))
        elif file.endswith(".bin"):
            out.update(torch.load(path / file, weights_only=True))
    return out
