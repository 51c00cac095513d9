"""Checkpoint conversion between Hugging Face LLaMA and Megatron-Core, carrying the rope plan exactly.

A declarative key map (``key_map.LLAMA_KEY_MAP``) plus named transforms (``transforms``: QKV fuse/split
per query group, gate/up into ``linear_fc1``, vocabulary pad/unpad), a streaming Hugging Face reader
(safetensors or ``.bin`` with ``weights_only=True``, sharded or not) and a streaming safetensors writer.
Entry points: ``tools/convert_hf_to_megatron.py`` and ``tools/convert_megatron_to_hf.py``.
"""

from megatron_resonance.conversion.errors import ConversionError
from megatron_resonance.conversion.hf_to_megatron import convert_hf_to_megatron
from megatron_resonance.conversion.megatron_to_hf import convert_megatron_to_hf
from megatron_resonance.conversion.runtime import ConversionReport

__all__ = ["ConversionError", "ConversionReport", "convert_hf_to_megatron", "convert_megatron_to_hf"]
