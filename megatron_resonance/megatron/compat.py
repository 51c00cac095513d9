"""megatron-core's supported releases, and every workaround for one of them, in one place.

The supported window is :data:`WINDOW` (setup.py asks for :data:`REQUIREMENT`). ``import
megatron_resonance.megatron`` calls :func:`check_version`, which refuses any other release with one line
(:class:`UnsupportedMegatronCore`, an ImportError) before anything of megatron is imported.

Each workaround below names the release(s) it is for and why. Code that only makes megatron run on CPU
(``cpu_compat``) or run faster there (``cpu_speed``, ``local_ops``) is not here; where it depends on the
release it asks here (:func:`gathers_weight`). Still elsewhere: ``training/model.py``'s
``use_fused_torch_adam`` (torch's fused Adam kernel where megatron falls back to torch's Adam: every
release of the window).
"""

from __future__ import annotations

import ast
import contextlib
import functools
import importlib.util
import logging
import os
import queue
import sys
from typing import Optional, Tuple

import numpy

# megatron.core is imported inside the workarounds only: check_version runs before any of it is imported.

#: (major, minor) releases this package is tested with, any patch release of each
WINDOW: Tuple[Tuple[int, int], ...] = ((0, 15), (0, 16), (0, 19))
#: the pip requirement for :data:`WINDOW` (setup.py's)
REQUIREMENT = "megatron-core>=0.15,!=0.17.*,!=0.18.*,<0.20"


class UnsupportedMegatronCore(ImportError):
    """megatron-core is installed at a release outside :data:`WINDOW`."""


def window_text() -> str:
    """``"0.15.x, 0.16.x and 0.19.x"``"""
    names = [f"{major}.{minor}.x" for major, minor in WINDOW]
    return " and ".join([", ".join(names[:-1]), names[-1]] if len(names) > 1 else names)


def installed_version() -> Optional[str]:
    """The release of the megatron-core that ``import megatron.core`` gives, without importing it (that takes
    seconds): ``megatron/core/package_info.py`` read as text. None when megatron-core is not installed."""
    loaded = sys.modules.get("megatron.core")
    if loaded is not None and getattr(loaded, "__version__", None):
        return public_version(loaded.__version__)
    try:
        spec = importlib.util.find_spec("megatron.core")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    fields = {}
    try:
        with open(os.path.join(list(spec.submodule_search_locations)[0], "package_info.py"), encoding="utf-8") as f:
            tree = ast.parse(f.read())
    except (OSError, SyntaxError):
        return None
    for node in tree.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            with contextlib.suppress(ValueError):
                fields[node.targets[0].id] = ast.literal_eval(node.value)
    if not all(k in fields for k in ("MAJOR", "MINOR", "PATCH")):
        return None
    return f"{fields['MAJOR']}.{fields['MINOR']}.{fields['PATCH']}{fields.get('PRE_RELEASE', '')}"


def public_version(version: str) -> str:
    """``version`` without a local part: 0.19.x's ``__version__`` ends in ``+<short commit>`` of any git
    repository megatron-core is installed in (it runs ``git rev-parse`` in its own directory), e.g. of this
    one for a venv inside the checkout; the release is the part before it."""
    return version.split("+", 1)[0]


@functools.lru_cache(maxsize=None)
def installed_release() -> Tuple[int, int]:
    """(major, minor) of the installed megatron-core (``(-1, -1)``: not installed)."""
    return release(installed_version() or "")


def release(version: str) -> Tuple[int, int]:
    """``"0.16.1"`` -> ``(0, 16)``; ``(-1, -1)`` for a version that does not start with two numbers."""
    parts = version.split(".")
    try:
        return int(parts[0]), int("".join(c for c in parts[1] if c.isdigit()) or "x")
    except (IndexError, ValueError):
        return -1, -1


