"""Training samples as AutoSAM2 reads them: the resized image, its binary mask, and its split.

The image is resized bilinearly and never drawn on; the mask is the union of the image's kept
instances, resized nearest-neighbour, stored as 8-bit grayscale JPEG (255 = object, 0 = background).
JPEG ringing can leave a few near-edge values off 0/255, so readers should threshold at 128.

Splits are train/val/test, seeded and stratified by label. Within each label, samples are ordered
by a seeded hash of their id (not by a random draw), so the assignment depends only on (seed, the
set of ids): re-runs reproduce it exactly, and adding shards moves only samples near the split
boundaries instead of reshuffling everything.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import cv2
import numpy as np
import pandas as pd

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


# -- splits ----------------------------------------------------------------------------------------

SPLITS = ("train", "val", "test")
DEFAULT_FRACTIONS = {"train": 0.95, "val": 0.04, "test": 0.01}


def split_counts(n: int, fractions: Mapping[str, float]) -> dict[str, int]:
    """Largest-remainder rounding of ``n * fraction`` (counts sum to ``n``; ties favour earlier splits)."""
    exact = np.array([n * fractions[s] for s in SPLITS], dtype=np.float64)
    counts = np.floor(exact).astype(np.int64)
    remainder = n - int(counts.sum())
    by_fraction = sorted(range(len(SPLITS)), key=lambda i: (-(exact[i] - counts[i]), i))
    for i in by_fraction[:remainder]:
        counts[i] += 1
    return dict(zip(SPLITS, counts.tolist(), strict=True))


def validate_fractions(fractions: Mapping[str, float]) -> dict[str, float]:
    if set(fractions) != set(SPLITS):
        raise ValueError(f"split fractions need exactly {SPLITS}, got {sorted(fractions)}")
    if any(v < 0 for v in fractions.values()) or abs(sum(fractions.values()) - 1.0) > 1e-6:
        raise ValueError(f"split fractions must be >= 0 and sum to 1, got {dict(fractions)}")
    return {s: float(fractions[s]) for s in SPLITS}


def _hash_key(seed: int, sample_id: str) -> str:
    return hashlib.sha256(f"{seed}:{sample_id}".encode()).hexdigest()


def assign_splits(
    ids: Sequence[str],
    labels: Sequence[str | None],
    fractions: Mapping[str, float] = DEFAULT_FRACTIONS,
    seed: int = 0,
) -> pd.Series:
    """Split name per id (a Series indexed like ``ids``), stratified by label.

    Per label: test takes the first ``round(n * test)`` ids in seeded-hash order, val the next
    ``round(n * val)``, train the rest (largest-remainder rounding, so a label with 10 samples at
    95/4/1 goes entirely to train rather than leaking a 1-sample test set).
    """
    fractions = validate_fractions(fractions)
    frame = pd.DataFrame({"id": list(ids), "label": [label or "" for label in labels]})
    if frame["id"].duplicated().any():
        raise ValueError("sample ids must be unique")
    frame["key"] = [_hash_key(seed, i) for i in frame["id"]]
    frame = frame.sort_values(["label", "key"])
    split = np.empty(len(frame), dtype=object)
    position = frame.groupby("label", sort=False).cumcount().to_numpy()
    sizes = frame.groupby("label", sort=False)["id"].transform("size").to_numpy()
    for n in np.unique(sizes):
        counts = split_counts(int(n), fractions)
        rows = sizes == n
        split[rows] = np.where(
            position[rows] < counts["test"],
            "test",
            np.where(position[rows] < counts["test"] + counts["val"], "val", "train"),
        )
    return pd.Series(split, index=frame["id"].to_numpy(), name="split").loc[list(ids)].reset_index(drop=True)
