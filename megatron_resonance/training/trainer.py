"""The megatron-core training loop shared by pretraining and context extension.

Reads top to bottom in three phases, as megatron-core's ``run_simple_mcore_train_loop.py`` grown up;
:func:`run` is ``build`` then ``loop``:

* build  — distributed init, model (the provider's GPTModel chunks with our rotary) in megatron DDP,
  optimizer, scheduler, checkpoint (resume or finetune start), data (:func:`build`);
* step   — micro-batches through ``get_forward_backward_func`` (1F1B / interleaved pipeline schedules),
  per-token loss, gradient clipping and the optimizer step inside megatron's optimizer (:func:`train_step`);
* loop   — iterations with logging (console, TensorBoard, ``<save>/metrics.jsonl``), evaluation and
  periodic saves until ``--train-iters`` or a stop (:func:`_stop_reason`: SIGTERM/SIGUSR1 from Slurm's
  preemption, ``--exit-interval``); the state is saved where the loop ends (:func:`loop`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import os
import signal
import sys
import time
from typing import Any, Dict, Iterator, List, Optional

import torch
import torch.distributed as dist

from megatron_resonance import atomic
from megatron_resonance.megatron import checkpointing, cpu_speed, distributed
from megatron_resonance.megatron.distributed import print_rank0
from megatron_resonance.megatron.llama import build_model, for_training, resolve_spec
from megatron_resonance.training import flops, preemption
from megatron_resonance.training.config import Config, ConfigError, check, recompute_settings, warmup_iters

METRICS_FILE = "metrics.jsonl"


class TrainingError(Exception):
    """A run that must stop without saving (a non-finite loss, a failed save): one line, exit status 1."""


# ==========================================================================================================
# Validation: everything that can be checked before processes talk to each other
# ==========================================================================================================


def validate(cfg: Config, world_size: int) -> None:
    """Raise ConfigError with one clear line for a run that cannot start: the config's own rules
    (``config.check``), then what it names on disk (data, output directories, checkpoints)."""
    check(cfg, world_size)
    d = cfg.data
    if not d.mock_data:
        _check_dataset(cfg)
    from megatron_resonance.cli import UsageError, check_output_dir

    # where the run writes: checked here, before a worker starts or the model is built
    for flag, path in (("--save", cfg.checkpoint.save), ("--tensorboard-dir", cfg.logging.tensorboard_dir),
                       ("--data-cache-path", d.data_cache_path)):
        if path:
            try:
                check_output_dir(path, flag)
            except UsageError as e:
                raise ConfigError(str(e)) from None
    if cfg.checkpoint.save:
        _check_save_contents(cfg)
    if cfg.checkpoint.load and not _has_checkpoint(cfg.checkpoint.load):
        raise ConfigError(f"--load {cfg.checkpoint.load}: no checkpoint there")
    # A checkpoint whose tensors do not fit would fail deep inside dist_checkpointing, one traceback per rank.
    resume, _ = resume_checkpoint(cfg)
    if resume:  # resume: the run must be the same model
        _check_same_model(f"--save {cfg.checkpoint.save} holds a checkpoint of", resume, cfg, None)
    elif cfg.checkpoint.load:
        _check_same_model(f"--load {cfg.checkpoint.load} is", _load_source(cfg), cfg, _SHAPE_FIELDS)


def _check_save_contents(cfg: Config) -> None:
    """ConfigError naming the first entry of ``--save`` that the run writes into or replaces (the tracker, the
    lock, the metrics, the default TensorBoard directory) but cannot: another user's files in a shared
    directory, a read-only mount inside it. The directory itself is ``check_output_dir``'s."""
    save = cfg.checkpoint.save
    written = [checkpointing.TRACKER, checkpointing.LOCK_FILE, METRICS_FILE]
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
    from megatron_resonance.data.checks import DataError, check_training_data

    d = cfg.data
    try:
        check_training_data(
            d.data_path, d.valid_data_path, split=d.split, with_validation=cfg.training.eval_iters > 0,
            seq_length=d.seq_length, vocab_size=cfg.model.vocab_size, cache_dir=d.data_cache_path,
            fallback_cache_dir=_fallback_cache_dir(cfg), log=print_rank0,
        )  # fmt: skip
    except DataError as e:
        raise ConfigError(str(e)) from None


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


