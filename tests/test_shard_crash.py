"""normalized_images survives its process being killed (kill -9) and its S3 storage going away mid-shard.

Both reruns must fetch no image that was stored before (whatever the index parts recorded: they lag the
stored JPEGs), fetch every other one exactly once, leave no temp file or half-written object behind, and
end with the same index as a run that was never interrupted.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import signal
import socket
import subprocess
import threading
import time
import uuid
from collections import Counter
from pathlib import Path

import boto3
import pyarrow as pa
import pyarrow.parquet as pq
from botocore.config import Config
from cli import DAGSTER
from cli import dagster as dagster_cli
from dagster import AssetKey, DagsterInstance
from dagster._core.instance.ref import InstanceRef
from images import images_metadata, materialize_images, random_jpeg
from moto.server import ThreadedMotoServer
from PIL import Image

from pseudolabel import layout
from pseudolabel.ids import image_id_for_url
from pseudolabel.images.download import DownloadPolicy
from pseudolabel.images.index import SampleItem
from pseudolabel.images.shard import ShardOptions, process_shard
from pseudolabel.schemas import SAMPLE
from pseudolabel.storage import LocalObjectStore, S3ObjectStore, read_parquet, write_parquet
from pseudolabel.storage.local import TEMP_MARKER
from resources.storage import S3StorageResource

REPO = Path(__file__).resolve().parents[1]
SHARD = "shard-00000"
CREDENTIALS = {"aws_access_key_id": "testing", "aws_secret_access_key": "testing", "region_name": "us-east-1"}


def shard_images(good: int, pages: int, missing: int) -> tuple[dict[str, bytes], list[str]]:
    """Served images and the sample's names in order (the bad ones spread through the shard)."""
    images = {f"p{i:03d}.jpg": random_jpeg(64, 48, seed=i) for i in range(good)}
    images |= {f"page{i}.jpg": b"<html>not an image</html>" for i in range(pages)}
    names = sorted(images) + [f"missing{i}.jpg" for i in range(missing)]
    return images, sorted(names, key=lambda n: hashlib.md5(n.encode()).hexdigest())  # bad ones spread out


def recorded_rows(store, shard: str = SHARD) -> list[dict]:
    """Every row of the shard's index parts (what the interrupted run had recorded)."""
    rows: list[dict] = []
    for info in store.list(layout.image_index_parts_dir(shard)):
        rows += pq.read_table(io.BytesIO(store.get_bytes(info.key))).to_pylist()
    return rows


def expected_refetch(urls: list[str], stored_ids: set[str], recorded: list[dict]) -> set[str]:
    """What a rerun must fetch: every URL whose JPEG is not stored, except bad images a part recorded
    as quarantined (finished: not tried again until the next complete run)."""
    quarantined = {r["url"] for r in recorded if r["status"] == "quarantined"}
    return {u for u in urls if image_id_for_url(u) not in stored_ids and u not in quarantined}


def uninterrupted_statuses(items: list[SampleItem], tmp_path: Path) -> dict[str, tuple]:
    """image_id -> (status, reason, sha256) from one uninterrupted run into a separate store."""
    result = process_shard(
        LocalObjectStore(tmp_path / "uninterrupted"),
        SHARD,
        items,
        ShardOptions(download=DownloadPolicy(concurrency=32, max_retries=0), decode_workers=2),
    )
    return statuses(result.index)


def statuses(index: pa.Table) -> dict[str, tuple]:
    return {
        r["image_id"]: (r["status"], (r["error"] or "").split(":", 1)[0], r["sha256"])
        for r in index.to_pylist()
    }


def temp_files(root: Path) -> list[str]:
    return sorted(
        str(p.relative_to(root))
        for p in root.rglob("*")
        if TEMP_MARKER in p.name or p.name.startswith(".tmp-")
    )


