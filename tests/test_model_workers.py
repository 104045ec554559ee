"""GPU stages through model workers (Dagster Pipes): one model load per run of many shards, one GPU per
concurrent step, a killed worker, configuration errors, and crowded images."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from cli import dagster as dagster_cli
from dagster import AssetKey, DagsterEventType, DagsterInstance, materialize
from images import random_jpeg, write_image_shard

from assets.detections import detections
from assets.masks import masks
from dagster_project.partitions import SHARDS_PARTITIONS_NAME
from pseudolabel import layout
from pseudolabel.rle import decode_rle
from pseudolabel.storage import LocalObjectStore, read_parquet
from resources.models import DetectorResource, SegmenterResource, StageSettingsResource
from resources.storage import LocalStorageResource
from resources.workers import LocalModelWorkers, visible_gpus

REPO = Path(__file__).resolve().parents[1]
RANGE_TAGS = "dagster/asset_partition_range_start", "dagster/asset_partition_range_end"


write_shard = write_image_shard


def shards(store: LocalObjectStore, count: int, images: int = 4) -> list[str]:
    names = [layout.shard_name(i) for i in range(count)]
    for i, name in enumerate(names):
        write_shard(store, name, [(96, 64)] * images, seed=i)
    return names


def run(
    store,
    assets,
    instance,
    *,
    detector=None,
    segmenter=None,
    workers=None,
    shard=None,
    tags=None,
    settings=None,
):
    return materialize(
        assets,
        partition_key=shard,
        instance=instance,
        tags=tags,
        raise_on_error=False,
        resources={
            "storage": LocalStorageResource(root=str(store.root)),
            "detector": detector or DetectorResource(backend="fake"),
            "segmenter": segmenter or SegmenterResource(backend="fake"),
            "stage_settings": StageSettingsResource(**(settings or {})),
            "model_workers": workers or LocalModelWorkers(),
        },
    )


def shard_metadata(instance: DagsterInstance, asset: str) -> dict[str, dict]:
    records = instance.fetch_materializations(AssetKey(asset), limit=100).records
    latest: dict[str, dict] = {}
    for record in sorted(records, key=lambda r: r.storage_id):
        m = record.asset_materialization
        latest[m.partition] = {k: v.value for k, v in m.metadata.items()}
    return latest


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


def _worker_pids() -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if b"pseudolabel.workers" in cmdline and int(entry.name) != os.getpid():
                pids.append(int(entry.name))
    return pids


def test_a_killed_worker_fails_the_step_clearly_and_a_rerun_completes(tmp_path, instance):
    store = LocalObjectStore(tmp_path / "data")
    names = shards(store, 2, images=8)
    instance.add_dynamic_partitions(SHARDS_PARTITIONS_NAME, names)
    slow = DetectorResource(backend="fake", seconds_per_image=0.4, batch_size=1)
    tags = dict(zip(RANGE_TAGS, (names[0], names[-1]), strict=True))
    outcome = {}
    thread = threading.Thread(
        target=lambda: outcome.update(result=run(store, [detections], instance, detector=slow, tags=tags))
    )
    thread.start()
    deadline = time.monotonic() + 60
    while not store.exists(layout.detections(names[0])) and time.monotonic() < deadline:
        time.sleep(0.05)  # the first shard is done; the worker is now on the second
    time.sleep(0.5)
    pids = _worker_pids()
    assert len(pids) == 1, pids
    os.kill(pids[0], signal.SIGKILL)
    thread.join(timeout=60)
    result = outcome["result"]
    assert not result.success
    (failure,) = [e for e in result.all_events if e.event_type == DagsterEventType.STEP_FAILURE]
    message = failure.step_failure_data.user_failure_data.description
    assert "killed by signal 9 (SIGKILL)" in message and f"while processing {names[1]}" in message
    assert f"finished shards recorded: {names[0]}" in message and "A retry may succeed" in message
    assert sorted(shard_metadata(instance, "detections")) == [names[0]]  # the finished shard counts
    assert not store.exists(layout.detections(names[1]))  # nothing half-written

    assert run(store, [detections], instance, tags=tags).success
    assert sorted(shard_metadata(instance, "detections")) == names


def test_a_configuration_error_fails_once_with_a_clear_message(tmp_path, instance, worker_python):
    store = LocalObjectStore(tmp_path / "data")
    (name,) = shards(store, 1)
    instance.add_dynamic_partitions(SHARDS_PARTITIONS_NAME, [name])
    missing = DetectorResource(checkpoint=str(tmp_path / "nowhere.pth"), device="cpu")
    result = run(store, [detections], instance, detector=missing, shard=name)
    assert not result.success
    (failure,) = [e for e in result.all_events if e.event_type == DagsterEventType.STEP_FAILURE]
    message = failure.step_failure_data.user_failure_data.description
    assert "CheckpointNotFound" in message and "nowhere.pth" in message
    assert "Retrying will not help" in message


def test_masks_of_crowded_images_any_candidate_count(tmp_path, instance):
    """0.3 MP images with up to 300 candidates each (pycocotools' area overflowed above 255 per call)."""
    store = LocalObjectStore(tmp_path / "data")
    name = layout.shard_name(0)
    write_shard(store, name, [(640, 480)] * 3)
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
            "import dagster_project.definitions, sys; print(json.dumps(sorted(sys.modules)))".replace(
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
    write_shard(store, name, [(96, 64)] * 4)
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


def test_only_what_a_retry_can_fix_is_retried(tmp_path):
    """With step retries on: a CUDA out-of-memory error is retried with half the batch and succeeds;
    a configuration error fails once. Through the CLI, so Dagster's own retry machinery decides."""
    store = LocalObjectStore(tmp_path / "data")
    (name,) = shards(store, 1, images=6)
    home = tmp_path / "home"
    home.mkdir()
    instance = DagsterInstance.from_config(str(home))
    instance.add_dynamic_partitions(SHARDS_PARTITIONS_NAME, [name])
    env = {
        **os.environ,
        "DAGSTER_HOME": str(home),
        "PSEUDOLABEL_STORAGE": str(store.root),
        "PSEUDOLABEL_MODELS": "fake",
        "PSEUDOLABEL_GPUS": "0",
        "PSEUDOLABEL_STEP_RETRIES": "2",
        "PSEUDOLABEL_STEP_RETRY_DELAY_S": "0.1",
    }

    def materialize_detections(detector_config: dict) -> subprocess.CompletedProcess:
        run_config = json.dumps({"resources": {"detector": {"config": detector_config}}})
        command = ["asset", "materialize", "-m", "dagster_project.definitions", "--select", "detections"]
        command += ["--partition", name, "--config-json", run_config]
        return dagster_cli(*command, env=env, check=False)

    def retries(run_id: str) -> int:
        return len(instance.all_logs(run_id, of_type=DagsterEventType.STEP_UP_FOR_RETRY))

    oom = materialize_detections({"backend": "fake", "batch_size": 4, "oom_above_batch": 2})
    assert oom.returncode == 0, oom.stderr[-4000:]
    (run,) = instance.get_run_records()
    assert retries(run.dagster_run.run_id) == 1  # failed at batch 4, succeeded at batch 2
    assert shard_metadata(instance, "detections")[name]["batch_size"] == 2
    up_for_retry = [
        e for e in instance.all_logs(run.dagster_run.run_id) if "OutOfMemoryError" in (e.message or "")
    ]
    assert up_for_retry, "the retried failure should name the out-of-memory error"

    bad = materialize_detections({"backend": "grounding_dino", "variant": "swin_giant"})
    assert bad.returncode != 0
    latest = instance.get_run_records(limit=1)[0].dagster_run.run_id
    assert retries(latest) == 0 and instance.get_run_by_id(latest).is_failure  # failed once, not retried
    assert "unknown grounding_dino variant 'swin_giant'" in bad.stdout + bad.stderr


def test_a_worker_dying_after_reporting_every_shard_keeps_the_results():
    """E.g. an abort in interpreter teardown: every shard is written and reported, so nothing is lost."""
    from types import SimpleNamespace

    from pseudolabel.workers.task import WorkerTask, meta
    from resources.workers import record_worker_results

    attached, warnings = {}, []
    context = SimpleNamespace(
        assets_def=SimpleNamespace(partitions_def=object()),
        asset_key=AssetKey("detections"),
        add_asset_metadata=lambda metadata, partition_key: attached.update({partition_key: metadata}),
        log=SimpleNamespace(warning=warnings.append),
    )
    task = WorkerTask(stage="detections", shards=["shard-00000", "shard-00001"], storage="/tmp/x")
    messages = [{"event": "models_loaded", "models": {}, "seconds": 0.1}] + [
        {"event": "shard_done", "shard": s, "metadata": {"candidates": meta(3)}} for s in task.shards
    ]
    results = record_worker_results(
        context, task, messages, "the model worker was killed by signal 6 (SIGABRT)"
    )
    assert sorted(results) == sorted(attached) == task.shards
    assert attached["shard-00001"]["candidates"].value == 3
    assert warnings and "SIGABRT" in warnings[0] and "results are kept" in warnings[0]

    # A shard missing from the reports is a failure, naming what was finished.
    with pytest.raises(Exception, match="finished shards recorded: shard-00000") as caught:
        record_worker_results(
            SimpleNamespace(**{**vars(context), "log_event": lambda event: None}),
            task,
            messages[:2],
            "the model worker was killed by signal 9 (SIGKILL)",
        )
    assert caught.value.allow_retries is True


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
