"""Kept instances -> COCO instance segmentation, loading it back, and checks on what is exported.

The COCO dict uses RLE segmentation; annotation ``area`` and ``bbox`` are computed from the RLE
itself with pycocotools (no decoding), so they describe the mask exactly, whatever the stored
columns say. :func:`coco_with_polygons` converts it for tools that cannot read RLE. The checks at
the end are what the pseudo_labels asset checks run on a shard's kept instances.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from pseudolabel.rle import polygons as rle_polygons
from pseudolabel.rle import rle_areas, rle_bboxes, rle_object, rle_objects, rle_run_totals, union_area

EMPTY_PHRASE_NAME = "object"  # COCO categories need a name; the detector may return an empty phrase


def category_names(phrases: Iterable[str | None]) -> list[str]:
    """Sorted unique category names; pass *all* candidate phrases so ids stay stable across thresholds."""
    series = phrases if isinstance(phrases, pd.Series) else pd.Series(list(phrases), dtype=object)
    return sorted({p if isinstance(p, str) and p else EMPTY_PHRASE_NAME for p in series.unique()})


def coco_categories(categories: Sequence[str]) -> list[dict[str, Any]]:
    """COCO ``categories`` records: ids 1.. in the order of ``categories``."""
    return [{"id": i, "name": name, "supercategory": ""} for i, name in enumerate(categories, start=1)]


def category_ids(phrases: Sequence[str | None], categories: Sequence[str]) -> list[int]:
    """The 1-based COCO category id of each phrase (an empty phrase is :data:`EMPTY_PHRASE_NAME`);
    a phrase that is not one of ``categories`` raises ValueError naming it."""
    index = {name: i for i, name in enumerate(categories, start=1)}
    names = [p if isinstance(p, str) and p else EMPTY_PHRASE_NAME for p in phrases]
    unknown = sorted(set(names) - index.keys())
    if unknown:
        raise ValueError(f"{len(unknown)} phrase(s) not among the categories, e.g. {unknown[:3]}")
    return [index[name] for name in names]


def coco_image_records(
    images: pd.DataFrame, *, first_id: int = 1, image_fields: Sequence[str] = ()
) -> list[dict[str, Any]]:
    """COCO ``images`` records for ``images`` (columns image_id, file_name, width, height, plus
    ``image_fields``), ids ``first_id``.. in row order; the pipeline's id is kept as ``pseudolabel_image_id``."""
    extra = {field: images[field].tolist() for field in image_fields}
    columns = (images[c].tolist() for c in ("image_id", "file_name", "width", "height"))
    records = []
    for i, (image_id, file_name, width, height) in enumerate(zip(*columns, strict=True)):
        record = {
            "id": first_id + i,
            "file_name": file_name,
            "width": int(width),
            "height": int(height),
            "pseudolabel_image_id": image_id,
        }
        record.update({field: values[i] for field, values in extra.items()})
        records.append(record)
    return records


def _score(value: float) -> float | None:
    """A score as JSON can carry it: NaN (a score the backend does not make) becomes null."""
    value = float(value)
    return None if np.isnan(value) else round(value, 6)


def coco_annotations(
    kept: pd.DataFrame,
    coco_image_ids: Sequence[int],
    categories: Sequence[str],
    *,
    first_id: int = 1,
    rles: Sequence[dict[str, Any]] | None = None,
    extra_fields: Sequence[str] = (),
) -> list[dict[str, Any]]:
    """COCO ``annotations`` records (RLE segmentation) for the rows of ``kept``, ids ``first_id``.. in
    row order; ``coco_image_ids[i]`` is the COCO image id of row i.

    ``area`` and ``bbox`` come from the RLE itself (no decoding); annotations carry ``candidate_id``,
    ``box_score``, ``text_score``, ``mask_score`` (null when NaN) and the ``extra_fields`` columns.
    ``rles``: the rows' :func:`~pseudolabel.rle.rle_objects`, when the caller already has them.
    """
    if rles is None:
        rles = rle_objects(kept["rle_counts"].tolist(), kept["height"].tolist(), kept["width"].tolist())
    areas = rle_areas(rles).tolist()
    bboxes = rle_bboxes(rles).tolist()
    category_id = category_ids(kept["phrase"].tolist(), categories)
    extra = {field: kept[field].tolist() for field in extra_fields}
    columns = (kept[c].tolist() for c in ("candidate_id", "box_score", "text_score", "mask_score"))
    annotations = []
    for i, (candidate_id, box_score, text_score, mask_score) in enumerate(zip(*columns, strict=True)):
        annotation = {
            "id": first_id + i,
            "image_id": int(coco_image_ids[i]),
            "category_id": category_id[i],
            "segmentation": {"size": rles[i]["size"], "counts": rles[i]["counts"].decode("ascii")},
            "area": float(areas[i]),
            "bbox": [float(v) for v in bboxes[i]],
            "iscrowd": 0,
            "candidate_id": int(candidate_id),
            "box_score": _score(box_score),
            "text_score": _score(text_score),
            "mask_score": _score(mask_score),
        }
        annotation.update({field: values[i] for field, values in extra.items()})
        annotations.append(annotation)
    return annotations


