"""Worker-side tests: the model code in the model-worker environment (no Dagster there)."""

import sys
from pathlib import Path

import pytest
import torch

# Shared test helpers (synthetic images) live one folder up.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# Every device here: the CPU always, CUDA where there is one (a GPU machine runs the same tests there).
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(scope="module", params=DEVICES)
def device(request) -> torch.device:
    return torch.device(request.param)
