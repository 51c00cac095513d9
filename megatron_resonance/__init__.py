"""megatron-resonance: context-length extension of LLaMA-style models with Resonance RoPE on Megatron-Core."""

__version__ = "0.1.0"
