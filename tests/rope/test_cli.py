"""``tools/rope_report.py`` as a user runs it: a subprocess with this interpreter."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.launch import child_env, load_tool
from tests.rope import reference as ref

REPO = Path(__file__).resolve().parents[2]

ACCEPTANCE = [
    "--kind", "resonance_yarn", "--head-dim", "128", "--base", "10000",
    "--original-max-position", "4096", "--factor", "8",
]  # fmt: skip


BAD_ARGUMENTS = {
    "factor<1": (["--factor", "0.5"], "--factor"),
    "odd head dim": (["--head-dim", "127"], "--head-dim"),
    "base<=1": (["--base", "1"], "--base"),
    "unknown kind": (["--kind", "alibi"], "alibi"),
}


def _start(*args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, str(REPO / "tools" / "rope_report.py"), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
        env=child_env(),
    )


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Start every CLI run of this file at once (each pays a torch import), then collect them."""
    png = tmp_path_factory.mktemp("plot") / "x.png"
    procs = {
        "table": _start(*ACCEPTANCE),
        "json": _start(*ACCEPTANCE, "--json"),
        "rope json + plot": _start(
            "--kind", "rope", "--head-dim", "32", "--original-max-position", "512", "--json", "--plot", str(png)
        ),
    }
    procs.update({name: _start(*args) for name, (args, _) in BAD_ARGUMENTS.items()})
    results = {"png": png}
    try:
        for name, proc in procs.items():
            out, err = proc.communicate(timeout=300)
            results[name] = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
    return results


def test_acceptance_command_prints_the_summary_table(runs):
    r = runs["table"]
    assert r.returncode == 0, r.stderr
    out = r.stdout.splitlines()
    assert out[0] == "kind=resonance_yarn head_dim=128 base=10000 factor=8 L=4096 L'=32768"
    m = ref.yarn_attention_factor(8.0)
    assert out[1] == f"attention_factor={m:.6f} (attention logits x {m * m:.6f})"
    assert out[2] == "pre-critical features (wavelength < L): 39 of 64; critical dim: 39"
    assert out[3] == "max feature gap over pre-critical features: 0.000e+00 rad"
    rows = [line.split() for line in out[6:]]
    assert len(rows) == 64
    wavelengths = ref.resonance_wavelengths(ref.yarn(128, 1e4, 4096, 8.0))
    for i, row in enumerate(rows):
        assert int(row[0]) == i
        assert float(row[2]) == wavelengths[i]
        assert row[3] == ("yes" if i < 39 else "no")
    assert all(float(row[4]) == 0.0 for row in rows[:39])


def test_acceptance_command_json(runs):
    r = runs["json"]
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    assert len(lines) == 1
    data = json.loads(lines[0])
    assert isinstance(data, dict)
    for key in ("inv_freq", "attention_factor", "wavelengths", "pre_critical", "feature_gap"):
        assert key in data
    inv = ref.frequencies("resonance_yarn", 128, 1e4, 4096, 8.0)
    assert len(data["inv_freq"]) == 64 and all(isinstance(x, float) for x in data["inv_freq"])
    np.testing.assert_allclose(data["inv_freq"], inv, rtol=1e-7)  # the JSON carries fp32 values
    assert data["attention_factor"] == pytest.approx(0.1 * math.log(8) + 1, rel=1e-14)
    assert data["wavelengths"] == ref.resonance_wavelengths(inv).tolist()
    assert data["pre_critical"] == 39 and data["critical_dim"] == 39
    assert len(data["feature_gap"]) == 64
    assert data["feature_gap"][:39] == [0.0] * 39
    assert data["target_max_position"] == 32768


def test_json_for_plain_rope_has_gaps_and_fractional_wavelengths(runs):
    r = runs["rope json + plot"]
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    np.testing.assert_allclose(data["inv_freq"], ref.rope(32, 1e4), rtol=1e-7)
    np.testing.assert_allclose(data["wavelengths"], 2 * np.pi / ref.rope(32, 1e4), rtol=1e-12)
    assert data["attention_factor"] == 1.0
    assert data["target_max_position"] == 1024  # 2L when s = 1
    pre = data["pre_critical"]
    assert pre == int((2 * np.pi / ref.rope(32, 1e4) < 512).sum())
    assert max(data["feature_gap"][:pre]) > 0


def test_plot_writes_a_png(runs):
    r, path = runs["rope json + plot"], runs["png"]
    assert r.returncode == 0, r.stderr
    json.loads(r.stdout)  # with --json, stdout stays one JSON object
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert data[12:16] == b"IHDR" and data[-8:-4] == b"IEND"
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert width > 100 and height > 100


@pytest.mark.parametrize("name", BAD_ARGUMENTS)
def test_bad_arguments_print_one_line_and_exit_2(runs, name):
    r, needle = runs[name], BAD_ARGUMENTS[name][1]
    assert r.returncode == 2
    assert r.stdout == ""
    lines = r.stderr.splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("rope_report.py: error:")
    assert needle in lines[0]


@pytest.mark.parametrize(
    "args",
    [["--base", "0.5"], ["--base", "inf"], ["--factor", "nan"], ["--factor", "eight"], ["--no-such-flag"],
     ["--head-dim", "0"], ["--original-max-position", "0"], ["--target-max-position", "-5"]],
)  # fmt: skip
def test_more_bad_arguments_in_process(args, capsys):
    # the same main() the subprocess runs, without paying a torch import per case
    main = load_tool("rope_report").main

    with pytest.raises(SystemExit) as exc:
        main(args)
    assert exc.value.code == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert len(err.splitlines()) == 1 and err.startswith("rope_report.py: error:"), err
