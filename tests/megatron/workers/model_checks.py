"""Worker: single-process checks of the Megatron integration that need megatron's global state.

``cpu_compat`` (a process-wide TorchFunctionMode and patched ``torch.cuda``), ``cpu_speed``'s patches of
megatron and ``parallel_state`` must not leak into the pytest process, so these checks run here, once,
under ``torchrun --nproc-per-node 1`` (``cpu_speed`` on, the default; checks that switch it off switch it
back on)::

    torchrun --nproc-per-node 1 tests/megatron/workers/model_checks.py OUT_DIR

Each check returns a dict of measurements; an exception is recorded as ``{"error": traceback}`` so that
one broken check fails one test. Results go to ``OUT_DIR/results.json``; the assertions live in the tests.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import traceback
from unittest import mock

import torch

SEQ = 64


def tiny_config(kind: str = "rope"):
    from megatron_resonance.megatron.llama import LlamaConfig
    from megatron_resonance.rope import RopeConfig

    rope = RopeConfig(kind=kind, head_dim=32)
    if kind != "rope":
        rope = RopeConfig(kind=kind, head_dim=32, factor=4.0, original_max_position=32)
    return LlamaConfig(
        num_layers=2,
        hidden_size=128,
        ffn_hidden_size=256,
        num_attention_heads=4,
        num_query_groups=2,
        vocab_size=256,
        max_position_embeddings=SEQ,
        rope=rope,
    )


def check_sdpa_matches_local_attention():
    """SDPAAttention == megatron's DotProductAttention: GQA (4 heads, 2 groups), custom scale, fwd + bwd."""
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnMaskType

    from megatron_resonance.megatron.llama import transformer_config
    from megatron_resonance.megatron.sdpa_attention import SDPAAttention

    config = transformer_config(tiny_config())
    scale = 0.3  # not 1/sqrt(32): a custom softmax_scale must be honoured
    s, b, heads, groups, hd = 24, 2, 4, 2, 32
    g = torch.Generator().manual_seed(1)
    q0, k0, v0 = (torch.randn(s, b, n, hd, generator=g) for n in (heads, groups, groups))
    causal = torch.triu(torch.ones(s, s, dtype=torch.bool), 1)
    padding = torch.zeros(b, 1, s, s, dtype=torch.bool)
    padding[1, :, :, -5:] = True  # second sequence: last 5 keys masked (True = masked, megatron's convention)
    masks = {"causal_no_mask": None, "explicit_causal_and_padding": causal[None, None] | padding}
    out = {}
    outputs = []
    for mask_name, mask in masks.items():
        results = []
        for cls in (DotProductAttention, SDPAAttention):
            attn = cls(
                config, layer_number=1, attn_mask_type=AttnMaskType.causal, attention_type="self", softmax_scale=scale
            )
            q, k, v = (t.clone().requires_grad_() for t in (q0, k0, v0))
            ctx = attn(q, k, v, mask)
            (ctx * torch.linspace(-1, 1, ctx.numel()).view_as(ctx)).sum().backward()
            results.append((ctx.detach(), q.grad, k.grad, v.grad, attn.softmax_scale))
        (ref, *ref_grads, ref_scale), (got, *got_grads, got_scale) = results
        outputs.append(got)
        out[mask_name] = {
            "shape": list(got.shape),
            "ref_shape": list(ref.shape),
            "scales": [ref_scale, got_scale],
            "forward": (got - ref).abs().max().item() / ref.abs().max().item(),
            "grads": [(a - r).abs().max().item() / r.abs().max().item() for a, r in zip(got_grads, ref_grads)],
        }
    out["padding_changes_output"] = (outputs[1] - outputs[0]).abs().max().item()
    return out


def check_install_rotary_scale():
    """``config.softmax_scale`` and every core attention's scale after building / re-installing."""
    from megatron_resonance.megatron import llama
    from megatron_resonance.megatron.rotary import install_rotary

    out = {}
    for kind in ("rope", "yarn", "resonance_yarn"):
        cfg = tiny_config(kind)
        built = llama.build_model(cfg, seq_length=SEQ)[0]
        swapped = llama.build_model(tiny_config("rope"), seq_length=SEQ)[0]
        install_rotary([swapped], cfg.rope)
        out[kind] = {
            name: {
                "config_softmax_scale": model.config.softmax_scale,
                "core_attention_scales": sorted(
                    {layer.self_attention.core_attention.softmax_scale for layer in model.decoder.layers}
                ),
                "rotary_kind": model.rotary_pos_emb.rope.kind,
            }
            for name, model in (("built", built), ("installed_after_rope", swapped))
        }
    return out


