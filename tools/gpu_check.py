"""`make gpu-check OUT=dir`: the GPU checks in one command, within 8 minutes on one H200.

    make gpu-check OUT=gpu-run                   # on a CUDA machine; python3 there has torch (GPU_PYTHON=...)
    make gpu-check OUT=gpu-run DRY_RUN=1         # anywhere: check the bundle and the plan, run no GPU step
    python tools/gpu_check.py --out gpu-run [--workdir DIR] [--budget 480] [--dry-run]

Steps, in this order, each under its own timeout and one shared deadline (``--budget`` seconds); a step
that fails is recorded and the next one runs:

1. environment  megatron-core from the wheel bundle (``.whl/``, ``tools/gpu_wheels.py``), installed into
                WORK/site and put on PYTHONPATH with this repository, unless it already imports; then the
                machine: GPU, CUDA, Python, torch, megatron-core, transformers, Transformer Engine, layer spec;
2. tests        ``pytest -m gpu``: passed / failed / skipped per test, and which layer spec the tier ran;
3. benchmark    ``benchmarks/run.py``'s gpu section: 4K and 32K, rope vs resonance_yarn (tokens/s, TFLOP/s,
                MFU, peak memory) for each layer spec: local, local_compiled (torch.compile), te where
                Transformer Engine is installed;
4. demo         ``make demo``'s pipeline (``tools/run_demo.py --nproc 1``);
5. posgen       a timed slice of the PosGen ``paper`` preset (one task, one seed, 3 epochs, bf16): steps/s
                and the full preset's projected time; the full run does not fit in the budget.

Writes ``OUT/results.json``, ``OUT/results.md`` (rewritten after every step) and ``OUT/logs/<step>.log``;
scratch (the installed wheels, demo and PosGen outputs, the benchmark's JSON) goes to WORK, by default a
new temporary directory. Exit status 0 when no step failed, 1 when one did, 2 for bad input.

``--dry-run`` runs nothing on a GPU: it checks the manifest and the bundle (absent is fine: "not
downloaded"; present, every file must match its sha256), checks that each planned command's script exists
and has the flags the plan passes, prints the plan, and writes the same results with the GPU sections
``not run`` (reason ``dry run``).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib.metadata
import importlib.util
import json
import math
import os
import re
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Callable, Dict, List, Optional

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

sys.path.insert(0, str(REPO / "tools"))
import gpu_wheels  # noqa: E402  (tools/gpu_wheels.py)

from megatron_resonance import atomic  # noqa: E402
from megatron_resonance.cli import ArgumentParser, check_output_dir, guard  # noqa: E402
from megatron_resonance.environment import describe  # noqa: E402
from megatron_resonance.errors import UserError  # noqa: E402

# torch, Transformer Engine and the modules that import torch are imported where a step needs them: the
# script starts in any Python, and a missing one fails that step only.

PROG = "gpu_check.py"
SECTIONS = ("environment", "tests", "benchmark", "demo", "posgen")
STATUSES = ("ok", "failed", "not run")
BUDGET_S = 480
#: seconds kept back from the deadline for writing the results
RESERVE_S = 5
MEGATRON_CORE = "0.16.1"
#: the PosGen slice: the paper preset's shape and batch on one task and seed, 3 of its 150 epochs, bf16,
#: validated every epoch (the rate is read between validations); 2 workers train the two cells (rope,
#: resonance) side by side on the GPU
POSGEN_SLICE = [
    "--preset",
    "paper",
    "--tasks",
    "recursive",
    "--seeds",
    "1",
    "--epochs",
    "3",
    "--bf16",
    "--workers",
    "2",
    "--set",
    "validation_interval=1",
    "validation_sequences=100",
    "test_sequences=100",
]


@dataclasses.dataclass
class Step:
    """One planned command: what it runs, its time cap, and how its outputs become its section's results."""

    name: str
    section: str
    command: List[str]
    timeout_s: int
    script: Optional[str] = None
    """the repository file the command runs (checked to exist, and to know every ``--flag`` passed)"""
    min_s: int = 30
    """the least time worth starting it with"""
    collect: Optional[Callable[[], dict]] = None

    def shell(self) -> str:
        return " ".join(shlex.quote(str(c)) for c in self.command)


