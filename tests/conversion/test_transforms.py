"""The key map and its named transforms: exact inverses, and megatron's documented layouts."""

from __future__ import annotations

import pytest
import torch

from megatron_resonance.conversion import key_map
from megatron_resonance.conversion.transforms import TRANSFORMS
from megatron_resonance.megatron.llama import LlamaConfig
from tests.tiny_llama import tiny_llama

CFG = tiny_llama(hidden_size=64, ffn_hidden_size=96, num_attention_heads=8, vocab_size=300)


def test_qkv_is_grouped_per_query_group():
    """linear_qkv rows: for each group g, [q heads of g (4 x hd), k_g (hd), v_g (hd)] (megatron-core's layout)."""
    hd, h = CFG.head_dim, CFG.hidden_size
    q = torch.arange(8 * hd)[:, None].float().expand(-1, h) + 0.0
    k = 1000 + torch.arange(2 * hd)[:, None].float().expand(-1, h)
    v = 2000 + torch.arange(2 * hd)[:, None].float().expand(-1, h)
    qkv = TRANSFORMS["qkv"].to_megatron((q, k, v), CFG)
    assert qkv.shape == ((8 + 2 * 2) * hd, h)
    rows = qkv[:, 0]
    per_group = 6 * hd
    for g in range(2):
        block = rows[g * per_group : (g + 1) * per_group]
        assert torch.equal(block[: 4 * hd], q[g * 4 * hd : (g + 1) * 4 * hd, 0])
        assert torch.equal(block[4 * hd : 5 * hd], k[g * hd : (g + 1) * hd, 0])
        assert torch.equal(block[5 * hd :], v[g * hd : (g + 1) * hd, 0])
    # the Hugging Face -> Megatron formula: per query group, its q heads, then its k and v
    design = torch.cat([q.view(2, 4 * hd, h), k.view(2, hd, h), v.view(2, hd, h)], 1).view(-1, h)
    assert torch.equal(qkv, design)


@pytest.mark.parametrize("name", ["copy", "qkv", "gate_up", "vocab"])
def test_transforms_are_exact_inverses(name):
    g = torch.Generator().manual_seed(0)
    hd, h, f = CFG.head_dim, CFG.hidden_size, CFG.ffn_hidden_size
    shapes = {
        "copy": [(h, h)],
        "qkv": [(8 * hd, h), (2 * hd, h), (2 * hd, h)],
        "gate_up": [(f, h), (f, h)],
        "vocab": [(300, h)],
    }[name]
    hf = tuple(torch.randn(s, generator=g).to(torch.bfloat16) for s in shapes)
    t = TRANSFORMS[name]
    megatron = t.to_megatron(hf, CFG)
    back = t.to_hf(megatron, CFG)
    assert len(back) == len(hf) and all(torch.equal(a, b) and a.dtype == b.dtype for a, b in zip(hf, back))
    if name == "gate_up":
        assert torch.equal(megatron[:f], hf[0]) and torch.equal(megatron[f:], hf[1])
    if name == "vocab":
        assert megatron.shape == (CFG.padded_vocab_size(), h) == (384, h)
        assert not megatron[300:].any()


@pytest.mark.parametrize("tied", [False, True])
def test_key_map_covers_the_model(tied):
    cfg = LlamaConfig(num_layers=3, tie_word_embeddings=tied)
    params = key_map.expand(cfg)
    assert len(params) == 1 + 3 * 6 + 1 + (0 if tied else 1)
    hf = [k for p in params for k in p.hf]
    assert len(hf) == len(set(hf)) == 1 + 3 * 9 + 1 + (0 if tied else 1)
    assert hf[:4] == [
        "model.embed_tokens.weight",
        "model.layers.0.self_attn.q_proj.weight",
        "model.layers.0.self_attn.k_proj.weight",
        "model.layers.0.self_attn.v_proj.weight",
    ]
    shapes = key_map.hf_shapes(cfg)
    assert shapes["model.layers.2.self_attn.k_proj.weight"] == (cfg.num_query_groups * cfg.head_dim, cfg.hidden_size)
    assert shapes["model.layers.0.mlp.down_proj.weight"] == (cfg.hidden_size, cfg.ffn_hidden_size)
    assert shapes["model.norm.weight"] == (cfg.hidden_size,)
