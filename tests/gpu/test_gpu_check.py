"""``make gpu-check`` on a machine without a GPU: the dry run through make (bundle, plan, results format), the
wheel bundle's manifest, and the pieces of a GPU run fed what a GPU run gives them (the last H200 benchmark,
a JUnit report written by pytest, a PosGen report), so the command cannot rot between GPU runs."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from megatron_resonance.megatron import compat
from tests.launch import REPO


def _tool(name: str):
    spec = importlib.util.spec_from_file_location(f"tool_{name}", REPO / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # (dataclasses look their module up there)
    spec.loader.exec_module(module)
    return module


gpu_check = _tool("gpu_check")
gpu_wheels = gpu_check.gpu_wheels
RESULTS = REPO / "benchmarks" / "results"


def _make(*args, timeout=120):
    return subprocess.run(
        ["make", "--no-print-directory", *args, f"GPU_PYTHON={sys.executable}"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _check_results_format(out: Path) -> dict:
    results = json.loads((out / "results.json").read_text())
    assert results["format"] == 1 and results["status"] in ("ok", "failed")
    assert list(results["sections"]) == list(gpu_check.SECTIONS)
    for name, section in results["sections"].items():
        assert section["status"] in gpu_check.STATUSES, name
        assert section["status"] == "ok" or section.get("reason"), f"{name}: a section not ok says why"
    markdown = (out / "results.md").read_text()
    for name in gpu_check.SECTIONS:
        assert f"| {name} | {results['sections'][name]['status']} |" in markdown
    return results


def test_dry_run_through_make(tmp_path):
    out = tmp_path / "gpu-run"
    proc = _make("gpu-check", "DRY_RUN=1", f"OUT={out}")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    results = _check_results_format(out)
    assert results["dry_run"] is True and results["status"] == "ok"
    assert results["budget_seconds"] == 480
    sections = results["sections"]
    # CI has no bundle (.whl/ is not in git): that is not a failure; a bundle that is there must match
    assert sections["environment"]["status"] == "ok"
    assert sections["environment"]["bundle"] in ("ok", "not downloaded")
    for name in gpu_check.SECTIONS[1:]:
        assert sections[name] == {"status": "not run", "reason": "dry run"}
    steps = [p["step"] for p in results["plan"]]
    assert steps == ["install", "environment", "tests", "benchmark", "demo", "posgen"]
    for step in results["plan"]:
        assert step["timeout_s"] > 0 and step["step"] in proc.stdout  # the plan is printed
        files = [t for t in step["command"].split() if t.endswith((".py", ".whl"))]
        assert files, step
        for token in files:
            path = Path(token) if os.path.isabs(token) else REPO / token
            if token.endswith(".whl"):  # a bundle file: named by the manifest, there or not
                assert path.parent == gpu_wheels.BUNDLE and path.name in {
                    w["file"] for w in gpu_wheels.load_manifest()["wheels"]
                }
            else:
                assert path.is_file(), f"{step['step']}: {token} does not exist"
    tests = next(p["command"] for p in results["plan"] if p["step"] == "tests")
    assert "-m gpu" in tests and "tests/gpu/test_training.py" in tests


def test_dry_run_fails_on_a_corrupt_bundle(tmp_path, monkeypatch, capsys):
    manifest = gpu_wheels.load_manifest()
    bundle = tmp_path / "whl"
    bundle.mkdir()
    for wheel in manifest["wheels"]:
        (bundle / wheel["file"]).write_bytes(b"not the wheel")
    monkeypatch.setattr(gpu_wheels, "BUNDLE", bundle)
    out = tmp_path / "out"
    assert gpu_check.main(["--out", str(out), "--dry-run"]) == 1
    results = _check_results_format(out)
    assert results["status"] == "failed" and results["sections"]["environment"]["bundle"] == "failed"
    assert "does not match its sha256" in results["sections"]["environment"]["reason"]
    assert "does not match its sha256" in capsys.readouterr().out


def test_plan_check_finds_what_went_missing(tmp_path, monkeypatch):
    """A flag a script no longer has, or a PosGen preset field that was renamed, fails the dry run."""
    check = gpu_check.Check(tmp_path, tmp_path / "work", sys.executable, 480, True, gpu_wheels.load_manifest())
    assert check.check_plan() == []
    next(s for s in check.steps if s.name == "benchmark").command.append("--no-such-flag")
    monkeypatch.setattr(gpu_check, "POSGEN_SLICE", [*gpu_check.POSGEN_SLICE[:-1], "test_seqs=100"])
    problems = check.check_plan()
    assert "benchmark: benchmarks/run.py has no --no-such-flag option" in problems
    assert any(p.startswith("posgen: ConfigError: --set test_seqs: not a preset setting") for p in problems)


def test_bundle_states(tmp_path):
    manifest = {
        **gpu_wheels.load_manifest(),
        "wheels": [
            {
                "file": f"{name}-1.0-py3-none-any.whl",
                "name": name,
                "version": "1.0",
                "requires": [],
                "sha256": gpu_wheels.hashlib.sha256(name.encode()).hexdigest(),
                "bytes": len(name),
            }
            for name in ("aa", "bb")
        ],
    }
    assert gpu_wheels.check_bundle(tmp_path, manifest)[0] == "not downloaded"
    (tmp_path / "aa-1.0-py3-none-any.whl").write_bytes(b"aa")
    with pytest.raises(gpu_wheels.BundleError, match="incomplete: bb-1.0"):
        gpu_wheels.check_bundle(tmp_path, manifest)
    (tmp_path / "bb-1.0-py3-none-any.whl").write_bytes(b"bb")
    (tmp_path / "other-2.0-py3-none-any.whl").write_bytes(b"?")  # not the manifest's: left alone
    assert gpu_wheels.check_bundle(tmp_path, manifest)[0] == "ok"
    (tmp_path / "bb-1.0-py3-none-any.whl").write_bytes(b"cc")
    with pytest.raises(gpu_wheels.BundleError, match="bb-1.0-py3-none-any.whl does not match its sha256"):
        gpu_wheels.check_bundle(tmp_path, manifest)
    command = gpu_wheels.install_command("python3", tmp_path, manifest, tmp_path / "site")
    assert command[command.index("--target") + 1] == str(tmp_path / "site") and "--no-index" in command
    assert [Path(c).name for c in command if c.endswith(".whl")] == [w["file"] for w in manifest["wheels"]]


def test_manifest_covers_what_the_gpu_machine_lacks():
    manifest = gpu_wheels.load_manifest()
    requirements = gpu_wheels.project_requirements()
    assert gpu_wheels.uncovered(manifest, requirements) == []
    assert gpu_wheels.uncovered(manifest, requirements + ["not-a-real-package>=1"]) == ["not-a-real-package"]
    wheels = {w["name"]: w for w in manifest["wheels"]}
    pinned = next(r for r in requirements if gpu_wheels.requirement_name(r) == "megatron-core")
    assert Requirement(pinned).specifier.contains(wheels["megatron-core"]["version"])  # the window's
    assert wheels["megatron-core"]["version"] == gpu_check.MEGATRON_CORE
    for wheel in manifest["wheels"]:  # for the GPU machine's CPython 3.12 on x86_64
        assert re.search(r"-(cp312-(cp312|abi3)-manylinux\S*_x86_64|py3-none-any)\.whl$", wheel["file"]), wheel
    assert sum(w["bytes"] for w in manifest["wheels"]) < 40 * 2**20  # carried within the 64 MiB working tree


@pytest.mark.parametrize(
    "args, message",
    [
        ([], "--out DIR is required (make gpu-check OUT=dir)"),
        (["--out", "{tmp}/o", "--budget", "0"], "--budget must be positive"),
        (["--out", "{tmp}/o", "--workdir", "{tmp}"], "not empty"),
        (["--out", "{tmp}/file"], "exists and is not a directory"),
    ],
)
def test_bad_input_is_one_line(tmp_path, args, message):
    (tmp_path / "file").write_text("x")
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    proc = subprocess.run(
        [sys.executable, str(REPO / "tools" / "gpu_check.py"), *args], capture_output=True, text=True, timeout=60
    )
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert lines[0].startswith("gpu_check.py: error: ") and message in lines[0]


def test_make_without_out_is_refused():
    proc = _make("gpu-check", "DRY_RUN=1")
    assert proc.returncode != 0
    assert "gpu_check.py: error: --out DIR is required (make gpu-check OUT=dir)" in proc.stderr


# ---------------------------------------------------------------- the pieces of a GPU run -----------------


def test_junit_results_of_a_pytest_run(tmp_path):
    """gpu-check reads pytest's JUnit report (xunit1: with the properties tests record)."""
    (tmp_path / "test_tier.py").write_text(
        "import pytest\n"
        "def test_ok(record_property):\n    record_property('layer_spec', 'local')\n"
        "def test_bad():\n    assert 1 == 2, 'one is not two'\n"
        "@pytest.mark.skip(reason='no TE here')\ndef test_skipped():\n    pass\n"
    )
    xml = tmp_path / "report.xml"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "-o",
            "junit_family=xunit1",
            "--junitxml",
            str(xml),
            "test_tier.py",
        ],
        cwd=tmp_path,
        capture_output=True,
        timeout=120,
    )
    results = gpu_check.junit_results(xml)
    assert (results["passed"], results["failed"], results["skipped"], results["error"]) == (1, 1, 1, 0)
    assert results["layer_spec"] == "local"
    outcomes = {c["test"].rsplit("::", 1)[1]: (c["outcome"], c["message"]) for c in results["cases"]}
    assert outcomes["test_bad"][0] == "failed" and "one is not two" in outcomes["test_bad"][1]
    assert outcomes["test_skipped"] == ("skipped", "no TE here")


