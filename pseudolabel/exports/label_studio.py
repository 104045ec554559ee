"""Label Studio tasks with the pipeline's masks as predictions (pre-annotations), and their labelling config.

One task per image: ``{"data": {"image": url, "image_id", "split", ...}, "predictions": [{"model_version",
"score", "result": [...]}]}``. Each instance is one region of the prediction's ``result``, as a brush mask
(``"brush"``: Label Studio's own bit-packed RLE, :func:`brush_rle_encode`) or a polygon (``"polygon"``:
the mask's outer outline, in percent of the image size).

How the ids are used: a region's ``id`` is ``"c<candidate_id>"`` (:func:`region_id`), the candidate's
number within its image. Label Studio keeps a prediction region's id when a reviewer starts an annotation
from the prediction, so in the submitted annotation a region with a known id is that candidate (accepted,
or corrected when its mask or class changed), a missing one was rejected, and any other id is an object
the reviewer added. Together with ``data.image_id`` (the pipeline's image id), every reviewed region
traces back to one row of the pseudo-labels. The prediction's ``model_version`` names what made the
labels (their provenance), so Label Studio can tell predictions of different model versions apart.

The config (:func:`label_config`) names the tags the results refer to: an ``Image`` named ``image``
(``$image``) and a ``BrushLabels`` or ``PolygonLabels`` named ``label`` with one ``Label`` per class.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
from pycocotools import mask as mask_utils

from pseudolabel.exports.yolo import join_parts
from pseudolabel.rle import polygons as rle_polygons
from pseudolabel.rle import rle_object

MASK_FORMATS = ("brush", "polygon")
FROM_NAME = "label"  # the BrushLabels / PolygonLabels tag
TO_NAME = "image"  # the Image tag
REGION_PREFIX = "c"
PERCENT_DECIMALS = 4  # 1e-4 % of 10,000 px is 0.01 px

# Label Studio's brush RLE (label_studio_sdk.converter.brush.encode_rle, from thi.ng/rle-pack): a bit
# stream of a 32-bit value count, a 5-bit word size - 1, four 4-bit run-length field sizes - 1, then one
# token per run of equal values: a repeat flag, a 2-bit field-size index, the run length - 1 in that many
# bits, and the 8-bit value. Runs over 65,536 are split; the stream is padded with 1-8 zero bits.
_WORD_BITS = 8
_RUN_FIELD_BITS = (3, 4, 8, 16)
_HEADER_BITS = 32 + 5 + 4 * 4
_LONGEST_RUN = 1 << 16


def region_id(candidate_id: int) -> str:
    """The id of a candidate's region: ``c<candidate_id>`` (see the module docstring)."""
    return f"{REGION_PREFIX}{int(candidate_id)}"


def check_mask_format(mask_format: str) -> str:
    if mask_format not in MASK_FORMATS:
        raise ValueError(f"unknown Label Studio mask format {mask_format!r}: choose one of {MASK_FORMATS}")
    return mask_format


# -- brush RLE -------------------------------------------------------------------------------------