def _check_same_model(what: str, path: str, cfg: Config, fields: Optional[tuple]) -> None:
    """ConfigError naming the first differences between the stored model and ``cfg.model`` (in ``fields``,
    or all of them with the rope plan)."""
    stored, wanted = checkpointing.read_config(path)["model"], cfg.model.to_dict()
    differ = [k for k in (fields or wanted) if stored.get(k) != wanted[k]]
    if differ:
        shown = ", ".join(f"{k} {stored.get(k)} (this run: {wanted[k]})" for k in differ[:3])
        raise ConfigError(f"{what} another model: {shown}")


def _has_checkpoint(path: str) -> bool:
    try:
        checkpointing.resolve_checkpoint(path)
        return True
    except checkpointing.CheckpointError:
        return False


def resume_checkpoint(cfg: Config) -> tuple:
    """``(checkpoint, warning)``: the ``iter_*`` directory a run continues from when its own ``--save`` holds
    checkpoints (a requeued job), or ``(None, None)``. The checkpoint the tracker names when it is complete
    (:func:`checkpointing.verify_checkpoint`), else the newest complete one, with a one-line warning;
    CheckpointError when none is (:func:`checkpointing.newest_usable_checkpoint`): a run never starts over
    on top of checkpoints. Validation and :func:`run` both take the checkpoint from here."""
    save = cfg.checkpoint.save
    if not save or not os.path.isdir(save):
        return None, None
    return checkpointing.newest_usable_checkpoint(save)


def _load_source(cfg: Config) -> str:
    """The ``--load`` checkpoint directory, verified: ConfigError with one line when it is damaged (no
    fallback: the user named it)."""
    try:
        ckpt = checkpointing.resolve_checkpoint(cfg.checkpoint.load)
        checkpointing.verify_checkpoint(ckpt)
    except checkpointing.CheckpointError as e:
        raise ConfigError(f"--load {cfg.checkpoint.load}: {e}") from None
    return ckpt


# ==========================================================================================================
# Build
# ==========================================================================================================


@dataclasses.dataclass
class TrainState:
    """What, besides weights and optimizer, a resume needs: the step and the data position."""

    iteration: int = 0
    consumed_train_samples: int = 0


def resolve_and_validate(cfg: Config, world_size: int) -> None:
    """Take the vocabulary size from the tokenizer (when given), then ``validate``: what every start does."""
    _tokenizer_vocab(cfg)
    validate(cfg, world_size)
    checkpointing.check_save_dir_free(cfg.checkpoint.save)


def _tokenizer_vocab(cfg: Config) -> None:
    """The model's vocabulary: the tokenizer's, or, for a run that starts from a checkpoint (resume or
    ``--load``), the checkpoint's when the tokenizer fits in it: Hugging Face models often have more embedding
    rows than tokenizer ids (a DeepSeek or Qwen-style source), and those rows are part of the weights."""
    if not cfg.data.tokenizer_model:
        return
    tokenizer = load_data_tokenizer(cfg.data.tokenizer_model)
    cfg.model.vocab_size = tokenizer.vocab_size
    c = cfg.checkpoint
    source = resume_checkpoint(cfg)[0] or (_load_source(cfg) if c.load and _has_checkpoint(c.load) else None)
    if source is None:
        return
    stored = checkpointing.read_config(source)["model"].get("vocab_size")
    if stored is not None and stored > tokenizer.vocab_size:
        cfg.model.vocab_size = stored


def load_data_tokenizer(path: str):
    """The ``--tokenizer-model`` (SentencePiece or Hugging Face), which must have an EOS (the documents' end);
    ConfigError with one line otherwise. Loaded once per process (validation, then the datasets)."""
    from megatron_resonance.cli import UsageError
    from megatron_resonance.data.tokenizer import load_tokenizer

    try:
        tokenizer = load_tokenizer(path)
    except UsageError as e:
        raise ConfigError(str(e)) from None
    if tokenizer.eos_id is None:
        raise ConfigError(f"tokenizer {path} has no EOS token (the end-of-document id the datasets cut at)")
    return tokenizer


def _fallback_cache_dir(cfg: Config) -> Optional[str]:
    """Where the dataset caches go when the data's directory cannot be written: ``<save>/index-cache``."""
    return cfg.checkpoint.save and os.path.join(cfg.checkpoint.save, "index-cache")


