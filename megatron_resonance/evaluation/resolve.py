"""The models an evaluation names, resolved: Megatron checkpoints and Hugging Face directories.

:func:`resolve` reads a model's configuration without loading weights (its name, shape, rope plan,
original training length and tokenizer), so every bad input is found before any process talks to
another; ``evaluation.loading`` then loads it.

**Which tokenizer goes with a checkpoint.** ``--tokenizer`` wins (a SentencePiece ``.model``, a Hugging Face
``tokenizer.json``, or a directory with either). Otherwise, for a Megatron checkpoint, the first that exists
of: the Hugging Face files kept by ``tools/convert_hf_to_megatron.py`` (and carried on by training from
it) in ``<root>/hf/`` (``tokenizer.model``, else the directory when it holds ``tokenizer.json``, as a
Llama-3 source does), a ``tokenizer.model`` or ``tokenizer.json`` placed in the ``iter_*`` directory or
the root, and the training run's ``data.tokenizer_model`` recorded in ``megatron_resonance.json`` (as
recorded, else relative to the checkpoint root). For a Hugging Face directory: its ``tokenizer.model``,
else the directory itself when it holds ``tokenizer.json`` (loaded with its ``tokenizer_config.json``).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Dict, List, Optional, Sequence

from megatron_resonance.cli import one_line
from megatron_resonance.data.tokenizer import HF_TOKENIZER_FILE, load_tokenizer
from megatron_resonance.errors import CheckpointError, UserError
from megatron_resonance.evaluation.memory import ModelShape
from megatron_resonance.hf import config as hf_config
from megatron_resonance.megatron import checkpoint_layout
from megatron_resonance.megatron.llama import LlamaConfig

KINDS = ("megatron", "hf")


@dataclasses.dataclass
class ModelSpec:
    """A model as named on the command line: ``--load DIR`` (megatron) or ``--hf DIR``."""

    kind: str
    path: str
    name: Optional[str] = None


@dataclasses.dataclass
class ResolvedModel:
    """A model's configuration, read without loading its weights."""

    spec: ModelSpec
    name: str
    """Report key: ``--name``, else the directory's basename."""
    directory: str
    """Megatron: the ``iter_*`` checkpoint directory; Hugging Face: the model directory."""
    shape: ModelShape
    vocab_size: int
    original_length: Optional[int]
    """The length the model was (pre)trained at: the rope plan's original length."""
    rope: Dict[str, Any]
    """The rope plan (``RopeConfig.to_dict()``), or the Hugging Face rope settings when we cannot carry them."""
    tokenizer: Optional[str]
    """Path of the tokenizer found for it (see the module docstring), or None."""
    llama: Any = None
    """Megatron: the stored ``LlamaConfig``."""

    def describe(self) -> Dict[str, Any]:
        return {
            "kind": self.spec.kind,
            "path": self.spec.path,
            "directory": self.directory,
            "rope": self.rope,
            "original_length": self.original_length,
            "tokenizer": self.tokenizer,
            "vocab_size": self.vocab_size,
        }


def default_name(spec: ModelSpec) -> str:
    path = os.path.normpath(os.path.abspath(spec.path))
    base = os.path.basename(path)
    if spec.kind == "megatron" and base.startswith("iter_"):
        return f"{os.path.basename(os.path.dirname(path))}/{base}"
    return base


def _first_tokenizer(candidates: Sequence[Optional[str]]) -> Optional[str]:
    """The first candidate that is a tokenizer: a file, or a directory holding ``tokenizer.json``."""
    for c in candidates:
        if c and (os.path.isfile(c) or os.path.isfile(os.path.join(c, HF_TOKENIZER_FILE))):
            return c
    return None


def megatron_tokenizer(load: str, checkpoint: str, stored: Dict[str, Any]) -> Optional[str]:
    """The tokenizer stored with a Megatron checkpoint (see the module docstring), or None."""
    root = os.path.dirname(os.path.abspath(checkpoint))
    recorded = ((stored.get("run") or {}).get("data") or {}).get("tokenizer_model")
    candidates = []
    for assets in (os.path.join(root, "hf"), os.path.join(load, "hf")):
        candidates += [os.path.join(assets, "tokenizer.model"), assets]
    for directory in (checkpoint, root):
        candidates += [os.path.join(directory, "tokenizer.model"), os.path.join(directory, HF_TOKENIZER_FILE)]
    if recorded:
        candidates += [recorded, os.path.join(root, recorded)]
    return _first_tokenizer(candidates)


