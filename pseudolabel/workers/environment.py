"""The model-worker Python environment: torch, SAM2, Grounding DINO and dagster-pipes, kept apart from Dagster.

One pyproject.toml declares both environments: the orchestrator installs the core dependencies plus the
``orchestrator`` extra; the worker gets the core dependencies plus the ``worker`` extra (their pins, e.g.
hydra-core's antlr 4.9, must never reach Dagster). Backends whose packages conflict with ``worker`` get an
extra of their own (``worker-sam3``: transformers >= 5), hence an environment of their own; an
environment is named by its first extra. :func:`ensure_worker_python` returns the interpreter that GPU
stages run ``python -m pseudolabel.workers`` with: the environment's override variable if set (a
prebuilt environment, e.g. the worker image; see :func:`python_env_var`: ``$PSEUDOLABEL_WORKER_PYTHON``
for ``worker``, ``$PSEUDOLABEL_WORKER_PYTHON_SAM3`` for ``worker-sam3``), otherwise a virtualenv under
:func:`workers_home` keyed by the requirement set, built on first use under a file lock so concurrent
callers build it once.
The worker env does not install this package: local workers get :func:`source_path_entry` as
``PYTHONPATH`` and so run exactly the orchestrator's copy of the domain code. Stdlib only.
"""

from __future__ import annotations

import collections
import fcntl
import hashlib
import importlib.metadata
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

PYTHON_ENV = "PSEUDOLABEL_WORKER_PYTHON"  # the "worker" environment's interpreter; see python_env_var
HOME_ENV = "PSEUDOLABEL_WORKER_HOME"
DEFAULT_EXTRA = "worker"
ORCHESTRATOR_EXTRAS = frozenset({"orchestrator", "dev"})
_EXTRA_MARKER = re.compile(r"""^extra\s*==\s*['"]([^'"]+)['"]$""")
_SELF_REF = re.compile(r"^pseudolabel\s*\[([^\]]*)\]")


def worker_requirements(extras: Sequence[str] = ("worker",)) -> list[str]:
    """Core requirements of ``pseudolabel`` plus those of ``extras``, markers stripped, in declared order."""
    by_extra: dict[str | None, list[str]] = collections.defaultdict(list)
    for line in importlib.metadata.requires("pseudolabel") or []:
        req, _, marker = (part.strip() for part in line.partition(";"))
        match = _EXTRA_MARKER.match(marker)
        if marker and not match:
            raise ValueError(f"unsupported marker in pseudolabel requirement {line!r}")
        by_extra[match.group(1) if match else None].append(req)

    out: list[str] = []
    todo, seen = [None, *extras], set()
    while todo:
        extra = todo.pop(0)
        if extra in seen:
            continue
        if extra in ORCHESTRATOR_EXTRAS:
            raise ValueError(f"the {extra!r} extra belongs to the orchestrator, not the worker environment")
        seen.add(extra)
        for req in by_extra.get(extra, []):
            if self_ref := _SELF_REF.match(req):  # pseudolabel[x]: expand x instead of installing ourselves
                todo.extend(x.strip() for x in self_ref.group(1).split(",") if x.strip())
            elif req not in out:
                out.append(req)
    return out


def environment_key(requirements: Sequence[str]) -> str:
    """Stable 16-hex-digit key of the requirement set, the Python version and the machine architecture."""
    python = f"{sys.version_info.major}.{sys.version_info.minor}"
    blob = json.dumps([sorted(requirements), python, platform.machine()])
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def workers_home() -> Path:
    return Path(os.environ.get(HOME_ENV) or Path.home() / ".cache" / "pseudolabel" / "workers")


def environment_suffix(extra: str) -> str:
    """What names the environment of ``extra`` in per-environment settings: "" for ``worker``, else the
    extra without its ``worker-`` prefix, upper-cased, other characters as "_" (``worker-sam3`` ->
    ``_SAM3``)."""
    if extra == DEFAULT_EXTRA:
        return ""
    return "_" + re.sub(r"[^A-Z0-9]", "_", extra.removeprefix(f"{DEFAULT_EXTRA}-").upper())


def python_env_var(extra: str = DEFAULT_EXTRA) -> str:
    """The variable naming a prebuilt interpreter for the environment of ``extra``:
    ``PSEUDOLABEL_WORKER_PYTHON`` for ``worker``, ``PSEUDOLABEL_WORKER_PYTHON_SAM3`` for ``worker-sam3``.
    Each environment has its own, so pointing ``worker`` at the worker image's interpreter never runs
    SAM 3 on transformers 4."""
    return PYTHON_ENV + environment_suffix(extra)