def test_benchmark_results_of_the_last_h200_run():
    raw = json.loads((RESULTS / "gpu_h200.json").read_text())
    b = gpu_check.benchmark_results(raw)
    assert b["spec"] == "local" and set(b["by_length"]) == {"4k", "32k"}
    assert round(b["by_length"]["4k"]["rope"]["tokens_per_s"]) == 59093
    assert b["by_length"]["32k"]["peak_memory_gib_two_models"] == pytest.approx(60.59, abs=0.01)
    with pytest.raises(ValueError, match="no gpu_"):
        gpu_check.benchmark_results({"machine": {}})  # what run.py writes without CUDA


def _posgen_cells() -> list:
    """Two cells as the slice records them: validation after each of 3 epochs of 79 steps (10,000 / 128)."""

    def cell(kind, warmup, step_s):
        history = [{"iteration": it, "seconds": warmup + it * step_s} for it in (79, 157, 235)]
        return {
            "task": "recursive",
            "seed": 0,
            "trained_as": kind,
            "train": {"iterations": 235, "seconds": history[-1]["seconds"] + 1, "history": history},
        }

    return [cell("rope", 20.0, 0.05), cell("resonance", 30.0, 0.04)]


def test_posgen_projection():
    from megatron_resonance.posgen.presets import PRESETS

    paper = PRESETS["paper"]
    assert (len(paper.cells()), paper.train_iters()) == (30, 11_719)
    p = gpu_check.posgen_projection(_posgen_cells(), 2, len(paper.cells()), paper.train_iters())
    rate = (20 + 25) / 2  # steps/s between the first and the last validation, median over the cells
    assert p["steps_per_s_per_cell"] == pytest.approx(rate) and p["steps_per_cell"] == 235
    assert p["first_steps_overhead_s"] == pytest.approx(25.0)  # start-up kept out of the rate
    assert p["full_run"]["projected_hours"] == pytest.approx(30 * 11_719 / (rate * 2) / 3600)
    with pytest.raises(ValueError, match="no cell"):
        gpu_check.posgen_projection([], 2, 30, 11_719)
    one_record = [{**c, "train": {**c["train"], "history": c["train"]["history"][-1:]}} for c in _posgen_cells()]
    with pytest.raises(ValueError, match="fewer than 2 validation records"):
        gpu_check.posgen_projection(one_record, 2, 30, 11_719)


