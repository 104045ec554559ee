"""The model-worker environment: requirement sets, the env-var override, a real (tiny) venv build shared by
two concurrent processes, the ``PYTHONPATH`` entry for the domain code, and the ``pseudolabel workers`` CLI."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

import pseudolabel
from pseudolabel.workers.environment import (
    HOME_ENV,
    PYTHON_ENV,
    ensure_worker_python,
    environment_key,
    source_path_entry,
    worker_requirements,
)

TINY = ["piexif"]  # pure-Python, no dependencies: a venv + pip install in a few seconds
BUILD_START = "building the model-worker environment"
PACKAGE_DIR = Path(pseudolabel.__file__).resolve().parent


def _names(requirements: list[str]) -> set[str]:
    return {re.match(r"[A-Za-z0-9_.\-]+", r).group(0).lower() for r in requirements}


@pytest.fixture(autouse=True)
def _no_worker_python_override(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(PYTHON_ENV, raising=False)


def test_worker_requirements_are_core_plus_worker_extra_without_dagster():
    reqs = worker_requirements()
    names = _names(reqs)
    assert {"torch", "sam2", "groundingdino-py", "transformers", "dagster-pipes", "pyarrow", "numpy"} <= names
    assert not {"dagster", "dagster-webserver", "dagster-aws", "dagster-k8s", "pseudolabel", "pytest"} & names
    assert not any(";" in r or r.startswith("dagster>=") for r in reqs)

    with_tests = worker_requirements(("worker", "worker-test"))
    assert _names(with_tests) - names == {"pytest"}
    assert environment_key(reqs) != environment_key(with_tests)
    assert environment_key(reqs) == environment_key(list(reversed(worker_requirements())))
    assert re.fullmatch(r"[0-9a-f]{16}", environment_key(reqs))


@pytest.mark.parametrize("extra", ["orchestrator", "dev"])
def test_orchestrator_extras_are_refused(extra: str):
    with pytest.raises(ValueError, match=extra):
        worker_requirements(("worker", extra))


def test_worker_python_env_var_is_returned_as_is(monkeypatch, tmp_path):
    monkeypatch.setenv(HOME_ENV, str(tmp_path))
    monkeypatch.setenv(PYTHON_ENV, sys.executable)
    assert ensure_worker_python(log=pytest.fail) == sys.executable
    assert list(tmp_path.iterdir()) == []  # nothing built

    monkeypatch.setenv(PYTHON_ENV, str(tmp_path / "missing" / "python"))
    with pytest.raises(RuntimeError, match=PYTHON_ENV):
        ensure_worker_python()


_BUILD_SCRIPT = """
import sys
from pseudolabel.workers.environment import ensure_worker_python

with open(sys.argv[1], "a") as log:
    python = ensure_worker_python(requirements={tiny!r}, log=lambda line: print(line, file=log, flush=True))
