"""Made-up catalogs: a synthetic one of any size (items only) and a small demo one with real pictures.

:class:`SyntheticCatalog` is deterministic and generated page by page (for benchmarks and tests).
Items look like the real API's: ``{"id", "image_url", "label"}``. Labels follow a skewed (Zipf-like)
distribution over ``num_labels`` tree species, and every ``duplicate_every``-th item repeats an
earlier item's URL so deduplication has work to do. Nothing is stored: item ``i`` is a pure function
of ``i``.

:func:`demo_items` is the offline catalog of ``pseudolabel demo``: synthetic plant pictures, each a
green, leafy blob on a soil/sky background, saved in one of the formats users actually send (JPEG
with an EXIF orientation, PNG with alpha, CMYK JPEG), plus a few broken items so the quarantine
path is visible in the UI.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import piexif
from PIL import Image, ImageDraw, ImageFilter

_LABEL_SLOTS = 4096  # label lookup table resolution
_MIX = 2654435761  # Knuth's multiplicative hash: spreads consecutive ids over the label table


@dataclass(frozen=True)
class SyntheticCatalog:
    """``total`` items, paged as ``catalog(offset, limit)`` (what :class:`DevServer` serves)."""

    total: int
    num_labels: int = 50
    duplicate_every: int = 50  # 0 disables duplicates
    url_prefix: str = "https://images.example.com/trees/"
    _slots: tuple[str, ...] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        weights = [1.0 / rank for rank in range(1, self.num_labels + 1)]
        scale = _LABEL_SLOTS / sum(weights)
        slots: list[str] = []
        for index, weight in enumerate(weights):
            slots += [self.label_name(index)] * max(1, round(weight * scale))
        object.__setattr__(self, "_slots", tuple(slots))
        if self.duplicate_every == 1:
            raise ValueError("duplicate_every must be 0 (no duplicates) or >= 2")

    def url_number(self, i: int) -> int:
        """Which URL item ``i`` carries: its own, or (every ``duplicate_every``-th) an earlier original's."""
        if not self.duplicate_every or i == 0 or i % self.duplicate_every:
            return i
        earlier = i // 2
        return earlier + 1 if earlier % self.duplicate_every == 0 else earlier  # an original, never a repeat

    @staticmethod
    def label_name(index: int) -> str:
        return f"species_{index:03d}"

    def item(self, i: int) -> dict[str, Any]:
        source = self.url_number(i)
        return {
            "id": f"t{i}",
            "image_url": f"{self.url_prefix}{source:09d}.jpg",
            "label": self._slots[(source * _MIX) % len(self._slots)],
        }

    def __call__(self, offset: int, limit: int) -> list[dict[str, Any]]:
        return [self.item(i) for i in range(offset, min(offset + limit, self.total))]

    def unique_urls(self) -> int:
        """How many distinct URLs the catalog holds (for checking a snapshot's row count)."""
        if not self.duplicate_every:
            return self.total
        # Every item 1.. that is a multiple of duplicate_every repeats an earlier original.
        return self.total - max(0, (self.total - 1) // self.duplicate_every)


# -- the demo catalog ------------------------------------------------------------------------------

SPECIES = ("oak", "fern", "maple", "cactus")
# Transposition that, once the EXIF tag is applied, brings the pixels back upright.
_INVERSE_TRANSPOSE = {
    2: [Image.Transpose.FLIP_LEFT_RIGHT],
    3: [Image.Transpose.ROTATE_180],
    4: [Image.Transpose.FLIP_TOP_BOTTOM],
    5: [Image.Transpose.TRANSPOSE],
    6: [Image.Transpose.ROTATE_90],
    7: [Image.Transpose.TRANSVERSE],
    8: [Image.Transpose.ROTATE_270],
}


@dataclass(frozen=True)
class DemoItem:
    name: str  # file name on the demo image host
    label: str
    data: bytes | None  # None: the host answers 404


def plant_picture(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    """An upright RGB picture of one plant-like green blob."""
    sky = np.array([rng.integers(120, 200), rng.integers(160, 220), 255])
    soil = np.array([rng.integers(90, 140), rng.integers(60, 90), rng.integers(30, 60)])
    horizon = int(height * rng.uniform(0.55, 0.75))
    pixels = np.empty((height, width, 3), np.uint8)
    pixels[:horizon] = sky
    pixels[horizon:] = soil
    image = Image.fromarray(pixels)
    draw = ImageDraw.Draw(image)
    cx = int(width * rng.uniform(0.3, 0.7))
    base = horizon + int(height * 0.05)
    crown = int(min(width, height) * rng.uniform(0.18, 0.3))
    top = max(crown, base - int(height * rng.uniform(0.35, 0.6)))
    draw.rectangle([cx - crown // 8, top, cx + crown // 8, base], fill=(96, 64, 32))
    for _ in range(int(rng.integers(5, 9))):
        dx, dy = rng.normal(0, crown * 0.45, size=2)
        r = crown * rng.uniform(0.35, 0.6)
        green = (int(rng.integers(20, 70)), int(rng.integers(110, 190)), int(rng.integers(20, 70)))
        draw.ellipse([cx + dx - r, top + dy - r, cx + dx + r, top + dy + r], fill=green)
    return image.filter(ImageFilter.SMOOTH)


def _jpeg_with_orientation(image: Image.Image, orientation: int) -> bytes:
    stored = image
    for op in _INVERSE_TRANSPOSE.get(orientation, []):
        stored = stored.transpose(op)
    exif = piexif.dump({"0th": {piexif.ImageIFD.Orientation: orientation, piexif.ImageIFD.Make: b"DemoCam"}})
    out = io.BytesIO()
    stored.save(out, "JPEG", quality=90, exif=exif)
    return out.getvalue()


def _png_with_alpha(image: Image.Image) -> bytes:
    rgba = image.convert("RGBA")
    alpha = Image.new("L", image.size, 255)
    ImageDraw.Draw(alpha).rectangle([0, 0, image.width // 6, image.height], fill=0)
    rgba.putalpha(alpha)
    out = io.BytesIO()
    rgba.save(out, "PNG")
    return out.getvalue()


def _cmyk_jpeg(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.convert("CMYK").save(out, "JPEG", quality=90)
    return out.getvalue()


def demo_items(count: int = 48, seed: int = 0, size: tuple[int, int] = (320, 240)) -> list[DemoItem]:
    """``count`` good pictures across :data:`SPECIES` plus two broken ones (a 404, a non-image)."""
    rng = np.random.default_rng(seed)
    items = []
    for i in range(count):
        label = SPECIES[i % len(SPECIES)] if i % 7 else SPECIES[0]  # oak is the common class
        picture = plant_picture(rng, *size)
        if i % 11 == 5:
            items.append(DemoItem(f"plant-{i:04d}.png", label, _png_with_alpha(picture)))
        elif i % 13 == 7:
            items.append(DemoItem(f"plant-{i:04d}.jpg", label, _cmyk_jpeg(picture)))
        else:
            items.append(DemoItem(f"plant-{i:04d}.jpg", label, _jpeg_with_orientation(picture, 1 + i % 8)))
    items.append(DemoItem("missing.jpg", SPECIES[1], None))
    items.append(DemoItem("not-an-image.jpg", SPECIES[2], b"<html>this is not a picture</html>"))
    return items
