"""Worker: the trainer's model, optimizer and step on this process's device, for the gpu tier.

    python tests/gpu/workers/trainer_steps.py precision OUT.json    # fp32, then bf16, same weights and batch
    python tests/gpu/workers/trainer_steps.py save CKPT OUT.pt       # train, save a full checkpoint
    python tests/gpu/workers/trainer_steps.py load CKPT OUT.pt       # another init, then that checkpoint

The device is CUDA when there is one; a test hides it (``CUDA_VISIBLE_DEVICES=``) to run the CPU side, which
then goes through cpu_compat over gloo, as training on a laptop does. The model is ``tiny_llama``
at width 64 (2 layers, GQA 4:2, vocabulary 256) with Resonance YaRN (s = 4 over 16 original positions), built
and stepped by ``training.model`` / ``training.step`` (megatron DDP, distributed optimizer, fused AdamW,
clipping) on one fixed
batch of 4 x 64 random tokens, which it memorizes: the loss falls step after step.

* ``precision``: ``STEPS`` steps in fp32, then the model rebuilt from the same seed in bf16 (megatron's
  Float16Module, fp32 main weights in the optimizer) for the same steps. Writes the losses, the device
  and the layer spec the trainer built (which core attention and linear modules, fused RoPE or not).
* ``save``: ``STEPS`` steps in fp32, a checkpoint of everything (model, optimizer, scheduler, RNG) at
  iteration ``STEPS``, then one more step. ``load``: a model built from another seed, the checkpoint
  loaded into it, one more step. Both write the weights, the Adam state and the scheduler's count as they
  were before that step, and the step's loss.
"""

from __future__ import annotations

import itertools
import json
import sys

import torch

from tests.tiny_llama import tiny_llama, train_batch, training_config

STEPS = 8
BATCH = 4
SEED = 1234


def config():
    model = tiny_llama("resonance_yarn", hidden_size=64, ffn_hidden_size=176)
    return training_config(model, iters=1000, batch=BATCH, lr=3e-3, clip_grad=1.0)


def batches():
    """The same batch forever (CPU tensors: the trainer's forward_step moves each to the GPU)."""
    return itertools.repeat(train_batch(config().model, BATCH, seed=1))


class Run:
    """The trainer's model, optimizer and scheduler for ``cfg``, built after seeding with ``seed``."""

    def __init__(self, cfg, bf16: bool, seed: int):
        from megatron.core.pipeline_parallel import get_forward_backward_func

        from megatron_resonance.megatron import distributed
        from megatron_resonance.training import model, step

        distributed.initialize(1, 1, seed=seed)
        self.cfg, self.model, self.step_module = cfg, model, step
        self.chunks, self.optimizer, self.scheduler, _ = model.build_model_and_optimizer(cfg, bf16=bf16)
        self.forward_backward = get_forward_backward_func()
        self.data = batches()

    def step(self) -> float:
        loss, _, update_ok = self.step_module.train_step(
            self.forward_backward, self.data, self.chunks, self.optimizer, self.scheduler, self.cfg, num_microbatches=1
        )
        assert update_ok, "the optimizer skipped the update"
        return float(loss)

    def gpt(self):
        from megatron_resonance.megatron.rotary import unwrap

        return unwrap(self.chunks[0])

    def spec(self) -> dict:
        from megatron_resonance.megatron.llama import resolve_spec

        layer = self.gpt().decoder.layers[0]
        return {
            "resolved": resolve_spec(self.cfg.parallel.transformer_impl),
            "core_attention": type(layer.self_attention.core_attention).__name__,
            "linear_qkv": type(layer.self_attention.linear_qkv).__name__,
            "apply_rope_fusion": bool(self.gpt().config.apply_rope_fusion),
        }

    def state(self) -> dict:
        """Weights, per-parameter Adam state and the scheduler's count, as CPU tensors."""
        weights = {name: p.detach().float().cpu().clone() for name, p in self.gpt().named_parameters()}
        adam = []
        for opt in getattr(self.optimizer, "chained_optimizers", [self.optimizer]):
            inner = opt.optimizer
            for group in inner.param_groups:
                for p in group["params"]:
                    entry = {"param": p.detach().float().cpu().clone()}
                    for key, value in inner.state.get(p, {}).items():
                        entry[key] = value.detach().float().cpu().clone() if torch.is_tensor(value) else value
                    adam.append(entry)
        return {"weights": weights, "adam": adam, "scheduler_steps": self.scheduler.num_steps}


def device() -> str:
    return f"cuda ({torch.cuda.get_device_name()})" if torch.cuda.is_available() else "cpu"


def precision(out: str) -> None:
    cfg, losses, spec = config(), {}, None
    for name, bf16 in (("fp32", False), ("bf16", True)):
        run = Run(cfg, bf16=bf16, seed=SEED)
        spec = run.spec()
        losses[name] = [run.step() for _ in range(STEPS)]
        del run
    with open(out, "w") as f:
        json.dump({"device": device(), "losses": losses, "spec": spec}, f, indent=1)


def save(ckpt: str, out: str) -> None:
    import torch.distributed as dist

    from megatron_resonance.megatron import checkpointing

    cfg = config()
    run = Run(cfg, bf16=False, seed=SEED)
    for _ in range(STEPS):
        run.step()
    checkpointing.save_checkpoint(
        ckpt,
        STEPS,
        run.chunks,
        cfg.model,
        optimizer=run.optimizer,
        scheduler=run.scheduler,
        run_config={"world_size": dist.get_world_size()},
    )
    state = run.state()
    torch.save({"device": device(), **state, "next_loss": run.step()}, out)


def load(ckpt: str, out: str) -> None:
    from megatron_resonance.megatron import checkpointing

    cfg = config()
    run = Run(cfg, bf16=False, seed=SEED + 1)
    info = checkpointing.load_checkpoint(ckpt, run.chunks, optimizer=run.optimizer, scheduler=run.scheduler)
    run.model.use_fused_torch_adam(run.optimizer)  # as the trainer does after a load
    state = run.state()
    torch.save({"device": device(), "iteration": info["iteration"], **state, "next_loss": run.step()}, out)


if __name__ == "__main__":
    action, *args = sys.argv[1:]
    {"precision": precision, "save": save, "load": load}[action](*args)
