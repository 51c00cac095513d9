"""One PosGen cell: train the project's Megatron LLaMA with one rotary kind on one task at one seed, test it.

The model and its training step are the LLM path's own: ``training.model.build_model_and_optimizer``
(GPTModel chunks from ``megatron.llama.build_model`` with our rotary module, megatron DDP, the distributed
optimizer, warm-up + cosine scheduler), ``training.step.train_step`` (per-token loss), Megatron-LM's sampler
(``training.data_loop.sample_ranges``) and the windowed loss (``training.metrics.LossWindow``). Only the data
and the metric are PosGen's. A cell runs data-parallel over the ranks of its job (TP = PP = 1).

Input layout. A sequence x_0..x_{L-1} is fed as ``[BOS, x_0, .., x_{L-2}]`` with labels ``x_0..x_{L-1}``, so
the prediction of x_l is made at rotary position l from exactly the tokens before it: training sees
positions 0..63, the test 0..255, and positions 64..255 are the ones never seen (out of distribution).
BOS is token 17 (the model vocabulary is 18, padded by the builder). The loss is masked on the four seed
prefix targets x_0..x_3, which are random and cannot be predicted (the reference masks the prefix too).

Metric: teacher-forced next-token accuracy, the greedy choice among the 17 PosGen tokens (the evaluation
tools' scoring path, ``evaluation.scoring.megatron_token_scores``), per position, on a test split whose
seed prefixes never occur in training (``posgen.splits``). Every test variant sees the same sequences.
The reference protocol (``presets.PROTOCOLS``) swaps in the reference code's rows, its test-time YaRN and
its argmax over the whole vocabulary.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
import time
from typing import Dict, Iterator, Optional

import torch
import torch.distributed as dist

from megatron_resonance.config_fields import same_named
from megatron_resonance.errors import ConfigError
from megatron_resonance.evaluation.scoring import megatron_token_scores
from megatron_resonance.megatron import distributed
from megatron_resonance.megatron.distributed import print_rank0
from megatron_resonance.megatron.llama import LlamaConfig
from megatron_resonance.posgen.presets import EVALUATED_AS, Preset
from megatron_resonance.posgen.splits import make_reference_split, make_split
from megatron_resonance.posgen.tasks import PREFIX_LENGTH, VOCAB_SIZE
from megatron_resonance.rope import RopeConfig
from megatron_resonance.training.config import (
    Config,
    DataConfig,
    OptimizerConfig,
    ParallelConfig,
    TrainingConfig,
)
from megatron_resonance.training.data_loop import sample_ranges
from megatron_resonance.training.metrics import LossWindow
from megatron_resonance.training.model import build_model_and_optimizer
from megatron_resonance.training.step import eval_mode, train_step

# megatron.core (seconds to import) is imported inside the functions that use it (with megatron.rotary, which imports
# it): a cell's settings are checked before a model is built.

BOS = VOCAB_SIZE
"""Token id of the beginning-of-sequence token (17): PosGen's 17 tokens plus this one."""
MODEL_VOCAB_SIZE = VOCAB_SIZE + 1


# ==========================================================================================================
# Configuration: the LLM path's config for one PosGen training
# ==========================================================================================================


def rope_config(preset: Preset, variant: str):
    """The rotary plan a variant trains or tests with.

    YaRN kinds, clean protocol: YaRN as Hugging Face defines it, s = scaling_factor, original length =
    train_length. Reference protocol: the test-time YaRN of the paper's reference code, which counts the
    framing token in both lengths: s = (test_length + 1) / (train_length + 1), beta_fast = 2,
    beta_slow = 1, the correction range taken at test_length + 1; attention factor 0.1 ln s + 1 either way.
    """
    common = dict(kind=variant, head_dim=preset.head_dim, base=preset.rotary_base)
    if variant not in ("yarn", "resonance_yarn"):
        return RopeConfig(**common, original_max_position=preset.train_length)
    if preset.protocol == "reference":
        return RopeConfig(
            **common,
            original_max_position=preset.train_length + 1,
            factor=(preset.test_length + 1) / (preset.train_length + 1),
            beta_fast=2.0,
            beta_slow=1.0,
            correction_length=preset.test_length + 1,
        )
    return RopeConfig(**common, original_max_position=preset.train_length, factor=preset.scaling_factor)


