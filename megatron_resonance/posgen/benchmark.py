"""PosGen benchmark runs: the cells of a preset, one after another or in concurrent worker processes.

``tools/posgen_benchmark.py`` is the command line. A run is every (task, seed, trained kind) cell of its
preset (``posgen.presets``); each cell trains and tests one model (``posgen.cell``) and is stored as one
JSON record under ``<out>/cells/``, so a rerun of the same command runs only what is missing; the
report (``posgen.report``) is rewritten from the stored cells after each one. ``<out>/benchmark.json``
records the preset's settings: a directory holding cells of other settings is refused.

Two ways to run the cells: :func:`run` one at a time, data-parallel over the ranks of a torchrun job;
:func:`run_workers` side by side in N single-rank processes (sharing the CPU cores, or one GPU).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from typing import Optional, Sequence

import torch
import torch.distributed as dist

from megatron_resonance import atomic, environment
from megatron_resonance.errors import ConfigError, TrainingError
from megatron_resonance.megatron import distributed
from megatron_resonance.megatron.distributed import is_rank0, print_rank0
from megatron_resonance.posgen.cell import load_splits, run_cell
from megatron_resonance.posgen.presets import TRAINED_KINDS, Preset
from megatron_resonance.posgen.report import cell_path, write_report

CONFIG_FILE = "benchmark.json"


def check_stored_settings(out: str, preset: Preset) -> None:
    """Refuse a directory whose stored cells came from other settings (read-only; any rank)."""
    path = os.path.join(out, CONFIG_FILE)
    if os.path.isfile(path):
        with open(path) as f:
            stored = json.load(f)
        if stored.get("fingerprint") != json.loads(json.dumps(preset.fingerprint())):
            raise ConfigError(
                f"{out} holds a benchmark run with other settings (preset {stored.get('preset')!r}); use another --out"
            )


def cell_name(cell) -> str:
    """``task:seed:kind``, as ``--cells`` spells a cell."""
    return ":".join(map(str, cell))


def parse_cell(name: str, preset: Preset) -> tuple:
    """The cell a :func:`cell_name` string names; ConfigError if it is not one of the preset's."""
    try:
        task, seed, kind = name.split(":")
        cell = (task, int(seed), kind)
    except ValueError:
        cell = None
    if cell not in preset.cells():
        raise ConfigError(f"{name!r} is not a cell of this run (task:seed:kind, e.g. {cell_name(preset.cells()[0])})")
    return cell


def prepare_output(out: str, preset: Preset) -> list:
    """Check ``out`` against the preset, record the settings there, and return the unfinished cells.
    One process calls it (rank 0 of a torchrun job, or the parent of the workers)."""
    check_stored_settings(out, preset)
    atomic.write_json(os.path.join(out, CONFIG_FILE), {"preset": preset.name, "fingerprint": preset.fingerprint()})
    return [c for c in preset.cells() if not os.path.isfile(cell_path(out, *c))]


def _header(preset: Preset, out: str, todo: list, how: str) -> str:
    done = len(preset.cells()) - len(todo)
    return (
        f"[posgen] preset {preset.name}: {len(preset.tasks)} task(s) x {preset.seeds} seed(s) x "
        f"{len(TRAINED_KINDS)} trainings = {len(preset.cells())} cells, {done} already done | "
        f"{preset.train_iters()} steps each | {how} | output {out}"
    )


