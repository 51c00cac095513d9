"""Entry-point plumbing shared by ``pretrain/`` and ``finetune/``: parse, validate, (self-)launch, run.

Under ``torchrun`` the script runs directly. Started with plain ``python ... --nproc-per-node N``, it first
validates the configuration in one process (so bad input is one error line, before any worker starts),
then runs ``torch.distributed.run`` in this process, which starts the workers and passes SIGTERM/SIGUSR1
on to them (see :func:`run_torchrun`).

An error a worker reports (a configuration only the workers can check, a held ``--save``, a non-finite
loss) is one line ``<prog>: error: ...``, the last thing printed: this launcher prints it after torchrun's
log line; under plain ``torchrun`` the worker also writes it to torchrun's error file, so it is the
``traceback`` of torchrun's failure report instead of a pointer to the docs.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import tempfile
from typing import Callable, Dict, List, Optional

from torch.distributed import run as torchrun
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

from megatron_resonance import environment
from megatron_resonance.cli import LAUNCHER_ENV, ArgumentParser, fail, guard, report
from megatron_resonance.errors import ConfigError
from megatron_resonance.megatron import distributed
from megatron_resonance.training import preemption
from megatron_resonance.training.config import Config, add_config_arguments

# the trainer (and through it sentencepiece and megatron.core) is imported by the process that trains:
# the launcher parses arguments and starts ranks without it.


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
    from megatron_resonance.training import trainer, validation

    with guard(prog):
        try:
            cfg = make_config(args)
        except (ValueError, TypeError) as e:  # a field the config dataclasses reject
            raise ConfigError(str(e)) from None
        if args.nproc_per_node and not _under_launcher():
            validation.resolve_and_validate(cfg, args.nproc_per_node)
            if preemption.received() is not None:
                print("[signal] received before the workers started: nothing to save, exiting", flush=True)
                return 0
            threads, why = environment.threads_per_process(args.nproc_per_node)
            os.environ["OMP_NUM_THREADS"] = str(threads)  # else torchrun sets 1 for several workers
            print(f"[launch] {environment.threads_line(threads, why)}", flush=True)
            c = cfg.checkpoint
            return run_torchrun(
                [f"--nproc-per-node={args.nproc_per_node}", script, *_strip_nproc(argv)], prog,
                signal_deadline=c.signal_save_timeout if c.exit_on_signal else None,
                latest_note=lambda: trainer.latest_note(c.save),
            )  # fmt: skip
        finished = []
        if cfg.checkpoint.exit_on_signal:
            preemption.arm_deadline(
                cfg.checkpoint.signal_save_timeout, lambda signum: _give_up(prog, signum, cfg, finished)
            )
        trainer.run(cfg)
        finished.append(True)
        distributed.shutdown()
    return 0


def gave_up_line(prog: str, signum: int, seconds: float, who: str, note: str) -> str:
    return (
        f"{prog}: error: the save at {signal.Signals(signum).name} did not finish within {seconds:g} s "
        f"(--signal-save-timeout): {who}; gave up without saving, {note}"
    )


def _give_up(prog: str, signum: int, cfg: Config, finished: list) -> int:
    """A worker's deadline after a signal (:func:`preemption.arm_deadline`): report and return exit status 1,
    or 0 when the run had already ended (its save is done; only the shutdown is slow)."""
    if finished:
        return 0
    from megatron_resonance.training import trainer

    c = cfg.checkpoint
    who = "another rank did not answer (hung, stopped or gone), or the work in flight took longer"
    try:
        report(gave_up_line(prog, signum, c.signal_save_timeout, who, trainer.latest_note(c.save)), 1)
    except SystemExit:
        pass
    return 1


def run_torchrun(
    torchrun_args: List[str],
    prog: str = "torchrun",
    signal_deadline: Optional[float] = None,
    latest_note: Callable[[], str] = lambda: "",
) -> int:
    """``torchrun --standalone ARGS`` in this process, passing SIGTERM and SIGUSR1 on to the workers; returns
    torchrun's exit status (0), or prints the failing worker's error line and exits 1 (or its status).

    torchrun alone does not pass them on: SIGUSR1 kills it and leaves the workers running as orphans, and
    SIGTERM makes it signal the workers, SIGKILL any still saving after 30 s, and exit 1. Here torchrun
    keeps SIGINT/SIGHUP/SIGQUIT (Ctrl-C still stops everything at once); SIGTERM and SIGUSR1 go to each
    worker (:func:`preemption.forward_to_children`: also one that is still starting), which finishes its
    step, saves and exits 0, and torchrun then exits 0 like after any successful run.

    ``signal_deadline`` (the workers' ``--signal-save-timeout``): workers still alive that long (and
    ``preemption.KILL_GRACE``) after a signal are killed (a hung or stopped rank), and the line names them
    with ``latest_note()``, the checkpoint that stays ``latest``; exit 1."""
    handled = "SIGTERM,SIGINT,SIGHUP,SIGQUIT"  # torchrun's default, where workers cannot be found (no /proc)
    blocked = contextlib.nullcontext()
    killed: Dict[int, str] = {}
    if os.path.isdir("/proc"):
        preemption.install()
        preemption.forward_to_children(deadline=signal_deadline, killed=killed)
        handled, blocked = "SIGINT,SIGHUP,SIGQUIT", preemption.block_for_children()
    os.environ[LAUNCHER_ENV] = "1"
    # torchrun copies the failed worker's error file to its own (and complains in the log without one)
    error_dir = tempfile.TemporaryDirectory(prefix="torchrun-errors-")
    os.environ.setdefault("TORCHELASTIC_ERROR_FILE", os.path.join(error_dir.name, "error.json"))
    try:
        with blocked:
            torchrun.main(["--standalone", f"--signals-to-handle={handled}", *torchrun_args])
    except ChildFailedError as e:
        # In order: a worker killed by a signal before it or another said anything (the others then fail
        # talking to it; one killed later is torchrun's shutdown of a worker that did not stop);
        # the lowest rank that left a line (rank 0 names the problem; others may only know it exists), even
        # one that torchrun's SIGTERM to the survivors caught on its way out; a worker that SIGTERM caught
        # earlier; the first to fail.
        if killed:
            were = "were" if len(killed) > 1 else "was"
            who = f"{', '.join(sorted(killed.values()))} did not answer and {were} killed"
            fail(gave_up_line(prog, preemption.received(), signal_deadline, who, latest_note()), 1)
        failures = e.failures
        told = sorted(r for r, f in failures.items() if isinstance(f.message, dict))
        silent = [r for r, f in failures.items() if f.exitcode < 0 and r not in told]
        first_told = min((failures[r].timestamp for r in told), default=None)
        killed = sorted(
            (
                r
                for r in silent
                if failures[r].exitcode != -signal.SIGTERM  # not torchrun's kill
                and (first_told is None or failures[r].timestamp <= first_told)
            ),  # after a failure
            key=lambda r: failures[r].timestamp,
        )
        stopped = sorted(r for r in silent if failures[r].exitcode == -signal.SIGTERM)
        chosen = (killed or told or stopped or [None])[0]
        rank, failure = (chosen, failures[chosen]) if chosen is not None else e.get_first_failure()
        message = failure.message
        status = failure.exitcode if 0 < failure.exitcode < 128 else 1
        if isinstance(message, dict) and isinstance(message.get("message"), str):
            line = message["message"]
            status = (message.get("extraInfo") or {}).get("exit_status", status)
        elif failure.exitcode < 0:
            line = f"{prog}: error: worker rank {rank} was killed by {signal.Signals(-failure.exitcode).name}"
        else:
            line = f"{prog}: error: worker rank {rank} exited with status {failure.exitcode} (its output is above)"
        fail(line, status)
    finally:
        os.environ.pop(LAUNCHER_ENV, None)
        if os.environ.get("TORCHELASTIC_ERROR_FILE", "").startswith(error_dir.name):
            del os.environ["TORCHELASTIC_ERROR_FILE"]
        error_dir.cleanup()
    return 0
