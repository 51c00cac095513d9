"""The wheel bundle `make gpu-check` installs on a GPU machine that cannot reach a package index.

    python tools/gpu_wheels.py fetch              # download the manifest's wheels into .whl/ (make gpu-wheels)
    python tools/gpu_wheels.py verify             # the manifest covers every requirement; .whl/ matches it
    python tools/gpu_wheels.py lock               # after a requirement changed: resolve, download, rewrite it

The target is the lent GPU machine: CPython 3.12 on manylinux x86_64 with torch and most of this project's
requirements installed (the manifest's ``machine_packages``). What it lacks is downloaded here as wheels
into the git-ignored folder ``.whl/`` and recorded, with each file's sha256, in the checked-in manifest
``tools/gpu_wheels.json``. ``make gpu-check`` verifies the bundle against the manifest and installs it with
``pip install --no-index --no-deps --target``; ``--dir`` names another folder. Problems are one line and
exit status 2 (verify: 1 for a bundle that does not match). Standard library only, except ``lock`` (pip
and ``packaging``).
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Dict, List, Optional, Tuple

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a script, also where the package is not installed
from megatron_resonance.errors import UserError  # noqa: E402  (standard library only)

# standard library only at import (see the docstring): packaging and the project's cli are imported where used.

MANIFEST = REPO / "tools" / "gpu_wheels.json"
BUNDLE = REPO / ".whl"
PROG = "gpu_wheels.py"

#: setup.py extras the GPU check needs (its tests import transformers; pytest runs them)
EXTRAS = ("hf", "test")
#: requirements of those extras that the GPU check never runs
NOT_NEEDED = {"ruff"}  # lint


class BundleError(UserError):
    """A manifest or bundle problem, as one line (exit status 2; ``verify``'s answer: 1)."""


def normalize(name: str) -> str:
    """PEP 503 project name: ``Megatron_Core`` -> ``megatron-core``."""
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_name(requirement: str) -> str:
    match = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", requirement)
    if not match:
        raise BundleError(f"cannot read a project name from requirement {requirement!r}")
    return normalize(match.group(1))


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------- manifest


def load_manifest(path: Path = MANIFEST) -> dict:
    """The manifest, checked for the fields the bundle check and the install rely on."""
    try:
        manifest = json.loads(Path(path).read_text())
    except OSError as e:
        raise BundleError(f"manifest {path}: {e.strerror}") from None
    except ValueError as e:
        raise BundleError(f"manifest {path}: not JSON ({e})") from None
    for key, kind in (("python", str), ("platforms", list), ("machine_packages", list), ("wheels", list)):
        if not isinstance(manifest.get(key), kind):
            raise BundleError(f"manifest {path}: '{key}' missing or not a {kind.__name__}")
    for i, wheel in enumerate(manifest["wheels"]):
        for key in ("file", "name", "version", "sha256", "bytes", "requires"):
            if key not in wheel:
                raise BundleError(f"manifest {path}: wheel {i} has no '{key}'")
        if not re.fullmatch(r"[0-9a-f]{64}", str(wheel["sha256"])):
            raise BundleError(f"manifest {path}: {wheel['file']}: sha256 is not 64 hex digits")
        if not wheel["file"].endswith(".whl") or os.path.basename(wheel["file"]) != wheel["file"]:
            raise BundleError(f"manifest {path}: {wheel['file']!r} is not a wheel file name")
    names = [normalize(w["name"]) for w in manifest["wheels"]]
    if len(set(names)) != len(names):
        raise BundleError(f"manifest {path}: a project appears twice (two versions stop the install)")
    return manifest


def project_requirements(setup_py: Path = REPO / "setup.py") -> List[str]:
    """``install_requires`` plus the :data:`EXTRAS` of setup.py (read from its source, not run)."""
    tree = ast.parse(Path(setup_py).read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "setup":
            keywords = {
                k.arg: ast.literal_eval(k.value)
                for k in node.keywords
                if k.arg in ("install_requires", "extras_require")
            }
            requirements = list(keywords.get("install_requires", []))
            for extra in EXTRAS:
                requirements += keywords.get("extras_require", {}).get(extra, [])
            return [r for r in requirements if requirement_name(r) not in NOT_NEEDED]
    raise BundleError(f"{setup_py}: no setup(...) call")


def uncovered(manifest: dict, requirements: List[str]) -> List[str]:
    """Requirements (the project's, and those of every bundled wheel) that neither the machine nor the
    bundle provides."""
    have = {normalize(n) for n in manifest["machine_packages"]} | {normalize(w["name"]) for w in manifest["wheels"]}
    wanted = list(requirements) + [r for w in manifest["wheels"] for r in w["requires"]]
    return sorted({requirement_name(r) for r in wanted} - have)


# ---------------------------------------------------------------------------------------------- bundle


def check_bundle(directory: Path, manifest: dict) -> Tuple[str, str]:
    """``("ok", detail)`` when ``directory`` holds every wheel of the manifest with its sha256,
    ``("not downloaded", detail)`` when it holds none of them; BundleError otherwise. Files the manifest
    does not name are left alone (the install names its files)."""
    directory = Path(directory)
    present = [w for w in manifest["wheels"] if (directory / w["file"]).is_file()]
    if not present:
        return "not downloaded", f"{directory} has none of the {len(manifest['wheels'])} wheel(s)"
    missing = [w["file"] for w in manifest["wheels"] if w not in present]
    if missing:
        raise BundleError(f"bundle {directory} is incomplete: {', '.join(missing)} missing (make gpu-wheels)")
    for wheel in manifest["wheels"]:
        path = directory / wheel["file"]
        if path.stat().st_size != wheel["bytes"] or sha256(path) != wheel["sha256"]:
            raise BundleError(
                f"bundle {directory}: {wheel['file']} does not match its sha256 in the manifest "
                "(a corrupt or different file; delete it and run make gpu-wheels)"
            )
    total = sum(w["bytes"] for w in manifest["wheels"])
    return "ok", f"{len(manifest['wheels'])} wheel(s), {total / 2**20:.1f} MiB, sha256 as in the manifest"


def bundle_files(directory: Path, manifest: dict) -> List[Path]:
    return [Path(directory) / w["file"] for w in manifest["wheels"]]


def install_command(python: str, directory: Path, manifest: dict, target: Path) -> List[str]:
    """The offline install of the bundle into ``target`` (put on PYTHONPATH afterwards)."""
    return [
        python,
        "-m",
        "pip",
        "install",
        "-q",
        "--no-index",
        "--no-deps",
        "--no-compile",
        "--no-cache-dir",
        "--upgrade",
        "--target",
        str(target),
        *map(str, bundle_files(directory, manifest)),
    ]


# ---------------------------------------------------------------------------------------------- download


def _pip_download(requirement: str, manifest: dict, dest: Path) -> Path:
    """Download one wheel (no dependencies) for the manifest's Python and platforms into ``dest``."""
    before = set(os.listdir(dest))
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "-q",
        "--no-deps",
        "--only-binary=:all:",
        "--python-version",
        manifest["python"],
        "--implementation",
        "cp",
        "-d",
        str(dest),
        requirement,
    ]
    for platform in manifest["platforms"]:
        cmd[-1:-1] = ["--platform", platform]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["pip failed"])[-1]
        raise BundleError(f"pip download {requirement} failed: {last}")
    new = sorted(set(os.listdir(dest)) - before)
    if len(new) != 1 or not new[0].endswith(".whl"):
        raise BundleError(f"pip download {requirement} gave {new or 'nothing'}, expected one wheel")
    return dest / new[0]