def check_version(version: Optional[str] = None) -> Optional[str]:
    """Raise :class:`UnsupportedMegatronCore` (one line naming the window) unless megatron-core is at a
    release of :data:`WINDOW`. ``version``: the installed one by default. Returns it (None: not installed;
    ``import megatron.core`` then fails on its own). An entry point that dies of it prints just the line."""
    version = installed_version() if version is None else version
    if version is None or release(version) in WINDOW:
        return version
    if sys.excepthook is sys.__excepthook__:
        sys.excepthook = _one_line_hook
    raise UnsupportedMegatronCore(
        f"megatron-resonance supports megatron-core {window_text()}; found {version}: pip install '{REQUIREMENT}'"
    )


def quiet_release_warnings() -> None:
    """Drop the log records a release writes on stderr in every process about code this package does not
    use. 0.15.x: importing megatron's MoE token dispatcher (which its GPT layer specs import) logs
    "fused_indices_to_multihot has reached end of life" (an experimental function of 0.11 it still uses;
    this package runs no MoE). 0.19.x: every ``GPTModel`` logs "GPTModel IS DEPRECATED ... use
    HybridModel" (its migration guide); a tool's one-line error would come with it. 0.16.x logs neither."""
    if installed_release() == (0, 15):
        logging.getLogger("megatron.core.utils").addFilter(_end_of_life)  # once: the same filter
    if installed_release() >= (0, 19):
        logging.getLogger("megatron.core.models.gpt.gpt_model").addFilter(_gpt_model_deprecated)


def _end_of_life(record) -> bool:
    return not (
        str(record.msg).startswith("%s has reached end of life") and record.args == ("fused_indices_to_multihot",)
    )


def _gpt_model_deprecated(record) -> bool:
    return not str(record.msg).startswith("GPTModel IS DEPRECATED.")


def _one_line_hook(kind, value, tb):
    """An entry point that did not catch :class:`UnsupportedMegatronCore` shows its line, not a traceback."""
    if isinstance(value, UnsupportedMegatronCore):
        print(value, file=sys.stderr)
    else:
        sys.__excepthook__(kind, value, tb)


# ==========================================================================================================
# Checkpointing (megatron/checkpointing.py)
# ==========================================================================================================


def in_process_write_results_queue() -> None:
    """0.15.x, 0.16.x, 0.19.x: give megatron's checkpoint writer an in-process results queue instead of its
    ``Manager().Queue()``.

    megatron-core creates that queue once per process, on the first save, in a spawned multiprocessing
    manager: a server process that stays for the rest of the run with default signal dispositions. Slurm
    delivers a step's signals to every process of the step, so the preemption warning (SIGUSR1) or SIGTERM
    kills the manager, and the save the trainer then makes fails with BrokenPipeError (seen on two nodes
    after a periodic save: the job requeued from the save before). Saves here are synchronous (the writer
    reports from this process), so a plain queue does the same job without a process.
    """
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if getattr(filesystem_async, "_results_queue", ...) is None:
        filesystem_async._results_queue = queue.Queue()


def common_state_in_shards(metadata) -> bool:
    """Whether a checkpoint keeps megatron's common (non-tensor) state in its torch_dist shards, as the object
    ``common_state`` of its ``.metadata`` (``metadata``), and this release reads it there. 0.19.x saves it so
    (and still loads ``common.pt``); 0.15.x and 0.16.x save and need ``common.pt``."""
    return installed_release() >= (0, 19) and any(
        key.startswith("common_state/") for key in metadata.state_dict_metadata
    )


def ensure_optimizer_state(optimizer) -> None:
    """0.15.x, 0.16.x, 0.19.x, without Apex/TE: a fresh torch Adam has no state yet, and megatron's distributed
    optimizer needs its ``step`` entries to build the sharded state dict a load fills. Allocate them with
    megatron's own zero-gradient dummy step (the loaded checkpoint then overwrites every value)."""
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(opt, "optimizer", None)
        if inner is not None and not inner.state and hasattr(opt, "_init_optimizer_states_with_dummy_values"):
            opt._init_optimizer_states_with_dummy_values()