class _FakeCPGroup:
    """What megatron's rotary forward asks of a context-parallel group: size() and rank()."""

    def __init__(self, size, rank):
        self._size, self._rank = size, rank

    def size(self):
        return self._size

    def rank(self):
        return self._rank


def check_context_parallel_slicing():
    """Our module goes through megatron's own CP slicing (chunks r and 2*cp-1-r of the sequence)."""
    from megatron.core.models.common.embeddings.rope_utils import get_pos_emb_on_this_cp_rank

    from megatron_resonance.megatron.rotary import ResonanceRotaryEmbedding

    rotary = ResonanceRotaryEmbedding(tiny_config("resonance_yarn").rope)
    full = rotary.get_emb(SEQ)
    out = {}
    cp = 2
    for rank in range(cp):
        group = _FakeCPGroup(cp, rank)
        sliced = rotary(SEQ, cp_group=group)
        chunk = SEQ // (2 * cp)
        expected = torch.cat(
            [full[rank * chunk : (rank + 1) * chunk], full[(2 * cp - 1 - rank) * chunk : (2 * cp - rank) * chunk]]
        )
        out[f"rank{rank}"] = {
            "shape": list(sliced.shape),
            "equals_megatron_slicing": bool(torch.equal(sliced, get_pos_emb_on_this_cp_rank(full, 0, group))),
            "equals_expected_chunks": bool(torch.equal(sliced, expected)),
            "packed_seq_unsliced": bool(torch.equal(rotary(SEQ, packed_seq=True, cp_group=group), full)),
        }
    return out


def check_rope_swap_changes_logits():
    """Same weights: rope vs resonance_yarn logits differ; re-installing rope restores them exactly;
    our rope equals megatron's stock RotaryEmbedding."""
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

    from megatron_resonance.megatron import llama
    from megatron_resonance.megatron.rotary import install_rotary, set_softmax_scale

    cfg = tiny_config("rope")
    model = llama.build_model(cfg, seq_length=SEQ)[0].eval()
    tokens = torch.randint(0, cfg.vocab_size, (2, SEQ), generator=torch.Generator().manual_seed(2))
    positions = torch.arange(SEQ)[None].expand(2, -1)

    def logits():
        with torch.no_grad():
            return model(tokens, positions, None)[..., : cfg.vocab_size].clone()

    rope_logits = logits()
    yarn_rope = tiny_config("resonance_yarn").rope
    install_rotary([model], yarn_rope)
    yarn_logits = logits()
    install_rotary([model], cfg.rope)
    back_logits = logits()
    # megatron's own module (no softmax-scale change for plain rope)
    model.rotary_pos_emb = RotaryEmbedding(
        kv_channels=cfg.head_dim, rotary_percent=1.0, rotary_base=int(cfg.rope.base), use_cpu_initialization=True
    )
    set_softmax_scale(model, None)
    stock_logits = logits()
    return {
        "rope_vs_resonance_yarn_max_abs": (yarn_logits - rope_logits).abs().max().item(),
        "logits_max_abs": rope_logits.abs().max().item(),
        "reinstalled_rope_equal": bool(torch.equal(back_logits, rope_logits)),
        "ours_vs_megatron_stock_rope_max_abs": (stock_logits - rope_logits).abs().max().item(),
    }