def hf_tokenizer(directory: str) -> Optional[str]:
    return _first_tokenizer([os.path.join(directory, "tokenizer.model"), directory])


def resolve(spec: ModelSpec, tokenizer: Optional[str] = None) -> ResolvedModel:
    """Read ``spec``'s configuration; UserError with one line for a bad path or an unreadable config."""
    if spec.kind not in KINDS:
        raise UserError(f"unknown model kind {spec.kind!r}")
    if not os.path.exists(spec.path):
        flag = "--load" if spec.kind == "megatron" else "--hf"
        raise UserError(f"{flag} {spec.path}: no such file or directory")
    name = spec.name or default_name(spec)
    if tokenizer is not None:
        load_tokenizer(tokenizer, "--tokenizer")  # one line for a path that is no tokenizer, before any model
    if spec.kind == "megatron":
        return _resolve_megatron(spec, name, tokenizer)
    return _resolve_hf(spec, name, tokenizer)


def _resolve_megatron(spec: ModelSpec, name: str, tokenizer: Optional[str]) -> ResolvedModel:
    try:
        ckpt = checkpoint_layout.resolve_checkpoint(spec.path)
    except CheckpointError as e:
        raise UserError(f"--load {spec.path}: {e}") from None
    config_path = os.path.join(ckpt, checkpoint_layout.CONFIG_FILE)
    try:
        with open(config_path) as f:
            stored = json.load(f)
        cfg = LlamaConfig.from_dict(dict(stored["model"]))
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"--load {spec.path}: cannot read the model config {config_path} ({one_line(e)})") from None
    try:
        checkpoint_layout.verify_checkpoint(ckpt)  # a truncated or missing file: one line, before any model is built
    except CheckpointError as e:
        raise UserError(f"--load {spec.path}: {e}") from None
    return ResolvedModel(
        spec=spec,
        name=name,
        directory=ckpt,
        shape=ModelShape.from_llama(cfg),
        vocab_size=cfg.vocab_size,
        original_length=cfg.rope.original_max_position,
        rope=cfg.rope.to_dict(),
        tokenizer=tokenizer or megatron_tokenizer(spec.path, ckpt, stored),
        llama=cfg,
    )


def _resolve_hf(spec: ModelSpec, name: str, tokenizer: Optional[str]) -> ResolvedModel:
    path = os.path.join(spec.path, "config.json")
    try:
        with open(path) as f:
            config = json.load(f)
        shape = ModelShape(**hf_config.model_sizes(config))
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"--hf {spec.path}: cannot read the model config {path} ({one_line(e)})") from None
    try:
        rope_cfg = hf_config.from_hf(config).rope
        rope, original = rope_cfg.to_dict(), rope_cfg.original_max_position
    except Exception:  # noqa: BLE001 - a rope type we cannot carry still runs in transformers
        params = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
        rope = params or {"rope_type": "default", "rope_theta": config.get("rope_theta")}
        original = params.get("original_max_position_embeddings") or config.get("max_position_embeddings")
    return ResolvedModel(
        spec=spec,
        name=name,
        directory=spec.path,
        shape=shape,
        vocab_size=shape.vocab_size,
        original_length=original,
        rope=rope,
        tokenizer=tokenizer or hf_tokenizer(spec.path),
    )


def resolve_all(specs: Sequence[ModelSpec], tokenizer: Optional[str] = None) -> List[ResolvedModel]:
    if not specs:
        raise UserError("no model: give --load MEGATRON_DIR or --hf HF_DIR")
    models = [resolve(s, tokenizer) for s in specs]
    seen = set()
    for m in models:
        if m.name in seen:
            raise UserError(f"two models are named {m.name!r}: pass --name for each model")
        seen.add(m.name)
    return models
