"""The per-shard image index (``schemas.IMAGE_INDEX``): building rows, and what a rerun may reuse."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from typing import Any

import pyarrow as pa

from pseudolabel import layout
from pseudolabel.images.errors import ImageRejected
from pseudolabel.images.normalize import NormalizedImage
from pseudolabel.images.sample_items import SampleItem
from pseudolabel.schemas import IMAGE_INDEX
from pseudolabel.storage import ObjectNotFound, ObjectStore, read_parquet

logger = logging.getLogger(__name__)

OK = "ok"
QUARANTINED = "quarantined"

IndexRow = dict[str, Any]


def ok_row(item: SampleItem, image: NormalizedImage) -> IndexRow:
    return {
        "image_id": item.image_id,
        "url": item.url,
        "label": item.label,
        "width": image.width,
        "height": image.height,
        "original_orientation": image.original_orientation,
        "bytes": len(image.jpeg),
        "sha256": image.sha256,
        "status": OK,
        "error": None,
    }


def quarantined_row(item: SampleItem, rejection: ImageRejected) -> IndexRow:
    return {
        "image_id": item.image_id,
        "url": item.url,
        "label": item.label,
        "width": None,
        "height": None,
        "original_orientation": None,
        "bytes": None,
        "sha256": None,
        "status": QUARANTINED,
        "error": rejection.message,
    }


def index_table(rows: Iterable[IndexRow]) -> pa.Table:
    return pa.Table.from_pylist(list(rows), schema=IMAGE_INDEX)


def read_previous_index(store: ObjectStore, shard: str) -> pa.Table | None:
    """The index an earlier run wrote, or None (first run, or an unreadable file: then refetch all)."""
    try:
        return read_parquet(store, layout.image_index(shard))
    except ObjectNotFound:
        return None
    except Exception as exc:
        logger.warning("ignoring unreadable image index for %s: %s", shard, exc)
        return None


def reusable_rows(
    previous: pa.Table | None, stored_sizes: Mapping[str, int], shard: str, items: Iterable[SampleItem]
) -> dict[str, IndexRow]:
    """Rows of ``items`` that need no download: "ok" before, JPEG still stored with the recorded size.

    ``stored_sizes`` maps keys to sizes from one listing of the shard's image prefix, so
    checking a shard costs one LIST, not one request per image.
    """
    if previous is None or previous.num_rows == 0:
        return {}
    wanted = {item.image_id: item for item in items}
    reusable: dict[str, IndexRow] = {}
    for row in previous.to_pylist():
        item = wanted.get(row["image_id"])
        if item is None or row["status"] != OK or row["url"] != item.url:
            continue
        if stored_sizes.get(layout.image(shard, item.image_id)) != row["bytes"]:
            continue
        reusable[item.image_id] = {**row, "label": item.label}  # the sample's label is authoritative
    return reusable