def test_results_of_a_complete_run_render(tmp_path):
    """The results of a run in which every step worked, written as a GPU run writes them."""
    check = gpu_check.Check(tmp_path, tmp_path / "work", sys.executable, 480, False, gpu_wheels.load_manifest())
    demo = json.loads((RESULTS / "demo_report.json").read_text())
    machine = {
        "date": "2026-12-01T00:00:00+00:00",
        "commit": "abc1234",
        "hardware": "NVIDIA H200",
        "python": "3.12.3",
        "torch": "2.11.0+cu130",
        "megatron_core": "0.16.1",
        "threads": 16,
        "cuda_available": True,
        "cuda": "13.0",
        "transformers": "5.17.0",
        "transformer_engine": "not importable (ImportError)",
        "layer_spec": "local",
    }
    cases = [
        {
            "test": "tests.gpu.test_training::test_bf16_steps_follow_fp32",
            "outcome": "passed",
            "seconds": 9.0,
            "message": "",
        }
    ]
    check.sections = {
        "environment": {"status": "ok", "seconds": 9.0, "install": {"status": "ok"}, "machine": machine},
        "tests": {
            "status": "ok",
            "seconds": 80.0,
            "passed": 1,
            "failed": 0,
            "error": 0,
            "skipped": 0,
            "layer_spec": "local",
            "cases": cases,
        },
        "benchmark": {
            "status": "ok",
            "seconds": 70.0,
            **gpu_check.benchmark_results(json.loads((RESULTS / "gpu_h200.json").read_text())),
        },
        "demo": {
            "status": "ok",
            "seconds": 170.0,
            **{k: demo.get(k) for k in ("perplexity", "lengths", "posgen", "stage_seconds")},
        },
        "posgen": {
            "status": "ok",
            "seconds": 60.0,
            "slice": " ".join(gpu_check.POSGEN_SLICE),
            "note": "a slice",
            "wall_seconds": 50.0,
            **gpu_check.posgen_projection(_posgen_cells(), 2, 30, 11_719),
        },
    }
    assert check.finish() == 0
    results = _check_results_format(tmp_path)
    assert results["status"] == "ok" and not results["dry_run"]
    markdown = (tmp_path / "results.md").read_text()
    for text in (
        "NVIDIA H200",
        "59,093",
        "| 4k | rope |",
        "1 passed, 0 failed",
        "layer spec local",
        f"{demo['perplexity']['rope']['512']:.2f}",
        "steps/s per cell",
        "## Plan",
    ):
        assert text in markdown, text


