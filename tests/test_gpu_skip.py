"""GPU work is never redone: a re-run or a retry of a range runs the models only on the shards whose output
is missing or whose fingerprint changed, and ``force: true`` recomputes them all.

Real model workers (subprocesses, the fake models); each forward call of a fake model is logged
(``PSEUDOLABEL_FAKE_CALLS_LOG``), so the tests count the model work a run did, shard by shard.
"""

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
from dagster import DagsterEventType, DagsterInstance
from dagster import materialize as dagster_materialize
from images import write_image_shard
from worker_helpers import RANGE_TAGS, run, shard_metadata, shards

from assets.common import SHARDS_PARTITIONS_NAME
from assets.detections import detections
from assets.masks import masks
from pseudolabel import layout
from pseudolabel.fingerprint import stored_fingerprint
from pseudolabel.models.stages import DetectionSettings, ImageRef, detection_fingerprint
from pseudolabel.storage import LocalObjectStore
from pseudolabel.testing.models import CALLS_LOG_ENV, forward_calls
from resources.models import DetectorResource, SegmenterResource, StageSettingsResource
from resources.storage import LocalStorageResource
from resources.workers import LocalModelWorkers

REPO = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent

# A step in a process of its own (fresh imports, so $PSEUDOLABEL_STEP_RETRIES applies): the GPU asset over
# a range of shards with the given detector, on a persistent instance the test reads afterwards.
STEP = """
import json, sys
from dagster import DagsterInstance
from worker_helpers import RANGE_TAGS, run
from assets.detections import detections
from pseudolabel.storage import LocalObjectStore
from resources.models import DetectorResource, SegmenterResource, StageSettingsResource
from resources.storage import LocalStorageResource
from resources.workers import LocalModelWorkers
from resources.workers import LocalModelWorkers

args = json.loads(sys.argv[1])
with DagsterInstance.from_config(args["home"]) as instance:
    result = run(
        LocalObjectStore(args["store"]),
        [detections],
        instance,
        detector=DetectorResource(**args["detector"]),
        workers=LocalModelWorkers(**args.get("workers", {})),
        tags=dict(zip(RANGE_TAGS, args["range"])),
    )
sys.exit(0 if result.success else 1)
"""


@pytest.fixture()
def instance():
    with DagsterInstance.ephemeral() as instance:
        yield instance


def shard_of(image_id: str, names: list[str]) -> str:
    """The shard an image belongs to: ``write_image_shard`` ids start with the shard's seed (its index)."""
    return names[int(image_id[:4], 16)]


def computed_shards(calls: list[dict], names: list[str]) -> dict[str, int]:
    """{shard: images the models ran on} over the calls that did not fail."""
    done: dict[str, int] = {}
    for call in calls:
        if not call["oom"]:
            for image_id in call["images"]:
                shard = shard_of(image_id, names)
                done[shard] = done.get(shard, 0) + 1
    return done


def test_the_fingerprint_keeps_what_makes_the_output_not_how_it_was_computed():
    refs, settings = [ImageRef("a", 4, 3, "sha-a"), ImageRef("b", 4, 3, "sha-b")], DetectionSettings()
    model = {"backend": "grounding_dino", "variant": "swint_ogc", "checkpoint_sha256": "c0ffee"}
    model |= {"device": "cuda:0", "precision": "bf16", "batch_size": 8, "input_size": "short 800"}
    base = detection_fingerprint(refs, settings, model)
    # How it ran: batch size (halved by a retry), which GPU, where the checkpoint was read from.
    assert detection_fingerprint(refs, settings, {**model, "batch_size": 2}) == base
    assert detection_fingerprint(refs, settings, {**model, "device": "cuda:3"}) == base
    assert detection_fingerprint(refs, settings, {**model, "checkpoint": "s3://elsewhere"}) == base
    # What it made: image bytes, weights, precision, device type, input size, settings.
    changed = [
        detection_fingerprint([refs[0], ImageRef("b", 4, 3, "sha-other")], settings, model),
        detection_fingerprint(refs, settings, {**model, "checkpoint_sha256": "bad"}),
        detection_fingerprint(refs, settings, {**model, "precision": "fp32"}),
        detection_fingerprint(refs, settings, {**model, "device": "cpu"}),
        detection_fingerprint(refs, settings, {**model, "input_size": "short 640"}),
        detection_fingerprint(refs, DetectionSettings(box_floor=0.1), model),
    ]
    assert base not in changed and len(set(changed)) == len(changed)


