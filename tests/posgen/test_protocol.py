"""``--protocol reference``: the reference code's test-time YaRN, its fingerprint apart from the clean protocol's,
and the clean protocol unchanged (no training here)."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest

from megatron_resonance.posgen import report
from megatron_resonance.posgen.benchmark import CONFIG_FILE, check_stored_settings
from megatron_resonance.posgen.cell import MODEL_VOCAB_SIZE, rope_config, scored_vocab_size
from megatron_resonance.posgen.presets import PRESETS, TRAINED_KINDS
from megatron_resonance.posgen.tasks import VOCAB_SIZE
from megatron_resonance.rope import RopeConfig, compute_frequencies
from tests.launch import REPO, load_tool
from tests.rope import reference

SMALL = PRESETS["small"]
REFERENCE = dataclasses.replace(SMALL, protocol="reference")


def _theta(i: int, d: int = 32, b: float = 10000.0) -> float:
    return b ** (-2 * i / d)


def test_reference_yarn_is_the_reference_codes():
    """The reference code's YaRNScaledRotaryEmbedding for PosGen: dim 32 (the small preset's heads), base
    10,000, max_position_embeddings = 256 + 1, scaling_factor = (256 + 1) / (64 + 1), beta_fast 2, beta_slow 1.
    Its correction range, by hand: d ln(257 / (2 pi beta)) / (2 ln b) = 5.24 (beta 2) and 6.45 (beta 1),
    so features 0..5 keep theta_i, 7..15 take theta_i / s, and feature 6 sits half-way on the ramp."""
    s = 257 / 65
    cfg = rope_config(REFERENCE, "yarn")
    assert (cfg.factor, cfg.beta_fast, cfg.beta_slow, cfg.correction_length) == (s, 2.0, 1.0, 257)
    freqs = compute_frequencies(cfg)
    got = freqs.inv_freq.tolist()
    for i in range(6):
        assert got[i] == pytest.approx(_theta(i), rel=1e-12)
    assert got[6] == pytest.approx(_theta(6) * (0.5 / s + 0.5), rel=1e-12)
    for i in range(7, 16):
        assert got[i] == pytest.approx(_theta(i) / s, rel=1e-12)
    assert freqs.attention_factor == pytest.approx(0.1 * math.log(257 / 65) + 1) == pytest.approx(1.1374688815)
    # the same from the independent YaRN reference, with the correction length passed as its L
    np.testing.assert_allclose(freqs.inv_freq.numpy(), reference.yarn(32, 10000.0, 257, s, 2.0, 1.0), rtol=1e-12)
    # Resonance YaRN rounds those wavelengths: 2 pi / theta_i = 6.28, 11.2, 19.9, 35.3, 62.8, 112, 317, ...
    rounded = compute_frequencies(rope_config(REFERENCE, "resonance_yarn")).wavelengths[:7].tolist()
    assert rounded == [6, 11, 20, 35, 63, 112, 317]


def test_correction_length_is_what_moves_the_ramp():
    """Taken at the original length (65) as YaRN defines it, the ramp would sit at features 2..5 instead."""
    cfg = rope_config(REFERENCE, "yarn")
    at_original = compute_frequencies(dataclasses.replace(cfg, correction_length=None)).inv_freq
    assert at_original[4].item() < _theta(4) and compute_frequencies(cfg).inv_freq[4].item() == _theta(4)
    with pytest.raises(ValueError, match="correction_length must be positive, got 0"):
        RopeConfig(kind="yarn", correction_length=0)


def test_reference_yarn_exports_per_feature():
    """transformers has no key for the correction length: the export encodes the frequencies one by one."""
    from megatron_resonance.hf.rope import rope_parameters

    assert rope_parameters(rope_config(REFERENCE, "yarn"), max_position=257)["rope_type"] == "longrope"
    assert rope_parameters(rope_config(SMALL, "yarn"), max_position=256)["rope_type"] == "yarn"


def test_clean_protocol_is_unchanged():
    """The clean YaRN is Hugging Face's (s = 4 at length 64, beta 32 / 1), scored over the 17 PosGen tokens, and
    the clean fingerprint is the one the stored small run was made with, so stored clean cells are reused."""
    cfg = rope_config(SMALL, "yarn")
    assert (cfg.factor, cfg.original_max_position, cfg.beta_fast, cfg.beta_slow, cfg.correction_length) == (
        4.0,
        64,
        32.0,
        1.0,
        None,
    )
    assert (
        rope_config(SMALL, "rope")
        == rope_config(REFERENCE, "rope")
        == RopeConfig(kind="rope", head_dim=32, original_max_position=64)
    )
    assert scored_vocab_size(SMALL) == VOCAB_SIZE and scored_vocab_size(REFERENCE) == MODEL_VOCAB_SIZE
    settings = json.loads((REPO / "benchmarks/results/posgen_small/report.json").read_text())["settings"]
    stored = {
        k: v
        for k, v in settings.items()
        if k
        not in (
            "name",
            "tasks",
            "seeds",
            "eval_batch_size",
            "validation_interval",
            "micro_batch_size",
            "bf16",
            "protocol",
        )
    }
    assert SMALL.fingerprint() == stored


def test_a_stored_run_of_the_other_protocol_is_refused(tmp_path):
    clean, ref = tmp_path / "clean", tmp_path / "reference"
    for out, preset in ((clean, SMALL), (ref, REFERENCE)):
        out.mkdir()
        (out / CONFIG_FILE).write_text(json.dumps({"preset": "small", "fingerprint": preset.fingerprint()}))
    assert REFERENCE.fingerprint() == {**SMALL.fingerprint(), "protocol": "reference"}
    check_stored_settings(str(clean), SMALL)
    check_stored_settings(str(ref), REFERENCE)
    for out, preset in ((clean, REFERENCE), (ref, SMALL)):
        with pytest.raises(ValueError, match="holds a benchmark run with other settings"):
            check_stored_settings(str(out), preset)


def test_report_names_its_protocol(tmp_path):
    from tests.posgen.test_report import _fake_cell

    preset = dataclasses.replace(PRESETS["smoke"], protocol="reference")
    for kind in TRAINED_KINDS:
        cell = _fake_cell(preset, "recursive", 0, kind, 0.9, 0.3)
        (tmp_path / report.cell_path("", "recursive", 0, kind)).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / report.cell_path("", "recursive", 0, kind)).write_text(json.dumps(cell))
    built = report.build_report(str(tmp_path), preset)
    assert built["protocol"] == built["settings"]["protocol"] == "reference"
    assert report.build_report(str(tmp_path), PRESETS["smoke"])["protocol"] == "clean"


def test_bad_protocol_input_is_one_line(capsys):
    tool = load_tool("posgen_benchmark")
    with pytest.raises(SystemExit) as e:
        tool.main(["--preset", "smoke", "--out", "/nonexistent/x", "--protocol", "paper"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "argument --protocol: invalid choice: 'paper'" in err[0]
    with pytest.raises(SystemExit) as e:
        tool.main(
            ["--preset", "smoke", "--out", "/nonexistent/x", "--protocol", "reference", "--set", "test_sequences=950"]
        )
    assert e.value.code == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "posgen_benchmark.py: error: --protocol reference: the reference protocol takes validation and test rows "
        "from the training rows: need validation_sequences + test_sequences <= train_sequences, got 100 + 950 > 1000"
    ]
    with pytest.raises(ValueError, match="unknown --protocol 'paper'; expected one of clean, reference"):
        dataclasses.replace(SMALL, protocol="paper")


def test_protocol_is_not_a_set_field():
    from megatron_resonance.posgen.presets import with_settings

    with pytest.raises(ValueError, match="--set protocol: not a preset setting"):
        with_settings(SMALL, {"protocol": "reference"})
