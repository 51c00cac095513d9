"""The layout planner (megatron_resonance/layout_planner.py, its estimate planning.py, tools/plan_layout.py):
the estimate's arithmetic, the layouts it picks for the documented cases, the command line (Megatron
checkpoint, Hugging Face directory, preset), bad input in one line, and the evaluation tools proposing a
layout. No model is built here; the estimate against measured memory is test_measured.py."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from megatron_resonance import layout_planner, planning
from megatron_resonance.errors import ConfigError
from megatron_resonance.layout_planner import Hardware, plan
from megatron_resonance.planning import GiB, Layout, ModelShape, training_estimate
from tests.fake_checkpoint import add_dist_files
from tests.launch import REPO, child_env, load_tool

LLAMA2_7B = ModelShape(32, 4096, 11008, 32, 32, 32000)
LLAMA3_8B = ModelShape(32, 4096, 14336, 32, 8, 128256)
PLAN = REPO / "tools" / "plan_layout.py"


def test_training_estimate_arithmetic():
    """LLaMA-2 7B at 32K, TP=2 x CP=4 on one 8-GPU node: every part written out (docs/long_context.md)."""
    lay = Layout(tp=2, cp=4, dp=1, sequence_parallel=True, num_microbatches=8)
    est = training_estimate(LLAMA2_7B, 32768, lay)
    params = (32 * LLAMA2_7B.layer_parameters + 2 * 32000 * 4096) / 2 + 4096
    assert est.parts["weights"] == pytest.approx(2 * params)
    assert est.parts["gradients"] == pytest.approx(4 * params)
    assert est.parts["optimizer"] == pytest.approx(12 * params / 4)  # sharded over DP x CP = 4
    h, f = 4096, 11008
    layer = 8192 * 2 * (4 * h + 2 * h + 2 * h + 3 * f) / 2 + 8192 * 32 / 2 * 4
    assert est.parts["activations"] == pytest.approx(32 * layer)
    assert est.parts["logits/backward"] == pytest.approx(max(8192 * 32000 / 2 * 6, layer / 2))
    assert 40 * GiB < est.total < 50 * GiB


def test_generation_adds_the_key_value_cache():
    """Decoding holds every layer's keys and values: LLaMA-3 8B (8 KV heads of 128) in bf16 at 32K, TP=2 x PP=2."""
    plain = planning.forward_estimate(LLAMA3_8B, 32768, tp=2, pp=2, dtype_bytes=2)
    decoding = planning.forward_estimate(LLAMA3_8B, 32768, tp=2, pp=2, dtype_bytes=2, generate=True)
    assert decoding.parts["kv_cache"] == 2 * 16 * 32768 * 1024 / 2 * 2 == 1 * GiB
    assert decoding.total == pytest.approx(plain.total + GiB)


def test_recomputation_pipeline_and_sharding_lower_what_they_should():
    base = Layout(tp=2, cp=2, dp=2, num_microbatches=4)
    full = training_estimate(LLAMA2_7B, 32768, Layout(**{**base.__dict__, "recompute": "full"}))
    none = training_estimate(LLAMA2_7B, 32768, base)
    assert full.parts["activations"] < none.parts["activations"] / 10
    more_dp = training_estimate(LLAMA2_7B, 32768, Layout(**{**base.__dict__, "dp": 4}))
    assert more_dp.parts["optimizer"] == pytest.approx(none.parts["optimizer"] / 2)
    assert more_dp.parts["weights"] == none.parts["weights"]
    # 1F1B: the first of 4 stages holds 4 micro-batches of its 8 layers, the same as all 32 layers of one
    pp = training_estimate(LLAMA2_7B, 32768, Layout(**{**base.__dict__, "pp": 4, "dp": 1}))
    assert pp.parts["activations"] == pytest.approx(none.parts["activations"])
    assert pp.parts["weights"] < none.parts["weights"] / 3


