"""PosGen benchmark: train the project's Megatron LLaMA at length 64, test it at 256, per rotary variant.

    python tools/posgen_benchmark.py --preset small --workers 2 --out runs/posgen_small
    torchrun --nproc-per-node 8 tools/posgen_benchmark.py --preset paper --out runs/posgen_paper

Per task x seed there are two trainings and four evaluations, as in the paper's reference code (which
trains with plain or rounded RoPE and switches to the YaRN variant only for evaluation):

    variant          trained with   evaluated with
    rope             rope           rope
    resonance        resonance      resonance
    yarn             rope           yarn            (s = 4, original length 64, installed at test time)
    resonance_yarn   resonance      resonance_yarn  (idem)

The model is the LLM path's own: ``training.trainer.build_model_and_optimizer`` (GPTModel chunks from
``megatron.llama.build_model`` with our rotary module, megatron DDP, the distributed optimizer, warm-up +
cosine scheduler) and ``trainer.train_step`` / ``forward_step`` / ``loss_func`` (per-token loss). Only the
data and the evaluation are PosGen's. A cell runs data-parallel over the ranks of a torchrun job
(TP = PP = 1); ``run_workers`` instead runs whole cells side by side in single-rank processes.

Input layout. A sequence x_0..x_{L-1} is fed as ``[BOS, x_0, .., x_{L-2}]`` with labels ``x_0..x_{L-1}``, so
the prediction of x_l is made at rotary position l from exactly the tokens before it: training sees
positions 0..63, the test 0..255, and positions 64..255 are the ones never seen (out of distribution).
BOS is token 17 (the model vocabulary is 18, padded by the builder). The loss is masked on the four seed
prefix targets x_0..x_3, which are random and cannot be predicted (the reference masks the prefix too).

Metric: teacher-forced next-token accuracy, argmax over the 17 PosGen tokens, on positions 4..63 (in
distribution) and 64..255 (out of distribution), on a test split whose seed prefixes never occur in
training (``posgen.splits``). Every test variant sees the same test sequences.

Output under ``--out``: ``cells/<task>/seed<k>/<trained-kind>.json`` (one per finished training, with
both of its evaluations; a rerun skips it), ``report.json``, ``report.md`` and ``position_<task>.png``.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
import os
import platform
import subprocess
import time
from typing import Dict, Iterator, Optional, Sequence

import torch
import torch.distributed as dist

from megatron_resonance.posgen import stats
from megatron_resonance.posgen.splits import make_split
from megatron_resonance.posgen.tasks import PREFIX_LENGTH, TASKS, VOCAB_SIZE

BOS = VOCAB_SIZE
"""Token id of the beginning-of-sequence token (17): PosGen's 17 tokens plus this one."""
MODEL_VOCAB_SIZE = VOCAB_SIZE + 1
VARIANTS = ("rope", "resonance", "yarn", "resonance_yarn")
"""Test variants, in report order."""
TRAINED_KINDS = ("rope", "resonance")
"""Rotary kinds models are trained with."""
EVALUATED_AS = {"rope": ("rope", "yarn"), "resonance": ("resonance", "resonance_yarn")}
"""Each trained kind and the variants its model is tested as."""
CELLS_DIR = "cells"
CONFIG_FILE = "benchmark.json"


# ==========================================================================================================
# Presets
# ==========================================================================================================


