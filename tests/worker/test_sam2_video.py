"""Sam2VideoTracker on the real SAM2.1 video predictor: tiny config, RANDOM weights, a few tiny frames.

A SMOKE TEST of the code path (window init, box and mask prompts, forward and reverse propagation,
RLE sizes, ids, scores, reset): random weights say nothing about tracking quality, so nothing here
checks where the masks are.
"""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageDraw

from pseudolabel.models.loading import TrackerSpec, load_tracker
from pseudolabel.models.sam2_video import Sam2VideoTracker
from pseudolabel.models.stages import DetectionSettings
from pseudolabel.rle import decode_rle
from pseudolabel.testing.models import BlobDetector
from pseudolabel.video.tracking import TrackingSettings, track_video

W, H = 80, 48


def write_window(directory, frames: int = 4) -> list[bytes]:
    data = []
    for n in range(frames):
        image = Image.new("RGB", (W, H), (40, 40, 40))
        ImageDraw.Draw(image).rectangle([10 + 4 * n, 10, 30 + 4 * n, 30], fill=(230, 30, 30))
        path = directory / f"{n:06d}.jpg"
        image.save(path, quality=95)
        data.append(path.read_bytes())
    return data


@pytest.fixture(scope="module")
def tracker() -> Sam2VideoTracker:
    spec = TrackerSpec(checkpoint="random", tiny=True, variant="tiny", device="cpu")
    loaded = load_tracker(spec)
    assert isinstance(loaded, Sam2VideoTracker)
    return loaded


@pytest.mark.model
def test_identity_marks_the_smoke_run(tracker):
    identity = tracker.describe()
    assert identity["weights"] == "random" and identity["smoke_run"] is True
    assert identity["model"] == "sam2.1-video" and identity["input_size"] == "128x128"


@pytest.mark.model
def test_box_and_mask_prompts_propagate_both_ways(tracker, tmp_path):
    write_window(tmp_path, 4)
    tracker.init(str(tmp_path))
    tracker.add_box(0, 7, np.array([10, 10, 31, 31], np.float32))
    mask = np.zeros((H, W), bool)
    mask[5:20, 50:70] = True
    tracker.add_mask(0, 9, mask)
    forward = list(tracker.propagate(0))
    assert [f.frame for f in forward] == [0, 1, 2, 3]
    for tracked in forward:
        assert tracked.track_ids == [7, 9]
        assert (tracked.masks.height, tracked.masks.width) == (H, W) and len(tracked.masks) == 2
        assert tracked.scores.shape == (2,) and np.all((tracked.scores >= 0) & (tracked.scores <= 1))
        for counts, area in zip(tracked.masks.counts, tracked.masks.areas, strict=True):
            assert decode_rle(counts, H, W).sum() == area
    tracker.reset()
    assert tracker._state is None

    tracker.init(str(tmp_path))
    tracker.add_box(3, 1, np.array([22, 10, 43, 31], np.float32))
    backward = list(tracker.propagate(3, reverse=True))
    assert [f.frame for f in backward] == [3, 2, 1, 0] and all(f.track_ids == [1] for f in backward)
    tracker.reset()


@pytest.mark.model
def test_track_video_with_the_real_predictor(tracker, tmp_path):
    """The whole keyframe/window loop on SAM2 (random weights: only shapes and bookkeeping are checked)."""
    frames_dir = tmp_path / "src"
    frames_dir.mkdir()
    data = write_window(frames_dir, 7)
    rows = []
    summary = track_video(
        "v",
        len(data),
        lambda i: data[i],
        BlobDetector(),
        tracker,
        DetectionSettings(),
        TrackingSettings(keyframe_every=3),
        rows.append,
    )
    assert summary.keyframes == 3 and summary.started >= 1 and summary.max_window_frames == 4
    for batch in rows:
        assert set(batch["height"]) == {H} and set(batch["width"]) == {W}
        assert all(1 <= t <= summary.started for t in batch["track_id"])


def test_presence_scores_of_a_frame_cross_to_the_host_in_one_copy():
    """Objects without a logit on this frame read 1.0; the others are sigmoid(logit), all in one copy."""
    import torch

    from pseudolabel.models.runtime import counting_syncs

    logits = [torch.tensor([[2.0]]), None, torch.tensor([[-1.0]]), torch.tensor([[0.5]])]

    def outputs(logit):
        entry = {"object_score_logits": logit} if logit is not None else {}
        return {"cond_frame_outputs": {}, "non_cond_frame_outputs": {7: entry} if logit is not None else {}}

    state = {"output_dict_per_obj": {i: outputs(logit) for i, logit in enumerate(logits)}}
    with counting_syncs(emulate_device=True) as syncs:
        scores = Sam2VideoTracker._presence(state, len(logits), 7)
    assert syncs.count == 1
    expected = [1 / (1 + np.exp(-2.0)), 1.0, 1 / (1 + np.exp(1.0)), 1 / (1 + np.exp(-0.5))]
    np.testing.assert_allclose(scores, expected, rtol=1e-6)
