"""The converters' exception (:class:`megatron_resonance.errors.ConversionError`)."""

from megatron_resonance.errors import ConversionError

__all__ = ["ConversionError"]
