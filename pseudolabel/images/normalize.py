"""Downloaded bytes -> one upright, RGB JPEG (or a typed :class:`ImageRejected`).

Pure and blocking (decode, convert, encode): callers run it in a thread pool. Pillow releases
the GIL while decoding and encoding, so threads overlap well.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

from PIL import Image, UnidentifiedImageError

from pseudolabel.ids import sha256_hex
from pseudolabel.images.color import to_rgb
from pseudolabel.images.errors import ImageRejected, RejectReason
from pseudolabel.images.exif import exif_without_orientation, upright

DEFAULT_MAX_PIXELS = 100_000_000
DEFAULT_JPEG_QUALITY = 95
MAX_JPEG_SIDE = 65_500  # libjpeg's limit (JPEG_MAX_DIMENSION)

# Raster formats a catalog may serve. Everything else (EPS/PDF would shell out to Ghostscript,
# fonts, exotic containers) is refused as "not an image" instead of widening the attack surface.
_WANTED_FORMATS = ("JPEG", "MPO", "PNG", "GIF", "WEBP", "BMP", "TIFF", "PPM", "AVIF", "ICO")
Image.init()
ACCEPTED_FORMATS = tuple(name for name in _WANTED_FORMATS if name in Image.OPEN)


@dataclass(frozen=True)
class NormalizeOptions:
    max_pixels: int = DEFAULT_MAX_PIXELS
    jpeg_quality: int = DEFAULT_JPEG_QUALITY

    def __post_init__(self) -> None:
        if self.max_pixels <= 0:
            raise ValueError(f"max_pixels must be > 0, got {self.max_pixels}")
        if not 1 <= self.jpeg_quality <= 100:
            raise ValueError(f"jpeg_quality must be in 1..100, got {self.jpeg_quality}")


@dataclass(frozen=True)
class NormalizedImage:
    jpeg: bytes
    width: int  # upright
    height: int
    original_orientation: int  # EXIF value 1..8 of the source (1 when absent)
    sha256: str  # of ``jpeg``
    source_format: str | None
    source_mode: str


def normalize_image(data: bytes, options: NormalizeOptions | None = None) -> NormalizedImage:
    """Decode ``data``, apply EXIF orientation, convert to RGB and re-encode as JPEG.

    Raises :class:`ImageRejected` (not_an_image / truncated / decompression_bomb / corrupt).
    """
    options = options or NormalizeOptions()
    with _decode(data, options.max_pixels) as image:
        try:
            turned, orientation = upright(image)
            rgb = to_rgb(turned)
        except MemoryError:
            raise
        except Exception as exc:  # e.g. a mode Pillow cannot convert
            raise ImageRejected(RejectReason.CORRUPT, f"cannot convert {image.mode} to RGB: {exc}") from exc
        exif = exif_without_orientation(image.info.get("exif"), rgb.size, turned=orientation != 1)
        jpeg = _encode_jpeg(rgb, options.jpeg_quality, exif)
        return NormalizedImage(
            jpeg=jpeg,
            width=rgb.width,
            height=rgb.height,
            original_orientation=orientation,
            sha256=sha256_hex(jpeg),
            source_format=image.format,
            source_mode=image.mode,
        )


def _decode(data: bytes, max_pixels: int) -> Image.Image:
    """Open and fully load ``data``; truncated files are errors (LOAD_TRUNCATED_IMAGES stays off)."""
    if not data:
        raise ImageRejected(RejectReason.NOT_AN_IMAGE, "empty body")
    try:
        image = Image.open(io.BytesIO(data), formats=ACCEPTED_FORMATS)
    except UnidentifiedImageError as exc:
        claimed = _claimed_format(data)
        if claimed is None:
            raise ImageRejected(RejectReason.NOT_AN_IMAGE, f"unrecognised data ({_head(data)})") from exc
        raise ImageRejected(RejectReason.CORRUPT, f"{claimed} signature but unreadable header") from exc
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageRejected(RejectReason.DECOMPRESSION_BOMB, str(exc)) from exc
    except MemoryError:
        raise
    except Exception as exc:
        raise _load_error(exc) from exc

    # Checked here as well as by Pillow's guard: this check is thread-safe and per call.
    pixels = image.width * image.height
    if pixels > max_pixels:
        image.close()
        raise ImageRejected(
            RejectReason.DECOMPRESSION_BOMB,
            f"{image.width}x{image.height} = {pixels} pixels exceeds the limit of {max_pixels}",
        )
    try:
        image.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        image.close()
        raise ImageRejected(RejectReason.DECOMPRESSION_BOMB, str(exc)) from exc
    except MemoryError:
        raise
    except Exception as exc:
        image.close()
        raise _load_error(exc) from exc
    return image


def _load_error(exc: Exception) -> ImageRejected:
    text = str(exc) or type(exc).__name__
    if isinstance(exc, EOFError) or "truncated" in text.lower():
        return ImageRejected(RejectReason.TRUNCATED, text)
    return ImageRejected(RejectReason.CORRUPT, f"{type(exc).__name__}: {text}")


def _encode_jpeg(rgb: Image.Image, quality: int, exif: bytes | None) -> bytes:
    if max(rgb.size) > MAX_JPEG_SIDE:  # a valid panorama can be within max_pixels yet not fit a JPEG
        raise ImageRejected(
            RejectReason.TOO_LARGE, f"{rgb.width}x{rgb.height} exceeds JPEG's {MAX_JPEG_SIDE} px per side"
        )
    buffer = io.BytesIO()
    extra = {"exif": exif} if exif else {}
    try:
        rgb.save(buffer, format="JPEG", quality=quality, **extra)
    except MemoryError:
        raise
    except Exception as exc:
        raise ImageRejected(RejectReason.CORRUPT, f"cannot encode as JPEG: {exc}") from exc
    return buffer.getvalue()


def _claimed_format(data: bytes) -> str | None:
    """The accepted format whose magic bytes ``data`` starts with, if any (to tell broken from foreign)."""
    prefix = data[:16]
    for name in ACCEPTED_FORMATS:
        accept = Image.OPEN[name][1]
        verdict = accept(prefix) if accept is not None else False
        if verdict and not isinstance(verdict, str):  # a str verdict is Pillow's "maybe" warning
            return name
    return None


def _head(data: bytes) -> str:
    """A short, printable peek at the payload (an HTML error page is a common culprit)."""
    return repr(data[:24])