@dataclasses.dataclass(frozen=True)
class Preset:
    """Everything that fixes a benchmark run: model shape, data sizes, optimization and evaluation."""

    name: str
    """Preset name (``paper``, ``small``, ``smoke``)."""
    tasks: tuple = TASKS
    """PosGen subtasks to run (``--tasks`` overrides)."""
    seeds: int = 5
    """Seeds 0..seeds-1 per task x variant (``--seeds`` overrides); a seed fixes data order and init."""
    num_layers: int = 2
    """Transformer layers."""
    hidden_size: int = 512
    """Model width d_model."""
    num_attention_heads: int = 8
    """Attention heads (multi-head: as many key/value heads); head dim = hidden_size / heads."""
    ffn_hidden_size: int = 2048
    """SwiGLU inner width."""
    rotary_base: float = 10000.0
    """RoPE base b."""
    train_length: int = 64
    """Training sequence length (rotary positions 0..63)."""
    test_length: int = 256
    """Test sequence length; positions train_length..test_length-1 are out of distribution."""
    scaling_factor: float = 4.0
    """YaRN scale s for the yarn / resonance_yarn variants (original length = train_length)."""
    train_sequences: int = 10_000
    """Training sequences (distinct seed prefixes)."""
    validation_sequences: int = 1_000
    """Validation sequences at train_length, scored during training (progress only)."""
    test_sequences: int = 1_000
    """Test sequences at test_length (the same set for every seed and variant)."""
    epochs: float = 150
    """Passes over the training sequences."""
    global_batch_size: int = 128
    """Sequences per optimizer step (over all data-parallel ranks)."""
    micro_batch_size: Optional[int] = None
    """Sequences per forward/backward per rank; None: global_batch_size / DP (one micro-batch)."""
    lr: float = 2e-4
    """Peak learning rate (AdamW)."""
    min_lr: float = 0.0
    """Learning rate at the end of the cosine decay."""
    weight_decay: float = 0.01
    """Decoupled weight decay (megatron exempts biases and norm weights)."""
    warmup_fraction: float = 0.1
    """Linear warm-up as a fraction of all steps, then cosine decay to min_lr (one cycle)."""
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    clip_grad: float = 0.0
    """Global gradient-norm clip (0: none, as the reference's Lightning default)."""
    eval_batch_size: int = 100
    """Sequences per evaluation forward pass."""
    validation_interval: int = 10
    """Score the validation split every this many epochs (and after the last)."""
    bf16: bool = False
    """Train in bf16 with fp32 main weights (megatron's Float16Module + distributed optimizer) instead of fp32."""
    test_seed: int = 0
    """Seed of the test split (fixed, so every seed and variant is scored on the same sequences)."""

    def __post_init__(self):
        unknown = set(self.tasks) - set(TASKS)
        if unknown or not self.tasks:
            raise ValueError(f"tasks must be a non-empty subset of {', '.join(TASKS)}, got {self.tasks}")
        if not PREFIX_LENGTH < self.train_length < self.test_length:
            raise ValueError(f"need {PREFIX_LENGTH} < train_length < test_length, got {self.train_length}, "
                             f"{self.test_length}")
        if self.hidden_size % self.num_attention_heads or self.head_dim % 2:
            raise ValueError("hidden_size / num_attention_heads must be an even integer")
        if self.seeds < 1 or self.epochs <= 0 or self.global_batch_size < 1:
            raise ValueError("seeds, epochs and global_batch_size must be positive")

    def fingerprint(self) -> dict:
        """The fields a stored cell's results depend on (tasks and seeds only choose which cells run)."""
        d = dataclasses.asdict(self)
        for key in ("name", "tasks", "seeds", "eval_batch_size", "validation_interval", "micro_batch_size"):
            d.pop(key)
        if not d["bf16"]:
            d.pop("bf16")  # added later: fp32 runs stored before it match as they are
        return d

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def train_iters(self) -> int:
        return max(1, math.ceil(self.epochs * self.train_sequences / self.global_batch_size))


_SMALL = Preset(
    name="small",
    seeds=5,
    hidden_size=64,
    num_attention_heads=2,
    ffn_hidden_size=256,
    train_sequences=4_000,
    validation_sequences=200,
    test_sequences=1_000,
    epochs=12,
    global_batch_size=64,
    lr=3e-3,
    validation_interval=4,
)

PRESETS: Dict[str, Preset] = {
    # The paper's setup (2 layers in T5-small shape, 10k/1k/1k, 150 epochs, AdamW 2e-4, wd 0.01, batch 128,
    # one-cycle cosine with 10 % warm-up, 5 seeds). For a GPU.
    "paper": Preset(name="paper"),
    # All 30 cells (3 tasks x 2 trainings x 5 seeds) in about 25 minutes with 2 workers on 2 CPU cores:
    # the paper's shape scaled to d_model 64 (2 heads x 32), 4,000 sequences x 12 epochs = 750 steps of
    # 64 at a higher learning rate. Recursive and CoT reach ~98 % in distribution by ~400 steps;
    # semi-recursive stays at ~53 % at any width, depth or length of training tried (benchmarks/README.md).
    "small": _SMALL,
    # `make demo`'s PosGen stage (about a minute with 2 workers on 2 CPU cores): the small model on the
    # recursive task, which it learns in a few hundred steps, so the plot shows what happens past 64.
    "demo": dataclasses.replace(
        _SMALL, name="demo", tasks=("recursive",), seeds=1, train_sequences=2_000, validation_sequences=100,
        test_sequences=200, epochs=15, validation_interval=5,
    ),
    # The test suite's end-to-end run (about a minute and a half on 2 CPU cores): the small model on the
    # recursive task, 375 steps of 32 (~65 % in distribution, far above chance, not converged).
    "smoke": dataclasses.replace(
        _SMALL, name="smoke", tasks=("recursive",), seeds=1, train_sequences=1_000, validation_sequences=100,
        test_sequences=100, global_batch_size=32, lr=5e-3,
    ),
}