def run_config(preset: Preset, kind: str, seed: int, micro_batch_size: int):
    """The LLM path's ``training.config.Config`` for one PosGen training."""
    model = LlamaConfig(
        num_layers=preset.num_layers,
        hidden_size=preset.hidden_size,
        ffn_hidden_size=preset.ffn_hidden_size,
        num_attention_heads=preset.num_attention_heads,
        num_query_groups=preset.num_attention_heads,
        vocab_size=MODEL_VOCAB_SIZE,
        max_position_embeddings=preset.test_length,
        rope=rope_config(preset, kind),
    )
    return Config(
        model=model,
        parallel=ParallelConfig(),
        data=DataConfig(
            seq_length=preset.train_length,
            micro_batch_size=micro_batch_size,
            global_batch_size=preset.global_batch_size,
        ),
        optimizer=OptimizerConfig(
            optimizer="adam",
            **same_named(preset, "lr min_lr weight_decay adam_beta1 adam_beta2 clip_grad"),
            lr_warmup_fraction=preset.warmup_fraction,
            lr_decay_style="cosine",
        ),
        training=TrainingConfig(train_iters=preset.train_iters(), seed=seed, bf16=preset.bf16),
    )


# ==========================================================================================================
# Data
# ==========================================================================================================


def load_splits(preset: Preset, task: str, seed: int) -> Dict[str, torch.Tensor]:
    """Train / validation at train_length, test at test_length. Clean protocol: disjoint prefixes, train and
    validation drawn by ``seed``, test by the fixed test_seed. Reference protocol: the reference code's
    rows, the same for every seed (validation and test rows are training rows)."""
    if preset.protocol == "reference":
        sizes = (preset.train_sequences, preset.validation_sequences, preset.test_sequences)
        return {
            "train": make_reference_split(task, "train", preset.train_length, *sizes),
            "validation": make_reference_split(task, "validation", preset.train_length, *sizes),
            "test": make_reference_split(task, "test", preset.test_length, *sizes),
        }
    return {
        "train": make_split(task, "train", preset.train_sequences, preset.train_length, seed),
        "validation": make_split(task, "validation", preset.validation_sequences, preset.train_length, seed),
        "test": make_split(task, "test", preset.test_sequences, preset.test_length, preset.test_seed),
    }


def with_bos(sequences: torch.Tensor) -> torch.Tensor:
    """``[BOS, x_0 .. x_{L-1}]`` for sequences [N, L]."""
    return torch.cat([torch.full((sequences.shape[0], 1), BOS, dtype=torch.long), sequences], dim=1)


def model_inputs(sequences: torch.Tensor) -> Dict[str, torch.Tensor]:
    """The micro-batch dict ``training.step.forward_step`` reads, for PosGen sequences [N, L].

    tokens = [BOS, x_0 .. x_{L-2}], labels = x_0 .. x_{L-1}: the prediction at position l sees x_<l.
    loss_mask drops the seed-prefix targets (positions 0..3).
    """
    n, length = sequences.shape
    positions = torch.arange(length)
    return {
        "tokens": with_bos(sequences)[:, :-1],
        "labels": sequences.clone(),
        "loss_mask": (positions >= PREFIX_LENGTH).float().expand(n, length).contiguous(),
        "position_ids": positions.expand(n, length).contiguous(),
    }


