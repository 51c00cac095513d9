"""Saves start no long-lived helper process: megatron-core's checkpoint writer would otherwise keep its results
queue in a multiprocessing manager, which a Slurm step signal (the preemption warning) kills, failing every
later save. The end-to-end case is tests/slurm (two-node preemption after a periodic save)."""

from __future__ import annotations

import multiprocessing
import queue

from megatron.core.dist_checkpointing.strategies import filesystem_async

from megatron_resonance.megatron import checkpointing


def test_write_results_queue_is_in_process(monkeypatch):
    monkeypatch.setattr(filesystem_async, "_results_queue", None)  # as in a process that has not saved yet
    before = set(multiprocessing.active_children())
    checkpointing._in_process_write_results_queue()
    results = filesystem_async._get_write_results_queue()  # what FileSystemWriterAsync takes
    assert isinstance(results, queue.Queue)
    assert set(multiprocessing.active_children()) == before
