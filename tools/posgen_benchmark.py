"""PosGen benchmark: train the Megatron LLaMA at length 64 with rope / resonance, test at 256 (4 variants).

    python tools/posgen_benchmark.py --preset small --workers 2 --out runs/posgen_small
    python tools/posgen_benchmark.py --preset small --protocol reference --workers 2 --out runs/posgen_small_reference
    python tools/posgen_benchmark.py --preset paper --workers 12 --out runs/posgen_paper      # one GPU
    torchrun --nproc-per-node 8 tools/posgen_benchmark.py --preset paper --out runs/posgen_paper
    python tools/posgen_benchmark.py --preset smoke --out /tmp/posgen_smoke --tasks recursive --seeds 1
    python tools/posgen_benchmark.py --preset paper --tasks recursive --seeds 1 --epochs 0.1 \
        --set test_sequences=20 validation_sequences=20 --out /tmp/posgen_plumbing   # any preset field

``--protocol reference`` follows the paper's reference code where it differs from the clean default (its
data rows, its test-time YaRN, its metric; ``megatron_resonance/posgen/presets.py``'s ``PROTOCOLS``).
``--workers N`` runs the cells as N concurrent single-rank processes (sharing the CPU cores, or the one
GPU); torchrun instead runs one cell at a time data-parallel over its ranks.

Writes ``OUT/report.json``, ``OUT/report.md`` and ``OUT/position_<task>.png``; every finished training
(task x seed x trained kind, with its two test variants) is stored under ``OUT/cells/`` and skipped by a
rerun with the same settings. Bad input is one error line and exit status 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

from megatron_resonance.cli import ArgumentParser, guard, quiet_library_warnings
from megatron_resonance.errors import ConfigError, UserError
from megatron_resonance.megatron import distributed
from megatron_resonance.posgen.presets import PRESETS, PROTOCOLS, with_settings
from megatron_resonance.posgen.tasks import TASKS

# posgen.benchmark (torch, sentencepiece) is imported after the arguments are parsed: --help runs without it.

PROG = "posgen_benchmark.py"

quiet_library_warnings()


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    p.add_argument(
        "--preset",
        required=True,
        choices=tuple(PRESETS),
        help="paper (GPU), small (CPU hour), demo (make demo), smoke (tests)",
    )
    p.add_argument("--out", required=True, metavar="DIR", help="output directory (created; reruns resume)")
    p.add_argument(
        "--protocol",
        choices=tuple(PROTOCOLS),
        default="clean",
        help="clean (disjoint prefixes, Hugging Face YaRN; default) or reference (the paper's reference "
        "code's data rows, test-time YaRN and metric)",
    )
    p.add_argument(
        "--tasks",
        nargs="+",
        choices=TASKS,
        metavar="TASK",
        help=f"subtasks to run (default: the preset's; choices: {', '.join(TASKS)})",
    )
    p.add_argument("--seeds", type=int, metavar="N", help="run seeds 0..N-1 (default: the preset's)")
    p.add_argument("--epochs", type=float, metavar="E", help="passes over the training set (default: the preset's)")
    p.add_argument("--bf16", action="store_true", help="train in bf16 with fp32 main weights (default: fp32)")
    p.add_argument(
        "--set",
        nargs="+",
        default=[],
        metavar="FIELD=VALUE",
        help="override other preset fields, e.g. test_sequences=100 lr=1e-3 (megatron_resonance/posgen/"
        "presets.py lists them)",
    )
    p.add_argument(
        "--workers",
        type=int,
        default=1,
        metavar="N",
        help="run the cells in N concurrent processes, each with cores/N threads (default 1)",
    )
    p.add_argument("--save-weights", action="store_true", help="also store each trained model under OUT/cells/")
    p.add_argument("--cells", nargs="+", metavar="TASK:SEED:KIND", help=argparse.SUPPRESS)
    p.add_argument("--worker", metavar="K/N", help=argparse.SUPPRESS)
    return p


def worker_argv(argv, worker: str, cells) -> list:
    """A worker's command line: this command's own arguments, less --workers, plus its share of cells."""
    from megatron_resonance.posgen.benchmark import cell_name

    own, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--workers":
            skip = True
        elif not arg.startswith("--workers="):
            own.append(arg)
    return [sys.executable, os.path.abspath(__file__), *own, "--worker", worker, "--cells", *map(cell_name, cells)]


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from megatron_resonance.posgen.benchmark import parse_cell, run, run_workers

    with guard(PROG):
        preset = PRESETS[args.preset]
        settings = {}
        for item in args.set:
            name, sep, value = item.partition("=")
            if not sep or not name:
                raise UserError(f"--set {item!r}: expected FIELD=VALUE")
            settings[name] = value
        try:  # the preset's own checks raise ValueError
            preset = with_settings(preset, settings)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        try:
            preset = dataclasses.replace(preset, protocol=args.protocol)
        except ValueError as e:
            raise ConfigError(f"--protocol {args.protocol}: {e}") from None
        if args.tasks:
            preset = dataclasses.replace(preset, tasks=tuple(dict.fromkeys(args.tasks)))
        if args.seeds is not None:
            if args.seeds < 1:
                raise UserError(f"--seeds must be >= 1, got {args.seeds}")
            preset = dataclasses.replace(preset, seeds=args.seeds)
        if args.epochs is not None:
            if not args.epochs > 0:
                raise UserError(f"--epochs must be positive, got {args.epochs:g}")
            preset = dataclasses.replace(preset, epochs=args.epochs)
        if args.bf16:
            preset = dataclasses.replace(preset, bf16=True)
        if args.workers < 1:
            raise UserError(f"--workers must be >= 1, got {args.workers}")
        if os.path.exists(args.out) and not os.path.isdir(args.out):
            raise UserError(f"--out {args.out!r} exists and is not a directory")
        world = distributed.world_size_from_env()
        if world > 1 and args.workers > 1:
            raise UserError("--workers runs its own processes; start it with python, not torchrun")
        if preset.global_batch_size % world:
            raise UserError(f"global batch {preset.global_batch_size} is not divisible by {world} ranks")
        os.makedirs(args.out, exist_ok=True)
        cells = [parse_cell(c, preset) for c in args.cells] if args.cells else None
        if args.workers > 1:
            run_workers(
                preset,
                args.out,
                args.workers,
                lambda k, share: worker_argv(sys.argv[1:] if argv is None else argv, k, share),
            )
        else:
            run(
                preset,
                args.out,
                save_weights=args.save_weights,
                cells=cells,
                worker=args.worker or ("1/1" if cells else None),
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
