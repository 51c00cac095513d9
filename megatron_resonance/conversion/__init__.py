"""Checkpoint conversion between Hugging Face LLaMA and Megatron-Core, carrying the rope plan exactly.

    hf_to_megatron  convert_hf_to_megatron(load, save, ...)   Hugging Face directory -> dist checkpoint
    megatron_to_hf  convert_megatron_to_hf(load, save, ...)   dist checkpoint (any TP/PP) -> Hugging Face
    key_map         LLAMA_KEY_MAP, expand(cfg)                which tensors make which parameter
    transforms      TRANSFORMS                                QKV per query group, gate/up, vocabulary pad

A declarative key map plus named transforms, in the style of Megatron-Bridge; the Hugging Face files are
read and written by ``megatron_resonance.hf``. Entry points: ``tools/convert_hf_to_megatron.py`` and
``tools/convert_megatron_to_hf.py``.
"""
