"""Model resources: which detector (``detector``) and segmenter (``segmenter``) the GPU stages use.

They are configuration only: each turns its typed, launchpad-editable config into a spec
(:mod:`pseudolabel.models.loading`) that a model worker builds the model from. Nothing here imports
torch; the defaults live in the spec classes, so they are written once.

Checkpoint sources (``checkpoint``): "" = the official release URL, downloaded once into the cache and
verified by sha256; a local path; an ``s3://`` URI; or "random" = untrained weights for offline smoke
runs. ``tiny`` shrinks the architecture (random weights only) for tests and the offline demo.
"""

from __future__ import annotations

from dagster import ConfigurableResource, Failure

from pseudolabel.models.loading import FAKE, DetectorSpec, ModelConfigError, SegmenterSpec, _Spec

_D, _S = DetectorSpec, SegmenterSpec


class _ModelResource(ConfigurableResource):
    checkpoint: str = _Spec.checkpoint  # "" (official URL) | local path | s3://bucket/key | "random"
    checkpoint_sha256: str = _Spec.checkpoint_sha256  # expected digest; overrides the pinned table
    cache_dir: str = _Spec.cache_dir  # "" = $PSEUDOLABEL_MODEL_CACHE or ~/.cache/pseudolabel
    allow_download: bool = _Spec.allow_download
    device: str = _Spec.device  # auto = the step's leased GPU; pretrained weights never fall back to CPU
    precision: str = _Spec.precision  # auto = bf16 autocast on CUDA, fp32 on CPU
    batch_size: int = _Spec.batch_size
    num_workers: int = _Spec.num_workers  # CPU threads decoding images ahead of the GPU
    tiny: bool = _Spec.tiny  # tiny random architecture (requires checkpoint="random")
    seed: int = _Spec.seed  # random init seed (random weights only)
    image_size: int | None = _Spec.image_size
    seconds_per_image: float = _Spec.seconds_per_image  # fake backend only
    oom_above_batch: int = _Spec.oom_above_batch  # fake backend only

    def _values(self) -> dict:
        return {name: getattr(self, name) for name in type(self).model_fields}

    def _validated(self, spec: _Spec) -> _Spec:
        try:
            spec.validate()
        except ModelConfigError as exc:  # bad configuration: fail once, before any worker starts
            raise Failure(description=f"{type(self).__name__}: {exc}", allow_retries=False) from exc
        return spec


class DetectorResource(_ModelResource):
    """Grounding DINO (``backend="grounding_dino"``; variants swint_ogc, swinb_cogcoor) or ``"fake"``."""

    backend: str = _D.backend
    variant: str = _D.variant
    text_encoder: str = _D.text_encoder  # local dir or hub name; "tiny-random" for smoke runs
    max_size: int | None = _D.max_size  # input long-side cap; image_size is the short side
    max_boxes_per_caption: int = _D.max_boxes_per_caption  # fake backend only

    def spec(self) -> DetectorSpec:
        return self._validated(DetectorSpec(**self._values()))


class SegmenterResource(_ModelResource):
    """SAM2.1 (``backend="sam2"``; variants tiny, small, base_plus, large) or ``"fake"``."""

    backend: str = _S.backend
    variant: str = _S.variant
    max_boxes_per_call: int = _S.max_boxes_per_call  # boxes per mask-decoder call

    def spec(self) -> SegmenterSpec:
        return self._validated(SegmenterSpec(**self._values()))


def model_resources(choice: str) -> tuple[DetectorResource, SegmenterResource]:
    """``official`` checkpoints, ``random`` (SMOKE RUN: tiny real architectures, random weights) or
    ``fake`` (instant deterministic stand-ins, no model stack)."""
    if choice == "official":
        return DetectorResource(), SegmenterResource()
    if choice == "random":
        return (
            DetectorResource(checkpoint="random", tiny=True, text_encoder="tiny-random"),
            SegmenterResource(checkpoint="random", tiny=True, variant="tiny"),
        )
    if choice == FAKE:
        return DetectorResource(backend=FAKE), SegmenterResource(backend=FAKE)
    raise ValueError(f"models must be one of official, random, fake; got {choice!r}")