def test_plans_for_the_documented_cases():
    seven = plan(LLAMA2_7B, 32768, Hardware(1, 8, 80))
    lay = seven.chosen.layout
    assert (lay.tp, lay.pp, lay.cp, lay.dp, lay.recompute) == (2, 1, 2, 2, "none")
    assert seven.chosen.estimate.total <= seven.hardware.usable_bytes
    assert seven.tokens_per_step == 8 * 32768
    eight = plan(LLAMA3_8B, 131072, Hardware(8, 8, 80))
    lay = eight.chosen.layout
    assert (lay.tp, lay.pp, lay.cp, lay.dp, lay.recompute) == (2, 1, 8, 4, "none")
    # every cheaper layout tried does not fit
    assert all(not c.fits for c in eight.tried if c.cost < eight.chosen.cost)
    line = layout_planner.sbatch_line(eight, load="ckpt/llama3-8b")
    assert line == (
        'LOAD=ckpt/llama3-8b TP=2 PP=1 CP=8 GPUS_PER_NODE=8 TRAIN_ARGS="--seq-length 131072 '
        '--micro-batch-size 1 --global-batch-size 64 --sequence-parallel" sbatch --nodes=8 '
        "slurm/extend_context.sbatch"
    )


def test_recomputation_when_nothing_else_fits():
    """One 80 GB GPU, LLaMA-2 7B at 4K: no model parallelism is possible, so full recomputation."""
    two = plan(ModelShape(16, 2048, 5632, 16, 16, 32000), 65536, Hardware(1, 1, 80))
    assert two.chosen.layout.recompute == "full" and two.chosen.layout.model_parallel == 1
    assert "recomputation" in two.why
    assert (
        "--recompute-granularity full --recompute-method uniform --recompute-num-layers 1"
        in layout_planner.sbatch_line(two)
    )


def test_the_preset_layouts_fit_by_the_planner():
    """The presets' own layouts (configs/llama2_*), under the planner's estimate, fit an 80 GB GPU."""
    thirteen = ModelShape(40, 5120, 13824, 40, 40, 32000)
    for shape, seq, tp, cp in ((LLAMA2_7B, 32768, 2, 4), (thirteen, 16384, 4, 2)):
        est = training_estimate(shape, seq, Layout(tp=tp, cp=cp, dp=1, num_microbatches=8))
        assert est.total < Hardware(1, 8, 80).usable_bytes


# ----------------------------------------------------------------------------------------------------------
# The command line
# ----------------------------------------------------------------------------------------------------------


def _plan(*args) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(PLAN), *map(str, args)],
        cwd=REPO,
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """A Megatron checkpoint (only what resolve() reads) and a Hugging Face directory, LLaMA-2 7B's shape."""
    from megatron_resonance.megatron.llama import LlamaConfig

    root = tmp_path_factory.mktemp("planner")
    ckpt = root / "ckpt"
    (ckpt / "iter_0000000").mkdir(parents=True)
    (ckpt / "latest_checkpointed_iteration.txt").write_text("0")
    cfg = LlamaConfig(
        num_layers=32,
        hidden_size=4096,
        ffn_hidden_size=11008,
        num_attention_heads=32,
        num_query_groups=32,
        vocab_size=32000,
        max_position_embeddings=4096,
    )
    (ckpt / "iter_0000000" / "megatron_resonance.json").write_text(json.dumps({"model": cfg.to_dict()}))
    add_dist_files(ckpt / "iter_0000000")
    hf = root / "hf"
    hf.mkdir()
    (hf / "config.json").write_text(
        json.dumps(
            dict(
                architectures=["LlamaForCausalLM"],
                model_type="llama",
                num_hidden_layers=32,
                hidden_size=4096,
                intermediate_size=14336,
                num_attention_heads=32,
                num_key_value_heads=8,
                vocab_size=128256,
                max_position_embeddings=8192,
                rope_theta=500000.0,
            )
        )
    )
    return ckpt, hf


