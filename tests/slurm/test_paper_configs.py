"""The paper presets (configs/llama2_*_resonance_yarn.yaml) that slurm/extend_context.sbatch runs: they load,
finetune/extend_context.py accepts them against a LLaMA-2 checkpoint, their layouts are valid on 8-GPU
nodes, and the layout planner's memory estimate for them stays under 80 GB per GPU. No Slurm, no GPU:
the checkpoint is a stand-in holding only the stored model description."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from megatron_resonance.errors import ConfigError
from megatron_resonance.training import config_checks, launch, validation
from megatron_resonance.training.config import from_dict, load_yaml

REPO = Path(__file__).resolve().parents[2]
LLAMA2 = {
    # name: (model fields as stored by tools/convert_hf_to_megatron.py)
    "7b": dict(num_layers=32, hidden_size=4096, ffn_hidden_size=11008, num_attention_heads=32, num_query_groups=32),
    "13b": dict(num_layers=40, hidden_size=5120, ffn_hidden_size=13824, num_attention_heads=40, num_query_groups=40),
}
#: preset -> (model, target length, factor s, steps)
PRESETS = {
    "llama2_7b_4k_to_32k_resonance_yarn.yaml": ("7b", 32768, 8.0, 50),
    "llama2_13b_4k_to_16k_resonance_yarn.yaml": ("13b", 16384, 4.0, 100),
}
GB = 1e9


def extend_context_module():
    spec = importlib.util.spec_from_file_location("extend_context", REPO / "finetune" / "extend_context.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def fake_checkpoint(root: Path, model: str) -> Path:
    """A converted LLaMA-2 checkpoint as far as the configuration is concerned (no weights)."""
    from tests.fake_checkpoint import add_dist_files

    stored = dict(
        LLAMA2[model],
        vocab_size=32000,
        max_position_embeddings=4096,
        norm_epsilon=1e-5,
        tie_word_embeddings=False,
        init_method_std=0.02,
        make_vocab_size_divisible_by=128,
        rope=dict(kind="rope", base=10000.0, original_max_position=4096, factor=1.0),
    )
    (root / "iter_0000000").mkdir(parents=True)
    (root / "iter_0000000" / "megatron_resonance.json").write_text(json.dumps({"model": stored, "iteration": 0}))
    add_dist_files(root / "iter_0000000")
    (root / "latest_checkpointed_iteration.txt").write_text("0")
    return root


def memory_per_gpu_gb(cfg, world: int) -> float:
    """The layout planner's estimate (megatron_resonance/planning.py) for the preset's layout at ``world`` GPUs."""
    from megatron_resonance.planning import Layout, ModelShape, training_estimate

    p, d = cfg.parallel, cfg.data
    tp, pp, cp = p.tensor_model_parallel_size, p.pipeline_model_parallel_size, p.context_parallel_size
    dp = world // (tp * pp * cp)
    micro = d.global_batch_size // (d.micro_batch_size * dp)
    layout = Layout(
        tp=tp,
        pp=pp,
        cp=cp,
        dp=dp,
        sequence_parallel=p.sequence_parallel,
        micro_batch_size=d.micro_batch_size,
        num_microbatches=micro,
    )
    return training_estimate(ModelShape.from_llama(cfg.model), d.seq_length, layout).total / GB


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_preset_loads_and_extend_context_accepts_it(preset, tmp_path, monkeypatch):
    model, target, factor, steps = PRESETS[preset]
    path = str(REPO / "configs" / preset)
    from_dict(load_yaml(path), where=path)  # the file alone is a valid config tree

    load = fake_checkpoint(tmp_path / "ckpt", model)
    parser = launch.make_parser("extend_context.py", "")
    args = parser.parse_args(["--config", path, "--load", str(load), "--mock-data"])
    cfg = extend_context_module().make_config(args)

    rope = cfg.model.rope
    assert (rope.kind, rope.factor, rope.original_max_position) == ("resonance_yarn", factor, 4096)
    assert cfg.model.max_position_embeddings == cfg.data.seq_length == target
    assert cfg.model.num_layers == LLAMA2[model]["num_layers"]  # the shape comes from the checkpoint
    o = cfg.optimizer
    assert (o.lr, o.weight_decay, o.lr_warmup_fraction, o.lr_decay_style) == (2e-5, 0.01, 0.05, "constant")
    assert (cfg.training.train_iters, cfg.data.micro_batch_size, cfg.checkpoint.finetune) == (steps, 1, True)
    assert cfg.parallel.sequence_parallel and o.use_distributed_optimizer

    # Valid on one and on two 8-GPU nodes (Transformer Engine, which CP needs, stands in for a GPU node's).
    monkeypatch.setattr(config_checks, "resolve_spec", lambda impl: "te")
    for nodes in (1, 2):
        validation.validate(cfg, world_size=8 * nodes)
        assert memory_per_gpu_gb(cfg, 8 * nodes) < 65, "leave >= 15 GB of an 80 GB GPU as margin"


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_preset_on_cpu_needs_only_the_layout_override(preset, tmp_path, monkeypatch):
    """The presets are device-neutral: without Transformer Engine / CUDA (this machine, or pretended so) the
    layer spec is the local one and the precision fp32 (bf16 left to the default), and what a CPU run must
    change is the layout alone: one process is refused in one line naming the override, which is then valid."""
    model = PRESETS[preset][0]
    path = str(REPO / "configs" / preset)
    monkeypatch.setattr(config_checks, "resolve_spec", lambda impl: "local" if impl == "auto" else impl)
    load = fake_checkpoint(tmp_path / "ckpt", model)
    parser = launch.make_parser("extend_context.py", "")
    make_config = extend_context_module().make_config
    cfg = make_config(parser.parse_args(["--config", path, "--load", str(load), "--mock-data"]))
    assert cfg.parallel.transformer_impl == "auto" and cfg.training.bf16 is None  # trainer: bf16 only on CUDA

    p = cfg.parallel
    tp, cp = p.tensor_model_parallel_size, p.context_parallel_size
    with pytest.raises(ConfigError) as refused:
        validation.validate(cfg, world_size=1)
    assert str(refused.value) == (
        f"world size 1 is not divisible by TP*PP*CP = {tp}*1*{cp} = {tp * cp}: run a multiple of {tp * cp} "
        "processes, or give a layout for 1, e.g. --tensor-model-parallel-size 1 --context-parallel-size 1"
    )
    override = ["--tensor-model-parallel-size", "1", "--context-parallel-size", "1"]
    cfg = make_config(parser.parse_args(["--config", path, "--load", str(load), "--mock-data", *override]))
    assert cfg.parallel.sequence_parallel  # kept from the preset; harmless with TP=1
    validation.validate(cfg, world_size=1)
