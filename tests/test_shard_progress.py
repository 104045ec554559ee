"""Progress of a shard's images: index parts, what a rerun reuses from them, and stale temp files."""

from __future__ import annotations

import io
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import boto3
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from dagster import DagsterInstance, materialize
from images import random_jpeg

from assets.normalized_images import normalized_images
from pseudolabel import layout
from pseudolabel.ids import image_id_for_url
from pseudolabel.images.download import DownloadPolicy
from pseudolabel.images.index import (
    OK,
    QUARANTINED,
    IndexJournal,
    SampleItem,
    StoredProgress,
    index_table,
    read_progress,
    reusable_rows,
)
from pseudolabel.images.shard import ShardOptions, process_shard
from pseudolabel.schemas import SAMPLE
from pseudolabel.storage import LocalObjectStore, ObjectStore, S3ObjectStore, read_parquet, write_parquet
from pseudolabel.storage import local as local_storage
from pseudolabel.testing.servers import Fault
from resources.storage import LocalStorageResource

SHARD = "shard-00000"


def item(name: str) -> SampleItem:
    url = f"http://images.example/{name}.jpg"
    return SampleItem(image_id=image_id_for_url(url), url=url, label="oak")


def row(sample: SampleItem, status: str = OK, size: int | None = 10, **changes) -> dict:
    ok = status == OK
    return {
        "image_id": sample.image_id,
        "url": sample.url,
        "label": "old label",
        "width": 4 if ok else None,
        "height": 3 if ok else None,
        "original_orientation": 1 if ok else None,
        "bytes": size if ok else None,
        "sha256": "f" * 64 if ok else None,
        "status": status,
        "error": None if ok else "http_error: HTTP 404",
        **changes,
    }


def test_newest_row_wins_and_only_a_killed_runs_quarantine_is_kept(store):
    a, b, c, d, e, f, g, h = (item(n) for n in "abcdefgh")
    for sample, size in [(a, 10), (b, 20), (c, 30), (e, 99), (f, 50), (h, 10)]:
        store.put_bytes(layout.image(SHARD, sample.image_id), b"x" * size)
    write_parquet(
        store,
        layout.image_index(SHARD),
        index_table([row(a), row(b, QUARANTINED), row(d, QUARANTINED), row(h)]),
    )
    # Part numbers are compared as numbers: 2 is older than 10.
    write_parquet(store, layout.image_index_part(SHARD, 2), index_table([row(b, size=20), row(c, size=30)]))
    write_parquet(
        store,
        layout.image_index_part(SHARD, 10),
        index_table(
            [
                row(c, QUARANTINED),  # newer than part 2's "ok": the killed run's last verdict
                row(e, size=5),  # stored JPEG has another size: not trusted
                row(f, QUARANTINED),
                row(f, size=50),  # a later row of one part wins over an earlier one
                row(g),  # not in this shard's sample any more
                row(h, url="http://elsewhere/h.jpg"),  # newest row is for another URL: not reused
            ]
        ),
    )

    progress = read_progress(store, SHARD)
    sizes = {info.key: info.size for info in store.list(layout.images_dir(SHARD))}
    reuse = reusable_rows(progress, sizes, SHARD, [a, b, c, d, e, f, h])

    assert progress.next_part == 11 and progress.unreadable == []
    assert {image_id: (r["status"], r["bytes"]) for image_id, r in reuse.rows.items()} == {
        a.image_id: (OK, 10),  # index row, JPEG still there
        b.image_id: (OK, 20),  # part over index
        c.image_id: (QUARANTINED, None),  # finished by the killed run: not tried again
        f.image_id: (OK, 50),
    }
    # d: quarantined by a complete run, so retried; e: size mismatch; g: not sampled; h: URL changed.
    assert reuse.from_parts == 3
    assert {r["label"] for r in reuse.rows.values()} == {"oak"}  # the sample's label is authoritative


def test_reusable_rows_of_nothing_is_nothing():
    empty = StoredProgress(index=[], parts=[], next_part=0, unreadable=[])
    assert empty.empty and reusable_rows(empty, {}, SHARD, [item("a")]).rows == {}