def tier_modules() -> List[str]:
    """The test modules of the gpu tier (collecting only them saves collecting the whole suite)."""
    return sorted(
        str(p.relative_to(REPO)) for p in (REPO / "tests").rglob("test_*.py") if "pytest.mark.gpu" in p.read_text()
    )


def parallel_tier() -> List[str]:
    """With pytest-xdist, one process per tier module (each starts its own workers on the one GPU; their
    start-up, not the GPU, is most of the tier's time)."""
    if importlib.util.find_spec("xdist") is None:
        return []
    return ["-n", str(len(tier_modules())), "--dist", "loadfile"]


# ---------------------------------------------------------------------------------------------- machine


def describe_machine() -> dict:
    """The GPU machine as the steps see it (run in the GPU Python with the installed packages)."""
    import torch

    def version(dist: str) -> str:
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            return "not installed"

    info = describe()
    info["cuda_available"] = torch.cuda.is_available()
    info["cuda"] = torch.version.cuda
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(
            gpu_count=torch.cuda.device_count(),
            gpu_memory_gib=round(props.total_memory / 2**30, 1),
            compute_capability=f"{props.major}.{props.minor}",
        )
        try:
            info["driver"] = (
                subprocess.run(
                    ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                    capture_output=True,
                    text=True,
                    timeout=20,
                ).stdout.strip()
                or None
            )
        except (OSError, subprocess.SubprocessError):
            info["driver"] = None
    info["transformers"] = version("transformers")
    try:
        import transformer_engine  # noqa: F401

        info["transformer_engine"] = version("transformer_engine")
    except Exception as e:  # not installed, or installed and broken: either way the local spec runs
        info["transformer_engine"] = f"not importable ({type(e).__name__})"
    from megatron_resonance.megatron.llama import resolve_spec

    info["layer_spec"] = resolve_spec("auto")
    return info


# ---------------------------------------------------------------------------------------------- results


