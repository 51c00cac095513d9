"""Megatron-Core integration: rotary module, LLaMA builder, SDPA core attention, CPU compatibility and speed.

Importing it checks megatron-core's release against the supported window (``compat``): one line otherwise."""

from megatron_resonance.megatron import compat

compat.check_version()
compat.quiet_release_warnings()
