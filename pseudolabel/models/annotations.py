"""Boxes and clicks read from an annotation file, served as a detector ("box to segmentation").

No model runs: :class:`AnnotationPrompter` looks each image up in a COCO ``.json`` or a ``.jsonl``
file and returns its annotated objects as :class:`Candidates`, which the segmenter turns into masks.
Only numpy, Pillow and the standard library are used, so this backend runs on the orchestrator's
interpreter (``ENVIRONMENTS["annotations"] is None``).

Formats (chosen by the file suffix)
-----------------------------------
``.json``: COCO. ``images[{id, file_name, coco_url? | url? | flickr_url?, width, height}]``,
``annotations[{id?, image_id, bbox: [x, y, w, h]?, category_id?, score?, ...}]``,
``categories[{id, name}]``. Clicks, per annotation, either as the extension
``"points": [[x, y], ...]`` with ``"point_labels": [1, 0, ...]`` (1 = object, 0 = background;
default all 1), or as COCO ``"keypoints": [x, y, v, ...]`` (every keypoint with v > 0 is a
positive click). ``iscrowd: 1`` annotations (one box around a crowd) are skipped and counted.

``.jsonl``: one JSON object per line, one line per image; ``objects`` aligned by index::

    {"image": "https://x/a.jpg", "boxes": [[10, 20, 110, 220]], "labels": ["tree"]}
    {"image": "b.jpg", "points": [[[50, 60], [80, 90]]], "point_labels": [[1, 0]]}
    {"image": "3f2a9c0d1e4b5a67", "width": 640, "height": 480,
     "boxes": [[0, 0, 50, 50], [60, 60, 90, 90]], "points": [[[25, 25]], []], "scores": [0.9, null]}

``image`` (required) is a URL, an image id or a file name (see matching). ``boxes`` are
``[x0, y0, x1, y1]``; ``points`` is one list of ``[x, y]`` clicks per object and ``point_labels``
one list of 0/1 per object (default all 1). A row gives boxes only, points only (every object needs
a positive click) or both (box + clicks per object; ``[]`` = no clicks for that one). ``labels``
(phrase per object, default "object"), ``scores`` (number or null per object), ``width`` and
``height`` are optional. Other keys are errors, so a misspelt ``"box"`` cannot silently drop
objects. A row with no objects marks an image annotated as empty.

Coordinates and sizes
---------------------
Coordinates are pixels of the image AS STORED by ``normalized_images``: turned upright by its EXIF
orientation and downscaled to ``max_side``. A file that gives an image's width/height (COCO always
does) is checked against the stored image: a different size is an error naming the likely cause
(EXIF rotation, downscaling), never silently rescaled. Boxes crossing the image border are clipped
to it and counted (``boxes_clipped``); a box entirely outside the image, or a click outside it, is
an error. For JSONL rows without a size these checks run when the image is read.

Matching images (``match_on``)
------------------------------
``"url"``: the image's source URL (``PreparedImage.url``) equals the file's ``image`` / any COCO URL
field. ``"image_id"``: our image id equals ``image`` / ``str(COCO id)``. ``"file_name"``: the last
path segment of the URL (percent-decoded) equals that of ``image`` / the COCO ``file_name``.
``"auto"``: url, then image_id, then file_name, the first that matches. A key naming two entries of
the file is an error (at load time for an explicit ``match_on``, when met for ``auto``). Images
that match nothing get zero candidates; :meth:`AnnotationPrompter.match_report` counts them and
the file's entries no image matched.

Errors
------
Malformed content fails at load time, before any image is read, with an :class:`AnnotationError`
naming the file, the line (JSONL) or annotation id (COCO) and what is wrong, listing the first
:data:`MAX_LISTED_PROBLEMS` problems: invalid JSON, bad box length, non-positive width/height,
non-numeric or non-finite numbers, point labels other than 0/1, points/labels length mismatches,
unknown category or image ids, duplicate images, unknown JSONL keys.

Scores and prompts
------------------
``box_score``: the file's score, NaN when it gives none (no box threshold applies downstream).
``text_score``: always NaN. ``phrase``: the category name / label, "object" without one.
``query_index``: the object's position in the file for its image. Candidates are sorted by score
(NaN last, file order otherwise) and cut at ``max_candidates`` (cuts counted in the report). The
captions and the score floors of the detection settings are not used: every object in the file is
kept, and the file's categories are the classes.

``prompt_mode`` decides what reaches the segmenter. "box": objects with a box are prompted with it
alone. "point": only clicks (``box_prompt`` False); an object with a box but no clicks gets one
positive click at the box centre. "box+point": the box and the clicks. Point-only objects are
always prompted with their clicks; their stored box is the extent of their positive clicks. Objects
with a box keep it as their stored box in every mode (it is then the object's extent, a prompt or not).
"""

