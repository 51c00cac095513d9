"""RULER (Hsieh et al. 2024; NVIDIA/RULER, Apache-2.0) synthetic tasks as a library: samples in a model's own
tokens (:func:`build_samples`) and RULER's scoring (:func:`string_match_all`). See ``docs/ruler.md``."""

from megatron_resonance.evaluation.ruler.build import Sample, build_samples
from megatron_resonance.evaluation.ruler.haystack import Haystack, load_haystack
from megatron_resonance.evaluation.ruler.scoring import postprocess_pred, string_match_all, string_match_part
from megatron_resonance.evaluation.ruler.tasks import NEEDLE_TASKS, SINGLE_NEEDLE_TASKS, TASKS, TaskConfig

__all__ = [
    "NEEDLE_TASKS",
    "SINGLE_NEEDLE_TASKS",
    "TASKS",
    "Haystack",
    "Sample",
    "TaskConfig",
    "build_samples",
    "load_haystack",
    "postprocess_pred",
    "string_match_all",
    "string_match_part",
]
