"""SAM2.1 models as the image segmenter and the video tracker build them: variants, official
checkpoints, hydra overrides (tiny random configurations for smoke runs), seeded construction."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from pseudolabel.models import tiny
from pseudolabel.models.checkpoints import CheckpointSpec
from pseudolabel.models.runtime import seeded

_RELEASES = "https://dl.fbaipublicfiles.com/segment_anything_2/092824"


@dataclass(frozen=True)
class Sam2Variant:
    config_file: str  # hydra config name inside the sam2 package
    checkpoint: CheckpointSpec


def _variant(name: str, letter: str) -> Sam2Variant:
    filename = f"sam2.1_hiera_{name}.pt"
    # Digests not pinned: no reliable published source; recorded on first download (checkpoints.py).
    return Sam2Variant(
        f"configs/sam2.1/sam2.1_hiera_{letter}.yaml",
        CheckpointSpec(f"SAM2.1 hiera_{name}", filename, f"{_RELEASES}/{filename}", None),
    )


VARIANTS: dict[str, Sam2Variant] = {
    "tiny": _variant("tiny", "t"),
    "small": _variant("small", "s"),
    "base_plus": _variant("base_plus", "b+"),
    "large": _variant("large", "l"),
}
DEFAULT_VARIANT = "large"


def build_sam2_model(
    variant: str = DEFAULT_VARIANT,
    checkpoint: Path | None = None,
    *,
    overrides: Sequence[str] = (),
    seed: int = 0,
    video: bool = False,
) -> nn.Module:
    """Build a SAM2.1 model on the CPU; load ``checkpoint`` or keep a seeded random init.

    ``overrides`` are hydra overrides (:func:`sam2_overrides`). ``video``: a ``SAM2VideoPredictor``
    (memory modules in use) instead of the image model. The stock post-processing settings of
    ``build_sam2`` / ``build_sam2_video_predictor`` (dynamic multimask fallback, hole filling) are kept.
    """
    from sam2.build_sam import build_sam2, build_sam2_video_predictor

    if variant not in VARIANTS:
        raise ValueError(f"unknown SAM2 variant {variant!r}; expected one of {sorted(VARIANTS)}")
    with seeded(seed):
        return (build_sam2_video_predictor if video else build_sam2)(
            VARIANTS[variant].config_file,
            str(checkpoint) if checkpoint else None,
            device="cpu",
            hydra_overrides_extra=list(overrides),
        )


def sam2_overrides(tiny_model: bool, image_size: int | None) -> list[str]:
    """Hydra overrides of a spec: the tiny random configuration and/or another input size."""
    if tiny_model:
        return tiny.tiny_sam2_overrides(image_size or tiny.TINY_SAM2_IMAGE_SIZE)
    return [f"++model.image_size={image_size}"] if image_size else []
