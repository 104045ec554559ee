"""When model workers fail: a killed worker, a configuration error, an out-of-memory retry with a
smaller batch, and a worker that dies after reporting everything."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest
from cli import dagster as dagster_cli
from dagster import AssetKey, DagsterEventType, DagsterInstance
from worker_helpers import RANGE_TAGS, run, shard_metadata, shards

from assets.common import SHARDS_PARTITIONS_NAME
from assets.detections import detections
from pseudolabel import layout
from pseudolabel.storage import LocalObjectStore
from resources.models import DetectorResource


@pytest.fixture()
def instance():
    with DagsterInstance.ephemeral() as instance:
        yield instance


def _worker_pids() -> list[int]:
    """Model workers started by this test process (another test run on the machine has its own)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if b"pseudolabel.workers" in cmdline and _descends_from_me(int(entry.name)):
                pids.append(int(entry.name))
    return pids


def _descends_from_me(pid: int) -> bool:
    while pid > 1:
        try:  # /proc/PID/stat: "PID (COMM) STATE PPID ...", COMM may hold spaces and parentheses
            pid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            return False
        if pid == os.getpid():
            return True
    return False


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
