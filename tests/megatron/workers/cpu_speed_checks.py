"""``cpu_speed``'s process-wide measures against megatron's own code, asserted in
``tests/megatron/test_cpu_speed.py``; run by ``model_checks.py``. Checks that switch ``cpu_speed`` off
switch it back on."""

from __future__ import annotations

import contextlib
from unittest import mock

import torch

from tests.tiny_llama import TINY, tiny_llama, train_batch, training_config

SEQ = TINY["max_position_embeddings"]
#: trained at 32, extended x4 to 128: past the 64 positions the checks run
ORIGINAL = 32


def check_one_rank_collectives():
    """Collectives over this one-rank world run in place of gloo (results, async handles, coalescing);
    without the device mode, or with ``cpu_speed`` off, they go through gloo.

    The default group's sequence number counts the collectives that reached gloo.

    Asserted by ``test_one_rank_collectives_skip_gloo``."""
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
    again); ``set_enabled(True)`` installs them again.

    Asserted by ``test_switching_off_puts_megatron_s_code_back``."""
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
    RMSNorm. From the same weights: the same logits and weight gradients.

    Asserted by ``test_the_model_with_speed_on_and_off_matches``."""
    from megatron_resonance.megatron import cpu_speed, llama

    cfg = tiny_llama("resonance_yarn", ORIGINAL)
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
    seed on the same batch, with ``cpu_speed`` on and off: the losses and gradient norms of every step.

    Asserted by ``test_training_with_speed_on_and_off_gives_the_same_losses``."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_resonance.megatron import cpu_speed
    from megatron_resonance.training.model import build_model_and_optimizer
    from megatron_resonance.training.step import train_step

    cfg = training_config(tiny_llama(), 5, lr=1e-3, clip_grad=1.0)
    cfg.model = tiny_llama("resonance_yarn", ORIGINAL)
    batches = [train_batch(cfg.model)] * 5  # one batch: the losses fall
    out = {}
    try:
        for name, on in (("speed", True), ("megatron", False)):
            cpu_speed.set_enabled(on)
            torch.manual_seed(0)
            chunks, optimizer, scheduler, _ = build_model_and_optimizer(cfg, bf16=False)
            steps = [
                train_step(get_forward_backward_func(), iter([b]), chunks, optimizer, scheduler, cfg, 1)
                for b in batches
            ]
            out[name] = {"losses": [s[0] for s in steps], "grad_norms": [float(s[1]) for s in steps]}
    finally:
        cpu_speed.set_enabled(True)
    return out


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
    DDP arms it) and the bias gradient are equal; the device mode sees no call in either direction.

    Asserted by ``test_lean_linear_matches_megatron_s_function``."""
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
        return {
            "y": y,
            "x": x.grad,
            "w": wgrad,
            "b": b.grad if bias else None,
            "dummy": None if not fuse else list(w.grad.shape),
            "flag": getattr(w, "grad_added_to_main_grad", None),
        }

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
    (Autograd runs backward without torch-function modes: the count there is megatron's backward_step.)

    Asserted by ``test_training_model_runs_without_the_device_mode``."""
    from megatron.core.pipeline_parallel import get_forward_backward_func, schedules

    from megatron_resonance.training.model import build_model_and_optimizer
    from megatron_resonance.training.step import train_step

    cfg = training_config(tiny_llama(), 1, lr=1e-3, clip_grad=1.0)
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
            batches = iter([train_batch(cfg.model)])
            train_step(get_forward_backward_func(), batches, chunks, optimizer, scheduler, cfg, 1)
    finally:
        schedules.backward_step = original_backward
        del model.forward
    return counts


def check_suspended():
    """``cpu_speed.suspended()`` takes cpu_compat's device mode off the stack and puts it back; a mode
    pushed on top of it (not cpu_compat's) is left alone; with ``cpu_speed`` off it takes nothing off.

    Asserted by ``test_suspended_takes_the_mode_off_and_back``."""
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
    return {
        "depth": depth,
        "inside": list(inside),
        "after": list(after),
        "under_foreign_mode": foreign,
        "speed_off": list(speed_off),
    }


def check_cross_entropy_max():
    """megatron's vocab-parallel cross entropy with ``cpu_speed``'s row maxima (``amax``) gives
    bit-identical losses and logit gradients to megatron's own ``max(dim)``, rows with +-inf included
    (NaN where megatron's is NaN).

    Asserted by ``test_cross_entropy_with_amax_is_bit_identical``."""
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
