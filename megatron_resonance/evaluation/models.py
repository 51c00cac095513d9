"""The models an evaluation runs: Megatron checkpoints and Hugging Face directories, resolved, loaded, scored.

:func:`resolve` reads a model's configuration without loading weights (its name, shape, rope plan,
original training length and tokenizer), so every bad input is found before any process talks to
another. :func:`open_scorer` loads it and returns a :class:`Scorer`: ``scores(tokens)`` for a batch of
equal-length windows, plus the data-parallel layout so callers can split windows over replicas.

**Which tokenizer goes with a checkpoint.** ``--tokenizer`` wins (a SentencePiece ``.model``, a Hugging Face
``tokenizer.json``, or a directory with either). Otherwise, for a Megatron checkpoint, the first that exists
of: the Hugging Face files kept by ``tools/convert_hf_to_megatron.py`` (and carried on by training from
it) in ``<root>/hf/`` (``tokenizer.model``, else the directory when it holds ``tokenizer.json``, as a
Llama-3 source does), a ``tokenizer.model`` or ``tokenizer.json`` placed in the ``iter_*`` directory or
the root, and the training run's ``data.tokenizer_model`` recorded in ``megatron_resonance.json`` (as
recorded, else relative to the checkpoint root). For a Hugging Face directory: its ``tokenizer.model``,
else the directory itself when it holds ``tokenizer.json`` (loaded with its ``tokenizer_config.json``).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import json
import os
from typing import Any, Dict, Iterator, List, Optional, Sequence

import torch

from megatron_resonance.cli import UsageError, check_output_dir
from megatron_resonance.data.tokenizer import HF_TOKENIZER_FILE, load_tokenizer
from megatron_resonance.evaluation.memory import ModelShape
from megatron_resonance.evaluation.scoring import TokenScores
from megatron_resonance.hf import config as hf_config
from megatron_resonance.megatron import distributed

KINDS = ("megatron", "hf")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclasses.dataclass
class ModelSpec:
    """A model as named on the command line: ``--load DIR`` (megatron) or ``--hf DIR``."""

    kind: str
    path: str
    name: Optional[str] = None


@dataclasses.dataclass
class ResolvedModel:
    """A model's configuration, read without loading its weights."""

    spec: ModelSpec
    name: str
    """Report key: ``--name``, else the directory's basename."""
    directory: str
    """Megatron: the ``iter_*`` checkpoint directory; Hugging Face: the model directory."""
    shape: ModelShape
    vocab_size: int
    original_length: Optional[int]
    """The length the model was (pre)trained at: the rope plan's original length."""
    rope: Dict[str, Any]
    """The rope plan (``RopeConfig.to_dict()``), or the Hugging Face rope settings when we cannot carry them."""
    tokenizer: Optional[str]
    """Path of the tokenizer found for it (see the module docstring), or None."""
    llama: Any = None
    """Megatron: the stored ``LlamaConfig``."""

    def describe(self) -> Dict[str, Any]:
        return {
            "kind": self.spec.kind,
            "path": self.spec.path,
            "directory": self.directory,
            "rope": self.rope,
            "original_length": self.original_length,
            "tokenizer": self.tokenizer,
            "vocab_size": self.vocab_size,
        }


def default_name(spec: ModelSpec) -> str:
    path = os.path.normpath(os.path.abspath(spec.path))
    base = os.path.basename(path)
    if spec.kind == "megatron" and base.startswith("iter_"):
        return f"{os.path.basename(os.path.dirname(path))}/{base}"
    return base


def _first_tokenizer(candidates: Sequence[Optional[str]]) -> Optional[str]:
    """The first candidate that is a tokenizer: a file, or a directory holding ``tokenizer.json``."""
    for c in candidates:
        if c and (os.path.isfile(c) or os.path.isfile(os.path.join(c, HF_TOKENIZER_FILE))):
            return c
    return None


def megatron_tokenizer(load: str, checkpoint: str, stored: Dict[str, Any]) -> Optional[str]:
    """The tokenizer stored with a Megatron checkpoint (see the module docstring), or None."""
    root = os.path.dirname(os.path.abspath(checkpoint))
    recorded = ((stored.get("run") or {}).get("data") or {}).get("tokenizer_model")
    candidates = []
    for assets in (os.path.join(root, "hf"), os.path.join(load, "hf")):
        candidates += [os.path.join(assets, "tokenizer.model"), assets]
    for directory in (checkpoint, root):
        candidates += [os.path.join(directory, "tokenizer.model"), os.path.join(directory, HF_TOKENIZER_FILE)]
    if recorded:
        candidates += [recorded, os.path.join(root, recorded)]
    return _first_tokenizer(candidates)


