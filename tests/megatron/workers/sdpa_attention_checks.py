"""``SDPAAttention`` against megatron's local ``DotProductAttention``, asserted in
``tests/megatron/test_sdpa_attention.py``; run by ``model_checks.py``."""

from __future__ import annotations

import torch

from tests.tiny_llama import tiny_llama


def check_sdpa_matches_local_attention():
    """SDPAAttention == megatron's DotProductAttention: GQA (4 heads, 2 groups), custom scale, fwd + bwd.

    Asserted by ``test_sdpa_equals_dot_product_attention``, ``test_padding_mask_is_applied``."""
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnMaskType

    from megatron_resonance.megatron.llama import transformer_config
    from megatron_resonance.megatron.sdpa_attention import SDPAAttention

    config = transformer_config(tiny_llama())
    scale = 0.3  # not 1/sqrt(32): a custom softmax_scale must be honoured
    s, b, heads, groups, hd = 24, 2, 4, 2, 32
    g = torch.Generator().manual_seed(1)
    q0, k0, v0 = (torch.randn(s, b, n, hd, generator=g) for n in (heads, groups, groups))
    causal = torch.triu(torch.ones(s, s, dtype=torch.bool), 1)
    padding = torch.zeros(b, 1, s, s, dtype=torch.bool)
    padding[1, :, :, -5:] = True  # second sequence: last 5 keys masked (True = masked, megatron's convention)
    masks = {"causal_no_mask": None, "explicit_causal_and_padding": causal[None, None] | padding}
    out = {}
    outputs = []
    for mask_name, mask in masks.items():
        results = []
        for cls in (DotProductAttention, SDPAAttention):
            attn = cls(
                config, layer_number=1, attn_mask_type=AttnMaskType.causal, attention_type="self", softmax_scale=scale
            )
            q, k, v = (t.clone().requires_grad_() for t in (q0, k0, v0))
            ctx = attn(q, k, v, mask)
            (ctx * torch.linspace(-1, 1, ctx.numel()).view_as(ctx)).sum().backward()
            results.append((ctx.detach(), q.grad, k.grad, v.grad, attn.softmax_scale))
        (ref, *ref_grads, ref_scale), (got, *got_grads, got_scale) = results
        outputs.append(got)
        out[mask_name] = {
            "shape": list(got.shape),
            "ref_shape": list(ref.shape),
            "scales": [ref_scale, got_scale],
            "forward": (got - ref).abs().max().item() / ref.abs().max().item(),
            "grads": [(a - r).abs().max().item() / r.abs().max().item() for a, r in zip(got_grads, ref_grads)],
        }
    out["padding_changes_output"] = (outputs[1] - outputs[0]).abs().max().item()
    return out
