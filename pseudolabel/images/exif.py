"""EXIF orientation: turn pixels upright, then drop the tag so nothing rotates them twice.

The rest of the EXIF block (camera, time, GPS, ...) is kept. EXIF from the wild is often broken;
a broken block must never cost us the image, so every failure here degrades to "no EXIF".
"""

from __future__ import annotations

import logging

import piexif
from PIL import ExifTags, Image, ImageOps

logger = logging.getLogger(__name__)

ORIENTATION_TAG = piexif.ImageIFD.Orientation  # 274
UPRIGHT = 1
# A JPEG APP1 segment holds at most 65533 payload bytes; Pillow refuses anything longer.
MAX_JPEG_EXIF_BYTES = 65533


def orientation_of(image: Image.Image) -> int:
    """The EXIF orientation (1..8) of an opened image; 1 when absent, invalid or unreadable."""
    try:
        value = image.getexif().get(ExifTags.Base.Orientation, UPRIGHT)
    except Exception:  # corrupt EXIF: treat as "no rotation" rather than failing the image
        return UPRIGHT
    return value if isinstance(value, int) and 1 <= value <= 8 else UPRIGHT


def upright(image: Image.Image) -> tuple[Image.Image, int]:
    """Apply the EXIF orientation to the pixels; returns (upright image, original orientation)."""
    orientation = orientation_of(image)
    if orientation == UPRIGHT:
        return image, UPRIGHT
    # orientation_of() already parsed (and cached) the EXIF, so exif_transpose cannot trip on it.
    return ImageOps.exif_transpose(image), orientation


def exif_without_orientation(raw: bytes | None, size: tuple[int, int], *, turned: bool) -> bytes | None:
    """The EXIF block to store with the upright pixels, or None when there is none usable.

    ``size`` is the upright (width, height); ``turned`` says the pixels were transformed, which
    makes the embedded thumbnail stale (it still shows the sensor orientation), so it is dropped.
    """
    if not raw:
        return None
    try:
        exif = piexif.load(raw)
    except Exception as exc:
        logger.debug("unreadable EXIF dropped: %s", exc)
        return None
    for ifd in ("0th", "1st"):
        (exif.get(ifd) or {}).pop(ORIENTATION_TAG, None)
    _record_pixel_size(exif, size)
    if turned:
        _drop_thumbnail(exif)
    data = _dump(exif) or _strip_with_pillow(raw)
    if data is not None and len(data) > MAX_JPEG_EXIF_BYTES:
        _drop_thumbnail(exif)
        data = _dump(exif)
    if data is not None and len(data) > MAX_JPEG_EXIF_BYTES:
        return None
    return data


def _record_pixel_size(exif: dict, size: tuple[int, int]) -> None:
    # PixelX/YDimension describe the stored pixels; after a quarter turn they would be swapped.
    exif_ifd = exif.get("Exif") or {}
    if piexif.ExifIFD.PixelXDimension in exif_ifd:
        exif_ifd[piexif.ExifIFD.PixelXDimension] = size[0]
    if piexif.ExifIFD.PixelYDimension in exif_ifd:
        exif_ifd[piexif.ExifIFD.PixelYDimension] = size[1]


def _drop_thumbnail(exif: dict) -> None:
    exif["1st"] = {}
    exif["thumbnail"] = None


def _dump(exif: dict) -> bytes | None:
    try:
        return piexif.dump(exif)
    except Exception as exc:  # piexif rejects some values it loaded itself (odd tag types)
        logger.debug("piexif could not re-serialise EXIF: %s", exc)
        return None


def _strip_with_pillow(raw: bytes) -> bytes | None:
    """Fallback serialiser: Pillow writes the main, Exif and GPS IFDs (no thumbnail)."""
    try:
        exif = Image.Exif()
        exif.load(raw)
        exif.pop(ExifTags.Base.Orientation, None)
        return exif.tobytes()
    except Exception as exc:
        logger.debug("unreadable EXIF dropped: %s", exc)
        return None
