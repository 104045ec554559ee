"""normalized_images materialized through Dagster on both storage backends (local dir, moto S3)."""

from __future__ import annotations

import hashlib
import io

import numpy as np
import piexif
import pyarrow as pa
import pytest
from images import images_metadata, materialize_images
from PIL import Image

from assets.normalized_images import NormalizedImagesConfig
from pseudolabel import layout
from pseudolabel.ids import image_id_for_url
from pseudolabel.images.index import shard_items
from pseudolabel.images.shard import usable_cpus
from pseudolabel.markdown import markdown_image
from pseudolabel.preview import thumbnail_grid
from pseudolabel.schemas import IMAGE_INDEX, SAMPLE
from pseudolabel.storage import read_parquet, write_parquet
from pseudolabel.testing.servers import Fault

SHARD = "shard-00000"
OTHER_SHARD = "shard-00001"


def jpeg(width: int, height: int, seed: int, orientation: int | None = None) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    params = {"exif": piexif.dump({"0th": {piexif.ImageIFD.Orientation: orientation}})} if orientation else {}
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG", quality=90, **params)
    return buffer.getvalue()


def rgba_png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGBA", (40, 30), (0, 128, 255, 100)).save(buffer, "PNG")
    return buffer.getvalue()


GOOD = {
    "a.jpg": jpeg(64, 48, 1),
    "b.jpg": jpeg(64, 48, 2),
    "c.jpg": jpeg(64, 48, 3),
    "turned.jpg": jpeg(48, 64, 4, orientation=6),
    "alpha.png": rgba_png(),
}


def image_server(dev_server, extra: dict[str, bytes] | None = None):
    return dev_server(images={**GOOD, **(extra or {})})


def write_sample(store, rows: list[tuple[str, str, str]]) -> None:
    """rows: (url, label, shard)."""
    table = pa.Table.from_pylist(
        [
            {
                "image_id": image_id_for_url(url),
                "url": url,
                "label": label,
                "shard": shard,
                "source_id": None,
                "sample_key": n,
            }
            for n, (url, label, shard) in enumerate(rows)
        ],
        schema=SAMPLE,
    )
    write_parquet(store, layout.SAMPLE, table)


def run(storage_resource, **config):
    return materialize_images(storage_resource, SHARD, OTHER_SHARD, **config)


metadata_of = images_metadata


def index_rows(store) -> dict[str, dict]:
    table = read_parquet(store, layout.image_index(SHARD))
    assert table.schema.equals(IMAGE_INDEX)
    return {row["url"].rsplit("/", 1)[1]: row for row in table.to_pylist()}


def test_materializes_a_shard_with_quarantine_on_both_backends(dev_server, storage_resource, store):
    server = image_server(dev_server, {"page.jpg": b"<html>sorry</html>"})
    names = [*GOOD, "page.jpg", "missing.jpg"]
    write_sample(
        store,
        [(server.image_url(n), "oak", SHARD) for n in names]
        + [(server.image_url("a.jpg") + "?x", "oak", OTHER_SHARD)],
    )

    result = run(storage_resource, max_failure_rate=0.5)

    assert result.success
    rows = index_rows(store)
    assert set(rows) == set(names)  # only this shard's items, each once
    for name in GOOD:
        row = rows[name]
        assert row["status"] == "ok" and row["error"] is None
        stored = store.get_bytes(layout.image(SHARD, row["image_id"]))
        assert len(stored) == row["bytes"] and hashlib.sha256(stored).hexdigest() == row["sha256"]
        image = Image.open(io.BytesIO(stored))
        assert image.format == "JPEG" and image.mode == "RGB"
        assert image.size == (row["width"], row["height"])
    assert (
        rows["turned.jpg"]["width"],
        rows["turned.jpg"]["height"],
        rows["turned.jpg"]["original_orientation"],
    ) == (64, 48, 6)
    assert rows["page.jpg"]["status"] == "quarantined" and rows["page.jpg"]["error"].startswith(
        "not_an_image: "
    )
    assert rows["missing.jpg"]["status"] == "quarantined" and rows["missing.jpg"]["error"].startswith(
        "http_error: HTTP 404"
    )
    assert not store.exists(layout.image(SHARD, rows["missing.jpg"]["image_id"]))
    assert not any("?x" in path for path in server.paths())  # the other shard was not touched

    meta = metadata_of(result)
    assert (meta["images_ok"], meta["images_quarantined"], meta["images_reused"], meta["images_fetched"]) == (
        5,
        2,
        0,
        7,
    )
    assert meta["quarantine_counts"] == {"not_an_image": 1, "http_error": 1}
    assert "| not_an_image | 1 |" in meta["quarantine_reasons"]
    assert meta["orientation_histogram"] == {"1": 4, "6": 1}
    assert meta["bytes_downloaded"] == sum(len(GOOD[n]) for n in GOOD) + len(b"<html>sorry</html>")
    assert meta["bytes_stored"] == sum(rows[n]["bytes"] for n in GOOD)
    assert meta["images_per_s"] > 0 and meta["elapsed_s"] >= 0
    preview = meta["preview"]
    assert preview.startswith("![") and "data:image/jpeg;base64," in preview and len(preview) < 100_000


