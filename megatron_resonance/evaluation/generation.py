"""Greedy decoding with a KV cache: Megatron GPTModel chunks through megatron-core's static inference, Hugging
Face models through transformers' ``generate``.

``greedy(decoder, prompts, max_new_tokens=..., vocab_size=...)`` checks the prompts, decodes prompts of
equal length together (up to ``max_batch_size`` rows) with one backend's batch decoder and returns, per
prompt, only the new tokens: at most ``max_new_tokens``, ending with the first id of ``stop_ids`` when one
is generated (the stop id is kept as the last token).

``megatron_decoder(model_chunks)`` runs megatron-core's own inference machinery: a
``StaticInferenceContext`` (the per-layer key/value cache that megatron's ``Attention`` fills and reads,
and the sequence offset that slices the rotary angles of each decode step) driven by
``GPTInferenceWrapper`` (the forward with ``inference_context``, the hand-over of hidden states between
pipeline stages). One forward over the prompt fills the cache, then one forward per new token.
Any TP and PP; the arg-max is over the real vocabulary (``scoring.real_vocabulary``: TP padding rows of
the embedding table are never chosen), so a Megatron checkpoint and its Hugging Face export decode alike.

``hf_decoder(model)`` is ``model.generate(do_sample=False)`` with transformers' own cache.

Context parallelism (CP > 1) is refused with a ``UserError``: megatron's static inference feeds the
model whole sequences and single decode tokens, while our context-parallel attention needs each CP rank's
load-balanced half-chunks of one sequence. Virtual pipeline stages are refused too (megatron's inference
wrapper runs one model chunk per rank). Data-parallel replicas decode independently: give each its own
prompts, or every replica decodes all of them.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Callable, Dict, List, Sequence

import torch
import torch.distributed as dist

from megatron_resonance.errors import UserError
from megatron_resonance.evaluation.scoring import real_vocabulary
from megatron_resonance.megatron import cpu_speed
from megatron_resonance.megatron.distributed import device as rank_device

# megatron.core (seconds to import) is imported inside the functions that use it, and transformers (the optional
# ``hf`` extra) where a Hugging Face model decodes: the evaluation tools' --help and input checks run without them.


def check_prompts(prompts: Sequence[Sequence[int]], max_new_tokens: int, vocab_size: int) -> List[List[int]]:
    """The prompts as lists of ints; one ``UserError`` line for an empty prompt, an id outside the real
    vocabulary or a negative ``max_new_tokens``."""
    if max_new_tokens < 0:
        raise UserError(f"max_new_tokens {max_new_tokens}: must be >= 0")
    checked = []
    for i, prompt in enumerate(prompts):
        ids = [int(t) for t in prompt]
        if not ids:
            raise UserError(f"prompt {i} is empty: generation needs at least one token")
        if min(ids) < 0 or max(ids) >= vocab_size:
            raise UserError(f"prompt {i} has token ids outside the vocabulary 0..{vocab_size - 1}")
        checked.append(ids)
    return checked


def cut_at_stop(tokens: Sequence[int], stop_ids: Sequence[int]) -> List[int]:
    """``tokens`` up to and including the first id in ``stop_ids`` (all of them when none occurs)."""
    stops = set(stop_ids)
    for i, t in enumerate(tokens):
        if t in stops:
            return list(tokens[: i + 1])
    return list(tokens)


def _batches(prompts: List[List[int]], max_batch_size: int) -> List[List[int]]:
    """Indices of the prompts in batches of equal length (no padding), at most ``max_batch_size`` each."""
    by_length: Dict[int, List[int]] = {}
    for i, p in enumerate(prompts):
        by_length.setdefault(len(p), []).append(i)
    return [rows[j : j + max_batch_size] for rows in by_length.values() for j in range(0, len(rows), max_batch_size)]


#: one backend's greedy decoding of a batch: ``(tokens [B, L] of one length, max_new_tokens, vocab_size,
#: stop_ids) -> [B] lists of max_new_tokens new tokens`` (fewer when every row has generated a stop id)
BatchDecoder = Callable[[torch.Tensor, int, int, Sequence[int]], List[List[int]]]


def greedy(
    decoder: BatchDecoder,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    vocab_size: int,
    stop_ids: Sequence[int] = (),
    max_batch_size: int = 8,
) -> List[List[int]]:
    """Greedy continuations of ``prompts`` by ``decoder`` (``megatron_decoder``, ``hf_decoder``): per prompt,
    the new tokens only, cut after the first stop id (which is kept). ``vocab_size`` is the real vocabulary.
    """
    checked = check_prompts(prompts, max_new_tokens, vocab_size)
    results: List[List[int]] = [[] for _ in checked]
    if max_new_tokens == 0:
        return results
    for rows in _batches(checked, max(1, max_batch_size)):
        tokens = torch.tensor([checked[i] for i in rows], dtype=torch.long)
        for i, new in zip(rows, decoder(tokens, max_new_tokens, vocab_size, stop_ids)):
            results[i] = cut_at_stop(new, stop_ids)
    return results


# ----------------------------------------------------------------------------------------------------------
# Megatron: megatron-core's static inference context and GPT inference wrapper
# ----------------------------------------------------------------------------------------------------------


def megatron_decoder(model_chunks: List[torch.nn.Module]) -> BatchDecoder:
    """``greedy``'s decoder for Megatron GPTModel chunks built for this rank (in eval mode).

    Collective over the model-parallel group: every TP and PP rank decodes the same prompts and gets the
    same tokens (the last pipeline stage chooses each token and broadcasts it).
    """
    from megatron.core import parallel_state as ps

    if ps.get_context_parallel_world_size() > 1:
        raise UserError(
            "generation runs at context-parallel-size 1 (megatron's static inference decodes "
            "whole sequences on one rank); use TP or PP to split the model"
        )
    if len(model_chunks) != 1:
        raise UserError(
            "generation runs without virtual pipeline stages (megatron's inference wrapper "
            "takes one model chunk per rank)"
        )
    return functools.partial(_megatron_batch, model_chunks[0])


@torch.inference_mode()
def _megatron_batch(
    model: torch.nn.Module, prompts: torch.Tensor, max_new_tokens: int, vocab_size: int, stop_ids: Sequence[int]
) -> List[List[int]]:
    """[B, L] prompts of one length -> [B] lists of ``max_new_tokens`` greedy tokens (fewer when every row
    has generated a stop id)."""
    from megatron.core import parallel_state as ps
    from megatron.core.inference.contexts import StaticInferenceContext
    from megatron.core.inference.model_inference_wrappers.gpt.gpt_inference_wrapper import GPTInferenceWrapper
    from megatron.core.inference.model_inference_wrappers.inference_wrapper_config import InferenceWrapperConfig

    from megatron_resonance.megatron.rotary import unwrap

    device = rank_device()
    rows, length = prompts.shape
    total = length + max_new_tokens
    config = model.config
    context = StaticInferenceContext(max_batch_size=rows, max_sequence_length=total)
    wrapper = GPTInferenceWrapper(
        model,
        InferenceWrapperConfig(
            hidden_size=config.hidden_size,
            params_dtype=config.params_dtype,
            # -1: every step is one forward of the whole batch (no micro-batches through the pipeline)
            inference_batch_times_seqlen_threshold=-1,
            padded_vocab_size=unwrap(model).vocab_size,
            inference_max_requests=rows,
            inference_max_seq_length=total,
        ),
        context,
    )
    wrapper.prep_model_for_inference()  # eval mode, an empty cache at offset 0
    sequence = torch.zeros(rows, total, dtype=torch.long, device=device)
    sequence[:, :length] = prompts.to(device)
    inputs = wrapper.prep_inference_input(sequence)
    pipeline = ps.get_pipeline_model_parallel_world_size() > 1
    stops = torch.tensor(list(stop_ids), dtype=torch.long, device=device)
    stopped = torch.zeros(rows, dtype=torch.bool, device=device)
    start, end = 0, length
    while end < total:
        # the prompt, then each generated token: the cache holds every earlier position's keys and values.
        # A decode step without pipeline stages makes no device call (the prompt's step allocates the cache,
        # a pipeline step its receive buffer): it runs outside cpu_compat's per-call device hook.
        lean = context.is_decode_only() and not pipeline
        with cpu_speed.suspended() if lean else contextlib.nullcontext():
            logits = wrapper.run_one_forward_step(wrapper.get_batch_for_context_window(inputs, start, end))
        context.enable_decode_mode()
        chosen = torch.empty(rows, dtype=torch.long, device=device)
        if ps.is_pipeline_last_stage(ignore_virtual=True):  # logits [B, 1, V] of the last position, all TP ranks
            chosen.copy_(real_vocabulary(logits[:, -1].float(), vocab_size).argmax(dim=-1))
        if pipeline:
            dist.broadcast(
                chosen, src=ps.get_pipeline_model_parallel_last_rank(), group=ps.get_pipeline_model_parallel_group()
            )
        sequence[:, end] = chosen
        start, end = end, end + 1
        stopped |= torch.isin(chosen, stops)
        if bool(stopped.all()):
            break
    return sequence[:, length:end].cpu().tolist()


# ----------------------------------------------------------------------------------------------------------
# Hugging Face: transformers' generate
# ----------------------------------------------------------------------------------------------------------


def hf_decoder(model: torch.nn.Module) -> BatchDecoder:
    """``greedy``'s decoder for a Hugging Face causal LM: ``model.generate(do_sample=False)`` with its KV cache,
    the arg-max over the real vocabulary (ids from ``vocab_size`` up suppressed), no stopping but at
    ``stop_ids`` (the model's own ``eos_token_id`` does not apply)."""
    return functools.partial(_hf_batch, model)


def _hf_batch(
    model: torch.nn.Module, prompts: torch.Tensor, max_new_tokens: int, vocab_size: int, stop_ids: Sequence[int]
) -> List[List[int]]:
    import transformers

    device = next(model.parameters()).device
    settings = transformers.GenerationConfig(
        do_sample=False,
        num_beams=1,
        max_new_tokens=max_new_tokens,
        min_new_tokens=0,
        eos_token_id=list(stop_ids) or None,
        pad_token_id=(list(stop_ids) or [0])[0],
    )
    processors = transformers.LogitsProcessorList([_RealVocabulary(vocab_size)])
    own = model.generation_config
    # generate fills what ``settings`` leaves unset (eos_token_id without stop ids) from the model's own
    # generation config: a blank one in its place keeps the model's eos and sampling defaults out
    model.generation_config = transformers.GenerationConfig()
    try:
        ids = prompts.to(device)
        with torch.no_grad():
            out = model.generate(
                ids, attention_mask=torch.ones_like(ids), generation_config=settings, logits_processor=processors
            )
    finally:
        model.generation_config = own
    return out[:, ids.shape[1] :].cpu().tolist()


class _RealVocabulary:
    """transformers logits processor: ids at or above ``vocab_size`` are never chosen."""

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        return real_vocabulary(scores, self.vocab_size)