def test_a_failed_step_is_recorded_and_the_next_runs(tmp_path):
    check = gpu_check.Check(tmp_path, tmp_path / "work", sys.executable, 60, False, gpu_wheels.load_manifest())
    py = sys.executable
    pid_file = tmp_path / "grandchild.pid"
    sleeper = (
        f"import subprocess, sys, time; p = subprocess.Popen([sys.executable, '-c', 'import time; "
        f"time.sleep(60)']); open({str(pid_file)!r}, 'w').write(str(p.pid)); time.sleep(60)"
    )
    failing = gpu_check.Step("a", "tests", [py, "-c", "import sys; print('boom'); sys.exit(3)"], 30, min_s=0)
    hanging = gpu_check.Step("b", "benchmark", [py, "-c", sleeper], 3, min_s=0)
    working = gpu_check.Step("c", "demo", [py, "-c", "print('fine')"], 30, min_s=0, collect=lambda: {"answer": 42})
    unread = gpu_check.Step("d", "posgen", [py, "-c", "pass"], 30, min_s=0, collect=lambda: json.loads("{"))
    late = gpu_check.Step("e", "posgen", [py, "-c", "pass"], 30, min_s=10**6)
    start = time.monotonic()
    a, b, c, d, e = (check.run_step(s) for s in (failing, hanging, working, unread, late))
    assert a["status"] == "failed" and a["reason"] == "exit status 3" and "boom" in a["log_tail"]
    assert b["status"] == "failed" and b["reason"].startswith("timed out after 3 s")
    assert time.monotonic() - start < 40  # the hanging step was stopped, not waited for
    grandchild = int(pid_file.read_text())
    try:  # killed with its process group (a zombie until its new parent reaps it is fine)
        state = Path(f"/proc/{grandchild}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        state = "gone"
    assert state in ("gone", "Z", "X")
    assert c == {**c, "status": "ok", "answer": 42} and (tmp_path / "logs" / "c.log").read_text().endswith("fine\n")
    assert d["status"] == "failed" and d["reason"].startswith("results unreadable: JSONDecodeError")
    assert e["status"] == "not run" and e["reason"].startswith("out of time")


@pytest.mark.slow
def test_a_gpu_run_on_a_cpu_machine_stops_after_the_environment(tmp_path):
    """Without --dry-run on a machine without CUDA: the machine is described (the GPU run's own code), found
    to have no GPU, and nothing else runs."""
    installed = compat.installed_version()
    if installed != gpu_check.MEGATRON_CORE:  # e.g. make test-megatron-core-0.15: the check would install it
        pytest.skip(f"gpu_check uses its bundle's megatron-core {gpu_check.MEGATRON_CORE}; this venv has {installed}")
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, str(REPO / "tools" / "gpu_check.py"), "--out", str(out), "--workdir", str(tmp_path / "work")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 1, proc.stdout + proc.stderr
    results = _check_results_format(out)
    environment = results["sections"]["environment"]
    assert environment["status"] == "failed" and "no CUDA device" in environment["reason"]
    assert environment["install"]["status"] == "not needed"  # this venv has megatron-core
    machine = environment["machine"]
    assert machine["cuda_available"] is False and machine["layer_spec"] == "local"
    assert machine["megatron_core"] == gpu_check.MEGATRON_CORE and machine["commit"]
    for name in gpu_check.SECTIONS[1:]:
        assert results["sections"][name] == {"status": "not run", "reason": "environment failed"}


def test_benchmark_of_every_layer_spec_renders(tmp_path, monkeypatch):
    """``benchmarks/run.py``'s gpu section run with its GPU calls and training steps faked: every spec at both
    lengths (one that fails is recorded with its error line and the others still run), the default spec also
    under the earlier keys; gpu-check reads and renders what it wrote."""
    import torch

    from megatron_resonance.training import flops

    spec = importlib.util.spec_from_file_location("bench_run", REPO / "benchmarks" / "run.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    built = []

    def trainer(model_cfg, rope, seq, batch, bf16=False, spec="auto"):
        built.append((spec, seq, rope.kind, bf16))
        if spec == "local_compiled" and seq == 32768:
            raise RuntimeError("Failed to find C compiler.\nPlease specify via CC environment variable.")
        return lambda: None

    monkeypatch.setattr(bench, "_megatron_trainer", trainer)
    monkeypatch.setattr(bench, "_initialize", lambda: None)
    monkeypatch.setattr(bench, "_matmul_tflops", lambda: 700.0)
    monkeypatch.setattr(bench, "gpu_specs", lambda: ["local", "local_compiled", "te"])
    monkeypatch.setattr(flops, "peak_tflops", lambda: 989.0)
    for name in ("reset_peak_memory_stats", "synchronize", "empty_cache"):
        monkeypatch.setattr(torch.cuda, name, lambda: None)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda: 3 * 2**30)
    raw = bench.gpu_throughput(quick=True)
    assert {(s, n) for s, n, _, _ in built} == {
        (s, n) for s in ("local", "local_compiled", "te") for n in (4096, 32768)
    }
    assert all(bf16 for *_, bf16 in built) and {k for _, _, k, _ in built} == {"rope", "resonance_yarn"}
    assert raw["gpu_spec"] == "local" and raw["gpu_specs"] == ["local", "local_compiled", "te"]
    assert raw["gpu_by_spec"]["local_compiled"]["32k"] == {"error": "RuntimeError: Failed to find C compiler."}
    assert raw["gpu_4k_rope"] == raw["gpu_by_spec"]["local"]["4k"]["rope"]  # the default spec, as before
    b = gpu_check.benchmark_results(raw)
    assert set(b["by_spec"]) == {"local", "local_compiled", "te"} and set(b["by_length"]) == {"4k", "32k"}
    assert b["by_spec"]["te"]["32k"]["resonance_yarn"]["mfu"] > 0
    check = gpu_check.Check(tmp_path, tmp_path / "work", sys.executable, 480, False, gpu_wheels.load_manifest())
    check.sections["benchmark"] = {"status": "ok", "seconds": 200.0, **b}
    check.write()
    markdown = (tmp_path / "results.md").read_text()
    for text in (
        "| local_compiled | 4k | rope |",
        "| te | 32k | resonance_yarn |",
        "local_compiled 32k: failed",
        "| local_compiled | 32k | failed: RuntimeError: Failed to find C compiler. |",
    ):
        assert text in markdown, text
