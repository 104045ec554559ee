"""EXIF orientation: all eight values end upright; the tag goes, the rest of EXIF stays."""

from __future__ import annotations

import io

import numpy as np
import piexif
import pytest
from PIL import Image

from pseudolabel.images.normalize import exif_without_orientation, normalize_image, orientation_of

HEIGHT, WIDTH = 48, 80  # not square, so quarter turns must swap width and height
JPEG_TOLERANCE = 3.0  # mean absolute difference per channel, 0..255


def upright_reference() -> np.ndarray:
    """Asymmetric in every direction: red ramps left->right, green top->bottom, blue L in the top-left."""
    y, x = np.mgrid[0:HEIGHT, 0:WIDTH]
    pixels = np.zeros((HEIGHT, WIDTH, 3), dtype=np.uint8)
    pixels[..., 0] = (x * 255 // (WIDTH - 1)).astype(np.uint8)
    pixels[..., 1] = (y * 255 // (HEIGHT - 1)).astype(np.uint8)
    pixels[:, :16, 2] = 255  # the L's upright stroke, along the left edge
    pixels[:16, :, 2] = 255  # and its bar, along the top edge
    return pixels


# How a camera stores an upright scene under each tag, derived from the EXIF definition of where
# row 0 / column 0 of the stored image lie (not from Pillow's table, which the code under test uses):
# 6 = "rotate 90 CW to display" so storage is the scene turned 90 CCW, 8 the opposite, 5/7 add a mirror.
STORED_AS = {
    1: lambda a: a,
    2: lambda a: a[:, ::-1],  # mirrored horizontally
    3: lambda a: a[::-1, ::-1],  # rotated 180
    4: lambda a: a[::-1, :],  # mirrored vertically
    5: lambda a: a.transpose(1, 0, 2),  # mirror + 270 CW: the main-diagonal transpose
    6: lambda a: np.rot90(a, 1),
    7: lambda a: np.rot90(a, 2).transpose(1, 0, 2),  # mirror + 90 CW: the anti-diagonal transpose
    8: lambda a: np.rot90(a, -1),
}

OTHER_TAGS = {
    "0th": {
        piexif.ImageIFD.Make: b"Acme",
        piexif.ImageIFD.Model: b"Field Camera 2",
        piexif.ImageIFD.DateTime: b"2024:05:06 07:08:09",
    },
    "Exif": {piexif.ExifIFD.DateTimeOriginal: b"2024:05:06 07:08:09"},
}


def jpeg_with_orientation(orientation: int | None, pixels: np.ndarray, **extra_exif) -> bytes:
    zeroth = dict(OTHER_TAGS["0th"])
    if orientation is not None:
        zeroth[piexif.ImageIFD.Orientation] = orientation
    exif = piexif.dump({"0th": zeroth, "Exif": dict(OTHER_TAGS["Exif"]), **extra_exif})
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(pixels)).save(buffer, "JPEG", quality=95, exif=exif)
    return buffer.getvalue()


def decode(jpeg: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB")).astype(np.int16)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_every_orientation_normalises_to_the_upright_reference(orientation):
    reference = upright_reference()
    stored = STORED_AS[orientation](reference)
    if orientation >= 5:
        assert stored.shape[:2] == (WIDTH, HEIGHT)  # the camera stored it sideways

    result = normalize_image(jpeg_with_orientation(orientation, stored))

    assert (result.width, result.height) == (WIDTH, HEIGHT)
    assert result.original_orientation == orientation
    pixels = decode(result.jpeg)
    assert pixels.shape == reference.shape
    assert np.abs(pixels - reference).mean() < JPEG_TOLERANCE
    # The blue L really is at the top-left, not merely "close on average".
    assert pixels[:8, :8, 2].mean() > 200 and pixels[-8:, -8:, 2].mean() < 50


@pytest.mark.parametrize("orientation", [1, 3, 6, 8])
def test_orientation_tag_is_removed_and_other_tags_are_kept(orientation):
    stored = STORED_AS[orientation](upright_reference())
    result = normalize_image(jpeg_with_orientation(orientation, stored))

    exif = piexif.load(result.jpeg)
    assert piexif.ImageIFD.Orientation not in exif["0th"]
    for tag, value in OTHER_TAGS["0th"].items():
        assert exif["0th"][tag] == value
    assert (
        exif["Exif"][piexif.ExifIFD.DateTimeOriginal] == OTHER_TAGS["Exif"][piexif.ExifIFD.DateTimeOriginal]
    )
    # A viewer honouring EXIF now sees exactly the stored (upright) pixels.
    assert orientation_of(Image.open(io.BytesIO(result.jpeg))) == 1


def test_pixel_dimensions_in_exif_follow_the_quarter_turn():
    stored = STORED_AS[6](upright_reference())
    dims = {
        "Exif": {
            piexif.ExifIFD.PixelXDimension: HEIGHT,  # the stored (sideways) size
            piexif.ExifIFD.PixelYDimension: WIDTH,
            piexif.ExifIFD.DateTimeOriginal: b"2024:05:06 07:08:09",
        }
    }
    zeroth = {piexif.ImageIFD.Orientation: 6}
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(stored)).save(
        buffer, "JPEG", exif=piexif.dump({"0th": zeroth, **dims})
    )

    exif = piexif.load(normalize_image(buffer.getvalue()).jpeg)

    assert exif["Exif"][piexif.ExifIFD.PixelXDimension] == WIDTH
    assert exif["Exif"][piexif.ExifIFD.PixelYDimension] == HEIGHT


def test_missing_exif_is_harmless():
    buffer = io.BytesIO()
    Image.fromarray(upright_reference()).save(buffer, "JPEG", quality=95)

    result = normalize_image(buffer.getvalue())

    assert result.original_orientation == 1
    assert np.abs(decode(result.jpeg) - upright_reference()).mean() < JPEG_TOLERANCE
    assert "exif" not in Image.open(io.BytesIO(result.jpeg)).info


@pytest.mark.filterwarnings("ignore:Corrupt EXIF data")  # Pillow's warning is the point here
def test_corrupt_exif_is_harmless():
    buffer = io.BytesIO()
    # A syntactically valid APP1 "Exif" segment whose TIFF payload is garbage.
    Image.fromarray(upright_reference()).save(
        buffer, "JPEG", quality=95, exif=b"Exif\x00\x00II*\x00\xff\xff\xff\x7fgarbage"
    )

    result = normalize_image(buffer.getvalue())

    assert result.original_orientation == 1
    assert (result.width, result.height) == (WIDTH, HEIGHT)
    assert np.abs(decode(result.jpeg) - upright_reference()).mean() < JPEG_TOLERANCE


def test_out_of_range_orientation_is_treated_as_upright():
    result = normalize_image(jpeg_with_orientation(9, upright_reference()))

    assert result.original_orientation == 1
    assert np.abs(decode(result.jpeg) - upright_reference()).mean() < JPEG_TOLERANCE


def test_stale_thumbnail_is_dropped_after_a_turn_but_kept_otherwise():
    thumb = io.BytesIO()
    Image.new("RGB", (16, 16), "red").save(thumb, "JPEG")
    extra = {"1st": {piexif.ImageIFD.Compression: 6}, "thumbnail": thumb.getvalue()}

    turned = piexif.load(
        normalize_image(jpeg_with_orientation(6, STORED_AS[6](upright_reference()), **extra)).jpeg
    )
    kept = piexif.load(normalize_image(jpeg_with_orientation(1, upright_reference(), **extra)).jpeg)

    assert turned["thumbnail"] is None
    assert Image.open(io.BytesIO(kept["thumbnail"])).size == (16, 16)  # piexif re-packs, same picture


def test_exif_helper_returns_none_for_garbage_and_strips_orientation_otherwise():
    assert exif_without_orientation(None, (1, 1), turned=False) is None
    assert exif_without_orientation(b"not exif at all", (1, 1), turned=False) is None

    raw = piexif.dump({"0th": {piexif.ImageIFD.Orientation: 3, piexif.ImageIFD.Make: b"Acme"}})
    cleaned = piexif.load(exif_without_orientation(raw, (4, 3), turned=True))

    assert cleaned["0th"] == {piexif.ImageIFD.Make: b"Acme"}