def hf_tokenizer(directory: str) -> Optional[str]:
    return _first_tokenizer([os.path.join(directory, "tokenizer.model"), directory])


def resolve(spec: ModelSpec, tokenizer: Optional[str] = None) -> ResolvedModel:
    """Read ``spec``'s configuration; UsageError with one line for a bad path or an unreadable config."""
    if spec.kind not in KINDS:
        raise UsageError(f"unknown model kind {spec.kind!r}")
    if not os.path.exists(spec.path):
        flag = "--load" if spec.kind == "megatron" else "--hf"
        raise UsageError(f"{flag} {spec.path}: no such file or directory")
    name = spec.name or default_name(spec)
    if tokenizer is not None:
        load_tokenizer(tokenizer, "--tokenizer")  # one line for a path that is no tokenizer, before any model
    if spec.kind == "megatron":
        return _resolve_megatron(spec, name, tokenizer)
    return _resolve_hf(spec, name, tokenizer)


def _resolve_megatron(spec: ModelSpec, name: str, tokenizer: Optional[str]) -> ResolvedModel:
    from megatron_resonance.megatron import checkpointing
    from megatron_resonance.megatron.llama import LlamaConfig

    try:
        ckpt = checkpointing.resolve_checkpoint(spec.path)
    except checkpointing.CheckpointError as e:
        raise UsageError(f"--load {spec.path}: {e}") from None
    config_path = os.path.join(ckpt, checkpointing.CONFIG_FILE)
    try:
        with open(config_path) as f:
            stored = json.load(f)
        cfg = LlamaConfig.from_dict(dict(stored["model"]))
    except (OSError, ValueError, KeyError, TypeError) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UsageError(f"--load {spec.path}: cannot read the model config {config_path} ({reason})") from None
    try:
        checkpointing.verify_checkpoint(ckpt)  # a truncated or missing file: one line, before any model is built
    except checkpointing.CheckpointError as e:
        raise UsageError(f"--load {spec.path}: {e}") from None
    return ResolvedModel(
        spec=spec,
        name=name,
        directory=ckpt,
        shape=ModelShape.from_llama(cfg),
        vocab_size=cfg.vocab_size,
        original_length=cfg.rope.original_max_position,
        rope=cfg.rope.to_dict(),
        tokenizer=tokenizer or megatron_tokenizer(spec.path, ckpt, stored),
        llama=cfg,
    )


def _resolve_hf(spec: ModelSpec, name: str, tokenizer: Optional[str]) -> ResolvedModel:
    path = os.path.join(spec.path, "config.json")
    try:
        with open(path) as f:
            config = json.load(f)
        shape = ModelShape(**hf_config.model_sizes(config))
    except (OSError, ValueError, KeyError, TypeError) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UsageError(f"--hf {spec.path}: cannot read the model config {path} ({reason})") from None
    try:
        rope_cfg = hf_config.from_hf(config).rope
        rope, original = rope_cfg.to_dict(), rope_cfg.original_max_position
    except Exception:  # noqa: BLE001 - a rope type we cannot carry still runs in transformers
        params = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
        rope = params or {"rope_type": "default", "rope_theta": config.get("rope_theta")}
        original = params.get("original_max_position_embeddings") or config.get("max_position_embeddings")
    return ResolvedModel(
        spec=spec,
        name=name,
        directory=spec.path,
        shape=shape,
        vocab_size=shape.vocab_size,
        original_length=original,
        rope=rope,
        tokenizer=tokenizer or hf_tokenizer(spec.path),
    )


def resolve_all(specs: Sequence[ModelSpec], tokenizer: Optional[str] = None) -> List[ResolvedModel]:
    if not specs:
        raise UsageError("no model: give --load MEGATRON_DIR or --hf HF_DIR")
    models = [resolve(s, tokenizer) for s in specs]
    seen = set()
    for m in models:
        if m.name in seen:
            raise UsageError(f"two models are named {m.name!r}: pass --name for each model")
        seen.add(m.name)
    return models