from __future__ import annotations

import hashlib
import io
import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

import numpy as np
from PIL import Image

from pseudolabel.models.interfaces import Candidates, PreparedImage
from pseudolabel.models.loading import ANNOTATIONS, DetectorSpec, ModelConfigError
from pseudolabel.storage import ObjectNotFound, S3ObjectStore, parse_s3_uri

COCO, JSONL = "coco", "jsonl"
FORMATS = {".json": COCO, ".jsonl": JSONL}
MATCH_ORDER = ("url", "image_id", "file_name")  # what "auto" tries, in order
MAX_LISTED_PROBLEMS = 10
DEFAULT_PHRASE = "object"
JSONL_KEYS = ("image", "width", "height", "boxes", "points", "point_labels", "labels", "scores")
COCO_URL_FIELDS = ("coco_url", "url", "flickr_url")


class AnnotationError(ModelConfigError):
    """The annotation file cannot be used as given; retrying will not help."""


# ---- what the file holds -------------------------------------------------------------------------


@dataclass(frozen=True)
class AnnotatedObject:
    """One object of the file: a box and/or clicks, in the stored image's pixels."""

    box: tuple[float, float, float, float] | None  # x0, y0, x1, y1
    points: tuple[tuple[float, float], ...]  # clicks, () = none
    point_labels: tuple[int, ...]  # 1 object, 0 background, one per click
    label: str
    score: float  # NaN when the file gives none
    where: str  # "line 3, object 1" / "annotation id 17": for messages


@dataclass(frozen=True)
class AnnotatedImage:
    """One image of the file and its objects. ``keys``: match kind -> the file's keys for it."""

    keys: dict[str, tuple[str, ...]]
    objects: tuple[AnnotatedObject, ...]
    where: str  # "line 3" / "image id 7"
    width: int | None = None  # the size the file says the image has, when it says
    height: int | None = None

    @property
    def name(self) -> str:
        """The file's main key for this image (for messages and reports)."""
        for kind in MATCH_ORDER:
            if self.keys.get(kind):
                return self.keys[kind][0]
        return self.where


@dataclass(frozen=True)
class AnnotationFile:
    source: str  # local path or s3:// URI
    format: str  # COCO | JSONL
    sha256: str
    images: tuple[AnnotatedImage, ...]
    crowd_skipped: int = 0  # COCO iscrowd=1 annotations left out
    boxes_clipped: int = 0  # boxes crossing the border of an image of known size, clipped to it

    def counts(self) -> dict[str, int]:
        objects = [obj for image in self.images for obj in image.objects]
        return {
            "images": len(self.images),
            "objects": len(objects),
            "boxes": sum(obj.box is not None for obj in objects),
            "objects_with_clicks": sum(bool(obj.points) for obj in objects),
            "clicks": sum(len(obj.points) for obj in objects),
            "negative_clicks": sum(label == 0 for obj in objects for label in obj.point_labels),
            "crowd_skipped": self.crowd_skipped,
            "boxes_clipped": self.boxes_clipped,
        }


class _Problems:
    """Collects what is wrong with a file, to raise all at once (the first few listed)."""

    def __init__(self, source: str, kind: str) -> None:
        self.source, self.kind = source, kind
        self.found: list[str] = []

    def add(self, where: str, what: str) -> None:
        self.found.append(f"{where}: {what}")

    def raise_any(self) -> None:
        if not self.found:
            return
        listed = "\n".join(f"  - {problem}" for problem in self.found[:MAX_LISTED_PROBLEMS])
        more = len(self.found) - MAX_LISTED_PROBLEMS
        tail = f"\n  ... and {more} more" if more > 0 else ""
        raise AnnotationError(
            f"annotations file {self.source} ({self.kind}): {len(self.found)} problem(s)\n{listed}{tail}"
        )


