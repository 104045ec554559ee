"""normalize_image: every colour mode ends as 8-bit RGB; bad payloads raise typed rejections."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import piexif
import pytest
from PIL import Image, ImageCms, JpegImagePlugin

from pseudolabel.images.errors import ImageRejected, RejectReason
from pseudolabel.images.normalize import NormalizeOptions, decompression_bomb_guard, normalize_image

JPEG_TOLERANCE = 4  # per-pixel, for flat colours through one or two JPEG generations


def encode(image: Image.Image, fmt: str, **params) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **params)
    return buffer.getvalue()


def normalised_pixels(data: bytes, **options) -> np.ndarray:
    result = normalize_image(data, NormalizeOptions(**options))
    stored = Image.open(io.BytesIO(result.jpeg))
    assert stored.format == "JPEG" and stored.mode == "RGB"
    assert stored.size == (result.width, result.height)
    return np.asarray(stored).astype(np.int16)


def png_bytes(width: int, height: int, bit_depth: int, colour_type: int, rows: list[bytes]) -> bytes:
    """A minimal PNG writer, for sample formats Pillow cannot save (48-bit RGB)."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    pixels = zlib.compress(b"".join(b"\x00" + row for row in rows))  # filter type 0 per row
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels) + chunk(b"IEND", b"")


def assert_close(actual: np.ndarray, expected, tolerance: int = JPEG_TOLERANCE) -> None:
    assert np.abs(actual - np.asarray(expected, dtype=np.int16)).max() <= tolerance, (actual, expected)


def test_rgb_jpeg_round_trips_with_its_size_and_digest():
    source = Image.new("RGB", (64, 32), (10, 120, 240))
    result = normalize_image(encode(source, "JPEG", quality=95))

    assert (result.width, result.height) == (64, 32)
    assert result.source_format == "JPEG" and result.source_mode == "RGB"
    assert len(result.sha256) == 64
    assert_close(np.asarray(Image.open(io.BytesIO(result.jpeg))).astype(np.int16)[5, 5], (10, 120, 240))


def test_cmyk_becomes_rgb():
    source = Image.new("CMYK", (32, 32), (0, 0, 0, 0))  # paper white
    source.paste((255, 0, 0, 0), (0, 0, 16, 32))  # full cyan ink on the left half

    pixels = normalised_pixels(encode(source, "JPEG", quality=95))

    assert_close(pixels[16, 4], (0, 255, 255))
    assert_close(pixels[16, 28], (255, 255, 255))


def test_palette_with_transparency_is_composited_on_white():
    source = Image.new("P", (32, 32), 0)
    source.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)  # index 0 red, 1 blue
    source.paste(1, (0, 0, 16, 32))
    data = encode(source, "PNG", transparency=0)  # red is the transparent index

    pixels = normalised_pixels(data)

    assert_close(pixels[16, 4], (0, 0, 255))
    assert_close(pixels[16, 28], (255, 255, 255))  # never the hidden red


def test_gif_transparency_is_composited_on_white():
    source = Image.new("P", (32, 32), 0)
    source.putpalette([0, 255, 0, 0, 0, 0] + [0] * 762)
    source.paste(1, (0, 0, 16, 32))

    pixels = normalised_pixels(encode(source, "GIF", transparency=0))

    assert_close(pixels[16, 4], (0, 0, 0))
    assert_close(pixels[16, 28], (255, 255, 255))


def test_la_is_composited_on_white():
    source = Image.new("LA", (32, 32), (0, 255))  # opaque black
    source.paste((0, 0), (16, 0, 32, 32))  # fully transparent black on the right

    pixels = normalised_pixels(encode(source, "PNG"))

    assert_close(pixels[16, 4], (0, 0, 0))
    assert_close(pixels[16, 28], (255, 255, 255))


def test_rgba_is_blended_on_white_by_alpha():
    source = Image.new("RGBA", (32, 32), (200, 0, 0, 255))
    source.paste((0, 0, 200, 128), (16, 0, 32, 32))  # half-transparent blue

    pixels = normalised_pixels(encode(source, "PNG"))

    assert_close(pixels[16, 4], (200, 0, 0))
    alpha = 128 / 255
    assert_close(pixels[16, 28], (255 * (1 - alpha), 255 * (1 - alpha), 200 * alpha + 255 * (1 - alpha)))


