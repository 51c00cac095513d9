"""The command line the evaluation tools share (``tools/eval_perplexity.py``, ``tools/eval_passkey.py``):
``--load``/``--hf`` models in order, the parallel layout and dtype, ``--lengths``, ``--out``; and
:class:`RunOptions`, what every evaluation ``run`` takes from them."""

from __future__ import annotations

import argparse
import dataclasses
import os
from typing import Callable, List, Optional

from megatron_resonance.cli import check_output_dir
from megatron_resonance.config_fields import same_named
from megatron_resonance.errors import UserError
from megatron_resonance.evaluation.loading import DTYPES, Runtime
from megatron_resonance.evaluation.resolve import ModelSpec
from megatron_resonance.megatron import distributed


class _AppendModel(argparse.Action):
    """``--load``/``--hf`` append to one ordered list of ModelSpec."""

    def __call__(self, parser, namespace, values, option_string=None):
        models = list(getattr(namespace, "models", None) or [])
        models.append(ModelSpec(self.const, values))
        namespace.models = models


def parse_lengths(text: str) -> List[int]:
    """``"128,256,512"`` -> ``[128, 256, 512]`` (sorted, unique); UserError for anything else."""
    lengths = []
    for item in text.split(","):
        item = item.strip()
        try:
            value = int(item)
        except ValueError:
            raise UserError(f"--lengths {text!r}: {item!r} is not an integer (expected e.g. 128,256,512)") from None
        if value < 2:
            raise UserError(f"--lengths {text!r}: a length must be >= 2 tokens, got {value}")
        lengths.append(value)
    return sorted(set(lengths))


def add_model_arguments(parser: argparse.ArgumentParser, *, several: bool) -> None:
    g = parser.add_argument_group("model")
    more = " (repeatable; with --hf too)" if several else ""
    g.add_argument(
        "--load",
        action=_AppendModel,
        const="megatron",
        dest="models",
        default=[],
        metavar="MEGATRON_DIR",
        help=f"Megatron checkpoint root or iter_* directory{more}",
    )
    g.add_argument(
        "--hf",
        action=_AppendModel,
        const="hf",
        dest="models",
        metavar="HF_DIR",
        help=f"Hugging Face model directory{more}",
    )
    if several:
        g.add_argument(
            "--name",
            action="append",
            default=[],
            help="report key of the models in --load/--hf order (default: the directory's basename)",
        )
    g.add_argument(
        "--tokenizer",
        default=None,
        metavar="TOKENIZER",
        help="SentencePiece .model, Hugging Face tokenizer.json, or a directory with either "
        "(default: the tokenizer stored with the model)",
    )
    p = parser.add_argument_group("parallelism and precision (Megatron checkpoints)")
    p.add_argument("--tensor-model-parallel-size", type=int, default=1, help="TP ranks (under torchrun)")
    p.add_argument("--pipeline-model-parallel-size", type=int, default=1, help="PP stages (under torchrun)")
    p.add_argument(
        "--context-parallel-size",
        type=int,
        default=1,
        help="CP ranks sharing each sequence (under torchrun; every length divisible by 2 x CP)",
    )
    p.add_argument("--micro-batch-size", type=int, default=1, help="sequences per forward (default 1)")
    p.add_argument(
        "--dtype",
        default="auto",
        choices=("auto", *DTYPES),
        help="compute dtype: auto = bfloat16 on GPU, float32 on CPU",
    )
    p.add_argument(
        "--transformer-impl",
        default="auto",
        choices=("auto", "te", "local"),
        help="layer spec: auto = Transformer Engine when present, else local (SDPA)",
    )
    p.add_argument(
        "--max-memory-gb",
        type=float,
        default=None,
        help="memory one process may use (default: free GPU memory, or this process's share of RAM)",
    )


def models_from_args(args: argparse.Namespace) -> List[ModelSpec]:
    specs = [dataclasses.replace(s) for s in (getattr(args, "models", None) or [])]
    names = getattr(args, "name", None) or []
    if len(names) > len(specs):
        raise UserError(f"{len(names)} --name for {len(specs)} model(s)")
    for spec, name in zip(specs, names):
        spec.name = name
    return specs


def runtime_from_args(args: argparse.Namespace) -> Runtime:
    parallel = "tensor_model_parallel_size pipeline_model_parallel_size context_parallel_size"
    return Runtime(
        **same_named(args, f"{parallel} micro_batch_size dtype transformer_impl"), seed=getattr(args, "seed", 1234)
    )


@dataclasses.dataclass
class RunOptions:
    """What every evaluation ``run`` (perplexity, passkey, RULER) takes from the shared flags."""

    out: Optional[str] = None
    """Report directory (rank 0 writes it); None: no files."""
    tokenizer: Optional[str] = None
    """Tokenizer in place of the one stored with each model."""
    runtime: Runtime = dataclasses.field(default_factory=Runtime)
    max_memory_gb: Optional[float] = None
    """Memory one process may use (default: free GPU memory, or this process's share of RAM)."""
    progress: bool = True
    log: Optional[Callable[[str], None]] = print
    """Where the run's lines go (rank 0 only); None: nowhere."""

    def say(self, line: str) -> None:
        if self.log and distributed.is_rank0():
            self.log(line)


def run_options(args: argparse.Namespace) -> RunOptions:
    return RunOptions(
        out=args.out,
        tokenizer=args.tokenizer,
        runtime=runtime_from_args(args),
        max_memory_gb=args.max_memory_gb,
        progress=not args.no_progress,
    )


def prepare_out(out: str) -> None:
    """Create the output directory (rank 0); UserError when it cannot be."""
    check_output_dir(out, "--out")
    if distributed.is_rank0():
        try:
            os.makedirs(out, exist_ok=True)
        except OSError as e:
            raise UserError(f"--out {out}: cannot create it ({e.strerror})") from None