def test_journal_writes_parts_every_n_rows_or_when_the_oldest_is_old(tmp_path):
    store = LocalObjectStore(tmp_path)
    journal = IndexJournal(store, SHARD, first_part=7, every=3, interval_s=0.2)
    journal.add(row(item("a")))
    journal.add(row(item("b")))
    assert not journal.due() and 0 < journal.seconds_until_due() <= 0.2
    journal.add(row(item("c")))
    assert journal.due()
    journal.flush()
    journal.add(row(item("d")))
    time.sleep(0.25)
    assert journal.due()
    journal.flush()
    journal.flush()  # nothing buffered: no empty part

    assert [info.key for info in store.list(layout.image_index_parts_dir(SHARD))] == [
        layout.image_index_part(SHARD, 7),
        layout.image_index_part(SHARD, 8),
    ]
    assert journal.recorded == 4

    journal.commit(index_table([row(item("a"))]))
    assert read_parquet(store, layout.image_index(SHARD)).num_rows == 1
    assert list(store.list(layout.image_index_parts_dir(SHARD))) == []
    assert not (tmp_path / "images" / f"{SHARD}.parts").exists()  # no empty folder left behind


# -- process_shard against a real HTTP server ----------------------------------------------------------


def served(dev_server, count: int, **server_options):
    images = {f"p{i}.jpg": random_jpeg(40, 30, seed=i) for i in range(count)}
    server = dev_server(images=images, **server_options)
    items = [
        SampleItem(image_id=image_id_for_url(server.image_url(n)), url=server.image_url(n), label="oak")
        for n in images
    ]
    return server, items


def fetched_names(server, since: int = 0) -> list[str]:
    return sorted(path.rsplit("/", 1)[1] for path in server.paths("/images/")[since:])


def options(**changes) -> ShardOptions:
    return ShardOptions(download=DownloadPolicy(concurrency=4, max_retries=0), decode_workers=2, **changes)