def sample_order(num_sequences: int, num_samples: int, seed: int) -> torch.Tensor:
    """Indices of the training sequences in the order they are used: each epoch a fresh seeded permutation,
    epochs back to back (the last one cut where training ends)."""
    g = torch.Generator().manual_seed(seed)
    epochs = -(-num_samples // num_sequences)
    return torch.cat([torch.randperm(num_sequences, generator=g) for _ in range(epochs)])[:num_samples]


def train_micro_batches(
    sequences: torch.Tensor, order: torch.Tensor, global_batch_size: int, micro_batch_size: int
) -> Iterator[Dict[str, torch.Tensor]]:
    """Micro-batches for this data-parallel rank of the whole global batches in ``order``, by Megatron-LM's
    pretraining sampler (``data_loop.sample_ranges``: rank r takes slice r of every micro-batch round)."""
    end = len(order) // global_batch_size * global_batch_size
    for samples in sample_ranges(0, micro_batch_size):
        if samples.stop > end:
            return
        yield model_inputs(sequences[order[samples.start : samples.stop]])


# ==========================================================================================================
# Evaluation
# ==========================================================================================================


def scored_vocab_size(preset: Preset) -> int:
    """Tokens the greedy choice is made among: the 17 PosGen tokens (clean), or the whole model vocabulary,
    BOS included, as the reference code's argmax over all logits (reference)."""
    return MODEL_VOCAB_SIZE if preset.protocol == "reference" else VOCAB_SIZE


@torch.no_grad()
def position_accuracy(chunks, sequences: torch.Tensor, batch_size: int, vocab_size: int = VOCAB_SIZE) -> torch.Tensor:
    """float64 [L]: teacher-forced accuracy at each position over ``sequences`` [N, L] (NaN on the seed
    prefix), scored by the evaluation tools' path with the greedy choice among the first ``vocab_size``
    tokens (BOS is never a target). Sequences are shared out over data-parallel replicas and the counts
    summed; any TP / PP layout."""
    from megatron.core import parallel_state as ps

    dp_rank, dp_size = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
    correct = torch.zeros(sequences.shape[1], dtype=torch.float64)
    mine = sequences[dp_rank::dp_size]
    with eval_mode(chunks):
        for start in range(0, mine.shape[0], batch_size):
            tokens = with_bos(mine[start : start + batch_size])
            scores = megatron_token_scores(chunks, tokens, vocab_size=vocab_size, micro_batch_size=batch_size)
            correct += scores.greedy.sum(dim=0).double()
    if dp_size > 1:
        device = distributed.device()
        total = correct.to(device)
        dist.all_reduce(total, group=ps.get_data_parallel_group())
        correct = total.cpu()
    accuracy = correct / sequences.shape[0]
    accuracy[:PREFIX_LENGTH] = float("nan")
    return accuracy


def summarize_positions(accuracy: torch.Tensor, train_length: int) -> Dict[str, float]:
    """In-distribution (positions 4..train_length-1) and out-of-distribution (train_length..) means."""
    return {
        "id_accuracy": float(accuracy[PREFIX_LENGTH:train_length].mean()),
        "ood_accuracy": float(accuracy[train_length:].mean()) if accuracy.numel() > train_length else math.nan,
    }


# ==========================================================================================================
# Training
# ==========================================================================================================


@dataclasses.dataclass
class Training:
    """One PosGen model with its optimizer, scheduler and the LLM path's training step."""

    cfg: object
    chunks: list
    optimizer: object
    scheduler: object
    micro_batch_size: int
    num_microbatches: int
    forward_backward: object

    def step(self, batches: Iterator[Dict[str, torch.Tensor]]):
        """One optimizer step over ``num_microbatches`` micro-batches: (loss, grad norm, update applied)."""
        return train_step(
            self.forward_backward, batches, self.chunks, self.optimizer, self.scheduler, self.cfg, self.num_microbatches
        )


def build_training(preset: Preset, kind: str, seed: int) -> Training:
    """The model trained with ``kind`` at ``seed``: ``training.model.build_model_and_optimizer`` on
    :func:`run_config`. The same seed gives the rope and the resonance model the same initial weights."""
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    dp = ps.get_data_parallel_world_size()
    micro = preset.micro_batch_size or preset.global_batch_size // dp
    if preset.global_batch_size % (micro * dp):
        raise ConfigError(f"global batch {preset.global_batch_size} is not a multiple of micro-batch {micro} x DP {dp}")
    cfg = run_config(preset, kind, seed, micro)
    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)
    chunks, optimizer, scheduler, _ = build_model_and_optimizer(cfg, bf16=preset.bf16)
    return Training(
        cfg, chunks, optimizer, scheduler, micro, preset.global_batch_size // (micro * dp), get_forward_backward_func()
    )


REFERENCE_VALIDATION_EPOCHS = 2
"""Reference protocol: validate every 2 epochs (the reference sweep's ``check_val_every_n_epoch``)."""


def _validate(chunks, preset: Preset, data: Dict[str, torch.Tensor], kind: str, select: bool) -> Dict[str, float]:
    """In-distribution validation accuracy of the model trained with ``kind``: as ``kind`` only, or (``select``)
    as each of its test variants, the rotary put back to ``kind`` afterwards."""
    from megatron_resonance.megatron.rotary import install_rotary

    result = {}
    for variant in EVALUATED_AS[kind] if select else (kind,):
        if select:
            install_rotary(chunks, rope_config(preset, variant))
        accuracy = position_accuracy(chunks, data["validation"], preset.eval_batch_size, scored_vocab_size(preset))
        result[variant] = summarize_positions(accuracy, preset.train_length)["id_accuracy"]
    if select:
        install_rotary(chunks, rope_config(preset, kind))
    return result