def test_grayscale_with_trns_is_composited_on_white():
    source = Image.new("L", (32, 32), 0)
    source.paste(100, (0, 0, 16, 32))

    pixels = normalised_pixels(encode(source, "PNG", transparency=0))

    assert_close(pixels[16, 4], (100, 100, 100))
    assert_close(pixels[16, 28], (255, 255, 255))


def test_sixteen_bit_grayscale_is_scaled_not_clipped():
    ramp = np.linspace(0, 65535, 256).round().astype(np.uint16)
    source = Image.fromarray(np.tile(ramp, (16, 1)))
    assert source.mode == "I;16"

    pixels = normalised_pixels(encode(source, "PNG"), jpeg_quality=100)

    row = pixels[8, :, 0]
    expected = np.rint(ramp / 257.0)
    assert np.abs(row - expected).max() <= 2
    assert np.all(np.diff(row.astype(int)) >= -1)  # a ramp stays a ramp
    assert (row >= 250).sum() < 10  # clipping would have turned almost all of it white
    assert np.array_equal(pixels[..., 0], pixels[..., 1]) and np.array_equal(pixels[..., 1], pixels[..., 2])


def test_sixteen_bit_samples_in_a_32_bit_image_are_scaled_like_16_bit():
    values = np.array([[0, 257 * 64, 257 * 128, 65535]] * 8, dtype=np.int32).repeat(8, axis=1)
    source = Image.fromarray(values)
    assert source.mode == "I"

    pixels = normalised_pixels(encode(source, "TIFF"), jpeg_quality=100)

    assert_close(pixels[4, [4, 12, 20, 28], 0], [0, 64, 128, 255], tolerance=2)


def test_48_bit_rgb_is_scaled_to_8_bit():
    samples = np.zeros((8, 8, 3), dtype=">u2")
    samples[..., 0] = 65535
    samples[..., 1] = 257 * 128
    samples[..., 2] = 0
    data = png_bytes(8, 8, 16, 2, [row.tobytes() for row in samples])

    pixels = normalised_pixels(data, jpeg_quality=100)

    assert_close(pixels[4, 4], (255, 128, 0))


def test_embedded_srgb_profile_leaves_colours_alone():
    profile = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    source = Image.new("RGB", (32, 32), (30, 140, 220))

    pixels = normalised_pixels(encode(source, "PNG", icc_profile=profile))

    assert_close(pixels[16, 16], (30, 140, 220))


def linear_light_rgb_profile() -> bytes:
    """sRGB primaries with a gamma-1.0 curve: a real non-sRGB profile, derived from Pillow's sRGB."""
    profile = bytearray(ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes())
    profile[84:100] = bytes(16)  # profile ID (MD5) no longer matches; zero means "not computed"
    (count,) = struct.unpack(">I", profile[128:132])
    for n in range(count):
        signature, offset, _size = struct.unpack(">4sII", profile[132 + 12 * n : 144 + 12 * n])
        if signature in (b"rTRC", b"gTRC", b"bTRC"):  # parametric curve type 0: Y = X ** 1.0
            profile[offset : offset + 16] = b"para" + bytes(4) + struct.pack(">HHI", 0, 0, 0x00010000)
        if signature == b"desc":  # so it is not recognised (and skipped) as sRGB
            start = profile.index("sRGB".encode("utf-16-be"), offset)
            profile[start : start + 8] = "Line".encode("utf-16-be")
    return bytes(profile)


def test_non_srgb_profile_is_colour_managed_into_srgb():
    source = Image.new("RGB", (32, 32), (128, 128, 128))  # linear-light mid grey
    source.paste((0, 0, 0), (0, 0, 8, 32))
    source.paste((255, 255, 255), (24, 0, 32, 32))

    pixels = normalised_pixels(
        encode(source, "PNG", icc_profile=linear_light_rgb_profile()), jpeg_quality=100
    )

    assert_close(pixels[16, 16], (188, 188, 188))  # sRGB encoding of 50% linear light
    assert_close(pixels[16, 2], (0, 0, 0))
    assert_close(pixels[16, 29], (255, 255, 255))


