"""``python -m pseudolabel.workers``: run one GPU-stage task handed over by Dagster Pipes.

Loads the models once, processes every shard of the task in order, writes each shard's outputs
atomically and reports it (one ``shard_done`` message per shard) before starting the next, so a
worker that dies mid-task loses only the shard it was on; shards whose stored output is up to date
are reused, not recomputed. Logs stream into the Dagster run. A worker started by a local step ends
when that step's process does (:mod:`.lifetime`).
"""

from __future__ import annotations

import os
import sys
import time
from functools import partial
from typing import Any

from pseudolabel.models.checkpoints import CheckpointError
from pseudolabel.models.loading import ModelConfigError, load_detector, load_segmenter, load_tracker
from pseudolabel.models.stages import DetectionSettings, SegmentationSettings
from pseudolabel.storage import open_store
from pseudolabel.video.tracking import TrackingSettings
from pseudolabel.workers.lifetime import bind_to_step
from pseudolabel.workers.shards import detect_shard, gold_candidates, segment_shard, track_shard
from pseudolabel.workers.task import (
    DETECTIONS,
    FAILED,
    MASKS,
    MODELS_LOADED,
    SHARD_DONE,
    SHARD_STARTED,
    VIDEO_TRACKS,
    FailureKind,
    WorkerTask,
    meta,
)


def failure_kind(exc: BaseException) -> FailureKind:
    """Whether a retry could help: bad configuration and missing/mismatched checkpoints never do."""
    if type(exc).__name__ == "OutOfMemoryError":  # torch.cuda.OutOfMemoryError, without importing torch
        return "oom"
    if isinstance(exc, ModelConfigError | CheckpointError) or type(exc).__name__ == "TextEncoderNotFound":
        return "config"
    return "error"


def run_task(task: WorkerTask, pipes: Any) -> None:
    """Process every shard of ``task``; ``pipes`` is the open ``PipesContext`` (or a stand-in)."""
    store = open_store(task.storage)
    devices = os.environ.get("CUDA_VISIBLE_DEVICES", "<unset>")
    pipes.log.info(
        f"model worker pid {os.getpid()} ({sys.executable}), CUDA_VISIBLE_DEVICES={devices}: "
        f"{task.stage} for {len(task.shards)} shard(s), storage {store.uri()}"
    )
    started = time.perf_counter()
    detector_spec, segmenter_spec, tracker_spec = (
        task.detector_spec(),
        task.segmenter_spec(),
        task.tracker_spec(),
    )
    try:
        detector = load_detector(detector_spec) if detector_spec else None
        segmenter = load_segmenter(segmenter_spec) if segmenter_spec else None
        tracker = load_tracker(tracker_spec) if tracker_spec else None
    except Exception as exc:
        _report_failure(pipes, None, exc)
        raise
    load_s = round(time.perf_counter() - started, 3)
    loaded_models = (("detector", detector), ("segmenter", segmenter), ("tracker", tracker))
    models = {name: m.describe() for name, m in loaded_models if m}
    pipes.report_custom_message({"event": MODELS_LOADED, "models": models, "seconds": load_s})
    loaded = ", ".join(f"{name}: {m.get('model')} on {m.get('device')}" for name, m in models.items())
    pipes.log.info(f"loaded {loaded} in {load_s}s")

    workers = (detector_spec or segmenter_spec or tracker_spec).num_workers
    worker = {
        "pid": os.getpid(),
        "cuda_visible_devices": devices,
        "model_load_s": load_s,
        "started_at": time.time(),
    }
    # One call per shard, the models and settings bound once.
    force = task.force
    if task.stage == DETECTIONS:
        settings = DetectionSettings(**task.settings)
        process = partial(
            detect_shard, store, detector=detector, settings=settings, workers=workers, force=force
        )
    elif task.stage == MASKS:
        settings = SegmentationSettings(**task.settings)
        process = partial(
            segment_shard, store, segmenter=segmenter, settings=settings, workers=workers, force=force
        )
    elif task.stage == VIDEO_TRACKS:
        process = partial(
            track_shard,
            store,
            detector=detector,
            tracker=tracker,
            detection=DetectionSettings(**task.settings["detections"]),
            tracking=TrackingSettings(**task.settings["tracking"]),
            force=force,
        )
    else:  # GOLD_CANDIDATES: the "shard" is the evaluation's storage prefix
        process = partial(
            gold_candidates,
            store,
            detector=detector,
            segmenter=segmenter,
            detection=DetectionSettings(**task.settings["detections"]),
            segmentation=SegmentationSettings(**task.settings["masks"]),
            workers=workers,
        )
    for number, shard in enumerate(task.shards, start=1):
        pipes.report_custom_message({"event": SHARD_STARTED, "shard": shard})
        shard_started = time.perf_counter()
        try:
            metadata = process(shard)
        except Exception as exc:
            _report_failure(pipes, shard, exc)
            raise
        metadata["worker"] = meta({**worker, "finished_at": time.time()}, "json")
        pipes.report_custom_message({"event": SHARD_DONE, "shard": shard, "metadata": metadata})
        pipes.log.info(
            f"[{number}/{len(task.shards)}] {shard}: {task.stage} done in "
            f"{time.perf_counter() - shard_started:.1f}s"
        )


def _report_failure(pipes: Any, shard: str | None, exc: BaseException) -> None:
    kind = failure_kind(exc)
    message = f"{type(exc).__name__}: {exc}"
    pipes.report_custom_message({"event": FAILED, "shard": shard, "kind": kind, "message": message})
    pipes.log.error(f"{shard or 'model load'} failed ({kind}): {message}")


def main() -> int:
    from dagster_pipes import open_dagster_pipes

    bound = bind_to_step()  # first: a worker whose step is already gone stops here
    with open_dagster_pipes() as pipes:
        if bound is not None:
            pipes.log.info(f"model worker pid {os.getpid()}: {bound}")
        run_task(WorkerTask.from_extras(pipes.extras), pipes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