def build_data(cfg: Config, train_samples: int, valid_samples: int):
    """megatron GPTDataset train/validation sets (MockGPTDataset with --mock-data).

    ``--data-path`` alone (one prefix or a blend) is split into train/validation by documents (``--split``,
    Megatron-LM's default 98,2,0); with ``--valid-data-path`` the two are used as they are."""
    from megatron_resonance.data.checks import path_items
    from megatron_resonance.data.datasets import build_gpt_datasets

    d = cfg.data
    if d.tokenizer_model:
        tok = load_data_tokenizer(d.tokenizer_model)
        tokenizer = dict(vocab_size=tok.vocab_size, eod_id=tok.eos_id, tokenizer_name=os.path.basename(tok.path))
    else:
        tokenizer = dict(vocab_size=cfg.model.vocab_size, eod_id=cfg.model.vocab_size - 1)
    if d.mock_data:
        source = dict(mock=True)
    elif d.valid_data_path:
        source = dict(train_data_prefix=path_items(d.data_path), valid_data_prefix=path_items(d.valid_data_path))
    else:
        source = dict(data_prefix=path_items(d.data_path), split=d.split)
    return build_gpt_datasets(
        seq_length=d.seq_length,
        seed=cfg.training.seed,
        train_samples=train_samples,
        valid_samples=valid_samples,
        cache_dir=d.data_cache_path,
        fallback_cache_dir=_fallback_cache_dir(cfg),
        reset_position_ids=d.reset_position_ids,
        reset_attention_mask=d.reset_attention_mask,
        eod_mask_loss=d.eod_mask_loss,
        **tokenizer,
        **source,
    )


def data_iterators(dataset, start_sample: int, micro_batch_size: int, num_chunks: int):
    """What megatron's schedules take as ``data_iterator``: one iterator, or with virtual pipelining one per
    model chunk (each chunk reads every micro-batch: the first takes its tokens, the last its labels)."""
    if num_chunks == 1:
        return micro_batches(dataset, start_sample, micro_batch_size)
    return [micro_batches(dataset, start_sample, micro_batch_size) for _ in range(num_chunks)]


def micro_batches(dataset, start_sample: int, micro_batch_size: int) -> Iterator[Dict[str, torch.Tensor]]:
    """Megatron-LM's pretraining sampler: global sample order, each DP rank takes its slice of every
    micro-batch round. Starting at ``start_sample`` makes resume continue exactly where it stopped.

    With ``--reset-attention-mask`` each batch also holds ``document_ids`` [b, s], every token's document
    (EODs before it), from which ``forward_step`` masks attention."""
    from megatron.core import parallel_state as ps

    from megatron_resonance.megatron.documents import document_ids_from_tokens

    dp_rank = ps.get_data_parallel_rank()
    dp_size = ps.get_data_parallel_world_size()
    config = getattr(dataset, "config", None)
    eod = config.tokenizer.eod if getattr(config, "reset_attention_mask", False) else None
    sample = start_sample
    while True:
        first = sample + dp_rank * micro_batch_size
        items = [dataset[(first + i) % len(dataset)] for i in range(micro_batch_size)]
        batch = {k: torch.stack([torch.as_tensor(it[k]) for it in items]) for k in items[0] if k != "attention_mask"}
        if eod is not None:
            batch["document_ids"] = document_ids_from_tokens(batch["tokens"], eod)
        yield batch
        sample += micro_batch_size * dp_size


def build_model_and_optimizer(cfg: Config, bf16: bool):
    """The model provider's chunks in the training wrapper (megatron DDP); megatron's optimizer (distributed
    unless ``--no-use-distributed-optimizer``); warm-up + decay scheduler."""
    from megatron.core.distributed.finalize_model_grads import finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    dtype = torch.bfloat16 if bf16 else torch.float32
    chunks = build_model(
        cfg.model,
        dtype=dtype,
        spec=cfg.parallel.transformer_impl,
        seq_length=cfg.data.seq_length,
        sequence_parallel=cfg.parallel.sequence_parallel,
        per_token_loss=True,
        recompute=recompute_settings(cfg.parallel),
    )
    tf_config = chunks[0].config
    o = cfg.optimizer
    chunks = for_training(chunks, use_distributed_optimizer=o.use_distributed_optimizer)
    optimizer = get_megatron_optimizer(
        OptimizerConfig(
            optimizer=o.optimizer,
            lr=o.lr,
            min_lr=o.min_lr,
            weight_decay=o.weight_decay,
            adam_beta1=o.adam_beta1,
            adam_beta2=o.adam_beta2,
            adam_eps=o.adam_eps,
            clip_grad=o.clip_grad,
            bf16=bf16,
            params_dtype=dtype,
            use_distributed_optimizer=o.use_distributed_optimizer,
        ),
        chunks,
    )
    gbs, iters = cfg.data.global_batch_size, cfg.training.train_iters
    warmup = warmup_iters(cfg)
    scheduler = OptimizerParamScheduler(
        optimizer,
        init_lr=0.0,
        max_lr=o.lr,
        min_lr=o.min_lr,
        lr_warmup_steps=warmup * gbs,
        lr_decay_steps=(o.lr_decay_iters or iters) * gbs,
        lr_decay_style=o.lr_decay_style,
        start_wd=o.weight_decay,
        end_wd=o.weight_decay,
        wd_incr_steps=iters * gbs,
        wd_incr_style="constant",
    )
    use_fused_torch_adam(optimizer)
    # megatron's schedules call these: DP gradient reduction (scaled by the global token count).
    tf_config.finalize_model_grads_func = finalize_model_grads
    tf_config.grad_scale_func = optimizer.scale_loss
    return chunks, optimizer, scheduler, tf_config


