"""GPU stages through model workers (Dagster Pipes): one model load per run of many shards, one GPU per
concurrent step, crowded images, every storage backend, the README's CLI, and the models preset."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from cli import dagster as dagster_cli
from dagster import DagsterInstance, materialize
from images import random_jpeg, write_image_shard
from worker_helpers import RANGE_TAGS, run, shard_metadata, shards

from assets.common import SHARDS_PARTITIONS_NAME
from assets.detections import detections
from assets.masks import masks
from pseudolabel import layout
from pseudolabel.rle import decode_rle
from pseudolabel.storage import LocalObjectStore, read_parquet
from resources.models import DetectorResource, SegmenterResource, StageSettingsResource
from resources.storage import LocalStorageResource
from resources.workers import LocalModelWorkers, visible_gpus

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture()
def instance():
    with DagsterInstance.ephemeral() as instance:
        yield instance


def test_one_run_over_a_range_of_shards_loads_the_models_once(tmp_path, instance):
    store = LocalObjectStore(tmp_path / "data")
    names = shards(store, 3)
    instance.add_dynamic_partitions(SHARDS_PARTITIONS_NAME, names)
    result = run(
        store, [detections], instance, tags=dict(zip(RANGE_TAGS, (names[0], names[-1]), strict=True))
    )
    assert result.success
    metadata = shard_metadata(instance, "detections")
    assert sorted(metadata) == names  # one materialization per shard, each with its own numbers
    pids = {m["worker"]["pid"] for m in metadata.values()}
    assert len(pids) == 1 and all(m["model_loads_in_step"] == 1 for m in metadata.values())
    for name in names:
        stored = read_parquet(store, layout.detections(name))
        assert metadata[name]["candidates"] == stored.num_rows
        assert metadata[name]["path"].endswith(layout.detections(name))


def test_concurrent_gpu_steps_each_lease_their_own_gpu(tmp_path):
    """Two GPU steps started together on a host with 2 (pretend) GPUs: the workers see different devices.
    (Each step in its own instance: two in-process runs on one in-memory SQLite lock each other out.)"""
    store = LocalObjectStore(tmp_path / "data")
    names = shards(store, 2, images=6)
    workers = LocalModelWorkers(gpus="2", lease_dir=str(tmp_path / "locks"))
    slow = DetectorResource(backend="fake", seconds_per_image=0.25, batch_size=1)
    results, instances = {}, {}

    def step(name):
        with DagsterInstance.ephemeral() as instance:
            instance.add_dynamic_partitions(SHARDS_PARTITIONS_NAME, [name])
            results[name] = run(store, [detections], instance, detector=slow, workers=workers, shard=name)
            instances[name] = shard_metadata(instance, "detections")[name]

    threads = [threading.Thread(target=step, args=(name,)) for name in names]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert all(results[name].success for name in names)
    seen = {name: m["worker"] for name, m in instances.items()}
    assert {w["cuda_visible_devices"] for w in seen.values()} == {"0", "1"}
    (a, b) = seen.values()
    assert a["started_at"] < b["finished_at"] and b["started_at"] < a["finished_at"]  # they did overlap


def test_visible_gpus_counts_and_respects_cuda_visible_devices():
    assert visible_gpus("2", environ={}) == ["0", "1"]
    assert visible_gpus("", environ={"PSEUDOLABEL_GPUS": "0"}) == []
    assert visible_gpus("2", environ={"CUDA_VISIBLE_DEVICES": "3,5,7"}) == ["3", "5"]
    with pytest.raises(ValueError, match="whole number"):
        visible_gpus("two", environ={})


def test_masks_of_crowded_images_any_candidate_count(tmp_path, instance):
    """0.3 MP images with up to 300 candidates each (pycocotools' area overflowed above 255 per call)."""
    store = LocalObjectStore(tmp_path / "data")
    name = layout.shard_name(0)
    write_image_shard(store, name, [(640, 480)] * 3)
    instance.add_dynamic_partitions(SHARDS_PARTITIONS_NAME, [name])
    crowded = DetectorResource(backend="fake", max_boxes_per_caption=300)
    settings = {"box_floor": 0.0, "text_floor": 0.0}
    result = run(store, [detections, masks], instance, detector=crowded, shard=name, settings=settings)
    assert result.success
    per_image = read_parquet(store, layout.masks(name)).to_pandas().groupby("image_id").size()
    assert per_image.max() >= 256, per_image.to_dict()
    table = read_parquet(store, layout.masks(name)).to_pandas()
    assert len(table) == read_parquet(store, layout.detections(name)).num_rows
    crowded_rows = table[table["image_id"] == per_image.idxmax()]
    decoded = [int(decode_rle(r.rle_counts, r.height, r.width).sum()) for r in crowded_rows.itertuples()]
    assert decoded == crowded_rows["mask_area"].tolist() and sum(decoded) > 0


def test_the_readme_cli_materializes_a_shard_in_the_orchestrator_environment(tmp_path, dev_server):
    """`dagster asset materialize --select ... --partition ...` (string selections need Dagster's own
    antlr, which the model stack's pin used to break)."""
    images = {f"p{i}.jpg": random_jpeg(120, 90, seed=i) for i in range(6)}
    server = dev_server(catalog=[], images=images)
    catalog = tmp_path / "catalog.csv"
    catalog.write_text("image_url,label\n" + "".join(f"{server.image_url(n)},plant\n" for n in images))
    home = tmp_path / "home"
    home.mkdir()
    env = {
        **os.environ,
        "DAGSTER_HOME": str(home),
        "PSEUDOLABEL_CATALOG": str(catalog),
        "PSEUDOLABEL_STORAGE": str(tmp_path / "data"),
        "PSEUDOLABEL_MODELS": "fake",
        "PSEUDOLABEL_GPUS": "0",
    }

    def cli(*args):
        return dagster_cli(*args, env=env)

    cli(
        "asset",
        "materialize",
        "-m",
        "dagster_project.definitions",
        "--select",
        "catalog_snapshot,stratified_sample",
    )
    cli(
        "asset",
        "materialize",
        "-m",
        "dagster_project.definitions",
        "--select",
        "normalized_images,detections,masks,pseudo_labels",
        "--partition",
        "shard-00000",
    )
    listed = cli("asset", "list", "-m", "dagster_project.definitions").stdout
    assert "detections" in listed and "pseudo_labels" in listed
    store = LocalObjectStore(tmp_path / "data")
    assert store.exists(layout.masks("shard-00000")) and store.exists(layout.pseudo_labels("shard-00000"))
    probe = subprocess.run(
        [
            sys.executable,
            "-c",
            "import dagster_project.definitions as d, sys; d.defs(); print(json.dumps(sorted(sys.modules)))".replace(
                "json.dumps", "__import__('json').dumps"
            ),
        ],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    loaded = set(json.loads(probe.stdout.strip().splitlines()[-1]))
    assert not loaded & {"torch", "sam2", "groundingdino", "transformers", "hydra"}


def test_workers_write_to_each_storage_backend(storage_resource, store, instance):
    """The worker opens the same store from its location + environment (moto's S3 on 127.0.0.1 too)."""
    name = layout.shard_name(0)
    write_image_shard(store, name, [(96, 64)] * 4)
    instance.add_dynamic_partitions(SHARDS_PARTITIONS_NAME, [name])
    result = materialize(
        [detections, masks],
        partition_key=name,
        instance=instance,
        resources={
            "storage": storage_resource,
            "detector": DetectorResource(backend="fake"),
            "segmenter": SegmenterResource(backend="fake"),
            "stage_settings": StageSettingsResource(),
            "model_workers": LocalModelWorkers(),
        },
    )
    assert result.success
    assert (
        read_parquet(store, layout.masks(name)).num_rows
        == read_parquet(store, layout.detections(name)).num_rows
    )
    sidecar = store.get_json(layout.provenance(layout.masks(name)))
    assert sidecar["backend"] == "fake" and sidecar["settings"] == {"multimask": False}
    assert sidecar["fingerprint"] == shard_metadata(instance, "masks")[name]["fingerprint"]


def test_one_launchpad_knob_keeps_the_models_preset(tmp_path, instance, monkeypatch):
    """Run config for one field replaces the resource's code-given values; the preset must survive
    (it is read from PSEUDOLABEL_MODELS when the step runs), or one edited batch size would switch a
    smoke run to the official checkpoints."""
    from dagster_project.resource_defs import resources_from_env

    monkeypatch.setenv("PSEUDOLABEL_MODELS", "fake")
    store = LocalObjectStore(tmp_path / "data")
    (name,) = shards(store, 1)
    instance.add_dynamic_partitions(SHARDS_PARTITIONS_NAME, [name])
    resources = {**resources_from_env(), "storage": LocalStorageResource(root=str(store.root))}
    result = materialize(
        [detections],
        partition_key=name,
        instance=instance,
        resources=resources,
        run_config={"resources": {"detector": {"config": {"batch_size": 2}}}},
    )
    assert result.success
    metadata = shard_metadata(instance, "detections")[name]
    assert metadata["model"] == "fake_detector" and metadata["batch_size"] == 2


def test_worker_messages_are_read_as_whole_lines_while_a_long_one_is_being_written(tmp_path):
    """A shard report written in chunks: the reader yields it once, whole (Dagster's own tail yields the
    first chunk as a line, which fails json.loads and stopped the reader, dropping later messages)."""
    import time

    from dagster._utils import tail_file

    from resources.workers import whole_lines

    path = tmp_path / "messages"
    path.write_text("")
    report = json.dumps({"event": "shard_done", "preview": "x" * 50_000}) + "\n"
    done = threading.Event()

    def write() -> None:
        with open(path, "a", encoding="utf-8") as out:
            out.write('{"event": "shard_started"}\n')
            for start in range(0, len(report), 8192):
                out.write(report[start : start + 8192])
                out.flush()
                time.sleep(0.05)
            out.write('{"__dagster_pipes_version": "0.1", "method": "closed"}\n')
        done.set()

    writer = threading.Thread(target=write)
    writer.start()
    lines = list(whole_lines(str(path), done.is_set))
    writer.join()
    assert [json.loads(line).get("event", "closed") for line in lines] == [
        "shard_started",
        "shard_done",
        "closed",
    ]
    assert lines[1] == report

    done.clear()
    path.write_text("")
    writer = threading.Thread(target=write)
    writer.start()
    stock = list(tail_file(str(path), done.is_set))
    writer.join()
    assert len(stock) > 3 and not stock[1].endswith("\n")  # the race the reader above avoids
