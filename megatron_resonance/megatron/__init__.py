"""Megatron-Core integration: rotary module, LLaMA builder, SDPA core attention, CPU compatibility and speed."""