# ----------------------------------------------------------------------------------------------------------
# Parallel layout and loading
# ----------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Runtime:
    """How models run in this process: parallel layout, dtype, micro-batch."""

    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    micro_batch_size: int = 1
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

    def check(self, models: Sequence[ResolvedModel]) -> None:
        """One line for a layout that cannot run (before any process group exists)."""
        tp, pp = self.tensor_model_parallel_size, self.pipeline_model_parallel_size
        if tp < 1 or pp < 1 or self.micro_batch_size < 1:
            raise UsageError("--tensor-model-parallel-size, --pipeline-model-parallel-size and --micro-batch-size "
                             "must be >= 1")
        if self.dtype != "auto" and self.dtype not in DTYPES:
            raise UsageError(f"--dtype {self.dtype}: expected auto, {', '.join(DTYPES)}")
        if any(m.spec.kind == "megatron" for m in models):
            from megatron_resonance.megatron.llama import resolve_spec

            try:
                resolve_spec(self.transformer_impl)
            except (ValueError, RuntimeError) as e:
                raise UsageError(str(e)) from None
        world = distributed.world_size_from_env()
        if any(m.spec.kind == "hf" for m in models) and world > 1:
            raise UsageError("--hf models run in one process (no torchrun); use --load for a Megatron checkpoint")
        if world % (tp * pp):
            raise UsageError(f"world size {world} is not divisible by TP x PP = {tp} x {pp}")
        for m in models:
            if m.spec.kind != "megatron":
                continue
            try:
                m.llama.check_parallel(tp)
            except ValueError as e:
                raise UsageError(f"{m.name}: {e}") from None
            if m.llama.num_layers % pp:
                raise UsageError(f"{m.name}: pipeline-model-parallel-size {pp} does not divide num_layers "
                                 f"{m.llama.num_layers}")


def initialize(runtime: Runtime) -> None:
    """torch.distributed + megatron's parallel state for the Megatron models (gloo on CPU)."""
    import warnings


    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", module=r"megatron\..*")
        warnings.filterwarnings("ignore", category=FutureWarning)
        distributed.initialize(runtime.tensor_model_parallel_size, runtime.pipeline_model_parallel_size,
                               seed=runtime.seed)


class Scorer:
    """A loaded model: ``scores(tokens)`` on ``[B, L]`` batches of at most ``batch_size`` rows.

    ``dp_rank``/``dp_size``: this process's data-parallel replica; callers give each replica its own
    batches and add their results with ``all_reduce``."""

    batch_size: int = 1
    dp_rank: int = 0
    dp_size: int = 1

    def __init__(self, model: ResolvedModel):
        self.model = model

    def scores(self, tokens: torch.Tensor) -> TokenScores:
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
        from megatron_resonance.evaluation.scoring import megatron_token_scores

        return megatron_token_scores(self.chunks, tokens, vocab_size=self.model.vocab_size,
                                     micro_batch_size=self.micro_batch_size)

    def close(self) -> None:
        self.chunks = None

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist
        from megatron.core import parallel_state as ps

        if self.dp_size == 1:
            return tensor
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else "cpu"
        out = tensor.to(device)
        dist.all_reduce(out, group=ps.get_data_parallel_group())
        return out.cpu()


class HFScorer(Scorer):
    def __init__(self, model: ResolvedModel, hf_model: torch.nn.Module, runtime: Runtime):
        super().__init__(model)
        self.hf_model = hf_model
        self.batch_size = runtime.micro_batch_size

    def scores(self, tokens: torch.Tensor) -> TokenScores:
        from megatron_resonance.evaluation.scoring import hf_token_scores

        return hf_token_scores(self.hf_model, tokens, vocab_size=self.model.vocab_size)

    def close(self) -> None:
        self.hf_model = None


def load_megatron(model: ResolvedModel, runtime: Runtime, seq_length: int) -> List[torch.nn.Module]:
    """GPTModel chunks for this rank with the checkpoint's weights (resharded to this TP/PP), in eval mode."""
    from megatron_resonance.megatron import checkpointing, llama

    chunks = llama.build_model(model.llama, dtype=runtime.torch_dtype, spec=runtime.transformer_impl,
                               seq_length=max(seq_length, model.llama.max_position_embeddings), initialize=False)
    try:
        checkpointing.load_checkpoint(model.directory, chunks)
    except checkpointing.CheckpointError as e:
        raise UsageError(f"--load {model.spec.path}: {e}") from None
    return llama.for_inference(chunks)


def load_hf(model: ResolvedModel, runtime: Runtime) -> torch.nn.Module:
    import transformers

    import megatron_resonance.hf

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


# ----------------------------------------------------------------------------------------------------------
# Command line shared by the evaluation tools
# ----------------------------------------------------------------------------------------------------------