# ---- reading -------------------------------------------------------------------------------------


def read_source(source: str) -> bytes:
    """The bytes of a local file or an ``s3://`` object (boto3 configured from the environment)."""
    if source.startswith("s3://"):
        import boto3  # deferred: only S3 files need it

        bucket, key = parse_s3_uri(source)
        try:
            return S3ObjectStore(boto3.client("s3"), bucket).get_bytes(key)
        except ObjectNotFound as exc:
            raise AnnotationError(f"annotations file not found: {source}") from exc
    path = Path(source).expanduser()
    if not path.is_file():
        raise AnnotationError(f"annotations file not found: {path}")
    return path.read_bytes()


def parse_annotations(data: bytes, source: str) -> AnnotationFile:
    """Parse a COCO (``.json``) or JSONL (``.jsonl``) file's bytes; ``source`` names it in errors."""
    suffix = "." + source.rsplit(".", 1)[-1].lower() if "." in source else ""
    kind = FORMATS.get(suffix)
    if kind is None:
        raise AnnotationError(
            f"annotations file {source}: unknown format {suffix or '(no suffix)'}; "
            "use .json (COCO) or .jsonl (one JSON object per line)"
        )
    problems = _Problems(source, kind)
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise AnnotationError(f"annotations file {source}: not UTF-8 text ({exc})") from exc
    images, crowd = _read_coco(text, problems) if kind == COCO else (_read_jsonl(text, problems), 0)
    problems.raise_any()
    fitted, clipped = [], 0
    for image in images:
        if image.width is None or image.height is None:
            fitted.append(image)
            continue
        objects, n = _fit_objects(image.objects, image.width, image.height, problems)
        fitted.append(replace(image, objects=objects))
        clipped += n
    problems.raise_any()
    digest = hashlib.sha256(data).hexdigest()
    return AnnotationFile(source, kind, digest, tuple(fitted), crowd_skipped=crowd, boxes_clipped=clipped)


def _read_coco(text: str, problems: _Problems) -> tuple[list[AnnotatedImage], int]:
    """COCO: images, annotations grouped onto them, category ids named. Returns (images, crowd skipped)."""
    try:
        document = json.loads(text)
    except json.JSONDecodeError as exc:
        problems.add(f"line {exc.lineno}", f"invalid JSON ({exc.msg})")
        return [], 0
    if not isinstance(document, dict) or not isinstance(document.get("images"), list):
        problems.add("top level", 'not a COCO object with an "images" list')
        return [], 0
    annotations = document.get("annotations", [])
    if not isinstance(annotations, list):
        problems.add("top level", '"annotations" is not a list')
        return [], 0

    categories = document.get("categories") or []
    if not isinstance(categories, list):
        problems.add("top level", '"categories" is not a list')
        return [], 0
    names: dict[Any, str] = {}
    for i, category in enumerate(categories):
        if (
            not isinstance(category, dict)
            or "id" not in category
            or not isinstance(category.get("name"), str)
        ):
            problems.add(f"category #{i}", 'needs an "id" and a "name"')
            continue
        names[category["id"]] = category["name"]

    order: list[Any] = []  # image ids in file order
    headers: dict[Any, dict[str, Any]] = {}
    for i, image in enumerate(document["images"]):
        where = f"image #{i}"
        if not isinstance(image, dict) or not isinstance(image.get("id"), (int, str)):
            problems.add(where, 'needs an "id" (integer or string)')
            continue
        where = f"image id {image['id']}"
        if image["id"] in headers:
            problems.add(where, "appears twice in images")
            continue
        width, height = image.get("width"), image.get("height")
        if (width is None) != (height is None) or (
            width is not None and not (_positive_int(width) and _positive_int(height))
        ):
            problems.add(where, f"width/height must be positive integers, got {width!r} x {height!r}")
            continue
        urls = tuple(image[f] for f in COCO_URL_FIELDS if isinstance(image.get(f), str) and image[f])
        file_name = image.get("file_name")
        base = file_name_of(file_name, url=False) if isinstance(file_name, str) and file_name else ""
        names_of_file = (base,) if base else tuple(dict.fromkeys(file_name_of(u) for u in urls))
        headers[image["id"]] = {
            "keys": {"url": urls, "image_id": (str(image["id"]),), "file_name": names_of_file},
            "where": where,
            "width": width,
            "height": height,
        }
        order.append(image["id"])

    objects: dict[Any, list[AnnotatedObject]] = {image_id: [] for image_id in order}
    crowd = 0
    for i, annotation in enumerate(annotations):
        if not isinstance(annotation, dict):
            problems.add(f"annotation #{i}", "is not an object")
            continue
        where = f"annotation id {annotation['id']}" if "id" in annotation else f"annotation #{i}"
        if annotation.get("image_id") not in headers:
            problems.add(where, f"image_id {annotation.get('image_id')!r} is not in images")
            continue
        if annotation.get("iscrowd"):
            crowd += 1
            continue
        category = annotation.get("category_id")
        if category is not None and category not in names:
            problems.add(
                where, f"unknown category_id {category!r} (categories: {sorted(names, key=str)[:20]})"
            )
            continue
        box = None
        if annotation.get("bbox") is not None:
            box = _coco_box(annotation["bbox"], where, problems)
            if box is None:
                continue
        clicks = _coco_clicks(annotation, where, problems)
        if clicks is None:
            continue
        score = _score(annotation.get("score"), where, problems)
        if score is None:
            continue
        label = names.get(category, DEFAULT_PHRASE) if category is not None else DEFAULT_PHRASE
        made = _make_object(box, clicks[0], clicks[1], label, score, where, problems)
        if made is not None:
            objects[annotation["image_id"]].append(made)

    images = [
        AnnotatedImage(
            keys=headers[image_id]["keys"],
            objects=tuple(objects[image_id]),
            where=headers[image_id]["where"],
            width=headers[image_id]["width"],
            height=headers[image_id]["height"],
        )
        for image_id in order
    ]
    return images, crowd