def test_command_line_checkpoint_hf_and_preset(sources):
    ckpt, hf = sources
    out = _plan("--load", ckpt, "--seq-length", 32768, "--nodes", 1, "--gpus-per-node", 8, "--gpu-memory-gb", 80)
    assert out.returncode == 0, out.stderr
    text = out.stdout
    for expected in (
        "layout         TP=2 PP=1 CP=2 DP=2, sequence parallel",
        "recomputation  none",
        "tokens/step    262,144",
        "memory/GPU",
        "why",
        f"LOAD={ckpt} TP=2 PP=1 CP=2 GPUS_PER_NODE=8",
    ):
        assert expected in text, text
    out = _plan("--hf", hf, "--seq-length", 131072, "--nodes", 8, "--json")
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout)
    assert (got["tensor_model_parallel_size"], got["context_parallel_size"], got["data_parallel_size"]) == (2, 8, 4)
    assert got["tokens_per_step"] == 64 * 131072 and got["memory_gib_per_gpu"] <= got["usable_gib_per_gpu"]
    assert got["sbatch"].endswith("sbatch --nodes=8 slurm/extend_context.sbatch")
    # a preset: its length and batch sizes, its shape from --model, CONFIG= on the sbatch line
    preset = "configs/llama2_13b_4k_to_16k_resonance_yarn.yaml"
    got = json.loads(_plan("--model", "llama2-13b", "--config", preset, "--json").stdout)
    assert (got["seq_length"], got["global_batch_size"]) == (16384, 8)
    assert got["sbatch"].startswith(f"CONFIG={preset} LOAD=CKPT TP=4 PP=1 CP=1")


@pytest.mark.parametrize(
    "args, message",
    [
        (
            ["--model", "llama2-7b", "--seq-length", 1048576, "--nodes", 1],
            "no layout fits length 1048576 on 1 x 8 GPUs of 80 GiB (70.2 GiB usable): tried 40 layouts (TP 1,2,4,8, "
            "CP 1,2,4,8, PP 1,2,4,8, recomputation none/full); closest: TP=8 x PP=1 x CP=1 x DP=1, full "
            "recomputation at",
        ),
        (["--seq-length", 4096], "no model: give --load MEGATRON_DIR, --hf HF_DIR or --model"),
        (["--config", "configs/llama2_7b_4k_to_32k_resonance_yarn.yaml"], "sets no model shape"),
        (["--model", "llama2-7b"], "no target length: give --seq-length"),
        (["--model", "llama2-7b", "--seq-length", 0], "--seq-length must be an integer >= 1, got 0"),
        (["--model", "llama2-7b", "--seq-length", 4096, "--gpu-memory-gb", -1], "--gpu-memory-gb must be > 0"),
        (
            ["--model", "llama2-7b", "--seq-length", 4096, "--global-batch-size", 3, "--micro-batch-size", 2],
            "--global-batch-size 3 is not a multiple of --micro-batch-size 2",
        ),
        (["--load", "/no/such/ckpt", "--seq-length", 4096], "--load /no/such/ckpt: no such file or directory"),
        (["--model", "llama2-7b", "--hf", "/tmp", "--seq-length", 4096], "give one model"),
    ],
)
def test_bad_input_is_one_line(args, message):
    out = _plan(*args)
    assert out.returncode == 2 and out.stdout == ""
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert out.stderr.startswith("plan_layout.py: error: ") and message in out.stderr, out.stderr


# ----------------------------------------------------------------------------------------------------------
# The evaluation tools propose a layout
# ----------------------------------------------------------------------------------------------------------


