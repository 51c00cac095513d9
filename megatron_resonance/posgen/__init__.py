"""PosGen: the paper's synthetic train-short-test-long benchmark for position generalization.

Data half: the three subtasks' token rules (:mod:`~megatron_resonance.posgen.tasks`) and train /
validation / test splits that never share a seed prefix, and the reference code's rows
(:mod:`~megatron_resonance.posgen.splits`).
Pure torch + numpy; no Megatron import.

Benchmark half, run by ``tools/posgen_benchmark.py`` and not imported here: the presets
(:mod:`~megatron_resonance.posgen.presets`), one training and its test (:mod:`~megatron_resonance.posgen.cell`),
the run over all cells (:mod:`~megatron_resonance.posgen.benchmark`) and its report
(:mod:`~megatron_resonance.posgen.report`, statistics in :mod:`~megatron_resonance.posgen.stats`).
"""

from megatron_resonance.posgen.splits import (
    NUM_PREFIXES,
    NUM_REFERENCE_PREFIXES,
    PAPER_SIZES,
    POOL_SIZES,
    SPLITS,
    make_reference_split,
    make_split,
    prefix_ids,
    prefix_pool,
    prefix_tokens,
    reference_prefixes,
    sample_prefix_ids,
    sample_prefixes,
)
from megatron_resonance.posgen.tasks import (
    MIN_LENGTH,
    PREFIX_LENGTH,
    TASKS,
    VOCAB_SIZE,
    combine,
    dependencies,
    dependency_table,
    expected_tokens,
    generate,
    rule_satisfied,
)

__all__ = [
    "MIN_LENGTH",
    "NUM_PREFIXES",
    "NUM_REFERENCE_PREFIXES",
    "PAPER_SIZES",
    "POOL_SIZES",
    "PREFIX_LENGTH",
    "SPLITS",
    "TASKS",
    "VOCAB_SIZE",
    "combine",
    "dependencies",
    "dependency_table",
    "expected_tokens",
    "generate",
    "make_reference_split",
    "make_split",
    "prefix_ids",
    "prefix_pool",
    "prefix_tokens",
    "reference_prefixes",
    "rule_satisfied",
    "sample_prefix_ids",
    "sample_prefixes",
]