def use_fused_torch_adam(optimizer) -> None:
    """Run torch's Adam/AdamW, megatron's fallback without TE/Apex, with its fused kernel.

    megatron uses TE's or Apex's FusedAdam when one is installed (left alone here) and falls back to plain
    ``torch.optim.AdamW`` otherwise: ~10 ops per parameter on CPU, a multi-tensor ``foreach`` loop on
    CUDA. torch's fused kernel (CPU and CUDA) is the same update in one pass, and Hugging Face Trainer's
    default (``adamw_torch_fused``). Called after building and again after loading a checkpoint, whose
    param groups replace ours."""
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(opt, "optimizer", None)
        if type(inner) in (torch.optim.Adam, torch.optim.AdamW):
            for group in inner.param_groups:
                group["fused"], group["foreach"] = True, False
    checkpointing.place_adam_steps(optimizer)


def load_weights_only(path: str, chunks, optimizer) -> dict:
    """Load a checkpoint's model weights into a freshly built model and optimizer (finetuning).

    With bf16/fp16 the optimizer holds fp32 main copies of the weights, taken when it was built: they
    are refreshed from the loaded weights here, or the first step would write the random initialization
    back into the model (Megatron-LM's ``reload_model_params`` after a ``--finetune`` load)."""
    info = checkpointing.load_checkpoint(path, chunks)
    optimizer.reload_model_params()
    return info


# ==========================================================================================================
# Step
# ==========================================================================================================


def forward_step(
    data_iterator, model, cp_size: int = 1, sequence_parallel: bool = False, score_vocab: Optional[int] = None,
    reset_position_ids: bool = False,
):
    """One micro-batch: returns the per-token losses and the function megatron reduces them with.

    Training takes megatron's fused vocab-parallel cross entropy (over the padded vocabulary, as
    Megatron-LM). Evaluation (``score_vocab``: the real vocabulary size) scores the logits over the real
    vocabulary only, the evaluation tools' definition, so a checkpoint has one validation perplexity.

    Document masking goes to the model as ``packed_seq_params`` (:func:`document_layout`): the batch's
    ``document_ids`` (``--reset-attention-mask``) and, with ``reset_position_ids``, its position ids."""
    from megatron.core.utils import get_batch_on_this_cp_rank

    batch = next(data_iterator)
    if torch.cuda.is_available():
        batch = {k: v.cuda(non_blocking=True) for k, v in batch.items()}
    document_ids = batch.pop("document_ids", None)  # whole sequence: keys of every CP rank
    if cp_size > 1:
        batch = get_batch_on_this_cp_rank(batch)
    layout = document_layout(batch, document_ids, reset_position_ids, cp_size)
    # With cpu_speed on, the model runs without cpu_compat's device mode (a Python hook on every torch
    # call): megatron's forward allocates on the device only for context parallelism (rotary slicing) and
    # sequence parallelism (gather buffers), which keep it.
    device_free = cp_size == 1 and not sequence_parallel
    labels = None if score_vocab else batch["labels"]
    with cpu_speed.suspended() if device_free else contextlib.nullcontext():
        output = model(batch["tokens"], batch["position_ids"], None, labels=labels, packed_seq_params=layout)
    if score_vocab:
        return output, functools.partial(_real_vocab_loss, batch["labels"], batch["loss_mask"], score_vocab)
    return output, functools.partial(loss_func, batch["loss_mask"])


def document_layout(batch: Dict[str, torch.Tensor], document_ids: Optional[torch.Tensor], reset_position_ids: bool,
                    cp_size: int = 1):
    """The ``DocumentLayout`` of a micro-batch (this CP rank's part of it), or None without document masking:
    ``document_ids`` [b, S] of the whole sequence, this rank's ``position_ids`` when they restart per
    document, and under context parallelism the global index of this rank's tokens."""
    if document_ids is None and not reset_position_ids:
        return None
    from megatron.core import parallel_state as ps

    from megatron_resonance.megatron.documents import DocumentLayout, cp_query_index

    query_index = None
    if cp_size > 1 and document_ids is not None:
        query_index = cp_query_index(document_ids.shape[1], cp_size, ps.get_context_parallel_rank(),
                                     device=document_ids.device)
    length = batch["tokens"].shape[1] * cp_size
    return DocumentLayout(document_ids=document_ids, query_index=query_index, max_seqlen_q=length,
                          position_ids=batch["position_ids"] if reset_position_ids else None)