def _run_tokens(lengths: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One (token, bit width) per emitted token for runs of ``lengths`` equal ``values``, as
    ``encode_rle`` writes them: a run of 1 is a literal (flag 0, size 0, length 0); 2-8, 9-16, 17-256
    use size fields 0, 1, 2; longer runs size 3, in pieces of 65,536 while more than 65,536 remain."""
    long = lengths > 256
    pieces = np.where(long, (lengths - 1) // _LONGEST_RUN + 1, 1)  # tokens per run
    run_of = np.repeat(np.arange(len(lengths)), pieces)
    first_token = np.cumsum(pieces) - pieces
    piece = np.arange(len(run_of)) - first_token[run_of]
    # Every piece of a long run but the last covers 65,536 values; the last covers what remains.
    length = np.where(
        piece < pieces[run_of] - 1, _LONGEST_RUN, lengths[run_of] - (pieces[run_of] - 1) * _LONGEST_RUN
    )
    size_index = np.select([long[run_of], length > 16, length > 8], [3, 2, 1], 0)
    field_bits = np.asarray(_RUN_FIELD_BITS, np.int64)[size_index]
    repeat = (length > 1).astype(np.int64)
    value = values[run_of].astype(np.int64)
    widths = 1 + 2 + field_bits + _WORD_BITS
    tokens = (
        (repeat << (widths - 1))
        | (size_index.astype(np.int64) << (field_bits + _WORD_BITS))
        | ((length - 1) << _WORD_BITS)
        | value
    )
    return tokens, widths


def _to_bits(fields: np.ndarray, widths: np.ndarray) -> np.ndarray:
    """Concatenate each integer ``fields[i]`` written MSB first in ``widths[i]`` bits -> uint8 bit array."""
    ends = np.cumsum(widths)
    bits = np.zeros(int(ends[-1]) if len(ends) else 0, np.uint8)
    starts = ends - widths
    for b in range(int(widths.max()) if len(widths) else 0):  # bit b of every field at once
        has = widths > b
        bits[starts[has] + b] = (fields[has] >> (widths[has] - 1 - b)) & 1
    return bits


def brush_rle_encode(mask: np.ndarray) -> list[int]:
    """A 2-D mask -> Label Studio's brush RLE (the ``value.rle`` of a ``brushlabels`` result).

    The same bytes as ``label_studio_sdk.converter.brush.mask2rle(mask * 255)``: the run-length encoding
    of the flattened RGBA image (row-major) with the mask in all four channels as 0/255, computed on the
    mask's runs with numpy rather than per value.
    """
    mask = np.asarray(mask)
    if mask.ndim != 2 or mask.size == 0:
        raise ValueError(f"mask must be a non-empty 2-D array, got shape {mask.shape}")
    count = 4 * mask.size  # values in the RGBA image
    if count >= 1 << 32:
        raise ValueError(f"mask {mask.shape} is too large for Label Studio's 32-bit value count")
    flat = mask.astype(bool, copy=False).ravel()
    starts = np.r_[0, np.flatnonzero(flat[1:] != flat[:-1]) + 1]
    lengths = 4 * np.diff(np.r_[starts, flat.size])  # each pixel is 4 equal values
    tokens, widths = _run_tokens(lengths.astype(np.int64), flat[starts].astype(np.int64) * 255)
    header = np.array([count, _WORD_BITS - 1, *(s - 1 for s in _RUN_FIELD_BITS)], np.int64)
    header_widths = np.array([32, 5, 4, 4, 4, 4], np.int64)
    bits = _to_bits(np.r_[header, tokens], np.r_[header_widths, widths])
    padded = np.zeros((len(bits) // 8 + 1) * 8, np.uint8)  # encode_rle always pads, 1 to 8 zero bits
    padded[: len(bits)] = bits
    return np.packbits(padded).tolist()


class _BitReader:
    def __init__(self, data: Sequence[int]):
        self.bits = np.unpackbits(np.asarray(data, dtype=np.uint8))
        self.at = 0

    def read(self, size: int) -> int:
        chunk = self.bits[self.at : self.at + size]
        if len(chunk) < size:
            raise ValueError("brush RLE ends inside a field")
        self.at += size
        return int(chunk.dot(1 << np.arange(size - 1, -1, -1, dtype=np.int64))) if size else 0


def brush_rle_values(rle: Sequence[int]) -> np.ndarray:
    """Decode Label Studio's brush RLE to its flat value array (any word and field sizes, as the
    ``rle-pack`` decoder reads them; literal blocks included)."""
    reader = _BitReader(rle)
    count = reader.read(32)
    word = reader.read(5) + 1
    field_bits = [reader.read(4) + 1 for _ in range(4)]
    out = np.zeros(count, np.uint32 if word > 8 else np.uint8)
    i = 0
    while i < count:
        repeat = reader.read(1)
        j = min(count, i + 1 + reader.read(field_bits[reader.read(2)]))
        if repeat:
            out[i:j] = reader.read(word)
        else:
            for k in range(i, j):
                out[k] = reader.read(word)
        i = j
    return out


def brush_rle_decode(rle: Sequence[int], height: int, width: int) -> np.ndarray:
    """Label Studio's brush RLE -> (height, width) bool mask: the alpha channel, set where >= 128 (what
    ``label_studio_sdk``'s converter reads as the layer; a reviewer's brush strokes may be anti-aliased)."""
    values = brush_rle_values(rle)
    if values.size != 4 * height * width:
        raise ValueError(
            f"brush RLE holds {values.size} values, a {height}x{width} RGBA image needs {4 * height * width}"
        )
    return values.reshape(height, width, 4)[:, :, 3] >= 128


# -- result items ----------------------------------------------------------------------------------


def _region(
    kind: str, value: dict[str, Any], *, candidate_id: int, score: float | None, width: int, height: int
) -> dict[str, Any]:
    item = {
        "id": region_id(candidate_id),
        "type": kind,
        "from_name": FROM_NAME,
        "to_name": TO_NAME,
        "original_width": int(width),
        "original_height": int(height),
        "image_rotation": 0,
        "value": value,
    }
    if score is not None and score == score:  # NaN: a score the backend does not make
        item["score"] = round(float(score), 6)
    return item


def brush_result(mask: np.ndarray, *, candidate_id: int, label: str, score: float | None) -> dict[str, Any]:
    """One ``brushlabels`` region of a (H, W) mask."""
    value = {"format": "rle", "rle": brush_rle_encode(mask), "brushlabels": [label]}
    height, width = mask.shape
    return _region("brushlabels", value, candidate_id=candidate_id, score=score, width=width, height=height)


def polygon_points(points: np.ndarray, width: int, height: int) -> list[list[float]]:
    """(N, 2) pixel-edge coordinates (COCO's, as :func:`pseudolabel.rle.polygons` gives) -> Label Studio's
    ``[[x%, y%], ...]`` in percent of the image width and height."""
    percent = np.asarray(points, np.float64).reshape(-1, 2) * (100.0 / width, 100.0 / height)
    return np.round(percent, PERCENT_DECIMALS).tolist()


def polygon_result(
    points: np.ndarray, *, candidate_id: int, label: str, score: float | None, width: int, height: int
) -> dict[str, Any]:
    """One ``polygonlabels`` region of an outline given as (N, 2) pixel-edge coordinates."""
    value = {"points": polygon_points(points, width, height), "closed": True, "polygonlabels": [label]}
    return _region("polygonlabels", value, candidate_id=candidate_id, score=score, width=width, height=height)


def mask_outline(parts: Sequence[Sequence[float]]) -> np.ndarray:
    """A mask's outer polygons (:func:`pseudolabel.rle.polygons`) as one (N, 2) outline: several parts are
    joined at their closest points (:func:`pseudolabel.exports.yolo.join_parts`); none gives (0, 2)."""
    if not parts:
        return np.zeros((0, 2), np.float64)
    return join_parts([np.asarray(p, np.float64).reshape(-1, 2) for p in parts])


def prediction_result(
    *,
    candidate_id: int,
    label: str,
    rle_counts: str,
    height: int,
    width: int,
    score: float | None,
    mask_format: str = "brush",
) -> dict[str, Any]:
    """One instance (a COCO compressed RLE string, as every mask table stores it) as a region of a
    prediction's ``result``: a brush mask or its outline polygon (``mask_format``). An empty mask has no
    outline: as a polygon it comes back with no points (the export drops such instances and counts them)."""
    rle = rle_object(rle_counts, height, width)
    if check_mask_format(mask_format) == "brush":
        mask = mask_utils.decode(rle).astype(bool)
        return brush_result(mask, candidate_id=candidate_id, label=label, score=score)
    outline = mask_outline(rle_polygons(rle))
    return polygon_result(
        outline, candidate_id=candidate_id, label=label, score=score, width=width, height=height
    )


def task(
    image_url: str,
    *,
    image_id: str,
    split: str | None,
    results: Sequence[Mapping[str, Any]],
    model_version: str,
    score: float | None = None,
    data: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """One task: the image (``data.image``), its ids, and one prediction holding ``results``.

    ``score`` (the prediction's, which Label Studio sorts tasks by) defaults to the mean of the regions'
    scores, 0 without any. ``data`` adds fields to the task's data (what a review queue wants to keep).
    """
    if score is None:
        scores = [float(r["score"]) for r in results if r.get("score") is not None]
        score = round(sum(scores) / len(scores), 6) if scores else 0.0
    task_data = {"image": image_url, "image_id": image_id}
    if split is not None:
        task_data["split"] = split
    task_data.update(data or {})
    return {
        "data": task_data,
        "predictions": [{"model_version": model_version, "score": float(score), "result": list(results)}],
    }


def label_config(categories: Iterable[str], mask_format: str = "brush") -> str:
    """The labelling config XML the tasks' results fit: ``Image`` "image", and ``BrushLabels`` (or
    ``PolygonLabels``) "label" with one ``Label`` per class, in the order given."""
    tag = {"brush": "BrushLabels", "polygon": "PolygonLabels"}[check_mask_format(mask_format)]
    view = ET.Element("View")
    ET.SubElement(view, "Image", name=TO_NAME, value=f"${TO_NAME}", zoom="true")
    labels = ET.SubElement(view, tag, name=FROM_NAME, toName=TO_NAME)
    for name in categories:
        ET.SubElement(labels, "Label", value=str(name))
    ET.indent(view)
    return ET.tostring(view, encoding="unicode") + "\n"
