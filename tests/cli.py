"""Running the `dagster` CLI as a user does: the venv's console script, from the repo root."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DAGSTER = str(Path(sys.executable).parent / "dagster")
PSEUDOLABEL = str(Path(sys.executable).parent / "pseudolabel")


def dagster(*args: str, env: Mapping[str, str], check: bool = True, timeout: float = 300):
    """``dagster ARGS...``; with ``check``, a non-zero exit fails the test with the command's output."""
    done = subprocess.run(
        [DAGSTER, *args], env=dict(env), cwd=REPO, capture_output=True, text=True, timeout=timeout
    )
    if check:
        assert done.returncode == 0, (
            f"dagster {' '.join(args)}:\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}"
        )
    return done


def pseudolabel(*args: str, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    """``pseudolabel ARGS...`` (the console script) in ``cwd``; the caller checks the exit code."""
    return subprocess.run([PSEUDOLABEL, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout)
