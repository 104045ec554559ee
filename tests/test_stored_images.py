"""A re-run reuses every stored JPEG, whatever the index parts recorded: the row is rebuilt from the object.

A normalised JPEG carries its source's EXIF orientation in a comment segment, so the object alone gives
its whole index row (:func:`read_stored`); :func:`process_shard` rebuilds the rows of stored images no
usable row covers and fetches only what was never stored (on both storage backends).
"""

from __future__ import annotations

import io

import numpy as np
import piexif
import pytest
from images import random_jpeg
from PIL import Image

from pseudolabel import layout
from pseudolabel.ids import image_id_for_url
from pseudolabel.images.download import DownloadPolicy
from pseudolabel.images.index import QUARANTINED, SampleItem, index_table
from pseudolabel.images.normalize import NormalizeOptions, normalize_image, read_stored
from pseudolabel.images.shard import ShardOptions, process_shard
from pseudolabel.storage import read_parquet, write_parquet

SHARD = "shard-00000"


def jpeg(
    width: int, height: int, seed: int, orientation: int | None = None, comment: bytes | None = None
) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    extra: dict[str, bytes] = {}
    if orientation is not None:
        extra["exif"] = piexif.dump({"0th": {piexif.ImageIFD.Orientation: orientation}})
    if comment is not None:
        extra["comment"] = comment
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG", quality=90, **extra)
    return buffer.getvalue()


@pytest.mark.parametrize("orientation", range(1, 9))
def test_a_stored_jpeg_describes_itself(orientation):
    made = normalize_image(jpeg(48, 32, orientation, orientation=orientation), NormalizeOptions(max_side=40))

    stored = read_stored(made.jpeg)

    assert stored is not None
    assert (stored.width, stored.height) == (made.width, made.height)
    assert (made.width, made.height) == ((40, 27) if orientation < 5 else (27, 40))  # upright, fitted
    assert stored.original_orientation == made.original_orientation == orientation
    assert (stored.bytes, stored.sha256) == (len(made.jpeg), made.sha256)


def test_only_jpegs_this_stage_made_describe_themselves():
    made = normalize_image(jpeg(32, 24, 1, orientation=6)).jpeg
    png = io.BytesIO()
    Image.new("RGB", (8, 8)).save(png, "PNG")

    assert read_stored(jpeg(32, 24, 2)) is None  # no comment: an older version's, or not ours
    assert read_stored(jpeg(32, 24, 2, comment=b"made by a camera")) is None
    assert read_stored(made[:-200]) is None  # cut short
    assert read_stored(png.getvalue()) is None and read_stored(b"") is None
    # A source cannot forge the marker: normalising replaces its comment with the real orientation.
    forged = normalize_image(jpeg(32, 24, 3, comment=b"pseudolabel:original_orientation=6")).jpeg
    assert read_stored(forged).original_orientation == 1


# -- process_shard rebuilds the rows of stored images no row recorded --------------------------------


def options() -> ShardOptions:
    return ShardOptions(download=DownloadPolicy(concurrency=4, max_retries=0), decode_workers=2)


def served(dev_server, images: dict[str, bytes]):
    server = dev_server(images=images)
    items = [SampleItem(image_id_for_url(server.image_url(n)), server.image_url(n), "oak") for n in images]
    return server, items


def fetched(server, since: int) -> list[str]:
    return sorted(path.rsplit("/", 1)[1] for path in server.paths("/images/")[since:])


def test_a_rerun_with_no_index_and_no_parts_reuses_every_stored_image(dev_server, store):
    """What a kill before the first part (or an outage that lost every part) leaves: JPEGs and nothing
    else. Also: a vanished JPEG and one an older version stored (no marker) are fetched again."""
    images = {f"p{i}.jpg": random_jpeg(40, 30, seed=i) for i in range(6)}
    images["turned.jpg"] = jpeg(30, 40, 9, orientation=6)
    server, items = served(dev_server, images)
    first = process_shard(store, SHARD, items, options())
    rows = first.index.to_pylist()
    by_name = {item.url.rsplit("/", 1)[1]: item for item in items}
    store.delete(layout.image_index(SHARD))
    store.delete(layout.image(SHARD, by_name["p1.jpg"].image_id))
    store.put_bytes(layout.image(SHARD, by_name["p2.jpg"].image_id), jpeg(40, 30, 2))  # no marker
    before = len(server.paths("/images/"))
    said: list[str] = []

    second = process_shard(store, SHARD, items, options(), progress=said.append)

    assert fetched(server, before) == ["p1.jpg", "p2.jpg"]
    assert (second.rebuilt, second.recovered, second.stats.reused, second.stats.fetched) == (5, 0, 5, 2)
    assert second.index.to_pylist() == rows  # the same index, turned.jpg's orientation 6 included
    assert read_parquet(store, layout.image_index(SHARD)).to_pylist() == rows
    assert second.stats.orientations == {1: 6, 6: 1}
    assert any("5 stored images without a usable index row reused" in line for line in said)


def test_a_stored_image_beats_a_quarantined_row_of_the_last_complete_index(dev_server, store):
    """Run 1 quarantined an image (its server failed); run 2 stored it and was killed before recording
    it: run 3 reuses the stored JPEG instead of trying again."""
    server, items = served(dev_server, {"a.jpg": random_jpeg(40, 30, seed=1)})
    (item,) = items
    stored = process_shard(store, SHARD, items, options()).index.to_pylist()
    quarantined = {**stored[0], "status": QUARANTINED, "error": "http_error: HTTP 503", "width": None}
    write_parquet(store, layout.image_index(SHARD), index_table([quarantined]))
    before = len(server.paths("/images/"))

    again = process_shard(store, SHARD, items, options())

    assert fetched(server, before) == [] and again.rebuilt == 1
    assert again.index.to_pylist() == stored


def test_an_object_under_an_id_that_is_not_the_urls_is_not_trusted(dev_server, store):
    """The key is the URL's content id; a sample row whose id is something else gets no stored object."""
    server, (item,) = served(dev_server, {"a.jpg": random_jpeg(40, 30, seed=1)})
    odd = SampleItem(image_id="not-the-url-id", url=item.url, label="oak")
    store.put_bytes(layout.image(SHARD, odd.image_id), normalize_image(random_jpeg(40, 30, seed=2)).jpeg)

    result = process_shard(store, SHARD, [odd], options())

    assert fetched(server, 0) == ["a.jpg"] and result.rebuilt == 0
    downloaded = normalize_image(random_jpeg(40, 30, seed=1)).sha256  # not the planted object's
    assert result.index.to_pylist()[0]["sha256"] == downloaded