def _from_env(extras: Sequence[str]) -> str | None:
    name = python_env_var(extras[0] if extras else DEFAULT_EXTRA)
    python = os.environ.get(name)
    if not python:
        return None
    if not (os.path.isfile(python) and os.access(python, os.X_OK)):
        raise RuntimeError(f"{name}={python!r} is not an existing executable file")
    return python


def built_worker_python(extras: Sequence[str] = ("worker",)) -> str | None:
    """The interpreter of the environment of ``extras`` if its override variable (:func:`python_env_var`)
    is set or the env is built; never builds."""
    if python := _from_env(extras):
        return python
    env_dir = workers_home() / environment_key(worker_requirements(extras))
    return str(env_dir / "bin" / "python") if (env_dir / ".complete").exists() else None


def ensure_worker_python(
    extras: Sequence[str] = ("worker",),
    *,
    requirements: Sequence[str] | None = None,
    log: Callable[[str], object] = print,
) -> str:
    """Path of the interpreter of the environment of ``extras`` (named by the first): its override variable
    (:func:`python_env_var`) if set, else its virtualenv, built first if needed (once, under a lock)."""
    if python := _from_env(extras):
        return python
    reqs = list(requirements) if requirements is not None else worker_requirements(extras)
    key = environment_key(reqs)
    env_dir = workers_home() / key
    python = str(env_dir / "bin" / "python")
    if (env_dir / ".complete").exists():
        return python

    env_dir.parent.mkdir(parents=True, exist_ok=True)
    with open(env_dir.parent / f"{key}.lock", "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log(f"waiting for another process building the worker environment at {env_dir} ...")
            fcntl.flock(lock, fcntl.LOCK_EX)
        if (env_dir / ".complete").exists():
            return python
        started = time.monotonic()
        log(f"building the model-worker environment in {env_dir} (first use; a few minutes) ...")
        if env_dir.exists():
            shutil.rmtree(env_dir)  # a build that died half-way
        venv = subprocess.run([sys.executable, "-m", "venv", str(env_dir)], capture_output=True, text=True)
        if venv.returncode != 0:
            raise RuntimeError(f"`{sys.executable} -m venv {env_dir}` failed:\n{venv.stdout}{venv.stderr}")
        _pip_install(python, reqs, log)
        (env_dir / "requirements.txt").write_text("".join(f"{r}\n" for r in reqs))
        marker = {
            "requirements": reqs,
            "key": key,
            "python": platform.python_version(),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        (env_dir / ".complete").write_text(json.dumps(marker, indent=2) + "\n")
        log(f"model-worker environment ready in {time.monotonic() - started:.0f}s: {python}")
    return python


def _pip_install(python: str, requirements: Sequence[str], log: Callable[[str], object]) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env["SAM2_BUILD_CUDA"] = "0"  # sam2's CUDA extension only serves video prediction
    cmd = [python, "-m", "pip", "install", *requirements]
    tail: collections.deque[str] = collections.deque(maxlen=40)
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            tail.append(line.rstrip())
            log(f"[worker env] {line.rstrip()}")
    if proc.returncode != 0:
        output = "\n".join(tail)
        raise RuntimeError(f"pip failed (exit {proc.returncode}) building the worker environment:\n{output}")


def source_path_entry() -> str:
    """A directory holding only a ``pseudolabel`` symlink to the imported package: a ``PYTHONPATH`` entry
    that shows workers this copy of the domain code without the orchestrator's site-packages."""
    import pseudolabel

    package = Path(pseudolabel.__file__).resolve().parent
    src = workers_home() / "src"
    entry = src / hashlib.sha256(str(package).encode()).hexdigest()[:12]
    link = entry / "pseudolabel"
    if os.path.islink(link) and os.readlink(link) == str(package):
        return str(entry)
    entry.mkdir(parents=True, exist_ok=True)
    # The temporary link lives next to ``entry`` (same filesystem) so ``entry`` never holds anything else.
    tmp = src / f".pseudolabel.{os.getpid()}.{time.monotonic_ns()}.tmp"
    os.symlink(package, tmp)
    try:
        os.replace(tmp, link)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return str(entry)
