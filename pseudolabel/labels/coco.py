"""Kept instances -> a COCO instance-segmentation dict (RLE segmentation), and loading it back.

Annotation ``area`` and ``bbox`` are computed from the RLE itself with pycocotools (no decoding),
so they describe the mask exactly, whatever the stored columns say.
"""

from __future__ import annotations

import contextlib
import io
import json
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import pandas as pd
from pycocotools.coco import COCO

from pseudolabel.rle import rle_areas, rle_bboxes, rle_objects

EMPTY_PHRASE_NAME = "object"  # COCO categories need a name; the detector may return an empty phrase


def category_names(phrases: Iterable[str | None]) -> list[str]:
    """Sorted unique category names; pass *all* candidate phrases so ids stay stable across thresholds."""
    series = phrases if isinstance(phrases, pd.Series) else pd.Series(list(phrases), dtype=object)
    return sorted({p if isinstance(p, str) and p else EMPTY_PHRASE_NAME for p in series.unique()})


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
    category_id = {name: i for i, name in enumerate(categories, start=1)}

    image_records = []
    extra = {field: images[field].tolist() for field in image_fields}
    columns = (images[c].tolist() for c in ("image_id", "file_name", "width", "height"))
    for i, (image_id, file_name, width, height) in enumerate(zip(*columns, strict=True)):
        record = {
            "id": i + 1,
            "file_name": file_name,
            "width": int(width),
            "height": int(height),
            "pseudolabel_image_id": image_id,
        }
        record.update({field: values[i] for field, values in extra.items()})
        image_records.append(record)

    rles = rle_objects(kept["rle_counts"].tolist(), kept["height"].tolist(), kept["width"].tolist())
    areas = rle_areas(rles).tolist()
    bboxes = rle_bboxes(rles).tolist()
    missing = set(kept["image_id"]) - set(coco_image_id.index)
    if missing:
        raise ValueError(f"{len(missing)} kept image(s) not in images, e.g. {sorted(missing)[:3]}")
    annotation_image_ids = coco_image_id.loc[kept["image_id"].to_numpy()].tolist()
    annotations = []
    for i, row in enumerate(
        zip(
            annotation_image_ids,
            kept["phrase"].fillna("").tolist(),
            kept["candidate_id"].tolist(),
            kept["box_score"].tolist(),
            kept["text_score"].tolist(),
            kept["mask_score"].tolist(),
            strict=True,
        )
    ):
        image_id, phrase, candidate_id, box_score, text_score, mask_score = row
        annotations.append(
            {
                "id": i + 1,
                "image_id": image_id,
                "category_id": category_id[phrase or EMPTY_PHRASE_NAME],
                "segmentation": {"size": rles[i]["size"], "counts": rles[i]["counts"].decode("ascii")},
                "area": float(areas[i]),
                "bbox": [float(v) for v in bboxes[i]],
                "iscrowd": 0,
                "candidate_id": int(candidate_id),
                "box_score": round(float(box_score), 6),
                "text_score": round(float(text_score), 6),
                "mask_score": round(float(mask_score), 6),
            }
        )
    return {
        "info": info or {},
        "licenses": [],
        "images": image_records,
        "categories": [{"id": i, "name": name, "supercategory": ""} for name, i in category_id.items()],
        "annotations": annotations,
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
