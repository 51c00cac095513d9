"""The rotary module inside a built model, asserted in ``tests/megatron/test_rotary.py``; run by
``model_checks.py``."""

from __future__ import annotations

import torch

from tests.tiny_llama import TINY, tiny_llama

SEQ = TINY["max_position_embeddings"]
#: trained at 32, extended x4 to 128: past the 64 positions the checks run
ORIGINAL = 32


def check_install_rotary_scale():
    """``config.softmax_scale`` and every core attention's scale after building / re-installing.

    Asserted by ``test_install_rotary_sets_softmax_scale``."""
    from megatron_resonance.megatron import llama
    from megatron_resonance.megatron.rotary import install_rotary

    out = {}
    for kind in ("rope", "yarn", "resonance_yarn"):
        cfg = tiny_llama(kind, ORIGINAL)
        built = llama.build_model(cfg, seq_length=SEQ)[0]
        swapped = llama.build_model(tiny_llama(), seq_length=SEQ)[0]
        install_rotary([swapped], cfg.rope)
        out[kind] = {
            name: {
                "config_softmax_scale": model.config.softmax_scale,
                "core_attention_scales": sorted(
                    {layer.self_attention.core_attention.softmax_scale for layer in model.decoder.layers}
                ),
                "rotary_kind": model.rotary_pos_emb.rope.kind,
            }
            for name, model in (("built", built), ("installed_after_rope", swapped))
        }
    return out


class _FakeCPGroup:
    """What megatron's rotary forward asks of a context-parallel group: size() and rank()."""

    def __init__(self, size, rank):
        self._size, self._rank = size, rank

    def size(self):
        return self._size

    def rank(self):
        return self._rank


def check_context_parallel_slicing():
    """Our module goes through megatron's own CP slicing (chunks r and 2*cp-1-r of the sequence).

    Asserted by ``test_context_parallel_slicing_is_megatrons``."""
    from megatron.core.models.common.embeddings.rope_utils import get_pos_emb_on_this_cp_rank

    from megatron_resonance.megatron.rotary import ResonanceRotaryEmbedding

    rotary = ResonanceRotaryEmbedding(tiny_llama("resonance_yarn", ORIGINAL).rope)
    full = rotary.get_emb(SEQ)
    out = {}
    cp = 2
    for rank in range(cp):
        group = _FakeCPGroup(cp, rank)
        sliced = rotary(SEQ, cp_group=group)
        chunk = SEQ // (2 * cp)
        expected = torch.cat(
            [full[rank * chunk : (rank + 1) * chunk], full[(2 * cp - 1 - rank) * chunk : (2 * cp - rank) * chunk]]
        )
        out[f"rank{rank}"] = {
            "shape": list(sliced.shape),
            "equals_megatron_slicing": bool(torch.equal(sliced, get_pos_emb_on_this_cp_rank(full, 0, group))),
            "equals_expected_chunks": bool(torch.equal(sliced, expected)),
            "packed_seq_unsliced": bool(torch.equal(rotary(SEQ, packed_seq=True, cp_group=group), full)),
        }
    return out


def check_rope_swap_changes_logits():
    """Same weights: rope vs resonance_yarn logits differ; re-installing rope restores them exactly;
    our rope equals megatron's stock RotaryEmbedding.

    Asserted by ``test_swap_reaches_the_model``."""
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

    from megatron_resonance.megatron import llama
    from megatron_resonance.megatron.rotary import install_rotary, set_softmax_scale

    cfg = tiny_llama()
    model = llama.build_model(cfg, seq_length=SEQ)[0].eval()
    tokens = torch.randint(0, cfg.vocab_size, (2, SEQ), generator=torch.Generator().manual_seed(2))
    positions = torch.arange(SEQ)[None].expand(2, -1)

    def logits():
        with torch.no_grad():
            return model(tokens, positions, None)[..., : cfg.vocab_size].clone()

    rope_logits = logits()
    yarn_rope = tiny_llama("resonance_yarn", ORIGINAL).rope
    install_rotary([model], yarn_rope)
    yarn_logits = logits()
    install_rotary([model], cfg.rope)
    back_logits = logits()
    # megatron's own module (no softmax-scale change for plain rope)
    model.rotary_pos_emb = RotaryEmbedding(
        kv_channels=cfg.head_dim, rotary_percent=1.0, rotary_base=int(cfg.rope.base), use_cpu_initialization=True
    )
    set_softmax_scale(model, None)
    stock_logits = logits()
    return {
        "rope_vs_resonance_yarn_max_abs": (yarn_logits - rope_logits).abs().max().item(),
        "logits_max_abs": rope_logits.abs().max().item(),
        "reinstalled_rope_equal": bool(torch.equal(back_logits, rope_logits)),
        "ours_vs_megatron_stock_rope_max_abs": (stock_logits - rope_logits).abs().max().item(),
    }