# ==========================================================================================================
# Model and data
# ==========================================================================================================


def rope_config(preset: Preset, variant: str):
    """The rotary plan a variant trains or tests with (YaRN kinds: s = scaling_factor, L = train_length)."""
    from megatron_resonance.rope import RopeConfig

    scaled = variant in ("yarn", "resonance_yarn")
    return RopeConfig(
        kind=variant,
        head_dim=preset.head_dim,
        base=preset.rotary_base,
        original_max_position=preset.train_length,
        factor=preset.scaling_factor if scaled else 1.0,
    )


def run_config(preset: Preset, kind: str, seed: int, micro_batch_size: int):
    """The LLM path's ``training.config.Config`` for one PosGen training."""
    from megatron_resonance.megatron.llama import LlamaConfig
    from megatron_resonance.training.config import (
        Config,
        DataConfig,
        OptimizerConfig,
        ParallelConfig,
        TrainingConfig,
    )

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
            lr=preset.lr,
            min_lr=preset.min_lr,
            weight_decay=preset.weight_decay,
            adam_beta1=preset.adam_beta1,
            adam_beta2=preset.adam_beta2,
            clip_grad=preset.clip_grad,
            lr_warmup_fraction=preset.warmup_fraction,
            lr_decay_style="cosine",
        ),
        training=TrainingConfig(train_iters=preset.train_iters(), seed=seed, bf16=preset.bf16),
    )


def model_inputs(sequences: torch.Tensor) -> Dict[str, torch.Tensor]:
    """The micro-batch dict ``trainer.forward_step`` reads, for PosGen sequences [N, L].

    tokens = [BOS, x_0 .. x_{L-2}], labels = x_0 .. x_{L-1}: the prediction at position l sees x_<l.
    loss_mask drops the seed-prefix targets (positions 0..3).
    """
    n, length = sequences.shape
    tokens = torch.cat([torch.full((n, 1), BOS, dtype=torch.long), sequences[:, :-1]], dim=1)
    positions = torch.arange(length)
    return {
        "tokens": tokens,
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
    """Micro-batches for this data-parallel rank: ``order`` cut into global batches; rank r takes slice r
    of each (Megatron-LM's pretraining sampler)."""
    from megatron.core import parallel_state as ps

    dp_rank, dp_size = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
    per_rank = global_batch_size // dp_size
    for start in range(0, len(order) - global_batch_size + 1, global_batch_size):
        mine = order[start + dp_rank * per_rank : start + (dp_rank + 1) * per_rank]
        for m in range(0, per_rank, micro_batch_size):
            yield model_inputs(sequences[mine[m : m + micro_batch_size]])


# ==========================================================================================================
# Evaluation
# ==========================================================================================================


@torch.no_grad()
def position_accuracy(chunks, sequences: torch.Tensor, batch_size: int) -> torch.Tensor:
    """float64 [L]: teacher-forced accuracy at each position over ``sequences`` [N, L] (NaN on the seed
    prefix). Sequences are shared out over data-parallel ranks and the counts summed."""
    from megatron.core import parallel_state as ps

    dp_rank, dp_size = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
    device = torch.cuda.current_device() if torch.cuda.is_available() else "cpu"
    model = chunks[0]
    model.eval()
    correct = torch.zeros(sequences.shape[1], dtype=torch.float64, device=device)
    mine = sequences[dp_rank::dp_size]
    for start in range(0, mine.shape[0], batch_size):
        batch = {k: v.to(device) for k, v in model_inputs(mine[start : start + batch_size]).items()}
        logits = model(batch["tokens"], batch["position_ids"], None)  # [b, s, padded vocab]
        predicted = logits[..., :VOCAB_SIZE].argmax(dim=-1)  # only PosGen tokens can be targets
        correct += (predicted == batch["labels"]).sum(dim=0).double()
    model.train()
    dist.all_reduce(correct)
    accuracy = (correct / sequences.shape[0]).cpu()
    accuracy[:PREFIX_LENGTH] = float("nan")
    return accuracy


def summarize_positions(accuracy: torch.Tensor, train_length: int) -> Dict[str, float]:
    """In-distribution (positions 4..train_length-1) and out-of-distribution (train_length..) means."""
    return {
        "id_accuracy": float(accuracy[PREFIX_LENGTH:train_length].mean()),
        "ood_accuracy": float(accuracy[train_length:].mean()) if accuracy.numel() > train_length else math.nan,
    }


# ==========================================================================================================
# One cell: train one kind on one task at one seed, test it as each of its variants
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
        from megatron_resonance.training import trainer

        return trainer.train_step(self.forward_backward, batches, self.chunks, self.optimizer, self.scheduler,
                                  self.cfg, self.num_microbatches)


def build_training(preset: Preset, kind: str, seed: int) -> Training:
    """The model trained with ``kind`` at ``seed``: ``trainer.build_model_and_optimizer`` on
    :func:`run_config`. The same seed gives the rope and the resonance model the same initial weights."""
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    from megatron_resonance.training import trainer

    dp = ps.get_data_parallel_world_size()
    micro = preset.micro_batch_size or preset.global_batch_size // dp
    if preset.global_batch_size % (micro * dp):
        raise ValueError(f"global batch {preset.global_batch_size} is not a multiple of micro-batch {micro} x DP {dp}")
    cfg = run_config(preset, kind, seed, micro)
    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)
    chunks, optimizer, scheduler, _ = trainer.build_model_and_optimizer(cfg, bf16=preset.bf16)
    return Training(cfg, chunks, optimizer, scheduler, micro, preset.global_batch_size // (micro * dp),
                    get_forward_backward_func())


