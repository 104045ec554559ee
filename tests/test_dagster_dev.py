"""The deployment as an operator uses it: `dagster dev` (webserver + daemon + code server) on 127.0.0.1,
driven through the GraphQL API the UI uses, on each instance storage (SQLite; PostgreSQL as in Helm).

1. Materialize the catalog and the sample (5 shards).
2. Backfill `shard_chain_job` over every shard: with `PSEUDOLABEL_SHARDS_PER_RUN=2` the daemon launches
   3 runs of 2, 2 and 1 shards, each taking its range through the whole chain with one model worker per
   GPU step. GPU steps of different runs overlap, never more than the `gpu` pool's 2 at once, and
   overlapping workers hold different devices.
3. Edit the thresholds file, press "Reload", see every `pseudo_labels` shard unsynced (code version),
   backfill `relabel_job`: one run, only `pseudo_labels` steps, no model worker, every shard relabelled.

The fake models sleep `seconds_per_image` so GPU steps last long enough to overlap (1.5 s: at 0.75 s a
run's `video_tracks` step, which holds a `gpu` pool slot, could shift the runs apart on a busy box). Dagster's backfill
daemon looks at backfills every 30 s (not an instance setting); `dagster_dev.BACKFILL_DAEMON_INTERVAL_S`
shortens that pass for the test. What remains is mostly process start-up: each run and each step is a
fresh Python process that loads the code location (spawn), which on 2 cores is ~3-6 s apiece.
"""

from __future__ import annotations

import itertools
import os
import re
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from dagster_dev import DagsterDev, event_time, instance_yaml, metadata_json
from images import random_jpeg

