"""Reproducible installs (issue 21, item 7): scripts/setup.sh installs every package under the lock, constraints.txt,
whose pins cover every dependency pyproject.toml names; a change of the lock re-runs setup's pip step; the venv the
suite runs in holds exactly the locked versions."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tomllib
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent
LOCK = ROOT / "constraints.txt"
SCAN_LOCK = ROOT / "constraints-scan.txt"  # the `scan` extra (checkov) lives in a venv of its own, with its own lock
AIPERF_LOCK = ROOT / "constraints-aiperf.txt"  # so does the `aiperf` extra
OWN_VENV_EXTRAS = {"scan": SCAN_LOCK, "aiperf": AIPERF_LOCK}
OWN_VENVS = {"scan": "checkov", "aiperf": "aiperf"}  # extra → the folder of its venv under .venv
SETUP = ROOT / "scripts" / "setup.sh"


def _norm(name: str) -> str:
    """PEP 503: "cloudcoil.models.prometheus_operator" and "cloudcoil-models-prometheus-operator" are one name."""
    return re.sub(r"[-_.]+", "-", name).lower()


def _lock(path: Path = LOCK) -> dict[str, tuple[str, bool]]:
    """name → (pinned version, held by hand)."""
    pins = {}
    for line in path.read_text().splitlines():
        req, _, comment = line.partition("#")
        if not req.strip():
            continue
        name, sep, version = req.strip().partition("==")
        assert sep and version and re.fullmatch(r"[0-9A-Za-z.!+_-]+", version), f"not an == pin: {line!r}"
        assert _norm(name) not in pins, f"pinned twice: {name}"
        pins[_norm(name)] = (version, comment.strip().startswith("held"))
    return pins


def _declared(lock: Path = LOCK) -> list[Requirement]:
    """What pyproject asks for that `lock` must pin: the project's venv, or an extra with a venv of its own."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    own = [e for e, path in OWN_VENV_EXTRAS.items() if path == lock]
    if own:
        return [Requirement(r) for e in own for r in project["optional-dependencies"][e]]
    reqs = list(project["dependencies"])
    for extra, items in project["optional-dependencies"].items():
        if extra not in OWN_VENV_EXTRAS:
            reqs += items
    return [Requirement(r) for r in reqs]


@pytest.mark.parametrize("lock", [LOCK, SCAN_LOCK, AIPERF_LOCK], ids=lambda p: p.name)
def test_every_dependency_pyproject_declares_is_pinned_in_the_lock_within_its_range(lock):
    pins = _lock(lock)
    declared = _declared(lock)
    assert len(declared) >= (20 if lock == LOCK else 1)
    unpinned = sorted(r.name for r in declared if _norm(r.name) not in pins)
    assert unpinned == []
    outside = sorted(f"{r.name}=={pins[_norm(r.name)][0]} not in {r.specifier}" for r in declared
                     if not r.specifier.contains(pins[_norm(r.name)][0], prereleases=True))
    assert outside == []


def test_the_lock_holds_torch_to_the_cpu_wheel_on_disk():
    # /work/.library/env/machines/python.md: `pip install torch==2.13.0` takes the CPU file on this machine's disk;
    # a range admitting a newer release takes a CUDA build of several GB
    assert _lock()["torch"] == ("2.13.0", True)


def test_setup_installs_everything_under_the_lock():
    text = SETUP.read_text()
    assert re.search(r'^lock=\$\{AF3TRT_LOCK:-constraints\.txt\}$', text, re.M)
    commands = [c.strip() for c in re.sub(r"\\\n\s*", " ", text).splitlines()]
    installs = [c for c in commands if re.search(r'pip"? install', c) and not c.startswith(("#", "echo"))]
    assert len(installs) == 4 + len(OWN_VENV_EXTRAS)
    # four into the project's venv under the lock, one into each extra's own venv under its own lock
    assert sorted(c for c in installs if '-c "$lock"' not in c) == sorted(
        next(c for c in installs if f"-c {OWN_VENV_EXTRAS[e].name}" in c and f"/{OWN_VENVS[e]}/" in c)
        for e in OWN_VENV_EXTRAS)
    # what setup installs --no-deps bypasses the resolver: the lock holds each by hand
    no_deps = next(c for c in installs if "--no-deps" in c).split("--no-deps", 1)[1].split()
    pins = _lock()
    assert no_deps and all(pins[_norm(n)][1] for n in no_deps), no_deps


def _fake_venv(root: Path, log: Path, label: str = "") -> Path:
    """A venv whose pip and python only write down how they were called (and checkov's venv inside it)."""
    (root / "bin").mkdir(parents=True)
    for tool in ("pip", "python"):
        exe = root / "bin" / tool
        exe.write_text(f'#!/bin/sh\necho "{label}{tool} $*" >> "{log}"\n')
        exe.chmod(0o755)
    if not label:
        for own in OWN_VENVS.values():
            _fake_venv(root / own, log, f"{own}-")
    return root


def test_a_change_of_the_lock_reruns_setups_pip_step_under_the_new_lock(tmp_path):
    log = tmp_path / "calls.log"
    venv = _fake_venv(tmp_path / "venv", log)
    lock = tmp_path / "lock.txt"
    shutil.copy(LOCK, lock)
    env = {**os.environ, "AF3TRT_VENV": str(venv), "AF3TRT_LOCK": str(lock), "AF3TRT_SETUP_SKIP_CHECK": "1"}

    def setup() -> list[str]:
        log.write_text("")
        subprocess.run(["bash", str(SETUP)], env=env, check=True, capture_output=True, text=True)
        return log.read_text().splitlines()

    first = setup()
    pips = [c for c in first if c.startswith("pip ")]
    assert len(pips) >= 3 and all(f"-c {lock}" in c for c in pips), first
    for extra, own in OWN_VENVS.items():
        assert [c for c in first if c.startswith(f"{own}-pip ")] == [
            f"{own}-pip install -q -c {OWN_VENV_EXTRAS[extra].name}"], first
    assert setup() == []                       # stamp current: nothing to do
    lock.write_text(lock.read_text().replace("numpy==1.26.4", "numpy==1.26.3"))
    assert setup() == first                    # the lock moved: the pip step runs again, under it


def test_the_venv_the_suite_runs_in_holds_the_locked_versions():
    assert Path(sys.prefix).resolve() == (ROOT / ".venv").resolve(), "the suite runs in the venv setup.sh made"
    # what pip installed into the venv's site-packages (not the copies setuptools vendors, which may be on sys.path)
    site = {sysconfig.get_paths()[k] for k in ("purelib", "platlib")}
    installed = {_norm(d.metadata["Name"]): d.version for d in metadata.distributions(path=sorted(site))}
    drift = {name: (version, installed.get(name)) for name, (version, _) in _lock().items()
             if name not in installed or Version(installed[name]).public != Version(version).public}
    assert drift == {}