def _coco_box(bbox: Any, where: str, problems: _Problems) -> tuple[float, float, float, float] | None:
    if not isinstance(bbox, list) or len(bbox) != 4:
        size = len(bbox) if isinstance(bbox, list) else type(bbox).__name__
        problems.add(where, f"bbox must be 4 numbers [x, y, width, height], got {size}: {bbox!r}")
        return None
    if not all(_number(v) for v in bbox):
        problems.add(where, f"bbox holds a non-number or non-finite value: {bbox!r}")
        return None
    x, y, w, h = (float(v) for v in bbox)
    if w <= 0 or h <= 0:
        which = "width" if w <= 0 else "height"
        problems.add(where, f"bbox {which} must be > 0, got {w if w <= 0 else h:g} in {bbox!r}")
        return None
    return x, y, x + w, y + h


def _coco_clicks(annotation: dict, where: str, problems: _Problems) -> tuple[list, list] | None:
    """(points, labels) of an annotation: the points/point_labels extension or COCO keypoints."""
    has_points, has_keypoints = annotation.get("points") is not None, annotation.get("keypoints") is not None
    if has_points and has_keypoints:
        problems.add(where, 'give clicks as "points" or as "keypoints", not both')
        return None
    if has_keypoints:
        values = annotation["keypoints"]
        if not isinstance(values, list) or len(values) % 3 or not all(_number(v) for v in values):
            problems.add(where, f"keypoints must be numbers [x, y, v, ...] (a multiple of 3), got {values!r}")
            return None
        triples = [values[k : k + 3] for k in range(0, len(values), 3)]
        return [[x, y] for x, y, v in triples if v > 0], [1 for *_, v in triples if v > 0]
    if annotation.get("point_labels") is not None and not has_points:
        problems.add(where, 'point_labels without "points"')
        return None
    if not has_points:
        return [], []
    return _clicks(annotation["points"], annotation.get("point_labels"), where, problems)


def _read_jsonl(text: str, problems: _Problems) -> list[AnnotatedImage]:
    images: list[AnnotatedImage] = []
    seen: dict[str, int] = {}  # image key -> line
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"line {number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            problems.add(where, f"invalid JSON ({exc.msg} at column {exc.colno})")
            continue
        if not isinstance(row, dict):
            problems.add(where, f"expected a JSON object, got {type(row).__name__}")
            continue
        image = _jsonl_row(row, where, problems)
        if image is None:
            continue
        key = image.keys["url"][0]
        if key in seen:
            problems.add(where, f"image {key!r} already given on line {seen[key]} (one line per image)")
            continue
        seen[key] = number
        images.append(image)
    return images