def test_a_cut_short_part_is_ignored_and_its_images_rebuilt_from_storage(dev_server, store):
    server, items = served(dev_server, 8)
    first = process_shard(store, SHARD, items, options())
    rows = {r["image_id"]: r for r in first.index.to_pylist()}
    # What a killed run on a store without atomic writes could leave: one good part, one empty,
    # one cut in half, and no index.
    store.delete(layout.image_index(SHARD))
    good = index_table(rows[i.image_id] for i in items[:4])
    write_parquet(store, layout.image_index_part(SHARD, 0), good)
    store.put_bytes(layout.image_index_part(SHARD, 1), b"")
    whole = io.BytesIO()
    pq.write_table(index_table(rows[i.image_id] for i in items[6:]), whole)
    store.put_bytes(layout.image_index_part(SHARD, 2), whole.getvalue()[: len(whole.getvalue()) // 2])
    before = len(server.paths("/images/"))
    said: list[str] = []

    second = process_shard(store, SHARD, items, options(), progress=said.append)

    # The cut-short part's images are stored: their rows are rebuilt from the objects, none is fetched.
    assert fetched_names(server, before) == []
    assert (second.recovered, second.rebuilt, second.stats.reused) == (4, 4, 8)
    index = read_parquet(store, layout.image_index(SHARD)).to_pylist()
    assert [r["image_id"] for r in index] == [i.image_id for i in items]  # one row per item, in order
    assert [r["sha256"] for r in index] == [rows[i.image_id]["sha256"] for i in items]
    assert list(store.list(layout.image_index_parts_dir(SHARD))) == []
    assert any("unreadable" in line and "000001" in line and "000002" in line for line in said)


def test_rows_are_recorded_while_a_download_stalls(dev_server, store):
    server, items = served(dev_server, 4)
    server.inject("/images/p3.jpg", [Fault(delay_s=30)])  # answers after the client gave up
    shard_options = ShardOptions(
        download=DownloadPolicy(concurrency=4, max_retries=0, timeout_s=3),
        decode_workers=2,
        record_every=100,  # only the interval can write a part here
        record_interval_s=0.2,
    )
    thread = threading.Thread(target=process_shard, args=(store, SHARD, items, shard_options), daemon=True)
    thread.start()
    deadline = time.monotonic() + 2.5  # well before p3's timeout ends the run
    recorded: set[str] = set()
    while time.monotonic() < deadline and len(recorded) < 3:
        progress = read_progress(store, SHARD)
        recorded = {r["image_id"] for part in progress.parts for r in part}
        time.sleep(0.05)

    assert recorded == {i.image_id for i in items[:3]} and thread.is_alive()  # p3 still pending
    thread.join(30)
    index = {r["image_id"]: r for r in read_parquet(store, layout.image_index(SHARD)).to_pylist()}
    assert index[items[3].image_id]["error"].startswith("timeout")
    assert list(store.list(layout.image_index_parts_dir(SHARD))) == []


# -- stale temp files ------------------------------------------------------------------------------


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def temp_name(target: str, pid: int, host: str | None = None) -> str:
    return f".{target}{local_storage.TEMP_MARKER}{host or socket.gethostname()}-{pid}-abc123xy"


def leave_half_written(store: ObjectStore, key: str) -> None:
    """What a writer killed mid-write leaves: a local temp file of a dead pid / an S3 multipart upload."""
    if isinstance(store, LocalObjectStore):
        path = store.root / key
        path.parent.mkdir(parents=True, exist_ok=True)
        (path.parent / temp_name(path.name, dead_pid())).write_bytes(b"half a jpeg")
    else:
        assert isinstance(store, S3ObjectStore)
        full_key = f"{store.prefix}/{key}"
        upload = store.client.create_multipart_upload(Bucket=store.bucket, Key=full_key)
        store.client.upload_part(
            Bucket=store.bucket, Key=full_key, UploadId=upload["UploadId"], PartNumber=1, Body=b"half"
        )


def leftovers(store: ObjectStore) -> list[str]:
    if isinstance(store, LocalObjectStore):
        return sorted(
            p.name for p in store.root.rglob("*") if p.is_file() and local_storage.TEMP_MARKER in p.name
        )
    uploads = store.client.list_multipart_uploads(Bucket=store.bucket).get("Uploads", [])
    return sorted(u["Key"] for u in uploads)


def test_remove_stale_temp_on_each_backend(store):
    store.put_bytes(layout.image(SHARD, "a"), b"stored")
    leave_half_written(store, layout.image(SHARD, "b"))
    leave_half_written(store, layout.image_index_part(SHARD, 3))
    leave_half_written(store, layout.image_index(SHARD))
    leave_half_written(store, layout.image("shard-00001", "c"))

    assert [info.key for info in store.list("images/")] == [layout.image(SHARD, "a")]  # never visible
    assert not store.exists(layout.image(SHARD, "b"))
    assert store.remove_stale_temp("detections/") == 0
    removed = [store.remove_stale_temp(prefix) for prefix in layout.image_step_prefixes(SHARD)]

    assert removed == [1, 1, 1]
    assert len(leftovers(store)) == 1  # the other shard's is not this step's business
    assert store.remove_stale_temp("images/shard-00001/") == 1 and leftovers(store) == []
    assert [info.key for info in store.list("")] == [layout.image(SHARD, "a")]


def test_local_temp_files_are_removed_only_when_their_writer_is_gone(tmp_path):
    store = LocalObjectStore(tmp_path)
    folder = tmp_path / "images" / SHARD
    folder.mkdir(parents=True)
    zombie = subprocess.Popen([sys.executable, "-c", "pass"])  # exits; not reaped until wait()
    while Path(f"/proc/{zombie.pid}").exists() and " Z " not in Path(f"/proc/{zombie.pid}/stat").read_text():
        time.sleep(0.01)
    hour_ago = time.time() - local_storage.FOREIGN_TEMP_MAX_AGE_S - 60
    files = {
        "dead": temp_name("a.jpg", dead_pid()),
        "zombie": temp_name("b.jpg", zombie.pid),
        "alive": temp_name("c.jpg", os.getpid()),
        "other host, fresh": temp_name("d.jpg", 1, host="other-host"),
        "other host, old": temp_name("e.jpg", 1, host="other-host.example"),
        "legacy, fresh": ".tmp-abcd1234",
        "legacy, old": ".tmp-efgh5678",
    }
    for what, name in files.items():
        (folder / name).write_bytes(b"x")
        if "old" in what:
            os.utime(folder / name, (hour_ago, hour_ago))

    assert store.remove_stale_temp(layout.images_dir(SHARD)) == 4
    zombie.wait()

    left = {what for what, name in files.items() if (folder / name).exists()}
    assert left == {"alive", "other host, fresh", "legacy, fresh"}
    assert list(store.list("")) == []


def test_local_put_bytes_names_its_temp_file_after_the_target_and_writer(tmp_path, monkeypatch):
    store = LocalObjectStore(tmp_path)
    seen: list[str] = []

    def interrupted(source, _target):
        seen.append(Path(source).name)
        raise KeyboardInterrupt  # killed between writing and renaming

    monkeypatch.setattr(local_storage.os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        store.put_bytes("images/shard-00000/abc.jpg", b"data")

    (name,) = seen
    assert name.startswith(f".abc.jpg{local_storage.TEMP_MARKER}{socket.gethostname()}-{os.getpid()}-")
    assert list((tmp_path / "images" / SHARD).iterdir()) == []  # removed when the writer could


def test_s3_remove_stale_temp_aborts_only_uploads_under_the_prefix(s3_endpoint, s3_bucket):
    client = boto3.client(
        "s3",
        endpoint_url=s3_endpoint,
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
        region_name="us-east-1",
    )
    store = S3ObjectStore(client, s3_bucket, "some/prefix")
    leave_half_written(store, layout.image(SHARD, "a"))
    leave_half_written(store, "detections/shard-00000.parquet")

    assert store.remove_stale_temp(layout.images_dir(SHARD)) == 1
    assert leftovers(store) == ["some/prefix/detections/shard-00000.parquet"]
    assert list(store.list("")) == []


def test_index_table_round_trips_through_a_part(tmp_path):
    store = LocalObjectStore(tmp_path)
    table = index_table([row(item("a")), row(item("b"), QUARANTINED)])
    write_parquet(store, layout.image_index_part(SHARD, 0), table)
    progress = read_progress(store, SHARD)
    assert pa.Table.from_pylist(progress.parts[0], schema=table.schema).equals(table)


class StoreWithoutCleanupPermission(LocalObjectStore):
    def remove_stale_temp(self, prefix: str) -> int:
        raise PermissionError(f"AccessDenied: s3:ListBucketMultipartUploads on {prefix}")


class StorageWithoutCleanupPermission(LocalStorageResource):
    def store(self) -> ObjectStore:
        return StoreWithoutCleanupPermission(self.root)


def test_the_asset_goes_on_when_it_may_not_look_for_stale_temp_files(dev_server, tmp_path):
    server, items = served(dev_server, 2)
    resource = StorageWithoutCleanupPermission(root=str(tmp_path / "store"))
    sample = [{**vars(i), "shard": SHARD, "source_id": None, "sample_key": n} for n, i in enumerate(items)]
    write_parquet(resource.store(), layout.SAMPLE, pa.Table.from_pylist(sample, schema=SAMPLE))
    instance = DagsterInstance.ephemeral()
    instance.add_dynamic_partitions("shards", [SHARD])

    result = materialize(
        [normalized_images], partition_key=SHARD, resources={"storage": resource}, instance=instance
    )

    (materialization,) = result.asset_materializations_for_node("normalized_images")
    assert materialization.metadata["stale_temp_files_removed"].value == 0
    assert materialization.metadata["images_ok"].value == 2
    logged = [entry.user_message for entry in instance.all_logs(result.run_id)]
    assert any("could not look for stale temp files: PermissionError: AccessDenied" in m for m in logged)