REPO = Path(__file__).resolve().parents[1]
IMAGES, SHARD_SIZE, SHARDS_PER_RUN = 15, 3, 2
SHARDS = IMAGES // SHARD_SIZE  # 5
CHAIN_RUNS = -(-SHARDS // SHARDS_PER_RUN)  # 3 runs compete for the pool's 2 slots
GPU_POOL_LIMIT = 2
GPU_STEPS = {"detections", "masks"}
LABEL_STEPS = {"pseudo_labels", "video_labels"}  # what relabel_job runs: the label assets, no GPU stage
SAMPLE_CONFIG = {
    "ops": {
        "stratified_sample": {
            "config": {"sample_size": IMAGES, "min_per_stratum": 1, "shard_size": SHARD_SIZE}
        }
    }
}
# Run config replaces a resource's code-given values wholesale, so `backend` must be repeated here.
SLOW_FAKE_MODELS = {
    "resources": {
        "detector": {"config": {"backend": "fake", "seconds_per_image": 1.5, "batch_size": 1}},
        "segmenter": {"config": {"backend": "fake", "seconds_per_image": 1.5, "batch_size": 1}},
    }
}
WORKER_LINE = "starting model worker"  # logged once per GPU step (resources/workers.py)


@pytest.fixture
def catalog(tmp_path: Path, dev_server) -> Path:
    images = {f"tree-{i:02d}.jpg": random_jpeg(96, 72, seed=i) for i in range(IMAGES)}
    server = dev_server(catalog=[], images=images)
    path = tmp_path / "catalog.csv"
    labels = itertools.cycle(["oak", "pine", "birch"])
    path.write_text("image_url,label\n" + "".join(f"{server.image_url(n)},{next(labels)}\n" for n in images))
    return path


def dagster_dev(tmp_path: Path, catalog: Path, storage: dict[str, Any] | None) -> tuple[DagsterDev, Path]:
    """A `dagster dev` for the scenario; returns it and the thresholds file its code location reads."""
    home = tmp_path / "dagster_home"
    instance_yaml(home, storage)
    thresholds = tmp_path / "thresholds.yaml"
    shutil.copy(REPO / "pseudolabel" / "labels" / "thresholds.yaml", thresholds)
    env = {k: v for k, v in os.environ.items() if not k.startswith("DAGSTER_")}
    env.pop("PSEUDOLABEL_WORKER_PYTHON", None)  # fake models run on the orchestrator's interpreter
    env.update(
        PSEUDOLABEL_MODELS="fake",
        PSEUDOLABEL_STORAGE=str(tmp_path / "data"),
        PSEUDOLABEL_CATALOG=str(catalog),
        PSEUDOLABEL_THRESHOLDS=str(thresholds),
        PSEUDOLABEL_GPUS=str(GPU_POOL_LIMIT),
        PSEUDOLABEL_SHARDS_PER_RUN=str(SHARDS_PER_RUN),
        PSEUDOLABEL_GPU_LOCK_DIR=str(tmp_path / "gpu-locks"),
        PSEUDOLABEL_STEP_RETRIES="0",
    )
    return DagsterDev(home, env, tmp_path / "dagster-dev.log"), thresholds


def gpu_step_intervals(events_by_run: dict[str, list[dict]]) -> list[dict[str, Any]]:
    """One record per GPU step: run, step, its shards, STEP_START..STEP_SUCCESS, and its model
    worker(s): pids, devices, window (from each shard's `worker` metadata)."""
    steps = []
    for run_id, events in events_by_run.items():
        for step in GPU_STEPS:
            mine = [e for e in events if e.get("stepKey") == step]
            start = [event_time(e) for e in mine if e.get("eventType") == "STEP_START"]
            end = [event_time(e) for e in mine if e.get("eventType") == "STEP_SUCCESS"]
            assert len(start) == 1 and len(end) == 1, (run_id, step, mine)
            shards = {
                e["partition"]: metadata_json(e, "worker")
                for e in mine
                if e["__typename"] == "MaterializationEvent"
            }
            workers = list(shards.values())
            steps.append(
                {
                    "run": run_id,
                    "step": step,
                    "shards": sorted(shards),
                    "start": start[0],
                    "end": end[0],
                    "pids": {w["pid"] for w in workers},
                    "devices": {w["cuda_visible_devices"] for w in workers},
                    "worker": (min(w["started_at"] for w in workers), max(w["finished_at"] for w in workers)),
                    "worker_lines": sum(WORKER_LINE in (e.get("message") or "") for e in mine),
                }
            )
    return steps


def timeline(events_by_run: dict[str, list[dict]]) -> str:
    """Each run's steps as seconds since the backfill's first event (shown with -s or on failure)."""
    t0 = min(event_time(e) for events in events_by_run.values() for e in events)
    lines = []
    for run_id, events in events_by_run.items():
        marks = [
            f"{e.get('stepKey') or 'run'}:{e['eventType']}@{event_time(e) - t0:.1f}"
            for e in events
            if e.get("eventType") in {"RUN_START", "RUN_SUCCESS", "STEP_START", "STEP_SUCCESS"}
        ]
        lines.append(f"{run_id[:8]} " + " ".join(marks))
    return "\n".join(lines)


def most_at_once(intervals: list[tuple[float, float]]) -> int:
    edges = sorted([(start, 1) for start, _ in intervals] + [(end, -1) for _, end in intervals])
    running = peak = 0
    for _, change in edges:  # at equal times an end (-1) sorts before a start (+1)
        running += change
        peak = max(peak, running)
    return peak


def overlaps(a: tuple[float, float], b: tuple[float, float]) -> bool:
    return a[0] < b[1] and b[0] < a[1]


def readme_cli_backfill(server: DagsterDev, job: str, shards: list[str]) -> list[dict]:
    """The README's `dagster job backfill ... --all --noprompt`, exactly as written, against the running
    instance: the CLI submits one run per shard to the queue and `dagster dev`'s daemon launches them."""
    dagster = str(Path(sys.executable).parent / "dagster")
    command = f"dagster job backfill -w workspace.yaml -j {job} --all --noprompt"
    assert command in (REPO / "README.md").read_text(), command
    done = subprocess.run(
        [dagster, *command.split()[1:]],
        cwd=REPO,
        env={**server.env, "DAGSTER_HOME": str(server.home)},
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (backfill_id,) = re.findall(r"Launched backfill job `([^`]+)`", done.stdout + done.stderr)
    return server.wait_backfill_runs(backfill_id, len(shards), timeout_s=240)


def ui_workflow(
    tmp_path: Path, catalog: Path, storage: dict[str, Any] | None = None, *, readme_cli: bool = False
) -> dict[str, float]:
    timings: dict[str, float] = {}
    clock = time.monotonic()

    def lap(name: str) -> None:
        nonlocal clock
        timings[name] = round(time.monotonic() - clock, 1)
        clock = time.monotonic()

    server, thresholds = dagster_dev(tmp_path, catalog, storage)
    with server:
        lap("start")
        server.set_pool_limit("gpu", GPU_POOL_LIMIT)
        assert server.pool_limit("gpu") == GPU_POOL_LIMIT

        # 1. Catalog and sample: registers the shards.
        run_id = server.materialize(["catalog_snapshot", "stratified_sample"], SAMPLE_CONFIG)
        server.wait_run(run_id, timeout_s=120)
        shards = server.asset_partitions("normalized_images")
        assert len(shards) == SHARDS, shards
        lap("sample")

        # 2. Everything for every shard: one run per shard (the job's backfill policy).
        chain = server.backfill_job("shard_chain_job", SLOW_FAKE_MODELS)
        chain_runs = server.wait_backfill_runs(chain, CHAIN_RUNS, timeout_s=180)
        assert len(chain_runs) == CHAIN_RUNS, chain_runs
        lap("chain backfill")
        chain_events = {run["runId"]: server.events(run["runId"]) for run in chain_runs}
        steps = gpu_step_intervals(chain_events)
        story = timeline(chain_events)
        print(story)
        assert len(steps) == CHAIN_RUNS * len(GPU_STEPS), story
        # Every shard went through both GPU stages once; a run's range shares one worker per step.
        for stage in GPU_STEPS:
            done = sorted(shard for s in steps if s["step"] == stage for shard in s["shards"])
            assert done == sorted(shards), (stage, done)
        assert sorted(len(s["shards"]) for s in steps if s["step"] == "detections") == [1, 2, 2], steps
        assert all(s["worker_lines"] == 1 and len(s["pids"]) == 1 for s in steps), steps
        assert all(len(s["devices"]) == 1 for s in steps), steps
        # The pool holds GPU steps to its limit, across runs...
        assert most_at_once([(s["start"], s["end"]) for s in steps]) <= GPU_POOL_LIMIT, story
        # ...while steps of different runs do run at once, each worker on its own leased device.
        concurrent = [
            (a, b)
            for a, b in itertools.combinations(steps, 2)
            if a["run"] != b["run"] and overlaps(a["worker"], b["worker"])
        ]
        assert concurrent, f"no two GPU workers of different runs overlapped:\n{story}\n{steps}"
        assert all(a["devices"].isdisjoint(b["devices"]) for a, b in concurrent), concurrent
        assert set().union(*(s["devices"] for s in steps)) == {str(d) for d in range(GPU_POOL_LIMIT)}, steps
        held_back = sum(
            "Step blocked by limit for pool gpu" in (e.get("message") or "")
            for events in chain_events.values()
            for e in events
        )
        print(f"GPU steps held back by the pool: {held_back}")

        # 3. Edit the thresholds and reload the code location, as the UI's "Reload" button does.
        assert {v[0] for v in server.stale_status("pseudo_labels", shards).values()} == {"FRESH"}
        text = thresholds.read_text()
        assert "mask_score: 0.70" in text
        thresholds.write_text(text.replace("mask_score: 0.70", "mask_score: 0.90"))
        server.reload_location()
        for shard, (status, causes) in server.stale_status("pseudo_labels", shards).items():
            assert (status, causes) == ("STALE", {"CODE"}), shard
        for gpu_asset in GPU_STEPS:
            assert {v[0] for v in server.stale_status(gpu_asset, shards).values()} == {"FRESH"}
        lap("reload")

        relabel = server.backfill_job("relabel_job")
        relabel_runs = server.wait_backfill_runs(relabel, 1, timeout_s=180)
        lap("relabel backfill")
        assert len(relabel_runs) == 1, relabel_runs  # single-run backfill policy: one run, all shards
        events = server.events(relabel_runs[0]["runId"])
        started = {e["stepKey"] for e in events if e.get("eventType") == "STEP_START"}
        assert started == LABEL_STEPS
        assert not [e for e in events if WORKER_LINE in (e.get("message") or "")]
        relabelled = {
            e["partition"]: metadata_json(e, "thresholds")
            for e in events
            if e["__typename"] == "MaterializationEvent" and e["assetKey"]["path"] == ["pseudo_labels"]
        }
        assert set(relabelled) == set(shards)
        assert all(t["mask_score"] == 0.9 for t in relabelled.values()), relabelled
        assert {v[0] for v in server.stale_status("pseudo_labels", shards).values()} == {"FRESH"}

        # Both backfills are marked complete by the daemon (on its next pass).
        server.wait_backfill(chain, timeout_s=90)
        server.wait_backfill(relabel, timeout_s=90)
        lap("backfills complete")

        if readme_cli:  # 4. The same from the README's CLI lines, while `dagster dev` runs.
            runs = readme_cli_backfill(server, "relabel_job", shards)
            assert len(runs) == len(shards)  # the CLI makes one run per shard
            for run in runs:
                events = server.events(run["runId"])
                assert {e["stepKey"] for e in events if e.get("eventType") == "STEP_START"} == LABEL_STEPS
                assert not [e for e in events if WORKER_LINE in (e.get("message") or "")]
            runs = readme_cli_backfill(server, "shard_chain_job", shards)
            partitions = {t["value"] for r in runs for t in r["tags"] if t["key"] == "dagster/partition"}
            assert partitions == set(shards) and len(runs) == len(shards)
            lap("README CLI backfills")
    lap("stop")
    print(f"timings (s): {timings}, total {sum(timings.values()):.1f}")
    return timings


def test_ui_workflow_on_sqlite_instance_storage(tmp_path, catalog):
    ui_workflow(tmp_path, catalog, readme_cli=True)


def test_ui_workflow_on_postgres_instance_storage(tmp_path, catalog, postgres_server):
    database = postgres_server.create_database(f"dagster_{uuid.uuid4().hex[:12]}")
    ui_workflow(tmp_path, catalog, {"storage": postgres_server.instance_storage(database)})