def _forward_step_func(cfg: Config, evaluation: bool = False):
    return functools.partial(
        forward_step,
        cp_size=cfg.parallel.context_parallel_size,
        sequence_parallel=cfg.parallel.sequence_parallel,
        score_vocab=cfg.model.vocab_size if evaluation else None,
        reset_position_ids=cfg.data.reset_position_ids,
    )


def _real_vocab_loss(labels: torch.Tensor, loss_mask: torch.Tensor, vocab_size: int, logits: torch.Tensor):
    """``loss_func`` of the logits' token losses over the real vocabulary (padding rows left out)."""
    from megatron_resonance.evaluation.scoring import megatron_logit_scores

    return loss_func(loss_mask, megatron_logit_scores(logits, labels, vocab_size).nll)


def loss_func(loss_mask: torch.Tensor, output: torch.Tensor):
    """Sum of masked token losses and the token count (megatron divides by the global count)."""
    losses = output.float().view(-1)
    mask = loss_mask.float().view(-1)
    loss = torch.sum(losses * mask)
    num_tokens = mask.sum().to(torch.int)
    reporting = torch.stack([loss.detach(), mask.sum().detach()])
    return loss, num_tokens, {"lm loss": reporting}


def reduce_loss(loss_dicts: List[Dict[str, torch.Tensor]]) -> Optional[float]:
    """Token-weighted mean loss over micro-batches and DP x CP ranks, known on every rank."""
    from megatron.core import parallel_state as ps

    total = torch.zeros(2, dtype=torch.float64)
    if ps.is_pipeline_last_stage(ignore_virtual=True) and ps.get_tensor_model_parallel_rank() == 0:
        for d in loss_dicts:
            total += d["lm loss"].detach().double().cpu()
    device = distributed.device()
    total = total.to(device)
    dist.all_reduce(total)  # only last-stage TP-rank-0 replicas contribute
    loss_sum, tokens = total.tolist()
    return loss_sum / tokens if tokens else None


def train_step(forward_backward, data_iterator, chunks, optimizer, scheduler, cfg: Config, num_microbatches: int):
    for c in chunks:
        c.zero_grad_buffer()
    optimizer.zero_grad()
    losses = forward_backward(
        forward_step_func=_forward_step_func(cfg),
        data_iterator=data_iterator,
        model=chunks,
        num_microbatches=num_microbatches,
        seq_length=cfg.data.seq_length,
        micro_batch_size=cfg.data.micro_batch_size,
        forward_only=False,
    )
    update_ok, grad_norm, _ = optimizer.step()
    if update_ok:
        scheduler.step(increment=cfg.data.global_batch_size)
    return reduce_loss(losses), grad_norm, update_ok


@torch.no_grad()
def evaluate(forward_backward, valid_dataset, chunks, cfg: Config, num_microbatches: int) -> Optional[float]:
    """Mean validation loss over ``eval_iters`` global batches (always the same batches), over the real
    vocabulary (``forward_step``'s ``score_vocab``)."""
    for c in chunks:
        c.eval()
    iterator = data_iterators(valid_dataset, 0, cfg.data.micro_batch_size, len(chunks))
    total = []
    for _ in range(cfg.training.eval_iters):
        total += forward_backward(
            forward_step_func=_forward_step_func(cfg, evaluation=True),
            data_iterator=iterator,
            model=chunks,
            num_microbatches=num_microbatches,
            seq_length=cfg.data.seq_length,
            micro_batch_size=cfg.data.micro_batch_size,
            forward_only=True,
        )
    for c in chunks:
        c.train()
    return reduce_loss(total)


# ==========================================================================================================
# Loop helpers: signals, metrics
# ==========================================================================================================