def check_one_rank_collectives():
    """Collectives over this one-rank world run in place of gloo (results, async handles, coalescing);
    without the device mode, or with ``cpu_speed`` off, they go through gloo.

    The default group's sequence number counts the collectives that reached gloo."""
    import torch.distributed as dist

    from megatron_resonance.megatron import cpu_speed

    group = dist.distributed_c10d._get_default_group()
    start = group._get_sequence_number_for_group()
    x = torch.randn(4, 6)
    before = x.clone()
    dist.all_reduce(x)
    inp = torch.randn(8)
    scattered, gathered = torch.zeros(8), torch.zeros(8)
    dist.reduce_scatter_tensor(scattered, inp)
    dist.all_gather_into_tensor(gathered, inp)
    dist.broadcast(x, src=0)
    work = dist.all_reduce(inp, async_op=True)
    coalesced = {}
    for async_ops in (False, True):
        out = torch.zeros(8)
        with dist._coalescing_manager(async_ops=async_ops) as cm:
            dist.reduce_scatter_tensor(out, inp, async_op=async_ops)
        if async_ops:
            cm.wait()
        coalesced[str(async_ops)] = bool(torch.equal(out, inp))
    local_end = group._get_sequence_number_for_group()
    with cpu_speed.suspended():  # without the device mode: gloo
        dist.all_reduce(x)
    suspended_end = group._get_sequence_number_for_group()
    try:
        cpu_speed.set_enabled(False)
        dist.all_reduce(x)
        dist.reduce_scatter_tensor(scattered, inp)
    finally:
        cpu_speed.set_enabled(True)
    return {
        "gloo_collectives_local_path": local_end - start,
        "gloo_collectives_without_mode": suspended_end - local_end,
        "gloo_collectives_speed_off": group._get_sequence_number_for_group() - suspended_end,
        "all_reduce_identity": bool(torch.equal(x, before)),
        "reduce_scatter_copies": bool(torch.equal(scattered, inp)),
        "all_gather_copies": bool(torch.equal(gathered, inp)),
        "async_work_completed": bool(work.wait() and work.is_completed()),
        "coalesced_copies": coalesced,
    }


def _train_batch() -> dict:
    """One micro-batch of 2 random sequences in the trainer's format."""
    tokens = torch.randint(0, 256, (2, SEQ + 1), generator=torch.Generator().manual_seed(3))
    return {
        "tokens": tokens[:, :-1],
        "labels": tokens[:, 1:],
        "loss_mask": torch.ones(2, SEQ),
        "position_ids": torch.arange(SEQ).expand(2, SEQ),
    }


def _train_config(iters: int, **optimizer):
    """The trainer's config for tiny_config() on 2-sequence mock batches (constant lr as given)."""
    from megatron_resonance.training.config import Config, DataConfig, OptimizerConfig

    cfg = Config(
        model=tiny_config(),
        data=DataConfig(seq_length=SEQ, micro_batch_size=2, global_batch_size=2, mock_data=True),
        optimizer=OptimizerConfig(min_lr=optimizer["lr"], lr_decay_style="constant", **optimizer),
    )
    cfg.training.train_iters = iters
    return cfg


