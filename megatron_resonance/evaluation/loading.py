"""Loading and running the models an evaluation resolved: parallel layout, dtype, the scorers.

:func:`open_scorer` loads a :class:`~megatron_resonance.evaluation.resolve.ResolvedModel` (a Megatron
checkpoint through the model provider at this process's TP/PP, or a Hugging Face model with transformers)
and returns a :class:`Scorer`: ``scores(tokens)`` for a batch of equal-length windows over the one scoring
path (``evaluation.scoring``), ``generate(prompts, max_new_tokens)`` for greedy continuations with a KV
cache (``evaluation.generation``), plus the data-parallel layout so callers can split windows over replicas.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
from typing import Iterator, List, Optional, Sequence

import torch
import torch.distributed as dist

import megatron_resonance.hf
from megatron_resonance.cli import library_warnings_quiet
from megatron_resonance.errors import CheckpointError, UserError
from megatron_resonance.evaluation.generation import greedy, hf_decoder, megatron_decoder
from megatron_resonance.evaluation.memory import check_fits
from megatron_resonance.evaluation.resolve import ResolvedModel
from megatron_resonance.evaluation.scoring import TokenScores, hf_token_scores, megatron_token_scores
from megatron_resonance.megatron import checkpointing, cpu_speed, distributed, llama
from megatron_resonance.megatron.llama import resolve_spec

# megatron.core (seconds to import) is imported inside the functions that use it, and transformers (the optional
# ``hf`` extra) where a Hugging Face model loads: the evaluation tools' --help and input checks run without them.

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclasses.dataclass
class Runtime:
    """How models run in this process: parallel layout, dtype, micro-batch."""

    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    micro_batch_size: int = 1
    context_parallel_size: int = 1
    """CP ranks sharing each sequence (megatron's load-balanced chunks); lengths must divide by 2 x CP."""
    dtype: str = "auto"
    """``auto`` (bfloat16 on GPU, float32 on CPU), ``float32`` or ``bfloat16``."""
    transformer_impl: str = "auto"
    seed: int = 1234

    @property
    def dtype_bytes(self) -> int:
        return self.torch_dtype.itemsize

    @property
    def torch_dtype(self) -> torch.dtype:
        if self.dtype == "auto":
            return torch.bfloat16 if torch.cuda.is_available() else torch.float32
        return DTYPES[self.dtype]

    def check(self, models: Sequence[ResolvedModel], lengths: Sequence[int] = ()) -> None:
        """One line for a layout that cannot run (before any process group exists) or, with context
        parallelism, a length it cannot split."""
        tp, pp, cp = self.tensor_model_parallel_size, self.pipeline_model_parallel_size, self.context_parallel_size
        if tp < 1 or pp < 1 or cp < 1 or self.micro_batch_size < 1:
            raise UserError(
                "--tensor-model-parallel-size, --pipeline-model-parallel-size, --context-parallel-size "
                "and --micro-batch-size must be >= 1"
            )
        if self.dtype != "auto" and self.dtype not in DTYPES:
            raise UserError(f"--dtype {self.dtype}: expected auto, {', '.join(DTYPES)}")
        if any(m.spec.kind == "megatron" for m in models):
            try:
                resolve_spec(self.transformer_impl)
            except (ValueError, RuntimeError) as e:
                raise UserError(str(e)) from None
        world = distributed.world_size_from_env()
        if any(m.spec.kind == "hf" for m in models) and world > 1:
            raise UserError("--hf models run in one process (no torchrun); use --load for a Megatron checkpoint")
        if world % (tp * pp * cp):
            raise UserError(f"world size {world} is not divisible by TP x PP x CP = {tp} x {pp} x {cp}")
        for length in lengths if cp > 1 else ():
            if length % (2 * cp):
                raise UserError(f"--lengths: {length} is not divisible by 2 x context-parallel-size = {2 * cp}")
        for m in models:
            if m.spec.kind != "megatron":
                continue
            try:
                m.llama.check_parallel(tp)
            except ValueError as e:
                raise UserError(f"{m.name}: {e}") from None
            if m.llama.num_layers % pp:
                raise UserError(
                    f"{m.name}: pipeline-model-parallel-size {pp} does not divide num_layers {m.llama.num_layers}"
                )


def initialize(runtime: Runtime) -> None:
    """torch.distributed + megatron's parallel state for the Megatron models (gloo on CPU)."""
    with library_warnings_quiet():
        distributed.initialize(
            runtime.tensor_model_parallel_size,
            runtime.pipeline_model_parallel_size,
            context_parallel_size=runtime.context_parallel_size,
            seed=runtime.seed,
        )


class Scorer:
    """A loaded model: ``scores(tokens)`` on ``[B, L]`` batches of at most ``batch_size`` rows, and
    ``generate(prompts, max_new_tokens, stop_ids)``: greedy new tokens per prompt (``evaluation.generation``).

    ``dp_rank``/``dp_size``: this process's data-parallel replica; callers give each replica its own
    batches and add their results with ``all_reduce``."""

    batch_size: int = 1
    dp_rank: int = 0
    dp_size: int = 1

    def __init__(self, model: ResolvedModel):
        self.model = model

    def scores(self, tokens: torch.Tensor) -> TokenScores:
        raise NotImplementedError

    def generate(
        self, prompts: Sequence[Sequence[int]], max_new_tokens: int, stop_ids: Sequence[int] = ()
    ) -> List[List[int]]:
        """Per prompt (token ids, any lengths), its greedy continuation: at most ``max_new_tokens`` new tokens,
        ending with the first of ``stop_ids`` generated (kept). Collective like ``scores``."""
        raise NotImplementedError

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor

    def close(self) -> None:
        """Drop the weights (the scorer object may outlive its ``with`` block)."""


class MegatronScorer(Scorer):
    def __init__(self, model: ResolvedModel, chunks: List[torch.nn.Module], runtime: Runtime):
        from megatron.core import parallel_state as ps

        super().__init__(model)
        self.chunks = chunks
        self.micro_batch_size = runtime.micro_batch_size
        # a few micro-batches per call keep the pipeline full
        self.batch_size = runtime.micro_batch_size * max(1, 2 * runtime.pipeline_model_parallel_size - 1)
        self.dp_rank = ps.get_data_parallel_rank()
        self.dp_size = ps.get_data_parallel_world_size()

    def scores(self, tokens: torch.Tensor) -> TokenScores:
        return megatron_token_scores(
            self.chunks, tokens, vocab_size=self.model.vocab_size, micro_batch_size=self.micro_batch_size
        )

    def generate(
        self, prompts: Sequence[Sequence[int]], max_new_tokens: int, stop_ids: Sequence[int] = ()
    ) -> List[List[int]]:
        return greedy(
            megatron_decoder(self.chunks),
            prompts,
            max_new_tokens=max_new_tokens,
            vocab_size=self.model.vocab_size,
            stop_ids=stop_ids,
        )

    def close(self) -> None:
        self.chunks = None

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        from megatron.core import parallel_state as ps

        if self.dp_size == 1:
            return tensor
        device = distributed.device()
        out = tensor.to(device)
        dist.all_reduce(out, group=ps.get_data_parallel_group())
        return out.cpu()


class HFScorer(Scorer):
    """Runs outside ``cpu_compat``'s device mode, which a Megatron model loaded earlier in the process leaves
    on (it made transformers decode 2.6x slower on CPU); transformers makes no CUDA call on CPU."""

    def __init__(self, model: ResolvedModel, hf_model: torch.nn.Module, runtime: Runtime):
        super().__init__(model)
        self.hf_model = hf_model
        self.batch_size = runtime.micro_batch_size

    def scores(self, tokens: torch.Tensor) -> TokenScores:
        with cpu_speed.suspended():
            return hf_token_scores(self.hf_model, tokens, vocab_size=self.model.vocab_size)

    def generate(
        self, prompts: Sequence[Sequence[int]], max_new_tokens: int, stop_ids: Sequence[int] = ()
    ) -> List[List[int]]:
        with cpu_speed.suspended():
            return greedy(
                hf_decoder(self.hf_model),
                prompts,
                max_new_tokens=max_new_tokens,
                vocab_size=self.model.vocab_size,
                stop_ids=stop_ids,
            )

    def close(self) -> None:
        self.hf_model = None


def load_megatron(model: ResolvedModel, runtime: Runtime, seq_length: int) -> List[torch.nn.Module]:
    """GPTModel chunks for this rank with the checkpoint's weights (resharded to this TP/PP), in eval mode."""
    chunks = llama.build_model(
        model.llama,
        dtype=runtime.torch_dtype,
        spec=runtime.transformer_impl,
        seq_length=max(seq_length, model.llama.max_position_embeddings),
        initialize=False,
    )
    try:
        checkpointing.load_checkpoint(model.directory, chunks)
    except CheckpointError as e:
        raise UserError(f"--load {model.spec.path}: {e}") from None
    return llama.for_inference(chunks)


def load_hf(model: ResolvedModel, runtime: Runtime) -> torch.nn.Module:
    import transformers

    megatron_resonance.hf.register()  # exports with --rope-format custom need the named rope type
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(model.directory, dtype=runtime.torch_dtype)
    if torch.cuda.is_available():
        hf_model = hf_model.cuda()
    return hf_model.eval()


@contextlib.contextmanager
def open_scorer(model: ResolvedModel, runtime: Runtime, seq_length: int) -> Iterator[Scorer]:
    """Load ``model`` (for sequences up to ``seq_length``) and free it again afterwards."""
    if model.spec.kind == "megatron":
        scorer: Scorer = MegatronScorer(model, load_megatron(model, runtime, seq_length), runtime)
    else:
        scorer = HFScorer(model, load_hf(model, runtime), runtime)
    try:
        yield scorer
    finally:
        scorer.close()
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def check_memory(
    models: Sequence[ResolvedModel],
    runtime: Runtime,
    length: int,
    max_memory_gb: Optional[float] = None,
    generate: bool = False,
) -> None:
    """UserError when a forward pass at ``length`` (``generate``: decoding up to ``length``) would not fit
    for one of ``models`` (see ``memory``)."""
    for m in models:
        megatron = m.spec.kind == "megatron"
        check_fits(
            m.name,
            m.shape,
            length,
            micro_batch_size=runtime.micro_batch_size,
            tp=runtime.tensor_model_parallel_size if megatron else 1,
            pp=runtime.pipeline_model_parallel_size if megatron else 1,
            cp=runtime.context_parallel_size if megatron else 1,
            dtype_bytes=runtime.dtype_bytes,
            max_memory_gb=max_memory_gb,
            hf=not megatron,
            generate=generate,
        )