def run_cell(
    preset: Preset,
    task: str,
    seed: int,
    kind: str,
    data: Dict[str, torch.Tensor],
    prefix: str,
    weights_path: Optional[str] = None,
) -> dict:
    """Train with ``kind`` and evaluate as ``EVALUATED_AS[kind]``; returns the cell's JSON record.

    Clean protocol: every variant tests the final model. Reference protocol (as the reference code's
    Lightning checkpoint on ``val/acc_id``): validation every :data:`REFERENCE_VALIDATION_EPOCHS` epochs as
    each test variant, and each variant tests the first checkpoint with its best in-distribution validation
    accuracy (validation rows are training rows; positions 4..train_length-1 do not depend on the length
    they are scored at, so validating at train_length scores what the reference scores at test length).
    """
    from megatron_resonance.megatron.rotary import install_rotary, unwrap

    select = preset.protocol == "reference"
    training = build_training(preset, kind, seed)
    cfg, chunks, optimizer, scheduler = training.cfg, training.chunks, training.optimizer, training.scheduler
    iters = cfg.training.train_iters
    steps_per_epoch = preset.train_sequences / preset.global_batch_size
    order = sample_order(preset.train_sequences, iters * preset.global_batch_size, seed)
    batches = train_micro_batches(data["train"], order, preset.global_batch_size, training.micro_batch_size)

    # ---------------------------------------------------------------- train
    start = time.time()
    # progress + validation after every `interval` epochs (step counts rounded up) and at the end
    interval = REFERENCE_VALIDATION_EPOCHS if select else preset.validation_interval
    log_steps = {
        min(iters, math.ceil(e * steps_per_epoch)) for e in range(interval, math.ceil(preset.epochs) + 1, interval)
    } | {iters}
    window, history, validation_seconds = LossWindow(), [], 0.0
    best = {}  # reference protocol: variant -> the checkpoint it is tested with
    for step in range(1, iters + 1):
        loss, _, update_ok = training.step(batches)
        window.add(loss)
        if step in log_steps:
            scored = time.time()
            validation = _validate(chunks, preset, data, kind, select)
            validation_seconds += time.time() - scored
            record = {
                "iteration": step,
                "epoch": step / steps_per_epoch,
                "loss": window.mean_loss(),
                "validation_id_accuracy": validation[kind],
                "seconds": time.time() - start,
            }
            if select:
                record["validation_id_accuracy_by_variant"] = validation
                for variant, accuracy in validation.items():
                    if variant not in best or accuracy > best[variant]["validation_id_accuracy"]:
                        best[variant] = {
                            "iteration": step,
                            "epoch": record["epoch"],
                            "validation_id_accuracy": accuracy,
                            "state": [copy.deepcopy(unwrap(c).state_dict()) for c in chunks],
                        }
            history.append(record)
            eta = record["seconds"] / step * (iters - step)
            print_rank0(
                f"{prefix} iter {step:>5}/{iters} | epoch {record['epoch']:6.1f} | loss {record['loss']:.4f} | "
                f"lr {scheduler.get_lr(optimizer.param_groups[0]):.2e} | validation accuracy "
                f"{100 * record['validation_id_accuracy']:5.1f}% | {record['seconds']:.0f} s (eta {eta:.0f} s)"
                + ("" if update_ok else " | skipped step (non-finite grads)")
            )
            window.reset()
    train_seconds = time.time() - start

    if weights_path and dist.get_rank() == 0:
        os.makedirs(os.path.dirname(weights_path), exist_ok=True)
        torch.save({"model": unwrap(chunks[0]).state_dict(), "config": cfg.model.to_dict()}, weights_path)

    # ---------------------------------------------------------------- test, as each variant
    start = time.time()
    variants = {}
    for variant in EVALUATED_AS[kind]:
        if select:
            for chunk, state in zip(chunks, best[variant].pop("state")):
                unwrap(chunk).load_state_dict(state)
        install_rotary(chunks, rope_config(preset, variant))
        accuracy = position_accuracy(chunks, data["test"], preset.eval_batch_size, scored_vocab_size(preset))
        variants[variant] = {
            **summarize_positions(accuracy, preset.train_length),
            "position_accuracy": [None if math.isnan(a) else a for a in accuracy.tolist()],
            **({"checkpoint": best[variant]} if select else {}),
        }
        print_rank0(
            f"{prefix} test as {variant:<15} in distribution {100 * variants[variant]['id_accuracy']:5.1f}% | "
            f"out of distribution {100 * variants[variant]['ood_accuracy']:5.1f}%"
            + (f" | checkpoint of epoch {best[variant]['epoch']:.1f}" if select else "")
        )
    return {
        "task": task,
        "seed": seed,
        "trained_as": kind,
        "variants": variants,
        "train": {
            "iterations": iters,
            "seconds": train_seconds,
            "validation_seconds": validation_seconds,
            "history": history,
        },
        "test_seconds": time.time() - start,
        "world_size": dist.get_world_size(),
        "preset": preset.name,
        "protocol": preset.protocol,
    }
