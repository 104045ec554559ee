"""Any Pillow mode -> 8-bit sRGB ``RGB``, the one pixel format every later stage assumes: alpha
composited on white, 16-bit and wide integer modes scaled (not clipped), embedded ICC profiles
converted to sRGB (transforms cached per profile)."""

from __future__ import annotations

import functools
import hashlib
import io
import logging

import numpy as np
from PIL import Image, ImageCms

logger = logging.getLogger(__name__)

BACKGROUND = (255, 255, 255)  # transparent areas become white, as on a web page
SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N"})
WIDE_INT_MODES = frozenset({"I", "F"})
_SRGB = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB"))


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert to RGB: alpha composited on white, 16-bit scaled (not clipped), ICC -> sRGB."""
    if image.mode in SIXTEEN_BIT_MODES or image.mode in WIDE_INT_MODES:
        # Pillow's own I;16/I -> L conversion clips everything above 255 to white.
        image = _high_depth_to_l(image)
    if image.has_transparency_data:
        return _composite_on_background(image)
    icc_profile = image.info.get("icc_profile")
    if icc_profile and image.mode in ("RGB", "CMYK", "L"):
        converted = _icc_to_srgb(image, icc_profile)
        if converted is not None:
            return converted
    return image if image.mode == "RGB" else image.convert("RGB")


def _high_depth_to_l(image: Image.Image) -> Image.Image:
    values = np.asarray(image).astype(np.float64)
    if image.mode in SIXTEEN_BIT_MODES or _fits_16_bits(values, image.mode):
        scaled = values / 257.0  # 65535 -> 255 exactly, 0 -> 0
    elif image.mode == "F" and values.size and values.min() >= 0.0 and values.max() <= 1.0:
        scaled = values * 255.0  # float images in [0, 1]
    else:
        scaled = _stretch(values)  # arbitrary range (signed ints, HDR floats)
    return Image.fromarray(np.clip(np.rint(scaled), 0, 255).astype(np.uint8), "L")


def _fits_16_bits(values: np.ndarray, mode: str) -> bool:
    # 16-bit PGM/TIFF samples arrive in 32-bit "I" images; read them as 16-bit data.
    return mode == "I" and values.size > 0 and values.min() >= 0 and values.max() <= 65535


def _stretch(values: np.ndarray) -> np.ndarray:
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return np.zeros_like(values)
    low, high = float(finite.min()), float(finite.max())
    if high <= low:
        return np.zeros_like(values)
    return (np.nan_to_num(values, nan=low, posinf=high, neginf=low) - low) * (255.0 / (high - low))


def _composite_on_background(image: Image.Image) -> Image.Image:
    rgba = image.convert("RGBA")  # also expands palette / tRNS transparency into alpha
    background = Image.new("RGBA", rgba.size, (*BACKGROUND, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


def _icc_to_srgb(image: Image.Image, icc_profile: bytes) -> Image.Image | None:
    """Colour-manage into sRGB (wide-gamut RGB, CMYK print profiles); None when not needed or unusable."""
    transform = _transform_to_srgb(hashlib.sha256(icc_profile).digest(), icc_profile, image.mode)
    if transform is None:
        return None
    try:
        return ImageCms.applyTransform(image, transform)
    except Exception as exc:
        logger.debug("ICC transform failed, plain conversion used: %s", exc)
        return None


@functools.lru_cache(maxsize=64)
def _transform_to_srgb(digest: bytes, icc_profile: bytes, mode: str) -> ImageCms.ImageCmsTransform | None:
    """Built once per distinct profile (building costs about as much as decoding an image).

    ``digest`` is the cache key (hashing a large profile once beats comparing it on every hit).
    NOCACHE makes the shared transform safe to apply from several threads at once.
    """
    try:
        source = ImageCms.ImageCmsProfile(io.BytesIO(icc_profile))
        if "srgb" in ImageCms.getProfileDescription(source).lower():
            return None  # already sRGB: converting would cost time and change nothing
        return ImageCms.buildTransform(source, _SRGB, mode, "RGB", flags=ImageCms.Flags.NOCACHE)
    except Exception as exc:  # broken or mismatched profiles are common; fall back to a plain convert
        logger.debug("ICC profile ignored: %s", exc)
        return None
