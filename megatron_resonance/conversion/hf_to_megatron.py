"""Hugging Face LLaMA -> Megatron-Core dist checkpoint (loads at any TP/PP), rope plan included.

Phases: check everything that can be checked without weights (config, architecture, rope type, shards,
every tensor's name and shape, the ``--save`` directory) · build the TP=1 model in the target dtype
without initializing it · stream the Hugging Face tensors through the key map into its parameters, each
checked on the way (no NaN/Inf, nothing the target dtype cannot hold; a mix of dtypes reported) ·
``checkpointing.save_checkpoint`` (iteration 0) into a staging directory · copy tokenizer files and the
source config into ``<save>/hf/`` · swap the staging directory into place.

Peak memory is one copy of the weights: parameters that need no change are the source files'
memory-mapped pages, the others (q/k/v and gate/up fused, a padded vocabulary, another dtype) new tensors.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from typing import Callable, Dict, Iterator, Optional, Sequence

import torch
from tqdm import tqdm

from megatron_resonance.conversion import key_map
from megatron_resonance.conversion.runtime import ConversionReport, build_tp1_model, single_process
from megatron_resonance.conversion.staging import StagedDirectory
from megatron_resonance.errors import ConversionError
from megatron_resonance.hf import assets as hf_assets
from megatron_resonance.hf import config as hf_config
from megatron_resonance.hf.reader import HFCheckpoint
from megatron_resonance.megatron import checkpointing
from megatron_resonance.megatron.llama import LlamaConfig


@contextlib.contextmanager
def _without_zip_crc32() -> Iterator[None]:
    """torch.save (each tensor of a dist checkpoint is one) without the zip CRC-32 of every record: a second
    pass over all the bytes, about half the writer's time on CPU, for checksums that torch.load (and so
    every megatron load) never reads. ``torch.serialization.set_crc32_options``; restored after."""
    previous = torch.serialization.get_crc32_options()
    torch.serialization.set_crc32_options(False)
    try:
        yield
    finally:
        torch.serialization.set_crc32_options(previous)


def check_tensors(hf: HFCheckpoint, cfg: LlamaConfig) -> None:
    """Every tensor the key map needs is present with the shape ``config.json`` implies; nothing is left over."""
    expected = key_map.hf_shapes(cfg)
    present = set(hf.keys())
    missing = [k for k in expected if k not in present]
    if missing:
        raise ConversionError(f"{hf.path}: {len(missing)} tensor(s) missing from the checkpoint, e.g. {missing[0]}")
    ignored = {"lm_head.weight"} if cfg.tie_word_embeddings else set()
    unexpected = sorted(k for k in present - set(expected) - ignored if not k.endswith(key_map.IGNORED_HF_SUFFIXES))
    if unexpected:
        raise ConversionError(
            f"{hf.path}: {len(unexpected)} unexpected tensor(s) for a LLaMA model, e.g. {unexpected[0]}"
        )
    for k, shape in expected.items():
        if hf.shape(k) != shape:
            raise ConversionError(
                f"{hf.path}: shape mismatch for {k}: {list(hf.shape(k))} in the checkpoint, {list(shape)} "
                "expected from config.json"
            )
        if not hf.dtype(k).is_floating_point:
            raise ConversionError(f"{hf.path}: {k} has non-floating dtype {hf.dtype(k)}")


def check_values(hf: HFCheckpoint, keys: Sequence[str], tensors: Sequence[torch.Tensor], target: torch.dtype) -> None:
    """ConversionError naming the first tensor that holds NaN or Inf, a value no trained weight has
    (``checkpointing.MAX_WEIGHT``: every load refuses it), or one ``target`` cannot hold (it would be stored
    as Inf). Without this, such weights import quietly and the first load of the checkpoint (training, the
    export) blames it. One pass over each tensor, in the loop that reads it anyway; counted only on failure."""
    for key, t, peak in zip(keys, tensors, checkpointing.peak_magnitudes(list(tensors))):
        where = f"{hf.file(key)}: tensor {key}"
        if not math.isfinite(peak):
            nan, inf = int(t.isnan().sum()), int(t.isinf().sum())
            kinds = "NaN" if not inf else "Inf" if not nan else f"{nan} NaN, {inf} Inf"
            raise ConversionError(
                f"{where} holds {nan + inf} non-finite value{'s' if nan + inf != 1 else ''} "
                f"({kinds}): refusing to import"
            )
        if peak > checkpointing.MAX_WEIGHT:
            raise ConversionError(
                f"{where} holds a value of magnitude {peak:.3g}, beyond any trained weight "
                "(a corrupted file): refusing to import"
            )
        if torch.tensor(peak).to(target).isinf():
            holders = [n for n, d in hf_config.DTYPES.items() if d != target and torch.tensor(peak).to(d).isfinite()]
            raise ConversionError(
                f"{where} holds a value of magnitude {peak:.3g}, beyond "
                f"{_name(target)}'s range (Inf once converted): refusing to import; "
                f"--dtype {' or '.join(holders)} holds it"
            )


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")  # not hf_config.dtype_name: a source may hold float64


def _and(items: Sequence[str]) -> str:
    return " and ".join([", ".join(items[:-1]), items[-1]] if len(items) > 1 else items)


class DtypeChanges:
    """What storing a checkpoint of several dtypes in one (a Megatron model has one params dtype) changes:
    how many tensors of each other dtype were converted, and the largest absolute change (measured on the
    tensors converted, an extra pass over those alone). Reported as one line; nothing for a single dtype."""

    def __init__(self, hf: HFCheckpoint, keys: Sequence[str], target: torch.dtype, chosen: bool):
        self.source, self.target, self.chosen = hf.path, target, chosen
        self.dtypes = {hf.dtype(k) for k in keys}
        self.converted: Dict[torch.dtype, int] = {}
        self.change, self.where = 0.0, ""

    def add(self, keys: Sequence[str], tensors: Sequence[torch.Tensor]) -> None:
        if len(self.dtypes) < 2:
            return
        for key, t in zip(keys, tensors):
            if t.dtype != self.target:
                self.converted[t.dtype] = self.converted.get(t.dtype, 0) + 1
                change = (t.to(self.target).float() - t.float()).abs().max().item()
                if change > self.change or not self.where:
                    self.change, self.where = change, key

    def line(self) -> Optional[str]:
        if not self.converted:
            return None
        converted = _and(
            [
                f"{n} {_name(d)} tensor{'s' if n != 1 else ''}"
                for d, n in sorted(self.converted.items(), key=lambda item: _name(item[0]))
            ]
        )
        change = f"largest absolute change {self.change:.2g} (in {self.where})" if self.change else "no value changed"
        # float16, bfloat16 and float32 all hold exactly in float32 (float64 would not)
        hint = self.change > 0 and self.dtypes <= set(hf_config.DTYPES.values())
        return (
            f"{self.source}: the weights mix dtypes ({_and(sorted(map(_name, self.dtypes)))}); all "
            f"are stored as {_name(self.target)} ({'--dtype' if self.chosen else 'most of the bytes'}): "
            f"{converted} converted, {change}" + ("; --dtype float32 keeps every value" if hint else "")
        )


def check_source(
    load: str,
    *,
    rope_kind: Optional[str] = None,
    rope_factor: Optional[float] = None,
    dtype: Optional[str] = None,
    log: Callable[[str], None] = print,
) -> tuple:
    """What the conversion checks before it reads a weight or writes anything: ``(reader, LlamaConfig, key
    map, target dtype)``; ConversionError with one line for a source it cannot convert."""
    if rope_factor is not None and rope_kind is None:
        raise ConversionError("--rope-factor needs --rope-kind")
    if dtype is not None and dtype not in hf_config.DTYPES:
        raise ConversionError(f"unknown --dtype {dtype!r}; expected one of {', '.join(hf_config.DTYPES)}")
    hf = HFCheckpoint(load)
    cfg = hf_config.model_config(hf.config, os.path.join(load, "config.json"))
    if rope_kind is not None:
        source_rope = cfg.rope
        cfg = hf_config.extension_plan(cfg, hf.config, rope_kind, 1.0 if rope_factor is None else rope_factor)
        log(
            f"rope plan: {source_rope.kind} (factor {source_rope.factor:g}) -> {cfg.rope.kind} "
            f"(factor {cfg.rope.factor:g}): original length {cfg.rope.original_max_position} -> "
            f"max_position_embeddings {cfg.max_position_embeddings}"
        )
    params = key_map.expand(cfg)
    check_tensors(hf, cfg)
    target = hf_config.DTYPES[dtype] if dtype else hf.floating_dtype()
    if target not in hf_config.DTYPES.values():
        raise ConversionError(f"{load}: weights are {target}; pass --dtype float32, bfloat16 or float16")
    return hf, cfg, params, target


def convert_hf_to_megatron(
    load: str,
    save: str,
    *,
    rope_kind: Optional[str] = None,
    rope_factor: Optional[float] = None,
    dtype: Optional[str] = None,
    overwrite: bool = False,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> ConversionReport:
    """Convert the Hugging Face LLaMA in ``load`` into a Megatron checkpoint root ``save``.

    ``rope_kind``/``rope_factor`` record a context-extension plan: original length = the source's
    ``original_max_position_embeddings`` (else ``max_position_embeddings``), target = original x factor,
    which becomes the stored ``max_position_embeddings``. ``dtype`` (float32, bfloat16, float16) defaults
    to the checkpoint's own (that of most of its bytes, if it mixes dtypes: ``log`` says what changed).
    Weights with NaN/Inf, or values the dtype cannot hold, are refused."""
    start = time.perf_counter()
    hf, cfg, params, target = check_source(load, rope_kind=rope_kind, rope_factor=rope_factor, dtype=dtype, log=log)
    staged = StagedDirectory(save, overwrite, inputs=[load])

    # ---------------------------------------------------------------- convert
    try:
        total = sum(hf.nbytes(k) for p in params for k in p.hf)
        with single_process():
            model = build_tp1_model(cfg, target)
            state = dict(model.named_parameters())
            setup = time.perf_counter() - start
            drift = set(state) ^ {p.megatron for p in params}
            if drift:
                raise RuntimeError(f"key map out of date with megatron's GPTModel: {sorted(drift)}")

            changes = DtypeChanges(hf, [k for p in params for k in p.hf], target, chosen=dtype is not None)
            with (
                torch.no_grad(),
                tqdm(total=total, unit="B", unit_scale=True, desc="hf -> megatron", disable=not progress) as bar,
            ):
                for p in params:
                    tensors = tuple(hf.get(k) for k in p.hf)
                    check_values(hf, p.hf, tensors, target)
                    changes.add(p.hf, tensors)
                    param = state[p.megatron]
                    converted = p.transform.to_megatron(tensors, cfg).to(target).contiguous()
                    if converted.shape != param.shape:
                        raise RuntimeError(
                            f"{p.megatron}: converted to {list(converted.shape)}, the model has {list(param.shape)}"
                        )
                    # the parameter becomes the converted tensor (its own allocation, never touched, is
                    # freed): a tensor that needs no change stays the reader's memory-mapped, copy-on-write
                    # view of the file, which the checkpoint writer then reads without a copy
                    param.data = converted
                    bar.update(sum(t.numel() * t.element_size() for t in tensors))
                    del tensors, converted
            hf.close()
            line = changes.line()
            if line:
                log(line)
            run = {"converted_from": os.path.abspath(load), "dtype": hf_config.dtype_name(target)}
            with _without_zip_crc32():
                checkpointing.save_checkpoint(staged.path, 0, [model], cfg, run_config=run)
            del model, state
        hf_assets.copy_assets(load, os.path.join(staged.path, hf_assets.ASSETS_DIR), include_config=True)
        staged.commit()
    except BaseException:
        staged.abort()
        raise
    return ConversionReport(load, save, len(params), total, time.perf_counter() - start, setup)