def run_cell(preset: Preset, task: str, seed: int, kind: str, data: Dict[str, torch.Tensor], prefix: str,
             weights_path: Optional[str] = None) -> dict:
    """Train with ``kind`` and evaluate as ``EVALUATED_AS[kind]``; returns the cell's JSON record."""
    from megatron_resonance.megatron.distributed import print_rank0
    from megatron_resonance.megatron.rotary import install_rotary, unwrap

    training = build_training(preset, kind, seed)
    cfg, chunks, optimizer, scheduler = training.cfg, training.chunks, training.optimizer, training.scheduler
    iters = cfg.training.train_iters
    steps_per_epoch = preset.train_sequences / preset.global_batch_size
    order = sample_order(preset.train_sequences, iters * preset.global_batch_size, seed)
    batches = train_micro_batches(data["train"], order, preset.global_batch_size, training.micro_batch_size)

    # ---------------------------------------------------------------- train
    start = time.time()
    # progress + validation after every validation_interval epochs (step counts rounded up) and at the end
    log_steps = {
        min(iters, math.ceil(e * steps_per_epoch))
        for e in range(preset.validation_interval, math.ceil(preset.epochs) + 1, preset.validation_interval)
    } | {iters}
    window_loss, window_steps, history = 0.0, 0, []
    for step in range(1, iters + 1):
        loss, _, update_ok = training.step(batches)
        window_loss += loss
        window_steps += 1
        if step in log_steps:
            validation = position_accuracy(chunks, data["validation"], preset.eval_batch_size)
            record = {
                "iteration": step,
                "epoch": step / steps_per_epoch,
                "loss": window_loss / window_steps,
                "validation_id_accuracy": summarize_positions(validation, preset.train_length)["id_accuracy"],
                "seconds": time.time() - start,
            }
            history.append(record)
            eta = record["seconds"] / step * (iters - step)
            print_rank0(
                f"{prefix} iter {step:>5}/{iters} | epoch {record['epoch']:6.1f} | loss {record['loss']:.4f} | "
                f"lr {scheduler.get_lr(optimizer.param_groups[0]):.2e} | validation accuracy "
                f"{100 * record['validation_id_accuracy']:5.1f}% | {record['seconds']:.0f} s (eta {eta:.0f} s)"
                + ("" if update_ok else " | skipped step (non-finite grads)")
            )
            window_loss, window_steps = 0.0, 0
    train_seconds = time.time() - start

    if weights_path and dist.get_rank() == 0:
        os.makedirs(os.path.dirname(weights_path), exist_ok=True)
        torch.save({"model": unwrap(chunks[0]).state_dict(), "config": cfg.model.to_dict()}, weights_path)

    # ---------------------------------------------------------------- test, as each variant
    start = time.time()
    variants = {}
    for variant in EVALUATED_AS[kind]:
        install_rotary(chunks, rope_config(preset, variant))
        accuracy = position_accuracy(chunks, data["test"], preset.eval_batch_size)
        variants[variant] = {
            **summarize_positions(accuracy, preset.train_length),
            "position_accuracy": [None if math.isnan(a) else a for a in accuracy.tolist()],
        }
        print_rank0(
            f"{prefix} test as {variant:<15} in distribution {100 * variants[variant]['id_accuracy']:5.1f}% | "
            f"out of distribution {100 * variants[variant]['ood_accuracy']:5.1f}%"
        )
    return {
        "task": task,
        "seed": seed,
        "trained_as": kind,
        "variants": variants,
        "train": {"iterations": iters, "seconds": train_seconds, "history": history},
        "test_seconds": time.time() - start,
        "world_size": dist.get_world_size(),
        "preset": preset.name,
    }