@contextlib.contextmanager
def states_without_step(optimizer):
    """0.15.x, 0.16.x, 0.19.x, without Apex/TE: megatron loads ``fully_reshardable`` optimizer state by
    copying every entry of torch Adam's per-parameter state from the checkpoint, which has no ``step`` there
    (it travels in the param groups): a KeyError. Leave ``step`` out of that copy; :func:`restore_adam_steps`
    sets it afterwards."""
    patched = []
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        original = getattr(opt, "_set_main_param_and_optimizer_states", None)
        if original is None or getattr(opt.config, "use_precision_aware_optimizer_no_fp8_or_ds_fp8", False):
            continue

        def set_states(model_param, tensors, opt=opt, original=original):
            group_index, group_order = opt.model_param_group_index_map[model_param]
            state = opt.optimizer.state[opt.optimizer.param_groups[group_index]["params"][group_order]]
            step = state.pop("step", None) if "step" not in tensors else None
            try:
                original(model_param, tensors)
            finally:
                if step is not None:
                    state["step"] = step

        opt._set_main_param_and_optimizer_states = set_states
        patched.append(opt)
    try:
        yield
    finally:
        for opt in patched:
            del opt._set_main_param_and_optimizer_states


def restore_adam_steps(optimizer) -> None:
    """0.15.x, 0.16.x, 0.19.x, without Apex/TE: megatron's distributed optimizer restores torch Adam's iteration count
    in each param group's ``step`` but leaves the per-parameter ``step`` tensors as they were before loading
    (and, when it sets them, shares one tensor that torch's foreach Adam would increment once per parameter).
    Give every parameter its own copy of the restored count, or the bias correction is wrong after resume.
    (``checkpointing.place_adam_steps`` then moves them where torch's kernels read them.)"""
    import torch

    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(opt, "optimizer", None)
        for group in getattr(inner, "param_groups", []):
            if group.get("step") is None:
                continue
            for param in group["params"]:
                state = inner.state.get(param)
                if state is not None and "step" in state:
                    state["step"] = torch.tensor(float(group["step"]), dtype=state["step"].dtype)


# ==========================================================================================================
# Context parallelism (training/step.py, evaluation/scoring.py)
# ==========================================================================================================


def batch_on_this_cp_rank(batch: dict) -> dict:
    """megatron's load-balanced context-parallel part of ``batch``: each tensor's sequence in 2·CP chunks, this
    rank's two (``get_batch_on_this_cp_rank``). 0.19.x: that function asks for ``is_hybrid_cp`` and, without a
    ``cp_group``, slices over the whole world instead of the context-parallel group (0.15.x and 0.16.x take
    parallel_state's); give it both."""
    from megatron.core.utils import get_batch_on_this_cp_rank

    if installed_release() < (0, 19):
        return get_batch_on_this_cp_rank(batch)
    from megatron.core import parallel_state

    return get_batch_on_this_cp_rank(batch, is_hybrid_cp=False, cp_group=parallel_state.get_context_parallel_group())


# ==========================================================================================================
# CPU speed (megatron/cpu_speed.py)
# ==========================================================================================================


def gathers_weight(later_arguments: tuple) -> bool:
    """Whether the arguments megatron's linear autograd Function takes after ``tp_group`` ask it to gather
    a sharded weight (then ``cpu_speed``'s lean linear runs megatron's own). 0.19.x adds
    ``gtp_remat_size``: above 1 the weight is a shard gathered in forward and backward. 0.15.x and 0.16.x
    pass nothing after ``tp_group``."""
    return bool(later_arguments) and later_arguments[0] > 1


# ==========================================================================================================
# Data (data/datasets.py)
# ==========================================================================================================


