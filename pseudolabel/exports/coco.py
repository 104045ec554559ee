"""COCO instance segmentation, one file per split, written as batches stream in.

``annotations/instances_<split>.json`` is one JSON object, but its ``images`` and ``annotations`` arrays
grow with the dataset: :class:`CocoSplitWriter` appends each batch's records to two local temporary files
and :meth:`CocoSplitWriter.finish` copies them into the final file between the fixed parts, so memory
holds one batch, never the split. The records are :mod:`pseudolabel.labels.coco`'s (the per-shard COCO
files use the same ones): images and annotations numbered 1.. in stream order, ``file_name`` relative to
``images/<split>/``, ``area`` and ``bbox`` computed from the RLE, scores, ``candidate_id`` and
``verified`` on each annotation. Segmentation is the RLE itself (``{"size": [h, w], "counts": str}``,
``iscrowd`` 0, which pycocotools, CVAT and FiftyOne read) or its outer polygons.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO, Any

import pandas as pd

from pseudolabel.labels.coco import coco_annotations, coco_categories, coco_image_records

SEGMENTATIONS = ("rle", "polygon")
IMAGE_FIELDS = ("model_version",)  # kept on each image record, next to pseudolabel_image_id
ANNOTATION_FIELDS = ("verified",)


def check_segmentation(segmentation: str) -> str:
    if segmentation not in SEGMENTATIONS:
        raise ValueError(f"unknown COCO segmentation {segmentation!r}: choose one of {SEGMENTATIONS}")
    return segmentation


def _append(handle: IO[str], records: list[dict[str, Any]], written: int) -> int:
    """Append ``records`` to a comma-separated JSON array body; returns the new record count."""
    if records:
        body = json.dumps(records, separators=(",", ":"), allow_nan=False)[1:-1]
        handle.write(("," if written else "") + body)
    return written + len(records)


class CocoSplitWriter:
    """One split's COCO file, streamed: :meth:`add` per batch, then :meth:`finish` once."""

    def __init__(self, directory: Path, split: str, categories: Sequence[str]):
        self.split = split
        self.categories = list(categories)
        self._images_path = directory / f"coco-{split}-images.part"
        self._annotations_path = directory / f"coco-{split}-annotations.part"
        self._images = open(self._images_path, "w", encoding="utf-8")  # noqa: SIM115 (closed in finish)
        self._annotations = open(self._annotations_path, "w", encoding="utf-8")  # noqa: SIM115
        self.num_images = 0
        self.num_annotations = 0

    def add(
        self,
        images: pd.DataFrame,
        instances: pd.DataFrame,
        rles: Sequence[dict[str, Any]],
        polygons: Sequence[list[list[float]]] | None = None,
    ) -> None:
        """Append a batch: ``images`` (image_id, width, height, model_version) of this split, and their
        ``instances`` grouped by image in the same order, with ``rles`` their RLE objects. ``polygons``
        (one list of outer polygons per instance) switches the segmentation to polygons."""
        first_image = self.num_images + 1
        records = coco_image_records(
            images.assign(file_name=images["image_id"] + ".jpg"),
            first_id=first_image,
            image_fields=IMAGE_FIELDS,
        )
        coco_id = pd.Series(
            range(first_image, first_image + len(images)), index=images["image_id"].to_numpy()
        )
        annotations = coco_annotations(
            instances,
            coco_id.loc[instances["image_id"].to_numpy()].tolist(),
            self.categories,
            first_id=self.num_annotations + 1,
            rles=rles,
            extra_fields=ANNOTATION_FIELDS,
        )
        if polygons is not None:
            for annotation, polygon in zip(annotations, polygons, strict=True):
                annotation["segmentation"] = polygon
        self.num_images = _append(self._images, records, self.num_images)
        self.num_annotations = _append(self._annotations, annotations, self.num_annotations)

    def finish(self, path: Path, info: Mapping[str, Any]) -> Path:
        """Assemble the split's COCO JSON at ``path`` (streamed copies of the parts) and return it."""
        self._images.close()
        self._annotations.close()
        head = {"info": dict(info), "licenses": [], "categories": coco_categories(self.categories)}
        with open(path, "w", encoding="utf-8") as out:
            out.write(json.dumps(head, separators=(",", ":"), allow_nan=False, default=str)[:-1])
            for name, part in (("images", self._images_path), ("annotations", self._annotations_path)):
                out.write(f',"{name}":[')
                with open(part, encoding="utf-8") as handle:
                    shutil.copyfileobj(handle, out, 1 << 20)
                out.write("]")
            out.write("}")
        self._images_path.unlink()
        self._annotations_path.unlink()
        return path

    def close(self) -> None:
        """Close the temporary files (after a failure; :meth:`finish` closes them otherwise)."""
        self._images.close()
        self._annotations.close()
