"""bench/gpu_host_overhead.py's measurement: device waits are never host time, whichever way a path
waits, and the two paths' masks may differ in a few pixels (as CUDA's F.interpolate can make them)."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

import gpu_host_overhead as bench  # noqa: E402

from pseudolabel.models.interfaces import Candidates  # noqa: E402
from pseudolabel.rle import encode_host_masks  # noqa: E402


def test_a_wait_in_event_synchronize_counts_as_device_time_like_a_wait_in_cpu(monkeypatch):
    monkeypatch.setattr(torch.cuda.Event, "synchronize", lambda self: time.sleep(0.05))
    with bench.TensorOps() as ops, bench.timing_waits(ops):
        torch.cuda.Event.synchronize(None)
        torch.zeros(3).cpu()
    assert ops.seconds >= 0.05 and ops.calls >= 1
    assert torch.cuda.Event.synchronize(None) is None  # restored: no longer timed into ops


def _with_masks(masks: np.ndarray, scores: np.ndarray) -> Candidates:
    n, height, width = masks.shape
    found = Candidates(
        "img",
        width,
        height,
        np.zeros((n, 4), np.float32),
        np.ones(n, np.float32),
        np.ones(n, np.float32),
        ["a"] * n,
        np.arange(n, dtype=np.int32),
    )
    return found.with_masks(encode_host_masks(masks), scores, np.zeros(n, np.int8), scores[:, None])


def test_masks_may_differ_in_a_few_pixels_between_the_paths():
    masks = np.zeros((2, 300, 400), bool)
    masks[:, 50:200, 60:300] = True
    scores = np.array([0.5, 0.75], np.float32)
    flipped = masks.copy()
    flipped[1, 50, 60] = False  # a logit at 0 rounding the other way
    assert bench._check_same_masks([_with_masks(masks, scores)], [_with_masks(masks, scores)]) == 0
    assert bench._check_same_masks([_with_masks(masks, scores)], [_with_masks(flipped, scores)]) == 1
    broken = masks.copy()
    broken[1, :10] = True  # 4000 pixels of 240000: not rounding
    with pytest.raises(AssertionError, match="4000 of 240000 mask pixels differ"):
        bench._check_same_masks([_with_masks(masks, scores)], [_with_masks(broken, scores)])
    with pytest.raises(AssertionError, match="scores differ"):
        bench._check_same_masks([_with_masks(masks, scores)], [_with_masks(masks, scores + 0.1)])