def test_rematerializing_reuses_stored_images_and_refetches_only_what_is_missing(
    dev_server, storage_resource, store
):
    server = image_server(dev_server)
    write_sample(store, [(server.image_url(n), "oak", SHARD) for n in GOOD])
    server.inject("/images/b.jpg", [Fault(status=503)])  # b fails the first run only

    first = run(storage_resource, max_failure_rate=0.5)
    assert first.success
    assert index_rows(store)["b.jpg"]["status"] == "quarantined"
    assert index_rows(store)["b.jpg"]["error"].startswith("http_error: HTTP 503")
    # An ok image whose JPEG vanished must be fetched again too.
    store.delete(layout.image(SHARD, index_rows(store)["c.jpg"]["image_id"]))
    before = len(server.paths("/images/"))

    second = run(storage_resource)

    assert second.success
    assert sorted(server.paths("/images/")[before:]) == ["/images/b.jpg", "/images/c.jpg"]
    assert all(row["status"] == "ok" for row in index_rows(store).values())
    meta = metadata_of(second)
    assert (meta["images_reused"], meta["images_fetched"], meta["images_ok"]) == (3, 2, 5)
    assert meta["reused_from_unfinished_run"] == meta["rebuilt_from_stored_images"] == 0
    assert meta["stale_temp_files_removed"] == 0
    assert meta["orientation_histogram"] == {"1": 4, "6": 1}  # reused rows still counted

    before = len(server.paths("/images/"))
    third = run(storage_resource)
    assert third.success and server.paths("/images/")[before:] == []  # nothing left to fetch
    assert metadata_of(third)["images_reused"] == 5

    # The index lost (a run killed before recording anything leaves only JPEGs): rows rebuilt from them.
    rows = index_rows(store)
    store.delete(layout.image_index(SHARD))
    fourth = run(storage_resource)
    assert fourth.success and server.paths("/images/")[before:] == []
    meta = metadata_of(fourth)
    assert (meta["images_reused"], meta["rebuilt_from_stored_images"], meta["images_fetched"]) == (5, 5, 0)
    assert index_rows(store) == rows and meta["orientation_histogram"] == {"1": 4, "6": 1}


def test_too_many_failures_fail_the_shard_after_writing_the_index(dev_server, storage_resource, store):
    server = image_server(dev_server)
    names = ["a.jpg", "b.jpg", "gone-1.jpg", "gone-2.jpg"]
    write_sample(store, [(server.image_url(n), "oak", SHARD) for n in names])

    result = run(storage_resource)  # default max_failure_rate=0.2; 2 of 4 fail

    assert not result.success
    failure = next(e for e in result.all_events if e.event_type_value == "STEP_FAILURE")
    description = failure.event_specific_data.error.message
    assert "2 of 4 images quarantined" in description and "max_failure_rate" in description
    rows = index_rows(store)  # nothing lost: the good ones are indexed and stored
    assert rows["a.jpg"]["status"] == "ok" and store.exists(layout.image(SHARD, rows["a.jpg"]["image_id"]))
    assert rows["gone-1.jpg"]["status"] == "quarantined"


