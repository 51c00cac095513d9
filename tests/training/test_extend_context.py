"""``finetune/extend_context.py``: load a pretrained checkpoint, switch the rope (Resonance YaRN by default,
s = new length / stored length), train at the longer length with a fresh optimizer, scheduler and
iteration count, under the paper's recipe (AdamW, lr 2e-5, weight decay 0.01, 5 % warm-up)."""

from __future__ import annotations

import importlib.util
import json

import pytest

from megatron_resonance.errors import ConfigError
from megatron_resonance.training import launch
from tests.training.conftest import EXTEND, ITERS, TINY_RUN, records, stored_config, train_losses

# ---------------------------------------------------------------- the run (2 processes) ---------------------


@pytest.mark.slow
def test_stored_rope_is_extended(run_extend, run_a):
    stored = stored_config(run_extend["save"] / f"iter_{ITERS:07d}")
    rope = stored["model"]["rope"]
    assert rope["kind"] == "resonance_yarn" and rope["resonance"] is True
    assert rope["factor"] == 2.0  # 64 / 32
    assert rope["original_max_position"] == 32  # the pretrained length
    assert rope["base"] == 10000.0 and rope["head_dim"] == 16
    assert stored["model"]["max_position_embeddings"] == 64
    pretrained = stored_config(run_a / f"iter_{ITERS:07d}")["model"]
    for key in ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups"):
        assert stored["model"][key] == pretrained[key]


@pytest.mark.slow
def test_fresh_iteration_count(run_extend, run_a):
    save = run_extend["save"]
    assert [r["iteration"] for r in records(save) if "loss" in r] == list(range(1, ITERS + 1))
    assert (save / "latest_checkpointed_iteration.txt").read_text() == str(ITERS)
    assert sorted(p.name for p in save.glob("iter_*")) == [f"iter_{ITERS:07d}"]
    loaded = f"loaded model weights from {run_a / f'iter_{ITERS:07d}'} (finetune: fresh optimizer and count)"
    assert loaded in run_extend["proc"].stdout
    # the pretrained weights were loaded: the first loss is far below a fresh model's ln(256) = 5.55
    assert train_losses(save)[1] < train_losses(run_a)[1] - 0.5


@pytest.mark.slow
def test_paper_recipe_defaults(run_extend):
    run = stored_config(run_extend["save"] / f"iter_{ITERS:07d}")["run"]
    o = run["optimizer"]
    assert o["optimizer"] == "adam"  # AdamW: megatron's Adam with decoupled weight decay
    assert (o["lr"], o["min_lr"], o["weight_decay"], o["lr_warmup_fraction"]) == (2e-5, 2e-5, 0.01, 0.05)
    assert run["checkpoint"]["finetune"] is True
    assert run["data"]["seq_length"] == 64
    lrs = [r["lr"] for r in records(run_extend["save"]) if "lr" in r]
    # 5 % of 20 iterations = 1 warm-up step, then constant
    assert lrs == [pytest.approx(2e-5, rel=1e-12)] * ITERS


# ---------------------------------------------------------------- the configuration (this process) ---------


def write_pretrained(path, **model_fields):
    """A checkpoint as make_config and validation read it: the tracker, megatron_resonance.json (length 32
    unless ``model_fields`` say otherwise) and the files ``verify_checkpoint`` checks (no weights)."""
    from megatron_resonance.training.config import config_from_args
    from tests.fake_checkpoint import add_dist_files

    model = config_from_args(launch.make_parser("x", "").parse_args(TINY_RUN)).model.to_dict()
    rope = model_fields.pop("rope", {})
    model.update(model_fields)
    model["rope"].update(rope)
    ckpt = path / "iter_0000100"
    ckpt.mkdir(parents=True)
    (ckpt / "megatron_resonance.json").write_text(json.dumps({"model": model, "run": {}, "iteration": 100}))
    add_dist_files(ckpt)
    (path / "latest_checkpointed_iteration.txt").write_text("100")
    return path


@pytest.fixture
def pretrained(tmp_path):
    return write_pretrained(tmp_path / "pretrained")


def make_config(*argv):
    spec = importlib.util.spec_from_file_location("extend_context_script", EXTEND)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.make_config(launch.make_parser("extend_context.py", "").parse_args(list(map(str, argv))))


