"""Model resources: which detector (``detector``), segmenter (``segmenter``) and video tracker
(``tracker``) the GPU stages use.

They are configuration only: each turns its typed, launchpad-editable config into a spec
(:mod:`pseudolabel.models.loading`) that a model worker builds the model from. Nothing here imports
torch, and the defaults live only in the spec classes.

A resource starts from a preset, ``models``: ``official`` (release checkpoints), ``random`` (SMOKE RUN:
the real architectures at tiny size with random weights) or ``fake`` (instant stand-ins); empty means
``$PSEUDOLABEL_MODELS``, read when the step runs. Every other field overrides the preset when set,
so changing one knob in the launchpad (say ``batch_size``) keeps the rest of the preset.

Checkpoint sources (``checkpoint``): "" = the official release URL, downloaded once into the cache and
verified by sha256; a local path; an ``s3://`` URI; or "random" = untrained weights for offline smoke
runs. ``tiny`` shrinks the architecture (random weights only) for tests and the offline demo.
"""

from __future__ import annotations

import os
from dataclasses import replace

from dagster import ConfigurableResource, Failure

from pseudolabel.models.loading import FAKE, DetectorSpec, ModelConfigError, SegmenterSpec, TrackerSpec
from pseudolabel.models.stages import DetectionSettings, SegmentationSettings

MODELS_ENV = "PSEUDOLABEL_MODELS"
OFFICIAL, RANDOM = "official", "random"
PRESETS: dict[str, tuple[DetectorSpec, SegmenterSpec]] = {
    OFFICIAL: (DetectorSpec(), SegmenterSpec()),
    RANDOM: (
        DetectorSpec(checkpoint="random", tiny=True, text_encoder="tiny-random"),
        SegmenterSpec(checkpoint="random", tiny=True, variant="tiny"),
    ),
    FAKE: (DetectorSpec(backend=FAKE), SegmenterSpec(backend=FAKE)),
}
TRACKER_PRESETS: dict[str, TrackerSpec] = {
    OFFICIAL: TrackerSpec(),
    RANDOM: TrackerSpec(checkpoint="random", tiny=True, variant="tiny"),
    FAKE: TrackerSpec(backend=FAKE),
}


class _ModelResource(ConfigurableResource):
    models: str = ""  # preset: official | random | fake; "" = $PSEUDOLABEL_MODELS (default official)
    # Overrides of the preset; None keeps the preset's value (see pseudolabel.models.loading for defaults).
    backend: str | None = None
    variant: str | None = None
    checkpoint: str | None = None  # "" (official URL) | local path | s3://bucket/key | "random"
    checkpoint_sha256: str | None = None  # expected digest; overrides the pinned table
    cache_dir: str | None = None  # "" = $PSEUDOLABEL_MODEL_CACHE or ~/.cache/pseudolabel
    allow_download: bool | None = None
    device: str | None = None  # auto = the step's leased GPU; pretrained weights never fall back to CPU
    precision: str | None = None  # auto = bf16 autocast on CUDA, fp32 on CPU
    batch_size: int | None = None
    num_workers: int | None = None  # CPU threads decoding images ahead of the GPU
    tiny: bool | None = None  # tiny random architecture (requires checkpoint="random")
    seed: int | None = None  # random init seed (random weights only)
    image_size: int | None = None
    seconds_per_image: float | None = None  # fake backend only
    oom_above_batch: int | None = None  # fake backend only

    def preset(self) -> str:
        name = (self.models or os.environ.get(MODELS_ENV, "") or OFFICIAL).strip().lower()
        if name not in PRESETS:
            raise Failure(
                description=f"models / {MODELS_ENV} must be one of {', '.join(PRESETS)}; got {name!r}",
                allow_retries=False,
            )
        return name

    def _spec(self, base):
        overrides = {
            name: value
            for name in type(self).model_fields
            if name != "models" and (value := getattr(self, name)) is not None
        }
        if "backend" in overrides and "variant" not in overrides and overrides["backend"] != base.backend:
            overrides["variant"] = ""  # another backend: its own default variant, not the preset's
        spec = replace(base, **overrides)
        try:
            spec.validate()
        except ModelConfigError as exc:  # bad configuration: fail once, before any worker starts
            raise Failure(description=f"{type(self).__name__}: {exc}", allow_retries=False) from exc
        return spec


