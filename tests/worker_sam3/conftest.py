"""SAM 3 worker-side tests: the model code in the worker-sam3 environment (transformers >= 5, no Dagster)."""

import sys
from pathlib import Path

import pytest

# Shared test helpers (synthetic images) live one folder up; the CUDA autocast emulation in tests/worker.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "worker"))

from cuda_autocast import BF16_TARGETS, Bf16Target  # noqa: E402


@pytest.fixture(params=BF16_TARGETS)
def bf16(request) -> Bf16Target:
    """Where a bf16 autocast test runs: the CPU under CUDA's autocast rules, and CUDA where there is one."""
    return Bf16Target(request.param)