class _AppendModel(argparse.Action):
    """``--load``/``--hf`` append to one ordered list of ModelSpec."""

    def __call__(self, parser, namespace, values, option_string=None):
        models = list(getattr(namespace, "models", None) or [])
        models.append(ModelSpec(self.const, values))
        namespace.models = models


def parse_lengths(text: str) -> List[int]:
    """``"128,256,512"`` -> ``[128, 256, 512]`` (sorted, unique); UsageError for anything else."""
    lengths = []
    for item in text.split(","):
        item = item.strip()
        try:
            value = int(item)
        except ValueError:
            raise UsageError(f"--lengths {text!r}: {item!r} is not an integer (expected e.g. 128,256,512)") from None
        if value < 2:
            raise UsageError(f"--lengths {text!r}: a length must be >= 2 tokens, got {value}")
        lengths.append(value)
    return sorted(set(lengths))


def add_model_arguments(parser: argparse.ArgumentParser, *, several: bool) -> None:
    g = parser.add_argument_group("model")
    more = " (repeatable; with --hf too)" if several else ""
    g.add_argument("--load", action=_AppendModel, const="megatron", dest="models", default=[],
                   metavar="MEGATRON_DIR", help=f"Megatron checkpoint root or iter_* directory{more}")
    g.add_argument("--hf", action=_AppendModel, const="hf", dest="models", metavar="HF_DIR",
                   help=f"Hugging Face model directory{more}")
    if several:
        g.add_argument("--name", action="append", default=[],
                       help="report key of the models in --load/--hf order (default: the directory's basename)")
    g.add_argument("--tokenizer", default=None, metavar="TOKENIZER",
                   help="SentencePiece .model, Hugging Face tokenizer.json, or a directory with either "
                        "(default: the tokenizer stored with the model)")
    p = parser.add_argument_group("parallelism and precision (Megatron checkpoints)")
    p.add_argument("--tensor-model-parallel-size", type=int, default=1, help="TP ranks (under torchrun)")
    p.add_argument("--pipeline-model-parallel-size", type=int, default=1, help="PP stages (under torchrun)")
    p.add_argument("--micro-batch-size", type=int, default=1, help="sequences per forward (default 1)")
    p.add_argument("--dtype", default="auto", choices=("auto", *DTYPES),
                   help="compute dtype: auto = bfloat16 on GPU, float32 on CPU")
    p.add_argument("--transformer-impl", default="auto", choices=("auto", "te", "local"),
                   help="layer spec: auto = Transformer Engine when present, else local (SDPA)")
    p.add_argument("--max-memory-gb", type=float, default=None,
                   help="memory one process may use (default: free GPU memory, or this process's share of RAM)")


def models_from_args(args: argparse.Namespace) -> List[ModelSpec]:
    specs = [dataclasses.replace(s) for s in (getattr(args, "models", None) or [])]
    names = getattr(args, "name", None) or []
    if len(names) > len(specs):
        raise UsageError(f"{len(names)} --name for {len(specs)} model(s)")
    for spec, name in zip(specs, names):
        spec.name = name
    return specs


def runtime_from_args(args: argparse.Namespace) -> Runtime:
    return Runtime(
        tensor_model_parallel_size=args.tensor_model_parallel_size,
        pipeline_model_parallel_size=args.pipeline_model_parallel_size,
        micro_batch_size=args.micro_batch_size,
        dtype=args.dtype,
        transformer_impl=args.transformer_impl,
        seed=getattr(args, "seed", 1234),
    )


def is_rank0() -> bool:
    return os.environ.get("RANK", "0") == "0"


def check_memory(models: Sequence[ResolvedModel], runtime: Runtime, length: int,
                 max_memory_gb: Optional[float] = None) -> None:
    """UsageError when a forward pass at ``length`` would not fit for one of ``models`` (see ``memory``)."""
    from megatron_resonance.evaluation.memory import check_fits

    for m in models:
        megatron = m.spec.kind == "megatron"
        check_fits(m.name, m.shape, length, micro_batch_size=runtime.micro_batch_size,
                   tp=runtime.tensor_model_parallel_size if megatron else 1,
                   pp=runtime.pipeline_model_parallel_size if megatron else 1,
                   dtype_bytes=runtime.dtype_bytes, max_memory_gb=max_memory_gb)


def prepare_out(out: str) -> None:
    """Create the output directory (rank 0); UsageError when it cannot be."""
    check_output_dir(out, "--out")
    if is_rank0():
        try:
            os.makedirs(out, exist_ok=True)
        except OSError as e:
            raise UsageError(f"--out {out}: cannot create it ({e.strerror})") from None