def test_broken_icc_profile_falls_back_to_a_plain_conversion():
    source = Image.new("RGB", (32, 32), (30, 140, 220))

    pixels = normalised_pixels(encode(source, "PNG", icc_profile=b"definitely not an ICC profile"))

    assert_close(pixels[16, 16], (30, 140, 220))


def test_quality_is_configurable():
    noise = np.random.default_rng(0).integers(0, 256, (128, 128, 3), dtype=np.uint8)
    data = encode(Image.fromarray(noise), "PNG")

    low = normalize_image(data, NormalizeOptions(jpeg_quality=30))
    high = normalize_image(data, NormalizeOptions(jpeg_quality=95))

    assert len(low.jpeg) < len(high.jpeg) / 2


# -- working resolution (max_side) -----------------------------------------------------------------

QUADRANTS = {(0, 0): (255, 0, 0), (0, 1): (0, 255, 0), (1, 0): (0, 0, 255), (1, 1): (255, 255, 0)}


def quadrant_scene(width: int, height: int) -> np.ndarray:
    """Upright scene: red top-left, green top-right, blue bottom-left, yellow bottom-right."""
    pixels = np.zeros((height, width, 3), dtype=np.uint8)
    for (row, col), colour in QUADRANTS.items():
        pixels[row * height // 2 : (row + 1) * height // 2, col * width // 2 : (col + 1) * width // 2] = (
            colour
        )
    return pixels