def test_a_rerun_after_a_killed_worker_runs_the_models_only_on_the_unfinished_shards(
    tmp_path, instance, monkeypatch
):
    store = LocalObjectStore(tmp_path / "data")
    names = shards(store, 6, images=2)
    instance.add_dynamic_partitions(SHARDS_PARTITIONS_NAME, names)
    tags = dict(zip(RANGE_TAGS, (names[0], names[-1]), strict=True))
    first_log, rerun_log = tmp_path / "first.jsonl", tmp_path / "rerun.jsonl"
    monkeypatch.setenv(CALLS_LOG_ENV, str(first_log))
    slow = DetectorResource(backend="fake", seconds_per_image=0.4, batch_size=1)
    outcome = {}
    thread = threading.Thread(
        target=lambda: outcome.update(result=run(store, [detections], instance, detector=slow, tags=tags))
    )
    thread.start()
    deadline = time.monotonic() + 120
    while not store.exists(layout.detections(names[2])) and time.monotonic() < deadline:
        time.sleep(0.01)
    (worker,) = {call["pid"] for call in forward_calls(first_log)}
    os.kill(worker, signal.SIGKILL)  # after 3 of 6 shards, on the 4th
    thread.join(timeout=60)
    assert not outcome["result"].success
    finished = [name for name in names if store.exists(layout.detections(name))]
    assert finished == names[:3]
    # (the last one may be stored but unrecorded: killed between its write and its report)
    fingerprints = {name: stored_fingerprint(store, layout.detections(name)) for name in finished}
    stamps = {name: (store.root / layout.detections(name)).stat().st_mtime_ns for name in finished}

    # The re-run, with another batch size: the 3 finished shards are reused, the models run on the other 3.
    monkeypatch.setenv(CALLS_LOG_ENV, str(rerun_log))
    rerun = run(
        store, [detections], instance, detector=DetectorResource(backend="fake", batch_size=4), tags=tags
    )
    assert rerun.success
    recomputed = computed_shards(forward_calls(rerun_log), names)
    assert sorted(recomputed) == names[3:] and all(n == 2 for n in recomputed.values())
    print(f"kill and re-run: {len(recomputed)} shards recomputed / {len(finished)} finished before the kill")
    metadata = shard_metadata(instance, "detections")
    for name in names:
        assert metadata[name]["reused"] is (name in finished), name
    for name in finished:
        assert metadata[name]["fingerprint"] == fingerprints[name]
        assert (store.root / layout.detections(name)).stat().st_mtime_ns == stamps[name]  # not rewritten
    for name in names[3:]:
        assert metadata[name]["batch_size"] == 4


def test_an_out_of_memory_retry_with_half_the_batch_skips_the_shards_already_written(tmp_path):
    """Dagster's own retry (a step in a process of its own, 1 retry): shards 0-2 (2 images each) fit a
    batch, shard 3 (4 images) runs out of memory at batch 4; the retry runs at batch 2 and must not
    run the models on shards 0-2 again."""
    store = LocalObjectStore(tmp_path / "data")
    names = [layout.shard_name(i) for i in range(6)]
    for i, name in enumerate(names):
        write_image_shard(store, name, [(96, 64)] * (2 if i < 3 else 4), seed=i)
    home = tmp_path / "home"
    home.mkdir()
    with DagsterInstance.from_config(str(home)) as instance:
        instance.add_dynamic_partitions(SHARDS_PARTITIONS_NAME, names)
    calls_log = tmp_path / "calls.jsonl"
    args = {
        "home": str(home),
        "store": str(store.root),
        "detector": {"backend": "fake", "batch_size": 4, "oom_above_batch": 2},
        "range": [names[0], names[-1]],
    }
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(TESTS), str(REPO)]),
        "PSEUDOLABEL_STEP_RETRIES": "1",
        "PSEUDOLABEL_STEP_RETRY_DELAY_S": "0.1",
        CALLS_LOG_ENV: str(calls_log),
    }
    step = subprocess.run(
        [sys.executable, "-c", STEP, json.dumps(args)],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert step.returncode == 0, step.stderr[-4000:]

    calls = forward_calls(calls_log)
    attempts = list(dict.fromkeys(call["pid"] for call in calls))  # one worker per attempt, in order
    assert len(attempts) == 2
    first, retry = ([c for c in calls if c["pid"] == pid] for pid in attempts)
    assert sorted(computed_shards(first, names)) == names[:3]
    assert [shard_of(c["images"][0], names) for c in first if c["oom"]] == [names[3]]
    redone = computed_shards(retry, names)
    assert sorted(redone) == names[3:] and all(n == 4 for n in redone.values())
    assert max(len(c["images"]) for c in retry) == 2  # half the batch
    print(f"OOM retry: {len(redone)} shards computed by the retry, {len(names[:3])} written before reused")

    with DagsterInstance.from_config(str(home)) as instance:
        (record,) = instance.get_run_records()
        retries = instance.all_logs(record.dagster_run.run_id, of_type=DagsterEventType.STEP_UP_FOR_RETRY)
        assert len(retries) == 1
        metadata = shard_metadata(instance, "detections")
    assert [metadata[name]["reused"] for name in names] == [True] * 3 + [False] * 3
    assert all(metadata[name]["batch_size"] == 2 for name in names[3:])


def test_force_recomputes_every_shard(tmp_path, instance, monkeypatch):
    store = LocalObjectStore(tmp_path / "data")
    names = shards(store, 3, images=4)
    instance.add_dynamic_partitions(SHARDS_PARTITIONS_NAME, names)
    tags = dict(zip(RANGE_TAGS, (names[0], names[-1]), strict=True))
    logs = [tmp_path / f"run{i}.jsonl" for i in range(3)]

    def materialize(log: Path, force: bool):
        monkeypatch.setenv(CALLS_LOG_ENV, str(log))
        config = {"ops": {name: {"config": {"force": force}} for name in ("detections", "masks")}}
        result = dagster_materialize(
            [detections, masks],
            instance=instance,
            tags=tags,
            run_config=config,
            resources={
                "storage": LocalStorageResource(root=str(store.root)),
                "detector": DetectorResource(backend="fake"),
                "segmenter": SegmenterResource(backend="fake"),
                "stage_settings": StageSettingsResource(),
                "model_workers": LocalModelWorkers(),
            },
        )
        assert result.success
        calls = forward_calls(log)
        return {
            model: sorted(computed_shards([c for c in calls if c["model"] == model], names))
            for model in ("fake_detector", "fake_segmenter")
        }

    everything = {"fake_detector": names, "fake_segmenter": names}
    assert materialize(logs[0], force=False) == everything
    nothing = materialize(logs[1], force=False)
    assert nothing["fake_detector"] == [] and nothing["fake_segmenter"] == []
    assert materialize(logs[2], force=True) == everything
    for asset_name in ("detections", "masks"):
        assert not any(m["reused"] for m in shard_metadata(instance, asset_name).values())
