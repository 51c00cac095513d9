"""Rotary position embedding math: one function per kind, resonance as one switch, exact angles.

Pure torch; no Megatron import. Every backend (the Megatron rotary module, the Hugging Face export,
PosGen, diagnostics) calls into here.
"""

from megatron_resonance.rope.angles import angular_distance, rotary_angle_table, rotary_angles
from megatron_resonance.rope.diagnostics import critical_dim, feature_gap, pre_critical_mask, report
from megatron_resonance.rope.frequencies import (
    KINDS,
    RopeConfig,
    RotaryFrequencies,
    compute_frequencies,
    resonance_round,
    yarn_attention_factor,
)

__all__ = [
    "KINDS",
    "RopeConfig",
    "RotaryFrequencies",
    "angular_distance",
    "compute_frequencies",
    "critical_dim",
    "feature_gap",
    "pre_critical_mask",
    "report",
    "resonance_round",
    "rotary_angle_table",
    "rotary_angles",
    "yarn_attention_factor",
]
