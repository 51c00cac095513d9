"""megatron-resonance: Resonance RoPE context extension for LLaMA-style models on Megatron-Core."""

from setuptools import find_packages, setup

setup(
    name="megatron-resonance",
    version="0.1.0",
    description="Context-length extension of LLaMA-style models with Resonance RoPE on Megatron-Core",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["megatron_resonance", "megatron_resonance.*"]),
    install_requires=[
        # the window megatron_resonance/megatron/compat.py checks at import: 0.15.x, 0.16.x and, on Python >= 3.12,
        # 0.19.x (0.17.x and 0.18.x are not tested)
        "megatron-core>=0.15,!=0.17.*,!=0.18.*,<0.20",
        "torch>=2.6",
        "numpy",
        "sentencepiece",
        "pyyaml",
        # dist_checkpointing's writer process needs psutil; without it a save hangs.
        "psutil",
        "tqdm",
        "matplotlib",
        "tensorboard",
        # the RULER tasks' word lists (needle keys, common words extraction), read as RULER reads them
        # (wonderwords.random_word._get_words_from_text_file), checked with 3.0
        "wonderwords>=3.0,<4",
    ],
    extras_require={
        "hf": ["transformers>=4.57", "safetensors", "huggingface_hub>=0.23"],
        "test": ["pytest", "pytest-timeout", "hypothesis", "ruff==0.17.6"],
        "gpu": ["transformer-engine[pytorch]"],
    },
)