def _finite(obj):
    """``obj`` with NaN and infinities as None (JSON has neither)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def junit_results(path: Path) -> dict:
    """pytest's JUnit XML (xunit1): counts, each test's outcome, and the ``layer_spec`` a test recorded."""
    root = ET.parse(path).getroot()
    cases, spec = [], None
    for case in root.iter("testcase"):
        outcome, message = "passed", ""
        for kind in ("failure", "error", "skipped"):
            found = case.find(kind)
            if found is not None:
                outcome = {"failure": "failed", "error": "error", "skipped": "skipped"}[kind]
                message = (found.get("message") or found.text or "").strip().splitlines()[0:1]
                message = message[0][:300] if message else ""
                break
        for prop in case.iter("property"):
            if prop.get("name") == "layer_spec":
                spec = prop.get("value")
        name = f"{case.get('classname', '')}::{case.get('name')}".lstrip(":")
        cases.append({"test": name, "outcome": outcome, "seconds": float(case.get("time") or 0), "message": message})
    counts = {o: sum(c["outcome"] == o for c in cases) for o in ("passed", "failed", "skipped", "error")}
    return {**counts, "layer_spec": spec, "cases": cases}


def benchmark_results(raw: dict) -> dict:
    """``benchmarks/run.py``'s gpu keys: the default spec's by length and variant (``by_length``), and every
    measured spec's (``by_spec``: spec -> length -> the same, or ``{"error": ...}`` for a spec that failed;
    a run before ``gpu_by_spec`` existed gives its one spec)."""
    out = {
        "spec": raw.get("gpu_spec"),
        "shape": raw.get("gpu_shape"),
        "peak_tflops_datasheet": raw.get("gpu_peak_tflops_datasheet"),
        "matmul_tflops_measured": raw.get("gpu_matmul_tflops_measured"),
        "by_length": {},
    }
    for key in sorted(raw, key=lambda k: [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", k)]):
        match = re.fullmatch(r"gpu_(\d+k)_(rope|resonance_yarn)", key)
        if match:
            out["by_length"].setdefault(match.group(1), {})[match.group(2)] = raw[key]
    for length, entry in out["by_length"].items():
        entry["resonance_overhead_ratio"] = raw.get(f"gpu_{length}_resonance_overhead_ratio")
        entry["peak_memory_gib_two_models"] = raw.get(f"gpu_{length}_peak_memory_gib_two_models")
    if not out["by_length"]:
        raise ValueError("the benchmark wrote no gpu_* results")
    out["by_spec"] = raw.get("gpu_by_spec") or {out["spec"]: out["by_length"]}
    return out


def posgen_projection(cells: List[dict], cells_at_once: int, full_cells: int, full_steps_per_cell: int) -> dict:
    """Training speed of the PosGen slice from its cell records, and the full preset's time at that speed.

    A cell's rate is taken between its first and last validation record (the slice validates every epoch),
    so start-up and the first steps' compilation stay out of it; validation stays in, as in a full run.
    The rate was measured while ``cells_at_once`` cells shared the GPU: the projection assumes the full run
    shares it the same way."""
    if not cells:
        raise ValueError("the PosGen slice finished no cell")
    rates, warmups = [], []
    for cell in cells:
        history = cell["train"]["history"]
        if len(history) < 2:
            raise ValueError("a PosGen cell has fewer than 2 validation records (the slice validates every epoch)")
        first, last = history[0], history[-1]
        rate = (last["iteration"] - first["iteration"]) / (last["seconds"] - first["seconds"])
        rates.append(rate)
        warmups.append(first["seconds"] - first["iteration"] / rate)
    rate = statistics.median(rates)
    seconds = full_cells * full_steps_per_cell / (rate * cells_at_once)
    return {
        "steps_per_cell": cells[0]["train"]["iterations"],
        "steps_per_s_per_cell": rate,
        "cells_at_once": cells_at_once,
        "first_steps_overhead_s": statistics.median(warmups),
        "train_seconds_by_cell": {f"{c['task']}/{c['seed']}/{c['trained_as']}": c["train"]["seconds"] for c in cells},
        "full_run": {
            "cells": full_cells,
            "steps_per_cell": full_steps_per_cell,
            "projected_hours": seconds / 3600,
            "assumes": f"{cells_at_once} cell(s) at once at the slice's per-cell rate; training and "
            "validation steps only (no start-up or test)",
        },
    }


# ---------------------------------------------------------------------------------------------- check


class Check:
    def __init__(self, out: Path, work: Path, python: str, budget_s: int, dry_run: bool, manifest: dict):
        self.out, self.work, self.python, self.dry_run, self.manifest = out, work, python, dry_run, manifest
        self.budget_s = budget_s
        self.start = time.monotonic()
        self.deadline = self.start + budget_s
        self.started = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
        self.site: Optional[Path] = None
        self.sections: Dict[str, dict] = {s: {"status": "not run", "reason": "not reached"} for s in SECTIONS}
        self.steps = self.plan()
        if not dry_run:
            work.mkdir(parents=True, exist_ok=True)

    # ------------------------------------------------------------------------------------------ plan
    def plan(self) -> List[Step]:
        py, w = self.python, self.work
        return [
            Step(
                "install",
                "environment",
                gpu_wheels.install_command(py, gpu_wheels.BUNDLE, self.manifest, w / "site"),
                60,
                min_s=10,
            ),
            Step(
                "environment",
                "environment",
                [py, "tools/gpu_check.py", "--describe-machine"],
                60,
                "tools/gpu_check.py",
                min_s=10,
            ),
            Step(
                "tests",
                "tests",
                [
                    py,
                    "-m",
                    "pytest",
                    "-m",
                    "gpu",
                    "-q",
                    "-p",
                    "no:cacheprovider",
                    "-o",
                    "junit_family=xunit1",
                    "--junitxml",
                    str(w / "gpu_tests.xml"),
                    *parallel_tier(),
                    *tier_modules(),
                ],
                180,
                collect=lambda: junit_results(w / "gpu_tests.xml"),
            ),
            Step(
                "benchmark",
                "benchmark",
                [
                    py,
                    "benchmarks/run.py",
                    "--skip",
                    "precision,convert",
                    "--out",
                    str(w / "benchmark.json"),
                    "--workdir",
                    str(w / "bench_work"),
                ],
                240,
                "benchmarks/run.py",
                min_s=60,
                collect=self.collect_benchmark,
            ),
            Step(
                "demo",
                "demo",
                [py, "tools/run_demo.py", "--out", str(w / "demo"), "--nproc", "1"],
                210,
                "tools/run_demo.py",
                min_s=120,
                collect=self.collect_demo,
            ),
            Step(
                "posgen",
                "posgen",
                [py, "tools/posgen_benchmark.py", *POSGEN_SLICE, "--out", str(w / "posgen")],
                120,
                "tools/posgen_benchmark.py",
                min_s=60,
                collect=self.collect_posgen,
            ),
        ]

    def check_plan(self) -> List[str]:
        """Problems with the plan: a script that is missing, or that never mentions a flag the plan passes."""
        problems = []
        for step in self.steps:
            if step.script is None:
                continue
            path = REPO / step.script
            if not path.is_file():
                problems.append(f"{step.name}: {step.script} does not exist")
                continue
            source = path.read_text()
            for flag in (c for c in step.command if str(c).startswith("--")):
                if f'"{flag}"' not in source:
                    problems.append(f"{step.name}: {step.script} has no {flag} option")
        if not tier_modules():
            problems.append("tests: no test module is marked gpu")
        problems += _posgen_settings_problems()
        return problems

    # ------------------------------------------------------------------------------------------ steps
    def env(self) -> Dict[str, str]:
        paths = [str(self.site)] if self.site else []
        paths += [str(REPO)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
        return dict(os.environ, PYTHONPATH=os.pathsep.join(paths), PYTHONUNBUFFERED="1")

    def left(self) -> float:
        return self.deadline - RESERVE_S - time.monotonic()

    def execute(self, step: Step) -> dict:
        """Run ``step`` in its own process group, output to its log; kill the group at its time cap."""
        timeout = min(step.timeout_s, self.left())
        log_path = self.out / "logs" / f"{step.name}.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        print(f"[gpu-check] {step.name} (up to {timeout:.0f} s): {step.shell()}", flush=True)
        start = time.monotonic()
        with open(log_path, "w") as log:
            log.write(f"$ {step.shell()}\n")
            log.flush()
            proc = subprocess.Popen(
                step.command, cwd=REPO, env=self.env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
            try:
                code = proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                code = None
                _kill_group(proc)
        seconds = round(time.monotonic() - start, 1)
        result = {"seconds": seconds, "exit_status": code, "log": f"logs/{step.name}.log"}
        if code is None:
            result.update(status="failed", reason=f"timed out after {timeout:.0f} s")
        elif code != 0:
            result.update(status="failed", reason=f"exit status {code}")
        else:
            result["status"] = "ok"
        if result["status"] == "failed":
            result["log_tail"] = _tail(log_path, 25)
        print(
            f"[gpu-check] {step.name}: {result['status']} in {seconds:.0f} s"
            + (f" ({result['reason']})" if "reason" in result else ""),
            flush=True,
        )
        if result["status"] == "failed":
            print("\n".join("    " + line for line in result["log_tail"]), flush=True)
        return result

    def run_step(self, step: Step) -> dict:
        if self.left() < step.min_s:
            return {
                "status": "not run",
                "reason": f"out of time ({max(self.left(), 0):.0f} s left of the "
                f"{self.budget_s} s budget, {step.min_s} s needed)",
            }
        result = self.execute(step)
        if step.collect is not None:
            try:
                result.update(step.collect())  # also after a failure: pytest's report of the failed tests
            except Exception as e:  # outputs missing or malformed: the step did not do its job
                if result["status"] == "ok":
                    result.update(status="failed", reason=f"results unreadable: {type(e).__name__}: {e}")
        return result

    def environment(self) -> dict:
        install, describe = self.steps[0], self.steps[1]
        section = {"status": "ok", "seconds": 0.0}
        found = subprocess.run(
            [self.python, "-c", "import megatron.core as m; print(m.__version__)"],
            cwd=REPO,
            env=self.env(),
            capture_output=True,
            text=True,
            timeout=60,
        )
        version = found.stdout.strip() if found.returncode == 0 else None
        if version == MEGATRON_CORE:
            section["install"] = {"status": "not needed", "detail": f"megatron-core {version} already imports"}
            print(f"[gpu-check] install: not needed, {section['install']['detail']}", flush=True)
        else:
            try:
                bundle, detail = gpu_wheels.verify(gpu_wheels.BUNDLE)
            except gpu_wheels.BundleError as e:
                bundle, detail = "failed", str(e)
            if bundle != "ok":
                section.update(
                    status="failed",
                    install={"status": "failed", "bundle": bundle, "detail": detail},
                    reason=f"megatron-core {MEGATRON_CORE} is not installed ({version or 'none'}) and "
                    f"the wheel bundle is {bundle}: {detail}. Run make gpu-wheels where PyPI "
                    "is reachable, or pip install -e '.[hf,test]'",
                )
                return section
            result = self.execute(install)
            section["install"] = {"bundle": detail, **result}
            if result["status"] == "ok":
                section["install"]["status"] = "installed from the bundle"
            section["seconds"] += result["seconds"]
            if result["status"] != "ok":
                section.update(status="failed", reason=f"install: {result['reason']}")
                return section
            self.site = self.work / "site"
        result = self.execute(describe)
        section["seconds"] += result["seconds"]
        if result["status"] != "ok":
            section.update(status="failed", reason=f"describe: {result['reason']}", describe=result)
            return section
        printed = _tail(self.out / "logs" / "environment.log", 50)
        section["machine"] = json.loads(next(line for line in reversed(printed) if line.startswith("{")))
        if not section["machine"]["cuda_available"]:
            section.update(
                status="failed",
                reason="no CUDA device here (make gpu-check DRY_RUN=1 checks the plan on a machine without one)",
            )
            print(f"[gpu-check] environment: {section['reason']}", flush=True)
        return section

    # ------------------------------------------------------------------------------------------ collect
    def collect_benchmark(self) -> dict:
        raw = json.loads((self.work / "benchmark.json").read_text())
        return {**benchmark_results(raw), "raw": raw}

    def collect_demo(self) -> dict:
        report = json.loads((self.work / "demo" / "report.json").read_text())
        return {key: report.get(key) for key in ("perplexity", "lengths", "posgen", "stage_seconds")}

    def collect_posgen(self) -> dict:
        from megatron_resonance.posgen.presets import PRESETS

        paper, out = PRESETS["paper"], self.work / "posgen"
        report = json.loads((out / "report.json").read_text())
        cells = [json.loads(path.read_text()) for path in sorted(out.glob("cells/*/*/*.json"))]
        return {
            "slice": " ".join(POSGEN_SLICE),
            "wall_seconds": report["last_run"]["wall_seconds"],
            "note": "a timed slice of the paper preset, not its full run (which does not fit the budget)",
            **posgen_projection(cells, report["last_run"]["processes"], len(paper.cells()), paper.train_iters()),
        }

    # ------------------------------------------------------------------------------------------ run
    def run(self) -> int:
        problems = self.check_plan()
        if self.dry_run:
            return self.dry(problems)
        if problems:
            self.sections["environment"] = {"status": "failed", "reason": "plan: " + "; ".join(problems)}
            for s in SECTIONS[1:]:
                self.sections[s] = {"status": "not run", "reason": "the plan is broken"}
            return self.finish()
        self.sections["environment"] = self.environment()
        self.write()
        for step in self.steps[2:]:
            if self.sections["environment"]["status"] != "ok":
                self.sections[step.section] = {"status": "not run", "reason": "environment failed"}
                continue
            self.sections[step.section] = self.run_step(step)
            self.write()
        return self.finish()

    def dry(self, problems: List[str]) -> int:
        try:
            bundle, detail = gpu_wheels.verify(gpu_wheels.BUNDLE)
        except gpu_wheels.BundleError as e:
            problems.append(str(e))
            bundle, detail = "failed", str(e)
        self.sections["environment"] = {
            "status": "failed" if problems else "ok",
            "bundle": bundle,
            "bundle_detail": detail,
            "plan_problems": problems,
            "note": "dry run: the manifest, the bundle and the plan were checked; nothing was installed",
        }
        if problems:
            self.sections["environment"]["reason"] = "; ".join(problems)
        for s in SECTIONS[1:]:
            self.sections[s] = {"status": "not run", "reason": "dry run"}
        print(f"[gpu-check] dry run: bundle {bundle} ({detail})")
        print(f"[gpu-check] plan (budget {self.budget_s} s; work directory {self.work}):")
        for step in self.steps:
            print(f"  {step.name:<12} {step.timeout_s:>4} s  {step.shell()}")
        for problem in problems:
            print(f"[gpu-check] plan problem: {problem}")
        return self.finish()

    def finish(self) -> int:
        path = self.write()
        failed = [s for s in SECTIONS if self.sections[s]["status"] == "failed"]
        print(
            f"[gpu-check] {'failed: ' + ', '.join(failed) if failed else 'ok'}; "
            f"{time.monotonic() - self.start:.0f} s; results in {path}",
            flush=True,
        )
        return 1 if failed else 0

    def results(self) -> dict:
        failed = any(self.sections[s]["status"] == "failed" for s in SECTIONS)
        return _finite(
            {
                "format": 1,
                "dry_run": self.dry_run,
                "status": "failed" if failed else "ok",
                "started": self.started,
                "wall_seconds": round(time.monotonic() - self.start, 1),
                "budget_seconds": self.budget_s,
                "work_directory": str(self.work),
                "plan": [
                    {"step": s.name, "section": s.section, "timeout_s": s.timeout_s, "command": s.shell()}
                    for s in self.steps
                ],
                "sections": self.sections,
            }
        )

    def write(self) -> Path:
        results = self.results()
        atomic.write_json(str(self.out / "results.json"), results)
        atomic.write_text(str(self.out / "results.md"), markdown(results))
        return self.out / "results.json"


def _posgen_settings_problems() -> List[str]:
    """The slice's ``--set`` fields, checked against the PosGen presets (a field renamed there shows here)."""
    fields = POSGEN_SLICE[POSGEN_SLICE.index("--set") + 1 :]
    try:
        from megatron_resonance.posgen.presets import PRESETS, with_settings

        with_settings(PRESETS["paper"], dict(field.split("=", 1) for field in fields))
    except Exception as e:  # a bad field (ValueError), or presets that no longer import
        return [f"posgen: {type(e).__name__}: {e}"]
    return []


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGTERM the step's process group (it and every process it started), SIGKILL what is left after 10 s."""
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 30)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def _tail(path: Path, lines: int) -> List[str]:
    try:
        return path.read_text(errors="replace").strip().splitlines()[-lines:]
    except OSError:
        return []