def build_coco(
    kept: pd.DataFrame,
    images: pd.DataFrame,
    *,
    categories: Sequence[str],
    info: dict[str, Any] | None = None,
    image_fields: Sequence[str] = (),
) -> dict[str, Any]:
    """COCO dict for ``images`` (columns image_id, file_name, width, height, plus ``image_fields``).

    Every listed image appears, labelled or not (empty images are the negatives). COCO ids are
    1-based integers in the order of ``images``; the pipeline's string id is kept as
    ``pseudolabel_image_id``. Annotations carry ``box_score``, ``text_score`` and ``mask_score``.
    """
    images = images.reset_index(drop=True)
    coco_image_id = pd.Series(np.arange(1, len(images) + 1), index=images["image_id"].to_numpy())
    if not coco_image_id.index.is_unique:
        raise ValueError("images must list each image_id once")
    missing = set(kept["image_id"]) - set(coco_image_id.index)
    if missing:
        raise ValueError(f"{len(missing)} kept image(s) not in images, e.g. {sorted(missing)[:3]}")
    return {
        "info": info or {},
        "licenses": [],
        "images": coco_image_records(images, image_fields=image_fields),
        "categories": coco_categories(categories),
        "annotations": coco_annotations(
            kept, coco_image_id.loc[kept["image_id"].to_numpy()].tolist(), categories
        ),
    }


def coco_to_bytes(coco: dict[str, Any]) -> bytes:
    return json.dumps(coco, separators=(",", ":")).encode()


def load_coco(data: bytes) -> COCO:
    """Load COCO JSON bytes exactly as ``COCO(path)`` does (parse, then build the index)."""
    coco = COCO()
    coco.dataset = json.loads(data)
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress to stdout
        coco.createIndex()
    return coco


def coco_problems(coco: COCO) -> list[str]:
    """Structural problems a COCO consumer would trip over (empty list when the file is sound)."""
    problems = []
    for ann in coco.dataset.get("annotations", []):
        if ann["image_id"] not in coco.imgs:
            problems.append(f"annotation {ann['id']}: unknown image_id {ann['image_id']}")
        elif ann["category_id"] not in coco.cats:
            problems.append(f"annotation {ann['id']}: unknown category_id {ann['category_id']}")
        else:
            image = coco.imgs[ann["image_id"]]
            if list(ann["segmentation"]["size"]) != [image["height"], image["width"]]:
                problems.append(f"annotation {ann['id']}: RLE size differs from the image size")
    return problems


# -- polygons --------------------------------------------------------------------------------------
# Polygons trace the mask pixels' outer edges (``rle.polygons``); holes are filled, since COCO
# polygons have none. The RLE export stays the source of truth.


def polygon_annotations(annotations: Iterable[dict[str, Any]]) -> tuple[list[dict[str, Any]], int]:
    """RLE annotations -> copies with polygon segmentations (:func:`~pseudolabel.rle.polygons`); returns
    them and the number dropped (empty masks, which have no outline)."""
    converted, dropped = [], 0
    for ann in annotations:
        polygons = rle_polygons(ann["segmentation"])
        if polygons:
            converted.append({**ann, "segmentation": polygons})
        else:
            dropped += 1
    return converted, dropped


def coco_with_polygons(coco: dict[str, Any]) -> tuple[dict[str, Any], int]:
    """A copy of an RLE COCO dict with polygon segmentations; returns it and the number of dropped
    annotations (empty masks, which have no outline)."""
    out = copy.copy(coco)
    out["annotations"], dropped = polygon_annotations(coco["annotations"])
    return out, dropped


