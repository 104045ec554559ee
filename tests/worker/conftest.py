"""Worker-side tests: the model code in the model-worker environment (no Dagster there)."""

import sys
from pathlib import Path

import pytest
import torch

# Shared test helpers (synthetic images) live one folder up.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cuda_autocast import BF16_TARGETS, Bf16Target  # noqa: E402

# Every device here: the CPU always, CUDA where there is one (a GPU machine runs the same tests there).
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(scope="module", params=DEVICES)
def device(request) -> torch.device:
    return torch.device(request.param)


@pytest.fixture(params=BF16_TARGETS)
def bf16(request) -> Bf16Target:
    """Where a bf16 autocast test runs: the CPU under CUDA's autocast rules, and CUDA where there is one."""
    return Bf16Target(request.param)
