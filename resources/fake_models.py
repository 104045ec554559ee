"""Fake detector/segmenter resources: deterministic, instant, no torch model, no checkpoint.

Drop-in for :class:`resources.models.GroundingDinoResource` / :class:`resources.models.Sam2Resource`
in downstream tests and offline demos. Every run they produce is labelled a smoke run.
"""

from __future__ import annotations

from typing import Any

from pseudolabel.models.fakes import FakeDetector, FakeSegmenter
from resources.models import DetectorResource, SegmenterResource


class FakeDetectorResource(DetectorResource):
    batch_size: int = 8
    max_boxes_per_caption: int = 3  # 0..this many candidates per image and caption, hash-chosen

    def describe(self) -> dict[str, Any]:
        return self.detector().describe()

    def detector(self) -> FakeDetector:
        return FakeDetector(batch_size=self.batch_size, max_boxes_per_caption=self.max_boxes_per_caption)


class FakeSegmenterResource(SegmenterResource):
    batch_size: int = 8

    def describe(self) -> dict[str, Any]:
        return self.segmenter().describe()

    def segmenter(self) -> FakeSegmenter:
        return FakeSegmenter(batch_size=self.batch_size)