def check_fused_torch_adam():
    """The trainer's fused torch AdamW makes the same updates as the for-loop AdamW megatron falls back to."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_resonance.training.model import build_model_and_optimizer
    from megatron_resonance.training.step import train_step

    cfg = _train_config(3, lr=1e-2, clip_grad=1.0)

    params, flags = {}, {}
    for fused in (True, False):
        torch.manual_seed(0)
        chunks, optimizer, scheduler, _ = build_model_and_optimizer(cfg, bf16=False)
        groups = [g for o in optimizer.chained_optimizers for g in o.optimizer.param_groups]
        flags[str(fused)] = sorted({str(g["fused"]) for g in groups})
        if not fused:
            for g in groups:
                g["fused"] = False
        batch = _train_batch()
        for _ in range(3):
            train_step(get_forward_backward_func(), iter([batch]), chunks, optimizer, scheduler, cfg, 1)
        params[fused] = torch.cat([p.detach().flatten() for p in chunks[0].parameters()])
    moved = (params[True] - params[False]).abs().max().item()
    return {"fused_flags": flags, "max_abs_param_diff": moved, "max_abs_param": params[False].abs().max().item()}


def check_finetune_load_bf16():
    """A bf16 model loaded for finetuning keeps the loaded weights through an optimizer step (lr 1e-9):
    the optimizer's fp32 main params are refreshed from them. Measured both through the trainer's
    ``load_weights_only`` and through a bare model load, which shows what the refresh prevents."""
    import tempfile

    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_resonance.megatron import checkpointing
    from megatron_resonance.training.model import build_model_and_optimizer, load_weights_only
    from megatron_resonance.training.step import train_step

    cfg = _train_config(1, lr=1e-9, weight_decay=0.0)
    batch = _train_batch()

    def flat(chunks):
        return torch.cat([p.detach().float().flatten() for p in chunks[0].parameters()])

    root = tempfile.mkdtemp(prefix="finetune_bf16_")
    torch.manual_seed(0)
    saved_chunks, _, _, _ = build_model_and_optimizer(cfg, bf16=True)
    checkpointing.save_checkpoint(root, 1, saved_chunks, cfg.model)
    saved = flat(saved_chunks)
    out = {"dtype": str(next(saved_chunks[0].parameters()).dtype)}
    for name, load in (
        ("load_weights_only", load_weights_only),
        ("model_only_load", lambda path, chunks, optimizer: checkpointing.load_checkpoint(path, chunks)),
    ):
        torch.manual_seed(1)  # a different initialization
        chunks, optimizer, scheduler, _ = build_model_and_optimizer(cfg, bf16=True)
        load(root, chunks, optimizer)
        loaded = (flat(chunks) - saved).abs().max().item()
        train_step(get_forward_backward_func(), iter([batch]), chunks, optimizer, scheduler, cfg, 1)
        out[name] = {"after_load": loaded, "after_step": (flat(chunks) - saved).abs().max().item()}
    return out


def _code_paths() -> dict:
    """What megatron runs now for the attributes ``cpu_speed`` patches (qualified names)."""
    from megatron.core.models.common.embeddings import rope_utils
    from megatron.core.optimizer import clip_grads, optimizer
    from megatron.core.tensor_parallel import layers
    from megatron.core.tensor_parallel.cross_entropy import VocabParallelCrossEntropy

    def name(obj):
        return None if obj is None else f"{getattr(obj, '__module__', None)}.{getattr(obj, '__qualname__', obj)}"

    return {
        "linear": name(layers.LinearWithGradAccumulationAndAsyncCommunication),
        "copy_to_region": name(layers.copy_to_tensor_model_parallel_region),
        "l2_norm": name(clip_grads.l2_norm_impl),
        "scale": [name(clip_grads.multi_tensor_scale_impl), name(optimizer.multi_tensor_scale_impl)],
        "logits_max": name(VocabParallelCrossEntropy.calculate_logits_max),
        "fused_rope": name(rope_utils.fused_apply_rotary_pos_emb),
        "wgrad_kernel": hasattr(layers, "fused_weight_gradient_mlp_cuda"),
        "grad_accum_fusion_available": layers._grad_accum_fusion_available,
    }


def check_speed_switch():
    """``cpu_speed.set_enabled(False)`` puts back every attribute of megatron it patched (its own code
    again); ``set_enabled(True)`` installs them again."""
    from megatron_resonance.megatron import cpu_speed

    on = _code_paths()
    try:
        off_flag = cpu_speed.set_enabled(False)
        off = _code_paths()
    finally:
        again_flag = cpu_speed.set_enabled(True)
    return {"on": on, "off": off, "on_again": _code_paths(), "flags": [off_flag, again_flag]}


def check_speed_switch_in_model():
    """The model built with ``cpu_speed`` on runs local_ops (SwiGLU module, rotary through megatron's
    fused-RoPE hook, RMSNorm with its own backward); built with it off, megatron's unfused code and torch's
    RMSNorm. From the same weights: the same logits and weight gradients."""
    from megatron_resonance.megatron import cpu_speed, llama

    cfg = tiny_config("resonance_yarn")
    tokens = torch.randint(0, cfg.vocab_size, (2, SEQ), generator=torch.Generator().manual_seed(4))
    positions = torch.arange(SEQ)[None].expand(2, -1)
    out = {}
    try:
        for name, on in (("speed", True), ("megatron", False)):
            cpu_speed.set_enabled(on)
            torch.manual_seed(0)
            model = llama.build_model(cfg, seq_length=SEQ)[0]
            tf_config = model.config
            logits = model(tokens, positions, None)[..., : cfg.vocab_size]
            logits.float().pow(2).mean().backward()
            kinds = ("input_layernorm", "pre_mlp_layernorm", "final_layernorm")
            norms = {type(m) for n, m in model.named_modules() if n.endswith(kinds)}
            out[name] = {
                "rope_fusion": tf_config.apply_rope_fusion,
                "activation": type(model.decoder.layers[0].mlp.activation_func).__name__,
                "norms": sorted(f"{t.__module__}.{t.__qualname__}" for t in norms),
                "logits": logits.detach(),
                "grads": torch.cat([p.grad.flatten() for p in model.parameters()]),
                "keys": sorted(model.state_dict()),
            }
    finally:
        cpu_speed.set_enabled(True)
    a, b = out["speed"], out["megatron"]
    return {
        "switches": {k: [v["rope_fusion"], v["activation"]] for k, v in out.items()},
        "norms": {k: v["norms"] for k, v in out.items()},
        "same_state_dict_keys": a["keys"] == b["keys"],
        "logits_rel": ((a["logits"] - b["logits"]).norm() / b["logits"].norm()).item(),
        "grads_rel": ((a["grads"] - b["grads"]).norm() / b["grads"].norm()).item(),
    }


def check_speed_matches_megatron_training():
    """Five trainer steps (megatron DDP, distributed optimizer, grad clipping, fused AdamW) from the same
    seed on the same batch, with ``cpu_speed`` on and off: the losses and gradient norms of every step."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_resonance.megatron import cpu_speed
    from megatron_resonance.training.model import build_model_and_optimizer
    from megatron_resonance.training.step import train_step

    cfg = _train_config(5, lr=1e-3, clip_grad=1.0)
    cfg.model = tiny_config("resonance_yarn")
    batches = [_train_batch()] * 5  # one batch: the losses fall
    out = {}
    try:
        for name, on in (("speed", True), ("megatron", False)):
            cpu_speed.set_enabled(on)
            torch.manual_seed(0)
            chunks, optimizer, scheduler, _ = build_model_and_optimizer(cfg, bf16=False)
            steps = [train_step(get_forward_backward_func(), iter([b]), chunks, optimizer, scheduler, cfg, 1)
                     for b in batches]
            out[name] = {"losses": [s[0] for s in steps], "grad_norms": [float(s[1]) for s in steps]}
    finally:
        cpu_speed.set_enabled(True)
    return out


