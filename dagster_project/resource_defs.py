"""The resources the code location runs with, chosen from the environment.

``PSEUDOLABEL_MODELS`` picks the model weights: ``official`` (default; checkpoints from the release
URLs, verified and cached), ``random`` (SMOKE RUN: the real architectures at tiny size with random
weights, no downloads, says nothing about quality) or ``fake`` (instant deterministic stand-ins).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from pseudolabel.quality.adapters import StageModelCandidates
from resources.catalog import catalog_from_env
from resources.fake_models import FakeDetectorResource, FakeSegmenterResource
from resources.models import DetectorResource, GroundingDinoResource, Sam2Resource, SegmenterResource
from resources.storage import storage_from_env

MODELS_ENV = "PSEUDOLABEL_MODELS"
MODEL_CHOICES = ("official", "random", "fake")
DEFAULT_QUALITY_CAPTIONS = ("plant .",)


def model_resources(choice: str) -> tuple[DetectorResource, SegmenterResource]:
    if choice == "official":
        return GroundingDinoResource(), Sam2Resource()
    if choice == "random":
        return (
            GroundingDinoResource(checkpoint="random", tiny=True, text_encoder="tiny-random"),
            Sam2Resource(checkpoint="random", tiny=True, variant="tiny"),
        )
    if choice == "fake":
        return FakeDetectorResource(), FakeSegmenterResource()
    raise ValueError(f"{MODELS_ENV} must be one of {', '.join(MODEL_CHOICES)}; got {choice!r}")


def quality_models(detector: DetectorResource, segmenter: SegmenterResource) -> StageModelCandidates:
    """label_quality's candidate source: the same models as the chain, loaded only when it runs."""
    return StageModelCandidates(detector.detector, segmenter.segmenter, DEFAULT_QUALITY_CAPTIONS)


def resources_from_env(environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    environ = os.environ if environ is None else environ
    detector, segmenter = model_resources(environ.get(MODELS_ENV, "official").strip().lower() or "official")
    quality = quality_models(detector, segmenter)
    return {
        "storage": storage_from_env(dict(environ)),
        "catalog": catalog_from_env(),
        "detector": detector,
        "segmenter": segmenter,
        "quality_detector": quality,
        "quality_segmenter": quality,
    }