# ---------------------------------------------------------------------------------------------- markdown


def _summary(name: str, s: dict) -> str:
    if s["status"] != "ok":
        return s.get("reason", "")
    if name == "environment":
        m = s.get("machine")
        if not m:
            return f"bundle {s.get('bundle')}"
        return (
            f"{m['hardware']}, CUDA {m['cuda']}, torch {m['torch']}, megatron-core {m['megatron_core']} "
            f"({s['install']['status'] if 'install' in s else ''}), layer spec {m['layer_spec']}"
        )
    if name == "tests":
        return (
            f"{s['passed']} passed, {s['failed']} failed, {s['error']} errors, {s['skipped']} skipped; "
            f"layer spec {s['layer_spec']}"
        )
    if name == "benchmark":
        return "; ".join(
            f"{spec} {length}: "
            + (
                f"rope {v['rope']['tokens_per_s']:,.0f} tok/s, MFU {100 * (v['rope']['mfu'] or 0):.1f} %"
                if "rope" in v
                else "failed"
            )
            for spec, lengths in s["by_spec"].items()
            for length, v in lengths.items()
        )
    if name == "demo":
        return "perplexity at 512: " + ", ".join(f"{k} {v['512']:.1f}" for k, v in (s["perplexity"] or {}).items())
    if name == "posgen":
        return (
            f"{s['steps_per_s_per_cell']:.1f} steps/s per cell ({s['cells_at_once']} at once); full paper "
            f"preset ~{s['full_run']['projected_hours']:.1f} h"
        )
    return ""