def check_grad_accumulation_fusion():
    """``cpu_speed``'s gradient-accumulation fusion (weight-gradient GEMMs accumulate into DDP's
    main_grad) gives the unfused path's gradients: one step, fused vs unfused, same weights and batch."""
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.tensor_parallel import layers

    from megatron_resonance.megatron import llama
    from megatron_resonance.training.model import build_model_and_optimizer
    from megatron_resonance.training.step import train_step

    cfg = _train_config(1, lr=1e-3, clip_grad=0.0)
    calls = []
    shim = layers.fused_weight_gradient_mlp_cuda
    accumulate = shim.wgrad_gemm_accum_fp32
    shim.wgrad_gemm_accum_fp32 = lambda *a: (calls.append(1), accumulate(*a))
    original_config = llama.transformer_config  # what the model provider builds its config with
    grads, flags = {}, {}
    try:
        for fused in (True, False):
            llama.transformer_config = lambda *a, **k: original_config(*a, **k, gradient_accumulation_fusion=fused)
            torch.manual_seed(0)
            chunks, optimizer, scheduler, tf_config = build_model_and_optimizer(cfg, bf16=False)
            flags[str(fused)] = tf_config.gradient_accumulation_fusion
            del calls[:]
            batches = iter([_train_batch()])
            train_step(get_forward_backward_func(), batches, chunks, optimizer, scheduler, cfg, 1)
            grads[fused] = torch.cat([p.main_grad.flatten() for p in chunks[0].parameters()])
            flags[f"calls_{fused}"] = len(calls)
    finally:
        llama.transformer_config = original_config
        shim.wgrad_gemm_accum_fp32 = accumulate
    rel = ((grads[True] - grads[False]).norm() / grads[False].norm()).item()
    return {"flags": flags, "grads_rel": rel, "grad_norm": grads[False].norm().item()}


@contextlib.contextmanager
def _mode_calls(record):
    """Inside the block, every call through cpu_compat's device mode is passed to ``record(func)``."""
    from megatron_resonance.megatron import cpu_compat

    original = cpu_compat._DeviceMode.__torch_function__

    def recording(self, func, types, args=(), kwargs=None):
        record(func)
        return original(self, func, types, args, kwargs)

    cpu_compat._DeviceMode.__torch_function__ = recording
    try:
        yield
    finally:
        cpu_compat._DeviceMode.__torch_function__ = original