class SignalFlag:
    """SIGTERM/SIGUSR1, recorded from the process start (``preemption``); every rank learns of one at the same
    point through an all-reduce. A torchrun worker whose launcher died (SIGKILL) counts that as SIGTERM: it
    saves and exits instead of training on as an orphan next to a rerun."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.parent = os.getppid() if "TORCHELASTIC_RUN_ID" in os.environ else None
        if enabled:
            preemption.install()  # the entry points did already; keeps what they recorded
        else:
            for sig in preemption.SAVE_SIGNALS:
                signal.signal(sig, signal.SIG_DFL)
            if preemption.received() is not None:  # came before this run asked for the default
                os.kill(os.getpid(), preemption.received())

    @property
    def received(self) -> Optional[int]:
        if not self.enabled:
            return None
        if preemption.received() is None and self.parent is not None and os.getppid() != self.parent:
            return signal.SIGTERM
        return preemption.received()

    def what(self) -> str:
        """How the stop was asked for, on this rank (for the log line)."""
        return "the launcher is gone" if self.received is not None and preemption.received() is None else "received"

    def any_rank(self) -> bool:
        device = distributed.device()
        flag = torch.tensor([1 if self.received is not None else 0], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())


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


# ==========================================================================================================
# The run
# ==========================================================================================================


def run(cfg: Config) -> TrainState:
    """Train as configured: resume from ``<save>`` if it holds a checkpoint, else start from ``--load``
    (full state, or weights only with ``finetune``), else from scratch. Returns the final state."""
    resolve_and_validate(cfg, distributed.world_size_from_env())
    p = cfg.parallel
    distributed.initialize(
        p.tensor_model_parallel_size,
        p.pipeline_model_parallel_size,
        p.virtual_pipeline_model_parallel_size,
        p.context_parallel_size,
        seed=cfg.training.seed,
        timeout_minutes=p.distributed_timeout_minutes,
    )
    signals = SignalFlag(cfg.checkpoint.exit_on_signal)
    try:
        with checkpointing.hold_save_dir(cfg.checkpoint.save):
            if signals.any_rank():  # nothing trained yet: nothing to save
                print_rank0("[signal] received before training started: nothing new to save, exiting")
                return TrainState()
            job = build(cfg)
            if signals.any_rank():  # during the build: the checkpoint loaded is still the latest
                print_rank0(
                    f"[signal] received before iteration {job.state.iteration + 1}: nothing new to save, exiting"
                )
                return job.state
            return loop(cfg, job, signals)
    except RuntimeError as e:
        if "Timed out" not in str(e) and "timed out" not in str(e):  # gloo's and NCCL's collective timeouts
            raise
        raise TrainingError(
            f"a collective waited longer than --distributed-timeout-minutes {p.distributed_timeout_minutes:g} for "
            f"another rank (hung, stopped or gone): stopped without saving; {latest_note(cfg.checkpoint.save)}"
        ) from None


@dataclasses.dataclass
class Job:
    """What :func:`build` makes and :func:`loop` trains: the model chunks (in megatron DDP), optimizer,
    scheduler, the state to continue from, the data and the schedule's function."""

    chunks: list
    optimizer: Any
    scheduler: Any
    state: TrainState
    last_saved: Optional[int]
    """The iteration whose checkpoint ``--save`` holds already (a resumed run), else None."""
    train_iterator: Any
    valid_dataset: Any
    forward_backward: Any
    num_microbatches: int

    def save(self, cfg: Config) -> None:
        """Checkpoint the current state to ``--save`` (if given); TrainingError with one line if it fails."""
        save = cfg.checkpoint.save
        if not save or self.last_saved == self.state.iteration:
            return
        try:
            checkpointing.save_checkpoint(
                save,
                self.state.iteration,
                self.chunks,
                cfg.model,
                optimizer=self.optimizer,
                scheduler=self.scheduler,
                run_config={**cfg.to_dict(), "world_size": dist.get_world_size()},
                train_state=dataclasses.asdict(self.state),
            )
        except checkpointing.CheckpointError as e:
            raise TrainingError(f"{e}; {latest_note(save)}") from None
        self.last_saved = iteration = self.state.iteration
        print_rank0(f"[save] iteration {iteration} -> {checkpointing.iteration_dir(save, iteration)}")