def markdown(r: dict) -> str:
    s = r["sections"]
    machine = s["environment"].get("machine") or {}
    lines = [
        f"# GPU check{' (dry run)' if r['dry_run'] else ''}: {r['status']}",
        "",
        f"Started {r['started']}; {r['wall_seconds']:.0f} s of the {r['budget_seconds']} s budget"
        + (f"; {machine['hardware']}, commit `{machine['commit']}`" if machine else ""),
        "",
        "| section | status | seconds | summary |",
        "|---|---|---|---|",
    ]
    for name in SECTIONS:
        sec = s[name]
        seconds = f"{sec['seconds']:.0f}" if "seconds" in sec else "–"
        lines.append(f"| {name} | {sec['status']} | {seconds} | {_summary(name, sec)} |")
    if machine:
        lines += ["", "## Environment", ""] + [f"- {k}: {v}" for k, v in machine.items()]
    if s["tests"].get("cases"):
        lines += ["", "## Tests", "", "| test | outcome | seconds | message |", "|---|---|---|---|"]
        lines += [
            f"| `{c['test']}` | {c['outcome']} | {c['seconds']:.1f} | {c['message'].replace('|', '/')} |"
            for c in s["tests"]["cases"]
        ]
    if s["benchmark"]["status"] == "ok":
        b = s["benchmark"]
        lines += [
            "",
            "## Benchmark",
            "",
            f"Layer spec {b['spec']}; shape {b['shape']}; measured bf16 matmul "
            f"{b['matmul_tflops_measured']:.0f} TFLOP/s (datasheet {b['peak_tflops_datasheet']}).",
            "",
            "| spec | length | variant | tokens/s | TFLOP/s | MFU | overhead ratio | peak memory, both models (GiB) |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for spec, lengths in b["by_spec"].items():
            for length, v in lengths.items():
                if "error" in v:
                    lines.append(f"| {spec} | {length} | failed: {v['error'].replace('|', '/')} | | | | | |")
                for kind in ("rope", "resonance_yarn"):
                    if kind in v:
                        mfu = v[kind]["mfu"]
                        lines.append(
                            f"| {spec} | {length} | {kind} | {v[kind]['tokens_per_s']:,.0f} | "
                            f"{v[kind]['tflops']:.0f} | {'–' if mfu is None else f'{100 * mfu:.1f} %'} | "
                            f"{v['resonance_overhead_ratio']:.3f} | {v['peak_memory_gib_two_models']:.1f} |"
                        )
    if s["demo"]["status"] == "ok":
        d = s["demo"]
        lengths = [str(n) for n in d["lengths"]]
        lines += ["", "## Demo", "", "| variant | " + " | ".join(lengths) + " |", "|---|" + "---|" * len(lengths)]
        lines += [f"| {k} | " + " | ".join(f"{v[n]:.2f}" for n in lengths) + " |" for k, v in d["perplexity"].items()]
        lines += ["", "Stage seconds: " + ", ".join(f"{k} {v}" for k, v in (d["stage_seconds"] or {}).items())]
    if s["posgen"]["status"] == "ok":
        p = s["posgen"]
        lines += [
            "",
            "## PosGen",
            "",
            f"{p['note']}: `{p['slice']}`.",
            "",
            f"- {p['steps_per_cell']} steps per cell, {p['steps_per_s_per_cell']:.2f} steps/s per cell with "
            f"{p['cells_at_once']} at once (after {p['first_steps_overhead_s']:.0f} s of start-up in each "
            f"cell); slice wall time {p['wall_seconds']:.0f} s",
            f"- full preset: {p['full_run']['cells']} cells x {p['full_run']['steps_per_cell']:,} steps, "
            f"projected {p['full_run']['projected_hours']:.1f} h ({p['full_run']['assumes']})",
        ]
    lines += ["", "## Plan", "", "| step | timeout (s) | command |", "|---|---|---|"]
    lines += [f"| {p['step']} | {p['timeout_s']} | `{p['command']}` |" for p in r["plan"]]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------- command


def main(argv: Optional[List[str]] = None) -> int:
    p = ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    p.add_argument("--out", help="directory for results.json, results.md and logs/ (required)")
    p.add_argument("--workdir", help="scratch directory, new or empty (default: a new temporary directory)")
    p.add_argument("--budget", type=int, default=BUDGET_S, help=f"seconds for all steps (default {BUDGET_S})")
    p.add_argument("--python", default=sys.executable, help="the GPU Python the steps run with (default: this one)")
    p.add_argument("--dry-run", action="store_true", help="check the bundle and the plan; run no GPU step")
    p.add_argument("--describe-machine", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.describe_machine:
        print(json.dumps(describe_machine()))
        return 0
    with guard(PROG):
        if not args.out:
            raise UserError("--out DIR is required (make gpu-check OUT=dir)")
        if args.budget <= 0:
            raise UserError(f"--budget must be positive, got {args.budget}")
        check_output_dir(args.out, "--out")
        if args.workdir:
            check_output_dir(args.workdir, "--workdir")
            if os.path.isdir(args.workdir) and os.listdir(args.workdir):
                raise UserError(f"--workdir {args.workdir}: not empty (the demo would resume from what is there)")
        manifest = gpu_wheels.load_manifest()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    if args.workdir:
        work = Path(args.workdir).resolve()
    elif args.dry_run:  # named in the plan, never created
        work = Path(tempfile.gettempdir()) / "gpu-check-XXXXXXXX"
    else:
        work = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    return Check(out, work, args.python, args.budget, args.dry_run, manifest).run()


if __name__ == "__main__":
    sys.exit(main())