def check_lean_linear():
    """``cpu_speed``'s linear Function (no sequence parallelism) against megatron's own, which it
    subclasses: outputs, input gradients, weight gradients (plain, and accumulated into main_grad the way
    DDP arms it) and the bias gradient are equal; the device mode sees no call in either direction."""
    from megatron.core.tensor_parallel import layers

    from megatron_resonance.megatron import cpu_speed

    ours_cls = layers.LinearWithGradAccumulationAndAsyncCommunication
    megatron_cls = ours_cls.__bases__[0]  # its backward runs under the device mode (cpu_compat)

    g = torch.Generator().manual_seed(5)
    x0, w0, b0 = torch.randn(6, 3, 16, generator=g), torch.randn(24, 16, generator=g), torch.randn(24, generator=g)
    upstream = torch.randn(6, 3, 24, generator=g)
    prior = torch.randn(24, 16, generator=g)  # main_grad already holds an earlier micro-batch

    def run(cls, fuse: bool, bias: bool):
        x, w = x0.clone().requires_grad_(True), torch.nn.Parameter(w0.clone())
        b = torch.nn.Parameter(b0.clone()) if bias else None
        if fuse:  # as megatron's DDP arms a parameter
            w.main_grad, w.grad_added_to_main_grad = prior.clone(), False
        y = cls.apply(x, w, b, fuse, False, False, None, 0, None)
        y.backward(upstream)
        wgrad = w.main_grad if fuse else w.grad
        return {"y": y, "x": x.grad, "w": wgrad, "b": b.grad if bias else None,
                "dummy": None if not fuse else list(w.grad.shape), "flag": getattr(w, "grad_added_to_main_grad", None)}

    counted = []
    out = {}
    for fuse in (True, False):
        for bias in (True, False):
            ref = run(megatron_cls, fuse, bias)
            with _mode_calls(counted.append), cpu_speed.suspended():
                ours = run(ours_cls, fuse, bias)
            diffs = {k: (ours[k] - ref[k]).abs().max().item() for k in ("y", "x", "w", "b") if ref[k] is not None}
            flags = {"dummy": ours["dummy"], "flag": ours["flag"], "ref_flag": ref["flag"]}
            out[f"fuse={fuse},bias={bias}"] = {**diffs, **flags}
    out["mode_calls"] = len(counted)
    return out


def check_model_step_without_device_mode():
    """A training step's model forward makes no call through cpu_compat's device mode (TP = CP = 1,
    no sequence parallelism); the rest of the step (optimizer, megatron's schedule) still runs under it.
    (Autograd runs backward without torch-function modes: the count there is megatron's backward_step.)"""
    from megatron.core.pipeline_parallel import get_forward_backward_func, schedules

    from megatron_resonance.training.model import build_model_and_optimizer
    from megatron_resonance.training.step import train_step

    cfg = _train_config(1, lr=1e-3, clip_grad=1.0)
    torch.manual_seed(0)
    chunks, optimizer, scheduler, _ = build_model_and_optimizer(cfg, bf16=False)
    phase, counts = ["other"], {"forward": 0, "backward": 0, "other": 0}

    def count(func):
        counts[phase[0]] += 1

    def in_phase(name, fn):
        def wrapped(*args, **kwargs):
            phase[0] = name
            try:
                return fn(*args, **kwargs)
            finally:
                phase[0] = "other"
        return wrapped

    model = chunks[0].module
    original_forward, original_backward = model.forward, schedules.backward_step
    model.forward = in_phase("forward", original_forward)
    schedules.backward_step = in_phase("backward", original_backward)
    try:
        with _mode_calls(count):
            batches = iter([_train_batch()])
            train_step(get_forward_backward_func(), batches, chunks, optimizer, scheduler, cfg, 1)
    finally:
        schedules.backward_step = original_backward
        del model.forward
    return counts


