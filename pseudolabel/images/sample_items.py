"""The rows of the stratified sample that one shard must turn into images."""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc

SAMPLE_COLUMNS = ["image_id", "url", "label", "shard"]  # all this stage reads from the sample


@dataclass(frozen=True)
class SampleItem:
    image_id: str
    url: str
    label: str


def shard_items(sample: pa.Table, shard: str) -> list[SampleItem]:
    """The shard's items in sample order, each ``image_id`` once (a repeat would race on one key)."""
    rows = sample.filter(pc.equal(sample["shard"], shard)).select(["image_id", "url", "label"]).to_pylist()
    seen: set[str] = set()
    items = []
    for row in rows:
        if row["image_id"] not in seen:
            seen.add(row["image_id"])
            items.append(SampleItem(image_id=row["image_id"], url=row["url"], label=row["label"]))
    return items
