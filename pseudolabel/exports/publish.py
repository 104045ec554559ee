"""Write one versioned export of the pseudo-labels in the formats people train and review with.

Layout (keys from :mod:`pseudolabel.layout`; every version is complete in itself)::

    exports/CURRENT.json                                  pointer: {"version", "root", ...} (written last)
    exports/versions/<v>/images/<split>/<image_id>.jpg    the source JPEG (COCO and YOLO share it)
    exports/versions/<v>/annotations/instances_<split>.json   COCO instance segmentation   (coco)
    exports/versions/<v>/labels/<split>/<image_id>.txt    Ultralytics YOLO-seg labels      (yolo)
    exports/versions/<v>/data.yaml                        Ultralytics dataset file         (yolo)
    exports/versions/<v>/label_studio/tasks_<split>.json  Label Studio tasks + predictions (label_studio)
    exports/versions/<v>/label_studio/label_config.xml    the labelling config they fit    (label_studio)

Streaming: the batches (one per shard) are read one at a time and nothing accumulates per image: image
copies and label files are written as a batch arrives, the per-split JSON files (COCO, Label Studio) grow
in local temporary files and are uploaded whole at the end (``ObjectStore.put_file``, streamed).

Publishing works like :mod:`pseudolabel.dataset.publish`: a version is written under its own root and
never modified after ``CURRENT.json`` names it; any failure deletes what was written of it, so a version
either exists complete or not at all; the pointer is replaced in one atomic PUT, last; the previous
``keep_versions - 1`` versions stay for readers still using them, older ones are deleted after the flip.
An existing version is refused.
"""

from __future__ import annotations

import json
import re
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

import numpy as np
import pandas as pd
from pycocotools import mask as mask_utils

from pseudolabel import layout
from pseudolabel.exports import label_studio, yolo
from pseudolabel.exports.coco import CocoSplitWriter, check_segmentation
from pseudolabel.labels.coco import category_ids
from pseudolabel.rle import polygons as rle_polygons
from pseudolabel.rle import rle_areas, rle_objects
from pseudolabel.storage import ObjectNotFound, ObjectStore

FORMATS = ("coco", "yolo", "label_studio")
SPLITS = ("train", "val", "test")
IMAGE_COLUMNS = ("image_id", "split", "source_key", "width", "height", "model_version")
INSTANCE_COLUMNS = (
    "image_id",
    "candidate_id",
    "phrase",
    "rle_counts",
    "height",
    "width",
    "box_score",
    "text_score",
    "mask_score",
    "verified",
)
CURRENT_KEY = layout.EXPORTS_CURRENT
MAX_REPORTED_SKIPS = 20
_VERSION = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


@dataclass(frozen=True)
class ExportBatch:
    """One shard's part of the export.

    ``images``: one row per image (IMAGE_COLUMNS: image_id, split "train"|"val"|"test", source_key = the
    upright JPEG the masks are in, width, height, model_version = the labels' provenance).
    ``instances``: the kept instances of those images (PSEUDO_LABELS columns, at least INSTANCE_COLUMNS;
    ``verified`` marks a human-reviewed mask), masks as COCO compressed RLE in the image's pixel grid.
    """

    images: pd.DataFrame
    instances: pd.DataFrame


@dataclass(frozen=True)
class ExportSummary:
    version: str
    root: str
    images: dict[str, int]  # per split
    instances: dict[str, int]  # per format: annotations / label lines / regions written
    dropped: dict[str, int]  # instances left out, by "<format>_<reason>"
    seconds: float
    skipped_images: int = 0  # images whose source JPEG was missing (left out of every format)
    skipped_examples: list[str] = field(default_factory=list)
    deleted_versions: list[str] = field(default_factory=list)


def read_current_export(store: ObjectStore) -> dict[str, Any] | None:
    """The live export's pointer (``version``, ``root``, ``formats``, ``counts``, ...), None before the first."""
    try:
        return store.get_json(CURRENT_KEY)
    except ObjectNotFound:
        return None


def check_formats(formats: Iterable[str]) -> tuple[str, ...]:
    """The requested formats in canonical order; an unknown or missing one raises ValueError."""
    requested = tuple(formats)
    unknown = [f for f in requested if f not in FORMATS]
    if unknown or not requested:
        raise ValueError(f"unknown export format(s) {unknown or requested!r}: choose from {FORMATS}")
    return tuple(f for f in FORMATS if f in requested)