def _jsonl_row(row: dict, where: str, problems: _Problems) -> AnnotatedImage | None:
    unknown = sorted(set(row) - set(JSONL_KEYS))
    if unknown:
        problems.add(where, f"unknown keys {unknown}; known: {list(JSONL_KEYS)}")
        return None
    key = row.get("image")
    if isinstance(key, int) and not isinstance(key, bool):
        key = str(key)
    if not isinstance(key, str) or not key.strip():
        problems.add(where, '"image" (a URL, image id or file name) is required')
        return None
    width, height = row.get("width"), row.get("height")
    if (width is None) != (height is None) or (
        width is not None and not (_positive_int(width) and _positive_int(height))
    ):
        problems.add(where, f"width and height go together as positive integers, got {width!r} x {height!r}")
        return None

    columns = {name: row.get(name) for name in ("boxes", "points", "point_labels", "labels", "scores")}
    for name, values in columns.items():
        if values is not None and not isinstance(values, list):
            problems.add(where, f'"{name}" must be a list (one entry per object), got {values!r}')
            return None
    boxes, points, point_labels = columns["boxes"], columns["points"], columns["point_labels"]
    if point_labels is not None and points is None:
        problems.add(where, '"point_labels" without "points"')
        return None
    count = len(boxes) if boxes is not None else len(points) if points is not None else 0
    for name, values in columns.items():
        if values is not None and len(values) != count:
            problems.add(where, f'{len(values)} "{name}" but {count} objects (lists align by index)')
            return None

    objects = []
    for i in range(count):
        at = f"{where}, object {i}"
        box = _xyxy_box(boxes[i], at, problems) if boxes is not None else None
        if boxes is not None and box is None:
            return None
        if points is not None:
            clicks = _clicks(points[i], point_labels[i] if point_labels is not None else None, at, problems)
            if clicks is None:
                return None
        else:
            clicks = ([], [])
        label = columns["labels"][i] if columns["labels"] is not None else DEFAULT_PHRASE
        if not isinstance(label, str) or not label.strip():
            problems.add(at, f"label must be a non-empty string, got {label!r}")
            return None
        score = _score(columns["scores"][i] if columns["scores"] is not None else None, at, problems)
        if score is None:
            return None
        made = _make_object(box, clicks[0], clicks[1], label.strip(), score, at, problems)
        if made is None:
            return None
        objects.append(made)
    keys = {"url": (key,), "image_id": (key,), "file_name": (file_name_of(key),)}
    return AnnotatedImage(keys, tuple(objects), where, width, height)


def _xyxy_box(box: Any, where: str, problems: _Problems) -> tuple[float, float, float, float] | None:
    if not isinstance(box, list) or len(box) != 4:
        size = len(box) if isinstance(box, list) else type(box).__name__
        problems.add(where, f"box must be 4 numbers [x0, y0, x1, y1], got {size}: {box!r}")
        return None
    if not all(_number(v) for v in box):
        problems.add(where, f"box holds a non-number or non-finite value: {box!r}")
        return None
    x0, y0, x1, y1 = (float(v) for v in box)
    if x1 <= x0 or y1 <= y0:
        which = "width" if x1 <= x0 else "height"
        problems.add(where, f"box {which} must be > 0 (x1 > x0, y1 > y0), got {box!r}")
        return None
    return x0, y0, x1, y1


def _clicks(points: Any, labels: Any, where: str, problems: _Problems) -> tuple[list, list] | None:
    """One object's clicks ``[[x, y], ...]`` and labels (default all 1) -> (points, labels)."""
    if not isinstance(points, list) or not all(
        isinstance(p, list) and len(p) == 2 and all(_number(v) for v in p) for p in points
    ):
        problems.add(where, f"points must be a list of [x, y] number pairs, got {points!r}")
        return None
    if labels is None:
        labels = [1] * len(points)
    if not isinstance(labels, list):
        problems.add(where, f"point_labels must be a list of 0/1, got {labels!r}")
        return None
    if len(labels) != len(points):
        problems.add(where, f"{len(points)} points but {len(labels)} point_labels")
        return None
    bad = [label for label in labels if isinstance(label, bool) or label not in (0, 1)]
    if bad:
        problems.add(where, f"point labels must be 1 (object) or 0 (background), got {bad[0]!r}")
        return None
    return points, labels