def build(cfg: Config) -> Job:
    """Model, optimizer and scheduler; the checkpoint to continue from; the data (process groups exist)."""
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    p = cfg.parallel
    bf16 = cfg.training.bf16 if cfg.training.bf16 is not None else torch.cuda.is_available()
    dp = ps.get_data_parallel_world_size()
    num_microbatches = cfg.data.global_batch_size // (cfg.data.micro_batch_size * dp)
    print_rank0(
        f"[build] world={dist.get_world_size()} TP={p.tensor_model_parallel_size} "
        f"PP={p.pipeline_model_parallel_size} VPP={p.virtual_pipeline_model_parallel_size or 1} "
        f"CP={p.context_parallel_size} DP={dp} micro-batches={num_microbatches} "
        f"dtype={'bf16' if bf16 else 'fp32'} spec={resolve_spec(p.transformer_impl)} rope={cfg.model.rope.kind}"
        + ("" if torch.cuda.is_available()
           else f" cpu_speed={'on' if cpu_speed.is_enabled() else 'off'} threads={torch.get_num_threads()}")
    )

    # ---------------------------------------------------------------- build: model, optimizer, scheduler
    chunks, optimizer, scheduler, _ = build_model_and_optimizer(cfg, bf16)
    n_params = sum(prm.numel() for c in chunks for prm in c.parameters())
    print_rank0(f"[build] parameters on rank 0: {n_params / 1e6:.2f} M")

    # ---------------------------------------------------------------- build: checkpoint
    state = TrainState()
    save = cfg.checkpoint.save
    # our own run was interrupted: continue it (Slurm requeue), from the newest complete checkpoint
    resume_from, warning = resume_checkpoint(cfg)
    own = resume_from is not None
    if warning:
        print_rank0(warning, file=sys.stderr)
    if not own and cfg.checkpoint.load and not cfg.checkpoint.finetune:
        resume_from = cfg.checkpoint.load
    if resume_from:
        info = checkpointing.load_checkpoint(resume_from, chunks, optimizer=optimizer, scheduler=scheduler)
        use_fused_torch_adam(optimizer)
        state = TrainState(**(info["train_state"] or {"iteration": info["iteration"]}))
        print_rank0(f"[build] resumed from {info['path']} at iteration {state.iteration}")
    elif cfg.checkpoint.load:
        info = load_weights_only(cfg.checkpoint.load, chunks, optimizer)
        print_rank0(f"[build] loaded model weights from {info['path']} (finetune: fresh optimizer and count)")
    if cfg.checkpoint.load and save and not own and distributed.is_rank0():
        # the source's Hugging Face files (tokenizer, token ids) go on with the weights trained from them
        from megatron_resonance.hf import assets as hf_assets

        kept = hf_assets.carry_assets(cfg.checkpoint.load, info["path"], save)
        if kept:
            print_rank0(f"[build] kept the source's Hugging Face files (tokenizer, config) in {kept}")

    # ---------------------------------------------------------------- build: data
    iters = cfg.training.train_iters
    gbs = cfg.data.global_batch_size
    valid_samples = gbs * cfg.training.eval_iters * (iters // max(cfg.training.eval_interval, 1) + 1)
    train_ds, valid_ds = build_data(cfg, train_samples=iters * gbs, valid_samples=valid_samples)
    _log_documents(cfg, train_ds, state.consumed_train_samples)
    train_iterator = data_iterators(train_ds, state.consumed_train_samples, cfg.data.micro_batch_size, len(chunks))
    if save and distributed.is_rank0():
        os.makedirs(save, exist_ok=True)
    return Job(chunks, optimizer, scheduler, state, state.iteration if resume_from else None, train_iterator,
               valid_ds, get_forward_backward_func(), num_microbatches)


def _log_documents(cfg: Config, dataset, sample: int) -> None:
    """With document flags, one line on rank 0 about the first sample this run trains on: its documents'
    lengths, where positions restart, the EOD tokens out of the loss."""
    d = cfg.data
    flags = [f"--{n.replace('_', '-')}" for n in ("reset_position_ids", "reset_attention_mask", "eod_mask_loss")
             if getattr(d, n)]
    if not flags or not distributed.is_rank0():
        return
    item = dataset[sample % len(dataset)]
    eod = dataset.config.tokenizer.eod
    tokens, positions = torch.as_tensor(item["tokens"]), torch.as_tensor(item["position_ids"])
    ends = (torch.nonzero(tokens == eod).flatten() + 1).tolist()
    lengths = [b - a for a, b in zip([0, *ends], [*ends, len(tokens)]) if b > a]
    restarts = torch.nonzero(positions[1:] == 0).flatten().add(1).tolist()
    print_rank0(
        f"[data] documents ({' '.join(flags)}; EOD id {eod}): sample {sample} holds {len(lengths)} "
        f"(lengths {lengths}), positions restart at {restarts}, "
        f"{int((torch.as_tensor(item['loss_mask']) == 0).sum())} tokens out of the loss"
    )


def loop(cfg: Config, job: Job, signals: SignalFlag) -> TrainState:
    """Steps until ``--train-iters`` or a stop (a signal, ``--exit-interval``), with logging, evaluation and
    periodic saves; the state is saved where the loop ends. Returns the final state."""
    state, iters, gbs = job.state, cfg.training.train_iters, cfg.data.global_batch_size
    metrics = MetricsLog(cfg, state.iteration)
    flops_per_token = flops.training_flops_per_token(cfg.model, cfg.data.seq_length)
    peak = flops.peak_tflops()
    window_loss, window_steps, window_time = 0.0, 0, 0.0
    while state.iteration < iters:
        # ------------------------------------------------------------ step
        step_start = time.perf_counter()
        loss, grad_norm, update_ok = train_step(
            job.forward_backward, job.train_iterator, job.chunks, job.optimizer, job.scheduler, cfg,
            job.num_microbatches,
        )
        window_time += time.perf_counter() - step_start
        poison = _non_finite(loss, grad_norm if update_ok else None)
        if poison:
            raise TrainingError(
                f"{poison} at iteration {state.iteration + 1}: stopped without saving"
                + (f"; {latest_note(cfg.checkpoint.save)}" if cfg.checkpoint.save else "")
            )
        state.iteration += 1
        state.consumed_train_samples += gbs
        window_loss += loss
        window_steps += 1

        # ------------------------------------------------------------ log, evaluate
        if state.iteration % cfg.logging.log_interval == 0 or state.iteration == iters:
            tokens_per_s = window_steps * gbs * cfg.data.seq_length / window_time
            record = {
                "iteration": state.iteration,
                "loss": window_loss / window_steps,
                "lr": job.scheduler.get_lr(job.optimizer.param_groups[0]),
                "grad_norm": float(grad_norm) if grad_norm is not None else None,
                "tokens_per_s": tokens_per_s,
                "consumed_samples": state.consumed_train_samples,
            }
            line = (
                f"[train] iter {state.iteration:>6}/{iters} | loss {record['loss']:.4f} | lr {record['lr']:.3e} | "
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
            print_rank0(line)
            metrics.write(record)
            window_loss, window_steps, window_time = 0.0, 0, 0.0
        if cfg.training.eval_interval and state.iteration % cfg.training.eval_interval == 0:
            _log_eval(job, cfg, metrics)

        # ------------------------------------------------------------ stop or save
        stop = _stop_reason(cfg, state, signals)
        if stop:
            print_rank0(stop)
            break
        if cfg.checkpoint.save_interval and state.iteration % cfg.checkpoint.save_interval == 0:
            job.save(cfg)
    else:  # trained to --train-iters: a last evaluation unless one just ran
        if not cfg.training.eval_interval or iters % cfg.training.eval_interval:
            _log_eval(job, cfg, metrics)
    job.save(cfg)
    metrics.close()
    return state


def _stop_reason(cfg: Config, state: TrainState, signals: SignalFlag) -> Optional[str]:
    """The one place that decides to stop before ``--train-iters``: the line to print, or None to go on."""
    if signals.any_rank():
        return f"[signal] {signals.what()} at iteration {state.iteration}: saving and exiting"
    interval = cfg.training.exit_interval
    if interval and state.iteration % interval == 0 and state.iteration < cfg.training.train_iters:
        return f"[exit] --exit-interval {interval} reached at iteration {state.iteration}"
    return None


def _non_finite(loss: Optional[float], grad_norm) -> Optional[str]:
    """What is not finite of a step's loss and gradient norm (None: both fine). Checked before anything is
    logged or saved, as Megatron-LM's ``check_for_nan_in_loss_and_grad``."""
    if loss is not None and not math.isfinite(loss):
        return f"non-finite loss ({loss})"
    if grad_norm is not None and not math.isfinite(float(grad_norm)):
        return f"non-finite gradient norm ({float(grad_norm)})"
    return None


def latest_note(save: Optional[str]) -> str:
    """What stays of a run that stops without saving: the latest checkpoint in ``save``."""
    if not save:
        return "nothing to keep (no --save)"
    iteration = checkpointing.read_latest_iteration(save)
    if iteration is None:
        return f"{save} holds no checkpoint yet"
    return f"the latest checkpoint in {save} is still iteration {iteration}"


def _log_eval(job: Job, cfg: Config, metrics: MetricsLog) -> None:
    if cfg.training.eval_iters <= 0:
        return
    loss = evaluate(job.forward_backward, job.valid_dataset, job.chunks, cfg, job.num_microbatches)
    if loss is None:
        return
    ppl = math.exp(min(loss, 50))
    print_rank0(f"[eval]  iter {job.state.iteration:>6} | validation loss {loss:.4f} | perplexity {ppl:.2f}")
    metrics.write({"iteration": job.state.iteration, "eval_loss": loss, "eval_perplexity": ppl})