def mock_tokens_within_vocabulary() -> None:
    """0.15.x: megatron's mock documents are the ids ``1, 2, ..., len-1`` and an EOD with lengths up to 4096,
    whatever the vocabulary: a model with a smaller one fails in its embedding (index out of range). 0.16.0
    takes the ids modulo the vocabulary size; do the same (the same documents as 0.16.x). Idempotent."""
    from megatron.core.datasets import gpt_dataset

    low_level = gpt_dataset.MockGPTLowLevelDataset
    if installed_release() != (0, 15) or getattr(low_level, "_within_vocabulary", False):
        return

    def __getitem__(self, idx):
        length = self.sequence_lengths[idx]
        ids = (numpy.arange(length - 1) + 1) % self.tokenizer.vocab_size
        return numpy.int64(numpy.concatenate([ids, [self.tokenizer.eod]]))

    low_level.__getitem__ = __getitem__
    low_level._within_vocabulary = True


# ==========================================================================================================
# Rotary (megatron/rotary.py)
# ==========================================================================================================


def use_get_emb(rotary_class: type) -> type:
    """0.15.x: megatron's ``RotaryEmbedding.forward`` builds the table itself after moving ``inv_freq`` to
    ``torch.cuda.current_device()``, which fails on CPU (the model's forward runs outside cpu_compat's device
    mode). 0.16.0 split it into ``get_emb`` (the table, which ``ResonanceRotaryEmbedding`` overrides) and a
    forward that slices it for context parallelism: give ``rotary_class`` that forward (the same tables,
    cached per length and offset as megatron's). Returns the class (unchanged on 0.16.x)."""
    if installed_release() != (0, 15):
        return rotary_class
    from megatron.core.models.common.embeddings.rotary_pos_embedding import get_pos_emb_on_this_cp_rank

    @functools.lru_cache(maxsize=32)
    def forward(self, max_seq_len: int, offset: int = 0, packed_seq: bool = False, cp_group=None):
        emb = self.get_emb(max_seq_len, offset)
        cp_group = self.cp_group if cp_group is None else cp_group
        if cp_group is not None and cp_group.size() > 1 and not packed_seq:
            emb = get_pos_emb_on_this_cp_rank(emb, 0, cp_group)
        return emb

    rotary_class.forward = forward
    return rotary_class


# ==========================================================================================================
# Layer spec (megatron/llama.py)
# ==========================================================================================================


def mlp_submodules(layer):
    """The ``MLPSubmodules`` (linear_fc1, activation_func, linear_fc2) of a GPT layer spec, to be edited in
    place. 0.19.x builds the dense MLP as ``functools.partial(MLP.as_mlp_submodule, submodules=...)`` where
    0.15.x and 0.16.x have ``ModuleSpec(module=MLP, submodules=...)``. None for another kind of MLP."""
    mlp = layer.submodules.mlp
    submodules = getattr(mlp, "submodules", None)
    if submodules is None and isinstance(mlp, functools.partial):
        submodules = mlp.keywords.get("submodules")
    return submodules if hasattr(submodules, "linear_fc1") else None


def strided_gated_fc1(layer):
    """0.15.x: megatron's MLP builds ``linear_fc1`` of a gated linear unit (SwiGLU: [gate; up]) with stride 1,
    so with CPU initialization each TP rank takes a contiguous block of the TP=1 weight (rank 0 all gate
    rows): the same seed gives another model at TP=2 than at TP=1 (losses differ from the first step).
    0.16.0 builds it with stride 2, each rank its part of gate and of up. Build the local spec's
    ``linear_fc1`` so (only the initialization changes). Returns the layer spec."""
    if installed_release() != (0, 15):
        return layer
    from megatron.core.tensor_parallel import ColumnParallelLinear

    mlp = mlp_submodules(layer)
    if mlp is not None and mlp.linear_fc1 is ColumnParallelLinear:
        mlp.linear_fc1 = _strided_fc1()
    return layer


@functools.lru_cache(maxsize=None)
def _strided_fc1() -> type:
    from megatron.core.tensor_parallel import ColumnParallelLinear

    class StridedColumnParallelLinear(ColumnParallelLinear):
        """``ColumnParallelLinear`` with 0.16's stride 2 for a gated linear unit."""

        def __init__(self, *args, config, **kwargs):
            if config.gated_linear_unit:
                kwargs.setdefault("stride", 2)
            super().__init__(*args, config=config, **kwargs)

    return StridedColumnParallelLinear
