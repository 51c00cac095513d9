"""Entry-point plumbing shared by ``pretrain/`` and ``finetune/``: parse, validate, (self-)launch, run.

Under ``torchrun`` the script runs directly. Started with plain ``python ... --nproc-per-node N``, it first
validates the configuration in one process (so bad input is one error line, before any worker starts),
then runs ``torch.distributed.run`` in this process, which starts the workers and passes SIGTERM/SIGUSR1
on to them (see :func:`run_torchrun`).
"""

from __future__ import annotations

import os
import signal
import sys
from typing import Callable, List, Optional

from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

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
            trainer.resolve_and_validate(cfg, args.nproc_per_node)
            os.environ.setdefault("OMP_NUM_THREADS", "1")
            try:
                run_torchrun([f"--nproc-per-node={args.nproc_per_node}", script, *_strip_nproc(argv)])
            except ChildFailedError as e:
                if e.get_first_failure()[1].exitcode == 2:  # the worker printed its one error line (below)
                    sys.exit(2)
                raise
            return 0
        trainer.run(cfg)
    except (ConfigError, CheckpointError) as e:
        if rank0:
            fail(f"{prog}: error: {e}")
        sys.exit(2)
    return 0


#: the signals a worker answers by finishing its step, saving and exiting 0 (Slurm preemption)
SAVE_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


def run_torchrun(torchrun_args: List[str]) -> None:
    """``torchrun --standalone ARGS`` in this process, passing SIGTERM and SIGUSR1 on to the workers.

    torchrun alone does not do that: SIGUSR1 kills it and leaves the workers running as orphans, and
    SIGTERM makes it signal the workers, SIGKILL any still saving after 30 s, and exit 1. Here torchrun
    keeps SIGINT/SIGHUP/SIGQUIT (Ctrl-C still stops everything at once); SIGTERM and SIGUSR1 go to each
    worker, which finishes its step, saves and exits 0, and torchrun then exits 0 like after any
    successful run. Raises torchrun's ChildFailedError when a worker fails."""
    from torch.distributed import run as torchrun

    def forward(signum, frame):
        for pid in _child_pids():
            try:
                os.kill(pid, signum)
            except ProcessLookupError:  # exited in the meantime
                pass

    handled = "SIGTERM,SIGINT,SIGHUP,SIGQUIT"  # torchrun's default, where workers cannot be found (no /proc)
    if os.path.isdir("/proc"):
        for sig in SAVE_SIGNALS:
            signal.signal(sig, forward)
        handled = "SIGINT,SIGHUP,SIGQUIT"
    torchrun.main(["--standalone", f"--signals-to-handle={handled}", *torchrun_args])


def _child_pids() -> List[int]:
    """Processes whose parent is this one (torchrun's workers), from ``/proc``."""
    me, pids = os.getpid(), []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:  # gone, or not ours to read
            continue
        # "pid (comm) state ppid ...": comm may hold spaces and parentheses, so split after the last ")"
        if int(stat.rsplit(")", 1)[1].split()[1]) == me:
            pids.append(int(entry))
    return pids