def test_eval_tools_propose_the_layout_that_fits(sources, tmp_path, capsys):
    ckpt, hf = sources
    perplexity, passkey = load_tool("eval_perplexity"), load_tool("eval_passkey")
    # LLaMA-2 7B in fp32 at 16K: 25 GiB of weights and 6 of logits at TP=1; 30 GiB per process fits at TP=2
    argv = [
        "--load",
        str(ckpt),
        "--lengths",
        "4096,16384",
        "--max-memory-gb",
        "30",
        "--out",
        str(tmp_path / "o"),
        "--tensor-model-parallel-size",
        "1",
    ]
    with pytest.raises(SystemExit) as info:
        perplexity.main(argv)
    err = capsys.readouterr().err
    assert info.value.code == 2 and len(err.strip().splitlines()) == 1, err
    assert f"length 16384 does not fit for {ckpt.name}: a forward pass needs about" in err
    assert (
        "per process at TP=1 x CP=1 (micro-batch 1), memory available 30.0 GiB; fits at TP=2 x CP=1: "
        f"torchrun --nproc-per-node 2 tools/eval_perplexity.py --load {ckpt} --lengths 4096,16384 "
        f"--max-memory-gb 30 --out {tmp_path / 'o'} --tensor-model-parallel-size 2" in err
    ), err
    assert not (tmp_path / "o").exists()
    # a Hugging Face model: the Megatron conversion's layout (passkey's main has the same wrapper; its
    # tokenizer is checked first)
    with pytest.raises(SystemExit):
        perplexity.main(["--hf", str(hf), "--lengths", "65536", "--max-memory-gb", "30", "--out", "p"])
    err = capsys.readouterr().err
    assert (
        "its Megatron conversion (tools/convert_hf_to_megatron.py --save CKPT) fits at TP=8 x CP=1: torchrun "
        "--nproc-per-node 8 tools/eval_perplexity.py --load CKPT --lengths 65536 --max-memory-gb 30 --out p "
        "--tensor-model-parallel-size 8" in err
    ), err
    assert "memory" in passkey.main.__code__.co_names
    # RULER decodes: the key/value cache counts, and no CP layout is proposed (generation runs without CP)
    with pytest.raises(SystemExit):
        load_tool("eval_ruler").main(
            ["--load", str(ckpt), "--lengths", "65536", "--samples", "1", "--max-memory-gb", "30", "--out", "r"]
        )
    err = capsys.readouterr().err
    assert f"generation up to 65664 tokens does not fit for {ckpt.name}: it needs about 123.8 GiB" in err, err
    assert "fits at TP=8 x CP=1: torchrun --nproc-per-node 8 tools/eval_ruler.py" in err, err
    assert "--context-parallel-size" not in err
    # nothing fits: said so
    with pytest.raises(SystemExit):
        perplexity.main(["--load", str(ckpt), "--lengths", "16384", "--max-memory-gb", "0.5", "--out", "o"])
    assert "no layout up to 64 processes fits" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------------------
# The recomputation flags a planned layout uses (they train: test_measured.py)
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "flags, message",
    [
        ({"recompute_granularity": "some"}, "unknown --recompute-granularity 'some'; expected one of full, selective"),
        ({"recompute_granularity": "full"}, "--recompute-granularity full needs --recompute-method uniform or block"),
        (
            {"recompute_granularity": "full", "recompute_method": "uniform"},
            "--recompute-num-layers must be between 1 and the 4 layers of a pipeline stage, got None",
        ),
        (
            {"recompute_granularity": "full", "recompute_method": "block", "recompute_num_layers": 3},
            "--recompute-num-layers must be between 1 and the 2 layers of a pipeline stage, got 3",
        ),
        (
            {"recompute_granularity": "selective", "recompute_num_layers": 1},
            "--recompute-granularity selective takes no --recompute-method",
        ),
        (
            {"recompute_method": "uniform"},
            "--recompute-method/--recompute-num-layers need --recompute-granularity full",
        ),
    ],
)
def test_recompute_flags_are_checked_in_one_line(flags, message):
    from megatron_resonance.training.config import from_dict
    from megatron_resonance.training.config_checks import check

    pp = 2 if flags.get("recompute_method") == "block" else 1
    cfg = from_dict(
        {
            "model": {"num_layers": 4},
            "data": {"mock_data": True, "global_batch_size": 8},
            "parallel": {"pipeline_model_parallel_size": pp, **flags},
        }
    )
    with pytest.raises(ConfigError, match="^" + __import__("re").escape(message)):
        check(cfg, world_size=pp)


def test_recompute_flags_reach_the_transformer_config():
    from megatron_resonance.training.config import ParallelConfig, recompute_settings

    assert recompute_settings(ParallelConfig()) == {}
    p = ParallelConfig(recompute_granularity="full", recompute_method="block", recompute_num_layers=2)
    assert recompute_settings(p) == dict(recompute_granularity="full", recompute_method="block", recompute_num_layers=2)
