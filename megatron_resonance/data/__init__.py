"""Data: the embedded stdlib corpus, tokenizers (SentencePiece, Hugging Face), Megatron indexed datasets, GPT datasets.

    corpus     build_stdlib_corpus(output_dir, ...)          stdlib *.py -> train/valid JSONL, split by file
    tokenizer  train_tokenizer(inputs, model_prefix, ...)    byte-fallback BPE that round-trips code
               Tokenizer(path)                               SentencePiece .model, HF tokenizer.json or dir
    preprocess preprocess(inputs, output_prefix, model, ...) text/JSONL -> PREFIX.bin/.idx (megatron-core)
    datasets   build_gpt_datasets(seq_length=..., ...)       megatron GPTDataset / MockGPTDataset splits
    prepare    prepare_default_data(output_dir, ...)         all of the above for the default corpus

megatron-core is imported lazily (only when writing or reading indexed datasets).
"""

from megatron_resonance.data.corpus import (
    build_stdlib_corpus,
    is_validation,
    list_stdlib_sources,
    stdlib_root,
)
from megatron_resonance.data.datasets import build_gpt_datasets
from megatron_resonance.data.prepare import DefaultData, prepare_default_data
from megatron_resonance.data.preprocess import PreprocessStats, preprocess, token_dtype
from megatron_resonance.data.tokenizer import Tokenizer, train_tokenizer

__all__ = [
    "DefaultData",
    "PreprocessStats",
    "Tokenizer",
    "build_gpt_datasets",
    "build_stdlib_corpus",
    "is_validation",
    "list_stdlib_sources",
    "prepare_default_data",
    "preprocess",
    "stdlib_root",
    "token_dtype",
    "train_tokenizer",
]