def run(
    preset: Preset, out: str, save_weights: bool = False, cells: Optional[Sequence] = None, worker: Optional[str] = None
) -> Optional[dict]:
    """Run the unfinished cells of ``preset`` (torchrun: data-parallel), then write the report and return
    it (on every rank).

    ``cells``/``worker``: this process is worker ``worker`` (``k/N``) of :func:`run_workers` and runs
    the given cells only; the parent writes the report, so a worker returns None.
    """
    check_stored_settings(out, preset)
    distributed.initialize(seed=0)
    if worker is None:
        todo = prepare_output(out, preset) if is_rank0() else None
        holder = [todo]
        dist.broadcast_object_list(holder, src=0)
        todo = holder[0]
        print_rank0(_header(preset, out, todo, f"world size {dist.get_world_size()}"))
    else:
        todo = [c for c in cells if not os.path.isfile(cell_path(out, *c))]
    wall = time.time()
    tag = "posgen" if worker is None else f"posgen w{worker}"
    for i, (task, seed, kind) in enumerate(todo, start=1):
        prefix = f"[{tag} {i}/{len(todo)}] {task} seed {seed} {kind}:"
        data = load_splits(preset, task, seed)
        weights = cell_path(out, task, seed, kind)[: -len(".json")] + ".pt" if save_weights else None
        record = run_cell(preset, task, seed, kind, data, prefix, weights)
        if is_rank0():
            atomic.write_json(cell_path(out, task, seed, kind), record)
            if worker is None:
                write_report(out, preset)
        dist.barrier()
        print_rank0(f"{prefix} done in {record['train']['seconds'] + record['test_seconds']:.0f} s")
    if worker is not None:
        return None
    if is_rank0():
        run_info = {
            "wall_seconds": time.time() - wall,
            "cells_run": len(todo),
            "processes": dist.get_world_size(),
            "threads_per_process": torch.get_num_threads(),
            "how": f"world size {dist.get_world_size()}",
        }
        write_report(out, preset, run_info if todo else None)
    dist.barrier()
    print_rank0(f"[posgen] {len(todo)} cell(s) run in {time.time() - wall:.0f} s; report in {out}/report.md")
    with open(os.path.join(out, "report.json")) as f:
        return json.load(f)


def run_workers(preset: Preset, out: str, workers: int, worker_argv) -> dict:
    """Run the unfinished cells in ``workers`` concurrent single-rank processes, then write the report.

    ``worker_argv(k, cells)`` is the command line of worker k (it calls :func:`run` with ``cells`` and
    ``worker``). Cells are dealt round-robin (they cost the same); each worker gets
    :func:`environment.threads_per_process` CPU threads, and on a GPU machine all of them share the one device. A worker
    that fails leaves the others running to the end; the finished cells are kept, so a rerun of the same
    command runs only what is missing. Raises TrainingError naming the failed workers.
    """
    todo = prepare_output(out, preset)
    threads, _ = environment.threads_per_process(workers)
    shares = [todo[k::workers] for k in range(workers)]
    shares = [share for share in shares if share]
    print(_header(preset, out, todo, f"{len(shares)} worker process(es) x {threads} thread(s)"), flush=True)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    wall = time.time()
    procs = []

    def stop(signum, frame):
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        procs = [
            subprocess.Popen(worker_argv(f"{k + 1}/{len(shares)}", share), env=env) for k, share in enumerate(shares)
        ]
        codes = [p.wait() for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.terminate()
                p.wait()
        signal.signal(signal.SIGTERM, previous)
    wall = time.time() - wall
    run_info = {
        "wall_seconds": wall,
        "cells_run": len(todo),
        "processes": len(shares),
        "threads_per_process": threads,
        "how": f"{len(shares)} worker processes",
    }
    report = write_report(out, preset, run_info if todo else None)
    failed = [f"worker {k + 1} (exit {c})" for k, c in enumerate(codes) if c]
    if failed:
        missing = [cell_name(c) for c in todo if not os.path.isfile(cell_path(out, *c))]
        raise TrainingError(
            f"{', '.join(failed)} failed; {len(missing)} cell(s) not run: {' '.join(missing)}; "
            "rerun the same command to run them"
        )
    print(
        f"[posgen] {len(todo)} cell(s) run in {wall:.0f} s by {len(shares)} worker(s); report in {out}/report.md",
        flush=True,
    )
    return report
