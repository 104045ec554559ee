"""One training sample: the resized image and its binary mask, as AutoSAM2 reads them.

The image is resized bilinearly and never drawn on; the mask is the union of the image's kept
instances, resized nearest-neighbour, stored as 8-bit grayscale JPEG (255 = object, 0 = background).
JPEG ringing can leave a few near-edge values off 0/255, so readers should threshold at 128.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np

from pseudolabel.rle import decode_union, rle_object

MASK_JPEG_QUALITY = 100  # keeps JPEG ringing on the 0/255 edges well below the 128 threshold


class RenderError(ValueError):
    """The source image cannot be turned into a sample (undecodable, or not the masks' size)."""


@dataclass(frozen=True)
class SampleSpec:
    width: int = 512
    height: int = 512
    jpeg_quality: int = 95

    def __post_init__(self) -> None:
        if self.width < 1 or self.height < 1 or not 1 <= self.jpeg_quality <= 100:
            raise ValueError(f"invalid sample spec {self}")


def decode_image(data: bytes) -> np.ndarray:
    """BGR pixels exactly as stored: EXIF orientation is ignored because stored images are already
    upright and masks are in that stored pixel grid."""
    pixels = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION)
    if pixels is None:
        raise RenderError("image does not decode")
    return pixels


def encode_jpeg(pixels: np.ndarray, quality: int) -> bytes:
    ok, buffer = cv2.imencode(".jpg", pixels, [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    if not ok:
        raise RenderError("JPEG encoding failed")
    return buffer.tobytes()


def render_image(data: bytes, spec: SampleSpec, expected_size: tuple[int, int] | None = None) -> bytes:
    """Resized sample JPEG; ``expected_size`` is (height, width) of the masks, checked to catch
    misaligned sources before they become silently wrong training pairs."""
    pixels = decode_image(data)
    if expected_size is not None and pixels.shape[:2] != tuple(expected_size):
        raise RenderError(
            f"image is {pixels.shape[1]}x{pixels.shape[0]}, masks are {expected_size[1]}x{expected_size[0]}"
        )
    resized = cv2.resize(pixels, (spec.width, spec.height), interpolation=cv2.INTER_LINEAR)
    return encode_jpeg(resized, spec.jpeg_quality)


def binary_mask(counts: Sequence[str], height: int, width: int, spec: SampleSpec) -> np.ndarray:
    """Union of the instance RLEs, resized nearest-neighbour to the spec: uint8, 0 or 255."""
    union = decode_union([rle_object(c, height, width) for c in counts], height, width)
    resized = cv2.resize(union, (spec.width, spec.height), interpolation=cv2.INTER_NEAREST)
    return np.where(resized > 0, 255, 0).astype(np.uint8)


def render_mask(counts: Sequence[str], height: int, width: int, spec: SampleSpec) -> bytes:
    return encode_jpeg(binary_mask(counts, height, width, spec), MASK_JPEG_QUALITY)
