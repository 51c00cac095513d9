"""``compat``: the supported window of megatron-core releases, checked when ``megatron_resonance.megatron`` is
imported, and refused in one line outside it."""

from __future__ import annotations

import os
import subprocess
import sys
import types
from pathlib import Path

import megatron.core
import pytest

from megatron_resonance.megatron import compat

REPO = Path(__file__).resolve().parents[2]


def test_installed_release_is_read_without_importing_megatron(monkeypatch):
    monkeypatch.delitem(sys.modules, "megatron.core")  # the file, not the module's attribute
    assert compat.installed_version() == compat.public_version(megatron.core.__version__)
    assert compat.release(megatron.core.__version__) in compat.WINDOW


def test_the_local_part_of_a_version_is_not_the_release():
    assert compat.public_version("0.19.2+d2cd80c") == "0.19.2" == compat.public_version("0.19.2")


@pytest.mark.parametrize("version", ["0.15.0", "0.15.3", "0.16.1", "0.16.2rc0", "0.19.2", "0.19.2+d2cd80c"])
def test_releases_in_the_window_pass(version):
    assert compat.check_version(version) == version


@pytest.mark.parametrize("version", ["0.14.0", "0.17.0", "0.18.2", "0.20.0", "1.16.0", "dev"])
def test_releases_outside_the_window_are_refused_in_one_line(version, monkeypatch):
    monkeypatch.setattr(sys, "excepthook", lambda *a: None)  # the check leaves another hook alone
    with pytest.raises(ImportError) as e:
        compat.check_version(version)
    assert isinstance(e.value, compat.UnsupportedMegatronCore)
    assert str(e.value) == (
        f"megatron-resonance supports megatron-core 0.15.x, 0.16.x and 0.19.x; found {version}: "
        "pip install 'megatron-core>=0.15,!=0.17.*,!=0.18.*,<0.20'"
    )


def test_the_window_is_setup_py_s():
    assert f'"{compat.REQUIREMENT}"' in (REPO / "setup.py").read_text()


@pytest.mark.parametrize("entry_point", ["pretrain/pretrain_llama.py", "tools/eval_passkey.py"])
def test_an_entry_point_shows_the_line_not_a_traceback(entry_point, tmp_path):
    """megatron-core 0.14.0 faked by a ``megatron/core/package_info.py`` ahead of the installed one: the entry
    point exits 1 with the one line (the check reads the file before anything imports megatron)."""
    core = tmp_path / "megatron" / "core"
    core.mkdir(parents=True)
    (core / "__init__.py").write_text("raise AssertionError('imported')\n")
    (core / "package_info.py").write_text('MAJOR = 0\nMINOR = 14\nPATCH = 0\nPRE_RELEASE = ""\n')
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), str(REPO)]))
    proc = subprocess.run(
        [sys.executable, entry_point, "--help"], cwd=REPO, env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 1, proc.stderr
    assert proc.stdout == ""
    assert proc.stderr.splitlines() == [
        "megatron-resonance supports megatron-core 0.15.x, 0.16.x and 0.19.x; found 0.14.0: "
        "pip install 'megatron-core>=0.15,!=0.17.*,!=0.18.*,<0.20'"
    ]


class _Mock015:
    """0.15.x's ``MockGPTLowLevelDataset``: ids ``1 .. len-1`` whatever the vocabulary, then the EOD."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.sequence_lengths = [600]

    def __getitem__(self, idx):
        return list(range(1, self.sequence_lengths[idx])) + [self.tokenizer.eod]


def test_0_15_mock_documents_stay_within_the_vocabulary(monkeypatch):
    from megatron.core.datasets import gpt_dataset

    monkeypatch.setattr(gpt_dataset, "MockGPTLowLevelDataset", _Mock015)
    monkeypatch.setattr(compat, "installed_release", lambda: (0, 15))
    compat.mock_tokens_within_vocabulary()
    compat.mock_tokens_within_vocabulary()  # once
    ids = _Mock015(types.SimpleNamespace(vocab_size=256, eod=0))[0]
    assert len(ids) == 600 and max(ids) == 255 and ids[-1] == 0
    assert list(ids[254:258]) == [255, 0, 1, 2]  # as 0.16's: modulo the vocabulary


def test_0_15_swiglu_fc1_is_built_with_stride_2(monkeypatch):
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.tensor_parallel import ColumnParallelLinear

    layer = get_gpt_layer_local_spec(normalization="RMSNorm")
    assert compat.mlp_submodules(compat.strided_gated_fc1(layer)).linear_fc1 is (
        ColumnParallelLinear if compat.installed_release() != (0, 15) else compat._strided_fc1()
    )
    monkeypatch.setattr(compat, "installed_release", lambda: (0, 15))
    fc1 = compat.mlp_submodules(compat.strided_gated_fc1(layer)).linear_fc1
    assert issubclass(fc1, ColumnParallelLinear) and fc1 is not ColumnParallelLinear