def test_kill_9_mid_shard_then_rerun_fetches_no_stored_image_again(tmp_path, dev_server):
    """`dagster asset materialize` of one shard (120 images: 110 good, 4 not images, 6 missing) as a real
    process; SIGKILL to its process group once about half the JPEGs are stored; the same command again.

    Measured on the server: of the images stored before the kill, how many the rerun requests again
    (limit: none, also those no index part recorded yet), and that it requests exactly the others (in
    flight, not started, bad images no part recorded). Also printed: the same over every URL answered
    before the kill.
    """
    images, names = shard_images(good=110, pages=4, missing=6)
    # 2 downloads at a time x 0.3 s each: ~7 images/s, so the kill lands mid-shard.
    server = dev_server(images=images, image_latency_s=0.3)
    urls = [server.image_url(n) for n in names]
    catalog = tmp_path / "catalog.csv"
    catalog.write_text("image_url,label\n" + "".join(f"{url},plant\n" for url in urls))
    home, data = tmp_path / "home", tmp_path / "data"
    home.mkdir()
    env = {
        **os.environ,
        "DAGSTER_HOME": str(home),
        "PSEUDOLABEL_CATALOG": str(catalog),
        "PSEUDOLABEL_STORAGE": str(data),
        "PSEUDOLABEL_MODELS": "fake",
        "PSEUDOLABEL_GPUS": "0",
    }
    config = {"ops": {"normalized_images": {"config": {"concurrency": 2, "max_retries": 0}}}}
    materialize_shard = [
        *("asset", "materialize", "-m", "dagster_project.definitions", "--select", "normalized_images"),
        *("--partition", SHARD, "--config-json", json.dumps(config)),
    ]
    dagster_cli(
        "asset",
        "materialize",
        "-m",
        "dagster_project.definitions",
        "--select",
        "catalog_snapshot,stratified_sample",
        env=env,
    )
    sample = read_parquet(LocalObjectStore(data), layout.SAMPLE).to_pylist()
    assert len(sample) == 120 and {r["shard"] for r in sample} == {SHARD}

    # 1. Start the shard, kill -9 the whole process group once ~half the JPEGs are stored.
    stored_dir = data / "images" / SHARD
    with (tmp_path / "killed.log").open("w") as log:
        killed = subprocess.Popen(
            [DAGSTER, *materialize_shard],
            env=env,
            cwd=REPO,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            deadline = time.monotonic() + 180
            while killed.poll() is None and time.monotonic() < deadline:
                if stored_dir.is_dir() and sum(1 for _ in stored_dir.glob("*.jpg")) >= 60:
                    break
                time.sleep(0.02)
            assert killed.poll() is None, (
                "the run ended (or never got going) before it could be killed:\n"
                + (tmp_path / "killed.log").read_text()[-4000:]
            )
        finally:
            if killed.poll() is None:
                os.killpg(killed.pid, signal.SIGKILL)
            killed.wait()
    time.sleep(1.0)  # requests that were sleeping on latency get logged (their client is gone)
    answered = set(server.paths("/images/"))
    time.sleep(0.5)
    assert set(server.paths("/images/")) == answered, "something of the killed run is still downloading"
    stored_at_kill = {p.stem for p in stored_dir.glob("*.jpg")}
    # Finished before the kill: stored JPEGs, and bad images answered (rejected as soon as they arrive).
    finished = {url for url in answered if image_id_for_url(server.url + url) in stored_at_kill}
    finished |= {url for url in answered if not url.startswith("/images/p")}
    parts = sorted(p.name for p in (data / "images" / f"{SHARD}.parts").glob("*.parquet"))
    assert parts and not (data / layout.image_index(SHARD)).exists()
    recorded = recorded_rows(LocalObjectStore(data))
    unrecorded_stored = stored_at_kill - {r["image_id"] for r in recorded}
    left_by_kill = temp_files(data)
    # A kill during a write leaves a temp file; make sure there is one to clean up.
    (stored_dir / f".x.jpg{TEMP_MARKER}{socket.gethostname()}-{killed.pid}-abcd1234").write_bytes(b"half")

    # 2. The same command again.
    before = len(server.paths("/images/"))
    dagster_cli(*materialize_shard, env=env)
    again = Counter(server.paths("/images/")[before:])

    refetched = answered & set(again)
    stored_urls = {u for u in answered if image_id_for_url(server.url + u) in stored_at_kill}
    print(
        f"\nkill -9 with {len(stored_at_kill)} of 120 JPEGs stored ({len(unrecorded_stored)} of them in no "
        f"index part; {len(parts)} parts, {len(left_by_kill)} temp files left by the kill): the rerun "
        f"fetched {len(refetched & stored_urls)} of the {len(stored_urls)} stored images again; of the "
        f"{len(finished)} finished images {len(refetched & finished)}, of all {len(answered)} URLs answered "
        f"before the kill (downloads in flight included) {len(refetched)}"
    )
    assert refetched & stored_urls == set()  # not one stored image fetched again
    assert {server.url + u for u in again} == expected_refetch(urls, stored_at_kill, recorded)
    assert max(again.values()) == 1 and set(again) | answered == {f"/images/{n}" for n in names}
    assert temp_files(data) == []
    assert not (data / "images" / f"{SHARD}.parts").exists()

    index = read_parquet(LocalObjectStore(data), layout.image_index(SHARD))
    assert sorted(index.column("image_id").to_pylist()) == sorted(image_id_for_url(u) for u in urls)
    items = [SampleItem(image_id=image_id_for_url(u), url=u, label="plant") for u in urls]
    assert statuses(index) == uninterrupted_statuses(items, tmp_path)

    with DagsterInstance.from_ref(InstanceRef.from_dir(str(home))) as instance:
        event = instance.get_latest_materialization_event(AssetKey("normalized_images"))
    metadata = {k: v.value for k, v in event.asset_materialization.metadata.items()}
    assert metadata["images_reused"] == 120 - len(again)
    assert metadata["reused_from_unfinished_run"] == len({r["image_id"] for r in recorded})
    assert metadata["rebuilt_from_stored_images"] == len(unrecorded_stored)
    assert metadata["stale_temp_files_removed"] == len(left_by_kill) + 1
    assert metadata["images_fetched"] == len(again)


# -- S3 going away mid-shard ------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Moto:
    """A moto S3 server of this test's own, on a fixed port, that can go away and come back."""

    def __init__(self, port: int):
        self.port = port
        self.server: ThreadedMotoServer | None = None

    def start(self) -> None:
        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self.server.start()

    def stop(self) -> None:
        assert self.server is not None
        self.server.stop()  # stops serving...
        self.server._server.server_close()  # ...and refuses connections, as a dead endpoint does
        self.server = None


def test_s3_outage_mid_shard_fails_clearly_and_the_rerun_fetches_no_stored_image_again(tmp_path, dev_server):
    """The moto server the shard writes to stops after ~60 of 120 JPEGs are stored and starts again on
    the same port before the rerun.

    moto keeps its state in the process (its backends are module-level), not in the server: a new server
    on the same port serves the same bucket with everything written before the outage, which is what an
    S3 outage looks like to a client (requests fail, stored objects survive). The rerun must fetch exactly
    the images that were not stored (and no part recorded as quarantined), and nothing else: images
    stored but not yet recorded when S3 went away are reused, their rows rebuilt from the stored JPEGs.
    """
    port = free_port()
    moto = Moto(port)
    moto.start()
    endpoint = f"http://127.0.0.1:{port}"
    bucket = f"outage-{uuid.uuid4().hex[:8]}"
    # No client-side retries: a refused connection fails now (the default would retry it for seconds).
    client = boto3.client(
        "s3", endpoint_url=endpoint, config=Config(retries={"max_attempts": 1}), **CREDENTIALS
    )
    client.create_bucket(Bucket=bucket)
    store = S3ObjectStore(client, bucket, "pseudolabel")
    resource = S3StorageResource(
        bucket=bucket, prefix="pseudolabel", endpoint_url=endpoint, max_attempts=1, **CREDENTIALS
    )
    try:
        images, names = shard_images(good=110, pages=4, missing=6)
        server = dev_server(images=images, image_latency_s=0.2)  # 4 at a time: ~20 images/s
        urls = [server.image_url(n) for n in names]
        write_parquet(
            store,
            layout.SAMPLE,
            pa.Table.from_pylist(
                [
                    {
                        "image_id": image_id_for_url(u),
                        "url": u,
                        "label": "oak",
                        "shard": SHARD,
                        "source_id": None,
                        "sample_key": n,
                    }
                    for n, u in enumerate(urls)
                ],
                schema=SAMPLE,
            ),
        )
        stopped = threading.Event()

        def stop_mid_shard() -> None:
            while not stopped.is_set():
                if sum(1 for _ in store.list(layout.images_dir(SHARD))) >= 60:
                    moto.stop()
                    stopped.set()
                time.sleep(0.01)

        watcher = threading.Thread(target=stop_mid_shard, daemon=True)
        watcher.start()
        first = run(resource, concurrency=4)
        watcher.join(5)
        assert stopped.is_set()
        assert not first.success
        failure = next(e for e in first.all_events if e.event_type_value == "STEP_FAILURE")
        error, messages = failure.event_specific_data.error, []
        while error is not None:  # the retry policy's "Exceeded max_retries", caused by what happened
            messages.append(error.message)
            error = error.cause
        message = "\n".join(messages)
        assert (
            "ShardStorageError" in message and f"storing s3://{bucket}/pseudolabel/images/{SHARD}/" in message
        )
        assert "EndpointConnectionError" in message
        assert f"a rerun reuses every image stored under s3://{bucket}/pseudolabel/images/{SHARD}/" in message

        moto.start()  # same port, same (in-process) state
        # Nothing half-written under a final key: every stored JPEG decodes, every part is a whole index.
        assert client.list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []
        stored = set()
        for info in store.list(layout.images_dir(SHARD)):
            Image.open(io.BytesIO(store.get_bytes(info.key))).load()
            stored.add(info.key.rsplit("/", 1)[1].removesuffix(".jpg"))
        recorded = recorded_rows(store)
        unrecorded_stored = stored - {r["image_id"] for r in recorded}
        assert recorded and not store.exists(layout.image_index(SHARD))
        before = len(server.paths("/images/"))

        second = run(resource, concurrency=4)

        assert second.success
        again = [server.url + p for p in server.paths("/images/")[before:]]
        stored_again = [u for u in again if image_id_for_url(u) in stored]
        print(
            f"\nS3 outage: {message.splitlines()[-1]}\nwith {len(stored)} of {len(urls)} JPEGs stored "
            f"({len(unrecorded_stored)} of them in no index part): the rerun fetched {len(stored_again)} of "
            f"the stored images again, {len(again)} images in all"
        )
        assert stored_again == []
        assert sorted(again) == sorted(expected_refetch(urls, stored, recorded))  # each once, nothing else
        metadata = metadata_of(second)
        assert metadata["reused_from_unfinished_run"] == len(recorded)
        assert metadata["rebuilt_from_stored_images"] == len(unrecorded_stored)
        assert metadata["images_fetched"] == len(again)
        index = read_parquet(store, layout.image_index(SHARD)).to_pylist()
        assert sorted(r["url"] for r in index) == sorted(urls)
        assert list(store.list(layout.image_index_parts_dir(SHARD))) == []
        items = [SampleItem(image_id=image_id_for_url(u), url=u, label="oak") for u in urls]
        assert statuses(pa.Table.from_pylist(index)) == uninterrupted_statuses(items, tmp_path)
    finally:
        if moto.server is not None:
            moto.stop()


def run(storage_resource, **config):
    return materialize_images(storage_resource, SHARD, **config)


metadata_of = images_metadata