print(python)
"""


@pytest.fixture(scope="module")
def tiny_env(tmp_path_factory) -> tuple[Path, str, list[list[str]]]:
    """Two processes ask for the same tiny environment; the second starts once the first is building."""
    home = tmp_path_factory.mktemp("workers-home")
    env = {**os.environ, HOME_ENV: str(home)}
    env.pop(PYTHON_ENV, None)
    logs = [home.parent / f"{home.name}-log{i}.txt" for i in range(2)]
    script = _BUILD_SCRIPT.format(tiny=TINY)

    def start(log: Path) -> subprocess.Popen:
        cmd = [sys.executable, "-c", script, str(log)]
        return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    first = start(logs[0])
    deadline = time.monotonic() + 60
    while not (logs[0].exists() and BUILD_START in logs[0].read_text()):
        assert first.poll() is None, first.communicate()
        assert time.monotonic() < deadline, "the first process never started building"
        time.sleep(0.05)
    second = start(logs[1])
    outputs = []
    for proc in (first, second):
        out, err = proc.communicate(timeout=180)
        assert proc.returncode == 0, err
        outputs.append(out.strip().splitlines()[-1])
    assert outputs[0] == outputs[1]
    return home, outputs[0], [log.read_text().splitlines() for log in logs]


def test_concurrent_callers_build_once(tiny_env):
    home, python, (first_log, second_log) = tiny_env
    assert sum(BUILD_START in line for line in first_log + second_log) == 1
    assert any(BUILD_START in line for line in first_log)
    assert any(line.startswith("waiting for another process") for line in second_log)
    assert any(line.startswith("[worker env] ") for line in first_log)  # pip's output, streamed

    env_dir = Path(python).parent.parent
    assert env_dir == home / environment_key(TINY)
    marker = json.loads((env_dir / ".complete").read_text())
    assert marker["requirements"] == TINY and marker["key"] == env_dir.name
    assert (env_dir / "requirements.txt").read_text().split() == TINY
    subprocess.run([python, "-c", "import piexif"], check=True)


def test_built_environment_is_reused_without_building(tiny_env, monkeypatch):
    home, python, _ = tiny_env
    monkeypatch.setenv(HOME_ENV, str(home))
    lines: list[str] = []
    started = time.monotonic()
    assert ensure_worker_python(requirements=TINY, log=lines.append) == python
    assert lines == [] and time.monotonic() - started < 1


def test_source_path_entry_shows_only_the_package(tiny_env, monkeypatch, tmp_path):
    home, python, _ = tiny_env
    monkeypatch.setenv(HOME_ENV, str(home))
    with ThreadPoolExecutor(4) as pool:
        entries = set(pool.map(lambda _: source_path_entry(), range(8)))
    assert len(entries) == 1
    entry = Path(entries.pop())
    assert [p.name for p in entry.iterdir()] == ["pseudolabel"]
    assert (entry / "pseudolabel").is_symlink() and (entry / "pseudolabel").resolve() == PACKAGE_DIR

    probe = "import importlib.util as u; print(u.find_spec('pseudolabel').origin, u.find_spec('dagster'))"
    env = {"PATH": os.environ.get("PATH", ""), "PYTHONPATH": str(entry)}
    out = subprocess.run(
        [python, "-c", probe], env=env, cwd=tmp_path, capture_output=True, text=True, check=True
    )
    origin, dagster = out.stdout.split()
    assert Path(origin) == entry / "pseudolabel" / "__init__.py"
    assert Path(origin).resolve().parent == PACKAGE_DIR
    assert dagster == "None"  # the orchestrator's site-packages stay out of sight


def test_failed_build_raises_with_pip_output_and_leaves_no_marker(monkeypatch, tmp_path):
    monkeypatch.setenv(HOME_ENV, str(tmp_path / "home"))
    broken = [str(tmp_path / "no-such-project")]  # pip rejects a missing local path without any download
    env_dir = tmp_path / "home" / environment_key(broken)
    env_dir.mkdir(parents=True)
    (env_dir / "left-over").touch()  # as if an earlier build had died half-way

    lines: list[str] = []
    with pytest.raises(RuntimeError, match="pip failed") as failure:
        ensure_worker_python(requirements=broken, log=lines.append)
    assert "no-such-project" in str(failure.value)
    assert not (env_dir / "left-over").exists() and not (env_dir / ".complete").exists()
    assert any(line.startswith("[worker env] ") for line in lines)


def _cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    script = Path(sys.executable).parent / "pseudolabel"
    return subprocess.run([str(script), *args], env=env, capture_output=True, text=True, timeout=60)


def test_cli_workers_python(tmp_path):
    env = {**os.environ, HOME_ENV: str(tmp_path)}
    env.pop(PYTHON_ENV, None)
    missing = _cli("workers", "python", env=env)
    assert missing.returncode == 1 and "pseudolabel workers install" in missing.stderr

    env[PYTHON_ENV] = sys.executable
    for command in ("python", "install"):
        found = _cli("workers", command, env=env)
        assert found.returncode == 0, found.stderr
        assert found.stdout.strip().splitlines()[-1] == sys.executable
    assert list(tmp_path.iterdir()) == []