# -- checks on a batch -----------------------------------------------------------------------------


def _missing(frame: pd.DataFrame, columns: Sequence[str], what: str) -> None:
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise ValueError(f"{what} lack column(s) {missing}")


def checked_batch(batch: ExportBatch, categories: Sequence[str]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The batch's images (index reset) and its instances grouped by image in image order (stable),
    after checking what every format relies on; raises ValueError naming the problem."""
    images, instances = batch.images, batch.instances
    if instances.empty and instances.columns.empty:  # a shard without instances, built from no rows
        instances = pd.DataFrame({c: [] for c in INSTANCE_COLUMNS})
    _missing(images, IMAGE_COLUMNS, "images")
    _missing(instances, INSTANCE_COLUMNS, "instances")
    images = images.reset_index(drop=True)
    bad_splits = sorted(set(images["split"]) - set(SPLITS))
    if bad_splits:
        raise ValueError(f"unknown split(s) {bad_splits}: images go to one of {SPLITS}")
    if not images["image_id"].is_unique:
        raise ValueError("a batch lists an image twice")
    position = pd.Series(np.arange(len(images)), index=images["image_id"].to_numpy())
    unknown = sorted(set(instances["image_id"]) - set(position.index))
    if unknown:
        raise ValueError(f"{len(unknown)} instance image(s) not in the batch's images, e.g. {unknown[:3]}")
    at = position.loc[instances["image_id"].to_numpy()].to_numpy()
    sizes = images[["height", "width"]].to_numpy(np.int64)[at]
    wrong = np.flatnonzero((sizes != instances[["height", "width"]].to_numpy(np.int64)).any(axis=1))
    if len(wrong):
        row = instances.iloc[wrong[0]]
        raise ValueError(
            f"{len(wrong)} mask(s) not in their image's pixel grid, e.g. {row['image_id']}/{row['candidate_id']}: "
            f"mask {row['height']}x{row['width']}, image {sizes[wrong[0]][0]}x{sizes[wrong[0]][1]}"
        )
    category_ids(instances["phrase"].tolist(), categories)  # raises on a phrase outside the categories
    order = np.lexsort((np.arange(len(instances)), at))
    return images, instances.iloc[order].reset_index(drop=True)


# -- the export ------------------------------------------------------------------------------------


@dataclass
class _SplitFiles:
    """What one split accumulates locally while batches stream in."""

    coco: CocoSplitWriter | None = None
    tasks: IO[str] | None = None
    tasks_path: Path | None = None
    num_tasks: int = 0


class _Exporter:
    def __init__(
        self,
        store: ObjectStore,
        root: str,
        *,
        formats: tuple[str, ...],
        categories: Sequence[str],
        image_url: Callable[[str], str],
        coco_segmentation: str,
        label_studio_masks: str,
        workdir: Path,
        pool: ThreadPoolExecutor,
    ):
        self.store, self.root, self.formats = store, root, formats
        self.categories = list(categories)
        self.image_url = image_url
        self.coco_segmentation = coco_segmentation
        self.label_studio_masks = label_studio_masks
        self.workdir, self.pool = workdir, pool
        self.splits: dict[str, _SplitFiles] = {}
        self.images: Counter[str] = Counter()
        self.instances: Counter[str] = Counter({f: 0 for f in formats})
        self.dropped: Counter[str] = Counter()
        self.skipped: list[str] = []
        self.num_skipped = 0

    # What each option needs from every instance.
    @property
    def copies_images(self) -> bool:
        return "coco" in self.formats or "yolo" in self.formats

    @property
    def needs_polygons(self) -> bool:
        return (
            "yolo" in self.formats
            or ("coco" in self.formats and self.coco_segmentation == "polygon")
            or ("label_studio" in self.formats and self.label_studio_masks == "polygon")
        )

    def _split(self, split: str) -> _SplitFiles:
        files = self.splits.get(split)
        if files is None:
            files = self.splits[split] = _SplitFiles()
            if "coco" in self.formats:
                files.coco = CocoSplitWriter(self.workdir, split, self.categories)
            if "label_studio" in self.formats:
                files.tasks_path = self.workdir / f"tasks-{split}.part"
                files.tasks = open(files.tasks_path, "w", encoding="utf-8")  # noqa: SIM115 (closed in finish)
        return files

    def _copy_image(self, image: Mapping[str, Any]) -> str | None:
        """Copy one source JPEG into the version; returns an error for a missing source."""
        try:
            data = self.store.get_bytes(image["source_key"])
        except ObjectNotFound:
            return f"{image['image_id']}: source image {image['source_key']} not found"
        self.store.put_bytes(layout.export_image(self.root, image["split"], image["image_id"]), data)
        return None

    def add(self, batch: ExportBatch) -> None:
        images, instances = checked_batch(batch, self.categories)
        records = images.to_dict("records")
        # The image copies (I/O, in the pool) run while this thread computes what the formats need.
        copies = [self.pool.submit(self._copy_image, r) for r in records] if self.copies_images else []
        rles = rle_objects(
            instances["rle_counts"].tolist(), instances["height"].tolist(), instances["width"].tolist()
        )
        empty = rle_areas(rles) == 0
        outlines = None
        if self.needs_polygons:
            outlines = [rle_polygons(rle) if not e else [] for rle, e in zip(rles, empty, strict=True)]
        classes = np.asarray(category_ids(instances["phrase"].tolist(), self.categories), np.int64) - 1
        errors = [copy.result() for copy in copies]
        failed = [i for i, error in enumerate(errors) if error is not None]
        if failed:  # a missing source image: the image is left out of every format
            self.num_skipped += len(failed)
            self.skipped += [errors[i] for i in failed][: MAX_REPORTED_SKIPS - len(self.skipped)]
            kept = np.flatnonzero(
                ~instances["image_id"].isin(set(images["image_id"].iloc[failed])).to_numpy()
            )
            images = images.drop(index=images.index[failed]).reset_index(drop=True)
            instances = instances.iloc[kept].reset_index(drop=True)
            rles, empty, classes = [rles[i] for i in kept], empty[kept], classes[kept]
            outlines = [outlines[i] for i in kept] if outlines is not None else None
        split_of = dict(zip(images["image_id"], images["split"], strict=True))
        instance_split = instances["image_id"].map(split_of).to_numpy(dtype=object)
        for split, split_images in images.groupby("split", sort=False):
            rows = np.flatnonzero(instance_split == split)
            part = _Part(
                images=split_images.reset_index(drop=True),
                instances=instances.iloc[rows].reset_index(drop=True),
                rles=[rles[i] for i in rows],
                empty=empty[rows],
                outlines=[outlines[i] for i in rows] if outlines is not None else None,
                classes=classes[rows],
            )
            files = self._split(split)
            if "coco" in self.formats:
                self._add_coco(files, part)
            if "yolo" in self.formats:
                self._add_yolo(split, part)
            if "label_studio" in self.formats:
                self._add_label_studio(files, split, part)
            self.images[split] += len(part.images)

    def _add_coco(self, files: _SplitFiles, part: _Part) -> None:
        keep = ~part.empty
        self.dropped["coco_empty_mask"] += int(part.empty.sum())
        polygons = None
        if self.coco_segmentation == "polygon":
            polygons = [part.outlines[i] for i in np.flatnonzero(keep)]
        files.coco.add(
            part.images, part.instances.loc[keep], [part.rles[i] for i in np.flatnonzero(keep)], polygons
        )
        self.instances["coco"] += int(keep.sum())

    def _add_yolo(self, split: str, part: _Part) -> None:
        lines: dict[str, list[str]] = {image_id: [] for image_id in part.images["image_id"]}
        columns = zip(
            part.instances["image_id"], part.instances["width"], part.instances["height"], strict=True
        )
        for i, (image_id, width, height) in enumerate(columns):
            outline = part.outlines[i]
            if sum(len(p) // 2 for p in outline) < 3:  # an empty mask has no outline
                self.dropped["yolo_outline_lt_3_points"] += 1
                continue
            joined = label_studio.mask_outline(outline)
            lines[image_id].append(yolo.label_line(part.classes[i], joined, width, height))
            self.instances["yolo"] += 1
        writes = (
            (layout.export_yolo_labels(self.root, split, image_id), yolo.label_file(image_lines))
            for image_id, image_lines in lines.items()
        )
        for _ in self.pool.map(lambda kv: self.store.put_bytes(*kv), writes):
            pass

    def _add_label_studio(self, files: _SplitFiles, split: str, part: _Part) -> None:
        results: dict[str, list[dict[str, Any]]] = {image_id: [] for image_id in part.images["image_id"]}
        frame = part.instances
        columns = zip(
            frame["image_id"],
            frame["candidate_id"],
            frame["mask_score"],
            frame["width"],
            frame["height"],
            strict=True,
        )
        for i, (image_id, candidate_id, score, width, height) in enumerate(columns):
            label = self.categories[part.classes[i]]
            if self.label_studio_masks == "brush":
                if part.empty[i]:
                    self.dropped["label_studio_empty_mask"] += 1
                    continue
                mask = mask_utils.decode(part.rles[i]).astype(bool)
                item = label_studio.brush_result(mask, candidate_id=candidate_id, label=label, score=score)
            else:
                if sum(len(p) // 2 for p in part.outlines[i]) < 3:
                    self.dropped["label_studio_outline_lt_3_points"] += 1
                    continue
                outline = label_studio.mask_outline(part.outlines[i])
                item = label_studio.polygon_result(
                    outline, candidate_id=candidate_id, label=label, score=score, width=width, height=height
                )
            results[image_id].append(item)
            self.instances["label_studio"] += 1
        tasks = [
            label_studio.task(
                self.image_url(image["source_key"]),
                image_id=image["image_id"],
                split=split,
                results=results[image["image_id"]],
                model_version=str(image["model_version"]),
            )
            for image in part.images.to_dict("records")
        ]
        if tasks:
            body = json.dumps(tasks, separators=(",", ":"), allow_nan=False)[1:-1]
            files.tasks.write(("," if files.num_tasks else "") + body)
            files.num_tasks += len(tasks)

    def finish(self, info: Mapping[str, Any]) -> None:
        """Upload the per-split files and data.yaml (everything of the version not written yet)."""
        for split, files in self.splits.items():
            if files.coco is not None:
                path = files.coco.finish(self.workdir / f"instances_{split}.json", info)
                self.store.put_file(layout.export_coco(self.root, split), path)
                path.unlink()
            if files.tasks is not None:
                files.tasks.close()
                final = self.workdir / f"tasks_{split}.json"
                with (
                    open(final, "w", encoding="utf-8") as out,
                    open(files.tasks_path, encoding="utf-8") as part,
                ):
                    out.write("[")
                    while chunk := part.read(1 << 20):
                        out.write(chunk)
                    out.write("]")
                self.store.put_file(layout.export_label_studio_tasks(self.root, split), final)
                final.unlink()
        if "label_studio" in self.formats:
            self.store.put_text(
                layout.export_label_studio_config(self.root),
                label_studio.label_config(self.categories, self.label_studio_masks),
            )
        if "yolo" in self.formats:
            splits = [s for s in SPLITS if s in self.splits]
            self.store.put_text(layout.export_data_yaml(self.root), yolo.data_yaml(self.categories, splits))

    def close(self) -> None:
        for files in self.splits.values():
            if files.coco is not None:
                files.coco.close()
            if files.tasks is not None:
                files.tasks.close()


@dataclass(frozen=True)
class _Part:
    """One split's share of a batch, instances grouped by image, with what the formats need of them."""

    images: pd.DataFrame
    instances: pd.DataFrame
    rles: list[dict[str, Any]]
    empty: np.ndarray  # (n,) bool: masks without a pixel
    outlines: list[list[list[float]]] | None  # rle.polygons of each instance, when a format needs them
    classes: np.ndarray  # (n,) 0-based class index


def export_dataset(
    store: ObjectStore,
    batches: Iterable[ExportBatch],
    *,
    version: str,
    categories: Sequence[str],
    image_url: Callable[[str], str],
    formats: Iterable[str] = FORMATS,
    coco_segmentation: str = "rle",
    label_studio_masks: str = "brush",
    info: Mapping[str, Any] | None = None,
    keep_versions: int = 2,
    workers: int = 8,
    log: Callable[[str], None] = lambda _msg: None,
) -> ExportSummary:
    """Export ``batches`` (read one at a time) as version ``version`` in ``formats``, then point
    ``exports/CURRENT.json`` at it (see the module docstring).

    ``categories``: the class names, sorted (an empty phrase is ``EMPTY_PHRASE_NAME``): COCO category
    ids 1.., YOLO classes 0.., Label Studio labels. ``image_url(source_key)``: where Label Studio loads
    an image from. ``coco_segmentation``: "rle" or "polygon"; ``label_studio_masks``: "brush" or
    "polygon". ``workers``: threads copying images and writing label files (I/O).
    Images whose source JPEG is missing are left out of every format and reported; empty masks (no
    pixel, no outline) are dropped and counted per format.
    """
    started = time.perf_counter()
    formats = check_formats(formats)
    coco_segmentation = check_segmentation(coco_segmentation)
    label_studio_masks = label_studio.check_mask_format(label_studio_masks)
    if keep_versions < 1:
        raise ValueError("keep_versions must be >= 1")
    if not _VERSION.fullmatch(version):
        raise ValueError(f"version {version!r} must be letters, digits, '.', '_' or '-' (a key component)")
    if len(set(categories)) != len(categories):
        raise ValueError("categories must be unique")
    root = layout.exports_version_root(version)
    if any(True for _ in store.list(root + "/")):
        raise ValueError(f"version {version} already exists in {store.uri(root)}")
    info = dict(info or {})

    try:
        with (
            tempfile.TemporaryDirectory(prefix="pseudolabel-export-") as workdir,
            ThreadPoolExecutor(max_workers=max(1, workers)) as pool,
        ):
            exporter = _Exporter(
                store,
                root,
                formats=formats,
                categories=categories,
                image_url=image_url,
                coco_segmentation=coco_segmentation,
                label_studio_masks=label_studio_masks,
                workdir=Path(workdir),
                pool=pool,
            )
            try:
                for number, batch in enumerate(batches, start=1):
                    exporter.add(batch)
                    log(
                        f"batch {number}: {sum(exporter.images.values())} images exported so far "
                        f"{dict(exporter.images)}, {exporter.num_skipped} skipped"
                    )
                if not exporter.images:
                    raise ValueError(
                        f"nothing to export: no image in any batch ({exporter.num_skipped} skipped)"
                    )
                exporter.finish(info)
            finally:
                exporter.close()
    except BaseException:
        store.delete_prefix(root + "/")  # never leave a half-written version behind
        raise

    images = {s: exporter.images[s] for s in SPLITS if s in exporter.images}
    counts = {
        "images": images,
        "instances": dict(exporter.instances),
        "dropped": dict(exporter.dropped),
        "skipped_images": exporter.num_skipped,
    }
    options = {
        "coco": {"segmentation": coco_segmentation},
        "yolo": {},
        "label_studio": {"masks": label_studio_masks},
    }
    deleted = _flip_pointer(
        store, version, root, {f: options[f] for f in formats}, counts, info, keep_versions
    )
    summary = ExportSummary(
        version=version,
        root=root,
        images=images,
        instances=dict(exporter.instances),
        dropped=dict(exporter.dropped),
        seconds=round(time.perf_counter() - started, 3),
        skipped_images=exporter.num_skipped,
        skipped_examples=exporter.skipped,
        deleted_versions=deleted,
    )
    log(f"export {version}: {images} images, {summary.instances} instances, dropped {summary.dropped}")
    return summary


def _flip_pointer(
    store: ObjectStore,
    version: str,
    root: str,
    formats: dict[str, dict[str, str]],
    counts: dict[str, Any],
    info: Mapping[str, Any],
    keep_versions: int,
) -> list[str]:
    previous = read_current_export(store)
    history = [{"version": version, "root": root}]
    if previous:
        history += [h for h in previous.get("history", []) if h["version"] != version]
    store.put_json(
        CURRENT_KEY,
        {
            "version": version,
            "root": root,
            "created_at": datetime.now(UTC).isoformat(),
            "formats": formats,
            "counts": counts,
            "info": dict(info),
            "history": history[:keep_versions],
        },
    )
    deleted = []
    for old in history[keep_versions:]:  # only after the flip: no reader is sent there any more
        store.delete_prefix(old["root"] + "/")
        deleted.append(old["version"])
    return deleted
