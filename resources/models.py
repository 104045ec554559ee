"""Model resources: Grounding DINO (``detector``) and SAM2 (``segmenter``).

Assets depend on the base classes (``detector: DetectorResource``, ``segmenter: SegmenterResource``)
so tests and demos can pass the fakes from :mod:`resources.fake_models` instead.

Checkpoint sources (``checkpoint``): "" = the official release URL, downloaded once into the cache
(``cache_dir``, default ``$PSEUDOLABEL_MODEL_CACHE`` or ~/.cache/pseudolabel) and verified by sha256;
a local path; an ``s3://`` URI; or "random" = untrained weights for offline smoke runs. ``tiny``
shrinks the architecture (random weights only) for tests and the offline demo.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from dagster import ConfigurableResource
from pydantic import PrivateAttr

from pseudolabel.models import grounding_dino, grounding_dino_build, sam2_segmenter, tiny
from pseudolabel.models.checkpoints import (
    RANDOM,
    CheckpointSpec,
    ResolvedCheckpoint,
    default_cache_dir,
    resolve_checkpoint,
)
from pseudolabel.models.interfaces import Detector, Segmenter
from pseudolabel.models.report import SMOKE_RUN_NOTE
from pseudolabel.models.runtime import resolve_device, resolve_precision

TINY_RANDOM_TEXT_ENCODER = "tiny-random"  # text_encoder value: a generated 1-layer BERT (smoke runs)


class DetectorResource(ConfigurableResource):
    """What the detections asset needs: a model identity (cheap) and the model (built on first use)."""

    num_workers: int = 4  # CPU threads reading + decoding + resizing images ahead of the GPU

    def describe(self) -> dict[str, Any]:
        raise NotImplementedError

    def detector(self) -> Detector:
        raise NotImplementedError


class SegmenterResource(ConfigurableResource):
    num_workers: int = 4

    def describe(self) -> dict[str, Any]:
        raise NotImplementedError

    def segmenter(self) -> Segmenter:
        raise NotImplementedError


class _CheckpointConfig(ConfigurableResource):
    checkpoint: str = ""  # "" (official URL) | local path | s3://bucket/key | "random"
    checkpoint_sha256: str = ""  # expected digest; overrides the pinned table
    cache_dir: str = ""
    allow_download: bool = True
    device: str = "auto"  # auto = cuda:0 when available, else cpu
    precision: str = "auto"  # auto = bf16 autocast on CUDA, fp32 on CPU
    batch_size: int = 8
    tiny: bool = False  # tiny random architecture (requires checkpoint="random")
    seed: int = 0  # random init seed (random weights only)

    _resolved: ResolvedCheckpoint | None = PrivateAttr(default=None)

    def _cache(self) -> Path:
        return Path(self.cache_dir).expanduser() if self.cache_dir else default_cache_dir()

    def resolved_checkpoint(self) -> ResolvedCheckpoint:
        """The configured checkpoint as a verified local file (downloaded/fetched on first call)."""
        return self._checkpoint(self._variant().checkpoint)

    def _variant(self) -> Any:
        raise NotImplementedError

    def _checkpoint(self, spec: CheckpointSpec) -> ResolvedCheckpoint:
        if self.tiny and self.checkpoint != RANDOM:
            raise ValueError(
                "tiny=True builds a shrunken architecture no released checkpoint fits; set checkpoint='random'"
            )
        if self._resolved is None:
            self._resolved = resolve_checkpoint(
                self.checkpoint,
                spec,
                expected_sha256=self.checkpoint_sha256 or None,
                cache_dir=self._cache(),
                allow_download=self.allow_download,
            )
        return self._resolved

    def _common_identity(self, resolved: ResolvedCheckpoint) -> dict[str, Any]:
        device = resolve_device(self.device)
        identity = {
            "checkpoint": resolved.source,
            "checkpoint_sha256": resolved.sha256,
            "checkpoint_status": resolved.status,
            "weights": "random" if resolved.is_random else "pretrained",
            "smoke_run": resolved.is_random,
            "device": str(device),
            "precision": resolve_precision(self.precision, device),
            "batch_size": self.batch_size,
        }
        if resolved.is_random:
            identity |= {"seed": self.seed, "tiny": self.tiny, "smoke_run_note": SMOKE_RUN_NOTE}
        return identity


class GroundingDinoResource(DetectorResource, _CheckpointConfig):
    """Grounding DINO on groundingdino-py. Variants: swint_ogc (default), swinb_cogcoor."""

    variant: str = grounding_dino_build.DEFAULT_VARIANT
    # Local directory or hub name of the BERT text encoder (its weights are then replaced by the
    # checkpoint's). "tiny-random" generates a 1-layer random BERT in the cache (smoke runs).
    text_encoder: str = grounding_dino_build.DEFAULT_TEXT_ENCODER
    image_size: int | None = None  # input short side; default 800 (128 when tiny)
    max_size: int | None = None  # input long-side cap; default 1333 (224 when tiny)

    _detector: Any = PrivateAttr(default=None)

    def describe(self) -> dict[str, Any]:
        resolved = self.resolved_checkpoint()
        short, long = self._sizes()
        return {
            "model": "grounding_dino",
            "variant": self.variant + ("-tiny" if self.tiny else ""),
            "text_encoder": self.text_encoder,
            "input_size": f"short {short} / max {long}",
            **self._common_identity(resolved),
        }

    def detector(self) -> grounding_dino.GroundingDinoDetector:
        if self._detector is None:
            identity = self.describe()
            resolved = self.resolved_checkpoint()
            model = grounding_dino_build.build_grounding_dino(
                self.variant,
                resolved.path,
                self._text_encoder_dir(),
                overrides=tiny.TINY_GROUNDING_DINO if self.tiny else None,
                seed=self.seed,
            )
            short, long = self._sizes()
            self._detector = grounding_dino.GroundingDinoDetector(
                model,
                device=resolve_device(self.device),
                precision=identity["precision"],
                batch_size=self.batch_size,
                image_size=short,
                max_size=long,
                info=identity,
            )
        return self._detector

    def _variant(self) -> grounding_dino_build.DinoVariant:
        if self.variant not in grounding_dino_build.VARIANTS:
            raise ValueError(
                f"unknown Grounding DINO variant {self.variant!r}; one of {sorted(grounding_dino_build.VARIANTS)}"
            )
        return grounding_dino_build.VARIANTS[self.variant]

    def _sizes(self) -> tuple[int, int]:
        short = self.image_size or (tiny.TINY_DINO_IMAGE_SIZE if self.tiny else 800)
        long = self.max_size or (tiny.TINY_DINO_MAX_SIZE if self.tiny else 1333)
        return short, long

    def _text_encoder_dir(self) -> str:
        if self.text_encoder != TINY_RANDOM_TEXT_ENCODER:
            return self.text_encoder
        target = self._cache() / f"tiny-random-bert-{self.seed}"
        if not (target / "config.json").is_file():
            # Build beside the target, then rename: concurrent runs never see a half-written directory.
            target.parent.mkdir(parents=True, exist_ok=True)
            scratch = Path(tempfile.mkdtemp(prefix=".tiny-bert-", dir=target.parent))
            tiny.write_bert_dir(scratch, seed=self.seed)
            try:
                os.replace(scratch, target)
            except OSError:  # another run got there first
                shutil.rmtree(scratch, ignore_errors=True)
        return str(target)


class Sam2Resource(SegmenterResource, _CheckpointConfig):
    """SAM2.1 on the sam2 package. Variants: tiny, small, base_plus, large (default)."""

    variant: str = sam2_segmenter.DEFAULT_VARIANT
    image_size: int | None = None  # model input side; default the config's 1024 (128 when tiny)
    max_boxes_per_call: int = 64  # boxes per mask-decoder call

    _segmenter: Any = PrivateAttr(default=None)

    def describe(self) -> dict[str, Any]:
        resolved = self.resolved_checkpoint()
        size = self._image_size()
        return {
            "model": "sam2.1",
            "variant": self.variant + ("-tiny" if self.tiny else ""),
            "input_size": f"{size}x{size}" if size else "1024x1024",
            **self._common_identity(resolved),
        }

    def segmenter(self) -> sam2_segmenter.Sam2Segmenter:
        if self._segmenter is None:
            identity = self.describe()
            resolved = self.resolved_checkpoint()
            overrides = tiny.tiny_sam2_overrides(self._image_size()) if self.tiny else []
            if self.image_size and not self.tiny:
                overrides.append(f"++model.image_size={self.image_size}")
            model = sam2_segmenter.build_sam2_model(
                self.variant, resolved.path, overrides=overrides, seed=self.seed
            )
            self._segmenter = sam2_segmenter.Sam2Segmenter(
                model,
                device=resolve_device(self.device),
                precision=identity["precision"],
                batch_size=self.batch_size,
                max_boxes_per_call=self.max_boxes_per_call,
                info=identity,
            )
        return self._segmenter

    def _variant(self) -> sam2_segmenter.Sam2Variant:
        if self.variant not in sam2_segmenter.VARIANTS:
            raise ValueError(
                f"unknown SAM2 variant {self.variant!r}; one of {sorted(sam2_segmenter.VARIANTS)}"
            )
        return sam2_segmenter.VARIANTS[self.variant]

    def _image_size(self) -> int | None:
        return self.image_size or (tiny.TINY_SAM2_IMAGE_SIZE if self.tiny else None)


def fetch_default_checkpoints(cache_dir: str = "", *, text_encoder: bool = True) -> list[Path]:
    """Download (once) and verify the default resources' checkpoints into the model cache; with
    ``text_encoder``, also bert-base-uncased into the Hugging Face cache. Returns the local paths."""
    paths = []
    for resource in (GroundingDinoResource(cache_dir=cache_dir), Sam2Resource(cache_dir=cache_dir)):
        resolved = resource.resolved_checkpoint()
        if resolved.path is not None:  # always, for the default (official) sources
            paths.append(resolved.path)
    if text_encoder:
        from huggingface_hub import snapshot_download

        patterns = [
            "config.json",
            "vocab.txt",
            "tokenizer.json",
            "tokenizer_config.json",
            "model.safetensors",
        ]
        paths.append(
            Path(snapshot_download(grounding_dino_build.DEFAULT_TEXT_ENCODER, allow_patterns=patterns))
        )
    return paths