# ==========================================================================================================
# The run
# ==========================================================================================================


def cell_path(out: str, task: str, seed: int, kind: str) -> str:
    return os.path.join(out, CELLS_DIR, task, f"seed{seed}", f"{kind}.json")


def _write_json_atomic(path: str, obj) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, allow_nan=False)
        f.write("\n")
    os.replace(tmp, path)


def check_output_dir(out: str, preset: Preset) -> None:
    """Refuse a directory whose stored cells came from other settings (read-only; any rank)."""
    path = os.path.join(out, CONFIG_FILE)
    if os.path.isfile(path):
        with open(path) as f:
            stored = json.load(f)
        if stored.get("fingerprint") != json.loads(json.dumps(preset.fingerprint())):
            raise ValueError(
                f"{out} holds a benchmark run with other settings (preset {stored.get('preset')!r}); "
                "use another --out"
            )


def load_splits(preset: Preset, task: str, seed: int) -> Dict[str, torch.Tensor]:
    """Train / validation at train_length (seeded), test at test_length (fixed seed): disjoint prefixes."""
    return {
        "train": make_split(task, "train", preset.train_sequences, preset.train_length, seed),
        "validation": make_split(task, "validation", preset.validation_sequences, preset.train_length, seed),
        "test": make_split(task, "test", preset.test_sequences, preset.test_length, preset.test_seed),
    }


def all_cells(preset: Preset) -> list:
    """Every (task, seed, trained kind) of the preset, in run order."""
    return [(t, s, k) for t in preset.tasks for s in range(preset.seeds) for k in TRAINED_KINDS]


def cell_name(cell) -> str:
    """``task:seed:kind``, as ``--cells`` spells a cell."""
    return ":".join(map(str, cell))


def parse_cell(name: str, preset: Preset) -> tuple:
    """The cell a :func:`cell_name` string names; ValueError if it is not one of the preset's."""
    try:
        task, seed, kind = name.split(":")
        cell = (task, int(seed), kind)
    except ValueError:
        cell = None
    if cell not in all_cells(preset):
        raise ValueError(f"{name!r} is not a cell of this run (task:seed:kind, e.g. {cell_name(all_cells(preset)[0])})")
    return cell


def prepare_output(out: str, preset: Preset) -> list:
    """Check ``out`` against the preset, record the settings there, and return the unfinished cells.
    One process calls it (rank 0 of a torchrun job, or the parent of the workers)."""
    check_output_dir(out, preset)
    _write_json_atomic(os.path.join(out, CONFIG_FILE), {"preset": preset.name, "fingerprint": preset.fingerprint()})
    return [c for c in all_cells(preset) if not os.path.isfile(cell_path(out, *c))]


def _header(preset: Preset, out: str, todo: list, how: str) -> str:
    done = len(all_cells(preset)) - len(todo)
    return (
        f"[posgen] preset {preset.name}: {len(preset.tasks)} task(s) x {preset.seeds} seed(s) x "
        f"{len(TRAINED_KINDS)} trainings = {len(all_cells(preset))} cells, {done} already done | "
        f"{preset.train_iters()} steps each | {how} | output {out}"
    )


