"""Megatron-Core checkpoint (any TP/PP it was saved at) -> Hugging Face LLaMA that stock transformers loads.

Phases: check (checkpoint, stored model config, reference config, ``--save``) · build the TP=1 model in the
checkpoint's dtype and load it (dist_checkpointing merges TP shards and pipeline stages) · stream every
Hugging Face tensor through the key map into safetensors shards (+ index), two shards at a time
(``megatron_resonance.hf.writer``) · write ``config.json`` with the rope plan encoded for stock transformers
(``megatron_resonance.hf.rope``) · copy tokenizer files · fsync and swap the staging directory into place.

Peak memory is about one copy of the weights (the model): each parameter is released once its Hugging Face
tensors are produced, and its memory goes when they are written, so the shards in flight take the place of
the parameters they came from. Only copies cost more: q/k/v (not views of ``linear_qkv``), and with a
wider ``--dtype`` the widening of the shards in flight.
"""

from __future__ import annotations

import json
import os
import time
from typing import Callable, Dict, Optional

import torch
from tqdm import tqdm

from megatron_resonance.cli import one_line
from megatron_resonance.conversion import key_map
from megatron_resonance.conversion.runtime import ConversionReport, build_tp1_model, single_process
from megatron_resonance.conversion.staging import StagedDirectory
from megatron_resonance.errors import CheckpointError, ConversionError
from megatron_resonance.hf import assets as hf_assets
from megatron_resonance.hf import config as hf_config
from megatron_resonance.hf import rope as hf_rope
from megatron_resonance.hf.reader import read_json
from megatron_resonance.hf.writer import parse_size, write_sharded
from megatron_resonance.megatron import checkpoint_layout, checkpointing

# megatron.core (seconds to import) is imported inside the functions that use it: --help and the input checks run
# without it.


def convert_megatron_to_hf(
    load: str,
    save: str,
    *,
    rope_format: str = "longrope",
    dtype: Optional[str] = None,
    overwrite: bool = False,
    max_shard_size: str = "5GB",
    hf_reference: Optional[str] = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> ConversionReport:
    """Export the Megatron checkpoint ``load`` (a root with ``latest_checkpointed_iteration.txt`` or an
    ``iter_*`` directory) as a Hugging Face LLaMA directory ``save``.

    ``hf_reference``: a Hugging Face directory whose tokenizer files and non-architecture config fields are
    carried over; default: the ``hf/`` directory the importer kept beside the checkpoint."""
    start = time.perf_counter()
    # ---------------------------------------------------------------- check

    if rope_format not in hf_rope.ROPE_FORMATS:
        raise ConversionError(
            f"unknown --rope-format {rope_format!r}; expected one of {', '.join(hf_rope.ROPE_FORMATS)}"
        )
    if dtype is not None and dtype not in hf_config.DTYPES:
        raise ConversionError(f"unknown --dtype {dtype!r}; expected one of {', '.join(hf_config.DTYPES)}")
    shard_bytes = parse_size(max_shard_size)
    try:
        ckpt = checkpoint_layout.resolve_checkpoint(load)
        checkpoint_layout.verify_checkpoint(ckpt)  # a truncated or missing file: one line, before megatron reads it
        cfg = checkpoint_layout.read_model_config(ckpt)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ConversionError(f"{ckpt}: unreadable {checkpoint_layout.CONFIG_FILE} ({e})") from None
    reference_dir = hf_reference or hf_assets.default_reference(load, ckpt)
    if hf_reference is not None and not os.path.isdir(hf_reference):
        raise ConversionError(f"--hf-reference {hf_reference}: not a directory")
    reference = None
    if reference_dir and os.path.isfile(os.path.join(reference_dir, "config.json")):
        reference = read_json(os.path.join(reference_dir, "config.json"), "reference config.json")
    params = key_map.expand(cfg)
    shapes = key_map.hf_shapes(cfg)
    owner = {k: p for p in params for k in p.hf}
    staged = StagedDirectory(save, overwrite, inputs=[load, ckpt])

    # ---------------------------------------------------------------- convert
    try:
        with single_process():
            from megatron.core import dist_checkpointing

            stored = dist_checkpointing.load_tensors_metadata(ckpt)["embedding.word_embeddings.weight"].dtype
            out_dtype = hf_config.DTYPES[dtype] if dtype else stored
            if out_dtype not in hf_config.DTYPES.values():
                raise ConversionError(f"{ckpt}: weights are {out_dtype}; pass --dtype float32, bfloat16 or float16")
            model = build_tp1_model(cfg, stored)
            state = dict(model.named_parameters())
            setup = time.perf_counter() - start
            # strict: every model tensor must be in the checkpoint; what else it holds (optimizer, RNG state
            # of a training checkpoint) is not requested and not read
            try:
                checkpointing.load_checkpoint(ckpt, [model])
            except CheckpointError:  # damaged files, non-finite weights: its own line
                raise
            except Exception as e:  # megatron's CheckingError, torch DCP errors: name what is wrong, in one line
                raise ConversionError(f"{ckpt}: cannot load the model from it ({one_line(e)})") from None

            pending: Dict[str, torch.Tensor] = {}

            def produce(name: str) -> torch.Tensor:
                if name not in pending:
                    p = owner[name]
                    param = state.pop(p.megatron)
                    pending.update(zip(p.hf, p.transform.to_hf(param.detach(), cfg)))
                    # the model lets go of the parameter: its memory goes once the tensors made from it are
                    # written (views of it) or at once (copies: q/k/v, another dtype)
                    param.data = param.data.new_empty(0)
                return pending.pop(name).to(out_dtype)

            specs = [(k, shapes[k], out_dtype) for p in params for k in p.hf]
            total = sum(torch.Size(s).numel() * out_dtype.itemsize for _, s, _ in specs)
            with tqdm(total=total, unit="B", unit_scale=True, desc="megatron -> hf", disable=not progress) as bar:
                write_sharded(staged.path, specs, produce, shard_bytes, on_written=bar.update)
        config = hf_config.export_config(cfg, out_dtype, rope_format, reference)
        with open(os.path.join(staged.path, "config.json"), "w") as f:
            json.dump(config, f, indent=2)
            f.write("\n")
        if reference_dir:
            hf_assets.copy_assets(reference_dir, staged.path, include_config=False)
        staged.commit()
    except BaseException:
        staged.abort()
        raise
    if rope_format == "custom" and (cfg.rope.resonance or cfg.rope.kind == "ntk"):
        log(f"rope type {hf_rope.CUSTOM_ROPE_TYPE!r}: call megatron_resonance.hf.register() before loading")
    return ConversionReport(ckpt, save, len(specs), total, time.perf_counter() - start, setup)