def fetch(directory: Path, manifest: dict) -> None:
    """Download the manifest's wheels that ``directory`` lacks; each must have the manifest's sha256."""
    directory.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=directory) as tmp:
        for wheel in manifest["wheels"]:
            path = directory / wheel["file"]
            if path.is_file() and sha256(path) == wheel["sha256"]:
                print(f"{wheel['file']}: present")
                continue
            got = _pip_download(f"{wheel['name']}=={wheel['version']}", manifest, Path(tmp))
            if got.name != wheel["file"] or sha256(got) != wheel["sha256"]:
                raise BundleError(
                    f"{got.name}: not the manifest's {wheel['file']} (sha256 differs); if the "
                    "index changed on purpose, run tools/gpu_wheels.py lock"
                )
            os.replace(got, path)
            print(f"{wheel['file']}: downloaded, {wheel['bytes'] / 2**20:.1f} MiB, sha256 ok")


def _wheel_requires(path: Path, python: str) -> List[str]:
    """The wheel's ``Requires-Dist`` that apply on Linux x86_64 with CPython ``python`` and no extra."""
    from packaging.markers import Marker

    environment = {
        "python_version": python,
        "python_full_version": python + ".0",
        "sys_platform": "linux",
        "platform_system": "Linux",
        "platform_machine": "x86_64",
        "os_name": "posix",
        "implementation_name": "cpython",
        "platform_python_implementation": "CPython",
        "extra": "",
    }
    with zipfile.ZipFile(path) as z:
        metadata = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        lines = z.read(metadata).decode().splitlines()
    requires = []
    for line in lines:
        if line.startswith("Requires-Dist:"):
            requirement, _, marker = line.split(":", 1)[1].partition(";")
            if not marker.strip() or Marker(marker).evaluate(environment):
                requires.append(requirement.strip())
    return requires