class DetectorResource(_ModelResource):
    """Which detector finds the candidates: ``grounding_dino`` (default; swint_ogc, swinb_cogcoor), ``owlv2``,
    ``owlvit``, ``dinov2_saliency`` (prompt-free), ``annotations`` (boxes/clicks from a file), ``sam3``
    (its own worker environment) or ``fake``. See the README's backend table."""

    text_encoder: str | None = None  # local dir or hub name; "tiny-random" for smoke runs
    max_size: int | None = None  # input long-side cap; image_size is the short side
    max_boxes_per_caption: int | None = None  # fake backend only
    compile: bool | None = None  # torch.compile backbone + transformer (default False)
    decode_on_device: bool | None = None  # grounding_dino / owl*: JPEGs decoded on the GPU (default off)
    prompt_mode: str | None = None  # dinov2_saliency / annotations: box | point | box+point (default box)
    num_objects: int | None = None  # dinov2_saliency: regions per image (default 5)
    attention_threshold: float | None = None  # dinov2_saliency: share of attention kept (default 0.6)
    min_area: float | None = None  # dinov2_saliency: smallest region, fraction of the image (default 0.01)
    annotations: str | None = None  # annotations: COCO .json or .jsonl, local path or s3:// URI
    match_on: str | None = None  # annotations: url | image_id | file_name | auto (default auto)

    def spec(self) -> DetectorSpec:
        return self._spec(PRESETS[self.preset()][0])


class SegmenterResource(_ModelResource):
    """SAM2.1 (``backend="sam2"``; variants tiny, small, base_plus, large), ``edgetam`` (light, CPU-friendly),
    ``detector`` (keep the masks SAM 3 made while detecting) or ``"fake"``."""

    max_boxes_per_call: int | None = None  # boxes per mask-decoder call

    def spec(self) -> SegmenterSpec:
        return self._spec(PRESETS[self.preset()][1])


class TrackerResource(_ModelResource):
    """SAM2.1's video predictor (``backend="sam2"``; variants tiny, small, base_plus, large; the same
    checkpoints as the segmenter) or ``"fake"`` (follows flat-coloured synthetic shapes)."""

    offload_video_to_cpu: bool | None = None  # window frames in host memory (default True)
    offload_state_to_cpu: bool | None = None  # tracking memory in host memory (default False)

    def spec(self) -> TrackerSpec:
        return self._spec(TRACKER_PRESETS[self.preset()])


def model_resources(choice: str = "") -> tuple[DetectorResource, SegmenterResource]:
    """Both resources on one preset ("" = ``$PSEUDOLABEL_MODELS`` when a step runs)."""
    return DetectorResource(models=choice), SegmenterResource(models=choice)


class StageSettingsResource(ConfigurableResource):
    """What the GPU stages are asked, shared by ``detections``, ``masks`` and ``label_quality``, so the
    evaluation measures exactly the candidates the chain produces. Floors are deliberately low: the
    thresholds applied downstream can then move anywhere above them without touching the GPU."""

    prompt: str = DetectionSettings.prompt  # Grounding DINO caption, classes separated by " ."
    one_prompt_per_class: bool = DetectionSettings.one_prompt_per_class  # "a . b ." as "a ." and "b ."
    box_floor: float = DetectionSettings.box_floor  # keep candidates above these scores
    text_floor: float = DetectionSettings.text_floor
    max_candidates: int = DetectionSettings.max_candidates  # per image
    multimask: bool = SegmentationSettings.multimask  # 3 masks per box; keep the best predicted IoU

    def detection(self) -> DetectionSettings:
        return DetectionSettings(
            prompt=self.prompt,
            one_prompt_per_class=self.one_prompt_per_class,
            box_floor=self.box_floor,
            text_floor=self.text_floor,
            max_candidates=self.max_candidates,
        )

    def segmentation(self) -> SegmentationSettings:
        return SegmentationSettings(multimask=self.multimask)
