"""What a run logs: the windowed training loss (:class:`LossWindow`, also PosGen's), the ``[train]`` console
line and its record (:func:`train_log`), and ``<save>/metrics.jsonl`` with TensorBoard (:class:`MetricsLog`).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from typing import Any, Dict, Optional, Tuple

import torch
import torch.distributed as dist

from megatron_resonance import atomic
from megatron_resonance.megatron import distributed
from megatron_resonance.training.config import Config

# torch.utils.tensorboard (tensorboard, a quarter second to import) is imported where the writer opens,
# on rank 0 only.

METRICS_FILE = "metrics.jsonl"


class LossWindow:
    """The steps since the last log line: their summed loss and time, and how many."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.loss, self.steps, self.seconds = 0.0, 0, 0.0

    def add(self, loss: float, seconds: float = 0.0) -> None:
        self.loss += loss
        self.steps += 1
        self.seconds += seconds

    def mean_loss(self) -> float:
        return self.loss / self.steps


def train_log(
    cfg: Config,
    iteration: int,
    window: LossWindow,
    lr: float,
    grad_norm,
    consumed_samples: int,
    update_ok: bool,
    flops_per_token: float,
    peak: Optional[float],
) -> Tuple[Dict[str, Any], str]:
    """The record for ``metrics.jsonl`` and the ``[train]`` console line of the steps in ``window``."""
    gbs, iters = cfg.data.global_batch_size, cfg.training.train_iters
    tokens_per_s = window.steps * gbs * cfg.data.seq_length / window.seconds
    record = {
        "iteration": iteration,
        "loss": window.mean_loss(),
        "lr": lr,
        "grad_norm": float(grad_norm) if grad_norm is not None else None,
        "tokens_per_s": tokens_per_s,
        "consumed_samples": consumed_samples,
    }
    line = (
        f"[train] iter {iteration:>6}/{iters} | loss {record['loss']:.4f} | lr {record['lr']:.3e} | "
        f"grad norm {record['grad_norm'] or 0:.3f} | tokens/s {tokens_per_s:,.0f}"
    )
    if torch.cuda.is_available():
        tflops = tokens_per_s * flops_per_token / dist.get_world_size() / 1e12
        record["tflops_per_gpu"] = tflops
        line += f" | TFLOP/s/GPU {tflops:.1f}"
        if peak:
            record["mfu"] = tflops / peak
            line += f" | MFU {100 * tflops / peak:.1f}%"
    if not update_ok:
        line += " | skipped (non-finite grads)"
    return record, line


class MetricsLog:
    """``<save>/metrics.jsonl`` (one object per logged iteration) and TensorBoard, on rank 0 only."""

    def __init__(self, cfg: Config, resumed_iteration: int):
        self.path = None
        self.tb = None
        self.write_failed = False
        if not distributed.is_rank0() or not cfg.checkpoint.save:
            return
        os.makedirs(cfg.checkpoint.save, exist_ok=True)
        self.path = os.path.join(cfg.checkpoint.save, METRICS_FILE)
        self._truncate_after(resumed_iteration)
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(cfg.logging.tensorboard_dir or os.path.join(cfg.checkpoint.save, "tensorboard"))
        except ImportError:  # tensorboard is a dependency; keep training if a site removed it
            self.tb = None

    def _truncate_after(self, iteration: int) -> None:
        """Drop lines logged after the checkpoint we resume from (they will be logged again), and lines that
        are not JSON (a record cut by a full disk or a kill), with a warning."""
        if not os.path.isfile(self.path):
            return
        with open(self.path, "rb") as f:
            lines = [line for line in f if line.strip()]
        kept = []
        for number, line in enumerate(lines, 1):
            try:
                record = json.loads(line)
            except ValueError:
                where = "last line" if number == len(lines) else f"line {number}"
                print(f"[metrics] warning: dropped the torn {where} of {self.path}: {line[:60]!r}", flush=True)
                continue
            if record.get("iteration", 0) <= iteration:
                kept.append(line)
        if len(kept) != len(lines):
            with atomic.replacing(self.path, "wb") as f:
                f.writelines(kept)

    def write(self, record: Dict[str, Any]) -> None:
        if self.path:
            self._append(json.dumps(record) + "\n")
        if self.tb:
            for k, v in record.items():
                if k != "iteration" and isinstance(v, (int, float)) and v is not None and math.isfinite(v):
                    self.tb.add_scalar(k, v, record["iteration"])
            self.tb.flush()

    def _append(self, line: str) -> None:
        """One record, whole or not at all: a failed write (full disk) is cut back off, with one warning;
        training goes on (its next save reports the disk)."""
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            start = os.lseek(fd, 0, os.SEEK_END)
            try:
                data = memoryview(line.encode())
                while data:
                    data = data[os.write(fd, data) :]
            except OSError as e:
                with contextlib.suppress(OSError):
                    os.ftruncate(fd, start)
                if not self.write_failed:
                    print(f"[metrics] warning: cannot append to {self.path}: {e.strerror or e}", flush=True)
                self.write_failed = True
        finally:
            os.close(fd)

    def close(self) -> None:
        if self.tb:
            self.tb.close()
