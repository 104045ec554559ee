"""Downloaded bytes -> one upright, 8-bit sRGB JPEG (or a typed :class:`ImageRejected`).

Decoding accepts known raster formats only, within a pixel limit; the EXIF orientation is applied to
the pixels and the rest of the EXIF block kept; any Pillow mode becomes RGB; images larger than the
working resolution (``max_side``) are scaled down (JPEGs already while decoding). Pure and blocking:
callers run it in a thread pool. Pillow releases the GIL while decoding and encoding, so threads
overlap well.

Every JPEG made here carries a comment (COM) segment ``pseudolabel:original_orientation=<1..8>``: the
source's EXIF orientation, which the stored pixels no longer show and the stored EXIF no longer holds.
With it a stored JPEG describes itself completely (:func:`read_stored`), so a re-run can rebuild an
image's index row from the object alone. A comment rather than EXIF: it is written whether or not the
source had EXIF, decoders and viewers ignore it (an Orientation tag would make them rotate again), and it
costs ~40 bytes. A comment the source carried is replaced, never copied, so a source cannot forge it.
"""

from __future__ import annotations

import io
import logging
import re
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import piexif
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

from pseudolabel.ids import sha256_hex
from pseudolabel.images.color import to_rgb
from pseudolabel.images.errors import ImageRejected, RejectReason

logger = logging.getLogger(__name__)

DEFAULT_MAX_PIXELS = 100_000_000
DEFAULT_JPEG_QUALITY = 95
MAX_JPEG_SIDE = 65_500  # libjpeg's limit (JPEG_MAX_DIMENSION)
# Working resolution of the stored images (longer side, px), the normalized_images default. The models
# resize anyway (Grounding DINO 800 short / 1333 long side, SAM2 1024, AutoSAM2 512): 2048 keeps
# headroom above all of them, while a 12 MP phone photo (4000x3000) stores ~4x fewer pixels.
# NormalizeOptions itself defaults to 0 (full resolution), so callers opt in.
DEFAULT_MAX_SIDE = 2048

# Raster formats a catalog may serve. Everything else (EPS/PDF would shell out to Ghostscript,
# fonts, exotic containers) is refused as "not an image" instead of widening the attack surface.
_WANTED_FORMATS = ("JPEG", "MPO", "PNG", "GIF", "WEBP", "BMP", "TIFF", "PPM", "AVIF", "ICO")
Image.init()
ACCEPTED_FORMATS = tuple(name for name in _WANTED_FORMATS if name in Image.OPEN)
JPEG_FORMATS = ("JPEG", "MPO")  # decoded by libjpeg: draft mode (DCT scaling) applies


@dataclass(frozen=True)
class NormalizeOptions:
    max_pixels: int = DEFAULT_MAX_PIXELS
    jpeg_quality: int = DEFAULT_JPEG_QUALITY
    max_side: int = 0  # longer side of the stored image, px; larger ones are scaled down; 0: full resolution

    def __post_init__(self) -> None:
        if self.max_pixels <= 0:
            raise ValueError(f"max_pixels must be > 0, got {self.max_pixels}")
        if self.max_side < 0:
            raise ValueError(f"max_side must be >= 0 (0: full resolution), got {self.max_side}")
        if not 1 <= self.jpeg_quality <= 100:
            raise ValueError(f"jpeg_quality must be in 1..100, got {self.jpeg_quality}")


@dataclass(frozen=True)
class NormalizedImage:
    jpeg: bytes
    width: int  # upright, as stored (after any downscale to max_side)
    height: int
    original_orientation: int  # EXIF value 1..8 of the source (1 when absent)
    sha256: str  # of ``jpeg``
    source_format: str | None
    source_mode: str


def normalize_image(data: bytes, options: NormalizeOptions | None = None) -> NormalizedImage:
    """Decode ``data``, apply EXIF orientation, convert to RGB, fit into ``max_side`` and re-encode as JPEG.

    Raises :class:`ImageRejected` (not_an_image / truncated / decompression_bomb / corrupt).
    """
    options = options or NormalizeOptions()
    with _decode(data, options.max_pixels, options.max_side) as (image, target):
        try:
            turned, orientation = upright(image)
            rgb = to_rgb(turned)
            if target is not None and rgb.size != target:
                rgb = rgb.resize(target, Image.Resampling.LANCZOS)
        except MemoryError:
            raise
        except Exception as exc:  # e.g. a mode Pillow cannot convert
            raise ImageRejected(RejectReason.CORRUPT, f"cannot convert {image.mode} to RGB: {exc}") from exc
        exif = exif_without_orientation(image.info.get("exif"), rgb.size, turned=orientation != UPRIGHT)
        jpeg = _encode_jpeg(rgb, options.jpeg_quality, exif, provenance_comment(orientation))
        return NormalizedImage(
            jpeg=jpeg,
            width=rgb.width,
            height=rgb.height,
            original_orientation=orientation,
            sha256=sha256_hex(jpeg),
            source_format=image.format,
            source_mode=image.mode,
        )


# -- decoding and encoding -------------------------------------------------------------------------