def run(preset: Preset, out: str, save_weights: bool = False, cells: Optional[Sequence] = None,
        worker: Optional[str] = None) -> Optional[dict]:
    """Run the unfinished cells of ``preset`` (torchrun: data-parallel), then write the report and return
    it (on every rank).

    ``cells``/``worker``: this process is worker ``worker`` (``k/N``) of :func:`run_workers` and runs
    the given cells only; the parent writes the report, so a worker returns None.
    """
    from megatron_resonance.megatron import distributed
    from megatron_resonance.megatron.distributed import is_rank0, print_rank0

    check_output_dir(out, preset)
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
            _write_json_atomic(cell_path(out, task, seed, kind), record)
            if worker is None:
                write_report(out, preset)
        dist.barrier()
        print_rank0(f"{prefix} done in {record['train']['seconds'] + record['test_seconds']:.0f} s")
    if worker is not None:
        return None
    if is_rank0():
        run_info = {"wall_seconds": time.time() - wall, "cells_run": len(todo), "processes": dist.get_world_size(),
                    "threads_per_process": torch.get_num_threads(), "how": f"world size {dist.get_world_size()}"}
        write_report(out, preset, run_info if todo else None)
    dist.barrier()
    print_rank0(f"[posgen] {len(todo)} cell(s) run in {time.time() - wall:.0f} s; report in {out}/report.md")
    with open(os.path.join(out, "report.json")) as f:
        return json.load(f)