# -- data-quality checks ---------------------------------------------------------------------------

MAX_REPORTED_FAILURES = 20
DECODE_SAMPLE = 64  # RLEs per shard also fully decoded by pycocotools


@dataclass(frozen=True)
class RleCheck:
    checked: int
    failures: list[str] = field(default_factory=list)  # first MAX_REPORTED_FAILURES problems
    num_failures: int = 0

    @property
    def passed(self) -> bool:
        return self.num_failures == 0


def check_rles(kept: pd.DataFrame, decode_sample: int = DECODE_SAMPLE) -> RleCheck:
    """Every kept RLE must be a well-formed string whose runs cover exactly height x width pixels,
    with exactly the stored ``mask_area`` foreground pixels.

    All strings are parsed at once (:func:`~pseudolabel.rle.rle_run_totals`, no pixels);
    ``decode_sample`` of them, evenly spread, are also decoded with pycocotools as a cross-check.
    """
    failures: list[str] = []
    count = 0

    def fail(i: int, problem: str) -> None:
        nonlocal count
        count += 1
        if len(failures) < MAX_REPORTED_FAILURES:
            failures.append(f"{ids[i]}/{candidates[i]}: {problem}")

    ids, candidates = kept["image_id"].tolist(), kept["candidate_id"].tolist()
    strings = kept["rle_counts"].tolist()
    heights = kept["height"].to_numpy(np.int64)
    widths = kept["width"].to_numpy(np.int64)
    areas = kept["mask_area"].to_numpy(np.int64)
    totals, foreground, well_formed = rle_run_totals(strings)
    bad = ~well_formed | (totals != heights * widths) | (foreground != areas)
    for i in np.flatnonzero(bad):
        if not well_formed[i]:
            fail(i, "empty RLE string" if not strings[i] else "malformed RLE string")
        elif totals[i] != heights[i] * widths[i]:
            fail(
                i,
                f"runs cover {totals[i]} pixels, size {heights[i]}x{widths[i]} needs {heights[i] * widths[i]}",
            )
        else:
            fail(i, f"decodes to {foreground[i]} pixels, mask_area says {areas[i]}")
    for i in np.unique(np.linspace(0, len(kept) - 1, num=min(decode_sample, len(kept))).astype(int)):
        if bad[i]:  # already reported
            continue
        try:
            mask = mask_utils.decode(rle_object(strings[i], heights[i], widths[i]))
        except ValueError as exc:
            fail(i, f"pycocotools cannot decode it: {exc}")
            continue
        if mask.shape != (heights[i], widths[i]) or int(np.count_nonzero(mask)) != areas[i]:
            fail(i, f"pycocotools decodes a {mask.shape} mask with {int(np.count_nonzero(mask))} pixels")
    return RleCheck(checked=len(kept), failures=failures, num_failures=count)


def image_mask_fractions(kept: pd.DataFrame) -> pd.Series:
    """Fraction of each labelled image covered by the union of its kept masks (indexed by image_id).

    Single-instance images use the stored area; overlapping instances are merged as RLEs
    (pycocotools, no decoding) so overlaps are not double-counted.
    """
    if kept.empty:
        return pd.Series(dtype=np.float64, name="mask_fraction")
    frame = kept.sort_values("image_id", kind="stable")
    ids = frame["image_id"].to_numpy(dtype=object)
    starts = np.flatnonzero(np.r_[True, ids[1:] != ids[:-1]])
    ends = np.r_[starts[1:], len(ids)]
    heights = frame["height"].to_numpy(np.int64)
    widths = frame["width"].to_numpy(np.int64)
    covered = frame["mask_area"].to_numpy(np.float64)[starts]
    counts = frame["rle_counts"].tolist()
    for g in np.flatnonzero(ends - starts > 1):  # only images with several instances need a merge
        s, e = starts[g], ends[g]
        covered[g] = union_area([rle_object(counts[j], heights[s], widths[s]) for j in range(s, e)])
    return pd.Series(covered / (heights[starts] * widths[starts]), index=ids[starts], name="mask_fraction")


def within(value: float, low: float, high: float) -> bool:
    return bool(low <= value <= high)
