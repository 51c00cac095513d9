"""Everything that can be checked before processes talk to each other: the config's own rules, the data, the
output directories and the checkpoints a run starts from, each with one clear line (a UserError).
:func:`resolve_and_validate` is what every start does, in the launcher and in each worker.
"""

from __future__ import annotations

import os
from typing import Optional

from megatron_resonance.cli import check_output_dir
from megatron_resonance.data.checks import check_training_data
from megatron_resonance.data.tokenizer import load_tokenizer
from megatron_resonance.errors import ConfigError
from megatron_resonance.megatron import checkpoint_layout, save_lock
from megatron_resonance.megatron.distributed import print_rank0
from megatron_resonance.training.config import Config
from megatron_resonance.training.config_checks import check
from megatron_resonance.training.metrics import METRICS_FILE
from megatron_resonance.training.start import RESUME, Start, decide_start, has_checkpoint

#: model fields that fix the shapes of the stored tensors
_SHAPE_FIELDS = (
    "num_layers",
    "hidden_size",
    "ffn_hidden_size",
    "num_attention_heads",
    "num_query_groups",
    "vocab_size",
    "tie_word_embeddings",
)


def resolve_and_validate(cfg: Config, world_size: int) -> Start:
    """Take the vocabulary size from the tokenizer (when given), then ``validate``: what every start does.
    Returns the run's :class:`Start`, decided once."""
    start = _tokenizer_vocab(cfg)
    start = validate(cfg, world_size, start)
    save_lock.check_save_dir_free(cfg.checkpoint.save)
    return start


def validate(cfg: Config, world_size: int, start: Optional[Start] = None) -> Start:
    """Raise a UserError with one clear line for a run that cannot start: the config's own rules
    (``config_checks.check``), then what it names on disk (data, output directories, checkpoints). Returns
    ``start``, or the :class:`Start` decided here when not given."""
    check(cfg, world_size)
    d = cfg.data
    if not d.mock_data:
        _check_dataset(cfg)
    # where the run writes: checked here, before a worker starts or the model is built
    for flag, path in (
        ("--save", cfg.checkpoint.save),
        ("--tensorboard-dir", cfg.logging.tensorboard_dir),
        ("--data-cache-path", d.data_cache_path),
    ):
        if path:
            check_output_dir(path, flag)
    if cfg.checkpoint.save:
        _check_save_contents(cfg)
    if cfg.checkpoint.load and not has_checkpoint(cfg.checkpoint.load):
        raise ConfigError(f"--load {cfg.checkpoint.load}: no checkpoint there")
    # A checkpoint whose tensors do not fit would fail deep inside dist_checkpointing, one traceback per rank.
    if start is None:
        start = decide_start(cfg)
    if start.how == RESUME:  # resume: the run must be the same model
        _check_same_model(f"--save {cfg.checkpoint.save} holds a checkpoint of", start.checkpoint, cfg, None)
    elif start.checkpoint:
        _check_same_model(f"--load {cfg.checkpoint.load} is", start.checkpoint, cfg, _SHAPE_FIELDS)
    return start


def _check_save_contents(cfg: Config) -> None:
    """ConfigError naming the first entry of ``--save`` that the run writes into or replaces (the tracker, the
    lock, the metrics, the default TensorBoard directory) but cannot: another user's files in a shared
    directory, a read-only mount inside it. The directory itself is ``check_output_dir``'s."""
    save = cfg.checkpoint.save
    written = [checkpoint_layout.TRACKER, checkpoint_layout.LOCK_FILE, METRICS_FILE]
    if not cfg.logging.tensorboard_dir:
        written.append("tensorboard")
    for name in written:
        path = os.path.join(save, name)
        if not os.path.lexists(path):
            continue
        mode = os.W_OK | os.X_OK if os.path.isdir(path) else os.W_OK
        if not os.access(path, mode):
            owner = os.stat(path).st_uid
            raise ConfigError(
                f"--save {save}: {path} is not writable by this run (owner uid {owner}, this run uid "
                f"{os.getuid()}; or a read-only mount): fix its permissions, or give another --save"
            )


def _check_dataset(cfg: Config) -> None:
    """The data as megatron will read it (every prefix of a blend): ``.bin``/``.idx`` whole and consistent, no
    split part it builds without tokens (its epoch count would never end), ids within the model's vocabulary
    (``data/checks.py``)."""
    d = cfg.data
    check_training_data(
        d.data_path, d.valid_data_path, split=d.split, with_validation=cfg.training.eval_iters > 0,
        seq_length=d.seq_length, vocab_size=cfg.model.vocab_size, cache_dir=d.data_cache_path,
        fallback_cache_dir=fallback_cache_dir(cfg), log=print_rank0,
    )  # fmt: skip


def _check_same_model(what: str, path: str, cfg: Config, fields: Optional[tuple]) -> None:
    """ConfigError naming the first differences between the stored model and ``cfg.model`` (in ``fields``,
    or all of them with the rope plan)."""
    stored, wanted = checkpoint_layout.read_config(path)["model"], cfg.model.to_dict()
    differ = [k for k in (fields or wanted) if stored.get(k) != wanted[k]]
    if differ:
        shown = ", ".join(f"{k} {stored.get(k)} (this run: {wanted[k]})" for k in differ[:3])
        raise ConfigError(f"{what} another model: {shown}")


def _tokenizer_vocab(cfg: Config) -> Optional[Start]:
    """The model's vocabulary: the tokenizer's, or, for a run that starts from a checkpoint (resume or
    ``--load``), the checkpoint's when the tokenizer fits in it: Hugging Face models often have more embedding
    rows than tokenizer ids (a DeepSeek or Qwen-style source), and those rows are part of the weights.
    Returns the :class:`Start` it decided (None without a tokenizer: ``validate`` decides it)."""
    if not cfg.data.tokenizer_model:
        return None
    tokenizer = load_data_tokenizer(cfg.data.tokenizer_model)
    cfg.model.vocab_size = tokenizer.vocab_size
    start = decide_start(cfg)
    if start.checkpoint is None:
        return start
    stored = checkpoint_layout.read_config(start.checkpoint)["model"].get("vocab_size")
    if stored is not None and stored > tokenizer.vocab_size:
        cfg.model.vocab_size = stored
    return start


def load_data_tokenizer(path: str):
    """The ``--tokenizer-model`` (SentencePiece or Hugging Face), which must have an EOS (the documents' end);
    a UserError with one line otherwise. Loaded once per process (validation, then the datasets)."""
    tokenizer = load_tokenizer(path)
    if tokenizer.eos_id is None:
        raise ConfigError(f"tokenizer {path} has no EOS token (the end-of-document id the datasets cut at)")
    return tokenizer


def fallback_cache_dir(cfg: Config) -> Optional[str]:
    """Where the dataset caches go when the data's directory cannot be written: ``<save>/index-cache``."""
    return cfg.checkpoint.save and os.path.join(cfg.checkpoint.save, "index-cache")