def check_cpu_compat():
    """What ``cpu_compat`` does for megatron's code, with ``cpu_speed`` off: CUDA device arguments land on
    the CPU, ``.cuda()`` and ``.type()`` answer as on a GPU, megatron's RNG tracker forks the CPU generator,
    and megatron's own linear Function runs its sequence-parallel backward (device allocations in backward)."""
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import get_cuda_rng_tracker, layers

    from megatron_resonance.megatron import cpu_speed

    out = {}
    try:
        cpu_speed.set_enabled(False)
        x = torch.ones(3)
        made = [torch.zeros(2, device="cuda"), torch.zeros(2, device=0), torch.zeros(2, device=torch.device("cuda")),
                x.to("cuda"), x.to(torch.device("cuda", 0)), torch.empty(2, pin_memory=True)]
        out["devices"] = sorted({t.device.type for t in made})
        out["cuda_is_identity"] = x.cuda() is x
        out["type_names"] = [torch.ones(1, dtype=d).type() for d in (torch.float32, torch.bfloat16, torch.float16)]

        torch.manual_seed(7)
        plain = torch.rand(4)
        torch.manual_seed(7)
        with get_cuda_rng_tracker().fork():
            forked = torch.rand(4)
        after_fork = torch.rand(4)
        out["rng"] = {"fork_draws_elsewhere": not torch.equal(forked, plain),
                      "default_stream_restored": torch.equal(after_fork, plain)}

        function = layers.LinearWithGradAccumulationAndAsyncCommunication
        g = torch.Generator().manual_seed(6)
        inp = torch.randn(5, 2, 8, generator=g).requires_grad_(True)
        weight = torch.nn.Parameter(torch.randn(6, 8, generator=g))
        y = function.apply(inp, weight, None, False, False, True, None, 0, ps.get_tensor_model_parallel_group())
        y.backward(torch.ones_like(y))
        out["megatron_linear"] = f"{function.__module__}.{function.__qualname__}"
        out["sequence_parallel_grads"] = [
            (inp.grad - torch.ones(5, 2, 6) @ weight.detach()).abs().max().item(),
            (weight.grad - torch.ones(10, 6).t() @ inp.detach().reshape(10, 8)).abs().max().item(),
        ]
    finally:
        cpu_speed.set_enabled(True)
    return out


