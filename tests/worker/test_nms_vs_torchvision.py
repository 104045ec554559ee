"""The project's grouped NMS (numpy, used when re-thresholding on CPU) against torchvision's."""

import numpy as np
import torch
from torchvision import ops

from pseudolabel.labels.picking import grouped_nms


def test_grouped_nms_matches_torchvision_batched_nms():
    rng = np.random.default_rng(3)
    n = 3000
    groups = rng.integers(0, 300, size=n)
    xy = rng.uniform(0, 100, size=(n, 2))
    boxes = np.hstack([xy, xy + rng.uniform(5, 50, size=(n, 2))])
    scores = rng.uniform(size=n)  # distinct scores: torchvision's tie order is unspecified
    ours = np.flatnonzero(grouped_nms(boxes, scores, groups, 0.5))
    theirs = ops.batched_nms(torch.tensor(boxes), torch.tensor(scores), torch.tensor(groups), 0.5).numpy()
    np.testing.assert_array_equal(ours, np.sort(theirs))