def test_defaults(pretrained):
    cfg = make_config("--load", pretrained, "--seq-length", 128)
    rope = cfg.model.rope
    assert (rope.kind, rope.factor, rope.original_max_position, rope.base) == ("resonance_yarn", 4.0, 32, 10000.0)
    assert cfg.model.max_position_embeddings == 128
    o = cfg.optimizer
    assert (o.lr, o.min_lr, o.weight_decay, o.lr_warmup_fraction, o.lr_decay_style) == (
        2e-5, 2e-5, 0.01, 0.05, "constant",
    )  # fmt: skip
    assert cfg.checkpoint.finetune and cfg.checkpoint.load == str(pretrained)
    assert cfg.model.hidden_size == 64 and cfg.model.num_query_groups == 2  # the stored shape


def test_flags_override_the_recipe_and_the_plan(pretrained):
    cfg = make_config(
        "--load", pretrained, "--seq-length", 128, "--lr", 1e-4, "--weight-decay", 0.05,
        "--lr-warmup-fraction", 0.1, "--rope-kind", "yarn", "--original-max-position", 16, "--rotary-base", 5e5,
    )  # fmt: skip
    o = cfg.optimizer
    assert (o.lr, o.weight_decay, o.lr_warmup_fraction) == (1e-4, 0.05, 0.1)
    rope = cfg.model.rope
    assert (rope.kind, rope.original_max_position, rope.factor, rope.base) == ("yarn", 16, 8.0, 5e5)


def test_explicit_factor_wins(pretrained):
    cfg = make_config("--load", pretrained, "--seq-length", 64, "--rope-factor", 8)
    assert cfg.model.rope.factor == 8.0
    assert cfg.model.max_position_embeddings == 256  # room for the factor's target length 8 x 32


# ---------------------------------------------------------------- sources that already carry scaling -------


def test_llama3_source_keeps_its_scaling(tmp_path, capsys):
    """A Llama-3.1-style source (original 16, factor 8, stored length 32 = 2 x 16 x ... not 16 x 8): the
    plan stays llama3 with the source's original length, and the factor grows with the length."""
    rope = dict(kind="llama3", base=500000.0, original_max_position=16, factor=8.0, high_freq_factor=2.0)
    src = write_pretrained(tmp_path / "llama3", max_position_embeddings=32, rope=rope)
    cfg = make_config("--load", src, "--seq-length", 128, "--rope-kind", "llama3")
    r = cfg.model.rope
    assert (r.kind, r.original_max_position, r.factor, r.base, r.high_freq_factor) == (
        "llama3", 16, 32.0, 500000.0, 2.0,
    )  # fmt: skip
    assert cfg.model.max_position_embeddings == 512  # 16 x 32
    assert "[extend] rope llama3: original length 16 (the source's original length), factor 32 (8 x 128 / 32)" in (
        capsys.readouterr().out
    )
    with_resonance = make_config("--load", src, "--seq-length", 128, "--rope-kind", "llama3", "--resonance")
    assert with_resonance.model.rope.resonance and with_resonance.model.rope.factor == 32.0


def test_scaled_source_is_not_switched_silently(tmp_path):
    rope = dict(kind="llama3", original_max_position=16, factor=8.0)
    src = write_pretrained(tmp_path / "llama3", max_position_embeddings=128, rope=rope)
    with pytest.raises(
        ConfigError,
        match=r"already carries llama3 rope scaling \(factor 8 over original length "
        r"16\); resonance_yarn would drop it: extend it with --rope-kind llama3",
    ):
        make_config("--load", src, "--seq-length", 512)  # the default kind, resonance_yarn
    with pytest.raises(ConfigError, match="does not extend the stored length 128"):
        make_config("--load", src, "--seq-length", 128, "--rope-kind", "llama3")


def test_yarn_source_extended_again(tmp_path):
    """A YaRN model (32 -> 64) extended to 256 with Resonance YaRN: the original length stays 32, s = 8."""
    rope = dict(kind="yarn", original_max_position=32, factor=2.0, beta_fast=16.0)
    src = write_pretrained(tmp_path / "yarn", max_position_embeddings=64, rope=rope)
    r = make_config("--load", src, "--seq-length", 256).model.rope
    assert (r.kind, r.original_max_position, r.factor, r.beta_fast) == ("resonance_yarn", 32, 8.0, 16.0)


def test_yaml_rope_fields_are_kept(pretrained, tmp_path, capsys):
    """Rope fields a --config sets are used as given, never replaced by derived ones."""
    yaml_file = tmp_path / "extend.yaml"
    yaml_file.write_text("model:\n  rope:\n    kind: yarn\n    factor: 8.0\n    original_max_position: 16\n")
    cfg = make_config("--config", yaml_file, "--load", pretrained, "--seq-length", 64)
    r = cfg.model.rope
    assert (r.kind, r.factor, r.original_max_position) == ("yarn", 8.0, 16)
    assert cfg.model.max_position_embeddings == 128
    assert "original length 16 (given), factor 8 (given)" in capsys.readouterr().out
