"""A gold set on disk: ``images/`` and ``masks/`` whose files share a stem; masks white on black."""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"}
MASK_THRESHOLD = 128  # masks may be JPEGs: anything brighter than mid-grey is foreground


@dataclass(frozen=True)
class EvalImage:
    """One upright gold image: its id, encoded bytes (as stored) and RGB pixels (H, W, 3) uint8."""

    image_id: str
    data: bytes
    pixels: np.ndarray

    @property
    def height(self) -> int:
        return int(self.pixels.shape[0])

    @property
    def width(self) -> int:
        return int(self.pixels.shape[1])


@dataclass(frozen=True)
class GoldSet:
    images: list[EvalImage]
    masks: dict[str, np.ndarray]  # image_id -> bool (H, W)
    unmatched: list[str]  # image or mask files without a partner


def _by_stem(folder: Path) -> dict[str, Path]:
    return {p.stem: p for p in sorted(folder.iterdir()) if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES}


def upright_rgb(data: bytes) -> np.ndarray:
    """Decode and apply EXIF orientation, like the pipeline's normalised images."""
    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(ImageOps.exif_transpose(image).convert("RGB"))


def load_gold_set(root: str | Path) -> GoldSet:
    root = Path(root)
    images, masks = _by_stem(root / "images"), _by_stem(root / "masks")
    if not images:
        raise ValueError(f"no images in {root / 'images'}")
    eval_images, gold = [], {}
    for stem in sorted(set(images) & set(masks)):
        data = images[stem].read_bytes()
        pixels = upright_rgb(data)
        with Image.open(masks[stem]) as mask_image:
            mask = np.asarray(ImageOps.exif_transpose(mask_image).convert("L")) >= MASK_THRESHOLD
        if mask.shape != pixels.shape[:2]:
            raise ValueError(f"{stem}: mask is {mask.shape[::-1]}, image is {pixels.shape[1::-1]} (w, h)")
        eval_images.append(EvalImage(image_id=stem, data=data, pixels=pixels))
        gold[stem] = mask
    unmatched = sorted(set(images) ^ set(masks))
    return GoldSet(images=eval_images, masks=gold, unmatched=unmatched)
