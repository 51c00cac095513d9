"""PosGen training speed: optimizer steps per second of the benchmark's own step at a preset's shape.

    python benchmarks/posgen_speed.py --preset small --processes 1 2 --steps 60
    python benchmarks/posgen_speed.py --preset paper --processes 1 --steps 5

For each entry of ``--processes K``, K copies of the step run at once (as ``posgen_benchmark.py --workers K``
runs its cells), each with cores/K threads; the result is the steps/s of one copy and of all K together.
Prints one JSON object; ``--out FILE`` also writes it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from megatron_resonance.cli import ArgumentParser  # noqa: E402


def one_copy(preset_name: str, steps: int, warmup: int) -> dict:
    """Time ``steps`` training steps (after ``warmup``) of the recursive task, rope, seed 0, in this process."""
    import torch

    from megatron_resonance.megatron import distributed
    from megatron_resonance.posgen import cell
    from megatron_resonance.posgen.presets import PRESETS

    distributed.initialize(seed=0)
    preset = PRESETS[preset_name]
    training = cell.build_training(preset, "rope", 0)
    train = cell.load_splits(preset, "recursive", 0)["train"]
    order = cell.sample_order(preset.train_sequences, (steps + warmup) * preset.global_batch_size, 0)
    batches = cell.train_micro_batches(train, order, preset.global_batch_size, training.micro_batch_size)
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    for _ in range(warmup):
        training.step(batches)
    sync()
    start = time.perf_counter()
    for _ in range(steps):
        training.step(batches)
    sync()
    seconds = time.perf_counter() - start
    return {"steps": steps, "seconds": seconds, "steps_per_s": steps / seconds, "threads": torch.get_num_threads()}


def concurrent(preset_name: str, processes: int, steps: int, warmup: int) -> dict:
    threads = max(1, (os.cpu_count() or 1) // processes)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONWARNINGS="ignore")
    cmd = [sys.executable, __file__, "--preset", preset_name, "--steps", str(steps), "--warmup", str(warmup), "--copy"]
    procs = [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, text=True) for _ in range(processes)]
    copies = []
    for p in procs:
        out, _ = p.communicate()
        if p.returncode:
            raise SystemExit(f"posgen_speed.py: error: a copy exited with {p.returncode}")
        copies.append(json.loads(out.strip().splitlines()[-1]))
    return {
        "processes": processes,
        "threads_per_process": threads,
        "steps_per_s_per_process": sum(c["steps_per_s"] for c in copies) / processes,
        "steps_per_s_total": sum(c["steps_per_s"] for c in copies),
    }


def main(argv=None) -> int:
    p = ArgumentParser(prog="posgen_speed.py", description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="small", help="PosGen preset whose shape is timed (default small)")
    p.add_argument("--processes", type=int, nargs="+", default=[1, 2], metavar="K", help="concurrent copies")
    p.add_argument("--steps", type=int, default=60, help="timed steps per copy")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first")
    p.add_argument("--out", help="also write the JSON here")
    p.add_argument("--copy", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.copy:
        print(json.dumps(one_copy(args.preset, args.steps, args.warmup)), flush=True)
        return 0
    from megatron_resonance.posgen.presets import PRESETS

    if args.preset not in PRESETS:
        p.error(f"unknown preset {args.preset!r} (choices: {', '.join(PRESETS)})")
    if any(k < 1 for k in args.processes) or args.steps < 1:
        p.error("--processes and --steps must be positive")
    preset = PRESETS[args.preset]
    result = {
        "preset": args.preset,
        "shape": f"{preset.num_layers} layers, d {preset.hidden_size}, batch {preset.global_batch_size} x "
        f"{preset.train_length}",
        "cpu_count": os.cpu_count(),
        "runs": [concurrent(args.preset, k, args.steps, args.warmup) for k in args.processes],
    }
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
