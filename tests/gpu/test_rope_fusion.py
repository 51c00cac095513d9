"""Rotary application on a GPU: megatron's fused path (when this machine has one) against its unfused one, with
the angle table of ``ResonanceRotaryEmbedding`` (Resonance YaRN, LLaMA-2 4K -> 32K) over 8K positions."""

from __future__ import annotations

import pytest
import torch

SEQ, BATCH, HEADS, HEAD_DIM = 8192, 2, 4, 128
#: (atol, rtol) of fused vs unfused, forward and backward. fp32: both take cos/sin of the same fp32 angles
#: (TE may use fast intrinsics, ~1e-6 abs). bf16: the unfused path rounds cos, sin and each product to bf16
#: (a few ulps of values up to ~5, 2^-6 each), TE rounds once. A wrong angle, sign or half layout is off by
#: O(1) in either dtype.
TOLERANCE = {torch.float32: (1e-4, 1e-4), torch.bfloat16: (6e-2, 2e-2)}


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_fused_rope_matches_unfused(dtype):
    from megatron.core.models.common.embeddings import rope_utils

    from megatron_resonance.megatron.rotary import ResonanceRotaryEmbedding
    from megatron_resonance.rope import RopeConfig

    fused = rope_utils.fused_apply_rotary_pos_emb
    if fused is None:
        pytest.skip("megatron has no fused RoPE on this machine (it comes with Transformer Engine)")
    rope = RopeConfig(kind="resonance_yarn", head_dim=HEAD_DIM, original_max_position=4096, factor=8.0)
    freqs = ResonanceRotaryEmbedding(rope).get_emb(SEQ)  # [s, 1, 1, d] on the GPU
    assert freqs.is_cuda
    generator = torch.Generator(device="cuda").manual_seed(0)
    t = torch.randn(SEQ, BATCH, HEADS, HEAD_DIM, device="cuda", generator=generator).to(dtype)
    upstream = torch.randn(t.shape, device="cuda", generator=generator).to(dtype)
    paths = {
        "fused": lambda x: fused(x, freqs, interleaved=False),  # megatron's two branches
        "unfused": lambda x: rope_utils._apply_rotary_pos_emb_bshd(x, freqs, rotary_interleaved=False),
    }
    results = {}
    for name, apply in paths.items():
        x = t.clone().requires_grad_(True)
        out = apply(x)
        out.backward(upstream)
        results[name] = (out.detach().float(), x.grad.float())
    atol, rtol = TOLERANCE[dtype]
    for i, what in enumerate(("output", "gradient")):
        a, b = results["fused"][i], results["unfused"][i]
        print(f"{dtype} {what}: max |fused - unfused| {(a - b).abs().max():.2e}")
        torch.testing.assert_close(a, b, atol=atol, rtol=rtol, msg=lambda m, what=what: f"{what}: {m}")
    # and the rotation is not the identity: the comparison would otherwise hold for two no-ops
    assert (results["unfused"][0] - t.float()).abs().max() > 1.0
