"""Entry-point plumbing shared by ``pretrain/`` and ``finetune/``: parse, validate, (self-)launch, run.

Under ``torchrun`` the script runs directly. Started with plain ``python ... --nproc-per-node N``, it first
validates the configuration in one process (so bad input is one error line, before any worker starts),
then re-executes itself under ``torch.distributed.run``.
"""

from __future__ import annotations

import os
import sys
from typing import Callable, List, Optional

from megatron_resonance.cli import ArgumentParser, fail
from megatron_resonance.megatron.checkpointing import CheckpointError
from megatron_resonance.training.config import Config, ConfigError, add_config_arguments


def make_parser(prog: str, description: str) -> ArgumentParser:
    parser = ArgumentParser(prog=prog, description=description)
    parser.add_argument(
        "--nproc-per-node",
        type=int,
        default=None,
        help="launch this many local processes with torchrun (omit when already under torchrun/srun)",
    )
    add_config_arguments(parser)
    return parser


def _under_launcher() -> bool:
    return "LOCAL_RANK" in os.environ or "TORCHELASTIC_RUN_ID" in os.environ


def _strip_nproc(argv: List[str]) -> List[str]:
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a == "--nproc-per-node":
            skip = True
            continue
        if a.startswith("--nproc-per-node="):
            continue
        out.append(a)
    return out


def main(
    script: str,
    prog: str,
    description: str,
    make_config: Callable[[object], Config],
    argv: Optional[List[str]] = None,
) -> int:
    """Parse ``argv`` into a Config with ``make_config(args)``, then run or launch the trainer."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = make_parser(prog, description).parse_args(argv)
    rank0 = os.environ.get("RANK", "0") == "0"
    try:
        try:
            cfg = make_config(args)
        except (ValueError, TypeError) as e:  # a field the config dataclasses reject
            raise ConfigError(str(e)) from None
        from megatron_resonance.training import trainer

        if args.nproc_per_node and not _under_launcher():
            from megatron_resonance.training.trainer import _tokenizer_vocab, validate

            _tokenizer_vocab(cfg)
            validate(cfg, args.nproc_per_node)
            cmd = [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--standalone",
                f"--nproc-per-node={args.nproc_per_node}",
                script,
                *_strip_nproc(argv),
            ]
            os.environ.setdefault("OMP_NUM_THREADS", "1")
            os.execv(sys.executable, cmd)
        trainer.run(cfg)
    except (ConfigError, CheckpointError) as e:
        if rank0:
            fail(f"{prog}: error: {e}")
        sys.exit(2)
    return 0