def assert_quadrants(pixels: np.ndarray) -> None:
    height, width = pixels.shape[:2]
    for (row, col), colour in QUADRANTS.items():
        assert_close(pixels[(2 * row + 1) * height // 4, (2 * col + 1) * width // 4], colour)


def sideways_phone_photo() -> bytes:
    """A 4000x3000 JPEG as a phone stores a portrait shot: scene turned 90 CCW, EXIF orientation 6."""
    stored = np.ascontiguousarray(np.rot90(quadrant_scene(3000, 4000), 1))  # 3000 rows x 4000 columns
    exif = {
        "0th": {piexif.ImageIFD.Orientation: 6, piexif.ImageIFD.Make: b"Acme"},
        "Exif": {
            piexif.ExifIFD.PixelXDimension: 4000,
            piexif.ExifIFD.PixelYDimension: 3000,
            # Not only numbers: piexif's dump of an all-LONG Exif IFD reads as truncated to Pillow.
            piexif.ExifIFD.DateTimeOriginal: b"2024:05:06 07:08:09",
        },
    }
    return encode(Image.fromarray(stored), "JPEG", quality=90, exif=piexif.dump(exif))


def test_large_turned_jpeg_is_stored_upright_at_max_side():
    result = normalize_image(sideways_phone_photo(), NormalizeOptions(max_side=2048))

    assert (result.width, result.height) == (1536, 2048)  # portrait: the turn came first
    assert result.original_orientation == 6
    stored = Image.open(io.BytesIO(result.jpeg))
    assert stored.size == (1536, 2048)
    assert_quadrants(np.asarray(stored).astype(np.int16))
    exif = piexif.load(result.jpeg)
    assert piexif.ImageIFD.Orientation not in exif["0th"] and exif["0th"][piexif.ImageIFD.Make] == b"Acme"
    assert (exif["Exif"][piexif.ExifIFD.PixelXDimension], exif["Exif"][piexif.ExifIFD.PixelYDimension]) == (
        1536,
        2048,
    )


def test_jpeg_is_reduced_by_the_decoder_in_its_encoded_orientation(monkeypatch):
    drafts = []
    draft = JpegImagePlugin.JpegImageFile.draft

    def spy(image, mode, size):
        drafts.append((size, draft(image, mode, size)[1][2:]))  # requested size, decoded size
        return None

    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft", spy)

    result = normalize_image(sideways_phone_photo(), NormalizeOptions(max_side=1000))

    # Asked in the encoded (landscape) orientation, so libjpeg can scale by 1/4 and no further.
    assert drafts == [((1000, 750), (1000, 750))]
    assert (result.width, result.height) == (750, 1000)
    assert_quadrants(np.asarray(Image.open(io.BytesIO(result.jpeg))).astype(np.int16))


def test_max_side_zero_keeps_full_resolution():
    data = encode(Image.fromarray(quadrant_scene(4000, 3000)), "JPEG", quality=90)

    result = normalize_image(data, NormalizeOptions(max_side=0))

    assert (result.width, result.height) == (4000, 3000)


def test_image_within_max_side_is_untouched():
    data = encode(Image.fromarray(quadrant_scene(64, 48)), "JPEG", quality=95)

    fitted = normalize_image(data, NormalizeOptions(max_side=2048))

    assert (fitted.width, fitted.height) == (64, 48)
    assert fitted.jpeg == normalize_image(data, NormalizeOptions(max_side=0)).jpeg


def test_other_formats_are_scaled_down_after_decoding():
    data = encode(Image.fromarray(quadrant_scene(300, 200)), "PNG")

    result = normalize_image(data, NormalizeOptions(max_side=150))

    assert (result.width, result.height) == (150, 100)
    assert_quadrants(np.asarray(Image.open(io.BytesIO(result.jpeg))).astype(np.int16))


def test_negative_max_side_is_refused():
    with pytest.raises(ValueError, match="max_side"):
        NormalizeOptions(max_side=-1)


def rejection(data: bytes, **options) -> ImageRejected:
    with pytest.raises(ImageRejected) as caught:
        normalize_image(data, NormalizeOptions(**options))
    return caught.value


@pytest.mark.parametrize("side", [12, 20])  # 144 px: Pillow only warns; 400 px: Pillow errors
def test_decompression_bomb_is_rejected(side):
    data = encode(Image.new("RGB", (side, side)), "PNG")

    error = rejection(data, max_pixels=100)

    assert error.reason is RejectReason.DECOMPRESSION_BOMB
    assert error.message.startswith("decompression_bomb: ")


@pytest.mark.parametrize("side", [12, 20])
def test_pillow_guard_raises_for_warnings_and_errors_and_restores_the_limit(side):
    before = Image.MAX_IMAGE_PIXELS
    data = encode(Image.new("RGB", (side, side)), "PNG")

    with (
        decompression_bomb_guard(100),
        pytest.raises((Image.DecompressionBombWarning, Image.DecompressionBombError)),
    ):
        Image.open(io.BytesIO(data))

    assert before == Image.MAX_IMAGE_PIXELS
    Image.open(io.BytesIO(data)).load()  # outside the guard the default limit applies again


def test_image_wider_than_a_jpeg_can_be_is_rejected_not_crashing():
    data = encode(Image.new("L", (70_000, 1), 128), "PNG")

    error = rejection(data)

    assert error.reason is RejectReason.TOO_LARGE and "70000x1" in error.message


def test_image_within_the_limit_is_accepted():
    result = normalize_image(encode(Image.new("RGB", (10, 10)), "PNG"), NormalizeOptions(max_pixels=100))
    assert (result.width, result.height) == (10, 10)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_truncated_image_is_rejected(fmt):
    noise = np.random.default_rng(1).integers(0, 256, (200, 300, 3), dtype=np.uint8)
    data = encode(Image.fromarray(noise), fmt)

    error = rejection(data[: len(data) // 2])

    assert error.reason is RejectReason.TRUNCATED


@pytest.mark.parametrize(
    "payload",
    [b"", b"<html><body>404 Not Found</body></html>", b"%PDF-1.7\n...", b"%!PS-Adobe-3.0 EPSF-3.0\n"],
    ids=["empty", "html", "pdf", "eps"],
)
def test_non_images_are_rejected(payload):
    assert rejection(payload).reason is RejectReason.NOT_AN_IMAGE


def test_image_signature_with_garbage_is_corrupt_not_foreign():
    error = rejection(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    assert error.reason in (RejectReason.CORRUPT, RejectReason.TRUNCATED)
    assert "PNG" in error.message
