"""``megatron_resonance.megatron.llama``: the model description and parallel checks (reading a Hugging Face
config: ``tests/hf/test_config.py``).

(Building and running the model is covered by ``test_parallel_equivalence.py`` and the ``model_checks``
worker, whose checks read here are in ``workers/llama_checks.py``; the builder's refusal at TP=2 is checked
in ``test_parallel_equivalence.py``.)
"""

from __future__ import annotations

import pytest

from megatron_resonance.megatron.llama import LlamaConfig
from megatron_resonance.rope import RopeConfig


def test_head_dim_follows_the_model():
    cfg = LlamaConfig(hidden_size=96, num_attention_heads=3, num_query_groups=1, rope=RopeConfig(head_dim=128))
    assert cfg.rope.head_dim == 32 == cfg.head_dim
    assert LlamaConfig.from_dict(cfg.to_dict()) == cfg


def test_check_parallel_names_the_offending_setting():
    cfg = LlamaConfig(hidden_size=192, num_attention_heads=6, num_query_groups=3)
    cfg.check_parallel(3)
    with pytest.raises(ValueError, match="tensor-model-parallel-size 2 does not divide num_query_groups 3"):
        cfg.check_parallel(2)
    with pytest.raises(ValueError, match="tensor-model-parallel-size 4 does not divide num_attention_heads 6"):
        cfg.check_parallel(4)


def test_config_rejects_inconsistent_shapes():
    with pytest.raises(ValueError, match="not divisible by num_attention_heads"):
        LlamaConfig(hidden_size=100, num_attention_heads=3)
    with pytest.raises(ValueError, match="not divisible by num_query_groups"):
        LlamaConfig(hidden_size=96, num_attention_heads=3, num_query_groups=2)
    with pytest.raises(ValueError, match=r"unknown config key\(s\) in model settings: num_layerz"):
        LlamaConfig.from_dict({"num_layerz": 2})


@pytest.mark.parametrize("vocab_size", [256, 300, 1000, 32000, 32001])
@pytest.mark.parametrize("groups", [1, 2, 3, 6, 8, 40])
def test_padded_vocab_size_splits_at_every_supported_tp(vocab_size, groups):
    """The embedding shape is part of every checkpoint: one size that every TP the model supports (each
    divisor of the query groups) splits evenly. lcm(128, TP) gave vocab 32000 -> 32256 at TP=3."""
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=groups * 16, num_attention_heads=groups,
                      num_query_groups=groups)  # fmt: skip
    padded = cfg.padded_vocab_size()
    for tp in (t for t in range(1, groups + 1) if groups % t == 0):
        cfg.check_parallel(tp)
        assert padded % tp == 0
    assert padded % 128 == 0 and vocab_size <= padded < vocab_size + 128 * groups
    if groups in (1, 2, 8):
        assert padded == -(-vocab_size // 128) * 128  # LLaMA's 32000 stays 32000
    assert LlamaConfig(vocab_size=100, make_vocab_size_divisible_by=1, hidden_size=96, num_attention_heads=6,
                       num_query_groups=3).padded_vocab_size() == 102  # fmt: skip


def test_fused_torch_adam_makes_the_same_updates(model_checks):
    """The trainer switches torch's AdamW to its fused CPU kernel; 3 steps match the for-loop AdamW."""
    record = model_checks["check_fused_torch_adam"]
    assert record["fused_flags"]["True"] == ["True"]
    assert record["max_abs_param_diff"] < 1e-5 * record["max_abs_param"]


def test_finetune_load_survives_the_first_bf16_step(model_checks):
    """bf16 finetuning (the default on GPUs): the first optimizer step keeps the loaded weights instead of
    copying the optimizer's fp32 main params, still the random initialization, back into the model."""
    record = model_checks["check_finetune_load_bf16"]
    assert record["dtype"] == "torch.bfloat16"
    # lr 1e-9: the step moves no weight by more than bf16 rounding of a ~1e-9 update near zero
    assert record["load_weights_only"]["after_load"] == 0.0 and record["load_weights_only"]["after_step"] < 1e-6
    # without the refresh the step restores the initialization: the check can tell the two apart
    assert record["model_only_load"]["after_load"] == 0.0 and record["model_only_load"]["after_step"] > 0.01


def test_grad_accumulation_fusion_matches_the_unfused_gradients(model_checks):
    """With cpu_speed the weight-gradient GEMMs accumulate straight into DDP's main_grad (megatron's
    gradient_accumulation_fusion, Apex's kernel on GPUs): same gradients as the unfused path."""
    record = model_checks["check_grad_accumulation_fusion"]
    # 2 layers x (QKV, proj, fc1, fc2) + output layer go through the fused accumulation; none unfused
    assert record["flags"] == {"True": True, "calls_True": 9, "False": False, "calls_False": 0}
    assert record["grad_norm"] > 0 and record["grads_rel"] < 1e-6, record


def test_validation_loss_is_over_the_real_vocabulary(model_checks):
    """One perplexity per checkpoint: the trainer's validation loss is the evaluation tools' mean NLL over
    the real vocabulary (200 of 256 padded rows), whatever the padding rows hold."""
    r = model_checks["check_validation_loss_over_real_vocabulary"]
    assert r["before"]["validation"] == pytest.approx(r["reference"], rel=1e-6)
    assert r["after"]["validation"] == pytest.approx(r["before"]["validation"], rel=1e-6)
    # megatron's cross entropy (the training loss) normalizes over the padding rows too
    assert r["after"]["ce"] > r["before"]["ce"] + 0.1


def test_local_compiled_is_asked_for_never_chosen():
    """``local_compiled`` is opt-in: ``auto`` never picks it; a misspelt spec is one error naming them all."""
    from megatron_resonance.megatron.llama import SPECS, resolve_spec

    assert resolve_spec("local_compiled") == "local_compiled"
    assert resolve_spec("auto") in ("te", "local")
    with pytest.raises(ValueError) as info:
        resolve_spec("local_compile")
    assert str(info.value) == f"unknown layer spec 'local_compile'; expected one of {', '.join(SPECS)}"
    assert "local_compiled" in SPECS and "\n" not in str(info.value)
