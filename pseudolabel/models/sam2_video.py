"""SAM2.1's video predictor as a :class:`~pseudolabel.video.tracking.Tracker`, one window at a time.

``SAM2VideoPredictor.init_state`` loads every frame of the directory it is given and keeps per-frame
memories for every tracked frame, so it is only ever handed one window (the K + 1 frames between two
detector keyframes, see :mod:`pseudolabel.video.tracking`) and ``reset`` drops the state after each.
Frames stay in host memory (``offload_video_to_cpu``); the tracking memory may too
(``offload_state_to_cpu``). Masks are binarised and RLE-encoded on the device; the per-frame score is
SAM2's object-presence probability (sigmoid of ``object_score_logits``).

Checkpoints, variants and tiny random configurations are the image segmenter's (``sam2_segmenter``):
the video predictor is the same SAM2.1 model with its memory modules in use.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch import nn

from pseudolabel.models.loading import TrackerSpec, spec_checkpoint, spec_identity, spec_runtime
from pseudolabel.models.runtime import FP32, device_scope, enable_tf32, inference
from pseudolabel.models.sam2_build import VARIANTS, build_sam2_model, sam2_overrides
from pseudolabel.models.sam2_segmenter import fp32_heads
from pseudolabel.rle import encode_device_masks
from pseudolabel.video.tracking import TrackedFrame


def load_sam2_video(spec: TrackerSpec) -> Sam2VideoTracker:
    """The tracker ``spec`` describes: checkpoint fetched and verified, predictor built and placed."""
    resolved = spec_checkpoint(spec, VARIANTS[spec.variant].checkpoint)
    device, precision = spec_runtime(spec, resolved)
    overrides = sam2_overrides(spec.tiny, spec.image_size)
    with device_scope(device):  # sam2 puts some tables on "cuda" while building: the model's device
        predictor = build_sam2_model(
            spec.variant, resolved.path, overrides=overrides, seed=spec.seed, video=True
        )
    info = {
        "model": "sam2.1-video",
        "variant": spec.variant + ("-tiny" if spec.tiny else ""),
        **spec_identity(spec, resolved),
        "offload_video_to_cpu": spec.offload_video_to_cpu,
        "offload_state_to_cpu": spec.offload_state_to_cpu,
    }
    return Sam2VideoTracker(
        predictor,
        device=device,
        precision=precision,
        offload_video_to_cpu=spec.offload_video_to_cpu,
        offload_state_to_cpu=spec.offload_state_to_cpu,
        info=info,
    )


class Sam2VideoTracker:
    """Box/mask prompts on one window of frames, propagated with SAM2's memory (see module docstring)."""

    def __init__(
        self,
        predictor: nn.Module,
        *,
        device: torch.device,
        precision: str = FP32,
        offload_video_to_cpu: bool = True,
        offload_state_to_cpu: bool = False,
        info: dict[str, Any] | None = None,
    ) -> None:
        enable_tf32(device)
        self.predictor = predictor.to(device).eval()
        fp32_heads(predictor)  # the IoU picks the kept mask, the object score is the presence score
        self.device = device
        self.precision = precision
        self.offload_video_to_cpu = offload_video_to_cpu
        self.offload_state_to_cpu = offload_state_to_cpu
        self._info = dict(info or {})
        self._state: dict[str, Any] | None = None

    def describe(self) -> dict[str, Any]:
        size = int(self.predictor.image_size)
        return {
            **self._info,
            "device": str(self.device),
            "precision": self.precision,
            "batch_size": 1,
            "input_size": f"{size}x{size}",
        }

    def init(self, frames_dir: str) -> None:
        self.reset()
        with inference(self.device, self.precision):
            self._state = self.predictor.init_state(
                frames_dir,
                offload_video_to_cpu=self.offload_video_to_cpu,
                offload_state_to_cpu=self.offload_state_to_cpu,
            )

    def add_box(self, frame: int, track_id: int, box: np.ndarray) -> None:
        with inference(self.device, self.precision):
            self.predictor.add_new_points_or_box(
                self._opened(), frame_idx=frame, obj_id=int(track_id), box=np.asarray(box, np.float32)
            )

    def add_mask(self, frame: int, track_id: int, mask: np.ndarray) -> None:
        with inference(self.device, self.precision):
            self.predictor.add_new_mask(
                self._opened(),
                frame_idx=frame,
                obj_id=int(track_id),
                mask=torch.as_tensor(np.asarray(mask, bool)),
            )

    def propagate(self, start: int, *, reverse: bool = False) -> Iterator[TrackedFrame]:
        state = self._opened()
        with inference(self.device, self.precision):
            for frame, obj_ids, masks in self.predictor.propagate_in_video(
                state, start_frame_idx=start, reverse=reverse
            ):
                encoded = encode_device_masks(masks[:, 0] > 0.0)
                scores = self._presence(state, len(obj_ids), frame)
                yield TrackedFrame(frame, [int(i) for i in obj_ids], encoded, scores)

    @staticmethod
    def _presence(state: dict[str, Any], count: int, frame: int) -> np.ndarray:
        """The frame's ``count`` objects' presence probabilities, in one device->host copy (1.0 where the
        model gives none)."""
        scores = np.ones(count, np.float32)
        found, logits = [], []
        for obj_idx in range(count):
            outputs = state["output_dict_per_obj"][obj_idx]
            out = outputs["cond_frame_outputs"].get(frame) or outputs["non_cond_frame_outputs"].get(frame)
            if out is not None and out.get("object_score_logits") is not None:
                found.append(obj_idx)
                logits.append(out["object_score_logits"].reshape(-1)[:1])
        if logits:
            scores[found] = torch.sigmoid(torch.cat(logits).float()).cpu().numpy()
        return scores

    def reset(self) -> None:
        if self._state is not None:
            self.predictor.reset_state(self._state)
            self._state = None  # drops the window's frames and memories

    def _opened(self) -> dict[str, Any]:
        if self._state is None:
            raise RuntimeError("Sam2VideoTracker: init(frames_dir) first")
        return self._state