def _make_object(
    box: tuple[float, float, float, float] | None,
    points: list,
    labels: list,
    label: str,
    score: float,
    where: str,
    problems: _Problems,
) -> AnnotatedObject | None:
    if box is None and not points:
        problems.add(where, "has neither a box nor clicks")
        return None
    if box is None and 1 not in labels:
        problems.add(where, "clicks without a box need at least one positive (label 1) click")
        return None
    clicks = tuple((float(x), float(y)) for x, y in points)
    return AnnotatedObject(box, clicks, tuple(int(v) for v in labels), label, score, where)


def _score(value: Any, where: str, problems: _Problems) -> float | None:
    """The file's score as a float, NaN when absent; None (and a problem) when malformed."""
    if value is None:
        return math.nan
    if not _number(value):
        problems.add(where, f"score must be a finite number or null, got {value!r}")
        return None
    return float(value)


def _fit_objects(
    objects: Iterable[AnnotatedObject], width: int, height: int, problems: _Problems
) -> tuple[tuple[AnnotatedObject, ...], int]:
    """Objects checked against a ``width`` x ``height`` image: boxes clipped (counted), a box wholly
    outside or a click outside is a problem."""
    fitted, clipped = [], 0
    for obj in objects:
        if any(not (0 <= x <= width and 0 <= y <= height) for x, y in obj.points):
            outside = next((x, y) for x, y in obj.points if not (0 <= x <= width and 0 <= y <= height))
            problems.add(
                obj.where, f"click ({outside[0]:g}, {outside[1]:g}) lies outside the {width}x{height} image"
            )
            continue
        if obj.box is not None:
            x0, y0, x1, y1 = obj.box
            clip_x = lambda x: min(max(x, 0.0), float(width))  # noqa: E731
            clip_y = lambda y: min(max(y, 0.0), float(height))  # noqa: E731
            box = (clip_x(x0), clip_y(y0), clip_x(x1), clip_y(y1))
            if box[2] <= box[0] or box[3] <= box[1]:
                problems.add(
                    obj.where, f"box [{x0:g}, {y0:g}, {x1:g}, {y1:g}] lies outside the {width}x{height} image"
                )
                continue
            if box != obj.box:
                clipped += 1
                obj = replace(obj, box=box)
        fitted.append(obj)
    return tuple(fitted), clipped


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def file_name_of(location: str, *, url: bool = True) -> str:
    """The last path segment: of a URL's path (percent-decoded) or of a plain path / file name."""
    if url and "://" in location:
        return unquote(urlparse(location).path.rstrip("/").rsplit("/", 1)[-1])
    return location.replace("\\", "/").rstrip("/").rsplit("/", 1)[-1]


# ---- matching images to the file -----------------------------------------------------------------


def our_keys(image: PreparedImage) -> dict[str, str]:
    """The keys an image of ours can be found under (empty = it has none of that kind)."""
    return {
        "url": image.url,
        "image_id": image.image_id,
        "file_name": file_name_of(image.url) if image.url else "",
    }


@dataclass
class MatchReport:
    """What matching found so far (across every batch this prompter has seen)."""

    images_seen: int = 0
    images_matched: int = 0
    boxes_clipped: int = 0  # at detect time: images the file gives no size for
    candidates_cut: int = 0  # objects beyond max_candidates, left out
    matched_entries: set[int] = field(default_factory=set)  # positions in the file's images


