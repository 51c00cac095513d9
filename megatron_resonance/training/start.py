"""Where a run starts, decided once per process (:func:`decide_start`): resume from its own ``--save`` (a
requeued job), load ``--load`` in full (weights, optimizer, scheduler, step), load ``--load``'s weights only
(``--finetune``), or start from scratch. Validation (the vocabulary, the model's shapes) and the build both
take the same :class:`Start`, so each checkpoint is verified once.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Optional

from megatron_resonance.errors import CheckpointError, ConfigError
from megatron_resonance.megatron import checkpoint_layout
from megatron_resonance.training.config import Config

#: what ``Start.how`` says
RESUME, LOAD, WEIGHTS, SCRATCH = "resume", "load", "weights", "scratch"


@dataclasses.dataclass(frozen=True)
class Start:
    """The checkpoint a run starts from (an ``iter_*`` directory, verified; None from scratch), how it is
    loaded (:data:`RESUME` its own ``--save``, :data:`LOAD` ``--load`` in full, :data:`WEIGHTS` ``--load``'s
    weights only, :data:`SCRATCH`), and the one-line warning of a resume that skipped a damaged checkpoint."""

    checkpoint: Optional[str]
    how: str
    warning: Optional[str] = None

    @property
    def full_state(self) -> bool:
        """Weights, optimizer, scheduler and the step all come from the checkpoint."""
        return self.how in (RESUME, LOAD)


def decide_start(cfg: Config) -> Start:
    """The run's :class:`Start`: its own ``--save`` when that holds checkpoints (:func:`resume_checkpoint`;
    CheckpointError when none is complete), else ``--load`` when it holds one (verified: ConfigError with one
    line when damaged), else scratch. A ``--load`` without a checkpoint is ``validate``'s one-line error."""
    resume, warning = resume_checkpoint(cfg)
    if resume:
        return Start(resume, RESUME, warning)
    c = cfg.checkpoint
    if c.load and has_checkpoint(c.load):
        return Start(load_source(cfg), WEIGHTS if c.finetune else LOAD)
    return Start(None, SCRATCH)


def resume_checkpoint(cfg: Config) -> tuple:
    """``(checkpoint, warning)``: the ``iter_*`` directory a run continues from when its own ``--save`` holds
    checkpoints (a requeued job), or ``(None, None)``. The checkpoint the tracker names when it is complete
    (:func:`checkpoint_layout.verify_checkpoint`), else the newest complete one, with a one-line warning;
    CheckpointError when none is (:func:`checkpoint_layout.newest_usable_checkpoint`): a run never starts over
    on top of checkpoints."""
    save = cfg.checkpoint.save
    if not save or not os.path.isdir(save):
        return None, None
    return checkpoint_layout.newest_usable_checkpoint(save)


def has_checkpoint(path: str) -> bool:
    try:
        checkpoint_layout.resolve_checkpoint(path)
        return True
    except CheckpointError:
        return False


def load_source(cfg: Config) -> str:
    """The ``--load`` checkpoint directory, verified: ConfigError with one line when it is damaged (no
    fallback: the user named it)."""
    try:
        ckpt = checkpoint_layout.resolve_checkpoint(cfg.checkpoint.load)
        checkpoint_layout.verify_checkpoint(ckpt)
    except CheckpointError as e:
        raise ConfigError(f"--load {cfg.checkpoint.load}: {e}") from None
    return ckpt