@contextmanager
def _decode(
    data: bytes, max_pixels: int, max_side: int
) -> Iterator[tuple[Image.Image, tuple[int, int] | None]]:
    """Open and fully load ``data``: (image, upright size to scale it to, None when it fits ``max_side``).

    A JPEG larger than ``max_side`` is decoded in draft mode: libjpeg's DCT scaling reduces it by
    1/2, 1/4 or 1/8 while decoding, never below the target, and the caller finishes the job.
    """
    image = _open(data, max_pixels)
    with image:
        encoded_size = image.size  # before any EXIF rotation
        draft_size = fitted_size(encoded_size, max_side)
        if draft_size is not None and image.format in JPEG_FORMATS:
            # The draft size is in the encoded orientation (the decoder knows no EXIF): for 5..8 the
            # upright target's width and height are swapped. The scale is the same either way.
            image.draft("RGB", draft_size)
        _load(image)
        # Read after loading: a PNG may carry its EXIF after the pixel data.
        target = fitted_size(sensor_size(encoded_size, orientation_of(image)), max_side)
        yield image, target


def _open(data: bytes, max_pixels: int) -> Image.Image:
    """Open ``data`` and check its declared size (the pixels are not decoded yet)."""
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
    return image


def _load(image: Image.Image) -> None:
    """Decode the pixels; truncated files are errors (LOAD_TRUNCATED_IMAGES stays off)."""
    try:
        image.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageRejected(RejectReason.DECOMPRESSION_BOMB, str(exc)) from exc
    except MemoryError:
        raise
    except Exception as exc:
        raise _load_error(exc) from exc


def _load_error(exc: Exception) -> ImageRejected:
    text = str(exc) or type(exc).__name__
    if isinstance(exc, EOFError) or "truncated" in text.lower():
        return ImageRejected(RejectReason.TRUNCATED, text)
    return ImageRejected(RejectReason.CORRUPT, f"{type(exc).__name__}: {text}")


def _encode_jpeg(rgb: Image.Image, quality: int, exif: bytes | None, comment: bytes) -> bytes:
    if max(rgb.size) > MAX_JPEG_SIDE:  # a valid panorama can be within max_pixels yet not fit a JPEG
        raise ImageRejected(
            RejectReason.TOO_LARGE, f"{rgb.width}x{rgb.height} exceeds JPEG's {MAX_JPEG_SIDE} px per side"
        )
    buffer = io.BytesIO()
    extra = {"exif": exif} if exif else {}
    try:
        rgb.save(buffer, format="JPEG", quality=quality, comment=comment, **extra)
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


@contextmanager
def decompression_bomb_guard(max_pixels: int) -> Iterator[None]:
    """Within the block: more than ``max_pixels`` pixels raises instead of decoding.

    Pillow reads the limit (``Image.MAX_IMAGE_PIXELS``) and the warnings filter from process
    globals, so they cannot be set per image from worker threads without racing each other: enter
    this once around a whole batch, from the thread that owns the worker pool. :func:`normalize_image`
    also checks the header size itself, so a call outside the guard still honours its ``max_pixels``.
    """
    if max_pixels <= 0:
        raise ValueError(f"max_pixels must be > 0, got {max_pixels}")
    previous = Image.MAX_IMAGE_PIXELS
    with warnings.catch_warnings():
        # Pillow only *warns* between 1x and 2x the limit; for untrusted input that is a bomb too.
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        Image.MAX_IMAGE_PIXELS = max_pixels
        try:
            yield
        finally:
            Image.MAX_IMAGE_PIXELS = previous


# -- what a stored JPEG says about itself ----------------------------------------------------------

_PROVENANCE = re.compile(rb"pseudolabel:original_orientation=([1-8])")
_JPEG_END = b"\xff\xd9"  # EOI: the last two bytes of every complete JPEG


def provenance_comment(original_orientation: int) -> bytes:
    """The COM segment written into every normalised JPEG (see the module docstring)."""
    return b"pseudolabel:original_orientation=%d" % original_orientation


@dataclass(frozen=True)
class StoredImage:
    """What a stored, normalised JPEG says about itself: everything its index row needs."""

    width: int
    height: int
    original_orientation: int
    bytes: int
    sha256: str


def read_stored(jpeg: bytes) -> StoredImage | None:
    """Describe a JPEG that :func:`normalize_image` made, from its header and comment (the pixels are not
    decoded); None when it is not one: no or another comment (an older version's, or not ours), not a
    JPEG, or cut short."""
    if not jpeg.endswith(_JPEG_END):
        return None
    try:
        with Image.open(io.BytesIO(jpeg), formats=("JPEG",)) as image:
            size, comment = image.size, image.info.get("comment")
    except Exception:  # UnidentifiedImageError, a broken header...
        return None
    found = _PROVENANCE.fullmatch(comment) if isinstance(comment, bytes) else None
    if found is None:
        return None
    return StoredImage(
        width=size[0],
        height=size[1],
        original_orientation=int(found.group(1)),
        bytes=len(jpeg),
        sha256=sha256_hex(jpeg),
    )


# -- EXIF orientation ------------------------------------------------------------------------------
# Pixels are turned upright, then the tag is dropped so nothing rotates them twice; the rest of the
# EXIF block (camera, time, GPS, ...) is kept. EXIF from the wild is often broken, and a broken block
# must never cost us the image, so every failure here degrades to "no EXIF".

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


def sensor_size(size: tuple[int, int], orientation: int) -> tuple[int, int]:
    """``size`` with width and height swapped for the quarter-turn orientations (5..8): encoded
    (width, height) <-> upright (width, height)."""
    return (size[1], size[0]) if orientation >= 5 else size


def fitted_size(size: tuple[int, int], max_side: int) -> tuple[int, int] | None:
    """``size`` scaled so its longer side is ``max_side``; None when it fits already or ``max_side`` is 0."""
    width, height = size
    longer = max(width, height)
    if max_side <= 0 or longer <= max_side:
        return None
    scale = max_side / longer
    return (
        max_side if width == longer else max(1, round(width * scale)),
        max_side if height == longer else max(1, round(height * scale)),
    )


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