class AnnotationPrompter:
    """A :class:`~pseudolabel.models.interfaces.Detector` whose candidates come from a file.

    Arguments:
      annotations: the parsed file (:func:`parse_annotations`).
      prompt_mode: "box", "point" or "box+point" (see the module docstring).
      match_on: "auto", "url", "image_id" or "file_name".
      batch_size: images per :meth:`detect` call (only the stage loop's batching; no model).
    """

    def __init__(
        self,
        annotations: AnnotationFile,
        *,
        prompt_mode: str = "box",
        match_on: str = "auto",
        batch_size: int = 8,
    ) -> None:
        self.annotations = annotations
        self.prompt_mode = prompt_mode
        self.match_on = match_on
        self.batch_size = batch_size
        self._kinds = MATCH_ORDER if match_on == "auto" else (match_on,)
        self._index: dict[str, dict[str, list[int]]] = {kind: {} for kind in MATCH_ORDER}
        for position, image in enumerate(annotations.images):
            for kind in MATCH_ORDER:
                for key in dict.fromkeys(image.keys.get(kind, ())):
                    entries = self._index[kind].setdefault(key, [])
                    if position not in entries:
                        entries.append(position)
        if match_on != "auto":
            ambiguous = {k: v for k, v in self._index[match_on].items() if len(v) > 1}
            if ambiguous:
                problems = _Problems(annotations.source, annotations.format)
                for key, positions in ambiguous.items():
                    places = ", ".join(annotations.images[p].where for p in positions)
                    problems.add(f"{match_on} {key!r}", f"names {len(positions)} images ({places})")
                problems.raise_any()
        self._report = MatchReport()

    def describe(self) -> dict[str, Any]:
        """Identity for the stage fingerprint: the file's digest (its path is only where it came from,
        shown as the "checkpoint"), format, counts, matching and prompt mode."""
        return {
            "backend": ANNOTATIONS,
            "model": "annotation file",
            "variant": "",
            "weights": "none",
            "smoke_run": False,
            "checkpoint": self.annotations.source,
            "checkpoint_sha256": self.annotations.sha256,
            "annotation_format": self.annotations.format,
            "annotation_counts": self.annotations.counts(),
            "match_on": self.match_on,
            "prompt_mode": self.prompt_mode,
            "device": "cpu",
            "batch_size": self.batch_size,
        }

    def match_report(self) -> dict[str, Any]:
        """How the images seen so far matched the file (for the worker to log). On one shard the
        unmatched entries are mostly the other shards' images: compare across the whole run."""
        report = self._report
        unmatched = [i for i in range(len(self.annotations.images)) if i not in report.matched_entries]
        return {
            "images_seen": report.images_seen,
            "images_matched": report.images_matched,
            "images_without_annotations": report.images_seen - report.images_matched,
            "file_images": len(self.annotations.images),
            "file_images_unmatched": len(unmatched),
            "file_images_unmatched_examples": [self.annotations.images[i].name for i in unmatched[:5]],
            "boxes_clipped": report.boxes_clipped,
            "candidates_cut": report.candidates_cut,
        }

    def prepare(self, image_id: str, data: bytes) -> PreparedImage:
        """Only the size: PIL reads the header, the pixels are never decoded."""
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
        return PreparedImage(image_id, width, height, None)

    def detect(
        self,
        batch: Sequence[PreparedImage],
        captions: Sequence[str] = (),
        *,
        box_floor: float = 0.05,
        text_floor: float = 0.05,
        max_candidates: int = 300,
    ) -> list[Candidates]:
        """The file's objects of each image (captions and floors unused, see the module docstring)."""
        return [self._candidates(image, max_candidates) for image in batch]

    def find(self, image: PreparedImage) -> int | None:
        """Position of ``image``'s entry in the file, or None."""
        keys = our_keys(image)
        for kind in self._kinds:
            entries = self._index[kind].get(keys[kind], []) if keys[kind] else []
            if len(entries) > 1:
                places = ", ".join(self.annotations.images[p].where for p in entries)
                raise AnnotationError(
                    f"image {image.image_id}: its {kind} {keys[kind]!r} names {len(entries)} images in "
                    f"{self.annotations.source} ({places}); set match_on to a key that is unique there"
                )
            if entries:
                return entries[0]
        return None

    def _candidates(self, prepared: PreparedImage, max_candidates: int) -> Candidates:
        self._report.images_seen += 1
        position = self.find(prepared)
        if position is None:
            return Candidates.empty(prepared.image_id, prepared.width, prepared.height)
        self._report.images_matched += 1
        self._report.matched_entries.add(position)
        entry = self.annotations.images[position]
        objects = self._fit(prepared, entry)
        found = self._to_candidates(prepared, objects)
        if len(found) > max_candidates:
            self._report.candidates_cut += len(found) - max_candidates
        return found.top(max_candidates)

    def _fit(self, prepared: PreparedImage, entry: AnnotatedImage) -> tuple[AnnotatedObject, ...]:
        """The entry's objects on this image: its size checked, or (no size in the file) the
        objects checked and clipped now."""
        size = (prepared.width, prepared.height)
        if entry.width is not None:
            if (entry.width, entry.height) != size:
                raise AnnotationError(_size_message(prepared, entry, self.annotations.source))
            return entry.objects
        problems = _Problems(self.annotations.source, self.annotations.format)
        objects, clipped = _fit_objects(entry.objects, *size, problems)
        problems.raise_any()
        self._report.boxes_clipped += clipped
        return objects

    def _to_candidates(self, prepared: PreparedImage, objects: Sequence[AnnotatedObject]) -> Candidates:
        """Objects -> candidates in file order, with prompts per ``prompt_mode``."""
        n = len(objects)
        boxes = np.zeros((n, 4), np.float32)
        box_prompt = np.ones(n, bool)
        clicks: list[list[tuple[float, float]]] = []
        labels: list[list[int]] = []
        for i, obj in enumerate(objects):
            points, point_labels = list(obj.points), list(obj.point_labels)
            if obj.box is None:  # point-only: always its clicks; stored box = extent of the positive ones
                positive = np.asarray([p for p, v in zip(points, point_labels, strict=True) if v == 1])
                boxes[i] = (*positive.min(axis=0), *positive.max(axis=0))
                box_prompt[i] = False
            else:
                boxes[i] = obj.box
                if self.prompt_mode == "box":
                    points, point_labels = [], []
                elif self.prompt_mode == "point":
                    box_prompt[i] = False
                    if not points:  # a box without clicks: one positive click at its centre
                        x0, y0, x1, y1 = obj.box
                        points, point_labels = [((x0 + x1) / 2, (y0 + y1) / 2)], [1]
            clicks.append(points)
            labels.append(point_labels)
        found = Candidates(
            prepared.image_id,
            prepared.width,
            prepared.height,
            boxes,
            np.asarray([obj.score for obj in objects], np.float32).reshape(n),
            np.full(n, np.nan, np.float32),
            [obj.label for obj in objects],
            np.arange(n, dtype=np.int32),
        )
        width = max((len(row) for row in labels), default=0)
        if width == 0 and box_prompt.all():
            return found
        padded_points = np.zeros((n, width, 2), np.float32)
        padded_labels = np.full((n, width), -1, np.int8)
        for i, (points, point_labels) in enumerate(zip(clicks, labels, strict=True)):
            padded_points[i, : len(points)] = np.asarray(points, np.float32).reshape(-1, 2)
            padded_labels[i, : len(points)] = point_labels
        return found.with_prompts(padded_points, padded_labels, box_prompt)