def lock(directory: Path, manifest_path: Path = MANIFEST) -> dict:
    """Resolve what the machine lacks (the project's requirements, then theirs), download each wheel into
    ``directory`` and rewrite the manifest with their hashes. Keeps the manifest's machine description."""
    manifest = load_manifest(manifest_path)
    machine = {normalize(n) for n in manifest["machine_packages"]}
    wheels: Dict[str, dict] = {}
    todo = [r for r in project_requirements() if requirement_name(r) not in machine]
    directory.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=directory) as tmp:
        while todo:
            requirement = todo.pop(0)
            name = requirement_name(requirement)
            if name in machine or name in wheels:
                continue
            path = _pip_download(requirement, manifest, Path(tmp))
            _, version = path.name.split("-")[:2]
            requires = _wheel_requires(path, manifest["python"])
            wheels[name] = {
                "file": path.name,
                "name": name,
                "version": version,
                "sha256": sha256(path),
                "bytes": path.stat().st_size,
                "requires": requires,
            }
            os.replace(path, directory / path.name)
            todo += requires
            print(f"{path.name}: {wheels[name]['bytes'] / 2**20:.1f} MiB, needs {', '.join(requires) or 'nothing'}")
    manifest["wheels"] = list(wheels.values())
    Path(manifest_path).write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


# ---------------------------------------------------------------------------------------------- command


def verify(directory: Path, manifest_path: Path = MANIFEST) -> Tuple[str, str]:
    """The dry run's check: manifest valid and complete, bundle ``ok`` or ``not downloaded``."""
    manifest = load_manifest(manifest_path)
    missing = uncovered(manifest, project_requirements())
    if missing:
        raise BundleError(
            f"manifest {manifest_path}: nothing provides {', '.join(missing)} on the GPU machine "
            "(tools/gpu_wheels.py lock)"
        )
    return check_bundle(directory, manifest)


def main(argv: Optional[List[str]] = None) -> int:
    from megatron_resonance.cli import ArgumentParser, guard

    p = ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    p.add_argument("action", choices=("fetch", "verify", "lock"))
    p.add_argument("--dir", default=str(BUNDLE), help="bundle folder (default: .whl/ in the repository)")
    p.add_argument("--manifest", default=str(MANIFEST), help="manifest (default: tools/gpu_wheels.json)")
    args = p.parse_args(argv)
    directory, manifest_path = Path(args.dir), Path(args.manifest)
    with guard(PROG):
        try:
            if args.action == "fetch":
                fetch(directory, load_manifest(manifest_path))
            elif args.action == "lock":
                lock(directory, manifest_path)
            status, detail = verify(directory, manifest_path)
        except BundleError as e:
            if args.action == "verify":  # the check's answer, not bad input
                e.exit_status = 1
            raise
    print(f"bundle {directory}: {status} ({detail})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