def check_suspended():
    """``cpu_speed.suspended()`` takes cpu_compat's device mode off the stack and puts it back; a mode
    pushed on top of it (not cpu_compat's) is left alone; with ``cpu_speed`` off it takes nothing off."""
    from torch.overrides import TorchFunctionMode

    from megatron_resonance.megatron import cpu_speed
    from megatron_resonance.megatron._private_torch import function_mode_depth

    def device_ok() -> bool:
        try:
            torch.zeros(1, device="cuda")
            return True
        except (RuntimeError, AssertionError):
            return False

    class Other(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    depth = function_mode_depth()
    with cpu_speed.suspended():
        inside = (function_mode_depth(), device_ok())
    after = (function_mode_depth(), device_ok())
    with Other():
        with cpu_speed.suspended():
            foreign = function_mode_depth()
    try:
        cpu_speed.set_enabled(False)
        with cpu_speed.suspended():
            speed_off = (function_mode_depth(), device_ok())
    finally:
        cpu_speed.set_enabled(True)
    return {"depth": depth, "inside": list(inside), "after": list(after), "under_foreign_mode": foreign,
            "speed_off": list(speed_off)}


def check_cross_entropy_max():
    """megatron's vocab-parallel cross entropy with ``cpu_speed``'s row maxima (``amax``) gives
    bit-identical losses and logit gradients to megatron's own ``max(dim)``, rows with +-inf included
    (NaN where megatron's is NaN)."""
    from megatron.core.tensor_parallel.cross_entropy import VocabParallelCrossEntropy, vocab_parallel_cross_entropy

    from megatron_resonance.megatron import cpu_speed

    g = torch.Generator().manual_seed(5)
    logits = torch.randn(6, 3, 50, generator=g) * 8
    logits[0, 0, 7] = float("inf")
    logits[1, 2, :] = float("-inf")
    logits[1, 2, 3] = 2.0
    target = torch.randint(0, 50, (6, 3), generator=g)
    upstream = torch.randn(6, 3, generator=g)
    installed = VocabParallelCrossEntropy.calculate_logits_max is cpu_speed._logits_max
    out = {}
    for name, impl in (("ours", cpu_speed._logits_max), ("megatron", cpu_speed._logits_max.megatron)):
        with mock.patch.object(VocabParallelCrossEntropy, "calculate_logits_max", staticmethod(impl)):
            x = logits.clone().requires_grad_(True)
            loss = vocab_parallel_cross_entropy(x, target)
            loss.backward(upstream)
        out[name] = (loss.detach(), x.grad)
    same = [bool(((a == b) | (a.isnan() & b.isnan())).all()) for a, b in zip(out["ours"], out["megatron"])]
    finite = bool(torch.isfinite(out["ours"][0][2:]).all())
    return {"installed": installed, "loss_and_grad_equal": same, "finite_rows_finite": finite}


def check_validation_loss_over_real_vocabulary():
    """The trainer's validation loss leaves the padded vocabulary rows out, as the evaluation tools do: it
    equals the mean NLL of ``megatron_token_scores`` on the same tokens and does not move when the padding
    rows' output weights grow; megatron's cross entropy (the training loss) counts those rows."""
    import dataclasses

    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_resonance.evaluation.scoring import megatron_token_scores
    from megatron_resonance.megatron.llama import build_model
    from megatron_resonance.training.config import from_dict
    from megatron_resonance.training.data_loop import micro_batches
    from megatron_resonance.training.step import evaluate, forward_step, reduce_loss

    model_cfg = dataclasses.replace(tiny_config(), vocab_size=200)  # padded to 256
    torch.manual_seed(3)
    (chunk,) = build_model(model_cfg)
    chunk.eval()
    seq, mbs, batches = 16, 2, 2
    model = {k: v for k, v in model_cfg.to_dict().items() if k != "rope"}
    cfg = from_dict({
        "model": model,
        "data": {"seq_length": seq, "micro_batch_size": mbs, "global_batch_size": mbs * batches, "mock_data": True},
        "training": {"eval_iters": 1},
    })  # fmt: skip
    rows = torch.randint(0, 200, (mbs * batches, seq + 1), generator=torch.Generator().manual_seed(4))
    dataset = [
        {"tokens": r[:-1], "labels": r[1:], "loss_mask": torch.ones(seq), "position_ids": torch.arange(seq)}
        for r in rows
    ]
    forward_backward = get_forward_backward_func()

    def training_loss():  # megatron's cross entropy, over the padded vocabulary
        losses = forward_backward(
            forward_step_func=forward_step, data_iterator=micro_batches(dataset, 0, mbs),
            model=[chunk], num_microbatches=batches, seq_length=seq, micro_batch_size=mbs, forward_only=True,
        )  # fmt: skip
        return reduce_loss(losses)

    before = {"validation": evaluate(forward_backward, dataset, [chunk], cfg, batches), "ce": training_loss()}
    reference = megatron_token_scores([chunk], rows, vocab_size=200).nll.double().mean().item()
    with torch.no_grad():
        chunk.output_layer.weight[200:] = 5.0
    after = {"validation": evaluate(forward_backward, dataset, [chunk], cfg, batches), "ce": training_loss()}
    return {"before": before, "after": after, "reference": reference}


CHECKS = [
    check_sdpa_matches_local_attention,
    check_install_rotary_scale,
    check_context_parallel_slicing,
    check_rope_swap_changes_logits,
    check_one_rank_collectives,
    check_fused_torch_adam,
    check_finetune_load_bf16,
    check_speed_switch,
    check_speed_switch_in_model,
    check_speed_matches_megatron_training,
    check_grad_accumulation_fusion,
    check_lean_linear,
    check_model_step_without_device_mode,
    check_cpu_compat,
    check_suspended,
    check_cross_entropy_max,
    check_validation_loss_over_real_vocabulary,
]


def main(out_dir: str) -> None:
    from megatron_resonance.megatron import cpu_speed, distributed

    distributed.initialize(1, 1)
    cpu_speed.set_enabled(True)  # whatever MEGATRON_RESONANCE_CPU_SPEED says: these checks are of its measures
    results = {"cuda_available": torch.cuda.is_available()}
    for check in CHECKS:
        try:
            results[check.__name__] = check()
        except Exception:
            results[check.__name__] = {"error": traceback.format_exc()}
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump(results, f, indent=1, default=float)
    distributed.destroy()


if __name__ == "__main__":
    main(sys.argv[1])