def _size_message(prepared: PreparedImage, entry: AnnotatedImage, source: str) -> str:
    stored, given = (prepared.width, prepared.height), (entry.width, entry.height)
    message = (
        f"image {prepared.image_id} ({prepared.url or 'no url'}) is stored as {stored[0]}x{stored[1]}, but "
        f"{source} gives {given[0]}x{given[1]} for it ({entry.where}). Annotation coordinates must be in the "
        "stored image's pixels: normalized images are turned upright by their EXIF orientation and "
        "downscaled to max_side."
    )
    if given == (stored[1], stored[0]):
        return (
            message
            + " Width and height are swapped: the file was likely made on the image before EXIF rotation."
        )
    scale = stored[0] / given[0]
    if abs(stored[1] - given[1] * scale) <= 1:
        return message + (
            f" The stored image is {scale:.4g}x the annotated one: scale the coordinates by that factor, "
            "or store the images at their full size (max_side)."
        )
    return message


def load_annotations(spec: DetectorSpec) -> AnnotationPrompter:
    """The ``annotations`` backend: ``spec.annotations`` read (local or s3://) and checked now."""
    if not spec.annotations:
        raise AnnotationError("the annotations backend needs `annotations`: a COCO .json or .jsonl file")
    source = spec.annotations
    annotations = parse_annotations(read_source(source), source)
    return AnnotationPrompter(
        annotations, prompt_mode=spec.prompt_mode, match_on=spec.match_on, batch_size=spec.batch_size
    )