def threads_per_worker(workers: int) -> int:
    """CPU threads each of ``workers`` concurrent processes gets: the cores shared out, at least one."""
    return max(1, (os.cpu_count() or 1) // workers)


def run_workers(preset: Preset, out: str, workers: int, worker_argv) -> dict:
    """Run the unfinished cells in ``workers`` concurrent single-rank processes, then write the report.

    ``worker_argv(k, cells)`` is the command line of worker k (it calls :func:`run` with ``cells`` and
    ``worker``). Cells are dealt round-robin (they cost the same); each worker gets
    :func:`threads_per_worker` CPU threads, and on a GPU machine all of them share the one device. A worker
    that fails leaves the others running to the end; the finished cells are kept, so a rerun of the same
    command runs only what is missing. Raises RuntimeError naming the failed workers.
    """
    import signal

    todo = prepare_output(out, preset)
    threads = threads_per_worker(workers)
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
        procs = [subprocess.Popen(worker_argv(f"{k + 1}/{len(shares)}", share), env=env)
                 for k, share in enumerate(shares)]
        codes = [p.wait() for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.terminate()
                p.wait()
        signal.signal(signal.SIGTERM, previous)
    wall = time.time() - wall
    run_info = {"wall_seconds": wall, "cells_run": len(todo), "processes": len(shares),
                "threads_per_process": threads, "how": f"{len(shares)} worker processes"}
    report = write_report(out, preset, run_info if todo else None)
    failed = [f"worker {k + 1} (exit {c})" for k, c in enumerate(codes) if c]
    if failed:
        missing = [cell_name(c) for c in todo if not os.path.isfile(cell_path(out, *c))]
        raise RuntimeError(f"{', '.join(failed)} failed; {len(missing)} cell(s) not run: {' '.join(missing)}; "
                           "rerun the same command to run them")
    print(f"[posgen] {len(todo)} cell(s) run in {wall:.0f} s by {len(shares)} worker(s); report in "
          f"{out}/report.md", flush=True)
    return report


# ==========================================================================================================
# Report
# ==========================================================================================================


def _environment() -> dict:
    try:
        commit = subprocess.run(
            ["git", "describe", "--always", "--dirty"],
            cwd=os.path.dirname(os.path.abspath(__file__)),
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    if torch.cuda.is_available():
        hardware = torch.cuda.get_device_name()
    else:
        hardware = platform.processor() or platform.machine()
        try:
            with open("/proc/cpuinfo") as f:
                hardware = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
        except (OSError, StopIteration):
            pass
        hardware += f" ({os.cpu_count()} cores visible)"
    import megatron.core

    return {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "commit": commit or "unknown",
        "hardware": hardware,
        "torch": torch.__version__,
        "megatron_core": getattr(megatron.core, "__version__", "unknown"),
    }


PAIRS = (("resonance", "rope"), ("resonance_yarn", "yarn"))
"""The paired comparisons the report makes: (variant, baseline) with the same seed."""
METRICS = ("ood_accuracy", "id_accuracy")


def pair_name(pair) -> str:
    return f"{pair[0]} - {pair[1]}"


def build_report(out: str, preset: Preset) -> dict:
    """Aggregate the stored cells of ``preset``'s tasks and seeds (finished ones only).

    Per task and variant: ``{metric: summary}`` (mean ± std over seeds); per task and pair of
    :data:`PAIRS`: the paired per-seed difference with its 95 % interval; per task and variant the
    position curves' mean and std over seeds.
    """
    report = {
        "preset": preset.name,
        "settings": dataclasses.asdict(preset),
        "tasks": list(preset.tasks),
        "variants": list(VARIANTS),
        "seeds": list(range(preset.seeds)),
        **{metric: {} for metric in METRICS},
        "paired_difference": {metric: {} for metric in METRICS},
        "position_accuracy": {},
        "position_accuracy_std": {},
        "position_accuracy_runs": {},
        "cells": [],
    }
    for task in preset.tasks:
        by_seed = {metric: {v: {} for v in VARIANTS} for metric in METRICS}
        curves = {v: [] for v in VARIANTS}
        for seed in range(preset.seeds):
            for kind in TRAINED_KINDS:
                path = cell_path(out, task, seed, kind)
                if not os.path.isfile(path):
                    continue
                with open(path) as f:
                    cell = json.load(f)
                report["cells"].append(
                    {
                        "task": task,
                        "seed": seed,
                        "trained_as": kind,
                        "train_seconds": cell["train"]["seconds"],
                        "test_seconds": cell["test_seconds"],
                        "world_size": cell["world_size"],
                    }
                )
                for variant, result in cell["variants"].items():
                    for metric in METRICS:
                        by_seed[metric][variant][seed] = result[metric]
                    curves[variant].append(result["position_accuracy"])
        for metric in METRICS:
            report[metric][task] = {v: stats.summary(by_seed[metric][v]) for v in VARIANTS}
            report["paired_difference"][metric][task] = {
                pair_name(pair): stats.paired_difference(by_seed[metric][pair[0]], by_seed[metric][pair[1]])
                for pair in PAIRS
            }
        bands = {v: stats.band(curves[v]) if curves[v] else ([], []) for v in VARIANTS}
        report["position_accuracy"][task] = {v: bands[v][0] for v in VARIANTS}
        report["position_accuracy_std"][task] = {v: bands[v][1] for v in VARIANTS}
        report["position_accuracy_runs"][task] = curves
    report["complete"] = len(report["cells"]) == len(preset.tasks) * preset.seeds * len(TRAINED_KINDS)
    report["environment"] = _environment()
    return report


def _cell_text(summary: dict) -> str:
    if summary["mean"] is None:
        return "–"
    return f"{100 * summary['mean']:.1f} ± {100 * summary['std']:.1f}"


def _difference_text(d: dict) -> str:
    if d["mean"] is None:
        return "–"
    if d["ci"] is None:
        return f"{100 * d['mean']:+.1f} (1 seed)"
    return f"{100 * d['mean']:+.1f} [{100 * d['ci'][0]:+.1f}, {100 * d['ci'][1]:+.1f}]"


def write_report(out: str, preset: Preset, run_info: Optional[dict] = None) -> dict:
    """``report.json``, ``report.md`` and one ``position_<task>.png`` per task, from the stored cells.

    ``run_info``: the last command that ran cells (``wall_seconds``, ``cells_run``, ``processes``,
    ``threads_per_process``, ``how``); None keeps the one the previous report recorded.
    """
    report = build_report(out, preset)
    if run_info is None:
        try:
            with open(os.path.join(out, "report.json")) as f:
                run_info = json.load(f).get("last_run")
        except (OSError, ValueError):
            run_info = None
    report["last_run"] = run_info
    _write_json_atomic(os.path.join(out, "report.json"), report)
    plots = plot_positions(out, report)
    env, p = report["environment"], preset
    train_total = sum(c["train_seconds"] + c["test_seconds"] for c in report["cells"])
    lines = [
        f"# PosGen benchmark — preset `{preset.name}`",
        "",
        f"- date {env['date']}, commit `{env['commit']}`, torch {env['torch']}, megatron-core {env['megatron_core']}",
        f"- hardware: {env['hardware']}; data-parallel ranks per cell: "
        + ", ".join(sorted({str(c["world_size"]) for c in report["cells"]}) or ["–"]),
        f"- model: {p.num_layers} layers, d_model {p.hidden_size}, {p.num_attention_heads} heads x {p.head_dim}, "
        f"SwiGLU {p.ffn_hidden_size}, rotary base {p.rotary_base:g}; vocab 17 + BOS",
        f"- data: {p.train_sequences:,} / {p.validation_sequences:,} / {p.test_sequences:,} sequences, train "
        f"length {p.train_length}, test length {p.test_length}; YaRN s = {p.scaling_factor:g}",
        f"- training: {p.epochs:g} epochs = {p.train_iters():,} steps of {p.global_batch_size}, AdamW lr {p.lr:g} "
        f"wd {p.weight_decay:g}, {100 * p.warmup_fraction:g} % warm-up then cosine, {'bf16' if p.bf16 else 'fp32'}",
        f"- seeds: {p.seeds}; cells finished: {len(report['cells'])} of "
        f"{len(p.tasks) * p.seeds * len(TRAINED_KINDS)}; compute time {train_total / 60:.1f} min"
        + ("" if run_info is None else f"; the last command ran {run_info['cells_run']} cell(s) in "
           f"{run_info['wall_seconds'] / 60:.1f} min wall ({run_info['how']} x {run_info['threads_per_process']} "
           "thread(s))"),
        "",
        "Teacher-forced next-token accuracy (%), mean ± sample std over seeds. `yarn` / `resonance_yarn` are "
        "the `rope` / `resonance` models evaluated with YaRN (s = 4) applied at test time. Differences are "
        f"paired by seed (same initial weights and data order), in points, with a two-sided "
        f"{100 * stats.CONFIDENCE:g} % Student-t interval over seeds.",
        "",
    ]
    pairs = [pair_name(pair) for pair in PAIRS]
    for metric, title in (
        ("ood_accuracy", f"Out of distribution: positions {p.train_length}–{p.test_length - 1}"),
        ("id_accuracy", f"In distribution: positions {PREFIX_LENGTH}–{p.train_length - 1}"),
    ):
        columns = list(VARIANTS) + [f"{pair} [95 % CI]" for pair in pairs]
        lines += [f"## {title}", "", "| task | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
        for task in p.tasks:
            cells = [_cell_text(report[metric][task][v]) for v in VARIANTS]
            cells += [_difference_text(report["paired_difference"][metric][task][pair]) for pair in pairs]
            lines.append(f"| {task} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += ["## Accuracy by position (mean ± std over seeds, bins of 4 positions)", ""]
    lines += [f"![{task}]({os.path.basename(f)})" for task, f in plots.items()]
    lines += ["", "## Cells", "", "| task | seed | trained as | train s | test s |", "|---|---|---|---|---|"]
    for c in report["cells"]:
        lines.append(
            f"| {c['task']} | {c['seed']} | {c['trained_as']} | {c['train_seconds']:.0f} | {c['test_seconds']:.1f} |"
        )
    with open(os.path.join(out, "report.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    return report


PLOT_BIN = 4
"""Positions per plotted point. Bins of 4 start at the prefix end and meet the training length (a multiple
of 4) at a bin edge, and average out semi_recursive's even / odd alternation, which is unreadable raw."""


def binned(curve: Sequence[Optional[float]], width: int = PLOT_BIN):
    """(bin centres, bin means) of a per-position curve, skipping the seed prefix (None entries)."""
    xs, ys = [], []
    for start in range(PREFIX_LENGTH, len(curve), width):
        values = [a for a in curve[start : start + width] if a is not None]
        if values:
            xs.append(start + (min(width, len(curve) - start) - 1) / 2)
            ys.append(sum(values) / len(values))
    return xs, ys


def plot_positions(out: str, report: dict) -> Dict[str, str]:
    """One PNG per task with data: accuracy by position (bins of 4), one line per variant at the mean over
    seeds with a band of ± one std (each seed's curve binned first). The unbinned curves are
    ``report.json``'s ``position_accuracy`` / ``position_accuracy_runs``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train_length = report["settings"]["train_length"]
    written = {}
    for task, runs in report["position_accuracy_runs"].items():
        if not any(runs.values()):
            continue
        fig, ax = plt.subplots(figsize=(10, 4.5))
        for variant in VARIANTS:
            if not runs[variant]:
                continue
            binned_runs = [binned(curve) for curve in runs[variant]]
            xs = binned_runs[0][0]
            mean, std = stats.band([ys for _, ys in binned_runs])
            n = len(binned_runs)
            (line,) = ax.plot(xs, mean, label=f"{variant} ({n} seed{'s' * (n != 1)})", linewidth=1.5)
            if n > 1:
                ax.fill_between(xs, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)],
                                color=line.get_color(), alpha=0.15, linewidth=0)
        ax.axvline(train_length - 0.5, color="grey", linestyle="--", linewidth=1, label="training length")
        ax.axhline(1 / VOCAB_SIZE, color="grey", linestyle=":", linewidth=1, label="chance (1/17)")
        ax.set(
            xlabel="position l (prediction of x_l from x_<l)",
            ylabel=f"teacher-forced accuracy (bins of {PLOT_BIN})",
            title=f"PosGen {task} — preset {report['preset']}",
            ylim=(0, 1.02),
        )
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
        ax.grid(alpha=0.3)
        path = os.path.join(out, f"position_{task}.png")
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written[task] = path
    return written