def test_bombs_and_truncated_images_are_quarantined_by_config(dev_server, storage_resource, store):
    small = jpeg(32, 24, 9)  # within the pixel limit below, so truncation is what trips it
    truncated = small[: len(small) // 2]
    server = image_server(dev_server, {"cut.jpg": truncated})
    write_sample(store, [(server.image_url(n), "oak", SHARD) for n in ["a.jpg", "cut.jpg", "alpha.png"]])

    # a.jpg is 64x48, more pixels than the limit; cut.jpg (32x24) is within it.
    result = run(storage_resource, max_pixels=40 * 30, max_failure_rate=1.0)

    assert result.success
    rows = index_rows(store)
    assert rows["a.jpg"]["error"].startswith("decompression_bomb: ")
    assert rows["cut.jpg"]["error"].startswith("truncated: ")
    assert rows["alpha.png"]["status"] == "ok"


def test_index_records_the_stored_size_after_max_side(dev_server, storage_resource, store):
    server = image_server(dev_server)
    write_sample(store, [(server.image_url(n), "oak", SHARD) for n in ("a.jpg", "turned.jpg")])

    assert run(storage_resource, max_side=32).success

    for row in index_rows(store).values():  # 64x48 and a 48x64 quarter turn: both 64x48 upright
        stored = Image.open(io.BytesIO(store.get_bytes(layout.image(SHARD, row["image_id"]))))
        assert (row["width"], row["height"]) == stored.size == (32, 24)


def test_empty_shard_writes_an_empty_index(storage_resource, store):
    write_sample(store, [("http://127.0.0.1:9/a.jpg", "oak", OTHER_SHARD)])

    result = run(storage_resource)

    assert result.success
    assert read_parquet(store, layout.image_index(SHARD)).num_rows == 0
    assert "preview" not in metadata_of(result)


@pytest.mark.parametrize("field", ["concurrency", "decode_workers", "max_side"])
def test_config_reaches_the_domain_options(field):
    options = NormalizedImagesConfig(**{field: 3}).shard_options()
    reached = {
        "concurrency": options.download.concurrency,
        "decode_workers": options.decode_workers,
        "max_side": options.normalize.max_side,
    }
    assert reached[field] == 3


def test_config_defaults_to_the_working_resolution_and_the_usable_cpus():
    options = NormalizedImagesConfig().shard_options()
    assert options.normalize.max_side == 2048
    assert options.decode_workers == usable_cpus()


def test_preview_of_full_size_photos_stays_small_and_embeds_as_markdown():
    rng = np.random.default_rng(0)  # noise is the worst case for JPEG size
    photos = [Image.fromarray(rng.integers(0, 256, (480, 640, 3), dtype=np.uint8)) for _ in range(8)]

    sheet = thumbnail_grid(photos, tile=128, columns=4)
    markdown = markdown_image(sheet, "shard-00000: first 8 images")

    grid = Image.open(io.BytesIO(sheet))
    assert grid.format == "JPEG" and grid.width > grid.height  # 4 x 2 tiles
    assert len(markdown) < 100_000
    assert markdown.startswith("![shard-00000: first 8 images](data:image/jpeg;base64,")
    assert photos[0].size == (640, 480)  # inputs are not resized in place


def test_markdown_image_detects_png():
    png = thumbnail_grid([Image.new("RGB", (20, 10), "red")], image_format="PNG")
    assert markdown_image(png, "x").startswith("![x](data:image/png;base64,")


def test_shard_items_keeps_sample_order_and_drops_repeated_ids():
    urls = ["http://h/2.jpg", "http://h/1.jpg", "http://h/2.jpg", "http://h/3.jpg"]
    shards = [SHARD, SHARD, SHARD, OTHER_SHARD]
    table = pa.table(
        {
            "image_id": [image_id_for_url(u) for u in urls],
            "url": urls,
            "label": ["a", "b", "a", "c"],
            "shard": shards,
        }
    )

    items = shard_items(table, SHARD)

    assert [item.url for item in items] == ["http://h/2.jpg", "http://h/1.jpg"]
